"""Where a UNet step's adapter time goes, layer shape by layer shape: every distinct adapted layer of the SD1.5
UNet ("full" preset, CP 3×3 convs) timed alone, forward + backward, as the frozen floor, as our cost model
picks, and forced merged / forced bypass.

The input shapes come from one forward of the weightless (`meta`) UNet at the given latent size, so the cases are
exactly the step's. Each case runs interleaved (every repeat times each form once, in rotating order); the table
gives medians, and the totals weight each case by how often the UNet has it. `oracle` is the sum of the faster
form per case: the gap `auto - oracle` is what the cost model loses, `auto - floor` what the adapters cost.
These are the measurements the CPU constants of `adapters/loha.py` were fitted against (docs/cost-model.md).

    python benchmarks/bench_unet_layers.py --latent 32 --rank 8 --threads 1
    python benchmarks/bench_unet_layers.py --latent 64 --rank 8 --dtype bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import collections

import torch
from timing import CLOCKS, add_timing_arguments, medians, set_threads, time_interleaved
from torch import nn

from loha_diffusion import LoHaConfig, inject_adapter
from loha_diffusion.meta_models import meta_models
from loha_diffusion.model import adapter_layers
from loha_diffusion.targeting import find_target_modules, unet_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMS = ("floor", "auto", "merged", "bypass")


def unet_cases(latent: int, rank: int) -> tuple[collections.Counter, dict]:
    """`(counts, modules)`: how many adapted layers of each (layer geometry, input shape) the step has, and one
    meta module per case."""
    unet = meta_models(arch="sd1", components=["unet"])["unet"]
    config = unet_preset("full", r=rank, alpha=rank, use_effective_conv2d=True)
    counts: collections.Counter = collections.Counter()
    modules: dict = {}

    def recorder(module: nn.Module):
        def hook(mod, args):
            if isinstance(mod, nn.Linear):
                key = ("linear", tuple(mod.weight.shape), (), (), tuple(args[0].shape))
            else:
                key = ("conv", tuple(mod.weight.shape), mod.stride, mod.padding, tuple(args[0].shape))
            counts[key] += 1
            modules.setdefault(key, mod)

        return hook

    handles = [
        unet.get_submodule(name).register_forward_pre_hook(recorder(unet.get_submodule(name)))
        for name in find_target_modules(unet, config)
    ]
    with torch.no_grad():
        unet(torch.randn(1, 4, latent, latent, device="meta"), 500, torch.randn(1, 77, 768, device="meta"))
    for handle in handles:
        handle.remove()
    return counts, modules


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def build_runners(key: tuple, rank: int, dtype: torch.dtype) -> dict:
    """One callable per form, each a forward + backward (input and adapter gradients) of the case."""
    op, weight_shape, stride, padding, input_shape = key
    torch.manual_seed(0)
    if op == "linear":
        layer = nn.Linear(weight_shape[1], weight_shape[0])
    else:
        layer = nn.Conv2d(weight_shape[1], weight_shape[0], weight_shape[2:], stride=stride, padding=padding)
    layer.requires_grad_(False)
    x = torch.randn(input_shape)
    config = dict(r=rank, alpha=rank, target_modules=["layer"], init_weights=False, use_effective_conv2d=True)
    models = {"floor": Holder(layer)}
    for form in FORMS[1:]:
        model = Holder(layer)
        inject_adapter(model, LoHaConfig(**config))
        adapter = next(iter(adapter_layers(model).values())).adapters["default"]
        if form != "auto":
            adapter.bypass_is_cheaper = (lambda _x: True) if form == "bypass" else (lambda _x: False)
        models[form] = model
    layer.to(dtype)
    autocast = dtype != torch.float32

    def runner(form: str):
        model = models[form]
        params = [p for p in model.parameters() if p.requires_grad]

        def step() -> None:
            inp = x.detach().requires_grad_()
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                out = model(inp)
            out.float().sum().backward()
            for p in params:
                p.grad = None

        return step

    return {form: runner(form) for form in FORMS}


def auto_choice(key: tuple, rank: int) -> str:
    """The form the cost model picks for the case (in training, with gradients)."""
    op, weight_shape, stride, padding, input_shape = key
    layer = (
        nn.Linear(weight_shape[1], weight_shape[0], device="meta")
        if op == "linear"
        else nn.Conv2d(
            weight_shape[1], weight_shape[0], weight_shape[2:], stride=stride, padding=padding, device="meta"
        )
    )
    model = Holder(layer)
    config = LoHaConfig(r=rank, alpha=rank, target_modules=["layer"], use_effective_conv2d=True)
    inject_adapter(model, config)
    adapter = next(iter(adapter_layers(model).values())).adapters["default"]
    with torch.enable_grad():
        return "bypass" if adapter.bypass_is_cheaper(torch.empty(input_shape, device="meta")) else "merged"


def label(key: tuple) -> str:
    op, weight_shape, stride, _padding, input_shape = key
    if op == "linear":
        tokens = 1
        for size in input_shape[:-1]:
            tokens *= size
        return f"linear {weight_shape[1]}->{weight_shape[0]} x{tokens}"
    kernel = "x".join(str(k) for k in weight_shape[2:])
    stride_note = "/2" if stride and stride[0] == 2 else ""
    return f"conv{kernel}{stride_note} {weight_shape[1]}->{weight_shape[0]} @{input_shape[2]}^2"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    add_timing_arguments(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    counts, _ = unet_cases(args.latent, args.rank)
    print(
        f"SD1.5 UNet latent {args.latent}, r={args.rank}, {args.dtype}, {sum(counts.values())} adapted layers in "
        f"{len(counts)} cases; torch {torch.__version__}, threads {torch.get_num_threads()}, medians of "
        f"{args.repeats}"
    )
    if args.dtype != "fp32":
        print(
            "half precision: the layer always takes the bypass (AdapterLayer.can_merge_in_forward), so the auto, "
            "merged and bypass columns time the same form and 'miss' marks are noise"
        )
    print(
        f"{'case':<34}{'n':>4}{'pick':>8}"
        + "".join(f"{f + ' ms':>11}" for f in FORMS)
        + f"{'auto/floor':>11}{'best':>8}"
    )
    totals = collections.Counter()
    for key, n in sorted(counts.items(), key=lambda kv: label(kv[0])):
        runners = build_runners(key, args.rank, DTYPES[args.dtype])
        times = medians(time_interleaved(runners, args.repeats, CLOCKS[args.clock]))
        pick = auto_choice(key, args.rank)
        best = "merged" if times["merged"] <= times["bypass"] else "bypass"
        for form in FORMS:
            totals[form] += n * times[form]
        totals["oracle"] += n * times[best]
        print(
            f"{label(key):<34}{n:>4}{pick:>8}"
            + "".join(f"{1000 * times[f]:>11.2f}" for f in FORMS)
            + f"{times['auto'] / times['floor']:>11.2f}{best:>8}{'' if best == pick else '  <- miss'}",
            flush=True,
        )
    print("totals (s, weighted by count): " + ", ".join(f"{k} {v:.3f}" for k, v in totals.items()))
    print(
        f"adapter overhead auto - floor: {totals['auto'] - totals['floor']:.3f} s; "
        f"cost-model loss auto - oracle: {totals['auto'] - totals['oracle']:.3f} s"
    )


if __name__ == "__main__":
    main()
