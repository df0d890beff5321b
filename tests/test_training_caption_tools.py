"""Caption tools (kohya's `process_caption` rules): prefix/suffix, keep_tokens and its separator, tag shuffle
and tag dropout, every draw from the sample's generator."""

from __future__ import annotations

import math

import pytest
import torch

from loha_diffusion.training.caption_tools import CaptionOptions, process_caption, split_tags
from loha_diffusion.training.config import load_config

TAGS = [f"tag{i}" for i in range(8)]
CAPTION = ", ".join(TAGS)
SEEDS = range(400)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(caption: str, seed: int = 0, **options) -> str:
    return process_caption(caption, CaptionOptions(**options), gen(seed))


@pytest.mark.parametrize(
    "caption",
    [CAPTION, "a photo of sks dog", "  spaced ,tags,,  ", "two\nlines, here", "fixed ||| flex, more", ""],
)
def test_every_option_off_returns_the_caption_unchanged_and_draws_nothing(caption):
    options = CaptionOptions(keep_tokens=2, keep_tokens_separator="|||", caption_separator=";")
    assert options.is_identity and not options.changes_per_step
    generator = gen(7)
    state = generator.get_state()
    assert process_caption(caption, options, generator) is caption
    assert torch.equal(generator.get_state(), state)


def test_options_from_config():
    cfg = load_config(
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"],
        shuffle_caption=True,
        keep_tokens=2,
        keep_tokens_separator="|||",
        caption_separator=";",
        caption_tag_dropout_rate=0.25,
        caption_prefix="pre",
        caption_suffix="post",
    )
    assert CaptionOptions.from_config(cfg) == CaptionOptions(
        caption_prefix="pre",
        caption_suffix="post",
        shuffle_caption=True,
        caption_separator=";",
        keep_tokens=2,
        keep_tokens_separator="|||",
        caption_tag_dropout_rate=0.25,
    )
    defaults = load_config(
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"]
    )
    assert CaptionOptions.from_config(defaults) == CaptionOptions()


def test_prefix_and_suffix_are_joined_with_a_space_as_kohya_does():
    assert run("dog, grass", caption_prefix="sks") == "sks dog, grass"
    assert run("dog, grass", caption_suffix="masterpiece") == "dog, grass masterpiece"
    assert run("dog", caption_prefix="a,", caption_suffix=", b") == "a, dog , b"
    assert (
        run("dog", caption_prefix="", caption_suffix="") == "dog"
    )  # empty counts as unset (kohya: truthiness)
    # The prefix joins the first tag before the split (kohya adds it to the raw caption).
    kept = {run("dog, red, sky", s, caption_prefix="sks", shuffle_caption=True, keep_tokens=1) for s in SEEDS}
    assert {c.split(", ")[0] for c in kept} == {"sks dog"} and len(kept) == 2


@pytest.mark.parametrize("keep", [0, 1, 3, 8, 20])
def test_shuffle_keeps_the_first_n_tags_in_place_and_permutes_the_rest(keep):
    seen = set()
    for seed in SEEDS:
        tags = run(CAPTION, seed, shuffle_caption=True, keep_tokens=keep).split(", ")
        assert tags[:keep] == TAGS[:keep]
        assert sorted(tags[keep:]) == sorted(TAGS[keep:])
        seen.add(tuple(tags))
    if keep < 7:  # 400 draws over 8!/... orders: many distinct ones, and the flexible part really moves
        assert len(seen) > 50
        first_flex = {order[keep] for order in seen}
        assert first_flex == set(TAGS[keep:])
    else:
        assert seen == {tuple(TAGS)}


def test_tags_are_stripped_and_joined_with_comma_space_whatever_the_separator():
    for seed in range(20):
        tags = run(" a ;b;  c  ;d", seed, shuffle_caption=True, caption_separator=";").split(", ")
        assert sorted(tags) == ["a", "b", "c", "d"]
    # kohya keeps empty tags in the keep_tokens split (it filters them only around keep_tokens_separator).
    assert sorted(run("a,,b", 3, shuffle_caption=True).split(", ")) == ["", "a", "b"]


def test_keep_tokens_separator_fixes_the_part_before_it_and_a_fixed_suffix_after_a_second_one():
    caption = "sks, 1girl ||| red, blue, green, tall ||| best quality, detailed"
    options = CaptionOptions(shuffle_caption=True, keep_tokens=3, keep_tokens_separator="|||")
    assert split_tags(caption, options) == (
        ["sks", "1girl"],
        ["red", "blue", "green", "tall"],
        ["best quality", "detailed"],
    )
    seen = set()
    for seed in SEEDS:
        tags = process_caption(caption, options, gen(seed)).split(", ")
        assert tags[:2] == ["sks", "1girl"] and tags[-2:] == ["best quality", "detailed"]
        assert sorted(tags[2:-2]) == ["blue", "green", "red", "tall"]
        seen.add(tuple(tags))
    assert len(seen) == 24  # all 4! orders of the flexible tags turn up
    # Without the marker in the caption keep_tokens applies; empty parts around a marker vanish.
    assert process_caption("a, b, c", options, gen(0)).split(", ")[:3] == ["a", "b", "c"]
    assert split_tags("|||x, y", options) == ([], ["x", "y"], [])


def test_tag_dropout_rate_is_right_over_many_seeds_and_never_drops_kept_tags():
    rate, trials = 0.3, 0
    dropped = 0
    for seed in range(1000):
        tags = run("a, b ||| c, d ||| e", seed, caption_tag_dropout_rate=rate, keep_tokens_separator="|||")
        assert tags.startswith("a, b") and tags.endswith(", e") and len(tags.split(", ")) >= 3
        tags = run(CAPTION, seed, caption_tag_dropout_rate=rate, keep_tokens=2).split(", ")
        assert tags[:2] == TAGS[:2] and tags[2:] == [t for t in TAGS[2:] if t in tags[2:]]  # order kept
        dropped += 6 - len(tags[2:])
        trials += 6
    # Binomial(6000, 0.3): sd ~ 35; allow 5 sd.
    assert abs(dropped - rate * trials) < 5 * math.sqrt(trials * rate * (1 - rate))


def test_shuffle_then_dropout_draw_from_the_generator_in_kohyas_order():
    """Documented draws: torch.randperm(n) for the shuffle, then torch.rand(n) >= rate keeps a tag."""
    options = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.5)
    for seed in range(50):
        reference = gen(seed)
        flex = [TAGS[1:][i] for i in torch.randperm(7, generator=reference).tolist()]
        keep = (torch.rand(7, generator=reference) >= 0.5).tolist()
        expected = ", ".join(TAGS[:1] + [t for t, k in zip(flex, keep) if k])
        assert process_caption(CAPTION, options, gen(seed)) == expected


def test_same_seed_same_caption_and_seeds_differ():
    options = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.2, keep_tokens=1)
    first = [process_caption(CAPTION, options, gen(s)) for s in range(30)]
    again = [process_caption(CAPTION, options, gen(s)) for s in range(30)]
    assert first == again and len(set(first)) > 20
    assert options.changes_per_step and not options.is_identity
    assert CaptionOptions(caption_prefix="x").is_identity is False
    assert CaptionOptions(caption_prefix="x").changes_per_step is False
