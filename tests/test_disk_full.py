"""Disk full, on a real small filesystem: a 3 MiB tmpfs mounted by the test (only as root on Linux; skipped
otherwise). A training run whose checkpoint does not fit fails with `OutputWriteError` ("no space left on
device while writing ..."), leaves no partial folder, and its earlier checkpoint stays whole; `save_kohya` of
an adapter bigger than the free space keeps the old file.

Two ways to run out: the free space known to be too small before writing (the checkpoint's size is checked
first), and the write itself failing with ENOSPC (free space unknown, as on some network filesystems).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training_loop import base_flags, make_dataset

from loha_diffusion import files, tiny
from loha_diffusion.config import LoHaConfig
from loha_diffusion.errors import OutputWriteError
from loha_diffusion.formats.kohya import save_kohya
from loha_diffusion.model import inject_adapter
from loha_diffusion.training.checkpoint import list_checkpoints, verify_checkpoint
from loha_diffusion.training.config import load_config
from loha_diffusion.training.loop import main, train


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs at `tmp_path / "disk"`, unmounted afterwards."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` with a file until `leave` bytes are free."""
    free = files.free_bytes(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))
    assert files.free_bytes(disk) <= leave + 4096


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.mark.parametrize("free_space", ["known", "unknown"])
def test_training_on_a_full_disk(
    tiny_sd1_pipeline_dir, tmp_path, small_disk, monkeypatch, capsys, free_space
):
    data = make_dataset(tmp_path / "data", 2)
    out = small_disk / "out"
    flags = base_flags(tiny_sd1_pipeline_dir, data, out, checkpointing_steps="1") + ["--max_train_steps", "3"]
    train(load_config(flags), stop_at_step=1)
    first = out / "checkpoint-1"
    size = sum(p.stat().st_size for p in first.iterdir())
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    fill(small_disk, size // 2)
    if free_space == "unknown":
        monkeypatch.setattr(files, "free_bytes", lambda path: None)

    assert main(flags + ["--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"error: no space left on device while writing {out / 'checkpoint-2'}" in err, err
    if free_space == "known":
        assert "MiB needed" in err or "KiB needed" in err
    assert "Traceback" not in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "checkpoint-2").exists() and hidden(out) == []  # no partial folder left
    verify_checkpoint(first)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


@pytest.mark.parametrize("free_space", ["known", "unknown"])
def test_save_kohya_on_a_full_disk_keeps_the_old_file(small_disk, monkeypatch, free_space):
    unet = tiny.build_tiny_unet("sd1")
    inject_adapter(unet, LoHaConfig(r=8, target_modules=["to_q", "to_k", "to_v"], init_weights=False))
    path = save_kohya(small_disk / "adapter.safetensors", unet=unet, dtype=torch.float32)
    old = path.read_bytes()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "hada_" in name:
                p.add_(1.0)
    fill(small_disk, len(old) // 2)
    if free_space == "unknown":
        monkeypatch.setattr(files, "free_bytes", lambda path: None)
    with pytest.raises(OutputWriteError, match=f"no space left on device while writing {path}"):
        save_kohya(path, unet=unet, dtype=torch.float32)
    assert path.read_bytes() == old and hidden(small_disk) == []
