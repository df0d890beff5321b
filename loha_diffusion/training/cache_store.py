"""A folder of cached tensors, one safetensors file per key: the on-disk half of the latent and text caches.

The caches (`latent_cache.py`, `text_cache.py`) compute a key from everything that determines an entry's
tensors (for a latent: the image file's content hash, the target size, the flip, the reader settings, the VAE),
and this store maps the key to `<folder>/<kind>-<key>.safetensors`. A changed input therefore gives another key,
so a stale entry is never found, only left behind; nothing is ever looked up by file name or modification
time alone (kohya's `cache_latents_to_disk` keys on the image name beside the image, which serves a stale
latent after an image is edited in place: this store does not).

Every file is written with `files.atomic_write_bytes` (a temporary file renamed into place), so a killed run
leaves whole files or none. A file is also checked when read: its metadata records its own key and a sha256
of its tensors (names, dtypes, shapes, bytes), so a truncated, bit-flipped or renamed file is reported with a
warning and treated as missing (`get` returns None and the caller computes and `put`s the entry again); it is
never used and never stops the run.

API (the two caches build on exactly this):

* `CacheStore(folder, kind)`: `folder` the cache folder (created on the first `put`), `kind` a short file-name
  prefix (`"latents"`, `"text"`), so several caches can share a folder.
* `store.path(key) -> Path`: where the entry of `key` lives.
* `store.get(key) -> dict[str, Tensor] | None`: the entry's CPU tensors, or None when missing or unusable.
* `store.put(key, tensors, metadata=None) -> Path`: write (or replace) the entry atomically.
* `make_key(*parts) -> str`: a 64-hex sha256 of JSON-serialisable parts (order matters).
* `file_sha256(path) -> str`: the hex sha256 of a file's bytes (read in 1 MiB blocks).
* `state_dict_sha256(tensors) -> str`: the hex sha256 of a state dict's names, dtypes, shapes and bytes (the
  identity of a model's weights, e.g. the VAE's).
* `default_cache_dir(train_data_dir)`, `DEFAULT_CACHE_FOLDER` (`.loha_cache`; `scan.py` leaves it out of its
  report of unused files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..files import atomic_write_bytes

__all__ = [
    "DEFAULT_CACHE_FOLDER",
    "CacheStore",
    "default_cache_dir",
    "file_sha256",
    "make_key",
    "state_dict_sha256",
    "tensors_sha256",
]

logger = logging.getLogger("loha_diffusion.training")

DEFAULT_CACHE_FOLDER = ".loha_cache"
_KIND = re.compile(r"^[a-z][a-z0-9_]*$")
_KEY = re.compile(r"^[0-9a-f]{16,128}$")
_BLOCK = 1 << 20


def default_cache_dir(train_data_dir: str | Path) -> Path:
    """The cache folder when `cache_dir` is unset: `<train_data_dir>/.loha_cache` (hidden, so image viewers
    and the scan pass it by)."""
    return Path(train_data_dir) / DEFAULT_CACHE_FOLDER


def make_key(*parts: object) -> str:
    """A 64-hex sha256 of `parts` (JSON-serialisable: str, int, float, bool, None, lists, dicts), in order.

    Raises:
        TypeError: a part cannot be written as JSON.
    """
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of the bytes of file `path` (its content, whatever its name or modification time).

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    # Through uint8 so bfloat16 and other dtypes numpy lacks hash too.
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The hex sha256 of `tensors` by sorted name: each name, dtype, shape and raw bytes (any device)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """`tensors_sha256` of `module.state_dict()` (parameters and buffers): the identity of its weights. About
    0.2 s for the SD1.5 VAE's 84 M float32 parameters (335 MB) on one CPU core (measured)."""
    return tensors_sha256(module.state_dict())


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (ValueError when the header is not readable)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not a table")
    return metadata


class CacheStore:
    """Entries `<folder>/<kind>-<key>.safetensors` of named CPU tensors, written atomically and checked on read
    (see the module docstring).

    Raises (constructor):
        ValueError: `kind` is not a lowercase identifier (it becomes part of file names).
    """

    def __init__(self, folder: str | Path, kind: str) -> None:
        if not _KIND.match(kind):
            raise ValueError(f"cache kind {kind!r} must be a lowercase identifier (letters, digits, _)")
        self.folder = Path(folder)
        self.kind = kind

    def __repr__(self) -> str:
        return f"CacheStore({str(self.folder)!r}, {self.kind!r})"

    def path(self, key: str) -> Path:
        """The file of `key`'s entry (it may not exist).

        Raises:
            ValueError: `key` is not 16-128 lowercase hex digits (`make_key` gives 64).
        """
        if not _KEY.match(key):
            raise ValueError(f"cache key {key!r} must be 16-128 lowercase hex digits (see make_key)")
        return self.folder / f"{self.kind}-{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The CPU tensors of `key`'s entry, or None when there is none or it cannot be used: unreadable,
        truncated, not a safetensors file, written for another key, or its tensors do not match their
        recorded sha256 (each logged as a warning naming the file; the caller recomputes the entry and `put`s
        it, which replaces the file).

        Raises:
            ValueError: `key` is not a valid key (see `path`).
        """
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cache file %s cannot be read (%s); computing it again", path, exc)
            return None
        try:
            metadata = _header_metadata(data)
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            logger.warning("cache file %s is damaged (%s); computing it again", path, exc)
            return None
        if metadata.get("key") != key or metadata.get("sha256") != tensors_sha256(tensors):
            logger.warning(
                "cache file %s does not match its recorded key and checksum (damaged or renamed); computing it "
                "again",
                path,
            )
            return None
        return tensors

    def put(
        self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> Path:
        """Write `tensors` (moved to the CPU, made contiguous) as `key`'s entry, replacing any file there,
        atomically; `metadata` (str to str) is stored beside the store's own `key` and `sha256`. Returns the
        path.

        Raises:
            ValueError: `key` is not a valid key, or `metadata` uses the reserved names `key` / `sha256`.
            OutputWriteError: the folder cannot be written (disk full, permission), naming it.
        """
        extra = dict(metadata or {})
        if {"key", "sha256"} & set(extra):
            raise ValueError("cache metadata names 'key' and 'sha256' are the store's own")
        path = self.path(key)
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        data = save_safetensors(cpu, metadata={**extra, "key": key, "sha256": tensors_sha256(cpu)})
        return atomic_write_bytes(path, data)
