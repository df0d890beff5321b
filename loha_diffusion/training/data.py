"""Training data: deterministic augmented samples of the scanned images, their loader, and the step schedule.

Finding and checking the images and captions is `scan.py` (`scan_dataset`, `scan_training_data`, re-exported
here); reading an image is `images.ImageReader`, the one reader the scan, the samples and validation share.

Every random choice of a sample (crop, flip, caption dropout, and in `step.py` noise and timestep) comes from a
generator seeded by `(seed, epoch, sample index)`, so a sample is the same whatever the number of processes,
the batch it lands in, or whether the run was resumed.

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
    float32 `(3, resolution, resolution)` in [-1, 1]; `original_size` (height, width) of the image before
    resizing; `crop_top_left` (top, left) of the crop in the resized image, in pixels (of the flipped image
    when flipped), as diffusers' `train_text_to_image_lora_sdxl.py` and kohya's SDXL scripts record them."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def transform_image(
    image: Image.Image, resolution: int, *, center_crop: bool, random_flip: bool, generator: torch.Generator
) -> TransformedImage:
    """Resize the short side to `resolution` (Lanczos), crop a square (center or random), maybe flip.

    Returns the float32 CPU pixels `(3, resolution, resolution)` in [-1, 1] with the image's original size and
    crop offsets (`TransformedImage`). The crop offset and the flip coin come from `generator` (the coin is
    drawn even with `random_flip` off).
    """
    original_size = (image.height, image.width)
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    # Always draw the flip coin, so the generator's stream does not depend on the setting's history.
    flip = bool(torch.rand((), generator=generator) < 0.5)
    if random_flip and flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = (
            width - resolution - left
        )  # the same crop, measured in the flipped image (diffusers flips first)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return TransformedImage(pixels, original_size, (top, left))


class CaptionedImageDataset(Dataset):
    """Samples of a scanned dataset, indexed by `(epoch, index)`; kohya repeats expand the index range.

    A sample is `{"pixel_values": float32 (3, resolution, resolution) in [-1, 1], "caption": str (empty when
    dropped), "sample_seed": int, "original_size": (height, width), "crop_top_left": (top, left)}` (see
    `TransformedImage`), a function of `(seed, epoch, index)` only."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        caption_dropout_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout_rate = caption_dropout_rate
        self.seed = seed
        self._record_of_sample = [i for i, record in enumerate(self.records) for _ in range(record.repeats)]

    def __len__(self) -> int:
        return len(self._record_of_sample)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record = self.records[self._record_of_sample[index]]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "augment", epoch, index))
        image = transform_image(
            record.reader.read(record.path),
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            generator=generator,
        )
        drop = bool(torch.rand((), generator=generator) < self.caption_dropout_rate)
        return {
            "pixel_values": image.pixels,
            "caption": "" if drop else record.caption,
            "sample_seed": derive_seed(self.seed, "sample", epoch, index),
            "original_size": image.original_size,
            "crop_top_left": image.crop_top_left,
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
    """A batch of B samples: `pixel_values` float32 `(B, 3, H, W)` in [-1, 1], `captions` a list of B strings,
    `sample_seeds` int64 `(B,)` (one seed per sample for its noise, timestep and VAE sample, see `step.py`),
    `original_sizes` and `crops_top_left` int64 `(B, 2)` ((height, width), (top, left): SDXL's
    micro-conditioning, see `conditioning.sdxl_time_ids`)."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "captions": [e["caption"] for e in examples],
        "sample_seeds": torch.tensor([e["sample_seed"] for e in examples], dtype=torch.int64),
        "original_sizes": torch.tensor([e["original_size"] for e in examples], dtype=torch.int64),
        "crops_top_left": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.int64),
    }


def make_dataloader(
    dataset: CaptionedImageDataset, *, batch_size: int, num_workers: int = 0, seed: int = 0
) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader over `dataset` with an `EpochSampler`; returns both (the loop sets the sampler's epoch)."""
    sampler = EpochSampler(len(dataset), seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        # A private generator: worker seeding must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


def training_dataloader(cfg: TrainConfig, summary: DatasetSummary) -> tuple[DataLoader, EpochSampler]:
    """The run's dataset of `summary.records` (crops, flips, caption dropout as `cfg` says) in a loader of
    `cfg.train_batch_size` samples per batch; returns the loader and its sampler (the loop sets its epoch)."""
    dataset = CaptionedImageDataset(
        summary.records,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        caption_dropout_rate=cfg.caption_dropout_rate,
        seed=cfg.seed,
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


def compute_schedule(cfg: TrainConfig, num_samples: int, num_processes: int = 1) -> Schedule:
    """Steps per epoch, total steps and epochs as accelerate will run them (last batch kept, even batches).

    `num_samples` is the samples per epoch (images times kohya repeats); `max_train_steps` wins over
    `num_train_epochs`, and the epoch count is rounded up to cover it.
    """
    batches_per_epoch = math.ceil(num_samples / (cfg.train_batch_size * num_processes))
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
