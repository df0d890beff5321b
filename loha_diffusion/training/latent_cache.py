"""The latent cache (`cache_latents`, `cache_latents_to_disk`): each training image through the VAE once.

What is cached is the VAE encoder's output distribution, `latent_dist.parameters` (mean ‖ log-variance,
float32 `(8, h/8, w/8)` for SD's 4-channel latents), not a sample of it. The training step then draws each
sample's latent from it with the sample's own seed (`step.sample_latents`, the same draws as
`step.encode_latents`), so a cached run has the same noise, the same latents and the same loss sequence as an
uncached one, up to the float rounding of batched against single VAE calls. (kohya's `cache_latents` caches
one sample, `latent_dist.sample()`, so every epoch sees the same latent; diffusers' scripts have no cache.)

Entries are `data.CacheEntry`s: one per image and target size (its bucket, or the square resolution), two
with `random_flip` (the flipped and unflipped crop are both cached: flipping an image is not flipping its
latent, so one latent cannot serve both, and kohya's refusal of flips with the cache would take the
augmentation away). They are encoded from `dataset.entry_image(entry)` (the deterministic centre crop; a random
crop cannot be cached and `config.validate` refuses it) in batches of `vae_batch_size` images of one size.

`cache_latents_to_disk` also keeps them in `cache_dir` (default `<train_data_dir>/.loha_cache`) through
`cache_store.CacheStore`, one `latents-<key>.safetensors` per entry, where the key hashes everything that
determines the latent: the image file's content (sha256 of its bytes; an image edited in place under the same
name gets a new key), the target size, the flip, the crop and resize rule (`TRANSFORM_RULE`, and the bucket
settings with buckets: `resize_rule`), the reader's `background_color` (what transparency becomes), and the VAE
(`vae_identity`: its class, config, dtype and a sha256 of its weights, computed once per run). So a changed image or setting is encoded again, never served
stale; a damaged file is encoded again with a warning. Old entries are never deleted by a run (remove the
folder to reclaim the space).

Processes: with the disk cache the main process reads and encodes, writes the missing files, and the others
wait (`accelerator.wait_for_everyone`) and then read them all; without it every process encodes every entry
(each needs them all: samples are shuffled across processes every epoch). The VAE stays on the device after
caching: validation decodes with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DataError
from .cache_store import CacheStore, default_cache_dir, file_sha256, make_key, state_dict_sha256
from .config import TrainConfig
from .images import ImageReader

if TYPE_CHECKING:
    from .data import CacheEntry, CaptionedImageDataset

__all__ = [
    "TRANSFORM_RULE",
    "LatentCache",
    "attach_latent_cache",
    "build_latent_cache",
    "encode_entries",
    "entry_disk_key",
    "latent_cache_dir",
    "resize_rule",
    "vae_identity",
]

logger = logging.getLogger("loha_diffusion.training")

# The image-to-pixels rule the cached pixels came from (resize to cover the target with Lanczos, centre crop,
# flip, [-1, 1]): part of every disk key, so a change of the rule in `data.py` must change this string.
TRANSFORM_RULE = "cover-lanczos-center-crop/v1"

EntryId = tuple[int, tuple[int, int], bool]


def _entry_id(entry: CacheEntry) -> EntryId:
    return (entry.record_index, (int(entry.size[0]), int(entry.size[1])), bool(entry.flip))


class LatentCache:
    """The cached `latent_dist.parameters` of a dataset's entries, in CPU memory: what `dataset.latent_cache`
    holds (`get(entry)`), keyed by (record index, target size, flip)."""

    def __init__(self, params: dict[EntryId, torch.Tensor]) -> None:
        self._params = params

    def __len__(self) -> int:
        return len(self._params)

    @property
    def nbytes(self) -> int:
        """Bytes of CPU memory the cached tensors take."""
        return sum(t.numel() * t.element_size() for t in self._params.values())

    def get(self, entry: CacheEntry) -> torch.Tensor:
        """The float32 `(8, h/8, w/8)` parameters (mean ‖ log-variance) of `entry`.

        Raises:
            KeyError: `entry` was not among the dataset's `cache_entries()` when the cache was built (a
                dataset bug: it asked for a size or flip it did not list).
        """
        try:
            return self._params[_entry_id(entry)]
        except KeyError:
            raise KeyError(
                f"no cached latent for {entry.record.path} at size {entry.size} flip={entry.flip}: the "
                "dataset's cache_entries() did not list it"
            ) from None


def latent_cache_dir(cfg: TrainConfig) -> Path:
    """The folder of the disk cache: `cfg.cache_dir`, else `<train_data_dir>/.loha_cache`."""
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(cfg.train_data_dir)


def vae_identity(vae: Any) -> str:
    """A 64-hex key of what makes `vae`'s output: its class, config, dtype and the sha256 of its weights
    (`cache_store.state_dict_sha256`; ~0.2 s for the SD1.5 VAE on a CPU core, once per run)."""
    config = json.dumps(dict(vae.config), sort_keys=True, default=str)
    return make_key(type(vae).__name__, config, str(vae.dtype), state_dict_sha256(vae))


def resize_rule(dataset: CaptionedImageDataset) -> object:
    """What decides the size an image is resized to before its crop, besides the image and its target size:
    "cover" (scaled to cover the square resolution), or with buckets the bucket settings (with
    `bucket_no_upscale` the resize depends on the resolution and steps; the other settings are kept too,
    which re-encodes more than needed when they change, never less)."""
    buckets = getattr(dataset, "buckets", None)
    return "cover" if buckets is None else {"buckets": dataclasses.asdict(buckets)}


def entry_disk_key(entry: CacheEntry, content_sha256: str, vae_id: str, resize: object = "cover") -> str:
    """The disk-cache key of `entry` (see the module docstring): its image content, size, flip, transform
    rule and `resize` rule (`resize_rule`), the reader's background colour, and the VAE."""
    reader: ImageReader = entry.record.reader
    return make_key(
        "latents",
        TRANSFORM_RULE,
        resize,
        content_sha256,
        [int(entry.size[0]), int(entry.size[1])],
        bool(entry.flip),
        list(reader.background_color),
        vae_id,
    )


def _params_shape(vae: Any, size: tuple[int, int]) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (2 * vae.config.latent_channels, size[0] // factor, size[1] // factor)


def _batches(entries: Sequence[CacheEntry], batch_size: int) -> Iterable[list[CacheEntry]]:
    """`entries` grouped by size (one VAE call takes one size), in order, `batch_size` at most per group."""
    by_size: dict[tuple[int, int], list[CacheEntry]] = {}
    for entry in entries:
        by_size.setdefault(tuple(entry.size), []).append(entry)
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


@torch.no_grad()
def encode_entries(
    dataset: CaptionedImageDataset,
    entries: Sequence[CacheEntry],
    vae: Any,
    batch_size: int,
    *,
    progress: Any = None,
) -> list[torch.Tensor]:
    """The VAE's `latent_dist.parameters` of each entry's image (`dataset.entry_image`), in `entries`' order:
    float32 CPU `(2 * latent_channels, h/8, w/8)`, computed on the VAE's device in its dtype, `batch_size`
    images of one size per call. `progress` (a tqdm bar, optional) is advanced per image.

    Raises:
        DataError: an image cannot be read (the message names it).
    """
    out: dict[int, torch.Tensor] = {}
    index = {id(entry): i for i, entry in enumerate(entries)}
    for batch in _batches(entries, batch_size):
        pixels = torch.stack([dataset.entry_image(entry).pixels for entry in batch])
        params = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters
        params = params.float().cpu()
        for entry, p in zip(batch, params):
            out[index[id(entry)]] = p.clone()  # its own storage, not a view keeping the batch alive
        if progress is not None:
            progress.update(len(batch))
    return [out[i] for i in range(len(entries))]


def _progress(total: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="caching latents", disable=not show or total == 0, dynamic_ncols=True)


def _disk_params(
    store: CacheStore,
    dataset: CaptionedImageDataset,
    entries: Sequence[CacheEntry],
    keys: Sequence[str],
    vae: Any,
    batch_size: int,
    *,
    write: bool,
    show_progress: bool,
) -> tuple[dict[str, torch.Tensor], int]:
    """Every key's parameters: read from `store` where a usable file of the right shape exists, else encoded
    (and written when `write`). Returns them by key and the number encoded."""
    found: dict[str, torch.Tensor] = {}
    missing: dict[str, CacheEntry] = {}
    for entry, key in zip(entries, keys):
        if key in found or key in missing:
            continue  # the same image content twice in the data: one entry
        tensors = store.get(key)
        params = None if tensors is None else tensors.get("params")
        expected = _params_shape(vae, tuple(entry.size))
        if params is not None and (tuple(params.shape) != expected or params.dtype != torch.float32):
            logger.warning(
                "cache file %s holds %s %s, not float32 %s; encoding it again",
                store.path(key),
                params.dtype,
                tuple(params.shape),
                expected,
            )
            params = None
        if params is None:
            missing[key] = entry
        else:
            found[key] = params
    if missing:
        progress = _progress(len(missing), show_progress)
        encoded = encode_entries(dataset, list(missing.values()), vae, batch_size, progress=progress)
        progress.close()
        for key, params, entry in zip(missing, encoded, missing.values()):
            found[key] = params
            if write:
                store.put(key, {"params": params}, {"image": entry.record.path.name, "size": str(entry.size)})
    return found, len(missing)


def build_latent_cache(
    cfg: TrainConfig, dataset: CaptionedImageDataset, vae: Any, accelerator: Any
) -> LatentCache:
    """The latent cache of every entry of `dataset` (`dataset.cache_entries()`), from the disk cache when
    `cfg.cache_latents_to_disk` (see the module docstring for keys and processes), else encoded in memory.
    Logs what was read and encoded; a tqdm bar on the main process while encoding.

    Raises:
        DataError: an image cannot be read or hashed (the message names it).
        OutputWriteError: the cache folder cannot be written (disk full, permission), naming it.
    """
    entries = dataset.cache_entries()
    is_main = accelerator.is_main_process
    if not cfg.cache_latents_to_disk:
        progress = _progress(len(entries), is_main)
        params = encode_entries(dataset, entries, vae, cfg.vae_batch_size, progress=progress)
        progress.close()
        cache = LatentCache({_entry_id(e): p for e, p in zip(entries, params)})
        logger.info("latent cache: %d entries encoded (%.1f MB in memory)", len(cache), cache.nbytes / 1e6)
        return cache
    store = CacheStore(latent_cache_dir(cfg), "latents")
    vae_id = vae_identity(vae)
    resize = resize_rule(dataset)
    hashes: dict[Path, str] = {}
    keys = []
    for entry in entries:
        path = Path(entry.record.path)
        if path not in hashes:
            try:
                hashes[path] = file_sha256(path)
            except OSError as exc:
                raise DataError(f"{path}: cannot be read to cache its latent ({exc})") from exc
        keys.append(entry_disk_key(entry, hashes[path], vae_id, resize))
    encoded = 0
    if is_main:
        by_key, encoded = _disk_params(
            store, dataset, entries, keys, vae, cfg.vae_batch_size, write=True, show_progress=True
        )
    accelerator.wait_for_everyone()
    if not is_main:
        # The main process has written every file; encoding here is only for a file it could not write.
        by_key, _ = _disk_params(
            store, dataset, entries, keys, vae, cfg.vae_batch_size, write=False, show_progress=False
        )
    cache = LatentCache({_entry_id(e): by_key[k] for e, k in zip(entries, keys)})
    logger.info(
        "latent cache: %d entries, %d read from %s, %d encoded (%.1f MB in memory)",
        len(cache),
        len(set(keys)) - encoded,
        store.folder,
        encoded,
        cache.nbytes / 1e6,
    )
    return cache


def attach_latent_cache(
    cfg: TrainConfig, dataset: CaptionedImageDataset, vae: Any, accelerator: Any
) -> LatentCache | None:
    """With `cfg.cache_latents`, build the cache (`build_latent_cache`) and set `dataset.latent_cache` to it, so
    the dataset serves `latent_params` instead of pixels; returns it (None, and nothing done, without the
    setting). Call before the loader's first iteration (its workers copy the dataset then).

    Raises:
        DataError: an image cannot be read or hashed (the message names it).
        OutputWriteError: the cache folder cannot be written (disk full, permission), naming it.
    """
    if not cfg.cache_latents:
        return None
    cache = build_latent_cache(cfg, dataset, vae, accelerator)
    dataset.latent_cache = cache
    return cache
