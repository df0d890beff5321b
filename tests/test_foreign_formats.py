"""Adapter files in other tools' layouts (formats/foreign.py, formats/embeddings.py): diffusers and PEFT LoRA files
written by those libraries' own writers, PEFT LoHa/LoKr state dicts, diffusers' older layouts, OneTrainer's
`lora_te2_text_projection`, embeddings bundled A1111's way, and the errors for files that hold no SD adapter.

Every loaded delta is compared with the plain formula of the format (`formats.reference`: `scale × up @ down`,
the LoHa/LoKr products), the scale being the one the writing library applies (diffusers: `lora_alpha / r` from
the file's `lora_adapter_metadata`, else 1; an `alpha` tensor: `alpha / r`, as ComfyUI)."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loha_diffusion import cli
from loha_diffusion.errors import KohyaFormatError
from loha_diffusion.formats import foreign
from loha_diffusion.formats.embeddings import BundledEmbeddingWarning
from loha_diffusion.formats.kohya import load_kohya, read_kohya, save_kohya
from loha_diffusion.formats.reference import reference_delta
from loha_diffusion.model import adapter_layers
from loha_diffusion.pipeline import list_adapters, load_adapter
from loha_diffusion.tiny import build_tiny_pipeline, build_tiny_text_encoder

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _inject(model, config) -> None:
    """PEFT adapter "default" with random non-zero factors (lora_B too), registered as diffusers' add_adapter
    does (transformers 5's add_adapter needs a newer PEFT than the test pin)."""
    inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}
    gen = torch.Generator().manual_seed(len(list(model.parameters())))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(t in name for t in ("lora_", "hada_", "lokr_")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _peft_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _expected_lora(layer, scaling: float) -> torch.Tensor:
    """ΔW by the plain formula: scaling × up @ down (Kohya tensors, alpha = scaling × rank)."""
    down, up = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    tensors = {"lora_down.weight": down.double(), "lora_up.weight": up.double()}
    return reference_delta(tensors, scaling * down.shape[0], tuple(layer.base_layer.weight.shape))


def _check_lora_deltas(source: dict, target: dict, adapter_name: str, scalings: dict[str, float]) -> int:
    """Every PEFT layer of the `source` components against the adapter loaded into `target`; returns the count."""
    checked = 0
    for component, model in source.items():
        loaded = adapter_layers(target[component])
        for path, layer in _peft_layers(model).items():
            expected = _expected_lora(layer, scalings[component])
            # The writer's own delta agrees (PEFT's get_delta_weight, with the scale diffusers applies).
            peft_delta = layer.get_delta_weight("default").double() / layer.scaling["default"]
            assert (peft_delta * scalings[component] - expected).abs().max() <= 1e-5 * expected.abs().max()
            got = loaded[path].adapters[adapter_name].delta_weight().detach().double()
            assert (got - expected).abs().max() <= 1e-6 * expected.abs().max(), f"{component}.{path}"
            checked += 1
    return checked


def _diffusers_file(tmp_path, arch: str, metadata: bool):
    """A diffusers LoRA file written by diffusers' save_lora_weights, as its training scripts write it
    (convert_state_dict_to_diffusers(get_peft_model_state_dict(model))); returns (file, source components,
    the scale diffusers applies per component)."""
    pipe = build_tiny_pipeline(arch)
    _inject(pipe.unet, LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    te_targets = TE_TARGETS + (["text_projection"] if arch == "sdxl" else [])
    encoders = {"text_encoder": pipe.text_encoder}
    if arch == "sdxl":
        encoders["text_encoder_2"] = pipe.text_encoder_2
    for i, encoder in enumerate(encoders.values()):
        _inject(encoder, LoraConfig(r=2, lora_alpha=6 + i, target_modules=te_targets))
    source = {"unet": pipe.unet, **encoders}
    layers = {
        f"{c}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m))
        for c, m in source.items()
    }
    if metadata:
        layers.update(
            {f"{c}_lora_adapter_metadata": m.peft_config["default"].to_dict() for c, m in source.items()}
        )
        scalings = {"unet": 2.0, "text_encoder": 3.0, "text_encoder_2": 3.5}
    else:
        scalings = dict.fromkeys(COMPONENTS, 1.0)  # diffusers without alphas: lora_alpha = r
    writer = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    writer.save_lora_weights(tmp_path / "lora", **layers)
    return tmp_path / "lora" / "pytorch_lora_weights.safetensors", source, scalings


@pytest.mark.parametrize("arch,metadata", [("sd1", True), ("sd1", False), ("sdxl", True)])
def test_diffusers_lora_files_load_with_diffusers_scales(tmp_path, arch, metadata):
    path, source, scalings = _diffusers_file(tmp_path, arch, metadata)
    keys = list(load_file(str(path)))
    assert any(".lora.down.weight" in k for k in keys) and any(".lora_A.weight" in k for k in keys)
    pipe = build_tiny_pipeline(arch)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # a diffusers file is not a Kohya file with flaws: nothing to warn about
        name = load_adapter(pipe, path, adapter_name="dl")
    target = {c: getattr(pipe, c) for c in source}
    checked = _check_lora_deltas(source, target, name, scalings)
    assert checked == sum(len(adapter_layers(m)) for m in target.values()) > 0
    assert sorted(list_adapters(pipe)["dl"]) == sorted(source)


def test_diffusers_sdxl_file_reads_as_kohya_sdxl_names(tmp_path):
    path, _, _ = _diffusers_file(tmp_path, "sdxl", metadata=True)
    kfile = read_kohya(path)
    assert not kfile.all_problems
    assert (
        kfile.guess_architecture() == "sdxl" and kfile.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    )
    assert "lora_adapter_metadata" not in kfile.metadata  # consumed into the alphas
    names = set(kfile.modules)
    assert (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    )  # LDM names, as Kohya writes SDXL
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # down_blocks.0.resnets.0.conv1
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_projection" in names
    assert not any(n.startswith("lora_unet_down_blocks") for n in names)
    alphas = {n: m.alpha for n, m in kfile.modules.items()}
    assert alphas["lora_unet_input_blocks_4_1_proj_in"] == 8.0  # scale 2 at rank 4
    assert alphas["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == 7.0  # scale 3.5 at rank 2


def test_convert_turns_a_diffusers_file_into_a_kohya_file(tmp_path):
    path, source, scalings = _diffusers_file(tmp_path, "sd1", metadata=True)
    out = tmp_path / "kohya.safetensors"
    assert cli.main(["convert", str(path), str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_adapter_metadata" not in metadata and "ss_base_model_version" not in metadata  # SD1 or SD2
    pipe = build_tiny_pipeline("sd1")
    load_kohya(out, unet=pipe.unet, text_encoder=pipe.text_encoder, adapter_name="k")
    _check_lora_deltas(source, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "k", scalings)


@pytest.mark.parametrize("adapter_in_keys", [False, True])
def test_peft_single_file_lora(tmp_path, adapter_in_keys):
    pipe = build_tiny_pipeline("sd1")
    _inject(pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))
    if adapter_in_keys:  # model.state_dict(): `lora_A.default.weight`
        state = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
        assert any(".lora_A.default.weight" in k for k in state)
    else:
        state = get_peft_model_state_dict(pipe.unet)
    path = tmp_path / "peft.safetensors"
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(path))
    fresh = build_tiny_pipeline("sd1")
    load_kohya(path, unet=fresh.unet)
    assert _check_lora_deltas({"unet": pipe.unet}, {"unet": fresh.unet}, "default", {"unet": 1.0}) > 0


@pytest.mark.parametrize("config", [LoHaConfig(r=4, alpha=4), LoKrConfig(r=4, alpha=4)], ids=["loha", "lokr"])
def test_peft_single_file_loha_lokr(tmp_path, config):
    """PEFT's LoHa/LoKr tensors are the Kohya ones (docs/kohya-format.md section 10); PEFT's own delta is the
    reference, and without a config the scale is 1 (diffusers' rule, alpha baked in)."""
    config.target_modules = ["to_q", "to_out.0", "proj_in", "ff.net.2"]
    unet = build_tiny_pipeline("sd1").unet
    _inject(unet, config)
    path = tmp_path / "peft.safetensors"
    state = get_peft_model_state_dict(unet)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(path))
    fresh = build_tiny_pipeline("sd1").unet
    load_kohya(path, unet=fresh)
    loaded = adapter_layers(fresh)
    peft_layers = {n: m for n, m in unet.named_modules() if hasattr(m, "get_delta_weight") and n in loaded}
    assert len(peft_layers) == len(loaded) > 0
    kfile = read_kohya(path)
    for path_, layer in peft_layers.items():
        expected = layer.get_delta_weight("default").double()  # PEFT's scaling alpha / r = 1 here
        got = loaded[path_].adapters["default"].delta_weight().detach().double()
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), path_
        module = next(m for n, m in kfile.modules.items() if n.endswith(path_.replace(".", "_")))
        plain = reference_delta(
            {k: v.double() for k, v in module.tensors.items()}, module.alpha, expected.shape
        )
        assert (plain - expected).abs().max() <= 1e-5 * expected.abs().max(), path_


def test_older_diffusers_layouts_and_alpha_tensors(tmp_path):
    """Attention processors (`processor.to_q_lora.down.weight`), `lora_linear_layer`, a UNet without the `unet.`
    prefix, Kohya names with PEFT tensor names, and `.alpha` (alpha / r, as ComfyUI applies it)."""
    pipe = build_tiny_pipeline("sd1")
    gen = torch.Generator().manual_seed(3)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    te_attn = "text_model.encoder.layers.1.self_attn"
    cases = {  # key stem in the file -> (component, module path, tensor names of down/up, alpha)
        f"{attn}.processor.to_q_lora": ("unet", f"{attn}.to_q", ("down.weight", "up.weight"), None),
        f"unet.{attn}.processor.to_out_lora": ("unet", f"{attn}.to_out.0", ("down.weight", "up.weight"), 3.0),
        f"text_encoder.{te_attn}.to_k_lora": (
            "text_encoder",
            "encoder.layers.1.self_attn.k_proj",
            ("down.weight", "up.weight"),
            None,
        ),
        f"text_encoder.{te_attn}.v_proj.lora_linear_layer": (
            "text_encoder",
            "encoder.layers.1.self_attn.v_proj",
            ("down.weight", "up.weight"),
            1.0,
        ),
        "lora_unet_mid_block_attentions_0_proj_in": (
            "unet",
            "mid_block.attentions.0.proj_in",
            ("lora_A.weight", "lora_B.weight"),
            2.0,
        ),
    }
    state, expected = {}, {}
    for stem, (component, path, (down_name, up_name), alpha) in cases.items():
        weight = getattr(pipe, component).get_submodule(path).weight
        down = torch.randn(2, *weight.shape[1:], generator=gen)
        up = torch.randn(weight.shape[0], 2, *([1] * (weight.dim() - 2)), generator=gen)
        state[f"{stem}.{down_name}"], state[f"{stem}.{up_name}"] = down, up
        if alpha is not None:
            state[f"{stem}.alpha"] = torch.tensor(alpha)
        tensors = {"lora_down.weight": down.double(), "lora_up.weight": up.double()}
        expected[(component, path)] = reference_delta(tensors, alpha, tuple(weight.shape))
    path = tmp_path / "old.safetensors"
    save_file(state, str(path))
    load_kohya(path, unet=pipe.unet, text_encoder=pipe.text_encoder)
    for (component, module_path), delta in expected.items():
        got = (
            adapter_layers(getattr(pipe, component))[module_path].adapters["default"].delta_weight().double()
        )
        assert (got.detach() - delta).abs().max() <= 1e-6 * delta.abs().max(), module_path


def _flux_like(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file(
        {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize(
    "tensors,match",
    [
        (
            {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
            "full Stable Diffusion checkpoint",
        ),
        ({"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
        ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, "load_textual_inversion"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}, "Flux"),
        ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3)}, "diffusers pipeline folder"),
        (
            {
                "base_model.model.conv_in.lora_A.a.weight": torch.zeros(2, 4, 3, 3),
                "base_model.model.conv_in.lora_A.b.weight": torch.zeros(2, 4, 3, 3),
            },
            "2 adapters",
        ),
        (
            {"bundle_emb.sks.string_to_param.*": torch.zeros(2, 32)},
            "textual-inversion embeddings \\['sks'\\]",
        ),
    ],
)
def test_files_without_an_sd_adapter_are_named(tmp_path, tensors, match):
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(KohyaFormatError, match=match):
        load_adapter(pipe, path)
    assert list_adapters(pipe) == {}


def test_a_flux_lora_in_diffusers_layout_is_named(tmp_path):
    with pytest.raises(KohyaFormatError, match="looks like a LoRA for Flux.*FluxPipeline"):
        read_kohya(_flux_like(tmp_path))


# -- OneTrainer's text projection -----------------------------------------------------------------------------


def test_text_projection_loads_without_warning_and_exports_under_the_loaders_name(tmp_path):
    te2 = build_tiny_text_encoder("sdxl", 2)
    weight = te2.text_projection.weight
    gen = torch.Generator().manual_seed(5)
    tensors = {
        "lora_down.weight": torch.randn(4, weight.shape[1], generator=gen),
        "lora_up.weight": torch.randn(weight.shape[0], 4, generator=gen),
        "alpha": torch.tensor(2.0),
    }
    path = tmp_path / "onetrainer.safetensors"
    save_file({f"lora_te2_text_projection.{k}": v for k, v in tensors.items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ComfyUI maps this name: no "loaders ignore it" warning
        load_kohya(path, text_encoder_2=te2)
    expected = reference_delta({k: v.double() for k, v in tensors.items()}, 2.0, tuple(weight.shape))
    got = adapter_layers(te2)["text_projection"].adapters["default"].delta_weight().detach().double()
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()

    out = tmp_path / "export.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor on export: ComfyUI maps the name written
        save_kohya(out, text_encoder_2=te2, dtype=torch.float32)
    written = load_file(str(out))
    assert {k.partition(".")[0] for k in written} == {"lora_te2_text_projection"}
    for name in ("lora_down.weight", "lora_up.weight"):
        assert torch.equal(written[f"lora_te2_text_projection.{name}"], tensors[name])
    assert written["lora_te2_text_projection.alpha"].item() == 2.0


def test_the_name_older_versions_wrote_for_the_projection_still_loads(tmp_path):
    te2 = build_tiny_text_encoder("sdxl", 2)
    out_f, in_f = te2.text_projection.weight.shape
    path = tmp_path / "old.safetensors"
    save_file(
        {
            "lora_te2_text_model_text_projection.lora_down.weight": torch.ones(2, in_f),
            "lora_te2_text_model_text_projection.lora_up.weight": torch.ones(out_f, 2),
            "lora_te2_text_model_text_projection.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    with pytest.warns(UserWarning, match="lora_te2_text_model_text_projection.*lora_te2_text_projection"):
        load_kohya(path, text_encoder_2=te2)
    assert "text_projection" in adapter_layers(te2)


# -- embeddings bundled in LoRA files (A1111) ------------------------------------------------------------------


def _with_bundle(tmp_path, pipe, kohya_files, bundle: dict[str, torch.Tensor]):
    path = tmp_path / "lora.safetensors"
    kohya_files.write(path, pipe, algo="lora", convs=False)
    tensors = load_file(str(path))
    tensors.update(bundle)
    save_file(tensors, str(path))
    return path


def _encodes_to(pipe, token: str, tokenizer: str, encoder: str, vectors: torch.Tensor) -> bool:
    """The prompt `token` becomes tokens whose input embeddings are `vectors` (the pipeline's own prompt
    expansion, `maybe_convert_prompt`, turns a multi-vector token into `token token_1 ...`)."""
    tok = getattr(pipe, tokenizer)
    ids = tok(pipe.maybe_convert_prompt(token, tok), add_special_tokens=False).input_ids
    table = getattr(pipe, encoder).get_input_embeddings().weight.detach()
    return len(ids) == vectors.shape[0] and torch.allclose(table[ids], vectors)


def test_bundled_embedding_sd1_is_loaded_as_a_textual_inversion(tmp_path, tiny_sd1_pipeline, kohya_files):
    pipe = tiny_sd1_pipeline
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    path = _with_bundle(tmp_path, pipe, kohya_files, {"bundle_emb.sksstyle.string_to_param.*": vectors})
    with warnings.catch_warnings():
        warnings.simplefilter("error", BundledEmbeddingWarning)
        name = load_adapter(pipe, path, adapter_name="style")
    assert list_adapters(pipe)["style"] == ["unet", "text_encoder"] and name == "style"
    assert _encodes_to(pipe, "sksstyle", "tokenizer", "text_encoder", vectors)


def test_bundled_embedding_sdxl_goes_to_both_encoders(tmp_path, tiny_sdxl_pipeline, kohya_files):
    pipe = tiny_sdxl_pipeline
    gen = torch.Generator().manual_seed(8)
    clip_l, clip_g = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)
    bundle = {"bundle_emb.ohwxface.clip_l": clip_l, "bundle_emb.ohwxface.clip_g": clip_g}
    load_adapter(pipe, _with_bundle(tmp_path, pipe, kohya_files, bundle))
    assert _encodes_to(pipe, "ohwxface", "tokenizer", "text_encoder", clip_l)
    assert _encodes_to(pipe, "ohwxface", "tokenizer_2", "text_encoder_2", clip_g)


def test_bundled_embedding_not_applied_is_named(tmp_path, tiny_sd1_pipeline, tiny_sdxl_pipeline, kohya_files):
    path = _with_bundle(
        tmp_path, tiny_sd1_pipeline, kohya_files, {"bundle_emb.sksstyle.string_to_param.*": torch.ones(1, 32)}
    )
    with pytest.warns(BundledEmbeddingWarning, match=r"\['sksstyle'\].*load_adapter"):
        load_kohya(path, unet=tiny_sd1_pipeline.unet, text_encoder=tiny_sd1_pipeline.text_encoder)
    assert len(adapter_layers(tiny_sd1_pipeline.unet)) > 0  # the adapter part loads
    with pytest.warns(BundledEmbeddingWarning):
        kfile = read_kohya(path)  # the reader keeps the embedding apart from the adapter's modules
    assert list(kfile.embeddings) == ["sksstyle"] and not any("bundle_emb" in m for m in kfile.modules)
    assert torch.equal(kfile.embeddings["sksstyle"].vectors()["text_encoder"], torch.ones(1, 32))
    # An SD1-style embedding does not fit an SDXL pipeline: A1111 skips it and so do we, keeping the LoRA.
    sdxl = _with_bundle(
        tmp_path,
        tiny_sdxl_pipeline,
        kohya_files,
        {"bundle_emb.sksstyle.string_to_param.*": torch.ones(1, 32)},
    )
    with pytest.warns(BundledEmbeddingWarning, match="'sksstyle' is not loaded: it is a one-encoder"):
        load_adapter(tiny_sdxl_pipeline, sdxl, adapter_name="x")
    assert "x" in list_adapters(tiny_sdxl_pipeline)
    assert "sksstyle" not in tiny_sdxl_pipeline.tokenizer.get_vocab()


def test_foreign_keys_are_parsed_as_diffusers_does():
    p = foreign.parse_key(
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"
    )
    assert (p.component, p.path, p.tensor) == (
        "unet",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "lora_up.weight",
    )
    p = foreign.parse_key("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.default.weight")
    assert (p.component, p.path, p.tensor, p.adapter) == (
        "text_encoder_2",
        "text_model.encoder.layers.0.mlp.fc1",
        "lora_down.weight",
        "default",
    )
    assert foreign.parse_key("lora_unet_conv_in.hada_w1_a") is None  # Kohya keys pass unchanged
    assert foreign.parse_key("lora_unet_conv_in.alpha") is None
    assert foreign.parse_key("lora_te1_x.lora_B.weight").kohya
    assert foreign.config_scaling({"r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": 2}}, "a.to_q") == 4.0
    assert foreign.config_scaling({"r": 4, "lora_alpha": 8, "use_rslora": True}, "a.to_k") == 4.0


def test_kohya_alpha_expresses_the_writers_scale():
    lora = {"lora_down.weight": torch.ones(4, 8), "lora_up.weight": torch.ones(8, 4)}
    foreign._set_alpha(lora, 0.5)
    assert lora["alpha"].item() == 2.0  # alpha / rank = 0.5
    # A LoKr with both halves full has no alpha in Kohya files (scale 1 in every loader): the scale goes in w1.
    w1 = torch.full((2, 2), 3.0, dtype=torch.float16)
    lokr = {"lokr_w1": w1, "lokr_w2": torch.ones(4, 4, dtype=torch.float16)}
    foreign._set_alpha(lokr, 2.0)
    assert (
        "alpha" not in lokr
        and torch.equal(lokr["lokr_w1"], w1 * 2)
        and lokr["lokr_w1"].dtype == torch.float16
    )
    kept = {**lora, "alpha": torch.tensor(3.0)}
    foreign._set_alpha(kept, 5.0)  # an alpha tensor in the file wins (alpha / rank, as ComfyUI applies it)
    assert kept["alpha"].item() == 3.0


def test_dora_in_a_diffusers_file_is_refused_by_name(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    _inject(pipe.unet, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], use_dora=True))
    state = get_peft_model_state_dict(pipe.unet)
    assert any("lora_magnitude_vector" in k for k in state)
    path = tmp_path / "dora.safetensors"
    save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(KohyaFormatError, match="dora_scale .DoRA"):
        load_adapter(build_tiny_pipeline("sd1"), path)


def test_comfyui_lora_save_layout(tmp_path, tiny_sdxl_pipeline, kohya_files):
    """ComfyUI's LoraSave node writes `diffusion_model.<LDM path>.lora_up.weight` and
    `text_encoders.clip_l|clip_g.transformer.<CLIP path>...`: the same file under those names loads with the same
    deltas as under Kohya names; its full-difference patches (`.diff_b`) are refused by name."""
    from loha_diffusion.formats import naming

    pipe = tiny_sdxl_pipeline
    kohya_path = tmp_path / "kohya.safetensors"
    targets = kohya_files.write(kohya_path, pipe, algo="lora", rank=2, alpha=3.0)
    layout = naming.UNetLayout.from_config(pipe.unet)
    clips = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    comfy = {}
    for key, tensor in load_file(str(kohya_path)).items():
        module, _, tensor_name = key.partition(".")
        component, path = targets[module]
        if component == "unet":
            stem = f"diffusion_model.{naming.diffusers_to_ldm(path, layout)}"
        else:
            stem = f"text_encoders.{clips[component]}.transformer.text_model.{naming.text_encoder_relative_path(path)}"
        comfy[f"{stem}.{tensor_name}"] = tensor
    comfy_path = tmp_path / "comfy.safetensors"
    save_file(comfy, str(comfy_path))
    assert read_kohya(comfy_path).guess_architecture() == "sdxl"
    fresh = build_tiny_pipeline("sdxl")
    models = {c: getattr(fresh, c) for c in COMPONENTS}
    load_kohya(comfy_path, **models, adapter_name="comfy")
    load_kohya(kohya_path, **models, adapter_name="kohya")
    for component, model in models.items():
        for path, layer in adapter_layers(model).items():
            a = layer.adapters["comfy"].delta_weight().detach()
            assert torch.equal(a, layer.adapters["kohya"].delta_weight().detach()), f"{component}.{path}"
    assert sum(len(adapter_layers(m)) for m in models.values()) == len(targets)
    comfy["diffusion_model.input_blocks.4.1.proj_in.diff_b"] = torch.zeros(32)
    save_file(comfy, str(comfy_path))
    with pytest.raises(
        KohyaFormatError, match=r"lora_unet_input_blocks_4_1_proj_in: unsupported tensors \['diff_b'\]"
    ):
        load_kohya(comfy_path, **{c: getattr(build_tiny_pipeline("sdxl"), c) for c in COMPONENTS})
