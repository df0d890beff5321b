"""PEFT directories: our LoHa/LoRA saved with `save_peft` load in peft 0.21.2 (`inject_adapter_in_model` +
`set_peft_model_state_dict`, and `PeftModel.from_pretrained`) with the same outputs; directories peft writes load
in ours; round trips are bit-exact; Kohya <-> PEFT conversions keep every tensor."""

from __future__ import annotations

import json
import os
import re

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from loha_diffusion.adapters import LayerSpec
from loha_diffusion.adapters.lokr import LoKrAdapter
from loha_diffusion.errors import AdapterFileNotFoundError, AdapterNotFoundError, NonFiniteError
from loha_diffusion.formats import peft as peft_format
from loha_diffusion.formats.kohya import load_kohya, read_kohya, save_kohya
from loha_diffusion.formats.peft import (
    PeftFormatError,
    adapter_config_from_model,
    kohya_to_peft,
    load_peft,
    peft_to_kohya,
    read_peft,
    save_peft,
)
from loha_diffusion.model import adapter_layers, add_adapter, get_adapter_state_dict, inject_adapter
from loha_diffusion.targeting import text_encoder_preset, unet_preset
from loha_diffusion.tiny import build_tiny_text_encoder, build_tiny_unet

PEFT_CONFIGS = {"loha": peft.LoHaConfig, "lora": peft.LoraConfig}


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    sample, hidden = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(sample, 10, hidden).sample


def _te_out(te) -> torch.Tensor:
    ids = torch.arange(3, 80).reshape(1, 77)
    with torch.no_grad():
        return te(ids)[0]


def _ours(algo: str, cp: bool):
    torch.manual_seed(0)
    unet = build_tiny_unet("sd1")
    config = unet_preset(
        "full", algo=algo, r=4, alpha=2, conv_r=2, conv_alpha=3, use_effective_conv2d=cp, init_weights=False
    )
    inject_adapter(unet, config)
    return unet


def _assert_same_output(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> None:
    assert (a - base).abs().max() > 1e-2, "the adapter does not change the output"
    # Same math, different summation order through a whole UNet: ~2e-5 of the adapter's effect measured.
    assert (a - b).abs().max() <= 1e-4 * (a - base).abs().max()


@pytest.mark.parametrize("algo,cp", [("loha", False), ("loha", True), ("lora", False)])
def test_peft_loads_our_directory(tmp_path, algo, cp):
    unet = _ours(algo, cp)
    directory = save_peft(tmp_path / "peft", unet)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == algo.upper() and config["r"] == 4
    assert set(config["rank_pattern"].values()) == {2} and set(config["alpha_pattern"].values()) == {3}
    # inject_adapter_in_model + set_peft_model_state_dict on a bare UNet
    fresh = build_tiny_unet("sd1")
    peft_config = PEFT_CONFIGS[algo].from_pretrained(str(directory))
    inject_adapter_in_model(peft_config, fresh)
    result = set_peft_model_state_dict(fresh, load_file(str(directory / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "hada_" in k or "lora_" in k]
    base = _unet_out(build_tiny_unet("sd1"))
    _assert_same_output(_unet_out(unet), _unet_out(fresh), base)
    # PeftModel.from_pretrained
    wrapped = PeftModel.from_pretrained(build_tiny_unet("sd1"), str(directory))
    _assert_same_output(_unet_out(unet), _unet_out(wrapped.base_model.model), base)


def test_peft_loads_our_text_encoder_directory(tmp_path):
    te = build_tiny_text_encoder("sd1", 1)
    torch.manual_seed(0)
    inject_adapter(te, text_encoder_preset(r=4, alpha=2, init_weights=False))
    directory = save_peft(tmp_path / "te", te)
    fresh = build_tiny_text_encoder("sd1", 1)
    inject_adapter_in_model(peft.LoHaConfig.from_pretrained(str(directory)), fresh)
    result = set_peft_model_state_dict(fresh, load_file(str(directory / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    _assert_same_output(_te_out(te), _te_out(fresh), _te_out(build_tiny_text_encoder("sd1", 1)))


def test_per_module_alpha_from_a_kohya_file_goes_to_alpha_pattern(tmp_path, tiny_sd1_pipeline, kohya_files):
    """A Kohya file has an alpha per module; PEFT has one alpha plus alpha_pattern."""
    pipe = tiny_sd1_pipeline
    path = tmp_path / "k.safetensors"
    kohya_files.write(path, pipe, algo="loha", rank=4, alpha=2.0, convs=False)
    edited = load_file(str(path))
    odd = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    edited[f"{odd}.alpha"] = torch.tensor(0.5)
    save_file(edited, str(path))
    load_kohya(path, unet=pipe.unet, text_encoder=pipe.text_encoder)
    config = adapter_config_from_model(pipe.unet)
    assert config.alpha == 2.0 and list(config.alpha_pattern.values()) == [0.5]
    assert config.alpha_for("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == 0.5
    directory = save_peft(tmp_path / "peft", pipe.unet)
    fresh = build_tiny_unet("sd1")
    inject_adapter_in_model(peft.LoHaConfig.from_pretrained(str(directory)), fresh)
    set_peft_model_state_dict(fresh, load_file(str(directory / "adapter_model.safetensors")))
    peft_layer = fresh.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    assert peft_layer.scaling["default"] == pytest.approx(0.5 / 4)
    _assert_same_output(_unet_out(pipe.unet), _unet_out(fresh), _unet_out(build_tiny_unet("sd1")))


@pytest.mark.parametrize("algo,cp", [("loha", True), ("lora", False)])
@pytest.mark.parametrize("wrapped", [False, True])
def test_directories_peft_writes_load_in_ours(tmp_path, algo, cp, wrapped):
    torch.manual_seed(0)
    kwargs = dict(target_modules=["to_q", "to_v", "ff.net.2", "proj_in", "conv1", "conv_shortcut"])
    if algo == "loha":
        config = peft.LoHaConfig(r=4, alpha=2, use_effective_conv2d=cp, init_weights=False, **kwargs)
    else:
        config = peft.LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, **kwargs)
    config.rank_pattern, config.alpha_pattern = {"conv1": 2}, {"to_v": 5}
    theirs = build_tiny_unet("sd1")
    directory = tmp_path / "theirs"
    if wrapped:  # PeftModel.save_pretrained: base_model.model.* keys, README, peft bookkeeping in the JSON
        theirs = get_peft_model(theirs, config)
        theirs.save_pretrained(str(directory))
        theirs = theirs.base_model.model
    else:  # inject_adapter_in_model + get_peft_model_state_dict: bare module-path keys
        inject_adapter_in_model(config, theirs)
        config.save_pretrained(str(directory))
        save_file(peft.get_peft_model_state_dict(theirs), str(directory / "adapter_model.safetensors"))
    ours = build_tiny_unet("sd1")
    assert load_peft(directory, ours, "p") == "p"
    layers = adapter_layers(ours)
    assert {layer.adapters["p"].kind for layer in layers.values()} == {algo}
    assert layers["down_blocks.0.resnets.0.conv1"].adapters["p"].r == 2
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"].adapters["p"].alpha == 5
    _assert_same_output(_unet_out(theirs), _unet_out(ours), _unet_out(build_tiny_unet("sd1")))


@pytest.mark.parametrize("algo,cp", [("loha", False), ("loha", True), ("lora", False)])
def test_round_trip_through_peft_is_bit_exact(tmp_path, algo, cp):
    unet = _ours(algo, cp)
    directory = save_peft(tmp_path / "rt", unet)
    fresh = build_tiny_unet("sd1")
    load_peft(directory, fresh)
    a, b = get_adapter_state_dict(unet), get_adapter_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for path, layer in adapter_layers(unet).items():
        old, new = layer.adapters["default"], adapter_layers(fresh)[path].adapters["default"]
        assert (old.kind, old.r, old.alpha, getattr(old, "is_cp", False)) == (
            new.kind,
            new.r,
            new.alpha,
            getattr(new, "is_cp", False),
        )


def test_kohya_peft_conversions_keep_every_tensor(tmp_path):
    torch.manual_seed(0)
    unet, te = build_tiny_unet("sd1"), build_tiny_text_encoder("sd1", 1)
    inject_adapter(
        unet,
        unet_preset(
            "full", r=4, alpha=2, conv_r=2, conv_alpha=1, use_effective_conv2d=True, init_weights=False
        ),
    )
    inject_adapter(te, text_encoder_preset(r=3, alpha=6, init_weights=False))
    original = save_kohya(tmp_path / "orig.safetensors", unet=unet, text_encoder=te, dtype=torch.float32)
    models = {"unet": build_tiny_unet("sd1"), "text_encoder": build_tiny_text_encoder("sd1", 1)}
    written = kohya_to_peft(original, tmp_path / "peft", **models)
    assert set(written) == {"unet", "text_encoder"}
    assert all(not adapter_layers(m) for m in models.values())  # temporary adapters removed
    assert all(p.requires_grad for m in models.values() for p in m.parameters())  # and nothing frozen
    config, state = read_peft(written["unet"])
    assert config.use_effective_conv2d and config.rank_pattern
    back = peft_to_kohya(tmp_path / "peft", tmp_path / "back.safetensors", dtype=torch.float32, **models)
    a, b = read_kohya(original), read_kohya(back)
    assert a.modules.keys() == b.modules.keys()
    for name, module in a.modules.items():
        assert module.alpha == b.modules[name].alpha
        assert all(torch.equal(t, b.modules[name].tensors[k]) for k, t in module.tensors.items())
    assert all(not adapter_layers(m) for m in models.values())


def test_what_peft_cannot_hold_is_refused(tmp_path):
    lora_tucker = _ours("lora", cp=True)
    with pytest.raises(PeftFormatError, match="Tucker"):
        save_peft(tmp_path / "a", lora_tucker)
    unet = build_tiny_unet("sd1")
    spec = LayerSpec.from_module(unet.conv_in)
    add_adapter(unet, "conv_in", "default", LoKrAdapter(spec, 2, 1.0))
    with pytest.raises(PeftFormatError, match="kinds"):
        save_peft(tmp_path / "b", unet)
    mixed = _ours("loha", cp=True)
    conv = adapter_layers(mixed)["down_blocks.0.resnets.0.conv1"]
    from loha_diffusion.adapters import LoHaAdapter

    conv.delete_adapter("default")
    conv.add_adapter("default", LoHaAdapter(conv.spec, 2, 1.0))
    with pytest.raises(PeftFormatError, match="Only some"):
        save_peft(tmp_path / "c", mixed)
    with pytest.raises(AdapterNotFoundError, match="no adapter named"):
        save_peft(tmp_path / "d", build_tiny_unet("sd1"))


def test_bad_peft_directories(tmp_path):
    unet = _ours("lora", cp=False)
    directory = save_peft(tmp_path / "ok", unet)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(PeftFormatError, match="use_dora=True"):
        load_peft(directory, build_tiny_unet("sd1"))
    (directory / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["to_q"]}))
    fresh = build_tiny_unet("sd1")
    with pytest.raises(PeftFormatError, match="no targeted module has"):
        load_peft(directory, fresh)
    assert not adapter_layers(fresh) and all(p.requires_grad for p in fresh.parameters())
    with pytest.raises(AdapterFileNotFoundError):  # also a FileNotFoundError
        read_peft(tmp_path / "nowhere")


def test_pipeline_component_folders(tmp_path):
    """unet/, text_encoder/ subfolders (as the trainer and diffusers lay them out), all or nothing on load."""
    torch.manual_seed(0)
    unet, te = build_tiny_unet("sd1"), build_tiny_text_encoder("sd1", 1)
    inject_adapter(unet, unet_preset("attn_ff", init_weights=False))
    inject_adapter(te, text_encoder_preset(init_weights=False))
    te_plain = build_tiny_text_encoder("sd1", 1)  # a component without the adapter is skipped on save
    save_peft(tmp_path / "only_unet", unet=unet, text_encoder=te_plain)
    assert (tmp_path / "only_unet" / "unet" / "adapter_config.json").is_file()
    assert not (tmp_path / "only_unet" / "text_encoder").exists()
    save_peft(tmp_path / "both", unet=unet, text_encoder=te)
    fresh_unet, fresh_te = build_tiny_unet("sd1"), build_tiny_text_encoder("sd1", 1)
    assert (
        load_peft(tmp_path / "both", unet=fresh_unet, text_encoder=fresh_te, adapter_name="x", scale=0.5)
        == "x"
    )
    assert {layer.adapters["x"].scale for layer in adapter_layers(fresh_te).values()} == {0.5}
    a, b = get_adapter_state_dict(te), get_adapter_state_dict(fresh_te, "x")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A single adapter folder given with keywords goes to the model that has all its modules.
    other_unet, other_te = build_tiny_unet("sd1"), build_tiny_text_encoder("sd1", 1)
    load_peft(tmp_path / "both" / "text_encoder", unet=other_unet, text_encoder=other_te)
    assert adapter_layers(other_te) and not adapter_layers(other_unet)
    # All or nothing: a text-encoder folder that does not fit leaves the UNet untouched too.
    broken = tmp_path / "both" / "text_encoder" / "adapter_model.safetensors"
    tensors = load_file(str(broken))
    save_file({k: v for i, (k, v) in enumerate(tensors.items()) if i}, str(broken))
    unet3, te3 = build_tiny_unet("sd1"), build_tiny_text_encoder("sd1", 1)
    with pytest.raises(PeftFormatError, match="the weights file lacks"):
        load_peft(tmp_path / "both", unet=unet3, text_encoder=te3)
    assert not adapter_layers(unet3) and not adapter_layers(te3)
    with pytest.raises(ValueError, match="either one model"):
        load_peft(tmp_path / "both", unet3, unet=unet3)
    with pytest.raises(ValueError, match="pass those models too"):
        load_peft(tmp_path / "both", unet=unet3)


def test_save_peft_refuses_non_finite_and_overflowing_values(tmp_path):
    unet = _ours("lora", cp=False)
    path_, layer = next(iter(adapter_layers(unet).items()))
    with torch.no_grad():
        layer.adapters["default"].lora_A.view(-1)[0] = 1e5
    with pytest.raises(NonFiniteError, match=r"in float16: 1 module\(s\) have values beyond") as info:
        save_peft(tmp_path / "half", unet, dtype=torch.float16)
    assert path_ in str(info.value) and "float32 or bfloat16" in str(info.value)
    assert not (tmp_path / "half").exists()
    save_peft(tmp_path / "full", unet)  # fp32 holds it
    with torch.no_grad():
        layer.adapters["default"].lora_B.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        save_peft(tmp_path / "nan", unet)
    assert not (tmp_path / "nan").exists()


def test_save_peft_writes_atomically_with_a_normal_files_mode(tmp_path, monkeypatch):
    unet = _ours("loha", cp=False)
    directory = save_peft(tmp_path / "peft", unet)
    old = {p.name: p.read_bytes() for p in directory.iterdir()}
    umask = os.umask(0o022)
    os.umask(umask)
    for p in directory.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by ComfyUI/A1111 running as another user

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of writing the weights

    monkeypatch.setattr(peft_format, "save_file", killed)
    with torch.no_grad():
        next(iter(adapter_layers(unet).values())).adapters["default"].hada_w1_a.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_peft(directory, unet)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == old  # the old folder, no temporary


def test_peft_folder_problems_are_named(tmp_path):
    unet = _ours("lora", cp=False)
    directory = save_peft(tmp_path / "peft", unet)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    cases = {
        b"\xff\xfe{": "is not UTF-8 text",
        b'{"r": ': "is not valid JSON",
        b"[1, 2]": "must hold a JSON object, not a list",
        json.dumps({**config, "r": 10**9}).encode(): "tensors whose shapes differ from the config's",
        json.dumps({**config, "target_modules": "(("}).encode(): "'((' is not a valid regular expression",
    }
    for text, message in cases.items():
        config_path.write_bytes(text)
        fresh = build_tiny_unet("sd1")
        with pytest.raises(PeftFormatError, match=re.escape(message)) as info:
            load_peft(directory, fresh)
        assert str(directory) in str(info.value) and not adapter_layers(fresh)
    config_path.write_text(json.dumps(config))
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PeftFormatError, match=re.escape(f"{weights} is not a readable .safetensors file")):
        load_peft(directory, build_tiny_unet("sd1"))
    weights.unlink()
    with pytest.raises(AdapterFileNotFoundError, match="adapter_model.safetensors missing"):
        load_peft(directory, build_tiny_unet("sd1"))
