"""Interop with LyCORIS 4.1.3, an independent implementation of the Kohya format.

* Files we write load in LyCORIS' own Kohya loader (`lycoris.kohya.create_network_from_weights`) and give the
  same per-module delta as our adapters.
* Files LyCORIS writes (`lycoris.kohya.create_network` with non-zero factors, `save_weights`) load in ours with
  the same deltas: LoHa flat and CP, LoCon flat and Tucker, LoKr.

LyCORIS quirks handled here (docs/kohya-format.md sections 2.3, 2.4 and 7): its class-level presets leak between
calls and its `full` preset creates `time_embedding` twice on a diffusers UNet, so every test sets its own
preset and restores the class; its loader matches names from `named_modules()`, so SDXL files (LDM names) are
loaded on an LDM-named view of the UNet, and transformers-5 `CLIPTextModel`s are wrapped to get `text_model.`;
`get_diff_weight` scales twice, so reference deltas come from `get_weight` / `make_weight`.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from lycoris.kohya import LycorisNetworkKohya, create_network, create_network_from_weights
from lycoris.modules.locon import LoConModule
from safetensors.torch import save_file
from torch import nn

from loha_diffusion.formats import naming
from loha_diffusion.formats.kohya import (
    build_kohya_state_dict,
    kohya_name_map,
    layer_modules,
    load_kohya,
    read_kohya,
    save_kohya,
)
from loha_diffusion.model import adapter_layers, inject_adapter
from loha_diffusion.targeting import text_encoder_preset, unet_preset
from loha_diffusion.tiny import build_tiny_text_encoder, build_tiny_unet

_PRESET_ATTRS = (
    "ENABLE_CONV",
    "UNET_TARGET_REPLACE_MODULE",
    "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)
# LyCORIS' "full" targets minus the duplicated TimestepEmbedding class (its time_embedding names stay).
FULL_PRESET_TOML = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


@contextlib.contextmanager
def lycoris_class_state(preset: dict | None = None):
    """Run with LyCORIS' class-level preset set to `preset`, and restore the class afterwards."""
    saved = {a: getattr(LycorisNetworkKohya, a) for a in _PRESET_ATTRS}
    try:
        if preset is not None:
            LycorisNetworkKohya.apply_preset(preset)
        yield
    finally:
        for attr, value in saved.items():
            setattr(LycorisNetworkKohya, attr, value)


def with_text_model(te: nn.Module) -> nn.Module:
    """A transformers-5 `CLIPTextModel` has no `.text_model`; give LyCORIS' name matcher one."""
    if hasattr(te, "text_model"):
        return te
    holder = nn.Module()
    holder.text_model = te
    return holder


def ldm_view(unet: nn.Module) -> nn.Module:
    """A module tree holding the UNet's layers under their LDM/SGM paths (as sd-scripts' SDXL UNet names them)."""
    layout = naming.UNetLayout.from_config(unet)
    root = nn.Module()
    for path, layer in layer_modules(unet).items():
        *parents, leaf = naming.diffusers_to_ldm(path, layout).split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(leaf, layer)
    return root


def lycoris_state_dict(network) -> dict[str, torch.Tensor]:
    """What `save_weights` writes, built from the modules: with LyCORIS 4.1.3 and torch 2.13 the network's
    `state_dict()` (hence `save_weights`) comes out empty in some setups (algo="locon", `create_lycoris`),
    while every module's own state dict is right."""
    return {
        f"{m.lora_name}.{k}": v.detach().clone().contiguous()
        for m in network.unet_loras + network.text_encoder_loras
        for k, v in m.state_dict().items()
    }


def lycoris_delta(module: nn.Module) -> torch.Tensor:
    """ΔW of a LyCORIS module with its scale applied once (multiplier 1)."""
    with torch.no_grad():
        if isinstance(module, LoConModule):
            return module.make_weight().reshape(module.shape) * module.scale
        return module.get_weight(module.shape).reshape(module.shape)


def assert_close_delta(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= 1e-6 * ref.abs().max().item(), (
        f"{what}: max abs diff {err} vs max |delta| {ref.abs().max().item()}"
    )


def build_models(arch: str, seed: int = 0):
    unet = build_tiny_unet(arch, seed=seed)
    te = build_tiny_text_encoder(arch, 1, seed=seed + 1)
    te2 = build_tiny_text_encoder(arch, 2, seed=seed + 2) if arch == "sdxl" else None
    return unet, te, te2


EXPORT_CASES = {
    "loha": dict(algo="loha", use_effective_conv2d=False),
    "loha_cp": dict(algo="loha", use_effective_conv2d=True),
    "lora": dict(algo="lora", use_effective_conv2d=False),
    "lora_tucker": dict(algo="lora", use_effective_conv2d=True),
}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_our_files_load_in_lycoris_with_same_deltas(tmp_path, arch, case):
    torch.manual_seed(0)
    kwargs = EXPORT_CASES[case]
    unet, te, te2 = build_models(arch)
    inject_adapter(
        unet, unet_preset("full", r=4, alpha=2, conv_r=2, conv_alpha=3, init_weights=False, **kwargs)
    )
    inject_adapter(te, text_encoder_preset(algo=kwargs["algo"], r=3, alpha=1.5, init_weights=False))
    if te2 is not None:
        inject_adapter(te2, text_encoder_preset(algo=kwargs["algo"], r=2, alpha=4, init_weights=False))
    path = save_kohya(
        tmp_path / "ours.safetensors", unet=unet, text_encoder=te, text_encoder_2=te2, dtype=torch.float32
    )
    _, facts = build_kohya_state_dict(unet=unet, text_encoder=te, text_encoder_2=te2, dtype=torch.float32)
    ours = {name: adapter for name, (adapter, _) in facts["adapters"].items()}

    fresh_unet, fresh_te, fresh_te2 = build_models(arch, seed=1)
    lyco_unet = ldm_view(fresh_unet) if arch == "sdxl" else fresh_unet
    lyco_te = [with_text_model(fresh_te), fresh_te2] if arch == "sdxl" else with_text_model(fresh_te)
    with lycoris_class_state(
        {"unet_target_module": [], "unet_target_name": [], "text_encoder_target_module": []}
    ):
        network, _ = create_network_from_weights(1.0, str(path), None, lyco_te, lyco_unet)
    lyco = {m.lora_name: m for m in network.unet_loras + network.text_encoder_loras}
    assert set(lyco) == set(ours), "LyCORIS did not load every module of our file"
    expected_type = {"loha": "LohaModule", "lora": "LoConModule"}[kwargs["algo"]]
    for name, module in lyco.items():
        assert type(module).__name__ == expected_type
        assert_close_delta(ours[name].delta_weight().detach(), lycoris_delta(module), name)
    if kwargs["use_effective_conv2d"]:
        assert any(getattr(m, "tucker", False) for m in lyco.values()), "no CP module reached LyCORIS"


LYCORIS_CASES = {
    "loha": dict(algo="loha"),
    "loha_tucker": dict(algo="loha", use_tucker=True),
    "locon": dict(algo="locon"),
    "locon_tucker": dict(algo="locon", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr_tucker_both": dict(algo="lokr", use_tucker=True, decompose_both=True, factor=8),
    "lokr_full": dict(algo="lokr", full_matrix=True, factor=4),
}


def _lycoris_file(tmp_path, arch, kwargs, text_model_names: bool):
    unet, te, te2 = build_models(arch, seed=3)
    lyco_te = [te, te2] if arch == "sdxl" else te
    if text_model_names:
        lyco_te = [with_text_model(t) for t in lyco_te] if arch == "sdxl" else with_text_model(te)
    preset_file = tmp_path / "preset.toml"
    preset_file.write_text(FULL_PRESET_TOML)
    torch.manual_seed(0)
    with lycoris_class_state():
        network = create_network(
            1.0, 4, 2.0, None, lyco_te, unet, conv_dim=2, conv_alpha=3.0, preset=str(preset_file), **kwargs
        )
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.5)  # LyCORIS zero-inits one factor; make every delta non-zero
    path = tmp_path / "lycoris.safetensors"
    save_file(lycoris_state_dict(network), str(path), {"ss_network_module": "lycoris.kohya"})
    return path, {m.lora_name: lycoris_delta(m) for m in network.unet_loras + network.text_encoder_loras}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("case", sorted(LYCORIS_CASES))
def test_lycoris_files_load_in_ours_with_same_deltas(tmp_path, arch, case):
    path, expected = _lycoris_file(tmp_path, arch, LYCORIS_CASES[case], text_model_names=True)
    unet, te, te2 = build_models(arch, seed=5)
    if arch == "sdxl":
        # LyCORIS writes diffusers UNet names for SDXL, incl. up_blocks_0_upsamplers_0_conv, which A1111 drops.
        with pytest.warns(UserWarning, match="A1111 silently drops"):
            load_kohya(path, unet=unet, text_encoder=te, text_encoder_2=te2, adapter_name="lyco")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "error"
            )  # an SD1 LyCORIS file with text_model names loads without any report
            load_kohya(path, unet=unet, text_encoder=te, adapter_name="lyco")
    names = kohya_name_map(unet, te, te2)
    models = {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
    seen = set()
    for name, ref in expected.items():
        target = names[name]
        adapter = adapter_layers(models[target.component])[target.path].adapters["lyco"]
        assert adapter.kind == {"loha": "loha", "locon": "lora", "lokr": "lokr"}[LYCORIS_CASES[case]["algo"]]
        assert_close_delta(adapter.delta_weight().detach(), ref, name)
        seen.add((target.component, target.path))
    loaded = {(c, p) for c, m in models.items() if m is not None for p in adapter_layers(m)}
    assert loaded == seen
    kinds = read_kohya(path).kinds
    assert list(kinds) == [adapter.kind if adapter.kind != "lora" else "lora"]
    # conv_in/conv_out/time_embedding (LyCORIS "full") come through too.
    assert any(p == "conv_in" for c, p in seen) and any(p == "time_embedding.linear_1" for c, p in seen)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lycoris_transformers5_text_encoder_names_are_reported(tmp_path, arch):
    """LyCORIS on a transformers-5 CLIPTextModel writes `lora_te(1)_encoder_layers_...` (docs/kohya-format.md 2.4): we
    load it with the same deltas and warn that ComfyUI/A1111 would ignore those keys."""
    path, expected = _lycoris_file(tmp_path, arch, {"algo": "loha"}, text_model_names=False)
    prefix = "lora_te1" if arch == "sdxl" else "lora_te"
    assert f"{prefix}_encoder_layers_0_self_attn_q_proj" in expected
    unet, te, te2 = build_models(arch, seed=5)
    with pytest.warns(UserWarning) as record:
        load_kohya(path, unet=unet, text_encoder=te, text_encoder_2=te2)
    assert any("without 'text_model_'" in str(w.message) for w in record)
    q = adapter_layers(te)["encoder.layers.0.self_attn.q_proj"].adapters["default"]
    assert_close_delta(
        q.delta_weight().detach(), expected[f"{prefix}_encoder_layers_0_self_attn_q_proj"], "te q"
    )


def test_lycoris_generic_wrapper_prefix_loads(tmp_path):
    """LyCORIS' generic `create_lycoris` writes `lycoris_<diffusers path>` (SimpleTuner style)."""
    from lycoris import create_lycoris

    unet = build_tiny_unet("sd1", seed=3)
    torch.manual_seed(0)
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2.0, algo="loha")
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.5)
    path = tmp_path / "generic.safetensors"
    save_file(
        {f"{m.lora_name}.{k}": v.detach().clone() for m in network.loras for k, v in m.state_dict().items()},
        str(path),
    )
    expected = {m.lora_name: lycoris_delta(m) for m in network.loras}
    assert all(name.startswith("lycoris_") for name in expected)
    fresh = build_tiny_unet("sd1", seed=4)
    load_kohya(path, unet=fresh)
    names = kohya_name_map(fresh)
    layers = adapter_layers(fresh)
    assert len(layers) == len(expected)
    for name, ref in expected.items():
        assert_close_delta(layers[names[name].path].adapters["default"].delta_weight().detach(), ref, name)
