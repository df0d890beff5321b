"""One training step (forward + backward + AdamW) of a full-size SD1.5 UNet with random weights:
ours vs PEFT's LoHa vs LyCORIS's LoHa vs the frozen UNet (the floor: forward + backward to the input).

Same targets for all (attention, feed-forward, proj_in/out, resnet convs; the "full" preset), r=8, effective
conv2d (CP) 3×3 convs, batch 1. The base weights are fp32; `--dtype bf16` runs every forward under CPU autocast
to bfloat16 (the adapter factors stay fp32, as in mixed-precision training). Runs interleaved in one process
(each repeat times every variant once, in rotating order) and prints medians, the spread (min-max) and the
ratios to the floor, per repeat and of the medians.

`--clock cpu` times the process's CPU time instead of the wall clock: on a machine shared with other work,
with `--threads 1`, it does not count the time other processes hold the core (use it for ratios; wall time is
what a user waits). `--arch sdxl` times the SDXL base UNet instead (ours against the floor only, on one
shared UNet with the adapters switched off for the floor; about 20 GB of RAM at `--latent 64`).

`--memory` also measures each variant's peak memory during one step above its memory before the step, in a fresh subprocess per variant (the kernel's resident-set high-water mark, reset just before the
step, with glibc told to return large blocks to the system at once so the mark follows torch's allocations);
"added" is that peak minus the floor's. Needs ~4 GB of RAM per variant (each holds its own UNet copy).

`--macs` counts each variant's multiply-adds in one step (torch's `FlopCounterMode`: matmuls, convs, attention,
forward and backward). Their ratio to the floor's is the bound for the time ratio: an implementation of the same
exact forms cannot go below it unless its extra ops run faster than the floor's own (our thin rank-r² matmuls run
at about half the speed of the big 3×3 convs on CPU).

glibc's allocator returns large freed blocks to the system and takes page faults on every step (~0.5-1 s of kernel
time per 256 px step on this project's VM, more for the variant that allocates more); for the ratios run with
`MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=536870912` (or a caching
allocator such as jemalloc/tcmalloc via `LD_PRELOAD`, as PyTorch's CPU performance guide recommends). Run
`--memory` without these settings: the timing process would keep every freed block while the memory subprocesses
run (out of memory on a 24 GB machine).

    python benchmarks/bench_unet_step.py --latent 32 --repeats 3 --threads 1 --clock cpu --memory
    python benchmarks/bench_unet_step.py --latent 64 --repeats 2 --skip peft lycoris --dtype bf16
    python benchmarks/bench_unet_step.py --latent 32 --repeats 5 --threads 1 --clock cpu --skip lycoris --macs
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys

import peft
import torch
import torch.utils.flop_counter as flop_counter
from lycoris.modules.loha import LohaModule
from timing import CLOCKS, add_timing_arguments, set_threads, time_interleaved

from loha_diffusion import get_adapter_state_dict, inject_adapter
from loha_diffusion.model import adapter_layers, disable_adapters, enable_adapters
from loha_diffusion.targeting import unet_preset
from loha_diffusion.tiny import build_unet_from_config, full_size_unet_config

VARIANTS = ("floor", "ours", "peft", "lycoris")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def build_sdxl_variants(names: list[str], rank: int) -> tuple[dict, dict, int]:
    """SDXL (`--arch sdxl`): ours and the floor on ONE UNet (10 GB in fp32; a copy per variant would not fit
    in memory): the floor is the same model with its adapters disabled (`disable_adapters`: every adapted
    layer runs only its base layer). PEFT and LyCORIS are not built."""
    torch.manual_seed(0)
    unet = build_unet_from_config(full_size_unet_config("sdxl"), device="cpu")
    unet.requires_grad_(False)
    inject_adapter(
        unet, unet_preset("full", r=rank, alpha=rank, use_effective_conv2d=True, init_weights=False)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    models = {"floor": Toggled(unet, enabled=False), "ours": Toggled(unet, enabled=True)}
    return (
        {n: models[n] for n in names},
        {"floor": [], "ours": params},
        len(adapter_layers(unet)),
    )


class Toggled:
    """A UNet called with its adapters switched on or off first (the SDXL floor shares ours' UNet)."""

    def __init__(self, unet, *, enabled: bool) -> None:
        self.unet, self.enabled = unet, enabled

    def __call__(self, *args, **kwargs):
        (enable_adapters if self.enabled else disable_adapters)(self.unet)
        return self.unet(*args, **kwargs)


def build_variants(names: list[str], rank: int, arch: str = "sd1") -> tuple[dict, dict, int]:
    """`(models, params, n_targets)`: one UNet per variant (same random base weights and adapter factors)
    and the trainable tensors of each (empty for the floor)."""
    if arch == "sdxl":
        return build_sdxl_variants(names, rank)
    torch.manual_seed(0)
    unet = build_unet_from_config(full_size_unet_config("sd1"), device="cpu")
    unet.requires_grad_(False)
    config = unet_preset("full", r=rank, alpha=rank, use_effective_conv2d=True, init_weights=False)
    ours = copy.deepcopy(unet)
    inject_adapter(ours, config)
    targets = list(adapter_layers(ours))
    state = get_adapter_state_dict(ours)
    models, params = {}, {}
    if "floor" in names:
        models["floor"], params["floor"] = unet, []
    if "ours" in names:
        models["ours"] = ours
        params["ours"] = [p for p in ours.parameters() if p.requires_grad]
    if "peft" in names:
        theirs = copy.deepcopy(unet)
        kwargs = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
        peft.inject_adapter_in_model(peft.LoHaConfig(**kwargs), theirs)
        peft.set_peft_model_state_dict(theirs, state)
        models["peft"] = theirs
        params["peft"] = [p for p in theirs.parameters() if p.requires_grad]
    if "lycoris" in names:
        lyco_unet = copy.deepcopy(unet)
        # LyCORIS's generic wrapper targets modules by class; wrap exactly our targets one by one instead.
        lyco_params = []
        for name in targets:
            lyco = LohaModule(
                name, lyco_unet.get_submodule(name), 1.0, lora_dim=rank, alpha=rank, use_tucker=True
            )
            lyco.apply_to()
            with torch.no_grad():
                for key in LOHA_KEYS:
                    if f"{name}.{key}" in state:
                        getattr(lyco, key).copy_(state[f"{name}.{key}"])
            lyco_params += list(lyco.parameters())
        models["lycoris"], params["lycoris"] = lyco_unet, lyco_params
    if "ours" not in names:
        del ours
    return models, params, len(targets)


def make_step(model, params: list, latent: int, dtype: torch.dtype, adamw: str, arch: str = "sd1"):
    """A callable running one training step of `model` (the floor when `params` is empty). SDXL gets its
    conditioning: 2048-wide text states, the pooled text embedding and the 6 size/crop time ids."""
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, latent, latent, generator=generator)
    hidden = torch.randn(1, 77, 2048 if arch == "sdxl" else 768, generator=generator)
    extra = {}
    if arch == "sdxl":
        side = latent * 8
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, generator=generator),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32),
        }
    options = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw]
    optimizer = torch.optim.AdamW(params, lr=1e-4, **options) if params else None

    def step() -> None:
        inp = sample.detach().requires_grad_(optimizer is None)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(inp, 500, hidden, **extra).sample
        out.float().square().mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


# Ops FlopCounterMode has no formula for that our steps run: the in-place β = 1 accumulations of the fused
# bypass and the CPU flash-attention kernels; the formulas of their out-of-place / CUDA siblings apply. The
# registry holds them already shape-wrapped, so they are passed on raw.
def _raw(formula):
    def counted(*args, **kwargs):
        return formula(*args, **kwargs)

    counted._get_raw = True
    return counted


_aten = torch.ops.aten
EXTRA_FLOP_FORMULAS = {
    _aten.addmm_: _raw(flop_counter.flop_registry[_aten.addmm]),
    _aten.baddbmm_: _raw(flop_counter.flop_registry[_aten.baddbmm]),
    _aten._scaled_dot_product_flash_attention_for_cpu: _raw(
        flop_counter.flop_registry[_aten._scaled_dot_product_flash_attention]
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw(
        flop_counter.flop_registry[_aten._scaled_dot_product_flash_attention_backward]
    ),
}


def count_macs(step) -> int:
    """Multiply-adds of one call of `step` (matmuls, convs and attention, forward and backward; elementwise ops
    and the optimizer are not counted), with torch's `FlopCounterMode` (2 flops per multiply-add)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        step()
    return counter.get_total_flops() // 2


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(args: argparse.Namespace) -> None:
    """Run in a subprocess: build one variant, take one warm-up step, then print as JSON the resident memory
    before a second step and the high-water mark during it (bytes)."""
    models, params, _ = build_variants([args.memory_child], args.rank, args.arch)
    step = make_step(
        models[args.memory_child],
        params[args.memory_child],
        args.latent,
        DTYPES[args.dtype],
        args.adamw,
        args.arch,
    )
    step()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size (Linux)
    step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"before": before * 1024, "peak": peak * 1024}))


def measure_memory(names: list[str], args: argparse.Namespace) -> dict[str, int]:
    """Peak bytes above the pre-step resident size, per variant, each in a fresh subprocess."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    peaks = {}
    for name in names:
        command = [sys.executable, __file__, "--memory-child", name, "--latent", str(args.latent)]
        command += [
            "--rank",
            str(args.rank),
            "--dtype",
            args.dtype,
            "--adamw",
            args.adamw,
            "--arch",
            args.arch,
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        reading = json.loads(result.stdout.strip().splitlines()[-1])
        peaks[name] = reading["peak"] - reading["before"]
    return peaks


def report(samples: dict[str, list[float]], peaks: dict[str, int] | None) -> None:
    medians = {n: statistics.median(v) for n, v in samples.items()}
    for n, values in samples.items():
        ratios = [v / f for v, f in zip(values, samples["floor"])]
        line = (
            f"{n:<8} {medians[n]:8.2f} s (spread {min(values):.2f}-{max(values):.2f})   "
            f"x{medians[n] / medians['floor']:.3f} floor (per repeat {min(ratios):.3f}-{max(ratios):.3f})"
        )
        if peaks and n in peaks:
            line += f"   step peak {peaks[n] / 2**30:.3f} GiB, added {(peaks[n] - peaks['floor']) / 2**30:+.3f} GiB"
        print(line)
    for n in ("peft", "lycoris"):
        if n in medians and "ours" in medians:
            print(
                f"ours/{n}: {medians['ours'] / medians[n]:.3f} ({medians[n] / medians['ours']:.2f}x faster)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="sdxl: ours vs the floor only")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["peft", "lycoris"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16: CPU autocast")
    add_timing_arguments(parser)
    parser.add_argument(
        "--adamw",
        default="fused",
        choices=["default", "foreach", "fused"],
        help="torch AdamW implementation (fused: what the trainer uses where torch supports it)",
    )
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per step")
    parser.add_argument(
        "--macs", action="store_true", help="also count each variant's multiply-adds per step (the bound)"
    )
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    names = [n for n in VARIANTS if n not in args.skip and (args.arch == "sd1" or n in ("floor", "ours"))]
    models, params, n_targets = build_variants(names, args.rank, args.arch)
    dtype = DTYPES[args.dtype]
    steps = {n: make_step(models[n], params[n], args.latent, dtype, args.adamw, args.arch) for n in names}
    macs = {n: count_macs(step) for n, step in steps.items()} if args.macs else None
    samples = time_interleaved(steps, args.repeats, CLOCKS[args.clock])
    del steps, models, params
    gc.collect()
    peaks = measure_memory(names, args) if args.memory else None
    print(
        f"{'SDXL' if args.arch == 'sdxl' else 'SD1.5'} UNet, latent {args.latent}, r={args.rank}, {n_targets} adapted modules, {args.dtype}, "
        f"AdamW {args.adamw}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.clock} clock, medians of {args.repeats}"
    )
    report(samples, peaks)
    if macs:
        for n, count in macs.items():
            print(f"{n:<8} {count / 1e9:8.1f} GMAC per step   x{count / macs['floor']:.3f} floor")


if __name__ == "__main__":
    main()
