"""A pipeline call never leaves fused weights that disagree with the adapters' state (issue 13, item 3).

Every call that changes adapters is made on a fused pipeline; afterwards its weights (every tensor of the UNet
and text encoder) and its UNet output on a fixed input must be bit for bit those of a pipeline loaded fresh
into the same state (same files, scales, active set, fused set), and its output must be what the active
adapters compute unfused. Calls that cannot keep that promise refuse and change nothing.
"""

from __future__ import annotations

import pytest
import torch

from loha_diffusion import LoHaConfig, LoHaModel
from loha_diffusion import pipeline as lp
from loha_diffusion.errors import AdapterMergedError, AdapterStateError
from loha_diffusion.model import (
    disable_adapters,
    get_adapter_state_dict,
    inject_adapter,
    merge_adapters,
    merge_and_unload,
    set_adapter_state_dict,
)
from loha_diffusion.tiny import build_tiny_pipeline

SCALES = {"styleA": 0.7, "styleB": 0.5, "styleC": 0.8}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """Three Kohya LoRA files (UNet attention/ResNet convs and text encoder) with random non-zero factors."""
    from conftest import write_kohya_file

    folder = tmp_path_factory.mktemp("fused_loras")
    shapes = build_tiny_pipeline("sd1")
    files = {}
    for seed, name in enumerate(SCALES, start=1):
        files[name] = folder / f"{name}.safetensors"
        write_kohya_file(files[name], shapes, algo="lora", rank=4, alpha=4.0, seed=seed)
    return files


def fresh(files, names, active=None, fused=None, dtype=torch.float32):
    """A tiny SD1 pipeline with `names` loaded at their SCALES, then `active` set, then `fused` fused."""
    pipe = build_tiny_pipeline("sd1")
    pipe.to(dtype)
    for name in names:
        lp.load_adapter(pipe, files[name], adapter_name=name, scale=SCALES[name])
    if active is not None:
        lp.set_active_adapters(pipe, active)
    if fused is not None:
        lp.fuse(pipe, fused)
    return pipe


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of the UNet and text encoder, keyed by the original module paths."""
    return {
        f"{c}.{k.replace('.base_layer', '')}": v.clone()
        for c, m in lp.adapter_components(pipe).items()
        for k, v in m.state_dict().items()
        if "adapters." not in k
    }


def unet_out(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    dtype = pipe.unet.dtype
    sample = torch.randn(1, 4, 16, 16, generator=gen).to(dtype)
    states = torch.randn(1, 8, pipe.unet.config.cross_attention_dim, generator=gen).to(dtype)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=states).sample.float()


def assert_same_state(pipe, expected) -> None:
    """Bit-identical weights and UNet output, same fused and loaded adapters."""
    assert lp.fused_adapters(pipe) == lp.fused_adapters(expected)
    assert lp.list_adapters(pipe) == lp.list_adapters(expected)
    got, want = weights(pipe), weights(expected)
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert torch.equal(unet_out(pipe), unet_out(expected))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_switching_adapters_while_fused_takes_the_left_out_one_out(lora_files):
    pipe = _fused_ab(lora_files)
    assert lp.fused_adapters(pipe) == ["styleA", "styleB"]

    lp.set_active_adapters(pipe, ["styleA"])  # the case: styleB stayed in the weights
    assert_same_state(pipe, fresh(lora_files, ["styleA", "styleB"], active=["styleA"], fused=["styleA"]))
    a_alone = unet_out(fresh(lora_files, ["styleA"]))
    both = unet_out(fresh(lora_files, ["styleA", "styleB"]))
    assert rel(unet_out(pipe), a_alone) < 1e-5  # styleA alone, as if never fused
    assert rel(both, a_alone) > 1e-2  # and styleB visibly changed the output before

    lp.set_active_adapters(pipe, ["styleA", "styleB"])  # styleB back: runs unfused on top of fused styleA
    assert_same_state(pipe, fresh(lora_files, ["styleA", "styleB"], fused=["styleA"]))
    assert rel(unet_out(pipe), both) < 1e-5

    lp.set_active_adapters(pipe, [])
    assert_same_state(pipe, fresh(lora_files, ["styleA", "styleB"], active=[]))
    original = weights(build_tiny_pipeline("sd1"))
    assert all(torch.equal(v, original[k]) for k, v in weights(pipe).items())


def test_disable_unfuses_at_once_and_enable_fuses_again(lora_files):
    original = weights(build_tiny_pipeline("sd1"))
    pipe = _fused_ab(lora_files)
    lp.disable_adapters(pipe)
    # Before any forward: the weights are already the originals (a save now writes the base model).
    assert lp.fused_adapters(pipe) == []
    assert all(torch.equal(v, original[k]) for k, v in weights(pipe).items())
    assert torch.equal(unet_out(pipe), unet_out(build_tiny_pipeline("sd1")))
    with pytest.raises(AdapterStateError, match="enable_adapters"):
        lp.fuse(pipe)
    lp.enable_adapters(pipe)
    assert_same_state(pipe, _fused_ab(lora_files))

    # Changes made while disabled are honoured when fusing again; an explicit unfuse cancels the re-fuse.
    lp.disable_adapters(pipe)
    lp.set_active_adapters(pipe, ["styleB"])
    lp.enable_adapters(pipe)
    assert_same_state(pipe, fresh(lora_files, ["styleA", "styleB"], active=["styleB"], fused=["styleB"]))
    lp.disable_adapters(pipe)
    lp.unfuse(pipe)
    lp.enable_adapters(pipe)
    assert_same_state(pipe, fresh(lora_files, ["styleA", "styleB"], active=["styleB"]))


def _fused_ab(files):
    pipe = fresh(files, ["styleA", "styleB"])
    lp.fuse(pipe)
    return pipe


def test_delete_a_fused_adapter_keeps_the_others_fused_exactly(lora_files):
    pipe = _fused_ab(lora_files)
    lp.delete_adapter(pipe, "styleB")
    assert_same_state(pipe, fresh(lora_files, ["styleA"], fused=["styleA"]))
    lp.delete_adapter(pipe, "styleA")
    assert_same_state(pipe, fresh(lora_files, []))


def test_fused_half_precision_weights_stay_exact(lora_files):
    pipe = fresh(lora_files, ["styleA", "styleB"], dtype=torch.float16)
    lp.fuse(pipe)
    lp.delete_adapter(pipe, "styleA")
    expected = fresh(lora_files, ["styleB"], fused=["styleB"], dtype=torch.float16)
    assert lp.fused_adapters(pipe) == ["styleB"]
    want = weights(expected)
    assert all(torch.equal(v, want[k]) for k, v in weights(pipe).items())
    # Each fused fp16 weight is the fp32 sum from the kept original, rounded once.
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    w0 = (
        build_tiny_pipeline("sd1")
        .to(torch.float16)
        .unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    )
    want = (w0.weight.float() + layer.adapters["styleB"].delta_weight().float()).half()
    assert torch.equal(layer.weight, want)


def test_load_a_new_adapter_while_fused_runs_it_on_top(lora_files):
    pipe = _fused_ab(lora_files)
    lp.load_adapter(pipe, lora_files["styleC"], adapter_name="styleC", scale=SCALES["styleC"])
    assert_same_state(pipe, fresh(lora_files, ["styleA", "styleB", "styleC"], fused=["styleA", "styleB"]))
    assert rel(unet_out(pipe), unet_out(fresh(lora_files, ["styleA", "styleB", "styleC"]))) < 1e-5


def test_unload_while_fused_gives_the_exact_original(lora_files):
    pipe = _fused_ab(lora_files)
    lp.unload(pipe)
    assert_same_state(pipe, build_tiny_pipeline("sd1"))


def test_fuse_order_does_not_change_the_weights(lora_files):
    pipe = fresh(lora_files, ["styleA", "styleB"])
    lp.fuse(pipe, ["styleB"])
    lp.fuse(pipe, ["styleA"])
    assert_same_state(pipe, _fused_ab(lora_files))


def test_calls_that_edit_a_fused_adapter_refuse_and_change_nothing(lora_files):
    pipe = _fused_ab(lora_files)
    before = weights(pipe)
    with pytest.raises(AdapterMergedError, match="unfuse"):
        lp.set_adapter_scales(pipe, {"styleA": 0.2})
    state = get_adapter_state_dict(pipe.unet, "styleA")
    with pytest.raises(AdapterMergedError, match="Unmerge first"):
        set_adapter_state_dict(pipe.unet, {k: v * 2 for k, v in state.items()}, "styleA")
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    assert_same_state(pipe, _fused_ab(lora_files))

    # Fusing an inactive adapter would bake in something that does not run: refused, nothing fused.
    pipe = fresh(lora_files, ["styleA", "styleB"], active=["styleA"])
    with pytest.raises(AdapterStateError, match="not active"):
        lp.fuse(pipe, ["styleA", "styleB"])
    assert lp.fused_adapters(pipe) == []
    assert_same_state(pipe, fresh(lora_files, ["styleA", "styleB"], active=["styleA"]))


def test_model_level_calls_follow_the_same_rules():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    config = LoHaConfig(r=2, alpha=2, target_modules=["0", "1"], init_weights=False)
    model = LoHaModel(net, config, "a")
    inject_adapter(model.model, config, "b")
    x = torch.randn(3, 8)
    model.set_adapter(["b"])
    b_alone = model(x).detach()
    model.set_adapter(["a", "b"])
    model.merge_adapter()
    with pytest.raises(AdapterMergedError):
        model.set_adapter_scale("a", 0.5)
    with pytest.raises(AdapterMergedError):
        model.set_adapter_state_dict(model.get_adapter_state_dict("b"), "b")

    model.set_adapter(["b"])  # PEFT's set_adapter on a merged model: "a" leaves the weights, "b" stays merged
    assert [layer.merged_adapters for layer in net] == [["b"], ["b"]]
    torch.testing.assert_close(model(x), b_alone)
    disable_adapters(model.model)
    assert [layer.merged_adapters for layer in net] == [[], []]
    with pytest.raises(AdapterStateError, match="disabled"):
        merge_adapters(model.model)
    with pytest.raises(AdapterStateError, match="disabled"):
        merge_and_unload(model.model)
    model.enable_adapters()
    assert [layer.merged_adapters for layer in net] == [["b"], ["b"]]
    torch.testing.assert_close(model(x), b_alone)
    model.delete_adapter("b")
    assert [layer.merged_adapters for layer in net] == [[], []]
