"""torch's fused AdamW for the trained adapters (issue 14, speed): `make_optimizer` passes `fused=True` where
torch's rule for its fused kernels holds for every trained parameter, never over the user's `fused` /
`foreach` in `optimizer_args`, never for another optimizer or under fp16 (accelerate#4242); the fused step is
torch's for-loop AdamW to float rounding, and a loaded checkpoint keeps this run's choice of kernel."""

from __future__ import annotations

import pytest
import torch

from loha_diffusion.training.config import load_config
from loha_diffusion.training.models import (
    Models,
    add_adapters,
    freeze_base_models,
    text_encoder_adapter_config,
    unet_adapter_config,
)
from loha_diffusion.training.optimizers import (
    make_lr_scheduler,
    make_optimizer,
    trainable_param_groups,
    use_fused_adamw,
)
from loha_diffusion.training.statefile import parse_state_files, state_files

REQUIRED = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "8"]


def cfg_of(optimizer_type: str = "AdamW", args: list[str] | None = None, **values):
    argv = REQUIRED + ["--optimizer_type", optimizer_type] + (["--optimizer_args", *args] if args else [])
    return load_config(argv, **values)


def factors(shapes=((64, 80), (7,), (4, 3, 3, 3))) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]


def steps(params, optimizer, first: int, last: int) -> None:
    """Optimizer steps `first`..`last - 1` with gradients drawn from the step number."""
    for step in range(first, last):
        generator = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def test_adamw_over_the_tiny_unets_loha_factors_is_fused_on_cpu(tiny_sd1_pipeline):
    cfg = cfg_of(train_text_encoder=True)
    models = Models.from_pipeline(tiny_sd1_pipeline)
    freeze_base_models(models, torch.device("cpu"), torch.float32)
    add_adapters(models, cfg, unet_adapter_config(cfg), text_encoder_adapter_config(cfg))
    groups = trainable_param_groups(cfg, models)
    params = [p for group in groups for p in group["params"]]
    assert len(groups) == 2 and len(params) > 10
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    optimizer = make_optimizer(cfg, groups, "no")
    assert optimizer.defaults["fused"] is True
    assert all(group["fused"] is True for group in optimizer.param_groups)


@pytest.mark.parametrize(
    ("args", "fused", "foreach"),
    [(["fused=False"], False, None), (["foreach=False"], None, False), (["fused=True"], True, None)],
)
def test_fused_or_foreach_in_optimizer_args_win(args, fused, foreach):
    cfg = cfg_of(args=args)
    assert not use_fused_adamw(cfg, factors())
    optimizer = make_optimizer(cfg, [{"params": factors(), "lr": 1e-3}])
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (fused, foreach)


@pytest.mark.parametrize("optimizer_type", ["AdamW8bit", "Adafactor", "Lion", "Prodigy"])
def test_other_optimizers_are_not_given_fused(optimizer_type):
    assert not use_fused_adamw(cfg_of(optimizer_type), factors())
    if optimizer_type == "Adafactor":  # transformers is always installed: built, no `fused` passed
        optimizer = make_optimizer(cfg_of(optimizer_type), [{"params": factors()}])
        assert "fused" not in optimizer.defaults


def test_torch_decides_the_devices_and_fp16_keeps_the_default():
    cfg = cfg_of()
    assert use_fused_adamw(cfg, factors())
    assert use_fused_adamw(cfg, factors(), "bf16")
    # accelerate's gradient scaler would not see the fused kernel skip a step (huggingface/accelerate#4242).
    assert not use_fused_adamw(cfg, factors(), "fp16")
    assert not use_fused_adamw(cfg_of(mixed_precision="fp16"), factors())
    assert use_fused_adamw(cfg_of(mixed_precision="fp16"), factors(), "no")  # the run's precision wins
    # "meta" is no device type of torch's fused kernels: one such parameter keeps the default for all.
    assert not use_fused_adamw(cfg, [*factors(), torch.nn.Parameter(torch.empty(3, device="meta"))])
    assert not use_fused_adamw(cfg_of(args=["differentiable=True"]), factors())  # fused refuses it


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_steps_equal_the_for_loop_adamw(weight_decay):
    """Five steps at lr 1e-2 over three factor shapes: torch's for-loop AdamW (`foreach=False`, its CPU
    default) and the fused kernel give the same parameters and moments to float rounding."""
    settings = {"learning_rate": 1e-2, "adam_weight_decay": weight_decay}
    loop_params, fused_params = factors(), factors()
    loop = make_optimizer(cfg_of(args=["foreach=False"], **settings), [{"params": loop_params}])
    fused = make_optimizer(cfg_of(**settings), [{"params": fused_params}])
    assert loop.defaults["fused"] is None and fused.defaults["fused"] is True
    start = [p.detach().clone() for p in loop_params]
    steps(loop_params, loop, 0, 5)
    steps(fused_params, fused, 0, 5)
    for a, b, before in zip(loop_params, fused_params, start):
        assert (a - before).abs().max() > 1e-3  # the step moved them: the comparison is of real updates
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for a, b in zip(loop_params, fused_params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fused.state[b][key], loop.state[a][key], rtol=1e-6, atol=1e-9)


def test_fused_state_round_trips_and_resumes_bit_exact():
    cfg = cfg_of("AdamW", None, lr_scheduler="cosine", learning_rate=1e-2)
    params = factors()
    optimizer = make_optimizer(cfg, [{"params": params}])
    scheduler = make_lr_scheduler(cfg, optimizer, 6, 1)
    for step in range(6):
        steps(params, optimizer, step, step + 1)
        scheduler.step()
        if step == 2:
            saved = [p.detach().clone() for p in params]
            files = state_files("optimizer", optimizer.state_dict(), "the optimizer")
            files |= state_files("scheduler", scheduler.state_dict(), "the LR scheduler")
    straight = [p.detach().clone() for p in params]

    params = [torch.nn.Parameter(p) for p in saved]
    optimizer = make_optimizer(cfg, [{"params": params}])
    scheduler = make_lr_scheduler(cfg, optimizer, 6, 1)
    optimizer.load_state_dict(parse_state_files("optimizer", files))
    scheduler.load_state_dict(parse_state_files("scheduler", files))
    assert optimizer.param_groups[0]["fused"] is True
    for step in range(3, 6):
        steps(params, optimizer, step, step + 1)
        scheduler.step()
    for a, b in zip(params, straight):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("saved_args", "run_precision", "expected"),
    [(["fused=False"], "no", True), (None, "fp16", None)],
    ids=["for-loop state into a fused run", "fused state into an fp16 run"],
)
def test_a_loaded_state_takes_this_runs_kernel(saved_args, run_precision, expected):
    """A state saved by the for-loop AdamW (as by a checkpoint of an older version) loads into a fused run
    as fused, and a fused state into an fp16 run as torch's default: the kernel is this run's. The saved
    dict is not changed, each `step` is where its kernel needs it, and the steps go on."""
    params = factors()
    old = make_optimizer(cfg_of(args=saved_args), [{"params": params}], "no")
    steps(params, old, 0, 2)
    state = parse_state_files("optimizer", state_files("optimizer", old.state_dict(), "the optimizer"))
    saved_fused = state["param_groups"][0]["fused"]
    assert saved_fused is not expected
    new = make_optimizer(cfg_of(), [{"params": params}], run_precision)
    new.load_state_dict(state)
    assert state["param_groups"][0]["fused"] is saved_fused
    assert new.param_groups[0]["fused"] is expected
    assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 2 for s in new.state.values())
    steps(params, new, 2, 3)
    assert all(float(s["step"]) == 3 for s in new.state.values())
