"""Checkpoint folders: listing, pruning to checkpoints_total_limit, resolving resume_from_checkpoint; the
optimizer settings a resume applies."""

from __future__ import annotations

import math

import pytest
import torch

from loha_diffusion.errors import ConfigError
from loha_diffusion.training.checkpoint import list_checkpoints, prune_checkpoints, resolve_resume_path
from loha_diffusion.training.config import load_config
from loha_diffusion.training.models import (
    apply_optimizer_settings,
    make_lr_scheduler,
    make_optimizer,
    optimizer_settings,
)


def make_checkpoints(root, steps):
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "unet_adapter.safetensors").write_bytes(b"")
    (root / "checkpoint-notes").mkdir()  # not a checkpoint name: ignored


def config(root, resume):
    flags = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"]
    return load_config(flags + ["--output_dir", str(root), "--resume_from_checkpoint", resume])


def test_list_sorts_by_step_and_prune_keeps_room_for_one(tmp_path):
    make_checkpoints(tmp_path, [20, 100, 3])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    assert prune_checkpoints(tmp_path, None) == []
    removed = prune_checkpoints(tmp_path, 2)  # called before a save: leave room for the new one
    assert [p.name for p in removed] == ["checkpoint-3", "checkpoint-20"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-100"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_resolve_resume(tmp_path):
    assert resolve_resume_path(config(tmp_path, "latest")) is None  # nothing yet: start fresh
    make_checkpoints(tmp_path, [5, 40])
    assert resolve_resume_path(config(tmp_path, "latest")).name == "checkpoint-40"
    assert resolve_resume_path(config(tmp_path, "checkpoint-5")) == tmp_path / "checkpoint-5"
    assert resolve_resume_path(config(tmp_path, str(tmp_path / "checkpoint-40"))).name == "checkpoint-40"
    with pytest.raises(ConfigError, match="checkpoint-7.*existing: \\['checkpoint-5', 'checkpoint-40'\\]"):
        resolve_resume_path(config(tmp_path, "checkpoint-7"))


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
    assert optimizer_settings(optimizer) == {
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
