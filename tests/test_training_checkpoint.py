"""Checkpoint folders: the pickle-free state files, the manifest, listing only complete checkpoints, pruning
to checkpoints_total_limit, resolving resume_from_checkpoint; a planted pickle payload never runs; the
optimizer settings a resume applies."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_training_loop import base_flags, make_dataset

from loha_diffusion.config import LoHaConfig
from loha_diffusion.errors import ConfigError
from loha_diffusion.model import inject_adapter
from loha_diffusion.training.checkpoint import (
    MANIFEST,
    Resumable,
    TrainState,
    checkpoint_folders,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_state,
    resolve_resume_path,
    save_checkpoint,
    write_checkpoint,
)
from loha_diffusion.training.config import load_config
from loha_diffusion.training.loop import main, train
from loha_diffusion.training.models import ADAPTER_NAME
from loha_diffusion.training.optimizers import (
    apply_optimizer_settings,
    make_lr_scheduler,
    make_optimizer,
    optimizer_settings,
)
from loha_diffusion.training.statefile import (
    decode_state,
    encode_state,
    parse_state_files,
    rng_state,
    set_rng_state,
    state_files,
)


def make_checkpoints(root, steps):
    for step in steps:
        write_checkpoint(root / f"checkpoint-{step}", step, {"unet_adapter.safetensors": b"x" * step})
    (root / "checkpoint-notes").mkdir()  # not a checkpoint name: ignored


def config(root, resume):
    flags = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"]
    return load_config(flags + ["--output_dir", str(root), "--resume_from_checkpoint", resume])


def test_list_sorts_by_step_and_prune_keeps_the_new_one(tmp_path):
    make_checkpoints(tmp_path, [20, 100, 3, 50])
    names = ["checkpoint-3", "checkpoint-20", "checkpoint-50", "checkpoint-100"]
    assert [p.name for p in list_checkpoints(tmp_path)] == names
    assert prune_checkpoints(tmp_path, None) == []
    # Called after the save of checkpoint-50 (a resume from an older step): it stays, the oldest others go.
    removed = prune_checkpoints(tmp_path, 2, keep=tmp_path / "checkpoint-50")
    assert [p.name for p in removed] == ["checkpoint-3", "checkpoint-20"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-50", "checkpoint-100"]
    assert prune_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-100") == [tmp_path / "checkpoint-50"]
    assert list_checkpoints(tmp_path / "missing") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no trash left behind


def test_only_complete_checkpoints_count(tmp_path, caplog):
    """A folder without manifest (an interrupted save), with a file missing or cut short, is not listed, is
    named in a warning, is never pruned, and an explicit resume from it is refused saying why."""
    make_checkpoints(tmp_path, [1, 2, 3, 4])
    (tmp_path / "checkpoint-2" / MANIFEST).unlink()
    (tmp_path / "checkpoint-3" / "unet_adapter.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-4" / "unet_adapter.safetensors").unlink()
    (tmp_path / "checkpoint-5").mkdir()  # created, killed before anything was written
    make_checkpoints(tmp_path / "more", [6])
    (tmp_path / "more" / "checkpoint-6").rename(tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / "unet_adapter.safetensors").unlink()
    (tmp_path / "checkpoint-6" / "unet_adapter.safetensors").symlink_to("/dev/zero")  # would never end
    with caplog.at_level("WARNING", logger="loha_diffusion"):
        assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    for n in (2, 3, 4, 5, 6):
        assert f"ignoring {tmp_path / f'checkpoint-{n}'}, not a complete checkpoint" in caplog.text
    assert resolve_resume_path(config(tmp_path, "latest")).name == "checkpoint-1"
    expected = {
        "checkpoint-2": "did not complete",
        "checkpoint-3": "has 1 bytes, checkpoint.json says 3",
        "checkpoint-4": "unet_adapter.safetensors is missing",
        "checkpoint-5": "did not complete",
        "checkpoint-6": "unet_adapter.safetensors is missing or not a regular file",
    }
    for name, why in expected.items():
        with pytest.raises(ConfigError, match=f"{name}.* is not a complete checkpoint: .*{why}"):
            resolve_resume_path(config(tmp_path, name))
    assert prune_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-1") == []
    assert len(checkpoint_folders(tmp_path)) == 6
    (tmp_path / "checkpoint-1" / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="(?s)no complete checkpoint.*checkpoint-1.*not a loha_diffusion"):
        resolve_resume_path(config(tmp_path, "latest"))  # not a silent restart from step 0


def test_resolve_resume(tmp_path):
    assert resolve_resume_path(config(tmp_path, "latest")) is None  # nothing yet: start fresh
    make_checkpoints(tmp_path, [5, 40])
    assert resolve_resume_path(config(tmp_path, "latest")).name == "checkpoint-40"
    assert resolve_resume_path(config(tmp_path, "checkpoint-5")) == tmp_path / "checkpoint-5"
    assert resolve_resume_path(config(tmp_path, str(tmp_path / "checkpoint-40"))).name == "checkpoint-40"
    with pytest.raises(ConfigError, match="checkpoint-7.*existing: \\['checkpoint-5', 'checkpoint-40'\\]"):
        resolve_resume_path(config(tmp_path, "checkpoint-7"))


def test_optimizer_states_round_trip_without_pickle():
    """torch AdamW's state (tensor step, int parameter keys, tuple betas) and one shaped like bitsandbytes'
    AdamW8bit (int step, uint8 states, one qmap tensor shared by every parameter) come back equal."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    adamw = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    for p in params:
        p.grad = torch.randn_like(p)
    adamw.step()
    qmap = torch.linspace(-1, 1, 256)
    bnb_like = {
        "state": {
            i: {
                "step": 3,
                "state1": torch.randint(0, 255, (8,), dtype=torch.uint8),
                "qmap1": qmap,
                "absmax1": None,
            }
            for i in range(2)
        },
        "param_groups": [
            {"lr": 1e-4, "betas": (0.9, 0.999), "eps": float("inf"), "params": [0, 1], "x": "s"}
        ],
    }
    for state in (adamw.state_dict(), bnb_like):
        files = state_files("optimizer", state, "the optimizer")
        assert set(files) == {"optimizer.json", "optimizer.safetensors"}
        back = parse_state_files("optimizer", files)
        assert back["param_groups"] == state["param_groups"]  # tuples, inf, strings as they were
        assert set(back["state"]) == set(state["state"])  # int keys
        for i, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    assert (
                        torch.equal(back["state"][i][key], value)
                        and back["state"][i][key].dtype == value.dtype
                    )
                else:
                    assert back["state"][i][key] == value
    doc, tensors = encode_state(adamw.state_dict(), "the optimizer")
    assert set(tensors) == {f"state.{i}.{k}" for i in range(2) for k in ("step", "exp_avg", "exp_avg_sq")}
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1.0)
    fresh.load_state_dict(decode_state(json.loads(json.dumps(doc)), tensors))
    assert fresh.param_groups[0]["betas"] == (0.9, 0.99) and fresh.param_groups[0]["lr"] == 1e-3


def test_unstorable_state_is_refused_with_its_path():
    with pytest.raises(
        ConfigError, match="the LR scheduler.*function.*`lr_lambdas.0`.*checkpointing_steps = 0"
    ):
        encode_state({"lr_lambdas": [lambda step: 1.0]}, "the LR scheduler")
    with pytest.raises(ConfigError, match="a dict key of type object"):
        encode_state({"state": {object(): 1}}, "the optimizer")
    for bad, why in [
        ({"x.json": b"\x80"}, "x.json is not JSON"),
        ({"x.json": b'{"format": "pickle"}'}, "not a training-state file"),
        (
            {
                "x.json": json.dumps(
                    {"format": "loha_diffusion.training_state", "version": 1, "state": {"__tensor__": "a"}}
                ).encode()
            },
            "tensor 'a'",
        ),
        ({"x.json": b"[]", "x.safetensors": b"junk"}, "x.json is not a training-state file"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_state_files("x", bad)


def test_random_states_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    files = state_files("random_states_0", rng_state(), "the random state")
    expected = random.random(), np.random.rand(), torch.rand(2)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(parse_state_files("random_states_0", files))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(2), expected[2])


class Payload:
    """Unpickling this writes a marker file: what a crafted `custom_checkpoint_0.pkl` could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_never_run(tiny_sd1_pipeline_dir, tmp_path, capsys, caplog):
    """A pickle whose loading creates a file, planted under accelerate's names beside a checkpoint and, one
    at a time, under the name of every file of the checkpoint: the resume never runs it. A replaced file is
    refused naming it; files the manifest does not list are never read, and the resume goes on."""
    data = make_dataset(tmp_path / "data", 2)
    marker = tmp_path / "PAYLOAD_RAN"
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", checkpointing_steps="1")
    train(load_config(flags + ["--max_train_steps", "2"]), stop_at_step=1)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    payload = pickle.dumps(Payload(marker))
    resume = flags + ["--max_train_steps", "2", "--resume_from_checkpoint", str(checkpoint)]
    names = sorted(p.name for p in checkpoint.iterdir())
    assert {"optimizer.json", "optimizer.safetensors", "scheduler.json", "train_state.json", MANIFEST} <= set(
        names
    )
    assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in names)
    for name in names:
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(payload)
        assert main(resume) == 2, name
        err = capsys.readouterr().err
        assert str(checkpoint / name) in err and "Traceback" not in err, err
        assert not marker.exists(), name
        (checkpoint / name).write_bytes(original)
    for name in (
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "scaler.pt",
        "custom_checkpoint_0.pkl",
    ):
        (checkpoint / name).write_bytes(payload)
    assert read_checkpoint_state(checkpoint, "train_state")["global_step"] == 1
    with caplog.at_level("WARNING", logger="loha_diffusion"):
        assert main(resume) == 0
    assert "does not list (never read): custom_checkpoint_0.pkl, optimizer.bin" in caplog.text
    assert not marker.exists() and (tmp_path / "out" / "loha.safetensors").is_file()
    pickle.loads(payload)  # the payload is real: loading it does create the marker
    assert marker.exists()
    os.unlink(marker)


def test_resumed_optimizer_takes_the_new_settings_and_schedule():
    """load_state brings back the old rate; apply_optimizer_settings gives the new base × the new schedule's
    factor at the restored step (cosine over 4 steps, resumed at step 2 with 8 steps and another rate)."""
    flags = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--lr_scheduler", "cosine"]
    old = load_config(flags, learning_rate=1e-2, max_train_steps=4)
    new = load_config(flags, learning_rate=1e-3, max_train_steps=8, adam_beta2=0.99)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = make_optimizer(old, [{"params": [param], "lr": old.learning_rate}])
    scheduler = make_lr_scheduler(old, optimizer, 4, 1)
    for _ in range(2):
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()

    optimizer = make_optimizer(new, [{"params": [param], "lr": new.learning_rate}])
    scheduler = make_lr_scheduler(new, optimizer, 8, 1)
    optimizer.load_state_dict(saved[0])  # what accelerator.load_state does
    scheduler.load_state_dict(saved[1])
    assert optimizer_settings(new, optimizer) == {
        "learning_rate": 1e-2,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "adam_weight_decay": 1e-2,
    }
    apply_optimizer_settings(new, optimizer, scheduler)
    cosine = [0.5 * (1 + math.cos(math.pi * step / 8)) for step in range(9)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * cosine[2], rel=1e-12)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99) and scheduler.base_lrs == [1e-3]
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * cosine[3], rel=1e-12)


def test_save_and_load_restore_everything_with_a_gradient_scaler(tmp_path):
    """The fp16 path (a gradient scaler) with a stand-in accelerator: adapters, optimizer, scheduler, scaler,
    accumulation counter, progress and random state come back; another batch geometry is refused."""

    def build(scale: float):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        inject_adapter(model, LoHaConfig(r=2, target_modules=["0"], init_weights=False), ADAPTER_NAME)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        accelerator = SimpleNamespace(
            scaler=torch.amp.GradScaler("cpu", init_scale=scale),
            step=0,
            process_index=0,
            num_processes=1,
            is_main_process=True,
            wait_for_everyone=lambda: None,
        )
        return model, params, optimizer, scheduler, accelerator

    model, params, optimizer, scheduler, accelerator = build(1024.0)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    accelerator.step = 2
    state = TrainState(global_step=1, update_steps_per_epoch=5, total_batch_size=2, seed=3)
    resumable = Resumable({"unet": model}, optimizer, scheduler, state)
    torch.manual_seed(7)
    path = save_checkpoint(accelerator, tmp_path, 1, None, resumable, record={"step": 1})
    expected_draw = torch.rand(3)
    assert {"scaler.json", "random_states_0.json", "random_states_0.safetensors"} <= {
        p.name for p in path.iterdir()
    }

    model2, params2, optimizer2, scheduler2, accelerator2 = build(1.0)
    state2 = TrainState(update_steps_per_epoch=5, total_batch_size=2, seed=3)
    torch.manual_seed(0)
    load_checkpoint(accelerator2, path, Resumable({"unet": model2}, optimizer2, scheduler2, state2))
    assert torch.equal(torch.rand(3), expected_draw)
    assert state2 == state and accelerator2.step == 2 and accelerator2.scaler.get_scale() == 1024.0
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert scheduler2.get_last_lr() == scheduler.get_last_lr() == [5e-3]
    for i, entry in optimizer.state_dict()["state"].items():
        assert all(torch.equal(v, optimizer2.state_dict()["state"][i][k]) for k, v in entry.items())
    other = TrainState(update_steps_per_epoch=4, total_batch_size=2, seed=3)
    with pytest.raises(ConfigError, match=r"\(5, 2, 3\), this run has \(4, 2, 3\)"):
        load_checkpoint(accelerator2, path, Resumable({"unet": model2}, optimizer2, scheduler2, other))
