"""Adapter layers: outputs equal PEFT's LoHa for the same factors, in both fast-path forms; every factor's
gradient equals float64 autograd of the plain formula."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from torch import nn

from loha_diffusion import LoHaConfig, LoRAConfig, get_adapter_state_dict, inject_adapter
from loha_diffusion.functional.loha import HadaWeightCP, delta_weight_reference
from loha_diffusion.functional.lora import delta_weight as lora_delta
from loha_diffusion.model import adapter_layers
from loha_diffusion.targeting import unet_preset

LAYERS = {
    "linear": (lambda: nn.Linear(12, 20), (3, 7, 12)),
    "conv1d_k3": (lambda: nn.Conv1d(6, 10, 3, padding=1), (2, 6, 11)),
    "conv1d_k1": (lambda: nn.Conv1d(6, 10, 1), (2, 6, 11)),
    "conv2d_3x3": (lambda: nn.Conv2d(6, 10, 3, padding=1), (2, 6, 9, 9)),
    "conv2d_3x3_stride2": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv2d_dilated_bias_free": (lambda: nn.Conv2d(6, 10, (3, 2), dilation=2, bias=False), (2, 6, 9, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 10, 1), (2, 6, 5, 5)),
    "conv2d_groups": (lambda: nn.Conv2d(6, 10, 3, padding=1, groups=2), (2, 6, 7, 7)),
}


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _force(model, form):
    for layer in adapter_layers(model).values():
        for adapter in layer.adapters.values():
            if form != "auto" and adapter.spec.groups == 1:
                adapter.bypass_is_cheaper = (lambda x: True) if form == "bypass" else (lambda x: False)


def _pair(layer_name, cp, seed=0, r=3, alpha=5.0):
    torch.manual_seed(seed)
    make, shape = LAYERS[layer_name]
    ours = Holder(make())
    theirs = copy.deepcopy(ours)
    kwargs = dict(r=r, alpha=alpha, target_modules=["layer"], init_weights=False, use_effective_conv2d=cp)
    inject_adapter(ours, LoHaConfig(**kwargs))
    peft.inject_adapter_in_model(peft.LoHaConfig(**kwargs), theirs)
    set_peft_model_state_dict(theirs, get_adapter_state_dict(ours))
    return ours, theirs, torch.randn(shape)


@pytest.mark.parametrize("form", ["merged", "bypass", "auto"])
@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_forward_equals_peft(layer_name, cp, form):
    ours, theirs, x = _pair(layer_name, cp)
    _force(ours, form)
    expected = theirs(x)
    got = ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # The state dict keys and shapes are PEFT's.
    peft_keys = {k.replace(".default", ""): v.shape for k, v in theirs.state_dict().items() if "hada_" in k}
    assert {k: v.shape for k, v in get_adapter_state_dict(ours).items()} == peft_keys


def _reference_output(layer, x):
    """base(x) + op(x, ΔW) with ΔW from the plain formula under ordinary autograd."""
    adapter = layer.adapters["default"]
    factors = {k: v for k, v in adapter.state_tensors().items()}
    if adapter.kind == "loha":
        delta = delta_weight_reference(
            factors["hada_w1_a"], factors["hada_w1_b"], factors["hada_w2_a"], factors["hada_w2_b"],
            factors.get("hada_t1"), factors.get("hada_t2"), scaling=adapter.scaling,
        )  # fmt: skip
    else:
        delta = lora_delta(factors["lora_A.weight"], factors["lora_B.weight"], factors.get("lora_mid.weight"),
                           scaling=adapter.scaling)  # fmt: skip
    delta = delta.reshape(layer.spec.weight_shape)
    return layer.base_layer(x) + layer.spec.apply(x, delta)


@pytest.mark.parametrize("algo", ["loha", "lora"])
@pytest.mark.parametrize("form", ["merged", "bypass"])
@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_gradients_match_float64_autograd(layer_name, cp, form, algo):
    torch.manual_seed(1)
    make, shape = LAYERS[layer_name]
    model = Holder(make()).double()
    config_cls = LoHaConfig if algo == "loha" else LoRAConfig
    inject_adapter(
        model,
        config_cls(r=3, alpha=2.0, target_modules=["layer"], init_weights=False, use_effective_conv2d=cp),
    )
    _force(model, form)
    layer = model.layer
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn_like(layer(x))
    params = [p for p in layer.adapters["default"].parameters()]

    (layer(x) * weight).sum().backward()
    got = [p.grad.clone() for p in params] + [x.grad.clone()]
    for p in params:
        p.grad = None
    x.grad = None
    (_reference_output(layer, x) * weight).sum().backward()
    expected = [p.grad for p in params] + [x.grad]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10 * e.abs().max().item())


def test_cp_autograd_function_gradcheck():
    torch.manual_seed(0)
    r, out, in_ = 2, 3, 4
    t1, t2 = (torch.randn(r, r, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w1a, w2a = (torch.randn(r, out, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w1b, w2b = (torch.randn(r, in_, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: HadaWeightCP.apply(*a, 0.7), (t1, w1a, w1b, t2, w2a, w2b))


def test_peft_cp_gradient_bug_is_avoided():
    """PEFT's HadaWeightCP backward gives wrong w1a gradients (reference-implementations.md §4); ours is exact."""
    ours, theirs, x = _pair("conv2d_3x3", cp=True)
    ours.double(), theirs.double()
    x = x.double()
    _force(ours, "merged")
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    ours_grad = ours.layer.adapters["default"].hada_w1_a.grad
    peft_grad = theirs.layer.hada_w1_a["default"].grad
    reference = Holder(copy.deepcopy(ours.layer))
    for p in reference.parameters():
        p.grad = None
    _reference_output(reference.layer, x).square().sum().backward()
    ref_grad = reference.layer.adapters["default"].hada_w1_a.grad
    torch.testing.assert_close(ours_grad, ref_grad)
    assert (peft_grad - ref_grad).norm() > 0.1 * ref_grad.norm()


@pytest.mark.parametrize("cp", [False, True])
def test_whole_unet_output_equals_peft(cp, tiny_sd1_unet):
    torch.manual_seed(0)
    config = unet_preset(
        "full", r=4, alpha=3, conv_r=2, conv_alpha=1, use_effective_conv2d=cp, init_weights=False
    )
    kwargs = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
    theirs = copy.deepcopy(tiny_sd1_unet)
    inject_adapter(tiny_sd1_unet, config)
    peft.inject_adapter_in_model(peft.LoHaConfig(**kwargs), theirs)
    set_peft_model_state_dict(theirs, get_adapter_state_dict(tiny_sd1_unet))
    sample = torch.randn(2, 4, 16, 16)
    hidden = torch.randn(2, 5, tiny_sd1_unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = theirs(sample, 10, hidden).sample
        got = tiny_sd1_unet(sample, 10, hidden).sample
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_whole_text_encoder_output_equals_peft(tiny_sd1_text_encoder):
    from loha_diffusion.targeting import text_encoder_preset

    config = text_encoder_preset(r=4, alpha=8, init_weights=False)
    kwargs = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
    theirs = copy.deepcopy(tiny_sd1_text_encoder)
    inject_adapter(tiny_sd1_text_encoder, config)
    peft.inject_adapter_in_model(peft.LoHaConfig(**kwargs), theirs)
    set_peft_model_state_dict(theirs, get_adapter_state_dict(tiny_sd1_text_encoder))
    ids = torch.randint(0, tiny_sd1_text_encoder.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = theirs(ids).last_hidden_state
        got = tiny_sd1_text_encoder(ids).last_hidden_state
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_bypass_keeps_no_out_by_in_tensor_for_backward():
    """When the bypass is chosen, nothing saved for backward has out×in elements."""
    layer = Holder(nn.Linear(256, 256))
    inject_adapter(layer, LoHaConfig(r=4, target_modules=["layer"], init_weights=False))
    _force(layer, "bypass")
    x = torch.randn(3, 256, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    base_weight = layer.layer.base_layer.weight.numel()
    assert max(sizes) <= base_weight  # only the frozen base weight itself (saved by the base op)
    assert sizes.count(base_weight) == 1


def test_lora_conv_forward_equals_plain_formula():
    torch.manual_seed(0)
    for cp in (False, True):
        model = Holder(nn.Conv2d(4, 6, 3, padding=1))
        inject_adapter(
            model, LoRAConfig(r=2, target_modules=["layer"], init_weights=False, use_effective_conv2d=cp)
        )
        x = torch.randn(2, 4, 8, 8)
        expected = _reference_output(model.layer, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert F.conv2d(x, model.layer.adapters["default"].delta_weight(), padding=1).shape == expected.shape
