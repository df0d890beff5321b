"""The timing shared by the benchmark scripts: interleaved repeats, so that load from other work on the machine
falls on every variant alike, and a choice of clock.

The scripts import it as `timing` (run as `python benchmarks/<script>.py`, their folder is on `sys.path`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

# `cpu` counts only this process's CPU time: on a shared machine with `--threads 1` it leaves out the time other
# processes hold the core (use it for ratios; wall time is what a user waits).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(
    runners: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds per call of each runner, `repeats` samples each, after one warm-up call each. Every repeat calls
    every runner once, starting one further along each time (rotating order)."""
    for run in runners.values():
        run()
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = clock()
            runners[name]()
            samples[name].append(clock() - start)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each runner's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """`--clock` (a key of `CLOCKS`) and `--threads` (for `set_threads`), as every benchmark script takes them."""
    parser.add_argument(
        "--clock", default="wall", choices=sorted(CLOCKS), help="cpu: process CPU time (shared machines)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads(threads)` when given (`--threads`), else torch's default stays."""
    if threads:
        torch.set_num_threads(threads)
