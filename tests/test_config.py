"""LoHaConfig / LoRAConfig: PEFT's fields and defaults, validation, JSON round trips."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest

from loha_diffusion import LoHaConfig, LoRAConfig
from loha_diffusion.config import AdapterConfig, get_pattern_key

PEFT_FIELDS = [
    "r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "target_modules", "exclude_modules",
    "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save", "rank_pattern", "alpha_pattern",
]  # fmt: skip


def test_fields_and_defaults_equal_peft():
    ours, theirs = LoHaConfig(), peft.LoHaConfig()
    assert [f.name for f in dataclasses.fields(LoHaConfig)] == PEFT_FIELDS
    for name in PEFT_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_lists_become_sets_as_in_peft():
    config = LoHaConfig(target_modules=["a", "b"], exclude_modules=["c"])
    assert config.target_modules == {"a", "b"} and config.exclude_modules == {"c"}
    assert LoHaConfig(target_modules="a|b").target_modules == "a|b"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be an integer >= 1"),
        (dict(rank_dropout=1.0), "rank_dropout must be in"),
        (dict(module_dropout=-0.1), "module_dropout must be in"),
        (dict(layers_pattern="layers"), "layers_to_transform"),
        (dict(rank_pattern={"to_q": 0}), "rank_pattern"),
        (dict(alpha_pattern={"to_q(": 2}), "not a valid regex"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoHaConfig(**kwargs)


def test_json_round_trip_is_peft_compatible(tmp_path):
    config = LoHaConfig(
        r=4, alpha=2, target_modules=["to_q", "to_k"], rank_pattern={"to_k": 2}, use_effective_conv2d=True
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LOHA" and data["target_modules"] == ["to_k", "to_q"]
    assert LoHaConfig.from_pretrained(tmp_path) == config
    assert AdapterConfig.from_pretrained(tmp_path) == config
    # PEFT reads our file and we read PEFT's.
    theirs = peft.LoHaConfig.from_pretrained(str(tmp_path))
    assert theirs.r == 4 and theirs.rank_pattern == {"to_k": 2} and theirs.use_effective_conv2d
    peft_dir = tmp_path / "peft"
    theirs.save_pretrained(str(peft_dir))
    assert LoHaConfig.from_pretrained(peft_dir) == config


def test_unknown_keys_are_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4, "rnak": 2}))
    with pytest.raises(ValueError, match="Unknown LoHaConfig field.*rnak"):
        LoHaConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="peft_type"):
        AdapterConfig.from_dict({"peft_type": "IA3"})
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoHaConfig.from_pretrained(tmp_path / "missing")


def test_lora_config_round_trip(tmp_path):
    config = LoRAConfig(r=2, alpha=1, target_modules=["to_q"], use_effective_conv2d=True)
    config.save_pretrained(tmp_path)
    assert AdapterConfig.from_pretrained(tmp_path) == config


def test_pattern_lookup_is_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    patterns = {"to_q": 1, r"attn2\.to_k": 2, "^down_blocks.0.x.to_v": 3, "blocks.1.to_v": 4}
    names = ["a.attn1.to_q", "a.attn2.to_k", "a.attn1.to_k", "down_blocks.0.x.to_v", "x.down_blocks.0.x.to_v",
             "up_blocks.1.to_v", "up_blocks.11.to_v", "to_q"]  # fmt: skip
    for name in names:
        theirs = peft_get_pattern_key(list(patterns), name)
        assert get_pattern_key(list(patterns), name) == (theirs if theirs in patterns else None), name
    config = LoHaConfig(rank_pattern={"to_v": 2})
    assert config.rank_for("a.to_v") == 2 and config.alpha_for("a.to_v") == 8  # scaling 4, as in PEFT
