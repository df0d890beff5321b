"""Training data: find captioned images in the three common layouts, check them before training, and serve
deterministic augmented samples.

Layouts of `train_data_dir` (checked in this order):

* **imagefolder**: a `metadata.jsonl` with one `{"file_name": ..., "text": ...}` object per line (diffusers);
* **kohya**: sub-folders named `<repeats>_<concept>` (e.g. `10_sks dog`), each with images and captions; every
  image is seen `repeats` times per epoch;
* **flat**: images with a same-name caption file (`cat.png` + `cat.txt`).

Every random choice of a sample (crop, flip, caption dropout, and in `step.py` noise and timestep) comes from a
generator seeded by `(seed, epoch, sample index)`, so a sample is the same whatever the number of processes,
the batch it lands in, or whether the run was resumed.

`scan_training_data`, `training_dataloader` and `compute_schedule` are what a run (and the dry run) use: the
checked dataset from the config, its loader, and the step schedule it gives.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .config import TrainConfig
from .step import derive_seed

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
_MAX_LISTED = 10  # problems listed in one error message


@dataclass(frozen=True)
class ImageRecord:
    """One training image: its file, caption and how often it is seen per epoch (kohya repeats)."""

    path: Path
    caption: str
    repeats: int = 1


@dataclass(frozen=True)
class DatasetSummary:
    """What `scan_dataset` found: the layout, the usable images and what was skipped (with reasons)."""

    root: Path
    layout: str  # "imagefolder" | "kohya" | "flat"
    records: tuple[ImageRecord, ...]
    skipped: tuple[str, ...]
    small_images: int  # images smaller than the training resolution (they get upscaled)

    @property
    def num_samples(self) -> int:
        """Samples per epoch (images times repeats)."""
        return sum(r.repeats for r in self.records)

    def describe(self) -> str:
        """One line for logs and the dry-run plan."""
        text = f"{len(self.records)} images ({self.layout} layout in {self.root}), {self.num_samples} samples per epoch"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text


def _problem_list(problems: Sequence[str]) -> str:
    listed = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"\n  {listed}{more}"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _read_caption(image: Path, caption_extension: str) -> str | None:
    caption_file = image.with_suffix(caption_extension)
    if not caption_file.is_file():
        return None
    return caption_file.read_text(encoding="utf-8").strip()


def _image_size(path: Path) -> tuple[int, int]:
    """Open the header and verify the file; raise `OSError`/`UnidentifiedImageError` if it is unreadable."""
    with Image.open(path) as image:
        size = image.size
        image.verify()
    return size


def _imagefolder_candidates(
    root: Path, image_column: str, caption_column: str
) -> list[tuple[Path, str | None, int]]:
    metadata = root / "metadata.jsonl"
    found = []
    problems = []
    for line_no, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{metadata}:{line_no}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict) or image_column not in row:
            problems.append(
                f"{metadata}:{line_no}: no {image_column!r} key (set image_column to the right key)"
            )
            continue
        caption = row.get(caption_column)
        if caption is not None and not isinstance(caption, str):
            problems.append(f"{metadata}:{line_no}: {caption_column!r} is not a string")
            continue
        found.append((root / row[image_column], caption.strip() if caption is not None else None, 1))
    if problems:
        raise DataError(f"{metadata} has {len(problems)} bad lines:{_problem_list(problems)}")
    return found


def _kohya_candidates(
    root: Path, concept_dirs: list[Path], caption_extension: str, on_missing_caption: str
) -> list[tuple[Path, str | None, int]]:
    stray = sorted(p.name for p in root.iterdir() if _is_image(p))
    if stray:
        raise DataError(
            f"{root} has kohya '<repeats>_<concept>' folders and also images directly inside it "
            f"({', '.join(stray[:5])}); move those images into a folder such as {root / '1_extra'}"
        )
    ignored = sorted(p.name for p in root.iterdir() if p.is_dir() and not KOHYA_FOLDER.match(p.name))
    if ignored:
        logger.warning(
            "ignoring folders of %s that are not named '<repeats>_<concept>': %s", root, ", ".join(ignored)
        )
    found = []
    for folder in concept_dirs:
        match = KOHYA_FOLDER.match(folder.name)
        repeats, concept = int(match.group(1)), match.group(2)
        if repeats < 1:
            raise DataError(f"{folder}: the repeat count in the folder name must be >= 1")
        for image in sorted(p for p in folder.iterdir() if _is_image(p)):
            caption = _read_caption(image, caption_extension)
            if caption is None and on_missing_caption == "folder_name":
                caption = concept
            found.append((image, caption, repeats))
    return found


def _candidates(
    root: Path, caption_extension: str, image_column: str, caption_column: str, on_missing_caption: str
) -> tuple[str, list[tuple[Path, str | None, int]]]:
    """The layout of `root` and its (image, caption or None, repeats) entries, images not yet opened."""
    if (root / "metadata.jsonl").is_file():
        return "imagefolder", _imagefolder_candidates(root, image_column, caption_column)
    concept_dirs = sorted(p for p in root.iterdir() if p.is_dir() and KOHYA_FOLDER.match(p.name))
    if concept_dirs:
        return "kohya", _kohya_candidates(root, concept_dirs, caption_extension, on_missing_caption)
    candidates = [(p, _read_caption(p, caption_extension), 1) for p in sorted(root.iterdir()) if _is_image(p)]
    if KOHYA_FOLDER.match(root.name) and candidates:
        logger.warning(
            "%s looks like a kohya '<repeats>_<concept>' folder; its repeat count applies only when "
            "train_data_dir is its parent folder. Using each image once per epoch.",
            root,
        )
    return "flat", candidates


def scan_dataset(
    root: str | Path,
    *,
    resolution: int,
    caption_extension: str = ".txt",
    image_column: str = "file_name",
    caption_column: str = "text",
    on_missing_caption: str = "error",
    on_bad_image: str = "error",
) -> DatasetSummary:
    """Find and check every training image under `root` before training starts.

    Every image's header is read and verified (no pixels decoded). `on_missing_caption` / `on_bad_image` =
    `"skip"` leaves those images out with a warning naming them; `on_missing_caption="folder_name"` uses the
    kohya folder's concept (`10_sks dog` -> `sks dog`) as the caption. Images smaller than `resolution`
    (pixels, shorter side) are counted and will be upscaled.

    Raises:
        DataError: `root` is missing, a `metadata.jsonl` line is bad, images are unreadable or without caption
            (all of them listed, unless skipped), kohya folders and loose images are mixed, or nothing usable
            is left; the message names the files and the fix.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"train_data_dir {root} does not exist or is not a folder")
    layout, candidates = _candidates(
        root, caption_extension, image_column, caption_column, on_missing_caption
    )
    records, skipped, missing_captions, bad_images = [], [], [], []
    small = 0
    for path, caption, repeats in candidates:
        try:
            width, height = _image_size(path)
        except FileNotFoundError:
            bad_images.append(f"{path}: file not found")
            continue
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            bad_images.append(f"{path}: unreadable image ({type(exc).__name__}: {exc})")
            continue
        if caption is None:
            where = (
                f"no {caption_column!r} in metadata.jsonl"
                if layout == "imagefolder"
                else f"no caption file {path.with_suffix(caption_extension).name}"
            )
            missing_captions.append(f"{path}: {where}")
            continue
        small += min(width, height) < resolution
        records.append(ImageRecord(path=path, caption=caption, repeats=repeats))

    if bad_images:
        if on_bad_image == "error":
            raise DataError(
                f"{len(bad_images)} training images cannot be read (fix or remove them, or set "
                f"on_bad_image = 'skip'):{_problem_list(bad_images)}"
            )
        logger.warning("skipping %d unreadable images:%s", len(bad_images), _problem_list(bad_images))
        skipped += bad_images
    if missing_captions:
        if on_missing_caption == "error" or (on_missing_caption == "folder_name" and layout != "kohya"):
            fix = "write the caption files, or set on_missing_caption = 'skip'"
            if layout == "kohya":
                fix += " or 'folder_name'"
            raise DataError(
                f"{len(missing_captions)} images have no caption ({fix}):{_problem_list(missing_captions)}"
            )
        logger.warning(
            "skipping %d images without caption:%s", len(missing_captions), _problem_list(missing_captions)
        )
        skipped += missing_captions
    if not records:
        hint = (
            f"put images ({', '.join(IMAGE_EXTENSIONS)}) with same-name {caption_extension} captions in it, "
            "kohya '<repeats>_<concept>' sub-folders, or a metadata.jsonl"
        )
        raise DataError(f"no usable training images in {root}: {hint}")
    if small:
        logger.warning(
            "%d of %d images are smaller than resolution %d and will be upscaled",
            small,
            len(records),
            resolution,
        )
    return DatasetSummary(root, layout, tuple(records), tuple(skipped), small)


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB, honouring the EXIF orientation.

    Raises:
        DataError: the file cannot be read as an image (the message names it).
    """
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc


def transform_image(
    image: Image.Image, resolution: int, *, center_crop: bool, random_flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Resize the short side to `resolution` (Lanczos), crop a square (center or random), maybe flip.

    Returns a float32 CPU tensor of shape `(3, resolution, resolution)` with values in [-1, 1]. The crop offset
    and the flip coin come from `generator` (the coin is drawn even with `random_flip` off).
    """
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
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class CaptionedImageDataset(Dataset):
    """Samples of a scanned dataset, indexed by `(epoch, index)`; kohya repeats expand the index range.

    A sample is `{"pixel_values": float32 (3, resolution, resolution) in [-1, 1], "caption": str (empty when
    dropped), "sample_seed": int}`, a function of `(seed, epoch, index)` only."""

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
        pixels = transform_image(
            load_image(record.path),
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            generator=generator,
        )
        drop = bool(torch.rand((), generator=generator) < self.caption_dropout_rate)
        return {
            "pixel_values": pixels,
            "caption": "" if drop else record.caption,
            "sample_seed": derive_seed(self.seed, "sample", epoch, index),
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
    `sample_seeds` int64 `(B,)` (one seed per sample for its noise, timestep and VAE sample, see `step.py`)."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "captions": [e["caption"] for e in examples],
        "sample_seeds": torch.tensor([e["sample_seed"] for e in examples], dtype=torch.int64),
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


def scan_training_data(cfg: TrainConfig) -> DatasetSummary:
    """`scan_dataset` of `cfg.train_data_dir` with the run's resolution, caption and skip settings.

    Raises:
        DataError: as `scan_dataset` (the message names the files and the fix).
    """
    return scan_dataset(
        cfg.train_data_dir,
        resolution=cfg.resolution,
        caption_extension=cfg.caption_extension,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        on_missing_caption=cfg.on_missing_caption,
        on_bad_image=cfg.on_bad_image,
    )


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
