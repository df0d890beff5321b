"""`torch.compile` of adapted layers and of an adapted UNet in training (CP convs, rank and module dropout): no
graph breaks in the adapter path, and the same outputs and gradients as eager (issue 14).

Before the explicit CP backward and the device-side dropout, `torch._dynamo.explain` of the tiny SD1 UNet
(`unet_preset("full", r=4, use_effective_conv2d=True)`, training) gave 30 graphs / 29 breaks, and with rank and
module dropout 0.1 92 graphs / 91 breaks (`Tensor.item()` of module dropout, the branch on the kept rows,
`torch.autograd.grad` in the CP backward); now 1 graph / 0 breaks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

from loha_diffusion import LoHaConfig, LoRAConfig, inject_adapter
from loha_diffusion.targeting import unet_preset
from loha_diffusion.tiny import build_unet_from_config, tiny_unet_config

DROPOUT = dict(rank_dropout=0.3, module_dropout=0.3)


class Stack(nn.Module):
    """A 3×3 conv (CP adapters), a 1×1 conv, a strided conv and a Linear over channels: every adapter form."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 5)

    def forward(self, x):
        h = self.down(torch.relu(self.point(torch.relu(self.conv(x)))))
        return self.proj(h.flatten(2).transpose(1, 2))


def _randomize_adapters(model):
    with torch.no_grad():  # non-zero ΔW everywhere, so wrong adapter outputs or gradients would show
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.train()


def _step(model, forward, inputs):
    torch.manual_seed(1234)  # the training loop seeds before every micro-step; dropout draws follow it
    out = forward(*inputs)
    out = out.sample if hasattr(out, "sample") else out
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _compiled_step(model, inputs):
    """`(out, grads, graphs, breaks)` of one step through `torch.compile(aot_eager)` of a copy of `model`."""
    model = copy.deepcopy(model)
    graphs = []
    aot_eager = dynamo.lookup_backend("aot_eager")

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=counting_backend)
    out, grads = _step(model, compiled, inputs)
    breaks = sum(dynamo.utils.counters["graph_break"].values())
    return out, grads, len(graphs), breaks, compiled


def _assert_same(out, grads, eager_out, eager_grads, rtol=1e-4):
    torch.testing.assert_close(out, eager_out, rtol=rtol, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=rtol * 10, atol=1e-6, msg=name)


@pytest.mark.parametrize("config", [LoHaConfig, LoRAConfig])
@pytest.mark.parametrize("precision", ["fp32", "bf16_base", "bf16_autocast"])
def test_compiled_adapter_layers_are_one_graph_and_match_eager(config, precision):
    torch.manual_seed(0)
    model = Stack()
    if precision == "bf16_base":
        model.to(torch.bfloat16)
    targets = ["conv", "point", "down", "proj"]
    inject_adapter(
        model, config(r=3, alpha=3.0, target_modules=targets, use_effective_conv2d=True, **DROPOUT)
    )
    _randomize_adapters(model)
    x = torch.randn(2, 6, 8, 8, dtype=torch.bfloat16 if precision == "bf16_base" else torch.float32)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16_autocast")
    with autocast:
        eager_out, eager_grads = _step(model, model, (x,))
        out, grads, graphs, breaks, _ = _compiled_step(model, (x,))
    assert (graphs, breaks) == (1, 0)
    _assert_same(out, grads, eager_out, eager_grads, rtol=1e-4 if precision == "fp32" else 2e-2)


@pytest.mark.slow
def test_compiled_adapted_unet_has_at_most_two_graph_breaks_and_matches_eager():
    # the tiny SD1 layout cut to two levels of one block each (every layer type of the UNet, a quarter of the
    # layers: dynamo and AOT tracing time grows with them)
    config = tiny_unet_config("sd1") | {
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
    }
    unet = build_unet_from_config(config, device="cpu")
    inject_adapter(unet, unet_preset("full", r=4, use_effective_conv2d=True, **DROPOUT))
    _randomize_adapters(unet)
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 7, 32, generator=g),
    )
    eager_out, eager_grads = _step(unet, unet, inputs)
    out, grads, graphs, breaks, compiled = _compiled_step(unet, inputs)
    assert graphs <= 3 and breaks <= 2, (graphs, dict(dynamo.utils.counters["graph_break"]))
    _assert_same(out, grads, eager_out, eager_grads)
    torch.manual_seed(99)  # the dropout ran: another seed gives another output
    with torch.no_grad():
        assert not torch.equal(compiled(*inputs).sample, out)
