"""LoHa's bypass builds its Khatri-Rao factors in the layouts the matmuls read: the factors equal
`functional.loha.bypass_factors` exactly, and outputs and float64 gradients equal the plain formula for one token
and many."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loha_diffusion.adapters.loha import LoHaAdapter
from loha_diffusion.functional.loha import bypass_factors, delta_weight_reference
from loha_diffusion.layers import AdapterLayer

LAYERS = {
    "linear": lambda: nn.Linear(12, 20),
    "conv2d_3x3": lambda: nn.Conv2d(6, 10, 3, padding=1),
    "conv1d_k3": lambda: nn.Conv1d(6, 10, 3, padding=1),
}


def _layer(name, cp, r=3):
    torch.manual_seed(0)
    layer = AdapterLayer(LAYERS[name]().double())
    adapter = LoHaAdapter(layer.spec, r, 5.0, use_effective_conv2d=cp, init_weights=False).double()
    layer.add_adapter("a", adapter)
    adapter.bypass_is_cheaper = lambda x: True
    return layer, adapter


@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_factors_equal_the_reference(name, cp):
    _, adapter = _layer(name, cp)
    down, core, up = adapter.bypass_factors()
    p, q, t = bypass_factors(*adapter._factors())
    assert torch.equal(up, p)
    assert torch.equal(down.flatten(1), q)
    assert (core is None) == (t is None)
    if t is not None:
        assert torch.equal(core.flatten(2), t.flatten(2))


@pytest.mark.parametrize("tokens", [1, 2, 40])
@pytest.mark.parametrize("name", ["linear", "conv2d_3x3"])
def test_bypass_output_and_float64_gradients(name, tokens):
    """The plain formula's output and gradients (float64 autograd of `base(x) + op(x, ΔW)`) for one token and
    many."""
    layer, adapter = _layer(name, cp=False)
    shape = (tokens, 12) if name == "linear" else (1, 6, tokens, 3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    factors = {k: v.detach().clone().requires_grad_() for k, v in adapter.state_tensors().items()}
    x_ref = x.detach().clone().requires_grad_()
    delta = delta_weight_reference(*factors.values(), scaling=adapter.scaling).reshape(
        layer.spec.weight_shape
    )
    expected = layer.base_layer(x_ref) + layer.spec.apply(x_ref, delta)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for key, tensor in adapter.state_tensors().items():
        torch.testing.assert_close(tensor.grad, factors[key].grad, rtol=1e-12, atol=1e-12)
