"""Checkpoint folders: listing, pruning to checkpoints_total_limit, resolving resume_from_checkpoint."""

from __future__ import annotations

import pytest

from loha_diffusion.errors import ConfigError
from loha_diffusion.training.checkpoint import list_checkpoints, prune_checkpoints, resolve_resume_path
from loha_diffusion.training.config import load_config


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
