"""The adapter fast path never syncs with the host (issue 14): dropout masks are drawn on the layer's device,
no tensor value is read in Python. Checked on the `meta` device (any `.item()` or data-dependent branch raises
there) under a dispatch mode that records every op's output device and every scalar read, and, where CUDA is
at hand, with CUDA's sync debug mode set to raise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loha_diffusion.adapters.base import LayerSpec
from loha_diffusion.adapters.loha import LoHaAdapter
from loha_diffusion.adapters.lokr import LoKrAdapter
from loha_diffusion.adapters.lora import LoRAAdapter
from loha_diffusion.layers import AdapterLayer

DROPOUT = dict(rank_dropout=0.4, module_dropout=0.4)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (3, 5, 12)),
    "conv2d": (lambda: nn.Conv2d(6, 10, 3, padding=1), (2, 6, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(6, 10, 3, padding=1), (2, 6, 7)),
}
ADAPTERS = {
    "loha": lambda spec: LoHaAdapter(spec, 3, 3.0, **DROPOUT, init_weights=False),
    "loha_cp": lambda spec: LoHaAdapter(
        spec, 3, 3.0, use_effective_conv2d=True, **DROPOUT, init_weights=False
    ),
    "lora": lambda spec: LoRAAdapter(spec, 3, 3.0, **DROPOUT, init_weights=False),
    "lora_cp": lambda spec: LoRAAdapter(
        spec, 3, 3.0, use_effective_conv2d=True, **DROPOUT, init_weights=False
    ),
    "lokr": lambda spec: LoKrAdapter(spec, 2, 2.0, factor=2, **DROPOUT, init_weights=False),
}


class HostRecorder(TorchDispatchMode):
    """Records the device of every op's outputs and every `aten._local_scalar_dense` (`.item()`, `bool(t)`)."""

    def __init__(self):
        super().__init__()
        self.devices: set[str] = set()
        self.scalar_reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads.append(str(func))
        out = func(*args, **(kwargs or {}))
        self.devices.update(t.device.type for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def _layer(layer_name: str, adapter_name: str, form: str, device: str, dtype=torch.float32):
    make, shape = LAYERS[layer_name]
    base = make().to(dtype)
    layer = AdapterLayer(base)
    layer.add_adapter("a", ADAPTERS[adapter_name](layer.spec))
    # a second adapter, so the sum of several merged deltas / bypasses runs too
    layer.add_adapter("b", LoHaAdapter(layer.spec, 2, 2.0, **DROPOUT, init_weights=False))
    for adapter in layer.adapters.values():
        adapter.bypass_is_cheaper = (lambda x: True) if form == "bypass" else (lambda x: False)
    base.requires_grad_(False)
    return layer.to(device).train(), torch.randn(shape, dtype=dtype).to(device).requires_grad_()


# CP/Tucker needs a spatial kernel: no CP adapter on the Linear.
LAYER_ADAPTERS = [
    (lay, ad) for lay in LAYERS for ad in ADAPTERS if not (ad.endswith("_cp") and lay == "linear")
]


@pytest.mark.parametrize("form", ["merged", "bypass"])
@pytest.mark.parametrize(("layer_name", "adapter_name"), LAYER_ADAPTERS)
def test_training_forward_backward_stays_on_the_device(layer_name, adapter_name, form):
    layer, x = _layer(layer_name, adapter_name, form, "meta")
    recorder = HostRecorder()
    with recorder:
        out = layer(x)
        out.sum().backward()
    assert recorder.devices == {"meta"}, "a tensor was made on the host"
    assert recorder.scalar_reads == []
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in layer.adapters.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_separate_form_stays_on_the_device(dtype):
    layer, x = _layer("conv2d", "lokr", "merged", "meta", dtype)  # the separate form: LoKr has no bypass
    recorder = HostRecorder()
    with recorder:
        layer(x).float().sum().backward()
    assert recorder.devices == {"meta"} and recorder.scalar_reads == []


def test_the_recorder_sees_what_the_old_dropout_did():
    """The check can fail: a CPU draw copied to the device, and a scalar read, are both seen."""
    recorder = HostRecorder()
    with recorder:
        keep = (torch.rand(4) > 0.5).float().to("meta")
        with pytest.raises(RuntimeError):
            bool(keep.mean() > 0)
    assert "cpu" in recorder.devices and recorder.scalar_reads


def test_rank_dropout_mask_is_pefts_and_zero_when_all_rows_drop():
    spec = LayerSpec.from_module(nn.Linear(4, 64))
    adapter = LoHaAdapter(spec, 2, 2.0, rank_dropout=0.5)
    torch.manual_seed(5)
    mask = adapter.rank_dropout_mask(torch.device("cpu"), torch.float32)
    torch.manual_seed(5)
    keep = (torch.rand(64) > 0.5).float()  # PEFT's LoHa/LoKr `_get_delta_activations` with rank_dropout_scale
    assert 0 < keep.sum() < 64
    assert torch.equal(mask, keep / keep.mean())
    adapter.rank_dropout = 1.0 - 1e-12
    assert torch.equal(adapter.rank_dropout_mask(torch.device("cpu"), torch.float32), torch.zeros(64))


def test_dropout_draws_follow_the_seed_and_dropped_adapters_add_exact_zero():
    layer, x = _layer("conv2d", "loha_cp", "bypass", "cpu")
    x = x.detach()
    outs = []
    for _ in range(2):
        # as the training loop does before every micro-step: a resumed run draws the same masks
        torch.manual_seed(7)
        outs.append([layer(x) for _ in range(12)])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    for adapter in layer.adapters.values():
        adapter.rank_dropout, adapter.module_dropout = 0.0, 1.0 - 1e-12  # every adapter dropped
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["merged", "bypass"])
@pytest.mark.parametrize("adapter_name", ["loha", "loha_cp", "lora"])
def test_cuda_training_step_never_syncs(adapter_name, form):
    layer, x = _layer("conv2d", adapter_name, form, "cuda")
    layer(x).sum().backward()  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
