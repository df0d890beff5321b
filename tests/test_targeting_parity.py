"""The modules we adapt, and each one's rank and alpha, equal PEFT's for the same LoHaConfig."""

from __future__ import annotations

import copy

import peft
import pytest
from peft.tuners.loha.layer import LoHaLayer

from loha_diffusion import LoHaConfig, inject_adapter
from loha_diffusion.model import adapter_layers
from loha_diffusion.targeting import text_encoder_preset, unet_preset

UNET_CONFIGS = {
    "list_attn": dict(target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
    "list_dotted_suffix": dict(target_modules=["attn1.to_q", "attn2.to_k"]),
    "list_full_name": dict(target_modules=["down_blocks.0.attentions.0.proj_in", "to_v"]),
    "regex_str": dict(target_modules=r".*attn2\.to_(q|v)"),
    "regex_str_no_partial_match": dict(target_modules=r".*to_q|conv1"),
    "all_linear": dict(target_modules="all-linear"),
    "all_linear_upper": dict(target_modules="ALL-LINEAR"),
    "convs": dict(target_modules=["conv1", "conv2", "conv_shortcut", "conv"], use_effective_conv2d=True),
    "exclude_list": dict(target_modules=["to_q", "to_k"], exclude_modules=["attn1.to_q"]),
    "exclude_regex": dict(target_modules=["to_q", "to_k"], exclude_modules=r"up_blocks\..*"),
    "layers_to_transform_int": dict(target_modules=["to_q", "proj_in"], layers_to_transform=0),
    "layers_to_transform_list": dict(target_modules=["conv1", "to_k"], layers_to_transform=[1]),
    "layers_pattern": dict(
        target_modules=["to_q", "conv1"], layers_to_transform=[1, 2], layers_pattern="down_blocks"
    ),
    "layers_pattern_list": dict(
        target_modules=["to_v"], layers_to_transform=[0], layers_pattern=["up_blocks", "transformer_blocks"]
    ),
    "layers_ignored_for_regex": dict(target_modules=r".*to_q", layers_to_transform=[0]),
    "rank_pattern": dict(target_modules=["to_q", "to_v", "conv1"], rank_pattern={"to_v": 2, "conv1": 4}),
    "alpha_pattern": dict(target_modules=["to_q", "to_v"], alpha_pattern={"attn2.to_q": 3.0}),
    "pattern_anchored": dict(
        target_modules=["to_q"],
        rank_pattern={"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 5},
        alpha_pattern={r"up_blocks\.\d\.attentions\.1.*to_q": 7},
    ),
    "pattern_order": dict(target_modules=["to_q", "to_k"], rank_pattern={"attn1.to_q": 3, "to_q": 6}),
    "modules_to_save_excluded": dict(target_modules=["to_q", "conv1"], modules_to_save=["conv1"]),
    "r_alpha": dict(r=4, alpha=16, target_modules=["to_k", "ff.net.2"]),
}
TE_CONFIGS = {
    "te_list": dict(target_modules=["q_proj", "v_proj", "fc1"]),
    "te_regex": dict(target_modules=r".*layers\.1\.self_attn\.(k|out)_proj"),
    "te_layers": dict(target_modules=["q_proj", "fc2"], layers_to_transform=[0]),
    "te_layers_pattern": dict(target_modules=["k_proj"], layers_to_transform=1, layers_pattern="layers"),
    "te_all_linear": dict(target_modules="all-linear"),
    "te_exclude": dict(target_modules=["q_proj", "k_proj"], exclude_modules=["layers.0.self_attn.q_proj"]),
}


def _ours(model, kwargs):
    inject_adapter(model, LoHaConfig(**kwargs))
    return {
        name: (layer.adapters["default"].r, layer.adapters["default"].alpha)
        for name, layer in adapter_layers(model).items()
    }


def _peft(model, kwargs):
    peft.inject_adapter_in_model(peft.LoHaConfig(**copy.deepcopy(kwargs)), model)
    return {
        name: (module.r["default"], float(module.alpha["default"]))
        for name, module in model.named_modules()
        if isinstance(module, LoHaLayer)
    }


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_selection_matches_peft(name, tiny_sd1_unet):
    kwargs = UNET_CONFIGS[name]
    peft_model = copy.deepcopy(tiny_sd1_unet)
    ours = _ours(tiny_sd1_unet, kwargs)
    theirs = _peft(peft_model, kwargs)
    assert ours == theirs
    assert ours, "every config in this table selects something"


@pytest.mark.parametrize("name", sorted(TE_CONFIGS))
def test_text_encoder_selection_matches_peft(name, tiny_sd1_text_encoder):
    kwargs = TE_CONFIGS[name]
    peft_model = copy.deepcopy(tiny_sd1_text_encoder)
    assert _ours(tiny_sd1_text_encoder, kwargs) == _peft(peft_model, kwargs)


@pytest.mark.parametrize("preset", ["attn", "attn_ff", "full"])
def test_unet_presets_match_peft(preset, tiny_sdxl_unet):
    config = unet_preset(
        preset, r=4, alpha=2, conv_r=2 if preset == "full" else None, use_effective_conv2d=True
    )
    kwargs = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
    peft_model = copy.deepcopy(tiny_sdxl_unet)
    ours = _ours(tiny_sdxl_unet, kwargs)
    assert ours == _peft(peft_model, kwargs)
    if preset == "full":
        assert {rank for name, (rank, _) in ours.items() if name.endswith(("conv1", "conv2", ".conv"))} == {2}
        assert {rank for name, (rank, _) in ours.items() if name.endswith(("conv_shortcut", "to_q"))} == {4}


def test_text_encoder_preset_targets_attention_and_mlp(tiny_sd1_text_encoder):
    ours = _ours(tiny_sd1_text_encoder, {"target_modules": text_encoder_preset().target_modules})
    layers = tiny_sd1_text_encoder.config.num_hidden_layers
    assert len(ours) == 6 * layers
