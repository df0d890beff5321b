"""load_kohya / read_kohya: hand-written files in the doc's layouts, bit-exact round trips, one error listing
every problem before anything changes, and the reports of docs/kohya-format.md section 9's traps."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from loha_diffusion.adapters import LayerSpec
from loha_diffusion.adapters.lokr import LoKrAdapter
from loha_diffusion.errors import AdapterFileNotFoundError, AdapterNameError
from loha_diffusion.formats.kohya import KohyaFormatError, kohya_name_map, load_kohya, read_kohya, save_kohya
from loha_diffusion.model import adapter_layers, add_adapter, get_adapter_state_dict, inject_adapter
from loha_diffusion.targeting import text_encoder_preset, unet_preset
from loha_diffusion.tiny import build_tiny_text_encoder, build_tiny_unet


def _components(pipe) -> dict:
    return {
        "unet": pipe.unet,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": getattr(pipe, "text_encoder_2", None),
    }


def _adapter(pipe, component: str, path: str, name: str = "default"):
    return adapter_layers(getattr(pipe, component))[path].adapters[name]


def _rewrite(src, dst, edit) -> None:
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo,cp", [("loha", False), ("loha", True), ("lora", False), ("lora", True)])
def test_hand_written_files_load_with_reference_deltas(tmp_path, request, kohya_files, arch, algo, cp):
    pipe = request.getfixturevalue(f"tiny_{arch}_pipeline")
    path = tmp_path / "hand.safetensors"
    targets = kohya_files.write(path, pipe, algo=algo, cp=cp, rank=4, alpha=3.0)
    assert load_kohya(path, **_components(pipe), adapter_name="hand") == "hand"
    tensors = load_file(str(path))
    for kohya_name, (component, module_path) in targets.items():
        adapter = _adapter(pipe, component, module_path, "hand")
        assert adapter.kind == algo
        assert all(t.dtype == torch.float32 for t in adapter.state_tensors().values())
        own = {k.partition(".")[2]: v for k, v in tensors.items() if k.partition(".")[0] == kohya_name}
        expected = kohya_files.delta(own, tuple(adapter.spec.weight_shape))
        got = adapter.delta_weight().detach().double()
        assert (got - expected).abs().max() <= 1e-6 * expected.abs().max(), kohya_name
    loaded = sum(len(adapter_layers(m)) for m in _components(pipe).values() if m is not None)
    assert loaded == len(targets)


def test_loaded_unet_matches_weights_patched_by_hand(tmp_path, kohya_files):
    """The end result, not just the deltas: a UNet with the loaded adapter (scale 0.7) computes what a UNet
    whose weights were patched by hand with 0.7 × ΔW computes."""
    from loha_diffusion.tiny import build_tiny_pipeline

    ours, by_hand = build_tiny_pipeline("sd1"), build_tiny_pipeline("sd1")
    path = tmp_path / "hand.safetensors"
    targets = kohya_files.write(path, ours, algo="loha", cp=True)
    load_kohya(path, unet=ours.unet, text_encoder=ours.text_encoder, scale=0.7)
    kohya_files.patch(by_hand, path, targets, multiplier=0.7)
    torch.manual_seed(0)
    sample, hidden = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
    with torch.no_grad():
        a = ours.unet(sample, 10, hidden).sample
        b = by_hand.unet(sample, 10, hidden).sample
        base = build_tiny_pipeline("sd1").unet(sample, 10, hidden).sample
    assert (a - b).abs().max() <= 1e-4 * (b - base).abs().max()
    assert (b - base).abs().max() > 1e-3  # the adapter changes the output


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tmp_path, tiny_sd1_pipeline, kohya_files, dtype):
    pipe = tiny_sd1_pipeline
    path = tmp_path / "half.safetensors"
    targets = kohya_files.write(path, pipe, algo="loha", cp=True, dtype=dtype)
    kfile = read_kohya(path)
    assert kfile.dtypes == [str(dtype).replace("torch.", "")]
    load_kohya(path, unet=pipe.unet, text_encoder=pipe.text_encoder)
    name, (component, module_path) = next(iter(targets.items()))
    adapter = _adapter(pipe, component, module_path)
    assert adapter.hada_w1_a.dtype == torch.float32  # factors are copied into fp32, as LyCORIS does
    expected = kfile.modules[name].delta_weight(adapter.spec.weight_shape)  # from the stored (rounded) values
    assert torch.allclose(adapter.delta_weight().detach(), expected, rtol=1e-5, atol=1e-7)


def _trained_models(arch: str, algo: str, cp: bool):
    torch.manual_seed(1)
    unet = build_tiny_unet(arch)
    inject_adapter(
        unet,
        unet_preset("full", algo=algo, r=4, alpha=3, conv_r=2, use_effective_conv2d=cp, init_weights=False),
    )
    encoders = [build_tiny_text_encoder(arch, i) for i in ((1, 2) if arch == "sdxl" else (1,))]
    for encoder in encoders:
        inject_adapter(encoder, text_encoder_preset(algo=algo, r=2, alpha=5, init_weights=False))
    return unet, encoders


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo,cp", [("loha", False), ("loha", True), ("lora", False), ("lora", True)])
def test_round_trip_is_bit_exact(tmp_path, arch, algo, cp):
    unet, encoders = _trained_models(arch, algo, cp)
    names = ("text_encoder", "text_encoder_2")
    path = save_kohya(
        tmp_path / "rt.safetensors", unet=unet, dtype=torch.float32, **dict(zip(names, encoders))
    )
    fresh_unet = build_tiny_unet(arch)
    fresh_encoders = [build_tiny_text_encoder(arch, i) for i in range(1, len(encoders) + 1)]
    load_kohya(path, unet=fresh_unet, **dict(zip(names, fresh_encoders)))
    for before, after in zip([unet, *encoders], [fresh_unet, *fresh_encoders]):
        a, b = get_adapter_state_dict(before), get_adapter_state_dict(after)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        for path_, layer in adapter_layers(before).items():
            old, new = layer.adapters["default"], adapter_layers(after)[path_].adapters["default"]
            assert (old.alpha, old.r, old.kind) == (new.alpha, new.r, new.kind)


def test_lokr_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    unet = build_tiny_unet("sd1")
    forms = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": dict(decompose_w2=True),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": dict(
            decompose_w1=True, decompose_w2=True
        ),
        "down_blocks.0.resnets.0.conv1": dict(use_tucker=True),
        "down_blocks.0.resnets.0.conv2": dict(decompose_w2=False),
        "conv_in": dict(decompose_w2=True),
    }
    for path_, kwargs in forms.items():
        spec = LayerSpec.from_module(unet.get_submodule(path_))
        add_adapter(unet, path_, "default", LoKrAdapter(spec, 2, 1.5, init_weights=False, **kwargs))
    path = save_kohya(tmp_path / "lokr.safetensors", unet=unet, dtype=torch.float32)
    kfile = read_kohya(path)
    assert (
        kfile.kinds == {"lokr": 5}
        and "lokr_t2" in kfile.modules["lora_unet_down_blocks_0_resnets_0_conv1"].tensors
    )
    fresh = build_tiny_unet("sd1")
    # conv2's halves are both full: its alpha 1.5 is ignored (scaling 1), and differs from the dim 2.
    with pytest.warns(UserWarning, match=r"1 LoKr module.*alpha 1\.5, not the network dim \(2\).*conv2"):
        load_kohya(path, unet=fresh)
    a, b = get_adapter_state_dict(unet), get_adapter_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for path_ in forms:
        assert torch.equal(
            adapter_layers(unet)[path_].adapters["default"].delta_weight(),
            adapter_layers(fresh)[path_].adapters["default"].delta_weight(),
        )


def test_all_problems_in_one_error_and_nothing_changes(tmp_path, tiny_sd1_pipeline, kohya_files):
    pipe = tiny_sd1_pipeline
    good = tmp_path / "good.safetensors"
    kohya_files.write(good, pipe, algo="loha", cp=True)
    bad = tmp_path / "bad.safetensors"

    def edit(t):
        q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        t[f"{q}.dora_scale"] = torch.ones(1, 32)
        k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
        t[f"{k}.hada_w1_b"] = torch.randn(4, 7)  # wrong in-features
        for i in range(7):
            t[f"lora_unet_no_such_module_{i}.hada_w1_a"] = torch.randn(4, 4)
            t[f"lora_unet_no_such_module_{i}.hada_w1_b"] = torch.randn(4, 4)
            t[f"lora_unet_no_such_module_{i}.hada_w2_a"] = torch.randn(4, 4)
            t[f"lora_unet_no_such_module_{i}.hada_w2_b"] = torch.randn(4, 4)
        t["lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks"] = torch.randn(4, 4)
        t["lora_unet_down_blocks_0_attentions_0_proj_out.alpha"] = torch.ones(2)
        # The same module under its LDM name as well.
        for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"):
            t[f"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_v.{n}"] = t[
                f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.{n}"
            ].clone()

    _rewrite(good, bad, edit)
    with pytest.raises(KohyaFormatError) as err:
        load_kohya(bad, unet=pipe.unet, text_encoder=pipe.text_encoder)
    message = str(err.value)
    assert "nothing was changed" in message
    assert "dora_scale" in message and "Re-export the adapter without DoRA" in message
    assert "7 keys that match no module" in message and "... and 2 more" in message
    assert "attn1_to_k -> unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k" in message
    width = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight.shape[1]
    assert f"hada_w1_b: expected (4, {width}), got (4, 7)" in message
    assert "oft_blocks" in message and "alpha must be a 0-dim or 1-element tensor" in message
    assert "1 modules given twice" in message
    assert adapter_layers(pipe.unet) == {} and adapter_layers(pipe.text_encoder) == {}

    # Text-encoder keys without a text encoder: say which argument is missing.
    with pytest.raises(KohyaFormatError, match=r"12 lora_te_ modules need text_encoder="):
        load_kohya(good, unet=pipe.unet)
    assert adapter_layers(pipe.unet) == {}


def test_wrong_architecture_is_named(tmp_path, kohya_files):
    from loha_diffusion.tiny import build_tiny_pipeline

    sd1, sdxl = build_tiny_pipeline("sd1"), build_tiny_pipeline("sdxl")
    sd1_file, sdxl_file = tmp_path / "sd1.safetensors", tmp_path / "sdxl.safetensors"
    kohya_files.write(sd1_file, sd1, metadata={"ss_base_model_version": "sd_v1"})
    kohya_files.write(sdxl_file, sdxl)
    with pytest.raises(KohyaFormatError, match="the file is for SD1 but the UNet is SDXL-shaped"):
        load_kohya(sd1_file, **_components(sdxl))
    with pytest.raises(KohyaFormatError, match="the file is for SDXL but the UNet is SD1-shaped"):
        load_kohya(sdxl_file, unet=sd1.unet, text_encoder=sd1.text_encoder)
    assert all(not adapter_layers(m) for m in (sd1.unet, sd1.text_encoder, sdxl.unet, sdxl.text_encoder))


def test_missing_alpha_means_scale_one(tmp_path, tiny_sd1_pipeline, kohya_files):
    pipe = tiny_sd1_pipeline
    src, dst = tmp_path / "a.safetensors", tmp_path / "noalpha.safetensors"
    targets = kohya_files.write(src, pipe, algo="loha", rank=4, alpha=2.0)
    _rewrite(src, dst, lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".alpha")]])
    with pytest.warns(UserWarning, match="no alpha.*scaling 1.0"):
        load_kohya(dst, unet=pipe.unet, text_encoder=pipe.text_encoder)
    tensors = load_file(str(dst))
    name, (component, module_path) = next(iter(targets.items()))
    own = {k.partition(".")[2]: v for k, v in tensors.items() if k.partition(".")[0] == name}
    adapter = _adapter(pipe, component, module_path)
    assert adapter.scaling == 1.0
    raw = (own["hada_w1_a"] @ own["hada_w1_b"]) * (own["hada_w2_a"] @ own["hada_w2_b"])
    assert torch.allclose(adapter.delta_weight().detach().reshape(raw.shape), raw)


def test_alpha_as_one_element_tensor(tmp_path, tiny_sd1_pipeline, kohya_files):
    pipe = tiny_sd1_pipeline
    src, dst = tmp_path / "a.safetensors", tmp_path / "a1.safetensors"
    kohya_files.write(src, pipe, alpha=3.0, rank=4)
    _rewrite(src, dst, lambda t: t.update({k: v.reshape(1) for k, v in t.items() if k.endswith(".alpha")}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_kohya(dst, unet=pipe.unet, text_encoder=pipe.text_encoder)
    assert {layer.adapters["default"].scaling for layer in adapter_layers(pipe.unet).values()} == {0.75}


def test_transposed_cp_factor_is_reported(tmp_path, tiny_sd1_pipeline, kohya_files):
    """A CP `hada_w1_a` in the flat (out, r) layout instead of rank-first (r, out) (docs/kohya-format.md section 3)."""
    pipe = tiny_sd1_pipeline
    src, dst = tmp_path / "cp.safetensors", tmp_path / "cp_t.safetensors"
    kohya_files.write(src, pipe, algo="loha", cp=True, rank=4)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    _rewrite(src, dst, lambda t: t.update({f"{conv}.hada_w1_a": t[f"{conv}.hada_w1_a"].T.contiguous()}))
    out = pipe.unet.down_blocks[0].resnets[0].conv1.weight.shape[0]
    pattern = rf"resnets_0_conv1 .*hada_w1_a: expected \(4, {out}\), got \({out}, 4\)"
    with pytest.raises(KohyaFormatError, match=pattern):
        load_kohya(dst, unet=pipe.unet, text_encoder=pipe.text_encoder)


def test_partial_te2_attention_is_reported(tmp_path, tiny_sdxl_pipeline, kohya_files):
    pipe = tiny_sdxl_pipeline
    src, dst = tmp_path / "x.safetensors", tmp_path / "partial.safetensors"
    kohya_files.write(src, pipe)
    gone = "lora_te2_text_model_encoder_layers_1_self_attn_out_proj."
    _rewrite(src, dst, lambda t: [t.pop(k) for k in [k for k in t if k.startswith(gone)]])
    with pytest.warns(UserWarning, match="te2 attention with only some of q/k/v/out_proj"):
        load_kohya(dst, **_components(pipe))
    assert "text_model.encoder.layers.1.self_attn.q_proj" in adapter_layers(pipe.text_encoder_2)


def test_sdxl_diffusers_names_load_and_are_reported(tmp_path, tiny_sdxl_pipeline):
    """SDXL files with diffusers UNet names (LyCORIS, OneTrainer, ...) load like LDM-named ones; keys A1111 drops
    (up_blocks_0_upsamplers_0_conv) are reported."""
    pipe = tiny_sdxl_pipeline
    torch.manual_seed(0)
    source = build_tiny_unet("sdxl")
    inject_adapter(source, unet_preset("full", init_weights=False))
    ldm = save_kohya(tmp_path / "ldm.safetensors", unet=source, dtype=torch.float32)
    with pytest.warns(UserWarning, match="diffusers names"):
        diffusers = save_kohya(
            tmp_path / "dif.safetensors", unet=source, dtype=torch.float32, unet_naming="diffusers"
        )
    names = read_kohya(diffusers).modules
    assert (
        "lora_unet_up_blocks_0_upsamplers_0_conv" in names
        and "lora_unet_output_blocks_2_2_conv" in read_kohya(ldm).modules
    )
    with pytest.warns(
        UserWarning, match=r"A1111 silently drops \['lora_unet_up_blocks_0_upsamplers_0_conv'\]"
    ):
        load_kohya(diffusers, unet=pipe.unet, adapter_name="dif")
    load_kohya(ldm, unet=pipe.unet, adapter_name="ldm")
    for layer in adapter_layers(pipe.unet).values():
        assert torch.equal(layer.adapters["dif"].delta_weight(), layer.adapters["ldm"].delta_weight())


def test_lora_2d_down_on_1x1_conv(tmp_path, tiny_sd1_pipeline, kohya_files):
    """Diffusers-style LoRA files store proj_in factors 2-D even where SD1's proj_in is a 1x1 conv; A1111 and
    ComfyUI reshape them."""
    pipe = tiny_sd1_pipeline
    src, dst = tmp_path / "l.safetensors", tmp_path / "l2d.safetensors"
    kohya_files.write(src, pipe, algo="lora", convs=False)
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    _rewrite(
        src,
        dst,
        lambda t: t.update(
            {f"{proj}.{n}": t[f"{proj}.{n}"].flatten(1) for n in ("lora_down.weight", "lora_up.weight")}
        ),
    )
    load_kohya(dst, unet=pipe.unet, text_encoder=pipe.text_encoder)
    got = _adapter(pipe, "unet", "down_blocks.0.attentions.0.proj_in").delta_weight().detach()
    assert got.dim() == 4 and got.shape[2:] == (1, 1)
    expected = read_kohya(src).modules[proj].delta_weight(got.shape)
    assert torch.allclose(got, expected, atol=1e-7)


def test_scale_and_name_arguments(tmp_path, tiny_sd1_pipeline, kohya_files):
    pipe = tiny_sd1_pipeline
    path = tmp_path / "s.safetensors"
    kohya_files.write(path, pipe)
    load_kohya(path, unet=pipe.unet, text_encoder=pipe.text_encoder, adapter_name="style", scale=0.5)
    assert {layer.adapters["style"].scale for layer in adapter_layers(pipe.unet).values()} == {0.5}
    with pytest.raises(AdapterNameError, match="already used"):
        load_kohya(path, unet=pipe.unet, text_encoder=pipe.text_encoder, adapter_name="style")
    with pytest.raises(ValueError, match="at least one of"):
        load_kohya(path)
    with pytest.raises(AdapterNameError, match="use only letters, digits"):
        load_kohya(path, unet=pipe.unet, adapter_name="a.b")
    empty = tmp_path / "empty.safetensors"
    save_file({"other": torch.zeros(1)}, str(empty))
    with pytest.raises(KohyaFormatError, match="no '<module>.<tensor>' form"):
        load_kohya(empty, unet=pipe.unet)
    save_file({"x.y": torch.zeros(1)}, str(empty))
    with pytest.raises(KohyaFormatError, match="no LoHa, LoRA or LoKr tensors"):
        load_kohya(empty, unet=pipe.unet)
    with pytest.raises(AdapterFileNotFoundError):  # also a FileNotFoundError
        load_kohya(tmp_path / "missing.safetensors", unet=pipe.unet)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(KohyaFormatError, match="not a readable .safetensors file"):
        read_kohya(garbage)


def test_name_map_covers_every_naming(tiny_sdxl_pipeline):
    pipe = tiny_sdxl_pipeline
    names = kohya_name_map(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    to_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    for name, style in [
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "diffusers"),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "ldm"),
        ("lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "lycoris"),
    ]:
        assert (names[name].component, names[name].path, names[name].style) == ("unet", to_q, style)
    for name, component, style in [
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder", "te"),
        (
            "lora_te_text_model_encoder_layers_0_mlp_fc1",
            "text_encoder",
            "te",
        ),  # ComfyUI reads lora_te_ as te1
        ("lora_te1_encoder_layers_0_mlp_fc1", "text_encoder", "te_raw"),
        ("lora_te2_text_model_encoder_layers_2_mlp_fc1", "text_encoder_2", "te"),
    ]:
        assert (names[name].component, names[name].style) == (component, style)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("unet_naming", ["diffusers", "ldm"])
def test_guess_architecture_from_names_alone(arch, unet_naming):
    from loha_diffusion.formats.kohya import build_kohya_state_dict, parse_kohya_state_dict

    unet = build_tiny_unet(arch)
    inject_adapter(unet, unet_preset("attn"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers names for SDXL warn
        state, _ = build_kohya_state_dict(unet=unet, unet_naming=unet_naming)
    assert parse_kohya_state_dict(state).guess_architecture() == arch
    assert parse_kohya_state_dict(state, {"ss_base_model_version": "sd_v2"}).guess_architecture() == "sd2"


def _full_lokr_file(path, alpha, metadata):
    """One LoKr module with both halves full (lokr_w1 (2, 4), lokr_w2 (8, 4)) for to_q (16 x 16) of the tiny
    SD1 UNet, written by hand in LyCORIS' layout (docs/kohya-format.md section 5)."""
    gen = torch.Generator().manual_seed(3)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{name}.lokr_w1": torch.randn(2, 4, generator=gen),
        f"{name}.lokr_w2": torch.randn(8, 4, generator=gen),
    }
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata=metadata)
    return name, tensors


def test_full_lokr_alpha_is_ignored_with_one_warning_naming_modules_alpha_and_scale(tmp_path):
    """Issue 13 item 5: with both halves full, LyCORIS, ComfyUI and A1111 apply scaling 1 whatever the alpha;
    we do too, and say so once per file when the alpha differs from the network dim in the metadata."""
    path = tmp_path / "full.safetensors"
    name, tensors = _full_lokr_file(path, 4, {"ss_network_dim": "32", "ss_network_module": "lycoris.kohya"})
    unet = build_tiny_unet("sd1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_kohya(path, unet=unet)
    lokr_warnings = [w for w in caught if "LoKr" in str(w.message)]
    assert len(lokr_warnings) == 1
    text = str(lokr_warnings[0].message)
    assert f"1 LoKr module(s) of {path}" in text and name in text
    assert "alpha 4, not the network dim (32)" in text and "scaling 1.0 applied" in text
    # The value: kron(w1, w2) at scaling 1 (not alpha / dim = 1/8).
    adapter = adapter_layers(unet)["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].adapters[
        "default"
    ]
    expected = torch.kron(tensors[f"{name}.lokr_w1"], tensors[f"{name}.lokr_w2"])
    assert torch.allclose(adapter.delta_weight(), expected)

    # alpha = dim (what LyCORIS writes for full halves), or no dim recorded: nothing to say.
    for alpha, metadata in ((32, {"ss_network_dim": "32"}), (4, {}), (None, {"ss_network_dim": "32"})):
        _full_lokr_file(path, alpha, metadata)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_kohya(path, unet=build_tiny_unet("sd1"))


def test_non_finite_factors_and_bad_alphas_are_refused_unless_allowed(
    tmp_path, tiny_sd1_pipeline, kohya_files
):
    pipe = tiny_sd1_pipeline
    good = tmp_path / "good.safetensors"
    targets = kohya_files.write(good, pipe, algo="lora")
    first, second, third = sorted(targets)[:3]

    def edit(tensors):
        tensors[f"{first}.lora_up.weight"][0, 0] = float("inf")
        tensors[f"{second}.alpha"] = torch.tensor(float("nan"))
        tensors[f"{third}.alpha"] = torch.tensor(-4.0)

    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, edit)
    kfile = read_kohya(bad)
    assert not kfile.all_problems  # readable and well-formed: the values are the problem
    assert kfile.value_problems == sorted(
        [
            f"{first}: NaN or infinite values in ['lora_up.weight']",
            f"{second}: alpha is nan",
            f"{third}: alpha -4 is negative (it would flip the delta's sign)",
        ]
    )
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(KohyaFormatError) as info:
        load_kohya(bad, **_components(pipe))
    message = str(info.value)
    assert str(bad) in message and "nothing was changed" in message and "allow_non_finite=True" in message
    assert first in message and second in message and third in message
    assert not adapter_layers(pipe.unet) and all(
        torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items()
    )
    # The opt-in loads them as they are (the caller owns the NaN).
    load_kohya(bad, allow_non_finite=True, **_components(pipe))
    assert adapter_layers(pipe.text_encoder) or adapter_layers(pipe.unet)


def test_delta_beyond_float16_range_is_refused_and_scale_counts(tmp_path, tiny_sd1_pipeline, kohya_files):
    """A finite file whose delta exceeds 65,504 gives Inf in half precision (ComfyUI/A1111's default): refused
    by default, naming the module and the peak; a scale that brings it back into range loads."""
    pipe = tiny_sd1_pipeline
    good = tmp_path / "good.safetensors"
    targets = kohya_files.write(good, pipe, algo="lora", convs=False)
    name = sorted(targets)[0]

    def edit(tensors):
        tensors[f"{name}.alpha"] = torch.tensor(60000.0)  # a valid fp16 alpha
        tensors[f"{name}.lora_up.weight"] *= 1e3

    bad = tmp_path / "huge.safetensors"
    _rewrite(good, bad, edit)
    with pytest.raises(
        KohyaFormatError, match=rf"{name} \(\S+\): the delta reaches \S+ at scale 1, beyond float16"
    ):
        load_kohya(bad, **_components(pipe))
    assert not adapter_layers(pipe.unet) and not adapter_layers(pipe.text_encoder)
    peak = read_kohya(bad).modules[name].peak_delta()
    assert peak > 65504
    load_kohya(bad, scale=60000 / peak, **_components(pipe))


@pytest.mark.parametrize(
    "alpha,problem",
    [
        (torch.tensor(True), "alpha must be a real number, got a bool tensor"),
        (torch.ones(2), "alpha must be a 0-dim or 1-element tensor, got shape (2,)"),
        (torch.tensor(1e6), "alpha 1e+06 is beyond float16's range"),
    ],
)
def test_alphas_that_are_not_usable_numbers(tmp_path, tiny_sd1_pipeline, kohya_files, alpha, problem):
    good = tmp_path / "good.safetensors"
    name = sorted(kohya_files.write(good, tiny_sd1_pipeline, algo="lora"))[0]
    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, lambda tensors: tensors.update({f"{name}.alpha": alpha}))
    module = read_kohya(bad).modules[name]
    assert problem in " ".join(module.problems + module.value_problems)
    with pytest.raises(KohyaFormatError, match=re.escape(problem)):
        load_kohya(bad, **_components(tiny_sd1_pipeline))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda data: b"", "is empty (0 bytes)"),
        (lambda data: data[: len(data) // 2], "is not a readable .safetensors file"),
        (lambda data: data[:9] + b"\xff" + data[10:], "is not a readable .safetensors file"),
        (lambda data: (2**40).to_bytes(8, "little") + data[8:], "is not a readable .safetensors file"),
    ],
)
def test_damaged_files_name_the_file(tmp_path, tiny_sd1_pipeline, kohya_files, damage, message):
    good = tmp_path / "good.safetensors"
    kohya_files.write(good, tiny_sd1_pipeline, algo="lora")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(KohyaFormatError, match=re.escape(f"{bad} {message}")):
        read_kohya(bad)
