"""Forward+backward time of one adapted layer: ours vs PEFT's LoHa vs LyCORIS's LoHa vs the frozen base layer.

All four run in one process, interleaved (every repeat times each implementation once, in rotating order),
and the table reports medians and the ratios ours/PEFT, ours/LyCORIS and ours/floor (the frozen base layer
alone, input requiring grad). Shapes are SD1.5's at 512 px (batch 1). Examples:

    python benchmarks/bench_layers.py                      # full table: r=8,32; fp32,bf16; flat and CP convs
    python benchmarks/bench_layers.py --ranks 8 --dtypes fp32 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics

import peft
import torch
from lycoris.modules.loha import LohaModule
from peft import set_peft_model_state_dict
from timing import CLOCKS, add_timing_arguments, medians, set_threads, time_interleaved
from torch import nn

from loha_diffusion import LoHaConfig, get_adapter_state_dict, inject_adapter

LINEAR_SHAPES = [  # (in, out, tokens)
    (320, 320, 4096),
    (640, 640, 1024),
    (1280, 1280, 256),
    (320, 2560, 4096),
    (1280, 320, 4096),
    (768, 320, 77),
]
CONV_SHAPES = [(320, 64), (640, 32), (1280, 16)]  # (channels, spatial side), 3×3, padding 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def build_case(kind: str, shape: tuple, r: int, cp: bool, dtype: torch.dtype):
    """Four callables running forward+backward on the same layer, factors and input."""
    torch.manual_seed(0)
    if kind == "linear":
        in_, out, tokens = shape
        layer = nn.Linear(in_, out)
        x = torch.randn(1, tokens, in_)
    else:
        channels, side = shape
        layer = nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(1, channels, side, side)
    layer.requires_grad_(False)
    config = dict(r=r, alpha=r, target_modules=["layer"], init_weights=False, use_effective_conv2d=cp)

    ours = Holder(copy.deepcopy(layer))
    inject_adapter(ours, LoHaConfig(**config))
    state = get_adapter_state_dict(ours)

    theirs = Holder(copy.deepcopy(layer))
    peft.inject_adapter_in_model(peft.LoHaConfig(**config), theirs)
    set_peft_model_state_dict(theirs, state)

    lyco_layer = copy.deepcopy(layer)
    lyco = LohaModule("layer", lyco_layer, multiplier=1.0, lora_dim=r, alpha=r, use_tucker=cp)
    lyco.apply_to()
    with torch.no_grad():
        for name, tensor in state.items():
            getattr(lyco, name.split(".")[-1]).copy_(tensor)

    floor = Holder(copy.deepcopy(layer))
    # Base weights in the benchmark dtype, adapter factors fp32 (mixed precision as in training).
    for model in (ours, theirs, floor):
        for name, p in model.named_parameters():
            if "hada_" not in name:
                p.data = p.data.to(dtype)
    lyco_layer.to(dtype)
    x = x.to(dtype)
    params = {
        "ours": [p for p in ours.parameters() if p.requires_grad],
        "peft": [p for p in theirs.parameters() if p.requires_grad],
        "lycoris": list(lyco.parameters()),
        "floor": [],
    }
    modules = {"ours": ours, "peft": theirs, "lycoris": lyco_layer, "floor": floor}
    autocast = dtype != torch.float32

    def runner(name):
        module = modules[name]

        def step():
            inp = x.detach().requires_grad_()
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                out = module(inp)
            out.float().sum().backward()
            for p in params[name]:
                p.grad = None

        return step

    return {name: runner(name) for name in modules}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=7)
    add_timing_arguments(parser)
    args = parser.parse_args()
    set_threads(args.threads)

    cases = [("linear", s, False) for s in LINEAR_SHAPES]
    cases += [("conv", s, cp) for s in CONV_SHAPES for cp in (False, True)]
    header = f"{'layer':<28}{'r':>4}{'dtype':>6}{'floor ms':>10}{'ours ms':>10}{'peft ms':>10}{'lyco ms':>10}"
    header += f"{'ours/peft':>11}{'ours/lyco':>11}{'ours/floor':>12}"
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} clock, medians of {args.repeats}"
    )
    for dtype_name in args.dtypes:
        for r in args.ranks:
            print(header)
            ratios = {"peft": [], "lycoris": [], "floor": []}
            for kind, shape, cp in cases:
                times = medians(
                    time_interleaved(
                        build_case(kind, shape, r, cp, DTYPES[dtype_name]), args.repeats, CLOCKS[args.clock]
                    )
                )
                if kind == "linear":
                    label = f"linear {shape[0]}->{shape[1]} x{shape[2]}"
                else:
                    label = f"conv3x3 {shape[0]}@{shape[1]}^2 {'cp' if cp else 'flat'}"
                for ref in ratios:
                    ratios[ref].append(times["ours"] / times[ref])
                print(
                    f"{label:<28}{r:>4}{dtype_name:>6}"
                    + "".join(f"{1000 * times[n]:>10.1f}" for n in ("floor", "ours", "peft", "lycoris"))
                    + f"{times['ours'] / times['peft']:>11.2f}{times['ours'] / times['lycoris']:>11.2f}"
                    + f"{times['ours'] / times['floor']:>12.2f}",
                    flush=True,
                )
            geo = {k: math.exp(statistics.fmean(math.log(v) for v in vals)) for k, vals in ratios.items()}
            print(
                f"geometric mean r={r} {dtype_name}: ours/peft {geo['peft']:.2f}, ours/lycoris {geo['lycoris']:.2f}, "
                f"ours/floor {geo['floor']:.2f}\n",
                flush=True,
            )


if __name__ == "__main__":
    main()
