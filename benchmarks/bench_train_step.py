"""Time per optimizer step of the training script (`loop.train` on a full-size SD1.5 model with random weights,
CPU, batch 1) with and without the latent and text-encoder caches, next to the adapted UNet's step alone and
the frozen UNet floor (issue 12's target: with the caches on, the script's step costs at most 1.25x the UNet's
LoHa step alone).

The base model is a diffusers folder with random weights built from the shipped SD1.5 configs
(`loha_diffusion/base_configs/sd15`, `tiny.full_size_unet_config`) in a temporary folder (~4.3 GB on disk);
the data is `--images` random-noise images of `--resolution` px with captions. Each variant is a real
`train(cfg)` run (`--warmup` + `--steps` optimizer steps); a step's time is the time between two ends of
`loop.end_step`, i.e. everything the loop does per step: the loader (image read and transform, or the cached
latent parameters), the VAE encode (uncached), the text encoder, the UNet forward and backward, AdamW,
logging. The warm-up steps are left out, and so is the fixed-set evaluation loss a run computes before its
first step (`loop.eval_loss`, a no-op here). The caches are built before the loop, so their one-off cost is not
in a step; their build time (wall clock) is printed separately.

The UNet alone is timed in the last run, on that run's own adapted UNet (the same adapter settings as
training): `ours` = forward + backward + AdamW over the adapter parameters (as `bench_unet_step.py`), `floor` =
the same UNet with its adapters disabled, forward + backward to the input (no parameter is trained), both with
random latents and text states at the same size, interleaved (`timing.time_interleaved`).

    python benchmarks/bench_train_step.py --steps 3 --warmup 1 --repeats 3
    python benchmarks/bench_train_step.py --variants none latents --resolution 256   # quicker

Measured (2026-11-30, shared 2-core CPU, `--threads 1 --clock cpu`, 3 steps, r=8 "full" preset, fp32): no cache
26.0 s/step (x1.39 the UNet LoHa step), latent cache 19.2 s (x1.03), latent + text cache 18.6 s (x0.99); UNet
LoHa step alone 18.7 s, frozen floor 15.2 s; the latent cache took 7 s per 512 px image to build.

`--preset`/`--rank` default to bench_unet_step's adapter ("full", r=8); the trainer's own default preset is
"attn_ff". `--clock cpu --threads 1` leaves out the time other work on a shared machine holds the core.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_unet_step import Toggled, make_step
from diffusers import AutoencoderKL
from PIL import Image
from timing import CLOCKS, add_timing_arguments, set_threads, time_interleaved

from loha_diffusion.model import enable_adapters
from loha_diffusion.single_file import CLIP_TOKENIZER, base_configs_dir
from loha_diffusion.tiny import build_full_size_text_encoder, build_unet_from_config, full_size_unet_config
from loha_diffusion.training import loop
from loha_diffusion.training.config import load_config

VARIANT_FLAGS = {
    "none": [],
    "latents": ["--cache_latents", "true"],
    "all": ["--cache_latents", "true", "--cache_text_encoder_outputs", "true"],
}


def write_base_model(folder: Path) -> Path:
    """A full-size SD1.5 diffusers folder with random weights (seed 0) from the shipped configs."""
    shipped = base_configs_dir() / "sd15"
    shutil.copytree(shipped, folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(base_configs_dir() / CLIP_TOKENIZER / name, folder / "tokenizer" / name)
    torch.manual_seed(0)
    unet = build_unet_from_config(full_size_unet_config("sd1"), device="cpu")
    unet.save_pretrained(folder / "unet")
    del unet
    build_full_size_text_encoder("sd1", device="cpu").save_pretrained(folder / "text_encoder")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(shipped / "vae")))
    vae.save_pretrained(folder / "vae")
    return folder


def write_images(folder: Path, count: int, size: int) -> Path:
    """`count` random-noise RGB PNGs of `size` px with a caption each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks dog number {i}, sitting on a sofa")
    return folder


class StepClock:
    """Records the wall and CPU time at each `end_step` (and at `begin_loop`), and keeps the last `Run`."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []
        self.run: Any = None
        self.cache_seconds = 0.0

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def step_times(self, warmup: int, clock: str) -> list[float]:
        index = 0 if clock == "wall" else 1
        values = [b[index] - a[index] for a, b in zip(self.marks, self.marks[1:])]
        return values[warmup:]


def patched(clock: StepClock, after_run: Callable[[Any], None] | None) -> dict[str, Any]:
    """Replacements of `loop`'s functions: `begin_loop` and `end_step` mark the clock, `finish` keeps the run
    and calls `after_run(run)` first (the UNet-alone timing), the cache builders are timed, and `eval_loss`
    (the fixed-set loss before the first step: 16 UNet forwards, no step's cost) is skipped."""
    names = ("begin_loop", "end_step", "finish", "attach_latent_cache", "text_encoder_cache")
    originals = {name: getattr(loop, name) for name in names}

    def begin_loop(run):
        originals["begin_loop"](run)
        clock.mark()

    def end_step(run):
        originals["end_step"](run)
        clock.mark()

    def finish(run, completed):
        clock.run = run
        if after_run is not None:
            after_run(run)
        return originals["finish"](run, completed)

    def timed(name: str):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = originals[name](*args, **kwargs)
            clock.cache_seconds += time.perf_counter() - start
            return result

        return call

    return {
        "begin_loop": begin_loop,
        "end_step": end_step,
        "finish": finish,
        "attach_latent_cache": timed("attach_latent_cache"),
        "text_encoder_cache": timed("text_encoder_cache"),
        "eval_loss": lambda run: {},
    }


def train_variant(flags: list[str], steps: int, after_run: Callable[[Any], None] | None) -> StepClock:
    clock = StepClock()
    replacements = patched(clock, after_run)
    saved = {name: getattr(loop, name) for name in replacements}
    try:
        for name, function in replacements.items():
            setattr(loop, name, function)
        loop.train(load_config(flags), stop_at_step=steps)
    finally:
        for name, function in saved.items():
            setattr(loop, name, function)
    return clock


def unet_alone(run: Any, latent: int, repeats: int, clock: str) -> dict[str, list[float]]:
    """The run's adapted UNet: ours (forward + backward + AdamW over its adapters) and the floor (adapters
    disabled, backward to the input), interleaved."""
    unet = run.models.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    steps = {
        "unet_loha": make_step(Toggled(unet, enabled=True), params, latent, torch.float32, "default"),
        "unet_floor": make_step(Toggled(unet, enabled=False), [], latent, torch.float32, "default"),
    }
    samples = time_interleaved(steps, repeats, CLOCKS[clock])
    enable_adapters(unet)  # as training left it
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", nargs="+", default=["none", "latents", "all"], choices=list(VARIANT_FLAGS)
    )
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per variant")
    parser.add_argument("--repeats", type=int, default=3, help="UNet-alone samples per variant")
    parser.add_argument("--images", type=int, default=4)
    add_timing_arguments(parser)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--preset", default="full")
    args = parser.parse_args()
    set_threads(args.threads)
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        model = write_base_model(tmp / "model")
        data = write_images(tmp / "data", args.images, args.resolution)
        print(f"random SD1.5 folder written in {time.perf_counter() - start:.0f} s")
        results: dict[str, list[float]] = {}
        unet: dict[str, list[float]] = {}
        cache_seconds = {}
        for i, variant in enumerate(args.variants):
            flags = [
                "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
                "--output_dir", str(tmp / f"out_{variant}"), "--resolution", str(args.resolution),
                "--train_batch_size", "1", "--max_train_steps", str(total), "--rank", str(args.rank),
                "--preset", args.preset, "--report_to", "none", "--save_peft_format", "false", "--seed", "0",
                "--center_crop", "true", "--cache_dir", str(tmp / "cache"),
            ] + VARIANT_FLAGS[variant]  # fmt: skip
            last = i == len(args.variants) - 1

            def after_run(run, last=last):
                if last:
                    unet.update(unet_alone(run, args.resolution // 8, args.repeats, args.clock))

            clock = train_variant(flags, total, after_run)
            results[variant] = clock.step_times(args.warmup, args.clock)
            cache_seconds[variant] = clock.cache_seconds
            print(f"{variant}: steps {[round(t, 2) for t in results[variant]]} s", flush=True)
    report(results, unet, cache_seconds, args)


def report(results: dict, unet: dict, cache_seconds: dict, args: argparse.Namespace) -> None:
    medians = {name: statistics.median(values) for name, values in {**results, **unet}.items()}
    loha, floor = medians["unet_loha"], medians["unet_floor"]
    print(
        f"\nSD1.5 full size, random weights, {args.resolution} px, batch 1, fp32, rank {args.rank} preset "
        f"{args.preset}; torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} clock; "
        f"medians of {args.steps} steps (script) / {args.repeats} repeats (UNet alone)"
    )
    labels = {
        "none": "script, no cache",
        "latents": "script, latent cache",
        "all": "script, latent + text cache",
        "unet_loha": "UNet LoHa step alone",
        "unet_floor": "frozen UNet floor",
    }
    for name, value in medians.items():
        values = {**results, **unet}[name]
        extra = f"   (caches built in {cache_seconds[name]:.1f} s wall)" if name in ("latents", "all") else ""
        print(
            f"{labels[name]:<28} {value:7.2f} s (spread {min(values):.2f}-{max(values):.2f})   "
            f"x{value / loha:.3f} UNet LoHa   x{value / floor:.3f} floor{extra}"
        )
    best = "all" if "all" in results else "latents" if "latents" in results else None
    if best:
        ratio = medians[best] / loha
        print(
            f"target (cached script step <= 1.25x UNet LoHa step): x{ratio:.3f} -> {'met' if ratio <= 1.25 else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
