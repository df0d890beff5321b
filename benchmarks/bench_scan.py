"""Cost of the up-front data scan (`scan_dataset`): every image decoded in full, every caption read.

Writes N captioned images (PNG and JPEG, random pixels so they do not compress to nothing) into a temporary
folder, then times `scan_dataset` with 1 thread and with the default thread pool, interleaved over repeats,
and prints the medians (total and per image). Examples:

    python benchmarks/bench_scan.py                       # 1,000 images of 512x384, 3 repeats
    python benchmarks/bench_scan.py --images 200 --size 1024x768 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from loha_diffusion.training.scan import scan_dataset


def write_dataset(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """`count` images (every other one JPEG) of `size` (width, height) pixels with one-line captions."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(count):
        # Smooth noise: random at 1/8 scale, upsampled, so the files are photo-like in size.
        small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
        image.save(root / (f"img{i:05d}.jpg" if i % 2 else f"img{i:05d}.png"))
        (root / f"img{i:05d}.txt").write_text(f"a photo of sks thing number {i}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", default="512x384", help="WIDTHxHEIGHT in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 0], help="thread counts (0: the default)"
    )
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_dataset(root, args.images, size)
        megabytes = sum(p.stat().st_size for p in root.iterdir()) / 2**20
        print(f"{args.images} images of {size[0]}x{size[1]} ({megabytes:.1f} MiB on disk)")
        times: dict[int, list[float]] = {w: [] for w in args.workers}
        for _ in range(args.repeats):
            for workers in args.workers:
                start = time.perf_counter()
                summary = scan_dataset(root, resolution=512, workers=workers or None, log=False)
                times[workers].append(time.perf_counter() - start)
                assert len(summary.records) == args.images
        for workers, values in times.items():
            median = statistics.median(values)
            label = "default" if workers == 0 else str(workers)
            print(
                f"  workers {label:>7}: {median:6.2f} s  ({median / args.images * 1000:.2f} ms per image, "
                f"median of {len(values)})"
            )


if __name__ == "__main__":
    main()
