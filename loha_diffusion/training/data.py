"""Training data: deterministic augmented samples of the scanned images, their loader, and the step schedule.

Finding and checking the images and captions is `scan.py` (`scan_dataset`, `scan_training_data`, re-exported
here); reading an image is `images.ImageReader`, the one reader the scan, the samples and validation share.

Every random choice of a sample (crop, flip, caption dropout, the caption tools' shuffle and tag dropout, and
in `step.py` noise and timestep) comes from a generator seeded by `(seed, epoch, sample index)`, so a sample is
the same whatever the number of processes, the batch it lands in, or whether the run was resumed.

With `enable_bucket` each image trains at its aspect-ratio bucket's size (`buckets.py`, kohya's rules) and a
`buckets.BucketBatchSampler` makes every batch of one bucket; the batch's `target_size` is that size. The
dataset can be served by a latent cache (`CaptionedImageDataset.latent_cache`, `cache_entries`,
`entry_image`): samples then carry the VAE's latent parameters instead of pixels, with the same draws.

`scan_training_data`, `training_dataloader` and `compute_schedule` are what a run (and the dry run) use: the
checked dataset from the config, its loader, and the step schedule it gives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError  # noqa: F401  (its old home; kept importable)
from .buckets import BucketBatchSampler, BucketSettings, assign_records, record_size
from .caption_tools import CaptionOptions, process_caption
from .config import TrainConfig
from .images import DEFAULT_READER, IMAGE_EXTENSIONS, ImageFacts, ImageReader
from .scan import (
    KOHYA_FOLDER,
    DatasetSummary,
    ImageRecord,
    image_reader,
    scan_dataset,
    scan_training_data,
)
from .step import derive_seed

__all__ = [
    "IMAGE_EXTENSIONS",
    "KOHYA_FOLDER",
    "BucketBatchSampler",
    "CacheEntry",
    "CaptionedImageDataset",
    "DatasetSummary",
    "EpochSampler",
    "ImageFacts",
    "ImageReader",
    "ImageRecord",
    "Schedule",
    "TransformedImage",
    "collate",
    "compute_schedule",
    "cover_size",
    "image_reader",
    "load_image",
    "make_dataloader",
    "scan_dataset",
    "scan_training_data",
    "training_dataloader",
    "transform_image",
]


def load_image(path: str | Path, reader: ImageReader = DEFAULT_READER) -> Image.Image:
    """Read an image fully as 8-bit RGB with `reader` (EXIF orientation applied, transparency composited onto
    its background colour, every Pillow mode converted; see `images.py`).

    Raises:
        DataError: the file cannot be used (missing, unreadable, truncated, too large); the message names it.
    """
    return reader.read(path)


@dataclass(frozen=True)
class TransformedImage:
    """A training image as the UNet sees it, and where it came from (SDXL's micro-conditioning): `pixels`
    float32 `(3, height, width)` in [-1, 1] (the target size); `original_size` (height, width) of the image
    before resizing; `crop_top_left` (top, left) of the crop in the resized image, in pixels (of the flipped
    image when flipped), as diffusers' `train_text_to_image_lora_sdxl.py` and kohya's SDXL scripts record them."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def _target(size: int | tuple[int, int]) -> tuple[int, int]:
    """`(height, width)` of a target size given as an int (square) or `(height, width)`."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def cover_size(image_size: tuple[int, int], size: int | tuple[int, int]) -> tuple[int, int]:
    """`(width, height)` an image of `image_size` (width, height) is resized to so that it covers the target
    `size` (int, or (height, width)) with its aspect ratio kept: scale = max(target w / w, target h / h),
    sides rounded, never below the target's."""
    height, width = _target(size)
    scale = max(width / image_size[0], height / image_size[1])
    return (max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale)))


def _crop_offsets(
    resized: tuple[int, int], size: tuple[int, int], center_crop: bool, generator: torch.Generator
) -> tuple[int, int]:
    """`(left, top)` of the crop of `size` (height, width) in an image of `resized` (width, height): centred,
    or drawn from `generator` (left, then top; both drawn even where the image fits, so the stream of draws
    does not depend on the image's shape)."""
    height, width = size
    if center_crop:
        return (resized[0] - width) // 2, (resized[1] - height) // 2
    left = int(torch.randint(0, resized[0] - width + 1, (1,), generator=generator))
    top = int(torch.randint(0, resized[1] - height + 1, (1,), generator=generator))
    return left, top


def _render(
    image: Image.Image, size: tuple[int, int], resized: tuple[int, int], left: int, top: int, flip: bool
) -> torch.Tensor:
    """`image` resized to `resized` (width, height, Lanczos), cropped to `size` (height, width) at (left, top),
    flipped left-right when `flip`: float32 `(3, height, width)` in [-1, 1]."""
    height, width = size
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def transform_image(
    image: Image.Image,
    size: int | tuple[int, int],
    *,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator,
    resized_size: tuple[int, int] | None = None,
) -> TransformedImage:
    """Resize the image to cover `size` (Lanczos), crop it to `size` (center or random), maybe flip.

    `size` is the target: an int (a square, the resolution) or `(height, width)` (a bucket). The image is
    resized to `resized_size` (width, height; it must cover the target) or by default to `cover_size` (for a
    square: the short side to the resolution). Returns the float32 CPU pixels `(3, height, width)` in [-1, 1]
    with the image's original size and crop offsets (`TransformedImage`). The crop offsets (left, then top,
    only for a random crop) and then the flip coin come from `generator` (the coin is drawn even with
    `random_flip` off).
    """
    target = _target(size)
    original_size = (image.height, image.width)
    resized = resized_size or cover_size(image.size, target)
    left, top = _crop_offsets(resized, target, center_crop, generator)
    # Always draw the flip coin, so the generator's stream does not depend on the setting's history.
    flip = bool(torch.rand((), generator=generator) < 0.5) and random_flip
    pixels = _render(image, target, resized, left, top, flip)
    if flip:
        left = (
            resized[0] - target[1] - left
        )  # the same crop, measured in the flipped image (diffusers flips first)
    return TransformedImage(pixels, original_size, (top, left))


@dataclass(frozen=True)
class CacheEntry:
    """One image as a run can ask for it (what a latent cache stores): the record's index in the dataset's
    `records` and the record, the target `size` (height, width) and whether it is flipped. Its pixels are the
    deterministic centre crop (`CaptionedImageDataset.entry_image`)."""

    record_index: int
    record: ImageRecord
    size: tuple[int, int]
    flip: bool


class CaptionedImageDataset(Dataset):
    """Samples of a scanned dataset, indexed by `(epoch, index)`; kohya repeats expand the index range.

    A sample is `{"pixel_values": float32 (3, height, width) in [-1, 1], "caption": str (after the caption tools;
    empty when dropped), "sample_seed": int, "original_size": (height, width), "crop_top_left": (top, left),
    "target_size": (height, width), "loss_weight": float}` (see `TransformedImage`), a function of
    `(seed, epoch, index)` only. The target size is `(resolution, resolution)`, or with `buckets` the record's
    bucket (`buckets.assign_bucket`). The loss weight is 1, or `prior_loss_weight` for a regularization image.

    With a `latent_cache` (None, or an object with `.get(entry: CacheEntry) -> Tensor (8, h, w)`), a sample has
    `"latent_params"` (the cache's tensor of its `CacheEntry`) instead of `"pixel_values"` and no image is read;
    the crop is then the centre crop (the config refuses random crops with a latent cache), so the sample's
    draws, sizes and offsets are those of the uncached sample.

    Draws from the sample's generator, in order: the crop offsets (random crop only), the flip coin, the
    caption-dropout coin, then the caption tools' draws (`caption_tools.process_caption`, only for a caption
    not dropped); with every new option off, samples are those of earlier versions exactly."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        caption_dropout_rate: float = 0.0,
        seed: int = 0,
        buckets: BucketSettings | None = None,
        caption_options: CaptionOptions | None = None,
        prior_loss_weight: float = 1.0,
    ) -> None:
        self.records = list(records)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout_rate = caption_dropout_rate
        self.seed = seed
        self.buckets = buckets
        self.caption_options = caption_options or CaptionOptions()
        self.prior_loss_weight = prior_loss_weight
        self.latent_cache: Any = None
        self._record_of_sample = [i for i, record in enumerate(self.records) for _ in range(record.repeats)]
        # Per record: the target (height, width) and the size it is resized to (None: `cover_size`).
        self._targets: list[tuple[tuple[int, int], tuple[int, int] | None]]
        self._sizes: dict[int, tuple[int, int]] = {}  # record index -> (width, height), found when needed
        if buckets is None:
            self._targets = [((resolution, resolution), None)] * len(self.records)
        else:
            self._sizes = {i: record_size(r) for i, r in enumerate(self.records)}
            choices = assign_records(
                self.records, buckets, [self._sizes[i] for i in range(len(self.records))]
            )
            self._targets = [((c.bucket[1], c.bucket[0]), c.resized) for c in choices]

    def __len__(self) -> int:
        return len(self._record_of_sample)

    @property
    def sample_buckets(self) -> list[tuple[int, int]]:
        """The target size (height, width) of each sample index (its bucket; one size without buckets)."""
        return [self._targets[i][0] for i in self._record_of_sample]

    def cache_entries(self) -> list[CacheEntry]:
        """Every image the run can ask for: one `CacheEntry` per record, two (unflipped, flipped) with
        `random_flip`."""
        flips = (False, True) if self.random_flip else (False,)
        return [
            CacheEntry(i, record, self._targets[i][0], flip)
            for i, record in enumerate(self.records)
            for flip in flips
        ]

    def entry_image(self, entry: CacheEntry) -> TransformedImage:
        """The pixels of `entry`: its record's image resized as training resizes it, centre-cropped to the
        entry's size, flipped when the entry is.

        Raises:
            DataError: the image cannot be read (see `images.ImageReader.read`).
        """
        image = entry.record.reader.read(entry.record.path)
        size, resized = self._targets[entry.record_index]
        resized = resized or cover_size(image.size, size)
        left, top = _crop_offsets(resized, size, True, torch.Generator())
        pixels = _render(image, size, resized, left, top, entry.flip)
        if entry.flip:
            left = resized[0] - size[1] - left
        return TransformedImage(pixels, (image.height, image.width), (top, left))

    def _cached_sample(self, record_index: int, generator: torch.Generator) -> dict[str, Any]:
        """The image part of a sample served by `latent_cache`: the same draw (the flip coin), sizes and
        offsets as `transform_image` with a centre crop, from the record's scanned size."""
        record = self.records[record_index]
        size, resized = self._targets[record_index]
        if record_index not in self._sizes:
            self._sizes[record_index] = record_size(record)
        width, height = self._sizes[record_index]
        resized = resized or cover_size((width, height), size)
        left, top = _crop_offsets(resized, size, True, generator)
        flip = bool(torch.rand((), generator=generator) < 0.5) and self.random_flip
        if flip:
            left = resized[0] - size[1] - left
        entry = CacheEntry(record_index, record, size, flip)
        return {
            "latent_params": self.latent_cache.get(entry),
            "original_size": (height, width),
            "crop_top_left": (top, left),
        }

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record_index = self._record_of_sample[index]
        record = self.records[record_index]
        size, resized = self._targets[record_index]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "augment", epoch, index))
        if self.latent_cache is not None:
            sample = self._cached_sample(record_index, generator)
        else:
            image = transform_image(
                record.reader.read(record.path),
                size,
                center_crop=self.center_crop,
                random_flip=self.random_flip,
                generator=generator,
                resized_size=resized,
            )
            sample = {
                "pixel_values": image.pixels,
                "original_size": image.original_size,
                "crop_top_left": image.crop_top_left,
            }
        drop = bool(torch.rand((), generator=generator) < self.caption_dropout_rate)
        caption = "" if drop else process_caption(record.caption, self.caption_options, generator)
        return {
            **sample,
            "caption": caption,
            "sample_seed": derive_seed(self.seed, "sample", epoch, index),
            "target_size": size,
            "loss_weight": self.prior_loss_weight if record.is_reg else 1.0,
        }


class EpochSampler(Sampler):
    """Yields `(epoch, index)` keys in a per-epoch order seeded by `(seed, epoch)`; `set_position(epoch)` picks the
    epoch. Independent of global RNG state, so order survives resume and is the same in every process."""

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_position(self, epoch: int) -> None:
        """Serve the order of `epoch` on the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        return iter([(self.epoch, i) for i in order])


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of B samples of one target size: `pixel_values` float32 `(B, 3, H, W)` in [-1, 1] (absent when
    a latent cache serves the samples: then `latent_params` float32 `(B, 8, H/8, W/8)`, the VAE's
    `latent_dist.parameters`), `captions` a list of B strings, `sample_seeds` int64 `(B,)` (one seed per sample
    for its noise, timestep and VAE sample, see `step.py`), `original_sizes` and `crops_top_left` int64
    `(B, 2)` ((height, width), (top, left): SDXL's micro-conditioning, see `conditioning.sdxl_time_ids`),
    `target_size` (height, width) of the batch's images (H, W; SDXL's target-size time ids) and
    `loss_weights` float32 `(B,)` (1, or `prior_loss_weight` for regularization samples)."""
    batch: dict[str, Any] = {}
    for key in ("pixel_values", "latent_params"):
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples])
    return {
        **batch,
        "captions": [e["caption"] for e in examples],
        "sample_seeds": torch.tensor([e["sample_seed"] for e in examples], dtype=torch.int64),
        "original_sizes": torch.tensor([e["original_size"] for e in examples], dtype=torch.int64),
        "crops_top_left": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.int64),
        "target_size": tuple(examples[0]["target_size"]),
        "loss_weights": torch.tensor([e["loss_weight"] for e in examples], dtype=torch.float32),
    }


def make_dataloader(
    dataset: CaptionedImageDataset, *, batch_size: int, num_workers: int = 0, seed: int = 0
) -> tuple[DataLoader, EpochSampler | BucketBatchSampler]:
    """A DataLoader over `dataset` and its sampler (the loop sets the sampler's epoch with `set_position`):
    batches of `batch_size` in an `EpochSampler` order, or, when the dataset has buckets, a
    `buckets.BucketBatchSampler` (every batch from one bucket)."""
    common: dict[str, Any] = {
        "collate_fn": collate,
        "num_workers": num_workers,
        # A private generator: worker seeding must not consume the global RNG (exact resume).
        "generator": torch.Generator().manual_seed(seed),
        "persistent_workers": num_workers > 0,
    }
    if dataset.buckets is not None:
        batches = BucketBatchSampler(dataset.sample_buckets, batch_size, seed=seed)
        return DataLoader(dataset, batch_sampler=batches, **common), batches
    sampler = EpochSampler(len(dataset), seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **common), sampler


def training_dataloader(
    cfg: TrainConfig, summary: DatasetSummary
) -> tuple[DataLoader, EpochSampler | BucketBatchSampler]:
    """The run's dataset of `summary.epoch_records` (the training records, then the regularization records
    with kohya's repeats; crops, flips, buckets, caption dropout and caption tools as `cfg` says) in a loader
    of `cfg.train_batch_size` samples per batch; returns the loader and its sampler (the loop sets its epoch).

    Raises:
        ConfigError: the bucket settings do not fit together (see `buckets.BucketSettings.from_config`).
        DataError: an image gets no bucket (see `buckets.assign_records`).
    """
    dataset = CaptionedImageDataset(
        summary.epoch_records,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        caption_dropout_rate=cfg.caption_dropout_rate,
        seed=cfg.seed,
        buckets=BucketSettings.from_config(cfg) if cfg.enable_bucket else None,
        caption_options=CaptionOptions.from_config(cfg),
        prior_loss_weight=cfg.prior_loss_weight,
    )
    return make_dataloader(
        dataset, batch_size=cfg.train_batch_size, num_workers=cfg.dataloader_num_workers, seed=cfg.seed
    )


@dataclass(frozen=True)
class Schedule:
    """How long training runs, in optimizer steps and epochs, for a dataset size and process count."""

    num_samples: int
    num_processes: int
    batches_per_epoch: int  # per process
    update_steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    total_batch_size: int  # samples per optimizer step over all processes


def compute_schedule(
    cfg: TrainConfig, num_samples: int, num_processes: int = 1, *, num_batches: int | None = None
) -> Schedule:
    """Steps per epoch, total steps and epochs as accelerate will run them (last batch kept, even batches).

    `num_samples` is the samples per epoch (images times kohya repeats); `num_batches` the batches per epoch
    over all processes when known (`len(loader)`: with buckets, the sum over buckets of ceil(samples /
    batch size)), else ceil(num_samples / train_batch_size). Each process runs ceil(num_batches /
    num_processes) of them. `max_train_steps` wins over `num_train_epochs`, and the epoch count is rounded up
    to cover it.
    """
    if num_batches is None:
        num_batches = math.ceil(num_samples / cfg.train_batch_size)
    batches_per_epoch = math.ceil(num_batches / num_processes)
    update_steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * update_steps_per_epoch
    return Schedule(
        num_samples=num_samples,
        num_processes=num_processes,
        batches_per_epoch=batches_per_epoch,
        update_steps_per_epoch=update_steps_per_epoch,
        max_train_steps=max_train_steps,
        num_epochs=math.ceil(max_train_steps / update_steps_per_epoch),
        total_batch_size=cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes,
    )
