"""The base op and a low-rank bypass fused in one autograd node (`functional.bypass.base_plus_bypass`): float64
gradients of every operand (gradcheck, with strides, padding, dilation, batches, bias), equality with the
separate ops, and `AdapterLayer` taking the fused form only where it may (a plain layer, no hooks, integer padding,
matching dtypes), with the same outputs and gradients as the separate form under dropout and with a merged
adapter on the same layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loha_diffusion.adapters.loha import LoHaAdapter
from loha_diffusion.adapters.lora import LoRAAdapter
from loha_diffusion.functional.bypass import GIVEN_FACTORS, ConvGeometry, base_plus_bypass, bypass_delta
from loha_diffusion.functional.loha import KhatriRaoFactors
from loha_diffusion.layers import AdapterLayer

R = 3
# name -> (x shape, weight shape, geometry or None, core?)
CASES = {
    "linear": ((2, 5, 6), (7, 6), None, False),
    "linear_2d": ((4, 6), (7, 6), None, False),
    "conv2d_flat": ((2, 4, 6, 5), (5, 4, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1)), False),
    "conv2d_cp_stride": ((2, 4, 7, 6), (5, 4, 3, 3), ConvGeometry((2, 1), (1, 0), (1, 1)), True),
    "conv2d_cp_dilated": ((1, 4, 8, 8), (5, 4, 3, 3), ConvGeometry((1, 1), (2, 2), (2, 2)), True),
    "conv2d_1x1": ((2, 4, 5, 5), (5, 4, 1, 1), ConvGeometry((1, 1), (0, 0), (1, 1)), False),
    "conv1d_cp": ((2, 4, 9), (5, 4, 3), ConvGeometry((1,), (1,), (1,)), True),
}


def _operands(name: str, weight_grad: bool, bias: bool):
    x_shape, w_shape, geometry, cp = CASES[name]
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    out, in_, kernel = w_shape[0], w_shape[1], w_shape[2:]
    down = rand(R, in_) if cp or geometry is None else rand(R, in_, *kernel)
    core = rand(R, R, *kernel) if cp else None
    return (
        rand(*x_shape),
        rand(*w_shape, grad=weight_grad),
        rand(out, grad=weight_grad) if bias else None,
        down,
        core,
        rand(out, R),
        geometry,
    )


def _given(down, core, up):
    return (down, up) if core is None else (down, core, up)


@pytest.mark.parametrize("row_scale", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_every_operand(name, weight_grad, row_scale):
    x, w, b, down, core, up, geometry = _operands(name, weight_grad, bias=True)
    out_features = w.shape[0]
    up_scale = torch.rand(out_features, 1, dtype=torch.float64) if row_scale else 0.7
    sources = _given(down, core, up)

    def fused(x, w, b, *sources):
        return base_plus_bypass(x, w, b, up_scale, GIVEN_FACTORS, sources, geometry)

    assert torch.autograd.gradcheck(fused, (x, w, b, *sources))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_the_separate_ops(name, bias):
    x, w, b, down, core, up, geometry = _operands(name, weight_grad=True, bias=bias)
    fused = base_plus_bypass(x, w, b, 1.0, GIVEN_FACTORS, _given(down, core, up), geometry)
    if geometry is None:
        base = nn.functional.linear(x, w, b)
    else:
        base = geometry.conv(x, w, b)
    separate = base + bypass_delta(x, down, core, up, geometry)
    torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(fused)
    tensors = [t for t in (x, w, b, down, core, up) if t is not None]
    got = torch.autograd.grad(fused, tensors, grad)
    expected = torch.autograd.grad(separate, tensors, grad)
    for g_got, g_expected in zip(got, expected):
        torch.testing.assert_close(g_got, g_expected, rtol=1e-12, atol=1e-12)


# LoHa sources (PEFT layouts, rank 2): flat (out 5, in·k 12, conv kernel (2, 3) or none) and CP (kernel 3×3)
KHATRI_RAO = {
    "flat_linear": ([(5, 2), (2, 12), (5, 2), (2, 12)], ()),
    "flat_conv": ([(5, 2), (2, 12), (5, 2), (2, 12)], (2, 3)),
    "cp": ([(2, 5), (2, 4), (2, 5), (2, 4), (2, 2, 3, 3), (2, 2, 3, 3)], ()),
}


@pytest.mark.parametrize("name", sorted(KHATRI_RAO))
def test_khatri_rao_backward_is_the_products_gradient(name):
    """`KhatriRaoFactors.backward` equals float64 autograd through its own `build`."""
    shapes, kernel = KHATRI_RAO[name]
    g = torch.Generator().manual_seed(3)
    sources = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    builder = KhatriRaoFactors(kernel)
    factors = builder.build(*sources)
    grads = [None if f is None else torch.randn(f.shape, generator=g, dtype=torch.float64) for f in factors]
    used = [(f, gr) for f, gr in zip(factors, grads) if f is not None]
    expected = torch.autograd.grad([f for f, _ in used], sources, [gr for _, gr in used])
    got = builder.backward(tuple(s.detach() for s in sources), *grads)
    for g_got, g_expected in zip(got, expected):
        torch.testing.assert_close(g_got, g_expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_khatri_rao_sources():
    """The fused node with LoHa's own tensors as sources (CP conv, dropout rows): float64 gradcheck."""
    geometry = ConvGeometry((1, 1), (1, 1), (1, 1))
    g = torch.Generator().manual_seed(4)
    shapes = KHATRI_RAO["cp"][0]
    sources = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    up_scale = torch.rand(5, 1, generator=g, dtype=torch.float64)

    def fused(x, *sources):
        return base_plus_bypass(x, w, None, up_scale, KhatriRaoFactors(), sources, geometry)

    assert torch.autograd.gradcheck(fused, (x, *sources))


def _layer(base: nn.Module, kind=LoHaAdapter, **kwargs) -> AdapterLayer:
    torch.manual_seed(0)
    layer = AdapterLayer(base.double())
    layer.add_adapter("a", kind(layer.spec, 2, 3.0, init_weights=False, **kwargs).double())
    layer.adapters["a"].bypass_is_cheaper = lambda x: True
    return layer


def _run(layer: AdapterLayer, x: torch.Tensor, fused: bool, monkeypatch) -> tuple[torch.Tensor, list]:
    """Output and gradients (input, then every factor) of one training call, fused or forced apart."""
    if not fused:
        monkeypatch.setattr(AdapterLayer, "fused_dtype", lambda self, *a, **k: None)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    out = layer(x)
    factors = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *factors], torch.ones_like(out))
    monkeypatch.undo()
    return out.detach(), list(grads)


LAYERS = {
    "linear": (lambda: nn.Linear(6, 9), (2, 5, 6)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2), (2, 4, 9)),
}


@pytest.mark.parametrize("kind", [LoHaAdapter, LoRAAdapter])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_fused_equals_apart_with_dropout(name, kind, monkeypatch):
    """Rank and module dropout draw the same numbers either way (the draw comes before the form)."""
    make, shape = LAYERS[name]
    cp = name != "linear"
    layer = _layer(make(), kind, use_effective_conv2d=cp, rank_dropout=0.5, module_dropout=0.2)
    x = torch.randn(shape, dtype=torch.float64)
    assert layer.fused_dtype(x) == torch.float64
    fused_out, fused_grads = _run(layer, x, True, monkeypatch)
    apart_out, apart_grads = _run(layer, x, False, monkeypatch)
    torch.testing.assert_close(fused_out, apart_out, rtol=1e-12, atol=1e-12)
    for got, expected in zip(fused_grads, apart_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_layer_fuses_one_bypass_with_a_merged_adapter(monkeypatch):
    """A merged-form adapter's ΔW joins the base weight of the fused node; its factors get their gradients
    through the weight; a second bypassed adapter is added apart."""
    layer = _layer(nn.Linear(6, 9))
    torch.manual_seed(1)
    merged = LoHaAdapter(layer.spec, 2, 2.0, init_weights=False).double()
    merged.bypass_is_cheaper = lambda x: False
    layer.add_adapter("m", merged)
    layer.add_adapter("b", LoRAAdapter(layer.spec, 2, 2.0, init_weights=False).double())
    layer.adapters["b"].bypass_is_cheaper = lambda x: True
    x = torch.randn(3, 6, dtype=torch.float64)
    fused_out, fused_grads = _run(layer, x, True, monkeypatch)
    apart_out, apart_grads = _run(layer, x, False, monkeypatch)
    torch.testing.assert_close(fused_out, apart_out, rtol=1e-12, atol=1e-12)
    assert len(fused_grads) == 1 + 2 + 4 + 4 + 2  # x, the (unfrozen) base weight and bias, a, m, b
    for got, expected in zip(fused_grads, apart_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert got.abs().sum() > 0


def test_fused_only_where_it_may():
    x = torch.randn(2, 6, dtype=torch.float64)
    layer = _layer(nn.Linear(6, 9))
    assert layer.fused_dtype(x) == torch.float64
    assert layer.fused_dtype(x.float()) is None  # the base op itself would refuse the dtype mix
    assert layer.fused_dtype(x, (1,)) is None  # extra arguments go to base_layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.fused_dtype(x) == torch.bfloat16
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    assert layer.fused_dtype(x) is None  # the hook must see base_layer run
    handle.remove()
    handle = layer.base_layer.register_full_backward_hook(lambda *a: None)
    assert layer.fused_dtype(x) is None
    handle.remove()
    assert layer.fused_dtype(x) == torch.float64
    layer.base_layer._hf_hook = object()
    assert layer.fused_dtype(x) is None
    same = _layer(nn.Conv2d(4, 6, 3, padding="same"))
    assert same.fused_dtype(torch.randn(1, 4, 5, 5, dtype=torch.float64)) is None

    class Custom(nn.Linear):
        pass

    assert _layer(Custom(6, 9)).fused_dtype(x) is None


def test_bf16_autocast_fused_output_is_half_precision_and_close():
    """Under CPU autocast the fused node runs in bf16, as the base op would, within bf16 rounding of fp64."""
    torch.manual_seed(0)
    layer = AdapterLayer(nn.Linear(64, 48))
    layer.add_adapter("a", LoHaAdapter(layer.spec, 4, 4.0, init_weights=False))
    layer.adapters["a"].bypass_is_cheaper = lambda x: True
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    layer64 = layer.double()
    expected = layer64(x.double())
    error = (out.double() - expected).norm() / expected.norm()
    assert error < 2**-7
