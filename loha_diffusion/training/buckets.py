"""Aspect-ratio buckets, kohya sd-scripts' rules: which bucket each image trains in, and batches of one bucket.

A bucket is a training size (width, height) of about `resolution²` pixels whose sides are multiples of
`bucket_reso_steps`, between `min_bucket_reso` and `max_bucket_reso` (`bucket_resolutions`: kohya's
`make_bucket_resolutions`, library/model_util.py). Each image goes to the bucket whose aspect ratio is nearest
its own (`assign_bucket`: kohya's `BucketManager.select_bucket`, library/train_util.py), is resized to cover
the bucket and cropped to it (`data.transform_image`). With `bucket_no_upscale` an image is never enlarged:
one of at most `resolution²` pixels gets a bucket of its own size rounded down to the steps, a larger one is
shrunk to about `resolution²` pixels first (kohya's rule; such buckets are not limited to min/max_bucket_reso,
as in kohya).

`BucketBatchSampler` yields batches whose samples all share one bucket, in an order that is a function of
`(seed, epoch)` only (kohya shuffles each bucket, cuts it into batches, the last possibly smaller, and shuffles
the batches), so a resumed run and every process of a multi-process run see the same batches.

diffusers has no training bucketing helper: its training examples crop to a square, and the bucket functions
it has (0.42: HunyuanVideo 1.5's `get_closest_ratio`, JoyImage's `find_best_bucket`) are inference helpers
private to those pipelines, with other bucket lists and no batch sampler. The rules here are kohya's, which its
users' datasets and settings expect.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from ..errors import ConfigError, DataError, format_problems
from .config import TrainConfig
from .scan import DatasetSummary, ImageRecord
from .step import derive_seed

__all__ = [
    "BucketBatchSampler",
    "BucketChoice",
    "BucketSettings",
    "assign_bucket",
    "assign_records",
    "bucket_resolutions",
    "bucket_table",
    "check_buckets",
    "count_batches",
    "record_size",
]

_LISTED = 10  # images named per problem in an error


@dataclass(frozen=True)
class BucketSettings:
    """A run's resolved bucket settings (pixels): `resolution` (the square side the buckets' area comes
    from), `min_reso` / `max_reso` (the smallest and largest bucket side), `steps` (bucket sides are its
    multiples) and `no_upscale` (kohya's `bucket_no_upscale`)."""

    resolution: int
    min_reso: int
    max_reso: int
    steps: int
    no_upscale: bool = False

    @property
    def area(self) -> int:
        """The pixels of a bucket, at most: `resolution²`."""
        return self.resolution * self.resolution

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> BucketSettings:
        """The bucket settings of `cfg` (its `resolution` already resolved). Unset `min_bucket_reso` /
        `max_bucket_reso` are `resolution / 2` and `2 x resolution`, rounded down / up to a multiple of
        `bucket_reso_steps`; values that are set are used as given and must fit.

        Raises:
            ConfigError: `resolution` is unset, or the settings do not fit together (a side that is not a
                multiple of `bucket_reso_steps`, `min_bucket_reso` above `resolution`, `max_bucket_reso`
                below it, `resolution` smaller than `bucket_reso_steps`); the message names the settings and
                the values that would work.
        """
        resolution, steps = cfg.resolution, cfg.bucket_reso_steps
        if resolution is None:
            raise ConfigError("enable_bucket needs a resolution; set resolution (e.g. 512 for SD1.x)")
        if resolution < steps:
            raise ConfigError(
                f"resolution = {resolution} is smaller than bucket_reso_steps = {steps}: no bucket fits; set "
                f"bucket_reso_steps to a multiple of 8 up to {resolution // 8 * 8}"
            )
        min_reso = cfg.min_bucket_reso
        if min_reso is None:
            min_reso = max(steps, resolution // 2 // steps * steps)
        max_reso = cfg.max_bucket_reso
        if max_reso is None:
            max_reso = math.ceil(2 * resolution / steps) * steps
        for name, value in (("min_bucket_reso", min_reso), ("max_bucket_reso", max_reso)):
            if value % steps:
                below, above = max(steps, value // steps * steps), value // steps * steps + steps
                raise ConfigError(
                    f"{name} = {value} is not a multiple of bucket_reso_steps = {steps} (bucket sides are); "
                    f"use {below} or {above}, or change bucket_reso_steps"
                )
        if min_reso > resolution:
            raise ConfigError(
                f"min_bucket_reso = {min_reso} is larger than resolution = {resolution} (kohya's rule: the "
                f"square bucket must fit); lower min_bucket_reso to at most {resolution // steps * steps}"
            )
        if max_reso < resolution:
            raise ConfigError(
                f"max_bucket_reso = {max_reso} is smaller than resolution = {resolution} (kohya's rule: the "
                f"square bucket must fit); raise max_bucket_reso to at least {math.ceil(resolution / steps) * steps}"
            )
        return cls(resolution, min_reso, max_reso, steps, cfg.bucket_no_upscale)

    def describe(self) -> str:
        """One line: where the buckets come from."""
        if self.no_upscale:
            return (
                f"bucket_no_upscale: each image's own size (shrunk to at most {self.resolution}x"
                f"{self.resolution} pixels) rounded down to multiples of {self.steps}"
            )
        return (
            f"about {self.resolution}x{self.resolution} pixels, sides {self.min_reso}-{self.max_reso} in steps "
            f"of {self.steps}"
        )


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    """The buckets `(width, height)` in pixels, sorted: kohya's `make_bucket_resolutions`.

    The square bucket (side `resolution` rounded down to `steps`), then for each width from `min_reso` to
    `max_reso` in `steps`, the largest height in `steps` whose area stays within `resolution²` (at most
    `max_reso`), kept when it is at least `min_reso`, with its transpose.
    """
    area = resolution * resolution
    side = int(math.sqrt(area) // steps) * steps
    found = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, area // width // steps * steps)
        if height >= min_reso:
            found.update({(width, height), (height, width)})
    return sorted(found)


@dataclass(frozen=True)
class BucketChoice:
    """Where one image trains: its `bucket` (width, height) and `resized` (width, height), the size it is
    resized to before the crop to the bucket (covers the bucket; kohya's `resized_size`)."""

    bucket: tuple[int, int]
    resized: tuple[int, int]


def _round_to_steps(x: float, steps: int) -> int:
    # kohya's BucketManager.round_to_steps: nearest integer, then down to a multiple of steps.
    rounded = int(x + 0.5)
    return rounded - rounded % steps


def _no_upscale_choice(width: int, height: int, settings: BucketSettings) -> BucketChoice:
    """kohya's `select_bucket` with `no_upscale`: shrink an image of more than `resolution²` pixels to about
    that area (rounding the side that keeps the aspect ratio best to the steps), then the bucket is the
    (resized) size rounded down to the steps: the image is cropped by less than one step, never enlarged."""
    aspect = width / height
    if width * height > settings.area:
        resized_width = math.sqrt(settings.area * aspect)
        resized_height = settings.area / resized_width
        width_rounded = _round_to_steps(resized_width, settings.steps)
        height_in_wr = _round_to_steps(width_rounded / aspect, settings.steps)
        height_rounded = _round_to_steps(resized_height, settings.steps)
        width_in_hr = _round_to_steps(height_rounded * aspect, settings.steps)
        error_w = abs(width_rounded / height_in_wr - aspect) if height_in_wr else math.inf
        error_h = abs(width_in_hr / height_rounded - aspect) if height_rounded else math.inf
        if error_w < error_h:
            resized = (width_rounded, int(width_rounded / aspect + 0.5))
        else:
            resized = (int(height_rounded * aspect + 0.5), height_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % settings.steps, resized[1] - resized[1] % settings.steps)
    if min(bucket) == 0:
        raise DataError(
            f"an image of {width}x{height} pixels gets no bucket with bucket_no_upscale: a side is shorter "
            f"than bucket_reso_steps = {settings.steps} after the resize (to {resized[0]}x{resized[1]}); "
            "turn bucket_no_upscale off, lower bucket_reso_steps, or leave the image out"
        )
    return BucketChoice(bucket, resized)


def assign_bucket(
    size: tuple[int, int], settings: BucketSettings, resolutions: Sequence[tuple[int, int]] | None = None
) -> BucketChoice:
    """The bucket of an image of `size` (width, height) in pixels: kohya's `BucketManager.select_bucket`.

    Without `no_upscale`: the image's own size when it is a bucket, else the bucket of `resolutions` (default
    `bucket_resolutions` of `settings`) whose aspect ratio (width / height) is nearest the image's (the first
    in sorted order on a tie); resized so that it covers the bucket (scale = max(bucket w / w, bucket h / h),
    sides rounded half up). With `no_upscale`, see `_no_upscale_choice`.

    Raises:
        DataError: with `no_upscale`, the image is so narrow that a side is shorter than the steps.
    """
    width, height = size
    if settings.no_upscale:
        return _no_upscale_choice(width, height, settings)
    if resolutions is None:
        resolutions = bucket_resolutions(
            settings.resolution, settings.min_reso, settings.max_reso, settings.steps
        )
    aspect = width / height
    if (width, height) in resolutions:
        bucket = (width, height)
    else:
        bucket = min(resolutions, key=lambda b: abs(b[0] / b[1] - aspect))
    # The side the image is relatively shorter on fits the bucket exactly; the other overhangs (kohya).
    scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
    resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    return BucketChoice(bucket, resized)


def record_size(record: ImageRecord) -> tuple[int, int]:
    """`record.size` (width, height) as the scan found it; a record built by hand ((0, 0)) is read to find it.

    Raises:
        DataError: the image of a hand-built record cannot be read (see `images.ImageReader.inspect`).
    """
    if record.size != (0, 0):
        return record.size
    return record.reader.inspect(record.path).size


def assign_records(
    records: Sequence[ImageRecord],
    settings: BucketSettings,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[BucketChoice]:
    """`assign_bucket` of each record's image, in order; `sizes` (width, height) per record, default
    `record_size` of each.

    Raises:
        DataError: images that get no bucket (with `no_upscale`, a side shorter than the steps), every one
            named, with the fixes.
    """
    resolutions = bucket_resolutions(
        settings.resolution, settings.min_reso, settings.max_reso, settings.steps
    )
    if sizes is None:
        sizes = [record_size(r) for r in records]
    choices, problems = [], []
    for record, size in zip(records, sizes):
        try:
            choices.append(assign_bucket(size, settings, resolutions))
        except DataError as exc:
            problems.append(f"{record.path}: {exc}")
    if problems:
        raise DataError(
            format_problems(
                "Some images cannot be put in a bucket:", [("images with no bucket", problems)], shown=_LISTED
            )
        )
    return choices


def check_buckets(cfg: TrainConfig, summary: DatasetSummary) -> None:
    """Before any model is loaded: with `enable_bucket`, check the bucket settings and that every image of
    `summary` (regularization images included) gets a bucket; nothing without it.

    Raises:
        ConfigError: as `BucketSettings.from_config`.
        DataError: as `assign_records`.
    """
    if cfg.enable_bucket:
        assign_records(summary.epoch_records, BucketSettings.from_config(cfg))


class BucketBatchSampler(Sampler):
    """Batches of `(epoch, sample index)` keys whose samples share one bucket; `set_position(epoch)` picks the
    epoch whose order the next iteration serves.

    Each epoch (a generator seeded by `(seed, "buckets", epoch)`): each bucket's samples shuffled (buckets in
    sorted order), cut into batches of `samples_per_batch` (the last of a bucket possibly smaller, kohya), then
    all batches shuffled. Independent of global RNG state, so the order survives resume and is the same in
    every process. Under `accelerate.prepare` each process takes every n-th batch (`BatchSamplerShard`); the
    batch size is deliberately not exposed as `batch_size`, so that accelerate pads an uneven last round with
    whole batches from the start of the epoch instead of filling a short batch with samples of other buckets.
    """

    def __init__(
        self, sample_buckets: Sequence[Hashable], samples_per_batch: int, *, seed: int, shuffle: bool = True
    ) -> None:
        self.sample_buckets = list(sample_buckets)
        self.samples_per_batch = samples_per_batch
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        members: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(self.sample_buckets):
            members.setdefault(bucket, []).append(index)
        self.buckets = {bucket: members[bucket] for bucket in sorted(members)}

    def set_position(self, epoch: int) -> None:
        """Serve the order of `epoch` on the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(m) / self.samples_per_batch) for m in self.buckets.values())

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch` as lists of sample indices, in the order they are served."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "buckets", epoch))
        batches = []
        for members in self.buckets.values():
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            size = self.samples_per_batch
            batches += [members[i : i + size] for i in range(0, len(members), size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        return iter([[(epoch, i) for i in batch] for batch in self.batches(epoch)])


def count_batches(cfg: TrainConfig, records: Sequence[ImageRecord]) -> int:
    """Batches per epoch over all processes of `records` in buckets: the sum over buckets of
    ceil(samples / `cfg.train_batch_size`) (what `BucketBatchSampler` yields).

    Raises:
        ConfigError: as `BucketSettings.from_config`.
        DataError: as `assign_records`.
    """
    samples: Counter = Counter()
    for record, choice in zip(records, assign_records(records, BucketSettings.from_config(cfg))):
        samples[choice.bucket] += record.repeats
    return sum(math.ceil(n / cfg.train_batch_size) for n in samples.values())


def bucket_table(cfg: TrainConfig, records: Sequence[ImageRecord]) -> str:
    """The dry run's bucket table of `records` (the epoch's records, regularization included): per bucket
    used (width x height), its images, samples per epoch (kohya repeats counted) and batches of
    `cfg.train_batch_size`, then the totals and the mean aspect-ratio change of the crops.

    Raises:
        ConfigError: as `BucketSettings.from_config`.
        DataError: as `assign_records`.
    """
    settings = BucketSettings.from_config(cfg)
    sizes = [record_size(r) for r in records]
    choices = assign_records(records, settings, sizes)
    images: Counter = Counter(c.bucket for c in choices)
    samples: Counter = Counter()
    for record, choice in zip(records, choices):
        samples[choice.bucket] += record.repeats
    batch = cfg.train_batch_size
    available = ""
    if not settings.no_upscale:
        every = bucket_resolutions(settings.resolution, settings.min_reso, settings.max_reso, settings.steps)
        available = f", {len(images)} used of {len(every)}"
    lines = [
        f"Buckets ({settings.describe()}{available}):",
        f"  {'bucket (WxH)':<14} {'images':>7} {'samples/epoch':>14} {'batches':>8}",
    ]
    total_batches = 0
    for bucket in sorted(images):
        batches = math.ceil(samples[bucket] / batch)
        total_batches += batches
        name = f"{bucket[0]}x{bucket[1]}"
        lines.append(f"  {name:<14} {images[bucket]:>7} {samples[bucket]:>14} {batches:>8}")
    lines.append(f"  {'total':<14} {len(choices):>7} {sum(samples.values()):>14} {total_batches:>8}")
    errors = [abs(c.bucket[0] / c.bucket[1] - w / h) for c, (w, h) in zip(choices, sizes)]
    lines.append(
        f"  mean aspect-ratio change (bucket vs image, width/height): {sum(errors) / len(errors):.3f}"
    )
    return "\n".join(lines)
