"""Optimizers and learning rates (issue 12, item 7): kohya's optimizer_type names with optimizer_args checked
against the optimizer's signature before any model loads, the AdamW settings mapped where the optimizer has
them, Adafactor's relative step (kohya's "adafactor" schedule), Prodigy's rate rules, unet_lr, resume
settings for every optimizer, exact state round trips, and each optimizer training and resuming bit-exact
on the tiny SD1 model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_training_loop import adapter_tensors, base_flags, make_dataset

from loha_diffusion.errors import ConfigError
from loha_diffusion.training import config as config_module
from loha_diffusion.training.checkpoint import ResumeCheck, read_checkpoint_state, run_settings
from loha_diffusion.training.config import load_config
from loha_diffusion.training.loop import train
from loha_diffusion.training.optimizers import (
    adafactor_relative_step,
    apply_optimizer_settings,
    check_optimizer,
    group_learning_rates,
    make_lr_scheduler,
    make_optimizer,
    optimizer_description,
    optimizer_kwargs,
    optimizer_settings,
    optimizer_warnings,
)
from loha_diffusion.training.plan import setting_warnings
from loha_diffusion.training.statefile import parse_state_files, state_files

REQUIRED = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "8"]
KOHYA_ADAFACTOR = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]


def needs(optimizer_type: str) -> None:
    """Skip where the optimizer's package is not installed (the `test` extra installs them all)."""
    package = {"AdamW8bit": "bitsandbytes", "Lion": "lion_pytorch", "Prodigy": "prodigyopt"}
    if optimizer_type in package:
        pytest.importorskip(package[optimizer_type])


def cfg_of(optimizer_type: str = "AdamW", args: list[str] | None = None, *flags: str, **values):
    argv = REQUIRED + ["--optimizer_type", optimizer_type, *flags]
    if args:
        argv += ["--optimizer_args", *args]
    return load_config(argv, **values)


def build(cfg, shapes=((64, 80), (7,)), steps: int = 8):
    """Two parameter groups (UNet, text encoder) at `group_learning_rates`, the optimizer and its schedule."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    rates = (
        group_learning_rates(cfg, 1) if cfg.train_text_encoder else group_learning_rates(cfg) * len(shapes)
    )
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, rates)]
    optimizer = make_optimizer(cfg, groups)
    return params, optimizer, make_lr_scheduler(cfg, optimizer, steps, 1)


def run_steps(params, optimizer, scheduler, first: int, last: int) -> None:
    for step in range(first, last):
        generator = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        scheduler.step()


# --- the constructor's arguments ---------------------------------------------------------------------------


def test_adam_settings_map_where_the_optimizer_has_them_and_optimizer_args_win():
    adam = {"adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "adam_weight_decay": 0.1}
    full = {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    assert optimizer_kwargs(cfg_of("AdamW", **adam)) == full
    assert optimizer_kwargs(cfg_of("AdamW8bit", **adam)) == full
    assert optimizer_kwargs(cfg_of("Prodigy", **adam)) == full
    assert optimizer_kwargs(cfg_of("Lion", **adam)) == {"betas": (0.8, 0.95), "weight_decay": 0.1}
    assert optimizer_kwargs(cfg_of("Adafactor", **adam)) == {"relative_step": True}
    # optimizer_args win, and a pair given there replaces both betas.
    cfg = cfg_of("Lion", ["betas=0.95,0.98", "weight_decay=1.0"], **adam)
    assert optimizer_kwargs(cfg) == {"betas": (0.95, 0.98), "weight_decay": 1.0}
    assert optimizer_kwargs(cfg_of("Prodigy", ["d_coef=2", "decouple=False"])) == {
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 1e-2,
        "d_coef": 2,
        "decouple": False,
    }
    # kohya: warmup_init=True turns relative_step on; relative_step=False stays off otherwise.
    assert optimizer_kwargs(cfg_of("Adafactor", ["relative_step=False", "warmup_init=True"]))["relative_step"]
    assert not adafactor_relative_step(cfg_of("Adafactor", KOHYA_ADAFACTOR))
    assert optimizer_description(cfg_of("Adafactor", KOHYA_ADAFACTOR)) == (
        "transformers.optimization.Adafactor(relative_step=False,scale_parameter=False,warmup_init=False)"
    )
    assert optimizer_description(cfg_of()) == "torch.optim.AdamW"


@pytest.mark.parametrize(
    "optimizer_type, args, match",
    [
        ("AdamW", ["momentum=0.9"], "'momentum', which AdamW .* accepts: betas, eps, weight_decay, amsgrad"),
        ("Lion", ["eps=1e-8"], "'eps', which Lion .* accepts: betas, weight_decay, use_triton"),
        ("Adafactor", ["betas=0.9,0.99"], "'betas', which Adafactor .* accepts: eps, clip_threshold"),
        ("Prodigy", ["lr=1.0"], "'lr': set learning_rate"),
        ("AdamW", ["betas=1.5,0.999"], "optimizer_type = 'AdamW' refuses its settings .*beta"),
    ],
)
def test_optimizer_args_are_checked_against_the_signature(optimizer_type, args, match):
    with pytest.raises(ConfigError, match=match):
        check_optimizer(cfg_of(optimizer_type, args))


def test_schedules_that_cannot_run_are_refused_before_loading():
    check_optimizer(cfg_of("Adafactor"))  # relative step with the default 'constant': fine
    check_optimizer(cfg_of("Adafactor", None, "--lr_scheduler", "adafactor"))
    check_optimizer(cfg_of("Adafactor", KOHYA_ADAFACTOR, "--lr_scheduler", "constant_with_warmup"))
    refused = [
        (cfg_of("AdamW", None, "--lr_scheduler", "adafactor"), "only goes with optimizer_type = 'Adafactor'"),
        (
            cfg_of("Adafactor", KOHYA_ADAFACTOR, "--lr_scheduler", "adafactor"),
            "needs Adafactor's relative_step",
        ),
        (
            cfg_of("Adafactor", None, "--lr_warmup_steps", "10"),
            r"set lr_warmup_steps = 0.*relative_step=False",
        ),
        (cfg_of("AdamW", None, "--lr_scheduler", "piecewise_constant"), "needs step rules"),
    ]
    for cfg, match in refused:
        with pytest.raises(ConfigError, match=match):
            check_optimizer(cfg)


def test_prodigy_refuses_different_group_rates_and_warns_below_kohyas_threshold():
    cfg = cfg_of("Prodigy", None, "--train_text_encoder", "--text_encoder_lr", "0.5", learning_rate=1.0)
    with pytest.raises(ConfigError, match="learning_rate 1, text_encoder_lr 0.5.*Leave unet_lr"):
        check_optimizer(cfg)
    check_optimizer(cfg_of("Prodigy", None, "--train_text_encoder", learning_rate=1.0))
    low = optimizer_warnings(cfg_of("Prodigy", learning_rate=1e-4))
    assert len(low) == 1 and "around 1.0" in low[0]
    assert optimizer_warnings(cfg_of("Prodigy", learning_rate=1.0)) == []
    assert any("around 1.0" in w for w in setting_warnings(cfg_of("Prodigy")))  # the dry run lists it


def test_adafactor_relative_step_uses_its_own_rate_and_schedule():
    cfg = cfg_of("Adafactor", None, "--lr_scheduler", "cosine", "--unet_lr", "1e-3")
    [warning] = optimizer_warnings(cfg)
    assert "unet_lr, lr_scheduler = 'cosine' are not used" in warning and "relative_step=False" in warning
    assert "barely move" in warning  # scale_parameter=True: zero-started factors get RMS-scaled steps
    assert optimizer_warnings(cfg_of("Adafactor", ["scale_parameter=False"])) == []
    params, optimizer, scheduler = build(cfg)
    assert optimizer.defaults["lr"] is None and all(g["relative_step"] for g in optimizer.param_groups)
    assert type(scheduler).__name__ == "_AdafactorSchedule"
    assert scheduler.get_last_lr() == [cfg.learning_rate] * 2  # before the first step: learning_rate
    run_steps(params, optimizer, scheduler, 0, 3)
    lrs = scheduler.get_last_lr()
    assert all(type(lr) is float and 0 < lr <= 1e-2 for lr in lrs)  # min(1e-2, 1/sqrt(step)) x RMS scale
    assert optimizer_settings(cfg, optimizer) == {}  # no rate to read back or change on resume
    settings = run_settings(cfg, num_processes=1, mixed_precision="no")
    assert settings["learning_rate"] is settings["unet_lr"] is settings["text_encoder_lr"] is None
    # kohya's usual Adafactor (no relative step) follows learning_rate and the schedule.
    cfg = cfg_of(
        "Adafactor", KOHYA_ADAFACTOR, "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2"
    )
    params, optimizer, scheduler = build(cfg)
    run_steps(params, optimizer, scheduler, 0, 1)
    assert scheduler.get_last_lr() == [cfg.learning_rate / 2] * 2


def test_lion_beta2_warning():
    assert "(0.9, 0.99)" in optimizer_warnings(cfg_of("Lion"))[0]
    assert optimizer_warnings(cfg_of("Lion", ["betas=0.9,0.99"])) == []
    assert optimizer_warnings(cfg_of("Lion", adam_beta2=0.99)) == []


# --- learning rates and resume settings ---------------------------------------------------------------------


def test_unet_lr_sets_the_unet_group_and_text_encoders_default_to_learning_rate():
    cfg = cfg_of("AdamW", None, "--train_text_encoder", "--unet_lr", "1e-3", learning_rate=1e-4)
    assert group_learning_rates(cfg, 1) == [1e-3, 1e-4]
    assert group_learning_rates(cfg, 2) == [1e-3, 1e-4, 1e-4]
    cfg = cfg_of("AdamW", None, "--unet_lr", "1e-3", "--text_encoder_lr", "5e-4", "--train_text_encoder")
    assert group_learning_rates(cfg, 1) == [1e-3, 5e-4]


@pytest.mark.parametrize("optimizer_type", ["AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor"])
def test_resume_settings_read_and_apply_only_what_the_optimizer_has(optimizer_type):
    """Restored state, then a resume with another unet_lr and beta2: each optimizer reports the settings it
    has under the config's names, takes the new ones, and keeps its own state (Prodigy's d, ...)."""
    needs(optimizer_type)
    args = KOHYA_ADAFACTOR if optimizer_type == "Adafactor" else None
    flags = ("--train_text_encoder", "--lr_scheduler", "cosine")
    old = cfg_of(optimizer_type, args, *flags, "--unet_lr", "0.5", learning_rate=0.5)
    params, optimizer, scheduler = build(old)
    run_steps(params, optimizer, scheduler, 0, 2)
    saved = optimizer.state_dict(), scheduler.state_dict()

    new = cfg_of(optimizer_type, args, *flags, "--unet_lr", "0.25", learning_rate=0.25, adam_beta2=0.99)
    params, optimizer, scheduler = build(new)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    restored = optimizer_settings(new, optimizer)
    expected = {
        "AdamW": {"adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay"},
        "AdamW8bit": {"adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay"},
        "Prodigy": {"adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay"},
        "Lion": {"adam_beta1", "adam_beta2", "adam_weight_decay"},
        "Adafactor": set(),
    }[optimizer_type]
    assert restored == {"unet_lr": 0.5, "text_encoder_lr": 0.5, **{k: getattr(old, k) for k in expected}}
    before = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("lr", "initial_lr", "betas")}
    apply_optimizer_settings(new, optimizer, scheduler)
    cosine = 0.5 * (1 + math.cos(math.pi * 2 / 8))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.25 * cosine] * 2, rel=1e-12)
    assert scheduler.base_lrs == [0.25, 0.25]
    after = optimizer.param_groups[0]
    assert ("betas" in after) == ("adam_beta2" in expected)
    if "betas" in after:
        assert after["betas"] == (0.9, 0.99)
    assert {k: v for k, v in after.items() if k not in ("lr", "initial_lr", "betas")} == before
    assert "eps" not in after or optimizer_type != "Lion"
    run_steps(params, optimizer, scheduler, 2, 3)  # the optimizer still steps with what it was given


def test_a_record_without_unet_lr_still_resumes_and_names_the_change(tmp_path):
    """Records written before unet_lr existed lack it: the rate comes from the restored optimizer."""
    old_settings = run_settings(cfg_of(learning_rate=1e-3), num_processes=1, mixed_precision="no")
    del old_settings["unet_lr"]
    check = ResumeCheck(tmp_path, {"settings": old_settings})
    new = cfg_of("AdamW", None, "--unet_lr", "1e-4", learning_rate=1e-3)
    new_settings = run_settings(new, num_processes=1, mixed_precision="no")
    params, optimizer, _ = build(cfg_of(learning_rate=1e-3), shapes=((4,),))
    restored = optimizer_settings(new, optimizer)
    assert check.applied_changes(new_settings, restored) == [("unet_lr", 1e-3, 1e-4)]
    # Without unet_lr on either side a learning_rate change is one change, as before.
    same = cfg_of(learning_rate=1e-5)
    changes = check.applied_changes(
        run_settings(same, num_processes=1, mixed_precision="no"), optimizer_settings(same, optimizer)
    )
    assert changes == [("learning_rate", 1e-3, 1e-5)]


# --- checkpoint state ---------------------------------------------------------------------------------------

ROUND_TRIPS = [
    ("AdamW", None),
    ("AdamW8bit", None),  # parameters of 5120 elements: bitsandbytes' 8-bit state (>= min_8bit_size 4096)
    ("Adafactor", None),
    ("Adafactor", KOHYA_ADAFACTOR),
    ("Lion", None),
    ("Prodigy", None),
]


@pytest.mark.parametrize("optimizer_type, args", ROUND_TRIPS)
def test_state_round_trips_exactly_through_the_checkpoint_files(optimizer_type, args):
    """3 steps, state through `statefile` (JSON + safetensors), 3 more on a fresh optimizer: the parameters
    equal those of 6 uninterrupted steps, bit for bit."""
    needs(optimizer_type)
    lr = 1.0 if optimizer_type == "Prodigy" else 1e-3
    cfg = cfg_of(optimizer_type, args, "--lr_scheduler", "cosine", learning_rate=lr)
    if adafactor_relative_step(cfg):
        cfg.lr_scheduler = "adafactor"
    params, optimizer, scheduler = build(cfg)
    run_steps(params, optimizer, scheduler, 0, 6)
    straight = [p.detach().clone() for p in params]

    params, optimizer, scheduler = build(cfg)
    run_steps(params, optimizer, scheduler, 0, 3)
    files = {
        **state_files("optimizer", optimizer.state_dict(), "the optimizer"),
        **state_files("scheduler", scheduler.state_dict(), "the LR scheduler"),
    }
    saved = [p.detach().clone() for p in params]
    state = optimizer.state_dict()
    if optimizer_type == "AdamW8bit":
        quant = state["state"][0]["__bnb_optimizer_quant_state__"]
        assert quant["state1"].dtype == torch.uint8 and quant["qmap1"].shape == (256,)
    params, optimizer, scheduler = build(cfg)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    optimizer.load_state_dict(parse_state_files("optimizer", files))
    scheduler.load_state_dict(parse_state_files("scheduler", files))
    assert repr(optimizer.state_dict()["param_groups"]) == repr(state["param_groups"])
    run_steps(params, optimizer, scheduler, 3, 6)
    for a, b in zip(straight, params):
        assert torch.equal(a, b.detach())


# --- each optimizer on the tiny model -----------------------------------------------------------------------

TINY_RUNS = {
    "AdamW8bit": ("AdamW8bit", "1e-2", ["min_8bit_size=0"]),  # 8-bit state for the tiny adapters too
    "Adafactor": ("Adafactor", "1e-2", []),  # relative step: its own rate, kohya's "adafactor" schedule
    "Adafactor-fixed": ("Adafactor", "1e-2", KOHYA_ADAFACTOR),
    "Lion": ("Lion", "1e-3", ["betas=0.9,0.99"]),
    "Prodigy": ("Prodigy", "1.0", []),
}
FAST = {"Prodigy", "Adafactor"}  # the others run in CI as slow tests (5-8 s each here)


def train_and_resume(model_dir: Path, tmp_path: Path, name: str):
    """4 steps straight, and 2 + a resume from checkpoint-2 to 4; returns both runs' results."""
    optimizer_type, lr, args = TINY_RUNS[name]
    data = make_dataset(tmp_path / "data", 3)
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--optimizer_type", optimizer_type]
    extra += ["--optimizer_args", *args] if args else []

    def flags(out: str) -> list[str]:
        return base_flags(model_dir, data, tmp_path / out, learning_rate=lr) + extra

    straight = train(load_config(flags("a")))
    assert train(load_config(flags("b")), stop_at_step=2).global_step == 2
    resumed = train(load_config(flags("b") + ["--resume_from_checkpoint", "latest"]))
    return straight, resumed


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in TINY_RUNS]
)
def test_each_optimizer_trains_and_resumes_bit_exact(tiny_sd1_pipeline_dir, tmp_path, name):
    needs(TINY_RUNS[name][0])
    straight, resumed = train_and_resume(tiny_sd1_pipeline_dir, tmp_path, name)
    assert straight.global_step == resumed.global_step == 4
    assert math.isfinite(straight.last_loss) and straight.last_loss == resumed.last_loss
    a, b = adapter_tensors(tmp_path / "a" / "checkpoint-4"), adapter_tensors(tmp_path / "b" / "checkpoint-4")
    start = adapter_tensors(tmp_path / "b" / "checkpoint-2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    states = [read_checkpoint_state(tmp_path / d / "checkpoint-4", "optimizer") for d in ("a", "b")]
    assert json.dumps(states[0]["param_groups"]) == json.dumps(states[1]["param_groups"])
    group = states[0]["param_groups"][0]
    if name == "Prodigy":
        assert group["d"] > group["d0"] and group["k"] == 4  # the step-size estimate moved, and resumed
    if name == "Adafactor":
        assert group["relative_step"] is True and group["lr"] < 1e-2
    if name == "AdamW8bit":  # every adapter tensor has 8-bit moments (min_8bit_size=0)
        quant = [s["__bnb_optimizer_quant_state__"] for s in states[0]["state"].values()]
        assert quant and all(q["state1"].dtype == torch.uint8 for q in quant)


def test_unknown_optimizer_arg_stops_the_run_before_loading(tiny_sd1_pipeline_dir, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", 1)
    loaded = []
    monkeypatch.setattr("loha_diffusion.training.loop.load_models", lambda *a, **k: loaded.append(1))
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out") + ["--max_train_steps", "1"]
    with pytest.raises(ConfigError, match="'decouple', which AdamW"):
        train(load_config(flags + ["--optimizer_args", "decouple=True"]))
    assert not loaded


def test_missing_package_message_names_the_extra(monkeypatch):
    monkeypatch.setattr(config_module, "_installed", lambda module: module != "prodigyopt")
    with pytest.raises(ConfigError, match=r"pip install prodigyopt.*loha-diffusion\[optimizers\]"):
        cfg_of("Prodigy")
