"""The optimizer and its learning rates: kohya's `optimizer_type` names (AdamW, AdamW8bit, Adafactor, Lion,
Prodigy) built from their maintained packages, `optimizer_args` checked against the optimizer's signature
before any model is loaded, one parameter group per trained model at its rate (`unet_lr`,
`text_encoder_lr`, SDXL's `text_encoder_2_lr`), the LR schedule, and what a resume reads back from and
applies to a restored optimizer.

The rules imitate kohya sd-scripts' `train_util.get_optimizer` / `get_scheduler_fix`:

- `optimizer_args` ("key=value", values as Python literals) go to the optimizer's constructor and win over
  the AdamW settings. The AdamW settings (`adam_beta1`, `adam_beta2`, `adam_epsilon`, `adam_weight_decay`)
  are passed where the optimizer has the same hyperparameter, as diffusers' training scripts pass them to
  AdamW, 8-bit AdamW and Prodigy (`ADAM_SETTINGS`); Adafactor gets none of them (its `eps` is a pair and its
  `beta1` means another thing), as in kohya.
- Adafactor (transformers') with `relative_step=True`, its default: the optimizer computes its own step size,
  so `lr` is None, the per-group rates are dropped and the LR schedule is transformers' `AdafactorSchedule`
  (which only reports that step size), kohya's `lr_scheduler = "adafactor"`. `warmup_init=True` implies
  `relative_step=True`, as kohya sets it. Its own warm-up replaces `lr_warmup_steps` (kohya refuses both).
- Prodigy estimates the step size: `learning_rate` is a multiplier, ~1.0 (kohya warns below 0.1; so do we).

torch's AdamW runs its fused kernel (`fused=True`) where torch supports it for every trained parameter
(`use_fused_adamw`; 39 -> 14 ms per optimizer step over the SD1.5 UNet's 1212 LoHa factors on one CPU
thread, and the fast path on CUDA). kohya leaves torch's default (a for-loop on CPU, `foreach` on CUDA); the
update is the same AdamW to float rounding. `optimizer_args` setting `fused` or `foreach` keep the user's
choice, and fp16 mixed precision keeps torch's default (see `use_fused_adamw`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer
from torch import nn
from transformers.optimization import AdafactorSchedule

from ..errors import ConfigError
from .config import TrainConfig, parse_optimizer_args
from .models import Models

logger = logging.getLogger(__name__)

# The optimizer class of each `optimizer_type` (kohya's names): (module, class name).
OPTIMIZER_CLASSES: dict[str, tuple[str, str]] = {
    "AdamW": ("torch.optim", "AdamW"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "Adafactor": ("transformers.optimization", "Adafactor"),
    "Lion": ("lion_pytorch", "Lion"),
    "Prodigy": ("prodigyopt", "Prodigy"),
}
# The AdamW settings each optimizer takes, as (parameter-group key, index in the tuple or None): diffusers'
# scripts pass betas/eps/weight_decay to AdamW, bitsandbytes' AdamW8bit and Prodigy; Lion has betas and
# weight decay but no epsilon; Adafactor's `eps` is a pair of other meaning and its `beta1` is off by default.
_ADAM = {
    "adam_beta1": ("betas", 0),
    "adam_beta2": ("betas", 1),
    "adam_epsilon": ("eps", None),
    "adam_weight_decay": ("weight_decay", None),
}
ADAM_SETTINGS: dict[str, dict[str, tuple[str, int | None]]] = {
    "AdamW": _ADAM,
    "AdamW8bit": _ADAM,
    "Prodigy": _ADAM,
    "Lion": {k: v for k, v in _ADAM.items() if k != "adam_epsilon"},
    "Adafactor": {},
}
RATE_SETTINGS = ("text_encoder_lr", "text_encoder_2_lr")  # the names of the optimizer groups after the UNet's
# optimizer_args keys that are set otherwise (kohya passes `lr=` itself: giving it again is a TypeError there).
_RESERVED_ARGS = {
    "params": "the trained adapters' parameters are passed by the trainer",
    "lr": "set learning_rate (or unet_lr / text_encoder_lr per model) instead",
}
PRODIGY_MIN_LR = 0.1  # kohya's threshold for "learning rate is too low" with D-Adaptation / Prodigy


def optimizer_class(optimizer_type: str) -> type[torch.optim.Optimizer]:
    """The optimizer class of `optimizer_type` (one of `config.OPTIMIZER_TYPES`, spelled canonically).

    Raises:
        ConfigError: its package cannot be imported (`config.check_packages` normally refuses this at start;
            an installed package that fails to import says why here), or the type is unknown.
    """
    if optimizer_type not in OPTIMIZER_CLASSES:
        raise ConfigError(
            f"optimizer_type = {optimizer_type!r} is not one of {', '.join(map(repr, OPTIMIZER_CLASSES))}"
        )
    module_name, name = OPTIMIZER_CLASSES[optimizer_type]
    try:
        module = importlib.import_module(module_name)
    # Besides ImportError: bitsandbytes without a usable native library raises RuntimeError or OSError.
    except (ImportError, RuntimeError, OSError) as exc:
        raise ConfigError(
            f"optimizer_type = {optimizer_type!r} needs {module_name.split('.')[0]}, which cannot be imported "
            f"({exc}); install it (`pip install loha-diffusion[optimizers]`, or [bnb] for AdamW8bit), or use "
            "optimizer_type = 'AdamW'"
        ) from None
    return getattr(module, name)


def optimizer_description(cfg: TrainConfig) -> str:
    """The optimizer as kohya's `ss_optimizer` names it: `module.Class`, then `(key=value,...)` of
    `optimizer_args` when there are any (e.g. `transformers.optimization.Adafactor(relative_step=False)`)."""
    module_name, name = OPTIMIZER_CLASSES[cfg.optimizer_type]
    args = parse_optimizer_args(cfg.optimizer_args)
    text = ",".join(f"{key}={value}" for key, value in args.items())
    return f"{module_name}.{name}" + (f"({text})" if text else "")


def _adafactor_args(args: dict[str, Any]) -> dict[str, Any]:
    """kohya's corrections of Adafactor's arguments: `relative_step` True unless given, and True whenever
    `warmup_init` is (transformers refuses warmup_init without it)."""
    args = {"relative_step": True, **args}
    if not args["relative_step"] and args.get("warmup_init", False):
        logger.info("Adafactor: relative_step set to True because warmup_init is True (as kohya does)")
        args["relative_step"] = True
    return args


def adam_settings(cfg: TrainConfig) -> dict[str, tuple[str, int | None]]:
    """The AdamW settings (`adam_beta1`, ...) that set a hyperparameter of `cfg`'s optimizer, as `{setting:
    (parameter-group key, index in the tuple or None)}`: those of `ADAM_SETTINGS` whose key `optimizer_args`
    does not set (`optimizer_args` win)."""
    given = parse_optimizer_args(cfg.optimizer_args)
    return {name: where for name, where in ADAM_SETTINGS[cfg.optimizer_type].items() if where[0] not in given}


def optimizer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of the optimizer's constructor, without `lr`: the AdamW settings it takes
    (`adam_settings`: `betas`, `eps`, `weight_decay`), then `optimizer_args` over them; for Adafactor with
    kohya's corrections (`relative_step` True unless given or implied by `warmup_init`)."""
    kwargs: dict[str, Any] = {}
    for name, (key, index) in adam_settings(cfg).items():
        value = getattr(cfg, name)
        if index is None:
            kwargs[key] = value
        else:
            pair = list(kwargs.get(key, (cfg.adam_beta1, cfg.adam_beta2)))
            pair[index] = value
            kwargs[key] = tuple(pair)
    kwargs.update(parse_optimizer_args(cfg.optimizer_args))
    if cfg.optimizer_type == "Adafactor":
        kwargs = _adafactor_args(kwargs)
    return kwargs


def adafactor_relative_step(cfg: TrainConfig) -> bool:
    """True when `cfg` trains with Adafactor computing its own step size (`relative_step`, Adafactor's
    default): the learning-rate settings and schedule are then not used (see the module docstring)."""
    if cfg.optimizer_type != "Adafactor":
        return False
    return bool(_adafactor_args(parse_optimizer_args(cfg.optimizer_args))["relative_step"])


def _relative_step_fix() -> str:
    return (
        "to train Adafactor at learning_rate with a schedule instead, set optimizer_args = "
        '["relative_step=False", "scale_parameter=False", "warmup_init=False"] (kohya\'s usual Adafactor '
        "settings, with lr_scheduler = 'constant_with_warmup')"
    )


def check_schedule(cfg: TrainConfig) -> None:
    """Refuse LR-schedule settings that cannot run: `piecewise_constant` (diffusers needs step rules, which
    no setting gives), kohya's `lr_scheduler = "adafactor"` with
    another optimizer or with Adafactor's `relative_step=False`, and `lr_warmup_steps` with Adafactor's
    relative step (its warm-up is `warmup_init=True`; kohya refuses the pair too).

    Raises:
        ConfigError: naming the settings and what to write instead.
    """
    if cfg.lr_scheduler == "piecewise_constant":
        raise ConfigError(
            "lr_scheduler = 'piecewise_constant' needs step rules (kohya passes them as lr_scheduler_args = "
            '["step_rules=1:100,0.1"]), for which this trainer has no setting; use constant, '
            "constant_with_warmup, linear, cosine, cosine_with_restarts (lr_scheduler_num_cycles) or polynomial "
            "(lr_scheduler_power)"
        )
    relative = adafactor_relative_step(cfg)
    if cfg.lr_scheduler == "adafactor" and not relative:
        if cfg.optimizer_type != "Adafactor":
            raise ConfigError(
                f"lr_scheduler = 'adafactor' only goes with optimizer_type = 'Adafactor' (it reports the step "
                f"size Adafactor computes), not {cfg.optimizer_type!r}; use another lr_scheduler such as "
                "'constant' or 'cosine'"
            )
        raise ConfigError(
            "lr_scheduler = 'adafactor' needs Adafactor's relative_step=True (its default), but optimizer_args "
            "sets relative_step=False; use lr_scheduler = 'constant_with_warmup' (kohya's advice) or another "
            "diffusers schedule"
        )
    if relative and cfg.lr_warmup_steps:
        raise ConfigError(
            f"lr_warmup_steps = {cfg.lr_warmup_steps} cannot be used with Adafactor's relative_step=True (its "
            "default; it computes its own step size): set lr_warmup_steps = 0 (optimizer_args = "
            '["warmup_init=True"] for Adafactor\'s own warm-up), or ' + _relative_step_fix()
        )


def check_optimizer(cfg: TrainConfig, num_text_encoders: int = 1) -> None:
    """Check the optimizer settings before any model is loaded: every `optimizer_args` key is a parameter of
    the optimizer's constructor (`inspect.signature`), the optimizer accepts the values (it is built once on a
    one-element tensor), Prodigy gets one learning rate for all groups (`num_text_encoders`: 2 for SDXL, as
    `group_learning_rates`), and the LR schedule fits the optimizer (`check_schedule`).

    Raises:
        ConfigError: a key the optimizer does not take (named, with the keys it accepts), `lr` or `params`
            among them, a value it refuses (its own message), Prodigy with different group rates (prodigyopt
            refuses them at its first step), or as `check_schedule` / `optimizer_class`.
    """
    cls = optimizer_class(cfg.optimizer_type)
    args = parse_optimizer_args(cfg.optimizer_args)
    parameters = inspect.signature(cls.__init__).parameters
    accepted = [n for n in parameters if n not in ("self", *_RESERVED_ARGS)]
    accepted = [n for n in accepted if parameters[n].kind not in (inspect.Parameter.VAR_POSITIONAL,)]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in args:
        if key in _RESERVED_ARGS:
            raise ConfigError(f"optimizer_args sets {key!r}: {_RESERVED_ARGS[key]}")
        if key not in parameters and not takes_any:
            raise ConfigError(
                f"optimizer_args sets {key!r}, which {cfg.optimizer_type} ({optimizer_description(cfg)}) does "
                f"not take; it accepts: {', '.join(accepted)}"
            )
    check_schedule(cfg)
    rates = group_learning_rates(cfg, num_text_encoders)
    if cfg.optimizer_type == "Prodigy" and len(set(rates)) > 1:
        names = [unet_rate_setting(cfg), *RATE_SETTINGS][: len(rates)]
        shown = ", ".join(f"{name} {rate:g}" for name, rate in zip(names, rates))
        raise ConfigError(
            f"Prodigy takes one learning rate for every trained model (prodigyopt refuses different rates per "
            f"group; it estimates one step size for all): the rates are {shown}. Leave unet_lr, "
            "text_encoder_lr and text_encoder_2_lr unset and set learning_rate (about 1.0)"
        )
    probe = torch.zeros(1, requires_grad=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # prodigyopt prints its weight-decay mode
            cls(
                [probe],
                lr=None if adafactor_relative_step(cfg) else cfg.learning_rate,
                **optimizer_kwargs(cfg),
            )
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"optimizer_type = {cfg.optimizer_type!r} refuses its settings (optimizer_args "
            f"{cfg.optimizer_args}, and {', '.join(adam_settings(cfg)) or 'no AdamW settings'}): {exc}"
        ) from None


def optimizer_warnings(cfg: TrainConfig) -> list[str]:
    """Surprising optimizer settings, each with what to do instead (the dry run lists them; `make_optimizer`
    logs them): Prodigy below `PRODIGY_MIN_LR` (kohya's warning), Adafactor's relative step ignoring the
    learning rates and schedule (kohya's) or scaling steps by the weights' RMS (`scale_parameter`: zero-started
    adapter factors then barely train), Lion with AdamW's beta2 0.999 (lion-pytorch's default is 0.99)."""
    warnings = []
    rates = [cfg.effective_unet_lr, *([cfg.text_encoder_lr or cfg.learning_rate] * cfg.train_text_encoder)]
    if cfg.optimizer_type == "Prodigy" and min(rates) <= PRODIGY_MIN_LR:
        warnings.append(
            f"Prodigy estimates the step size itself and multiplies it by the learning rate: learning rates "
            f"{', '.join(f'{r:g}' for r in rates)} are too low, set learning_rate (and unet_lr / "
            "text_encoder_lr) around 1.0 (kohya warns the same)."
        )
    if adafactor_relative_step(cfg):
        ignored = [
            n for n in ("unet_lr", "text_encoder_lr", "text_encoder_2_lr") if getattr(cfg, n) is not None
        ]
        if cfg.lr_scheduler not in ("constant", "adafactor"):
            ignored.append(f"lr_scheduler = {cfg.lr_scheduler!r}")
        scaled = optimizer_kwargs(cfg).get("scale_parameter", True)
        if ignored or scaled:
            text = "Adafactor with relative_step=True (its default) computes its own step size"
            if ignored:
                verb = "is" if len(ignored) == 1 else "are"
                text += f", so {', '.join(ignored)} {verb} not used (kohya ignores them too)"
            if scaled:
                text += (
                    "; with scale_parameter=True (its default) each step is scaled by the weight's RMS, so the "
                    "adapter factors that start at zero barely move (tiny SD1 model, 40 steps: fixed-set loss "
                    "1.148 -> 1.148, 0.952 with kohya's settings below)"
                )
            warnings.append(f"{text}; {_relative_step_fix()}.")
    if cfg.optimizer_type == "Lion" and "betas" not in parse_optimizer_args(cfg.optimizer_args):
        if cfg.adam_beta2 == 0.999:
            warnings.append(
                "Lion gets betas = (adam_beta1, adam_beta2) = "
                f"({cfg.adam_beta1:g}, 0.999); the Lion paper and lion-pytorch use (0.9, 0.99): set "
                "adam_beta2 = 0.99 or optimizer_args = ['betas=0.9,0.99']."
            )
    return warnings


def group_learning_rates(cfg: TrainConfig, num_text_encoders: int = 1) -> list[float]:
    """The base learning rate of each optimizer parameter group: the UNet adapter's (`unet_lr`, default
    `learning_rate`, kohya's rule), then with `train_text_encoder` `text_encoder_lr` (default `learning_rate`)
    and, for SDXL's second text encoder (`num_text_encoders` 2), `text_encoder_2_lr` (default
    `text_encoder_lr`), as kohya's `--text_encoder_lr` takes one rate per SDXL text encoder."""
    if not cfg.train_text_encoder:
        return [cfg.effective_unet_lr]
    te_lr = cfg.text_encoder_lr or cfg.learning_rate
    return [cfg.effective_unet_lr, te_lr] + [cfg.text_encoder_2_lr or te_lr] * (num_text_encoders == 2)


def unet_rate_setting(cfg: TrainConfig) -> str:
    """The setting that gives the UNet group its rate: `unet_lr` when set, else `learning_rate`."""
    return "learning_rate" if cfg.unet_lr is None else "unet_lr"


def trained_models(cfg: TrainConfig, models: Models) -> list[nn.Module]:
    """The models with a trained adapter, in optimizer-group order: the UNet, then with
    `train_text_encoder` the text encoder(s)."""
    return [models.unet, *models.text_encoders] if cfg.train_text_encoder else [models.unet]


def trainable_param_groups(cfg: TrainConfig, models: Models) -> list[dict]:
    """Optimizer parameter groups: the UNet adapter, then (with `train_text_encoder`) the text-encoder
    adapter(s), at `group_learning_rates`. Each is `{"params": [...], "lr": float}`."""
    rates = group_learning_rates(cfg, len(models.text_encoders))
    return [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}
        for model, lr in zip(trained_models(cfg, models), rates)
    ]


def use_fused_adamw(cfg: TrainConfig, params: list[torch.Tensor], mixed_precision: str | None = None) -> bool:
    """True when `cfg`'s optimizer should be torch's AdamW with `fused=True` over `params` (the trained
    parameters): `optimizer_type` "AdamW", `optimizer_args` setting neither `fused` nor `foreach` (the user's
    choice wins), not fp16 mixed precision, and torch's own rule for its fused kernels holding for every
    parameter (`torch.optim.optimizer._default_to_fused_or_foreach`: a plain floating-point tensor on a device
    type of `_get_fused_kernels_supported_devices()`, not `differentiable`), so torch's list of devices is
    used, not ours. `mixed_precision` is the run's resolved precision (`accelerator.mixed_precision`); None
    takes `cfg.mixed_precision`.

    fp16 is left out because accelerate (1.15) tells a step the gradient scaler skipped for an overflow by
    the optimizer's `step` not being called; the fused kernel is called and skips the update itself, so
    accelerate would advance the LR schedule on skipped steps (huggingface/accelerate#4242)."""
    if cfg.optimizer_type != "AdamW":
        return False
    args = parse_optimizer_args(cfg.optimizer_args)
    if "fused" in args or "foreach" in args:
        return False
    if (mixed_precision or cfg.mixed_precision) == "fp16":
        return False
    # Private in torch (the rule its optimizers apply for `fused=None`), so a torch without it falls back.
    torch_rule = getattr(torch_optimizer, "_default_to_fused_or_foreach", None)
    if torch_rule is None:
        return False
    fused, _ = torch_rule(list(params), bool(args.get("differentiable", False)), use_fused=True)
    return bool(fused)


def _keep_implementation(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A `load_state_dict` pre-hook: the loaded param groups take this optimizer's `fused` and `foreach`.

    torch restores them from the checkpoint, but which kernel runs belongs to this run (its device, its
    mixed precision), not to the run that saved: a checkpoint of a bf16 run resumed under fp16 must not stay
    fused. torch then places each state's `step` for the kernel in use (on the parameter's device when
    fused). With the same settings the values are equal and nothing changes."""
    groups = [
        {**saved, **{key: group[key] for key in ("fused", "foreach") if key in group}}
        for saved, group in zip(state_dict["param_groups"], optimizer.param_groups)
    ]
    # torch passes a shallow copy; the caller's groups are left as they were.
    return {**state_dict, "param_groups": groups + state_dict["param_groups"][len(groups) :]}


def make_optimizer(
    cfg: TrainConfig, param_groups: list[dict], mixed_precision: str | None = None
) -> torch.optim.Optimizer:
    """`cfg.optimizer_type`'s optimizer over `param_groups` (`trainable_param_groups`), with
    `optimizer_kwargs(cfg)` and `lr = learning_rate` as the default rate; for Adafactor's relative step
    `lr = None` and the groups' rates dropped, as kohya does. torch's AdamW gets `fused=True` where
    `use_fused_adamw` says so (`mixed_precision`: the run's, `accelerator.mixed_precision`; None takes
    `cfg.mixed_precision`), and keeps this choice when a checkpoint's state is loaded (`_keep_implementation`).
    Logs the optimizer and `optimizer_warnings`.

    Raises:
        ConfigError: as `optimizer_class` (a package that cannot be imported), or the optimizer refuses the
            settings (`check_optimizer` normally says so before any model is loaded).
    """
    cls = optimizer_class(cfg.optimizer_type)
    kwargs = optimizer_kwargs(cfg)
    lr: float | None = cfg.learning_rate
    if adafactor_relative_step(cfg):
        lr = None
        param_groups = [{k: v for k, v in group.items() if k != "lr"} for group in param_groups]
    params = [p for group in param_groups for p in group["params"]]
    if use_fused_adamw(cfg, params, mixed_precision):
        kwargs["fused"] = True
    logger.info("optimizer: %s%s", optimizer_description(cfg), " (fused)" if kwargs.get("fused") else "")
    for warning in optimizer_warnings(cfg):
        logger.warning("%s", warning)
    try:
        optimizer = cls(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer_type = {cfg.optimizer_type!r} refuses its settings: {exc}") from None
    if cfg.optimizer_type == "AdamW":
        optimizer.register_load_state_dict_pre_hook(_keep_implementation)
    return optimizer


def make_lr_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int
) -> Any:
    """diffusers' `get_scheduler(cfg.lr_scheduler)` over `max_train_steps` optimizer steps; for Adafactor's
    relative step transformers' `AdafactorSchedule` (kohya's `lr_scheduler = "adafactor"`: it reports the
    step size Adafactor computes, `learning_rate` until the first step).

    accelerate steps a prepared scheduler once per process per optimizer step, so warm-up and total steps are
    multiplied by `num_processes` (as diffusers' scripts do).

    Raises:
        ConfigError: as `check_schedule`.
    """
    from diffusers.optimization import get_scheduler

    check_schedule(cfg)
    if adafactor_relative_step(cfg):
        return _AdafactorSchedule(optimizer, cfg.learning_rate)
    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )


class _AdafactorSchedule(AdafactorSchedule):
    """transformers' `AdafactorSchedule` reporting its rates as floats: Adafactor computes them as 0-d
    tensors, which would become the groups' `lr` and the logged rate."""

    def get_lr(self) -> list[float]:
        return [float(lr) for lr in super().get_lr()]


def _base_rate(group: dict[str, Any]) -> float:
    return group.get("initial_lr", group["lr"])


def optimizer_settings(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The hyperparameters a (restored) optimizer holds, under the config's names, for the settings of
    `cfg`'s optimizer: the UNet group's base rate (before the LR schedule) under `unet_rate_setting(cfg)`,
    `text_encoder_lr` (a second group) and `text_encoder_2_lr` (a third: SDXL) — none for Adafactor's
    relative step, which has no rate — and the AdamW settings the optimizer takes (`adam_settings`). After a
    resume these are the checkpoint's values."""
    groups = optimizer.param_groups
    settings: dict[str, Any] = {}
    if not adafactor_relative_step(cfg):
        settings[unet_rate_setting(cfg)] = _base_rate(groups[0])
        for group, name in zip(groups[1:], RATE_SETTINGS):
            settings[name] = _base_rate(group)
    for name, (key, index) in adam_settings(cfg).items():
        value = groups[0][key]
        settings[name] = value if index is None else value[index]
    return settings


def apply_optimizer_settings(cfg: TrainConfig, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
    """Make a restored optimizer and LR scheduler use `cfg`'s hyperparameters from their current step on.

    Loading a checkpoint brings back the checkpoint's param groups (learning rates, betas, epsilon, weight
    decay; Prodigy's `d` estimates, ...) and the scheduler's `base_lrs`, whatever the resumed run was given.
    This sets the base learning rates (`group_learning_rates`) as the scheduler's `base_lrs` and the groups'
    `initial_lr`, each group's current `lr` to base × the schedule's factor at the scheduler's step (the
    value a run started with `cfg` would have there; the schedule itself is built from `cfg` by
    `make_lr_scheduler`), and the AdamW settings where the optimizer has them (`adam_settings`); the
    optimizer's other state is left as restored. Adafactor's relative step has no rate to set. With unchanged
    settings every value is recomputed to the same number. `lr_scheduler` is a diffusers `LambdaLR`, possibly
    wrapped by accelerate (`.scheduler`).
    """
    for group in optimizer.param_groups:
        for name, (key, index) in adam_settings(cfg).items():
            value = getattr(cfg, name)
            if index is not None:
                pair = list(group[key])
                pair[index] = value
                value = tuple(pair)
            group[key] = value
    if adafactor_relative_step(cfg):
        return
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    base_lrs = group_learning_rates(cfg, len(optimizer.param_groups) - 1)
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(optimizer.param_groups, base_lrs, lrs):
        group.update(lr=lr, initial_lr=base)
    scheduler.base_lrs = list(base_lrs)
    scheduler._last_lr = list(lrs)  # what get_last_lr() reports until the next step
