"""The text-encoder output cache (`cache_text_encoder_outputs`, `cache_text_encoder_outputs_to_disk`): every caption
a run can train on, encoded once, so the training step runs no text encoder.

Which captions: with the text encoders frozen and captions not shuffled or tag-dropped per step (`config.validate`
refuses the cache otherwise), a sample's caption is its record's caption through `caption_tools.process_caption`
(prefix/suffix only: deterministic), or "" when the whole-caption dropout (`caption_dropout_rate`) drops it. So
the set is `run_captions`: the processed captions of the epoch's records (regularization images included), plus
"" when the dropout rate is above 0. kohya (`cache_text_encoder_outputs` in sd-scripts) caches per image; here it
is per distinct caption, the same states with fewer encodings when images share a caption.

Each caption is encoded as the training step would (`conditioning.encode_prompts` with the run's `TextEncoding`:
long prompts, clip skip), in batches of `train_batch_size` under no gradients, and held in memory on the CPU in
the text encoders' dtype (moved to the device per batch): SD1.5 77 x 768, SDXL 77 x 2048 plus the 1280 pooled
values per caption. With `_to_disk` each caption is also a `cache_store.CacheStore` entry ("text" files in
`cache_dir`, default `<train_data_dir>/.loha_cache`) keyed by the caption's token ids for every tokenizer, the
encoding settings and the text encoders' weights (`cache_store.state_dict_sha256`): another tokenizer, setting or
base model gives another key, never a stale entry, and a second run reads the states instead of encoding them.

The text encoders stay on the device: validation (`conditioning.pipeline_prompt_embeds`) and the fixed-set loss
still encode their prompts with them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .cache_store import CacheStore, default_cache_dir, make_key, state_dict_sha256
from .caption_tools import CaptionOptions, process_caption
from .conditioning import TextEncoding, chunked_token_ids, encode_prompts
from .config import TrainConfig
from .scan import DatasetSummary, ImageRecord

if TYPE_CHECKING:
    from .models import Models

__all__ = [
    "TextEncoderCache",
    "cache_text_encoder_outputs",
    "run_captions",
    "text_encoder_cache",
    "text_encoders_identity",
]

logger = logging.getLogger("loha_diffusion.training")

CACHE_KIND = "text"  # the store's file-name prefix


class TextEncoderCache:
    """Encoded captions: `caption -> (states (L, D), pooled (P,) or None)` CPU tensors in the text encoders'
    dtype, all from one `TextEncoding` (`encoding`). `misses` counts the captions `lookup` was asked for and did
    not hold (the caller encodes those batches itself)."""

    def __init__(
        self, entries: dict[str, tuple[torch.Tensor, torch.Tensor | None]], encoding: TextEncoding
    ) -> None:
        self.entries = entries
        self.encoding = encoding
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, caption: object) -> bool:
        return caption in self.entries

    def lookup(
        self, captions: Sequence[str], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The batch's `(states (B, L, D), pooled (B, P) or None)` on `device`, as `encode_prompts` returns
        them; None when a caption is not held (logged once as a warning: the caption set of `run_captions`
        missed it), so the caller encodes the batch with the text encoders."""
        missing = [c for c in captions if c not in self.entries]
        if missing:
            if not self.misses:
                logger.warning(
                    "text-encoder cache: caption %r was not cached; encoding such batches on the fly (the "
                    "loss is the same, only slower)",
                    missing[0],
                )
            self.misses += len(missing)
            return None
        states = torch.stack([self.entries[c][0] for c in captions]).to(device, non_blocking=True)
        pooled = [self.entries[c][1] for c in captions]
        if pooled[0] is None:
            return states, None
        return states, torch.stack(pooled).to(device, non_blocking=True)


def run_captions(cfg: TrainConfig, records: Iterable[ImageRecord]) -> list[str]:
    """Every caption the run can give a sample, sorted: each record's caption through `process_caption` (only
    prefix/suffix may apply: the cache is refused with shuffling and tag dropout), and "" when
    `caption_dropout_rate` > 0.

    Raises:
        ValueError: `cfg`'s caption options change captions per step (shuffle or tag dropout), which no
            cache can hold (`config.validate` refuses the combination first).
    """
    options = CaptionOptions.from_config(cfg)
    if options.changes_per_step:
        raise ValueError(
            "captions change per step (shuffle_caption or caption_tag_dropout_rate): they cannot be cached"
        )
    generator = torch.Generator()  # never drawn from: no per-step option is on
    captions = {process_caption(r.caption, options, generator) for r in records}
    if cfg.caption_dropout_rate > 0:
        captions.add("")
    return sorted(captions)


def text_encoders_identity(models: Models) -> str:
    """A sha256 of the text encoders' weights, names, dtypes and shapes (`cache_store.state_dict_sha256` of
    each, in order): part of every disk entry's key. About 0.5 s for SD1.5's encoder in float32 on one CPU core,
    a few seconds for SDXL's two."""
    return make_key(*(state_dict_sha256(te) for te in models.text_encoders))


def _entry_key(models: Models, caption: str, encoding: TextEncoding, identity: str) -> str:
    """The store key of one caption: its token windows for every tokenizer (so another tokenizer or length is
    another key), the encoding settings, the encoders' identity."""
    ids = [chunked_token_ids(t, [caption], encoding).tolist() for t in models.tokenizers]
    return make_key(CACHE_KIND, caption, ids, encoding.key(), identity)


def cache_text_encoder_outputs(
    models: Models,
    captions: Iterable[str],
    *,
    encoding: TextEncoding,
    device: torch.device | str,
    batch_size: int = 8,
    store: CacheStore | None = None,
) -> TextEncoderCache:
    """Encode each distinct caption of `captions` once with `models`' text encoders (`encode_prompts`, no
    gradients, `batch_size` captions at a time on `device`) and return them as a `TextEncoderCache`.

    With `store`, entries found there (same token ids, encoding and text-encoder weights) are read instead of
    encoded, and new ones written (`{"states": (L, D), "pooled": (P,)}`, SD1.x/SD2.x without "pooled").

    Raises:
        ValueError: `batch_size` < 1.
        OutputWriteError: the store's folder cannot be written (disk full, permission), naming it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    distinct = sorted(set(captions))
    started = time.perf_counter()
    entries: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    keys: dict[str, str] = {}
    if store is not None:
        identity = text_encoders_identity(models)
        for caption in distinct:
            keys[caption] = _entry_key(models, caption, encoding, identity)
            found = store.get(keys[caption])
            if found is not None:
                entries[caption] = (found["states"], found.get("pooled"))
    from_disk = len(entries)
    todo = [c for c in distinct if c not in entries]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        with torch.no_grad():
            states, pooled = encode_prompts(
                models.tokenizers, models.text_encoders, batch, device=device, encoding=encoding
            )
        for i, caption in enumerate(batch):
            entry = (states[i].cpu(), None if pooled is None else pooled[i].cpu())
            entries[caption] = entry
            if store is not None:
                tensors = (
                    {"states": entry[0]} if entry[1] is None else {"states": entry[0], "pooled": entry[1]}
                )
                store.put(keys[caption], tensors, metadata={"caption": caption})
    logger.info(
        "text-encoder cache: %d captions (%d read from disk, %d encoded) in %.1f s",
        len(entries),
        from_disk,
        len(todo),
        time.perf_counter() - started,
    )
    return TextEncoderCache(entries, encoding)


def text_encoder_cache(
    cfg: TrainConfig, summary: DatasetSummary, models: Models, accelerator: Any
) -> TextEncoderCache | None:
    """The run's text-encoder cache (None unless `cache_text_encoder_outputs`): the captions of `run_captions`
    over the epoch's records (`summary.epoch_records`, regularization images included), encoded with the run's
    `TextEncoding` in batches of `train_batch_size` on the accelerator's device, on disk in `cache_dir` (default
    `<train_data_dir>/.loha_cache`) with `cache_text_encoder_outputs_to_disk`. The main process fills the disk
    cache first; the others then read it.

    Raises:
        OutputWriteError: the cache folder cannot be written (disk full, permission), naming it.
    """
    if not cfg.cache_text_encoder_outputs:
        return None
    store = None
    if cfg.cache_text_encoder_outputs_to_disk:
        store = CacheStore(cfg.cache_dir or default_cache_dir(cfg.train_data_dir), CACHE_KIND)
    with accelerator.main_process_first():
        return cache_text_encoder_outputs(
            models,
            run_captions(cfg, summary.epoch_records),
            encoding=TextEncoding.from_config(cfg),
            device=accelerator.device,
            batch_size=cfg.train_batch_size,
            store=store,
        )
