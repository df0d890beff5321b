"""The one way this package writes files: atomically, readable like a normal file, with errors for people.

Every file the package writes (adapter files, PEFT folders, checkpoints, configs, converted and merged models)
goes through `atomic_write_bytes` / `atomic_write_text`, `atomic_path` (for writers that take a path, such as
`save_pretrained`) or `atomic_directory` (a folder that appears whole or not at all). The recipe is the usual
one for crash-safe writes (as in `safetensors` users, git and SQLite): write a temporary file in the target's
folder, flush and fsync it, give it the mode a normal file would get under the umask (a temporary file is
created 0600, which ComfyUI or A1111 running as another user cannot read), rename it over the target, then
fsync the folder so the rename survives a power cut. On any failure the temporary file is removed and the old
target is untouched. Temporary names are hidden (`.<name>.<pid>.<random>.tmp`) and carry the writer's process
id, so a later write removes the leftovers of writers that were killed.

Disk-full and permission errors become `OutputWriteError`, naming the file, the space needed and free, and the
fix. Imports nothing heavy (no torch).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputWriteError
from .utils import human_size

TMP_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"  # a folder being replaced, moved aside until the new one is in place
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}(?P<suffix>\.tmp|\.old)$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def temporary_name(path: str | os.PathLike, suffix: str = TMP_SUFFIX) -> Path:
    """A fresh hidden temporary path beside `path`: `<folder>/.<name>.<pid>.<8 hex>.tmp` (or `.old`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes for unprivileged users on the filesystem holding `path` (or its nearest existing parent);
    None where the system cannot tell."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_error(path: str | os.PathLike, exc: OSError, needed: int | None = None) -> OSError:
    """`exc` (raised while writing `path`) as an `OutputWriteError` naming the file, the space needed and free
    and the fix, for disk-full and permission errors; other `OSError`s are returned unchanged."""
    path = Path(path)
    if exc.errno in _NO_SPACE:
        free = free_bytes(path.parent)
        room = f"{human_size(needed)} needed, " if needed else ""
        room += f"{human_size(free)} free" if free is not None else "free space unknown"
        return OutputWriteError(
            f"no space left on device while writing {path} ({room} on {path.parent}); the previous file, if "
            "any, is unchanged and the partial output was removed. Free some space or choose another output "
            "folder, then run again.",
            exc.errno,
        )
    if exc.errno in _NO_PERMISSION:
        reason = "read-only filesystem" if exc.errno == errno.EROFS else "permission denied"
        return OutputWriteError(
            f"cannot write {path}: {reason} (folder {path.parent}). Choose a folder you can write, or fix its "
            "permissions.",
            exc.errno,
        )
    return exc


def _default_mode(base: int = 0o666) -> int:
    # os.umask can only be read by setting it; set it straight back.
    umask = os.umask(0o022)
    os.umask(umask)
    return base & ~umask


def fsync_directory(path: str | os.PathLike) -> None:
    """fsync folder `path` so that renames and new entries in it survive a crash (a no-op where folders cannot
    be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in `folder` (only those whose process
    is gone; only those for target `name` when given). A folder a killed writer had moved aside to replace it
    (`.old`) is put back when the target is missing (the replacement never completed), else removed. Returns
    what was removed or put back."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        match = _TMP_NAME.match(entry.name)
        if match is None or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if match["suffix"] == ASIDE_SUFFIX and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _prepare_folder(path: Path, needed: int | None) -> None:
    """Create `path`'s folder, remove the temporaries killed writers left for `path`, and refuse early when
    `needed` bytes are known not to fit."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, path.name)
        free = free_bytes(path.parent) if needed is not None else None
        if free is not None and free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as exc:
        raise write_error(path, exc, needed) from exc


@contextmanager
def atomic_path(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that takes a path; when the block ends without an
    error, the temporary file is fsynced, given the umask's mode and renamed to `path` (atomically replacing
    it). On an error it is removed and `path` is untouched. `needed` (bytes, optional) is checked against the
    free space first and named in a disk-full message.

    Raises:
        OutputWriteError: no space left, or no permission to write the folder (the message names both).
        OSError: any other error of the filesystem.
    """
    path = Path(path)
    _prepare_folder(path, needed)
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc, needed) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring). Returns `path`.

    Raises:
        OutputWriteError: no space left, or no permission (the previous file is unchanged).
        OSError: any other error of the filesystem.
    """
    path = Path(path)
    with atomic_path(path, needed=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically in `encoding`. Returns `path`.

    Raises:
        OutputWriteError: no space left, or no permission (the previous file is unchanged).
        OSError: any other error of the filesystem.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_directory(root)


@contextmanager
def atomic_directory(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without an error, every file in it is
    fsynced and the folder renamed to `path`, so `path` appears complete or not at all. An existing `path` is
    replaced (moved aside, then removed after the rename). On an error the temporary folder is removed and
    `path` is untouched. Files written inside need not be atomic themselves.

    Raises:
        OutputWriteError: no space left, or no permission to write the folder (the message names both).
        OSError: any other error of the filesystem.
    """
    path = Path(path)
    _prepare_folder(path, needed)
    tmp = temporary_name(path)
    try:
        tmp.mkdir()
        os.chmod(tmp, _default_mode(0o777))
    except OSError as exc:
        raise write_error(path, exc, needed) from exc
    old = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = temporary_name(path, ASIDE_SUFFIX)
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise write_error(path, exc, needed) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
