"""The up-front check of the training data: find every captioned image, decode it fully, read its caption, and
report what was found and everything left out, before any model is loaded.

Layouts of `train_data_dir` (checked in this order):

* **imagefolder**: a `metadata.jsonl` with one `{"file_name": ..., "text": ...}` object per line (diffusers);
* **kohya**: sub-folders named `<repeats>_<concept>` (e.g. `10_sks dog`), each with images and captions; every
  image is seen `repeats` times per epoch;
* **flat**: images with a same-name caption file (`cat.png` + `cat.txt`).

An image is any file whose extension the installed Pillow opens (`images.IMAGE_EXTENSIONS`). Every image is
decoded in full by the one reader training uses (`images.ImageReader`), in a few threads, results in file
order. Nothing is dropped without a word: a skipped image, a caption whose image has a format Pillow cannot
open, a caption without an image, an image `metadata.jsonl` does not name, a folder that is not searched and
a hidden file are all listed in the summary (`DatasetSummary.report`) and logged.

Regularization images (`reg_data_dir`, kohya's prior preservation) are scanned the same way, with the same
layouts, repeats and caption rules, into `DatasetSummary.regularization`; `interleave_regularization` is kohya's
rule for how many of their samples an epoch holds (`DatasetSummary.epoch_records`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DataError, format_problems
from .cache_store import DEFAULT_CACHE_FOLDER
from .caption_tools import CaptionOptions, with_prefix_suffix
from .captions import caption_token_counts, read_caption_file, read_metadata
from .config import TrainConfig, parse_color
from .images import DEFAULT_READER, ImageFacts, ImageReader, is_accepted_image

logger = logging.getLogger(__name__)

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
CROP_LOSS_REPORTED = 0.25  # images losing more than this fraction of their area to the square crop are named
SHOWN = 3  # files named per line of the report
_LISTED = 10  # problems listed per group in an error


@dataclass(frozen=True)
class ImageRecord:
    """One training image: its file, caption, how often it is seen per epoch (kohya repeats), the reader
    that checked it (training and validation read it the same way), its `size` (width, height) in pixels
    after the EXIF orientation as the scan found it ((0, 0) when not known: records built by hand), and
    whether it is a regularization image (`is_reg`, kohya's prior preservation: weighted by
    `prior_loss_weight`)."""

    path: Path
    caption: str
    repeats: int = 1
    reader: ImageReader = DEFAULT_READER
    size: tuple[int, int] = (0, 0)
    is_reg: bool = False


@dataclass
class _Candidate:
    """An image found by a layout, not yet opened; `caption` None when missing, `caption_error` when unreadable."""

    path: Path
    caption: str | None
    repeats: int
    missing: str  # what a missing caption means here, for messages
    caption_error: str | None = None
    concept: str | None = None  # the kohya folder's concept (on_missing_caption = "folder_name")


@dataclass(frozen=True)
class DatasetSummary:
    """What `scan_dataset` found: the layout, the usable images, what was left out and why, and facts worth
    knowing before training (formats, modes, transparency, small images, crop losses, long captions).

    Sizes are in pixels, `crop_losses` are fractions of the image area (0-1), caption lengths are tokens."""

    root: Path
    layout: str  # "imagefolder" | "kohya" | "flat"
    records: tuple[ImageRecord, ...]
    skipped: tuple[str, ...]  # "<file>: <reason>" for every image left out under a skip rule
    small_images: int  # images smaller than the training resolution (they get upscaled)
    ignored: tuple[
        str, ...
    ] = ()  # "<file>: <reason>" for files not used that are not images (or not accepted)
    formats: dict[str, int] = field(default_factory=dict)  # Pillow format -> images used
    modes: dict[str, int] = field(default_factory=dict)  # Pillow mode as stored -> images used
    transparent: tuple[Path, ...] = ()  # images with some non-opaque pixel (composited onto the background)
    animated: tuple[Path, ...] = ()  # images with several frames (the first is used)
    smallest: tuple[tuple[Path, int, int], ...] = ()  # (image, width, height) of small images, smallest first
    crop_losses: tuple[tuple[Path, float], ...] = ()  # images losing > CROP_LOSS_REPORTED, worst first
    folder_captions: int = 0  # images captioned with their kohya folder's concept
    # The caption-length limit in tokens (None: caption lengths were not checked): the text encoder's
    # `model_max_length` with start and end tokens counted, or `max_token_length` without them (kohya's count).
    token_limit: int | None = None
    long_captions: tuple[tuple[Path, int], ...] = ()  # (image, tokens) over `token_limit`, longest first
    max_token_length: int | None = None  # set when `token_limit` is `max_token_length`
    resolution: int = 0
    background: tuple[int, int, int] = (255, 255, 255)
    regularization: DatasetSummary | None = None  # the scan of `reg_data_dir` (records with `is_reg`)
    marker_captions: tuple[Path, ...] = ()  # captions with keep_tokens_separator, passed on as written
    prior_loss_weight: float = 1.0  # the loss weight of regularization samples (shown with them)

    @property
    def epoch_records(self) -> tuple[ImageRecord, ...]:
        """The records one epoch draws from: `records`, then the regularization records with kohya's repeats
        (`interleave_regularization`); `records` when there are no regularization images."""
        if self.regularization is None:
            return self.records
        return interleave_regularization(self.records, self.regularization.records)

    @property
    def num_train_samples(self) -> int:
        """Samples per epoch of `records` (images times repeats; regularization samples not counted)."""
        return sum(r.repeats for r in self.records)

    @property
    def num_reg_samples(self) -> int:
        """Regularization samples per epoch (kohya's rule, `interleave_regularization`); 0 without them."""
        if self.regularization is None:
            return 0
        return sum(r.repeats for r in self.epoch_records if r.is_reg)

    @property
    def num_samples(self) -> int:
        """Samples per epoch: images times repeats, regularization samples included."""
        return self.num_train_samples + self.num_reg_samples

    def describe(self) -> str:
        """One line for logs and the dry-run plan (training and regularization images and samples)."""
        reg = self.regularization
        text = f"{_count(len(self.records), 'image')} ({self.layout} layout in {self.root})"
        if reg is None:
            text += f", {_count(self.num_samples, 'sample')} per epoch"
        else:
            text += (
                f" + {_count(len(reg.records), 'regularization image')} ({reg.layout} layout in {reg.root}), "
                f"{self.num_train_samples} training + {self.num_reg_samples} regularization = "
                f"{_count(self.num_samples, 'sample')} per epoch"
            )
        skipped = len(self.skipped) + (len(reg.skipped) if reg is not None else 0)
        if skipped:
            text += f", {skipped} skipped"
        return text

    def _name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def _names(self, paths: Sequence[Path], shown: int) -> str:
        return _first(self._name(p) for p in paths[:shown]) + _more(len(paths), shown)

    def _entries(self, entries: Sequence[str], shown: int) -> str:
        """'<file>: <reason> (<details>); <fix>' entries as 'file (reason)', paths relative to the root."""
        short = []
        for entry in entries[:shown]:
            path, _, reason = entry.partition(": ")
            reason = re.split(r" \(|; ", reason, maxsplit=1)[0]
            short.append(f"{self._name(Path(path))} ({reason})")
        return _first(short) + _more(len(entries), shown)

    def facts(self, shown: int = SHOWN) -> list[str]:
        """Lines of what the data is: formats, modes, transparency, animations, kohya folder captions."""

        def counts(counter: dict[str, int]) -> str:
            return ", ".join(f"{k} {n}" for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

        lines = [f"formats: {counts(self.formats)}; modes: {counts(self.modes)}"] if self.formats else []
        if self.transparent:
            color = "#{:02x}{:02x}{:02x}".format(*self.background)
            lines.append(
                f"{_count(len(self.transparent), 'image has', 'images have')} transparency, composited onto "
                f"{color} (background_color): {self._names(self.transparent, shown)}"
            )
        if self.animated:
            lines.append(
                f"{_count(len(self.animated), 'animated image')}, first frame used: "
                f"{self._names(self.animated, shown)}"
            )
        if self.folder_captions:
            has = ("image has no caption and uses its", "images have no caption and use their")
            lines.append(
                f"{_count(self.folder_captions, *has)} kohya folder's concept (on_missing_caption = 'folder_name')"
            )
        reg = self.regularization
        if reg is not None:
            used = [r for r in self.epoch_records if r.is_reg]
            lines.append(
                f"regularization: {_count(len(used), 'image')} used, {self.num_reg_samples} samples per epoch "
                f"(kohya: their repeats grow in turn until they match the {self.num_train_samples} training "
                f"samples), loss weight {self.prior_loss_weight:g} (prior_loss_weight)"
            )
            lines += [f"regularization: {line}" for line in reg.facts(shown)]
        return lines

    def warnings(self, shown: int = SHOWN) -> list[str]:
        """Lines of what may hurt training or was left out, each naming the first or worst `shown` files."""
        lines = []
        if self.skipped:
            lines.append(
                f"{_count(len(self.skipped), 'image')} skipped: {self._entries(self.skipped, shown)}"
            )
        if self.ignored:
            lines.append(
                f"{_count(len(self.ignored), 'file')} not used: {self._entries(self.ignored, shown)}"
            )
        if self.smallest:
            worst = _first(f"{self._name(p)} {w}x{h}" for p, w, h in self.smallest[:shown])
            lines.append(
                f"{_count(self.small_images, 'image is', 'images are')} smaller than resolution "
                f"{self.resolution} and will be upscaled, smallest: {worst}{_more(len(self.smallest), shown)}"
            )
        if self.crop_losses:
            worst = _first(f"{self._name(p)} {loss:.0%}" for p, loss in self.crop_losses[:shown])
            lines.append(
                f"{_count(len(self.crop_losses), 'image loses', 'images lose')} more than "
                f"{CROP_LOSS_REPORTED:.0%} of the area to the square crop, worst: {worst}"
                f"{_more(len(self.crop_losses), shown)}"
            )
        if self.long_captions:
            worst = _first(f"{self._name(p)} {n} tokens" for p, n in self.long_captions[:shown])
            limit = (
                f"the text encoder's {self.token_limit} tokens"
                if self.max_token_length is None
                else f"max_token_length = {self.token_limit} tokens (start and end tokens not counted)"
            )
            lines.append(
                f"{_count(len(self.long_captions), 'caption is', 'captions are')} longer than "
                f"{limit} and cut there (later words are not trained), longest: "
                f"{worst}{_more(len(self.long_captions), shown)}"
            )
        if self.marker_captions:
            lines.append(
                f"{_count(len(self.marker_captions), 'caption holds', 'captions hold')} keep_tokens_separator, "
                "which takes effect only with shuffle_caption or caption_tag_dropout_rate (as in kohya): the "
                f"marker reaches the text encoder as written: {self._names(self.marker_captions, shown)}"
            )
        return lines + self._reg_warnings(shown)

    def _reg_warnings(self, shown: int) -> list[str]:
        reg = self.regularization
        if reg is None:
            return []
        lines = [f"regularization images: {line}" for line in reg.warnings(shown)]
        unused = len(reg.records) - sum(1 for r in self.epoch_records if r.is_reg)
        if unused:
            lines.append(
                f"{_count(unused, 'regularization image is', 'regularization images are')} not used: "
                f"{reg.num_samples} regularization samples for {self.num_train_samples} training samples "
                "(kohya uses the first ones in folder order until they match)"
            )
        return lines

    def report(self, shown: int = SHOWN) -> str:
        """The scan as text: `describe()`, then the facts and warnings, one indented line each."""
        lines = self.facts(shown) + self.warnings(shown)
        return "\n".join([self.describe()] + [f"  {line}" for line in lines])


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _first(items) -> str:
    return ", ".join(items)


def _more(total: int, shown: int) -> str:
    return f", ... ({total - shown} more)" if total > shown else ""


def interleave_regularization(
    train_records: Sequence[ImageRecord], reg_records: Sequence[ImageRecord]
) -> tuple[ImageRecord, ...]:
    """The records of an epoch with regularization images: `train_records` as they are, then the regularization
    records with kohya's repeats (`DreamBoothDataset.__init__`, library/train_util.py).

    kohya's rule: with T training samples (images times repeats), the regularization images are taken in
    order, each with its own repeats, until their samples reach T; if all are taken before that, each gets one
    more repeat in turn, from the first, until they reach T. So 3 images x 10 repeats and 2 regularization
    images x 1 give each regularization image 15 repeats; with more regularization samples than T the last
    ones are not used (and the last one used keeps its full repeats, so the count may pass T, as in kohya).
    The samples are mixed by the epoch's shuffle, as in kohya. Returned records have `is_reg=True`;
    without `reg_records` (kohya only warns then) the result is `train_records`.
    """
    train = tuple(train_records)
    if not reg_records:
        return train
    target = sum(r.repeats for r in train)
    repeats: list[int] = []
    taken, first_loop = 0, True
    while taken < target:
        for i, record in enumerate(reg_records):
            if first_loop:
                repeats.append(record.repeats)
                taken += record.repeats
            else:
                repeats[i] += 1
                taken += 1
            if taken >= target:
                break
        first_loop = False
    return train + tuple(replace(record, repeats=n, is_reg=True) for record, n in zip(reg_records, repeats))


def _listing(folder: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Sorted visible files and sub-folders of `folder`, and notes for the hidden entries (names starting with
    '.', such as macOS '._photo.png' resource forks), which are not used. The default cache folder
    (`.loha_cache`, the latent and text caches) is passed by without a note: it is the trainer's own."""
    files, dirs, notes = [], [], []
    for entry in sorted(folder.iterdir()):
        if entry.name == DEFAULT_CACHE_FOLDER and entry.is_dir():
            continue
        if entry.name.startswith("."):
            notes.append(f"{entry}: hidden (its name starts with '.')")
        elif entry.is_dir():
            dirs.append(entry)
        else:
            files.append(entry)  # broken links too: they are reported as missing images
    return files, dirs, notes


def _caption_candidate(image: Path, caption_file: Path, repeats: int, concept: str | None) -> _Candidate:
    candidate = _Candidate(image, None, repeats, f"no caption file {caption_file.name}", concept=concept)
    try:
        candidate.caption = read_caption_file(caption_file)
    except DataError as exc:
        candidate.caption_error = str(exc)
    if candidate.caption is None and candidate.caption_error is None and caption_file.is_file():
        candidate.missing = f"caption file {caption_file.name} is empty"
    return candidate


def _folder_candidates(
    folder: Path, caption_extension: str, repeats: int, concept: str | None, notes: list[str]
) -> list[_Candidate]:
    """Images of one folder (flat layout or a kohya concept folder); what else is in it goes to `notes`.

    A caption file is `<image stem><caption_extension>`, the extension in any case (`a.png` + `a.TXT`)."""
    files, dirs, hidden = _listing(folder)
    notes += hidden
    notes += [f"{d}: sub-folder, not searched (put its images directly in {folder})" for d in dirs]
    is_caption = [p.suffix.lower() == caption_extension.lower() for p in files]
    captions: dict[str, Path] = {}
    for p, caption in zip(files, is_caption):
        if caption and (p.stem not in captions or p.suffix == caption_extension):
            captions[p.stem] = p
    images = [p for p, caption in zip(files, is_caption) if not caption and is_accepted_image(p)]
    others = [p for p, caption in zip(files, is_caption) if not caption and not is_accepted_image(p)]
    image_stems = {p.stem for p in images}
    for p in others:
        if p.stem in captions and p.stem not in image_stems:
            notes.append(
                f"{p}: {p.suffix or 'a file without extension'} is not an image format this Pillow opens, so "
                f"its caption {captions[p.stem].name} is not used; convert it to PNG or JPEG"
            )
        else:
            notes.append(f"{p}: not an image format this Pillow opens")
    other_stems = {p.stem for p in others}
    notes += [
        f"{c}: caption without an image"
        for stem, c in captions.items()
        if stem not in image_stems and stem not in other_stems
    ]
    return [
        _caption_candidate(p, captions.get(p.stem, p.with_suffix(caption_extension)), repeats, concept)
        for p in images
    ]


def _imagefolder_candidates(
    root: Path, image_column: str, caption_column: str, notes: list[str]
) -> list[_Candidate]:
    rows = read_metadata(root, image_column, caption_column)
    named = {os.path.normpath(row.path) for row in rows}
    for path in sorted(root.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if not hidden and is_accepted_image(path) and os.path.normpath(path) not in named:
            notes.append(f"{path}: not named in metadata.jsonl")
    return [
        _Candidate(row.path, row.caption, 1, f"no {caption_column!r} in metadata.jsonl line {row.line}")
        for row in rows
    ]


def _kohya_candidates(
    root: Path, concept_dirs: list[Path], caption_extension: str, notes: list[str]
) -> list[_Candidate]:
    files, dirs, hidden = _listing(root)
    notes += hidden
    stray = [p.name for p in files if is_accepted_image(p)]
    if stray:
        raise DataError(
            f"{root} has kohya '<repeats>_<concept>' folders and also images directly inside it "
            f"({', '.join(stray[:5])}); move those images into a folder such as {root / '1_extra'}"
        )
    notes += [f"{d}: folder not named '<repeats>_<concept>'" for d in dirs if d not in concept_dirs]
    notes += [f"{p}: not in a '<repeats>_<concept>' folder" for p in files]
    found = []
    for folder in concept_dirs:
        match = KOHYA_FOLDER.match(folder.name)
        repeats, concept = int(match.group(1)), match.group(2)
        if repeats < 1:
            raise DataError(f"{folder}: the repeat count in the folder name must be >= 1")
        found += _folder_candidates(folder, caption_extension, repeats, concept, notes)
    return found


def _candidates(
    root: Path, caption_extension: str, image_column: str, caption_column: str, notes: list[str]
) -> tuple[str, list[_Candidate]]:
    """The layout of `root` and its images, not yet opened; what is not used goes to `notes`."""
    if (root / "metadata.jsonl").is_file():
        return "imagefolder", _imagefolder_candidates(root, image_column, caption_column, notes)
    concept_dirs = sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and KOHYA_FOLDER.match(p.name)
    )
    if concept_dirs:
        return "kohya", _kohya_candidates(root, concept_dirs, caption_extension, notes)
    candidates = _folder_candidates(root, caption_extension, 1, None, notes)
    if KOHYA_FOLDER.match(root.name) and candidates:
        logger.warning(
            "%s looks like a kohya '<repeats>_<concept>' folder; its repeat count applies only when "
            "train_data_dir is its parent folder. Using each image once per epoch.",
            root,
        )
    return "flat", candidates


def inspect_images(
    reader: ImageReader, paths: Sequence[Path], workers: int | None = None
) -> list[ImageFacts | str]:
    """Decode every image fully with `reader`, in `workers` threads (default: one per CPU, at most 8); returns,
    in the order of `paths`, each image's `ImageFacts` or the message of why it cannot be used."""

    def one(path: Path) -> ImageFacts | str:
        try:
            return reader.inspect(path)
        except DataError as exc:
            return str(exc)

    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1 or len(paths) < 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
        return list(pool.map(one, paths))


def _classify(
    candidates: Sequence[_Candidate],
    facts: Sequence[ImageFacts | str],
    layout: str,
    on_missing_caption: str,
    reader: ImageReader,
) -> tuple[list[tuple[ImageRecord, ImageFacts]], dict[str, list[str]], int]:
    """Usable (record, facts) pairs; the problems by kind ("image", "caption", "missing"); how many images
    got their kohya folder's concept as caption."""
    used, problems = [], {"image": [], "caption": [], "missing": []}
    folder_captions = 0
    for candidate, found in zip(candidates, facts):
        if isinstance(found, str):
            problems["image"].append(found)
            continue
        if candidate.caption_error is not None:
            problems["caption"].append(candidate.caption_error)
            continue
        caption = candidate.caption
        if caption is None and on_missing_caption == "folder_name" and layout == "kohya":
            caption, folder_captions = candidate.concept, folder_captions + 1
        if caption is None:
            problems["missing"].append(f"{candidate.path}: {candidate.missing}")
            continue
        used.append((ImageRecord(candidate.path, caption, candidate.repeats, reader, found.size), found))
    return used, problems, folder_captions


def _check_problems(
    root: Path,
    layout: str,
    problems: dict[str, list[str]],
    on_bad_image: str,
    on_missing_caption: str,
    what: str = "training data",
) -> list[str]:
    """The problems skipped under the skip rules, as "<file>: <reason>" lines.

    Raises:
        DataError: one message listing every problem a rule says to stop for, with the fixes.
    """
    missing_is_error = on_missing_caption == "error" or (
        on_missing_caption == "folder_name" and layout != "kohya"
    )
    stop = [
        ("unreadable images (fix or remove them, or set on_bad_image = 'skip')", problems["image"]),
        ("unreadable caption files (fix them, or set on_bad_image = 'skip')", problems["caption"]),
    ]
    if on_bad_image != "error":
        stop = []
    if missing_is_error:
        fix = "write the caption files, or set on_missing_caption = 'skip'" + (
            " or 'folder_name'" if layout == "kohya" else ""
        )
        stop.append((f"images have no caption ({fix})", problems["missing"]))
    if any(items for _, items in stop):
        raise DataError(
            format_problems(f"The {what} in {root} cannot be used as it is:", stop, shown=_LISTED)
        )
    skipped = [] if on_bad_image == "error" else problems["image"] + problems["caption"]
    return skipped + ([] if missing_is_error else problems["missing"])


def _long_captions(
    records: Sequence[ImageRecord],
    tokenizer: Any,
    max_token_length: int | None,
    options: CaptionOptions,
) -> tuple[int | None, tuple[tuple[Path, int], ...]]:
    """The token limit and the (image, tokens) of captions over it, longest first. Captions are measured with
    the prefix and suffix they train with. Without `max_token_length` the limit is the tokenizer's
    `model_max_length` with start and end tokens counted (77 for CLIP); with it, `max_token_length` tokens of
    text, start and end tokens not counted (kohya's count: 75, 150 or 225)."""
    if tokenizer is None:
        return None, ()
    counts = caption_token_counts(tokenizer, [with_prefix_suffix(r.caption, options) for r in records])
    if max_token_length is None:
        limit = int(tokenizer.model_max_length)
    else:
        special = int(tokenizer.num_special_tokens_to_add())  # CLIP: start and end, 2
        limit, counts = max_token_length, [n - special for n in counts]
    long = [(r.path, n) for r, n in zip(records, counts) if n > limit]
    return limit, tuple(sorted(long, key=lambda x: -x[1]))


def _marker_captions(records: Sequence[ImageRecord], options: CaptionOptions) -> tuple[Path, ...]:
    """Images whose caption holds `keep_tokens_separator` while the caption tools that read it are off."""
    marker = options.keep_tokens_separator
    if not marker or options.changes_per_step:
        return ()
    return tuple(r.path for r in records if marker in with_prefix_suffix(r.caption, options))


def _summary(
    root: Path,
    layout: str,
    used: Sequence[tuple[ImageRecord, ImageFacts]],
    resolution: int,
    reader: ImageReader,
    *,
    square_crop: bool = True,
    upscale: bool = True,
    **extra: Any,
) -> DatasetSummary:
    """The `DatasetSummary` of the usable images (`extra`: the remaining fields); the crop losses only for a
    `square_crop`, the small images only when they are upscaled."""
    small = sorted(
        ((r.path, *f.size) for r, f in used if upscale and min(f.size) < resolution),
        key=lambda x: min(x[1], x[2]),
    )
    losses = [(r.path, 1 - min(f.size) / max(f.size)) for r, f in used if square_crop]
    return DatasetSummary(
        root=root,
        layout=layout,
        records=tuple(r for r, _ in used),
        small_images=len(small),
        formats=dict(Counter(f.format for _, f in used)),
        modes=dict(Counter(f.mode for _, f in used)),
        transparent=tuple(r.path for r, f in used if f.transparent),
        animated=tuple(r.path for r, f in used if f.animated),
        smallest=tuple(small),
        crop_losses=tuple(sorted(((p, x) for p, x in losses if x > CROP_LOSS_REPORTED), key=lambda x: -x[1])),
        resolution=resolution,
        background=reader.background_color,
        **extra,
    )


def scan_dataset(
    root: str | Path,
    *,
    resolution: int,
    caption_extension: str = ".txt",
    image_column: str = "file_name",
    caption_column: str = "text",
    on_missing_caption: str = "error",
    on_bad_image: str = "error",
    reader: ImageReader = DEFAULT_READER,
    tokenizer: Any = None,
    max_token_length: int | None = None,
    caption_options: CaptionOptions | None = None,
    is_reg: bool = False,
    square_crop: bool = True,
    upscale: bool = True,
    log: bool = True,
    workers: int | None = None,
) -> DatasetSummary:
    """Find and check every training image under `root` before training starts.

    Every image is decoded in full by `reader` (the reader training uses; `workers` threads) and every caption
    read (UTF-8, see `captions.py`). `on_missing_caption` / `on_bad_image` = `"skip"` leave images without a
    caption / with an unreadable image or caption file out, listed in the summary's `skipped`;
    `on_missing_caption="folder_name"` uses the kohya folder's concept (`10_sks dog` -> `sks dog`) as the
    caption. A caption of only whitespace is missing. With a `tokenizer` (transformers, e.g. the base model's
    `CLIPTokenizer`) captions (with `caption_options`' prefix and suffix) longer than its `model_max_length`,
    or than `max_token_length` tokens of text when set (kohya's 75/150/225), are reported. `is_reg`: `root` is
    `reg_data_dir` (records get `is_reg=True`, messages name it). `square_crop` False (aspect-ratio buckets:
    each image is cropped to its bucket, and the bucket table reports the aspect-ratio change) leaves out the
    report of what the square crop cuts; `upscale` False (`bucket_no_upscale`) leaves out the report of images
    that would be upscaled. `log` logs the summary's warnings (what was left out, small images, big crops,
    long captions).

    Raises:
        DataError: `root` is missing, `metadata.jsonl` has bad lines (not UTF-8 or JSON, a file outside `root`),
            images or captions are unreadable or captions missing (all of them listed, unless skipped), kohya
            folders and loose images are mixed, or nothing usable is left; the message names the setting
            (train_data_dir or reg_data_dir), the files and the fix.
    """
    root = Path(root)
    setting, what = (
        ("reg_data_dir", "regularization images") if is_reg else ("train_data_dir", "training data")
    )
    if not root.is_dir():
        raise DataError(
            f"{setting} {root} does not exist or is not a folder; check the path"
            + (" or remove reg_data_dir to train without regularization images" if is_reg else "")
        )
    notes: list[str] = []
    layout, candidates = _candidates(root, caption_extension, image_column, caption_column, notes)
    facts = inspect_images(reader, [c.path for c in candidates], workers)
    used, problems, folder_captions = _classify(candidates, facts, layout, on_missing_caption, reader)
    skipped = _check_problems(root, layout, problems, on_bad_image, on_missing_caption, what)
    if not used:
        hint = (
            f"put images (.png, .jpg, .webp, ... any format Pillow opens) with same-name {caption_extension} "
            "captions in it, kohya '<repeats>_<concept>' sub-folders, or a metadata.jsonl"
        )
        left_out = f"; left out: {'; '.join(skipped[:_LISTED])}" if skipped else ""
        kind = "regularization" if is_reg else "training"
        raise DataError(f"no usable {kind} images in {setting} {root}: {hint}{left_out}")
    if is_reg:
        used = [(replace(r, is_reg=True), f) for r, f in used]
    options = caption_options or CaptionOptions()
    records = [r for r, _ in used]
    token_limit, long_captions = _long_captions(records, tokenizer, max_token_length, options)
    summary = _summary(
        root,
        layout,
        used,
        resolution,
        reader,
        square_crop=square_crop,
        upscale=upscale,
        skipped=tuple(skipped),
        ignored=tuple(notes),
        folder_captions=folder_captions,
        token_limit=token_limit,
        long_captions=long_captions,
        max_token_length=max_token_length if token_limit is not None else None,
        marker_captions=_marker_captions(records, options),
    )
    if log:
        for line in summary.warnings(shown=_LISTED):
            logger.warning("%s", line)
    return summary


def image_reader(cfg: TrainConfig) -> ImageReader:
    """The run's `ImageReader`: `cfg.background_color` (already validated) and `cfg.max_image_pixels`."""
    return ImageReader(parse_color(cfg.background_color), cfg.max_image_pixels)


def _check_no_shared_images(train: DatasetSummary, reg: DatasetSummary) -> None:
    """Refuse images that are both training and regularization images (reg_data_dir inside train_data_dir).

    Raises:
        DataError: naming the shared images and both folders.
    """
    train_paths = {os.path.realpath(r.path) for r in train.records}
    shared = [r.path for r in reg.records if os.path.realpath(r.path) in train_paths]
    if shared:
        raise DataError(
            f"{_count(len(shared), 'image is', 'images are')} both a training image (train_data_dir "
            f"{train.root}) and a regularization image (reg_data_dir {reg.root}): "
            f"{_first(str(p) for p in shared[:_LISTED])}{_more(len(shared), _LISTED)}; keep the regularization "
            "images in a folder of their own, outside train_data_dir"
        )


def scan_training_data(cfg: TrainConfig, tokenizer: Any = None, *, log: bool = True) -> DatasetSummary:
    """`scan_dataset` of `cfg.train_data_dir`, and of `cfg.reg_data_dir` when set (its summary is the result's
    `regularization`), with the run's resolution, caption, skip, image and caption-tool settings. The
    regularization folder takes the same layouts, repeats and caption rules as the training folder (kohya's
    usual one: `<repeats>_<class>` folders of uncaptioned images with on_missing_caption = 'folder_name').

    `tokenizer` (the base model's, optional) lets the scan report captions longer than the text encoder reads
    (`cfg.max_token_length` when set).

    Raises:
        DataError: as `scan_dataset` for either folder (the message names the setting, the files and the fix),
            or images are in both folders; both are scanned before any model is loaded.
    """
    settings: dict[str, Any] = dict(
        resolution=cfg.resolution,
        caption_extension=cfg.caption_extension,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        on_missing_caption=cfg.on_missing_caption,
        on_bad_image=cfg.on_bad_image,
        reader=image_reader(cfg),
        tokenizer=tokenizer,
        max_token_length=cfg.max_token_length,
        caption_options=CaptionOptions.from_config(cfg),
        square_crop=not cfg.enable_bucket,
        upscale=not (cfg.enable_bucket and cfg.bucket_no_upscale),
        log=False,
    )
    summary = scan_dataset(cfg.train_data_dir, **settings)
    if cfg.reg_data_dir is not None:
        reg = scan_dataset(cfg.reg_data_dir, is_reg=True, **settings)
        _check_no_shared_images(summary, reg)
        summary = replace(summary, regularization=reg, prior_loss_weight=cfg.prior_loss_weight)
    if log:
        for line in summary.warnings(shown=_LISTED):
            logger.warning("%s", line)
    return summary
