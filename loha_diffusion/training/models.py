"""The run's models: the base model loaded with errors that say what to do, frozen and placed; the adapter
configs the run injects; the trainable parameters, the optimizer and its learning-rate schedule; and the
weightless (`meta` device) models the dry run plans on.

Everything here reads a `TrainConfig`; the loop (`loop.py`) calls these steps in diffusers' order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..config import AdapterConfig, config_class
from ..errors import ConfigError
from ..meta_models import meta_models
from ..model import inject_adapter
from ..targeting import text_encoder_preset, unet_preset
from ..utils import torch_dtype
from .config import TrainConfig

T = TypeVar("T")

ADAPTER_NAME = "default"  # the trained adapter's name on the UNet and text encoder (checkpoints, exports)

MAX_SANE_TOKENS = 100_000  # a text encoder's token limit above this is transformers' "no limit" placeholder


def load_with_hint(cfg: TrainConfig, loader: Callable[..., T]) -> T:
    """Call `loader(revision=cfg.revision)` for the base model `cfg.pretrained_model_name_or_path`.

    Raises:
        ConfigError: the path looks local and does not exist (with the `loha-diffusion make-tiny` command for
            the offline quick start), or `loader` raised `OSError` (not found, unreachable hub, missing
            file); the message says what a base model folder holds.
    """
    path = cfg.pretrained_model_name_or_path
    # "org/name" may be a hub id; a path whose first folder exists here (e.g. outputs/tiny-sd) is local.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.isdir(path.split("/")[0])
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(
            f"pretrained_model_name_or_path {path!r} does not exist. For the offline quick start create it with "
            f"`loha-diffusion make-tiny {path}`."
        )
    try:
        return loader(revision=cfg.revision)
    except OSError as exc:
        raise ConfigError(
            f"cannot load the base model from pretrained_model_name_or_path = {path!r} "
            f"(revision {cfg.revision!r}): {exc}\nUse a local diffusers folder (model_index.json, unet/, vae/, "
            f"text_encoder/, tokenizer/, scheduler/) or a hub id you can reach; offline, make a tiny one with "
            f"`loha-diffusion make-tiny {path}`."
        ) from None


@dataclass
class Models:
    """The base model's parts, as diffusers' training scripts load them (`CLIPTokenizer`, `CLIPTextModel`,
    `AutoencoderKL`, `UNet2DConditionModel`, `DDPMScheduler`)."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The base model's `CLIPTokenizer` alone (`tokenizer/` of `cfg.pretrained_model_name_or_path`): small
    files, no weights, so the data scan can count caption tokens before any model is loaded.

    Raises:
        ConfigError: the tokenizer cannot be loaded (see `models.load_with_hint`), or what loads is empty
            (transformers builds one from a missing `tokenizer/` folder).
    """
    from transformers import CLIPTokenizer

    path = cfg.pretrained_model_name_or_path
    tokenizer = load_with_hint(
        cfg, lambda **kw: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    )
    # transformers 5 builds an empty tokenizer (2 tokens, no length limit) from a missing folder.
    if len(tokenizer) <= 2 or tokenizer.model_max_length > MAX_SANE_TOKENS:
        raise ConfigError(
            f"{path} has no usable tokenizer (tokenizer/ is missing or incomplete: {len(tokenizer)} tokens, "
            f"limit {tokenizer.model_max_length}); a diffusers folder has tokenizer/vocab.json and merges.txt"
        )
    return tokenizer


def load_models(cfg: TrainConfig, tokenizer: Any | None = None) -> Models:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler from a diffusers folder or hub id.

    `tokenizer`: one `load_tokenizer(cfg)` already gave (the run loads it first for the data scan); None
    loads it here.

    Weights come in the dtype they are stored in (`cfg.variant` picks e.g. the fp16 files), on the CPU.

    Raises:
        ConfigError: the model cannot be loaded (see `load_with_hint`), or it is an SDXL-type model (its UNet
            has added embeddings), which this trainer does not train.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = cfg.pretrained_model_name_or_path
    weights = {"variant": cfg.variant}
    models = Models(
        tokenizer=tokenizer if tokenizer is not None else load_tokenizer(cfg),
        text_encoder=load_with_hint(
            cfg, lambda **kw: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights, **kw)
        ),
        vae=load_with_hint(
            cfg, lambda **kw: AutoencoderKL.from_pretrained(path, subfolder="vae", **weights, **kw)
        ),
        unet=load_with_hint(
            cfg, lambda **kw: UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights, **kw)
        ),
        noise_scheduler=load_with_hint(
            cfg, lambda **kw: DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        ),
    )
    if models.unet.config.get("addition_embed_type") is not None:
        raise ConfigError(
            f"{path} is an SDXL-type model (its UNet has {models.unet.config.addition_embed_type!r} embeddings); "
            "this trainer handles SD1.x/SD2.x. Adapters for SDXL can be loaded and exported, not trained here."
        )
    return models


def load_meta_models(cfg: TrainConfig) -> tuple[nn.Module, nn.Module | None]:
    """The base UNet, and the text encoder when `train_text_encoder` is set, on the `meta` device (from the
    model's configs only: no weights read, no memory used), for the dry run.

    Raises:
        ConfigError: as `load_with_hint` (the folder has no `model_index.json` or component config, the hub
            id cannot be reached), or `train_text_encoder` is set and the model has no `text_encoder`.
    """
    components = ("unet", "text_encoder") if cfg.train_text_encoder else ("unet",)
    path = cfg.pretrained_model_name_or_path
    models = load_with_hint(cfg, lambda **kw: meta_models(path, components=components, **kw))
    if cfg.train_text_encoder and "text_encoder" not in models:
        raise ConfigError(f"train_text_encoder is set but {path} has no text_encoder.")
    return models["unet"], models.get("text_encoder")


def unet_adapter_config(cfg: TrainConfig) -> AdapterConfig:
    """The UNet adapter config: the preset (or explicit `target_modules`) with the run's ranks and options.

    Raises:
        ConfigError: `conv_rank`/`conv_alpha` are set with a preset other than "full" or with explicit
            `target_modules` (where `rank_pattern`/`alpha_pattern` set per-module ranks).
    """
    common = {
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "exclude_modules": cfg.exclude_modules,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
    }
    if cfg.target_modules:
        if cfg.conv_rank is not None or cfg.conv_alpha is not None:
            raise ConfigError(
                "conv_rank/conv_alpha apply to preset = 'full'; with explicit target_modules set per-module "
                "ranks with rank_pattern/alpha_pattern"
            )
        config_cls = config_class(cfg.algo)
        return config_cls(
            r=cfg.rank, alpha=cfg.effective_alpha, target_modules=list(cfg.target_modules), **common
        )
    if cfg.preset != "full" and (cfg.conv_rank is not None or cfg.conv_alpha is not None):
        raise ConfigError(
            f"conv_rank/conv_alpha only apply to preset = 'full' (preset {cfg.preset!r} adapts no k x k convs)"
        )
    return unet_preset(
        cfg.preset,
        algo=cfg.algo,
        r=cfg.rank,
        alpha=cfg.effective_alpha,
        conv_r=cfg.conv_rank if cfg.preset == "full" else None,
        conv_alpha=cfg.conv_alpha if cfg.preset == "full" else None,
        **common,
    )


def text_encoder_adapter_config(cfg: TrainConfig) -> AdapterConfig | None:
    """The text-encoder adapter config (CLIP attention + MLP), or None when the text encoder is frozen."""
    if not cfg.train_text_encoder:
        return None
    return text_encoder_preset(
        algo=cfg.algo,
        r=cfg.rank,
        alpha=cfg.effective_alpha,
        rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
    )


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen base weights: fp16/bf16 under that mixed precision, else float32 (as diffusers'
    scripts do). `mixed_precision` is accelerate's value ("no", "fp16", "bf16", "fp8")."""
    return torch_dtype(mixed_precision) if mixed_precision in ("fp16", "bf16") else torch.float32


def freeze_base_models(models: Models, device: torch.device, dtype: torch.dtype) -> None:
    """Freeze the VAE, text encoder and UNet and move them to `device` (and to `dtype` unless float32)."""
    for model in (models.vae, models.text_encoder, models.unet):
        model.requires_grad_(False)
        model.to(device)
        if dtype != torch.float32:
            model.to(dtype=dtype)


def add_adapters(
    models: Models, cfg: TrainConfig, unet_config: AdapterConfig, te_config: AdapterConfig | None
) -> None:
    """Inject the adapters (`te_config` None: the text encoder stays frozen), then switch on gradient
    checkpointing and xformers as `cfg` says, and set train/eval modes (VAE always eval).

    Adapters are created in float32 on each base layer's device (mixed precision keeps trainable weights
    fp32); their initialisation draws from the global torch RNG (seed it first).

    Raises:
        ConfigError: `enable_xformers_memory_efficient_attention` is set and xformers cannot run.
    """
    inject_adapter(models.unet, unet_config, ADAPTER_NAME)
    if te_config is not None:
        inject_adapter(models.text_encoder, te_config, ADAPTER_NAME)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if te_config is not None:
            models.text_encoder.gradient_checkpointing_enable()
    if cfg.enable_xformers_memory_efficient_attention:
        enable_xformers(models.unet)
    models.unet.train()
    models.text_encoder.train(te_config is not None)
    models.vae.eval()


def enable_xformers(unet: nn.Module) -> None:
    """Switch the UNet to xformers attention.

    Raises:
        ConfigError: xformers is not installed, or it cannot run here (e.g. no CUDA); the message says to
            drop the flag (PyTorch SDPA attention is the default).
    """
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` (matching your "
            "torch build), or drop the flag to use PyTorch SDPA attention (the default, usually as fast)."
        ) from None
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise ConfigError(
            f"xformers is installed but cannot run here: {exc}. Drop the flag to use SDPA."
        ) from None


def group_learning_rates(cfg: TrainConfig) -> list[float]:
    """The base learning rate of each optimizer parameter group: `learning_rate` (UNet adapter), then with
    `train_text_encoder` `text_encoder_lr` (default `learning_rate`)."""
    if cfg.train_text_encoder:
        return [cfg.learning_rate, cfg.text_encoder_lr or cfg.learning_rate]
    return [cfg.learning_rate]


def trainable_param_groups(cfg: TrainConfig, models: Models) -> list[dict]:
    """Optimizer parameter groups: the UNet adapter, then (with `train_text_encoder`) the text-encoder adapter,
    at `group_learning_rates(cfg)`. Each is `{"params": [...], "lr": float}`."""
    trained = [models.unet, models.text_encoder] if cfg.train_text_encoder else [models.unet]
    return [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}
        for model, lr in zip(trained, group_learning_rates(cfg))
    ]


def make_optimizer(cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (betas, weight decay, epsilon from `cfg`), or bitsandbytes' 8-bit AdamW with `use_8bit_adam`.

    Raises:
        ConfigError: `use_8bit_adam` is set and bitsandbytes is not installed.
    """
    optimizer_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "use_8bit_adam needs bitsandbytes: `pip install bitsandbytes` (or `pip install "
                "loha-diffusion[bnb]`), or drop the flag to use torch AdamW."
            ) from None
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(
        param_groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )


def make_lr_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int
) -> Any:
    """diffusers' `get_scheduler(cfg.lr_scheduler)` over `max_train_steps` optimizer steps.

    accelerate steps a prepared scheduler once per process per optimizer step, so warm-up and total steps are
    multiplied by `num_processes` (as diffusers' scripts do).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )


def optimizer_settings(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The hyperparameters an optimizer holds, under the config's names: `learning_rate` (the UNet group's
    base rate, before the LR schedule), `text_encoder_lr` (when there is a second group), `adam_beta1`,
    `adam_beta2`, `adam_epsilon`, `adam_weight_decay`. After a resume these are the checkpoint's values."""
    groups = optimizer.param_groups
    first = groups[0]
    settings = {
        "learning_rate": first.get("initial_lr", first["lr"]),
        "adam_beta1": first["betas"][0],
        "adam_beta2": first["betas"][1],
        "adam_epsilon": first["eps"],
        "adam_weight_decay": first["weight_decay"],
    }
    if len(groups) > 1:
        settings["text_encoder_lr"] = groups[1].get("initial_lr", groups[1]["lr"])
    return settings


def apply_optimizer_settings(cfg: TrainConfig, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
    """Make a restored optimizer and LR scheduler use `cfg`'s hyperparameters from their current step on.

    `accelerator.load_state` brings back the checkpoint's param groups (learning rate, betas, epsilon, weight
    decay) and the scheduler's `base_lrs`, whatever the resumed run was given. This sets the base learning
    rates (`group_learning_rates`) as the scheduler's `base_lrs` and the groups' `initial_lr`, the other
    hyperparameters in every group, and each group's current `lr` to base × the schedule's factor at the
    scheduler's step: the value a run started with `cfg` would have there (the schedule itself is built from
    `cfg` by `make_lr_scheduler`). With unchanged settings every value is recomputed to the same number.
    `lr_scheduler` is a diffusers `LambdaLR`, possibly wrapped by accelerate (`.scheduler`).
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    base_lrs = group_learning_rates(cfg)
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(optimizer.param_groups, base_lrs, lrs):
        group.update(
            lr=lr,
            initial_lr=base,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.adam_weight_decay,
        )
    scheduler.base_lrs = list(base_lrs)
    scheduler._last_lr = list(lrs)  # what get_last_lr() reports until the next step
