"""rank_pattern / alpha_pattern that a kohya user can write: PEFT's matching rule, keys that would set nothing
refused before any weight loads (naming the key and the key that would match), a block-wise pattern applied,
and the dry run's lines of what each key changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline
from peft.utils.other import get_pattern_key as peft_get_pattern_key
from test_training_loop import base_flags, make_dataset

from loha_diffusion.errors import ConfigError
from loha_diffusion.meta_models import meta_models
from loha_diffusion.model import adapter_layers, inject_adapter
from loha_diffusion.targeting import (
    check_pattern_keys,
    find_target_modules,
    pattern_key_matches,
    pattern_uses,
    suggested_pattern,
    unet_preset,
)
from loha_diffusion.training import loop
from loha_diffusion.training.config import load_config
from loha_diffusion.training.models import unet_adapter_config
from loha_diffusion.training.plan import build_plan, format_plan

BLOCK = r"down_blocks\.0\..*"


@pytest.fixture(scope="module")
def sd15_unet():
    """SD1.5's UNet on the meta device (names and shapes only)."""
    return meta_models(arch="sd1", components=("unet",))["unet"]


def adapted_names(unet, config) -> tuple[list[str], list[str]]:
    return find_target_modules(unet, config), [name for name, _ in unet.named_modules() if name]


def test_the_match_rule_is_peft_s():
    """`pattern_key_matches` agrees with the installed peft's `get_pattern_key` (which returns the module name
    itself when no key matches)."""
    names = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.resnets.1.conv1",
        "up_blocks.1.attentions.2.proj_out",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "conv_in",
    ]
    keys = [
        "to_q",
        "down_blocks.0",
        BLOCK,
        "down_blocks.0.*",
        "attn1.to_q",
        "conv",
        "conv1",
        r"up_blocks\.1\..*",
    ]
    for name in names:
        for key in keys:
            assert pattern_key_matches(key, name) == (peft_get_pattern_key([key], name) == key), (key, name)
    assert not pattern_key_matches("down_blocks.0", names[0]) and pattern_key_matches(BLOCK, names[0])


def test_a_block_prefix_key_is_refused_with_the_key_that_matches(sd15_unet):
    """kohya users write `down_blocks.0 = 2`; PEFT's rule needs the whole name: refused, naming the key, the
    modules it was meant for and the key to write, which then sets exactly those modules."""
    config = unet_preset("attn_ff", rank_pattern={"down_blocks.0": 2})
    adapted, names = adapted_names(sd15_unet, config)
    with pytest.raises(ConfigError) as info:
        check_pattern_keys(config, adapted, names, model="UNet")
    message = str(info.value)
    assert "'down_blocks.0' matches no adapted module" in message and "UNet" in message
    assert f"'{BLOCK}'" in message and "'down_blocks.0.*'" in message
    assert "down_blocks.0.attentions.0.proj_in" in message  # some of the modules it was meant for
    meant = [name for name in adapted if name.startswith("down_blocks.0.")]
    assert f"{len(meant)} adapted modules start with it" in message and len(meant) == 24
    assert suggested_pattern("down_blocks.0") == BLOCK
    fixed = unet_preset("attn_ff", rank_pattern={BLOCK: 2})
    (use,) = check_pattern_keys(fixed, adapted, names)
    assert sorted(use.applied) == sorted(meant) == sorted(use.matched)


def test_other_keys_that_set_nothing(sd15_unet):
    """A key matching only modules without an adapter, a key matching nothing (with close names), and a key
    every one of whose modules an earlier key takes: all named in one error; `keys` limits what is checked."""
    patterns = {"to_q": 2, r"down_blocks\.0\..*\.to_q": 4, "conv_in": 3, "to_qq": 3}
    config = unet_preset("attn_ff", rank_pattern=patterns, alpha_pattern={"proj_in": 1})
    adapted, names = adapted_names(sd15_unet, config)
    with pytest.raises(ConfigError) as info:
        check_pattern_keys(config, adapted, names, hints=["patterns apply to the UNet only"])
    message = str(info.value)
    assert "3 key(s) set nothing" in message and "patterns apply to the UNet only" in message
    assert "'conv_in' only matches modules that get no adapter (conv_in)" in message
    assert "'to_qq' matches no module" in message and "to_q" in message.split("'to_qq'")[1]
    assert (
        r"'down_blocks\.0\..*\.to_q' matches 4 modules but an earlier key sets each of them ('to_q')"
        in message
    )
    assert "proj_in" not in message  # the alpha key is fine
    uses = check_pattern_keys(
        config, adapted, names, keys=[("rank_pattern", "to_q"), ("alpha_pattern", "proj_in")]
    )
    by_key = {(u.setting, u.key): u for u in uses}
    assert len(by_key["rank_pattern", "to_q"].applied) == 32  # attn1 and attn2 of 16 transformer blocks
    assert len(by_key["alpha_pattern", "proj_in"].applied) == 16


def test_pattern_uses_follow_dict_order(sd15_unet):
    """Where two keys match, the first in the dict sets the value (PEFT); the second keeps the rest."""
    config = unet_preset("attn", rank_pattern={r"down_blocks\.0\..*\.to_q": 4, "to_q": 2})
    uses = pattern_uses(config, find_target_modules(sd15_unet, config))
    assert [(u.key, len(u.matched), len(u.applied)) for u in uses] == [
        (r"down_blocks\.0\..*\.to_q", 4, 4),
        ("to_q", 32, 28),
    ]


def tiny_config(pipeline_dir: Path, tmp_path: Path, **overrides):
    data = make_dataset(tmp_path / "data", 2)
    return load_config(base_flags(pipeline_dir, data, tmp_path / "out", max_train_steps="1"), **overrides)


def test_a_kohya_block_pattern_is_applied(tiny_sd1_pipeline_dir, tmp_path):
    """`rank_pattern = {'down_blocks\\.0\\..*' = 4}` and an alpha for the up blocks reach the adapters."""
    cfg = tiny_config(
        tiny_sd1_pipeline_dir,
        tmp_path,
        rank_pattern={BLOCK: 4},
        alpha_pattern={r"up_blocks\.1\..*": 0.5},
    )
    unet = DiffusionPipeline.from_pretrained(tiny_sd1_pipeline_dir).unet
    inject_adapter(unet, unet_adapter_config(cfg))
    layers = adapter_layers(unet)
    ranks = {path: layer.adapters["default"].r for path, layer in layers.items()}
    alphas = {path: float(layer.adapters["default"].alpha) for path, layer in layers.items()}
    assert {ranks[p] for p in ranks if p.startswith("down_blocks.0.")} == {4}
    assert {ranks[p] for p in ranks if not p.startswith("down_blocks.0.")} == {cfg.rank}
    assert {alphas[p] for p in alphas if re.match(r"up_blocks\.1\.", p)} == {0.5}
    assert any(p.startswith("down_blocks.0.") for p in ranks) and any(
        p.startswith("up_blocks.1.") for p in alphas
    )


def test_training_refuses_an_unmatched_key_before_loading_weights(
    tiny_sd1_pipeline_dir, tmp_path, monkeypatch
):
    cfg = tiny_config(tiny_sd1_pipeline_dir, tmp_path, rank_pattern={"down_blocks.0": 2})

    def no_loading(*args, **kwargs):
        raise AssertionError("model weights were loaded before the pattern was checked")

    monkeypatch.setattr(loop, "load_models", no_loading)
    with pytest.raises(ConfigError, match=re.escape(f"write '{BLOCK}'")):
        loop.train(cfg)


def test_text_encoder_keys_are_named_as_unet_only(tiny_sd1_pipeline_dir, tmp_path):
    """The text encoders' adapters take rank/alpha, not the patterns: a CLIP module key is refused with that."""
    cfg = tiny_config(tiny_sd1_pipeline_dir, tmp_path, rank_pattern={"q_proj": 2}, train_text_encoder=True)
    with pytest.raises(ConfigError, match="apply to the UNet only") as info:
        build_plan(cfg)
    assert "'q_proj'" in str(info.value)


def test_dry_run_lists_what_each_key_changed(tiny_sd1_pipeline_dir, tmp_path):
    cfg = tiny_config(
        tiny_sd1_pipeline_dir,
        tmp_path,
        preset="full",
        conv_rank=1,
        rank_pattern={BLOCK: 4, "to_q": 3},
    )
    plan = build_plan(cfg)
    unet = DiffusionPipeline.from_pretrained(tiny_sd1_pipeline_dir).unet
    adapted = find_target_modules(unet, unet_adapter_config(cfg))
    in_block = [n for n in adapted if n.startswith("down_blocks.0.")]
    to_q = [n for n in adapted if n.endswith(".to_q")]
    outside_q = [n for n in to_q if not n.startswith("down_blocks.0.")]
    assert in_block and len(outside_q) < len(to_q)
    assert plan.patterns[:2] == [
        f"rank_pattern '{BLOCK}' = 4: {len(in_block)} modules",
        f"rank_pattern 'to_q' = 3: {len(outside_q)} modules (matches {len(to_q)}; "
        f"{len(to_q) - len(outside_q)} set by an earlier key)",
    ]
    assert all(line.endswith("(from conv_rank)") for line in plan.patterns[2:]) and len(plan.patterns) == 5
    text = format_plan(cfg, plan)
    assert f"  rank_pattern '{BLOCK}' = 4: {len(in_block)} modules" in text.splitlines()
