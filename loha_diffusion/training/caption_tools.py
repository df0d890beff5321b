"""Caption tools, kohya sd-scripts' rules: prefix/suffix, kept tags, tag shuffling and tag dropout per sample.

`process_caption(caption, options, generator)` is kohya's `BaseDataset.process_caption` (library/train_util.py)
without its wildcard, token-warmup and textual-inversion parts, in kohya's order:

1. `caption_prefix + " " + caption + " " + caption_suffix` (each only when set and not empty);
2. only when the caption changes per step (`shuffle_caption` or `caption_tag_dropout_rate > 0`): split into tags
   at `caption_separator`, each tag stripped; the fixed tags are the part before `keep_tokens_separator` when
   the caption holds it (a second marker starts a fixed suffix: `fixed ||| shuffled ||| fixed`; empty tags of
   these parts are dropped), else the first `keep_tokens` tags (empty tags kept, as kohya keeps them);
3. the other tags shuffled (`shuffle_caption`), then each dropped with probability `caption_tag_dropout_rate`;
4. joined with ", " (kohya's joiner, whatever the separator): fixed tags, the others, the fixed suffix.

As in kohya, `keep_tokens` and `keep_tokens_separator` act only with shuffling or tag dropout on: without them
the caption (marker included) reaches the text encoder as written. kohya uses only the first line of a
multi-line caption; here the whole caption is used (as before the caption tools existed), newlines being
whitespace to CLIP's tokenizer. The whole-caption dropout (`caption_dropout_rate`) is the dataset's
(`data.py`), drawn from the same per-sample generator.

Every random draw comes from the `torch.Generator` passed in (the dataset seeds it from `(seed, epoch, sample
index)`), so a sample's caption is a function of its seed, whatever the process count or a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig

JOINER = ", "  # kohya joins the processed tags with ", " whatever `caption_separator` is


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of a run (names and defaults of `TrainConfig` and kohya's dataset options).

    `caption_tag_dropout_rate` is a probability in [0, 1); `keep_tokens` counts tags, not text-encoder tokens
    (kohya's name)."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_tag_dropout_rate: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> CaptionOptions:
        """The caption options of `cfg` (already validated: the separator is not empty, rates in [0, 1))."""
        return cls(
            caption_prefix=cfg.caption_prefix,
            caption_suffix=cfg.caption_suffix,
            shuffle_caption=cfg.shuffle_caption,
            caption_separator=cfg.caption_separator,
            keep_tokens=cfg.keep_tokens,
            keep_tokens_separator=cfg.keep_tokens_separator,
            caption_tag_dropout_rate=cfg.caption_tag_dropout_rate,
        )

    @property
    def changes_per_step(self) -> bool:
        """True when a caption can differ between samples of one image (shuffling or tag dropout): such
        captions cannot be encoded once and cached."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0

    @property
    def is_identity(self) -> bool:
        """True when `process_caption` returns every caption unchanged (and draws nothing)."""
        return not (self.caption_prefix or self.caption_suffix or self.changes_per_step)


def with_prefix_suffix(caption: str, options: CaptionOptions) -> str:
    """`caption` with the prefix and suffix joined by a space, as kohya adds them (step 1 of `process_caption`)."""
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix
    return caption


def split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """The (fixed, flexible, fixed suffix) tags of `caption` (after prefix/suffix), kohya's split: the flexible
    tags are the ones shuffled and dropped."""
    sep = options.caption_separator

    def tags(part: str) -> list[str]:
        return [t.strip() for t in part.split(sep) if t.strip()]

    marker = options.keep_tokens_separator
    if marker and marker in caption:
        fixed_part, flex_part = caption.split(marker, 1)
        suffix: list[str] = []
        if marker in flex_part:
            flex_part, suffix_part = flex_part.split(marker, 1)
            suffix = tags(suffix_part)
        return tags(fixed_part), tags(flex_part), suffix
    all_tags = [t.strip() for t in caption.strip().split(sep)]
    keep = options.keep_tokens
    return all_tags[:keep], all_tags[keep:], []


def process_caption(caption: str, options: CaptionOptions, generator: torch.Generator) -> str:
    """The caption a sample trains on: `caption` with prefix/suffix, kept tags, shuffled and dropped tags as
    `options` say (kohya's rules and order, see the module docstring).

    `generator` (a CPU `torch.Generator`) supplies every draw: `torch.randperm(n)` for the shuffle of the n
    flexible tags, then `torch.rand(n)` for their dropout (a tag stays when its draw is >= the rate, kohya's
    test). With no option on (`options.is_identity`) the caption is returned unchanged and nothing is drawn.
    """
    caption = with_prefix_suffix(caption, options)
    if not options.changes_per_step:
        return caption
    fixed, flex, suffix = split_tags(caption, options)
    if options.shuffle_caption and flex:
        order = torch.randperm(len(flex), generator=generator).tolist()
        flex = [flex[i] for i in order]
    if options.caption_tag_dropout_rate > 0 and flex:
        keep = (torch.rand(len(flex), generator=generator) >= options.caption_tag_dropout_rate).tolist()
        flex = [tag for tag, kept in zip(flex, keep) if kept]
    return JOINER.join(fixed + flex + suffix)
