"""The per-device cost model (`adapters/costs.py`, `LoHaAdapter.prefers_bypass`, `LoRAAdapter.prefers_bypass`):
the form it picks for representative SD1.5 layers on CPU and CUDA. Decisions only, never timings; the inputs are
`meta` tensors, so no layer is run and the CUDA decisions are checked without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loha_diffusion.adapters import LayerSpec
from loha_diffusion.adapters.costs import CONSERVATIVE, CPU_COSTS, CUDA_COSTS, DEVICE_COSTS, device_costs
from loha_diffusion.adapters.loha import LoHaAdapter
from loha_diffusion.adapters.lora import LoRAAdapter
from loha_diffusion.layers import AdapterLayer


def _adapter(kind, layer, r, cp=False):
    spec = LayerSpec.from_module(layer)
    cls = LoHaAdapter if kind == "loha" else LoRAAdapter
    return cls(spec, r, float(r), use_effective_conv2d=cp).to("meta")


def _linear(in_, out):
    return nn.Linear(in_, out, device="meta")


def _conv(in_, out, k=3, stride=1):
    return nn.Conv2d(in_, out, k, stride=stride, padding=k // 2, device="meta")


def _x(*shape):
    return torch.empty(shape, device="meta")


# (name, kind, layer, r, cp, input shape, training, expected pick on CPU, on CUDA). SD1.5 at 256 px is latent
# 32×32 (1024 tokens at the 320-channel level, 64 at 1280), at 512 px 64×64; batch 8 multiplies the tokens.
CASES = [
    # LoHa r=8 (R = 64): the 320-channel attention projections are the one place CPU merges (measured faster
    # there with benchmarks/bench_unet_layers.py), CUDA keeps the bypass (its rebuild is memory-bound).
    ("to_q 320, 256px", "loha", _linear(320, 320), 8, False, (1, 1024, 320), True, "merged", "bypass"),
    ("to_q 320, 512px", "loha", _linear(320, 320), 8, False, (1, 4096, 320), True, "merged", "bypass"),
    ("to_q 320 512px b8", "loha", _linear(320, 320), 8, False, (8, 4096, 320), True, "merged", "merged"),
    ("to_q 1280, 256px", "loha", _linear(1280, 1280), 8, False, (1, 64, 1280), True, "bypass", "bypass"),
    ("to_k text 640", "loha", _linear(768, 640), 8, False, (1, 77, 768), True, "bypass", "bypass"),
    ("time_emb_proj", "loha", _linear(1280, 1280), 8, False, (1, 1280), True, "bypass", "bypass"),
    ("ff.net.0 320", "loha", _linear(320, 2560), 8, False, (1, 1024, 320), True, "bypass", "bypass"),
    ("conv1 CP 320", "loha", _conv(320, 320), 8, True, (1, 320, 32, 32), True, "bypass", "bypass"),
    ("conv1 CP 1280", "loha", _conv(1280, 1280), 8, True, (1, 1280, 8, 8), True, "bypass", "bypass"),
    ("conv1 flat 1280", "loha", _conv(1280, 1280), 8, False, (1, 1280, 8, 8), True, "bypass", "bypass"),
    ("down CP 640", "loha", _conv(640, 640, stride=2), 8, True, (1, 640, 16, 16), True, "bypass", "bypass"),
    # r=32 (R = 1024 exceeds the width): the bypass's r² matmuls cost more than a merged rebuild except on a
    # handful of tokens (and, conservatively on CUDA, on a 1280-wide layer with few tokens).
    ("to_q 320 r32", "loha", _linear(320, 320), 32, False, (1, 4096, 320), True, "merged", "merged"),
    ("to_q 1280 r32", "loha", _linear(1280, 1280), 32, False, (1, 256, 1280), True, "merged", "bypass"),
    ("time_emb_proj r32", "loha", _linear(1280, 1280), 32, False, (1, 1280), True, "bypass", "bypass"),
    ("conv1 flat 640 r32", "loha", _conv(640, 640), 32, False, (1, 640, 32, 32), True, "merged", "merged"),
    # Inference: no weight gradient and a 2r-matmul rebuild, so merged on many tokens; CUDA's memory-bound
    # rebuild keeps the bypass on the 1280-wide layers.
    ("to_q 320 inference", "loha", _linear(320, 320), 8, False, (2, 4096, 320), False, "merged", "merged"),
    ("to_q 1280 inference", "loha", _linear(1280, 1280), 8, False, (2, 256, 1280), False, "merged", "bypass"),
    # LoRA: the bypass unless the rank approaches the width.
    ("lora to_q 320", "lora", _linear(320, 320), 8, False, (1, 4096, 320), True, "bypass", "bypass"),
    ("lora conv CP 320", "lora", _conv(320, 320), 8, True, (1, 320, 64, 64), True, "bypass", "bypass"),
    ("lora to_q 320 r128", "lora", _linear(320, 320), 128, False, (1, 4096, 320), True, "merged", "merged"),
]


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize(
    ("kind", "layer", "r", "cp", "shape", "training", "on_cpu", "on_cuda"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_pick_per_device(device_type, kind, layer, r, cp, shape, training, on_cpu, on_cuda):
    adapter = _adapter(kind, layer, r, cp)
    picked = adapter.prefers_bypass(_x(*shape), device_type=device_type, training=training)
    expected = on_cpu if device_type == "cpu" else on_cuda
    assert ("bypass" if picked else "merged") == expected


def test_other_device_kinds_get_the_conservative_constants():
    assert device_costs("cpu") is CPU_COSTS
    assert device_costs("cuda") is CUDA_COSTS
    for kind in ("mps", "xpu", "meta", "hpu"):
        assert device_costs(kind) is CONSERVATIVE
    assert CONSERVATIVE is CUDA_COSTS
    # Conservative means: the merged form's memory-bound rebuild is never cheaper than on the CPU.
    assert CONSERVATIVE.merged_train_per_element >= CPU_COSTS.merged_train_per_element
    assert CONSERVATIVE.merged_infer_per_element >= CPU_COSTS.merged_infer_per_element
    for costs in DEVICE_COSTS.values():
        assert costs.measured  # every table entry says how it was measured (or that it was not)


def test_bypass_is_cheaper_follows_the_input_device_and_autograd():
    """The layer's hook asks with `x`'s own device kind; gradients on/off switch between the two formulas."""
    adapter = _adapter("loha", _linear(320, 320), 8)
    x = _x(1, 4096, 320)
    # meta is a kind without constants: the conservative (CUDA) decision.
    assert adapter.bypass_is_cheaper(x) == adapter.prefers_bypass(x, device_type="cuda", training=True)
    with torch.no_grad():
        assert adapter.bypass_is_cheaper(x) == adapter.prefers_bypass(x, device_type="cuda", training=False)
    adapter.requires_grad_(False)
    assert adapter.bypass_is_cheaper(x) == adapter.prefers_bypass(x, device_type="cuda", training=False)


def test_grouped_convs_never_bypass():
    for kind in ("loha", "lora"):
        layer = nn.Conv2d(8, 8, 3, padding=1, groups=2, device="meta")
        adapter = _adapter(kind, layer, 2)
        for device_type in ("cpu", "cuda"):
            assert not adapter.prefers_bypass(_x(1, 8, 16, 16), device_type=device_type, training=True)


def test_layer_forward_uses_the_cpu_pick():
    """On a CPU tensor the layer runs the form the CPU constants pick (counted through the hook)."""
    layer = AdapterLayer(nn.Linear(320, 320))
    layer.add_adapter("a", LoHaAdapter(layer.spec, 8, 8.0, init_weights=False))
    adapter = layer.adapters["a"]
    picks = []
    original = adapter.bypass_is_cheaper

    def spy(x):
        picks.append(original(x))
        return picks[-1]

    adapter.bypass_is_cheaper = spy
    x = torch.randn(1, 1024, 320)
    layer(x).sum().backward()
    assert picks == [adapter.prefers_bypass(x, device_type="cpu", training=True)] == [False]
