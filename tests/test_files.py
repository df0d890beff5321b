"""files.py: the one atomic write path (mode from the umask, no partial files, stale temporaries, errors)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from loha_diffusion.errors import LoHaDiffusionError, OutputWriteError
from loha_diffusion.files import (
    atomic_directory,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temporaries,
    temporary_name,
    write_error,
)


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.safetensors"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "x.toml", "a = 1\n")
        with atomic_directory(tmp_path / "folder") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by ComfyUI running as another user
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_failure_keeps_previous_file_and_removes_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic_directory(target) as d:
        (d / "one").write_text("1")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as d:
        (d / "one").write_text("1")
    with atomic_directory(target) as d:  # replaces
        (d / "two").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["two"]
    assert list(tmp_path.iterdir()) == [target]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".a.bin.{pid}.0123abcd.tmp"
    stale.write_bytes(b"torn")
    mine = temporary_name(tmp_path / "a.bin")
    mine.write_bytes(b"in progress")
    other = tmp_path / ".notes.txt"
    other.write_text("user file")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert mine.exists() and other.exists()


def test_disk_full_and_permission_errors_name_the_file(tmp_path):
    err = write_error(tmp_path / "out.safetensors", OSError(errno.ENOSPC, "No space left"), needed=3 << 20)
    assert isinstance(err, OutputWriteError) and isinstance(err, OSError)
    assert isinstance(err, LoHaDiffusionError) and err.errno == errno.ENOSPC
    assert "no space left on device while writing" in str(err) and "out.safetensors" in str(err)
    assert "3.0 MiB needed" in str(err) and "free" in str(err)
    err = write_error(tmp_path / "x", OSError(errno.EACCES, "Permission denied"))
    assert "permission denied" in str(err) and "Choose a folder you can write" in str(err)
    other = OSError(errno.EIO, "I/O error")
    assert write_error(tmp_path / "x", other) is other


def test_free_space_is_checked_before_writing(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputWriteError, match="no space left"), atomic_path(target, needed=1 << 62):
        raise AssertionError("the block must not run")
    assert target.read_bytes() == b"old"


def test_a_folder_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """Killed between moving the old folder aside and renaming the new one in: the next write (or run) puts
    the old folder back instead of deleting it; once the target exists, the aside copy is removed."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    aside = tmp_path / f".model.{pid}.0123abcd.old"
    aside.mkdir()
    (aside / "weights").write_text("the user's model")
    half = tmp_path / f".model.{pid}.89abcdef.tmp"
    half.mkdir()
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([aside, half])
    assert (tmp_path / "model" / "weights").read_text() == "the user's model"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    again = tmp_path / f".model.{pid}.0123abcd.old"
    again.mkdir()
    remove_stale_temporaries(tmp_path, "model")
    assert not again.exists() and (tmp_path / "model" / "weights").exists()
