"""Adapters on a base layer under accelerate's offload hooks (issue 14): the hook moves the weight only inside
`base_layer.forward`, so the adapter layer must call it and add the adapter's output, never read the weight."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from torch import nn

from loha_diffusion import LoHaConfig, inject_adapter
from loha_diffusion.adapters.loha import LoHaAdapter
from loha_diffusion.adapters.lokr import LoKrAdapter
from loha_diffusion.adapters.lora import LoRAAdapter
from loha_diffusion.layers import AdapterLayer

LAYERS = {
    "linear": (lambda: nn.Linear(12, 16), (3, 5, 12)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
}
KINDS = {
    "loha": lambda spec: LoHaAdapter(spec, 3, 3.0, init_weights=False),
    "loha_cp": lambda spec: LoHaAdapter(spec, 3, 3.0, use_effective_conv2d=True, init_weights=False),
    "lora": lambda spec: LoRAAdapter(spec, 3, 3.0, init_weights=False),
    "lokr": lambda spec: LoKrAdapter(spec, 2, 2.0, factor=2, init_weights=False),
}


def _offload(base: nn.Module) -> None:
    """Sequential CPU offload of one module, as `accelerate.cpu_offload` does it: the weights live in a weights
    map, the module's own tensors are on `meta` and are filled in only around `forward`."""
    weights = {name: t.detach().clone() for name, t in base.state_dict().items()}
    add_hook_to_module(base, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights))


# CP/Tucker needs a spatial kernel: no CP adapter on the Linear.
LAYER_KINDS = [
    (lay, kind) for lay in LAYERS for kind in KINDS if not (kind.endswith("_cp") and lay == "linear")
]


@pytest.mark.parametrize("form", ["merged", "bypass"])
@pytest.mark.parametrize(("layer_name", "kind"), LAYER_KINDS)
def test_offloaded_base_layer_gives_the_unoffloaded_output(layer_name, kind, form):
    torch.manual_seed(0)
    make, shape = LAYERS[layer_name]
    layer = AdapterLayer(make())
    adapter = KINDS[kind](layer.spec)
    adapter.bypass_is_cheaper = (lambda x: True) if form == "bypass" else (lambda x: False)
    layer.add_adapter("a", adapter)
    layer.eval()
    x = torch.randn(shape)
    expected = layer(x)
    offloaded = copy.deepcopy(layer)
    _offload(offloaded.base_layer)
    assert offloaded.base_layer.weight.device.type == "meta"
    torch.testing.assert_close(offloaded(x), expected, rtol=1e-5, atol=1e-6)
    assert offloaded.base_layer.weight.device.type == "meta"  # the hook took it back after forward


def test_sequential_cpu_offload_of_an_adapted_model_gives_its_output():
    """`accelerate.cpu_offload` (diffusers' `enable_sequential_cpu_offload`) hooks the adapters as well: their
    factors are on `meta` too and must be brought in around the adapter math."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    inject_adapter(model, LoHaConfig(r=2, target_modules=["0", "2"], init_weights=False))
    model.eval()
    x = torch.randn(2, 6, 7, 7)
    expected = model(x)
    cpu_offload(model, execution_device="cpu")
    factor = model[0].adapters["default"].hada_w1_a
    assert factor.device.type == "meta" and model[0].base_layer.weight.device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert model[0].adapters["default"].hada_w1_a.device.type == "meta"
