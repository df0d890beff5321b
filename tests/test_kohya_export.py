"""save_kohya: file layout, dtypes, names, metadata, A1111's hash, and the refusals of docs/kohya-format.md section 9."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct

import pytest
import torch
from safetensors import safe_open
from torch import nn

from loha_diffusion.config import LoHaConfig
from loha_diffusion.errors import AdapterNotFoundError, NonFiniteError
from loha_diffusion.formats.kohya import KohyaFormatError, build_kohya_state_dict, read_kohya, save_kohya
from loha_diffusion.model import adapter_layers, inject_adapter
from loha_diffusion.targeting import text_encoder_preset, unet_preset
from loha_diffusion.tiny import (
    build_tiny_text_encoder,
    build_tiny_unet,
    build_unet_from_config,
    tiny_unet_config,
)


def _models(arch, *, algo="loha", cp=True, te=True):
    torch.manual_seed(0)
    unet = build_tiny_unet(arch)
    inject_adapter(
        unet,
        unet_preset(
            "full",
            algo=algo,
            r=4,
            alpha=2,
            conv_r=2,
            conv_alpha=1,
            use_effective_conv2d=cp,
            init_weights=False,
        ),
    )
    encoders = []
    if te:
        for index in (1, 2) if arch == "sdxl" else (1,):
            encoder = build_tiny_text_encoder(arch, index)
            inject_adapter(encoder, text_encoder_preset(algo=algo, r=4, alpha=2, init_weights=False))
            encoders.append(encoder)
    return unet, encoders


def _raw(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sd1_file_layout(tmp_path, dtype):
    unet, (te,) = _models("sd1")
    path = save_kohya(tmp_path / "a.safetensors", unet=unet, text_encoder=te, dtype=dtype)
    tensors, _ = _raw(path)
    assert {t.dtype for t in tensors.values()} == {dtype}
    modules = {k.partition(".")[0] for k in tensors}
    layers = {**adapter_layers(unet), **{f"te.{k}": v for k, v in adapter_layers(te).items()}}
    assert len(modules) == len(layers) == 278 + 12
    for module in modules:
        assert "." not in module
        assert tensors[f"{module}.alpha"].dim() == 0  # 0-dim alpha, as LyCORIS/sd-scripts write it
        assert module.startswith(("lora_unet_", "lora_te_"))
    assert all(t.is_contiguous() for t in tensors.values())
    # SD1 UNet: diffusers paths; TE (transformers-5 CLIPTextModel, no .text_model): text_model_ names.
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a" in tensors
    te_modules = [m for m in modules if m.startswith("lora_te_")]
    assert te_modules and all(m.startswith("lora_te_text_model_encoder_layers_") for m in te_modules)
    # CP layout of a 3x3 conv: w_a rank first (r, out), t (r, r, 3, 3); flat elsewhere (out, r).
    conv = unet.down_blocks[0].resnets[0].conv1
    cp = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{cp}.hada_w1_a"].shape == (2, conv.weight.shape[0])
    assert tensors[f"{cp}.hada_w1_b"].shape == (2, conv.weight.shape[1])
    assert tensors[f"{cp}.hada_t1"].shape == (2, 2, 3, 3)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.hada_w1_a"].shape == (
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.shape[0],
        4,
    )
    assert tensors[f"{q}.hada_w2_b"].shape[0] == tensors[f"{q}.hada_w1_b"].shape[0]
    # fp32 factors are the adapter's exactly.
    if dtype == torch.float32:
        adapter = adapter_layers(unet)["down_blocks.0.resnets.0.conv1"].adapters["default"]
        assert torch.equal(tensors[f"{cp}.hada_t1"], adapter.hada_t1.detach())
        assert float(tensors[f"{cp}.alpha"]) == 1.0 and float(tensors[f"{q}.alpha"]) == 2.0


def test_sdxl_uses_ldm_names_and_te1_te2(tmp_path):
    unet, (te1, te2) = _models("sdxl", cp=False)
    path = save_kohya(tmp_path / "x.safetensors", unet=unet, text_encoder=te1, text_encoder_2=te2)
    modules = set(read_kohya(path).modules)
    unet_modules = {m for m in modules if m.startswith("lora_unet_")}
    assert not any(
        m.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
        for m in unet_modules
    )
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet_modules
    assert (
        "lora_unet_output_blocks_2_2_conv" in unet_modules
    )  # up_blocks.0 upsampler (A1111 drops the diffusers name)
    assert "lora_unet_middle_block_1_proj_in" in unet_modules
    assert "lora_unet_input_blocks_1_0_in_layers_2" in unet_modules  # down_blocks.0.resnets.0.conv1
    te1_modules = {m for m in modules if m.startswith("lora_te1_")}
    te2_modules = {m for m in modules if m.startswith("lora_te2_")}
    assert len(te1_modules) == 6 * 2 and len(te2_modules) == 6 * 3
    assert all("_text_model_encoder_layers_" in m for m in te1_modules | te2_modules)
    assert not any(m.startswith("lora_te_") for m in modules)


def test_lora_tensor_names_and_shapes(tmp_path):
    unet, (te,) = _models("sd1", algo="lora", cp=False)
    tensors, metadata = _raw(
        save_kohya(tmp_path / "l.safetensors", unet=unet, text_encoder=te, dtype=torch.float32)
    )
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    weight = unet.down_blocks[0].resnets[0].conv1.weight
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, weight.shape[1], 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (weight.shape[0], 2, 1, 1)
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD1: a 1x1 conv
    assert tensors[f"{proj}.lora_down.weight"].dim() == 4
    assert not any("lora_A" in k or "lora_B" in k for k in tensors)
    assert metadata["ss_network_module"] == "networks.lora"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    # Tucker LoCon is LyCORIS-only (lora_mid): the metadata says so.
    unet, _ = _models("sd1", algo="lora", cp=True, te=False)
    tensors, metadata = _raw(save_kohya(tmp_path / "t.safetensors", unet=unet))
    assert tensors[f"{conv}.lora_mid.weight"].shape == (2, 2, 3, 3)
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, weight.shape[1], 1, 1)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == "locon"


def test_metadata(tmp_path):
    unet, (te,) = _models("sd1")
    info = {
        "steps": 1200,
        "epochs": 4,
        "resolution": 512,
        "dataset_dirs": {"10_cat": {"n_repeats": 10, "img_count": 12}},
        "tag_frequency": {"10_cat": {"cat": 12, "sks": 12}},
        "training_started_at": 1700000000.5,
        "ss_custom": "kept",
    }
    path = save_kohya(
        tmp_path / "my_loha.safetensors",
        unet=unet,
        text_encoder=te,
        training_info=info,
        metadata={"modelspec.author": "me", "my_key": {"a": 1}},
    )
    meta = read_kohya(path).metadata
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "loha" and args["conv_dim"] == "2" and args["conv_alpha"] == "1"
    assert args["use_tucker"] == "True" and args["rank_dropout"] == "0" and args["module_dropout"] == "0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "my_loha" and meta["modelspec.title"] == "my_loha"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.resolution"] == "512x512" and meta["ss_resolution"] == "(512, 512)"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.date"][:2] == "20"
    assert meta["ss_steps"] == "1200" and meta["ss_num_epochs"] == "4"
    assert json.loads(meta["ss_dataset_dirs"]) == info["dataset_dirs"]
    assert json.loads(meta["ss_tag_frequency"]) == info["tag_frequency"]
    assert meta["ss_training_started_at"] == "1700000000.5" and meta["ss_custom"] == "kept"
    assert meta["modelspec.author"] == "me" and json.loads(meta["my_key"]) == {"a": 1}
    assert all(isinstance(v, str) for v in meta.values())
    with pytest.raises(ValueError, match="Unknown training_info key"):
        save_kohya(tmp_path / "bad.safetensors", unet=unet, training_info={"stepz": 1})


def test_metadata_sdxl_and_v_prediction(tmp_path):
    unet, (te1, te2) = _models("sdxl", cp=False)
    meta = read_kohya(
        save_kohya(tmp_path / "x.safetensors", unet=unet, text_encoder=te1, text_encoder_2=te2)
    ).metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert json.loads(meta["ss_network_args"])["use_tucker"] == "False"
    unet, _ = _models("sd1", te=False)
    meta = read_kohya(
        save_kohya(tmp_path / "v.safetensors", unet=unet, base_model_version="sd_v2_v")
    ).metadata
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "768x768"


def test_model_hash_is_a1111s(tmp_path):
    """sshs_model_hash = sha256 of the bytes after the 8-byte length and the JSON header (sd-scripts'
    addnet_hash_safetensors, which A1111 uses as the file hash)."""
    unet, (te,) = _models("sd1")
    path = save_kohya(tmp_path / "h.safetensors", unet=unet, text_encoder=te, metadata={"x": "y" * 1000})
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    assert (
        json.loads(data[8 : 8 + header_len])["__metadata__"]["sshs_model_hash"]
        == hashlib.sha256(data[8 + header_len :]).hexdigest()
    )
    path = save_kohya(tmp_path / "n.safetensors", unet=unet, model_hash=False)
    assert "sshs_model_hash" not in read_kohya(path).metadata


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_file_mode_follows_the_umask_and_no_temporary_is_left(tmp_path, umask, mode):
    """The exported file gets a normal file's mode (not the 0600 of a temporary file), so ComfyUI or A1111
    running as another user (a container) can read it; rewriting it leaves nothing else in the folder."""
    unet, _ = _models("sd1", te=False)
    old = os.umask(umask)
    try:
        path = save_kohya(tmp_path / "style.safetensors", unet=unet)
        save_kohya(path, unet=unet, dtype=torch.float32)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]
    assert read_kohya(path).dtypes == ["float32"]


def test_refuses_non_sd_unet_unless_naming_given(tmp_path):
    config = {**tiny_unet_config("sd1"), "layers_per_block": 1}
    unet = build_unet_from_config(config, device="cpu")
    inject_adapter(unet, unet_preset("attn", init_weights=False))
    target = tmp_path / "n.safetensors"
    with pytest.raises(KohyaFormatError, match="not SD1/SD2/SDXL-shaped") as err:
        save_kohya(target, unet=unet)
    assert "unet_naming='diffusers'" in str(err.value)
    assert not target.exists()
    with pytest.warns(UserWarning, match="A1111 may apply them to the wrong layers"):
        save_kohya(target, unet=unet, unet_naming="diffusers")
    assert (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in read_kohya(target).modules
    )
    save_kohya(target, unet=unet, unet_naming="ldm")
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in read_kohya(target).modules  # L=1


def test_refuses_partial_te2_attention(tmp_path):
    te1, te2 = build_tiny_text_encoder("sdxl", 1), build_tiny_text_encoder("sdxl", 2)
    inject_adapter(te1, LoHaConfig(target_modules=["q_proj", "v_proj"]))  # te1: per projection is fine
    inject_adapter(te2, LoHaConfig(target_modules=["q_proj", "k_proj", "v_proj", "fc1"]))
    target = tmp_path / "p.safetensors"
    with pytest.raises(KohyaFormatError, match="only some of q/k/v/out_proj") as err:
        save_kohya(target, text_encoder=te1, text_encoder_2=te2)
    assert "3 text-encoder layers" in str(err.value) and "missing ['self_attn_out_proj']" in str(err.value)
    assert not target.exists()
    save_kohya(target, text_encoder=te1)  # without te2 the te1 subset is written


def test_refuses_partial_attention_on_sd2_text_encoder(tmp_path):
    unet = build_unet_from_config({**tiny_unet_config("sd1"), "use_linear_projection": True}, device="cpu")
    te = build_tiny_text_encoder("sd1", 1)
    inject_adapter(unet, unet_preset("attn"))
    inject_adapter(te, LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(KohyaFormatError, match="only some of q/k/v/out_proj"):
        save_kohya(tmp_path / "sd2.safetensors", unet=unet, text_encoder=te)


def test_refuses_what_loaders_would_misread(tmp_path):
    unet, _ = _models("sd1", te=False)
    layers = adapter_layers(unet)
    # Ranks that differ between w1 and w2 (loaders scale by the w1 rank).
    lin = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].adapters["default"]
    lin.hada_w2_a = nn.Parameter(torch.randn(lin.hada_w2_a.shape[0], 3))
    lin.hada_w2_b = nn.Parameter(torch.randn(3, lin.hada_w2_b.shape[1]))
    # A CP factor in the flat (out, r) layout instead of rank-first (r, out).
    conv = layers["down_blocks.0.resnets.0.conv1"].adapters["default"]
    conv.hada_w1_a = nn.Parameter(conv.hada_w1_a.detach().T.contiguous())
    target = tmp_path / "bad.safetensors"
    with pytest.raises(KohyaFormatError) as err:
        save_kohya(target, unet=unet)
    message = str(err.value)
    assert "2 modules whose tensors loaders would read differently" in message
    assert "attn1_to_q" in message and "hada_w1_b rank 4 differs from hada_w2_b rank 3" in message
    assert "resnets_0_conv1" in message and "hada_w1_a" in message
    assert not target.exists()


def test_argument_errors(tmp_path):
    unet = build_tiny_unet("sd1")
    with pytest.raises(AdapterNotFoundError, match="No adapter named 'default'"):
        save_kohya(tmp_path / "e.safetensors", unet=unet)
    inject_adapter(unet, unet_preset("attn"))
    with pytest.raises(ValueError, match="dtype"):
        save_kohya(tmp_path / "e.safetensors", unet=unet, dtype=torch.int8)
    with pytest.raises(ValueError, match="unet_naming"):
        save_kohya(tmp_path / "e.safetensors", unet=unet, unet_naming="compvis")
    state, facts = build_kohya_state_dict(unet=unet, dtype=torch.float32)
    assert (
        facts["arch"] == "sd1"
        and facts["unet_naming"] == "diffusers"
        and len(facts["adapters"]) == len(state) // 5
    )


def test_text_encoder_only_sdxl_file_uses_te1(tmp_path):
    te1 = build_tiny_text_encoder("sdxl", 1)
    inject_adapter(te1, text_encoder_preset())
    path = save_kohya(tmp_path / "te1.safetensors", text_encoder=te1, base_model_version="sdxl_base_v1-0")
    kfile = read_kohya(path)
    assert set(kfile.prefixes) == {"lora_te1"} and kfile.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    path = save_kohya(tmp_path / "te.safetensors", text_encoder=te1)  # no hint: SD1's single-encoder prefix
    assert set(read_kohya(path).prefixes) == {"lora_te"}


def test_values_beyond_float16_are_refused_naming_modules_and_float32_writes_them(tmp_path):
    """fp16 export (the default) would turn values above 65,504 into Inf without a word."""
    unet, _ = _models("sd1", te=False)
    path_, layer = next(iter(adapter_layers(unet).items()))
    with torch.no_grad():
        layer.adapters["default"].hada_w1_a[0, 0] = 1e5
    out = tmp_path / "big.safetensors"
    with pytest.raises(NonFiniteError, match=r"refusing to write .*big\.safetensors in float16") as info:
        save_kohya(out, unet=unet)
    message = str(info.value)
    assert "lora_unet_" + path_.replace(".", "_") in message and "max |x| = 1e+05" in message
    assert "float32 or bfloat16" in message and not out.exists()
    save_kohya(out, unet=unet, dtype=torch.float32)
    assert read_kohya(out).modules["lora_unet_" + path_.replace(".", "_")].tensors["hada_w1_a"][0, 0] == 1e5
    save_kohya(tmp_path / "bf16.safetensors", unet=unet, dtype=torch.bfloat16)


def test_non_finite_adapters_and_alphas_are_never_written(tmp_path):
    unet, _ = _models("sd1", te=False)
    layers = list(adapter_layers(unet).values())
    with torch.no_grad():
        layers[0].adapters["default"].hada_w2_b[0, 0] = float("nan")
    layers[1].adapters["default"].alpha = float("inf")
    out = tmp_path / "nan.safetensors"
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(NonFiniteError, match="2 module\\(s\\) have NaN or infinite values"):
            save_kohya(out, unet=unet, dtype=dtype)
    assert not out.exists() and not list(tmp_path.iterdir())  # no file, no temporary left
