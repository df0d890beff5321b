"""Kohya/LDM module names: diffusers <-> LDM mapping checked against diffusers' own single-file converter,
Kohya names of full-size SD1.5 and SDXL modules, text-encoder names with transformers 5."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from torch import nn

from loha_diffusion.formats import naming
from loha_diffusion.tiny import (
    build_full_size_text_encoder,
    build_tiny_text_encoder,
    build_unet_from_config,
    full_size_unet_config,
    tiny_unet_config,
)

SD2_CONFIG = {
    **full_size_unet_config("sd1"),
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}


def _layer_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def full_unet(request):
    return request.param, build_unet_from_config(full_size_unet_config(request.param), device="meta")


def test_detect_architecture():
    assert naming.detect_architecture(full_size_unet_config("sd1")) == "sd1"
    assert naming.detect_architecture(full_size_unet_config("sdxl")) == "sdxl"
    assert naming.detect_architecture(tiny_unet_config("sd1")) == "sd1"
    assert naming.detect_architecture(tiny_unet_config("sdxl")) == "sdxl"
    assert naming.detect_architecture(SD2_CONFIG) == "sd2"
    assert naming.detect_architecture({**tiny_unet_config("sd1"), "layers_per_block": 1}) is None
    assert naming.detect_architecture({**tiny_unet_config("sdxl"), "addition_embed_type": None}) is None
    unet = build_unet_from_config(tiny_unet_config("sdxl"), device="meta")
    assert naming.detect_architecture(unet) == "sdxl"


def _check_against_diffusers_converter(unet: nn.Module, config: dict) -> int:
    """Write every weight under our LDM name, convert back with diffusers' converter, and require that each
    diffusers weight receives exactly the tensor we filed under its LDM name."""
    layout = naming.UNetLayout.from_config(config)
    ldm_sd = {}
    expected = {}
    for i, (key, _) in enumerate(unet.state_dict().items()):
        module, _, param = key.rpartition(".")
        ldm_sd[f"model.diffusion_model.{naming.diffusers_to_ldm(module, layout)}.{param}"] = torch.tensor(i)
        expected[key] = i
    converted = convert_ldm_unet_checkpoint(ldm_sd, dict(config))
    assert set(converted) == set(expected)
    assert {k: int(v) for k, v in converted.items()} == expected
    return len(expected)


def test_ldm_mapping_matches_diffusers_converter_full_size(full_unet):
    arch, unet = full_unet
    n = _check_against_diffusers_converter(unet, full_size_unet_config(arch))
    assert n > 600


@pytest.mark.parametrize("layers_per_block", [1, 3])
def test_ldm_mapping_any_layers_per_block(layers_per_block):
    config = {**tiny_unet_config("sd1"), "layers_per_block": layers_per_block}
    unet = build_unet_from_config(config, device="meta")
    _check_against_diffusers_converter(unet, config)
    config = {**tiny_unet_config("sdxl"), "layers_per_block": layers_per_block}
    unet = build_unet_from_config(config, device="meta")
    _check_against_diffusers_converter(unet, config)


def test_every_layer_maps_both_ways_full_size(full_unet):
    arch, unet = full_unet
    layout = naming.UNetLayout.from_config(unet)
    paths = _layer_paths(unet)
    style = naming.default_unet_naming(arch)
    kohya = {naming.unet_kohya_name(p, style, layout): p for p in paths}
    assert len(kohya) == len(paths), "two modules share a Kohya name"
    for name, path in kohya.items():
        assert "." not in name and name.startswith("lora_unet_")
        assert naming.ldm_to_diffusers(naming.diffusers_to_ldm(path, layout), layout) == path
        # The importer's candidate names include the exported name, and no two modules share a candidate.
        assert name in naming.unet_name_candidates(path, layout)
    candidates = [c for p in paths for c in naming.unet_name_candidates(p, layout)]
    assert len(candidates) == len(set(candidates))


def test_known_kohya_names():
    sd1 = build_unet_from_config(full_size_unet_config("sd1"), device="meta")
    sdxl = build_unet_from_config(full_size_unet_config("sdxl"), device="meta")
    l1, lx = naming.UNetLayout.from_config(sd1), naming.UNetLayout.from_config(sdxl)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert naming.unet_kohya_name(q, "diffusers", l1) == "lora_unet_" + q.replace(".", "_")
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert (
        naming.unet_kohya_name(q, "ldm", lx) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert (
        naming.unet_kohya_name("up_blocks.0.upsamplers.0.conv", "ldm", lx)
        == "lora_unet_output_blocks_2_2_conv"
    )
    assert (
        naming.unet_kohya_name("up_blocks.2.upsamplers.0.conv", "ldm", l1)
        == "lora_unet_output_blocks_8_2_conv"
    )
    assert (
        naming.unet_kohya_name("up_blocks.0.upsamplers.0.conv", "ldm", l1)
        == "lora_unet_output_blocks_2_1_conv"
    )
    assert naming.diffusers_to_ldm("down_blocks.1.resnets.0.conv1", lx) == "input_blocks.4.0.in_layers.2"
    assert naming.diffusers_to_ldm("down_blocks.1.downsamplers.0.conv", lx) == "input_blocks.6.0.op"
    assert naming.diffusers_to_ldm("mid_block.resnets.1.time_emb_proj", lx) == "middle_block.2.emb_layers.1"
    assert naming.diffusers_to_ldm("add_embedding.linear_2", lx) == "label_emb.0.2"
    assert naming.diffusers_to_ldm("conv_out", lx) == "out.2"
    with pytest.raises(ValueError, match="no LDM"):
        naming.diffusers_to_ldm("encoder_hid_proj", lx)
    with pytest.raises(ValueError, match="not an LDM"):
        naming.ldm_to_diffusers("input_blocks.99.0.op", lx)


@pytest.mark.parametrize("index", [1, 2])
def test_text_encoder_names_transformers5(index):
    te = build_tiny_text_encoder("sdxl", index)
    prefix = naming.text_encoder_prefixes(2)[index - 1]
    paths = _layer_paths(te)
    # transformers 5: CLIPTextModel has no .text_model, CLIPTextModelWithProjection does.
    assert any(p.startswith("text_model.") for p in paths) == (index == 2)
    encoder_paths = [p for p in paths if ".layers." in p]
    names = {naming.text_encoder_kohya_name(p, prefix) for p in encoder_paths}
    assert len(names) == len(encoder_paths) == 6 * te.config.num_hidden_layers
    assert f"{prefix}_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert f"{prefix}_text_model_encoder_layers_1_mlp_fc2" in names
    for n in names:
        assert naming.te_sublayer(n) is not None
    # A raw transformers-5 name (what LyCORIS derives) is a candidate on import but not portable.
    raw = f"{prefix}_encoder_layers_0_self_attn_q_proj"
    assert naming.te_sublayer(raw) is None
    if index == 1:
        assert raw in naming.text_encoder_name_candidates("encoder.layers.0.self_attn.q_proj", [prefix])


def test_full_size_text_encoder_names():
    te = build_full_size_text_encoder("sdxl", 2)
    names = [naming.text_encoder_kohya_name(p, "lora_te2") for p in _layer_paths(te) if ".layers." in p]
    assert len(names) == 192
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names


def test_prefixes():
    assert naming.text_encoder_prefixes(1) == ("lora_te",)
    assert naming.text_encoder_prefixes(2) == ("lora_te1", "lora_te2")
    with pytest.raises(ValueError):
        naming.text_encoder_prefixes(3)


def test_text_projection_has_the_name_onetrainer_writes_and_comfyui_maps():
    # comfy/lora.py, model_lora_keys_clip: "lora_te2_text_projection" -> clip_g.transformer.text_projection.weight
    assert naming.text_encoder_kohya_name("text_projection", "lora_te2") == "lora_te2_text_projection"
    assert (
        naming.legacy_text_encoder_kohya_name("text_projection", "lora_te2")
        == "lora_te2_text_model_text_projection"
    )
    assert naming.legacy_text_encoder_kohya_name("text_model.encoder.layers.0.mlp.fc1", "lora_te2") is None
    te2 = build_tiny_text_encoder("sdxl", 2)
    assert "text_projection" in dict(te2.named_modules())
    assert naming.text_encoder_name_candidates("text_projection", ["lora_te2"]) == [
        "lora_te2_text_projection"
    ]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_standard_layouts_and_architecture_from_paths(arch):
    unet = build_unet_from_config(tiny_unet_config(arch), device="meta")
    assert naming.standard_layout(arch) == naming.UNetLayout.from_config(unet)
    assert naming.standard_layout(arch) == naming.UNetLayout.from_config(full_size_unet_config(arch))
    paths = [p for p, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert naming.guess_unet_architecture(paths) == arch
    assert {naming.diffusers_component(p) for p in paths} == {"unet"}
    # Blocks both layouts have tell nothing.
    assert (
        naming.guess_unet_architecture(["down_blocks.1.attentions.0.proj_in", "mid_block.resnets.0.conv1"])
        is None
    )
    te = build_tiny_text_encoder(arch, 1)
    assert {naming.diffusers_component(p) for p, _ in te.named_modules() if p} == {"text_encoder"}
    with pytest.raises(ValueError, match="unknown architecture"):
        naming.standard_layout("flux")
