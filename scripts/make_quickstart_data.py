#!/usr/bin/env python
"""Write the bundled quick-start dataset: 16 small images of coloured shapes with same-name .txt captions.

    python scripts/make_quickstart_data.py [--out sample_data/shapes] [--size 64]

The committed `sample_data/shapes/` was made with the defaults; the drawing is deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}


def draw_shape(
    size: int, shape: str, colour: tuple[int, int, int], background: tuple[int, int, int]
) -> Image.Image:
    """One `size`x`size` image: a centred filled shape on a plain background."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    lo, hi = size * 0.2, size * 0.8
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=colour)
    elif shape == "triangle":
        draw.polygon([(size / 2, lo), (hi, hi), (lo, hi)], fill=colour)
    elif shape == "cross":
        bar = size * 0.12
        draw.rectangle((lo, size / 2 - bar, hi, size / 2 + bar), fill=colour)
        draw.rectangle((size / 2 - bar, lo, size / 2 + bar, hi), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def make_dataset(out: str | Path, size: int = 64) -> list[Path]:
    """Write every colour x shape combination (backgrounds alternate) with its caption; returns the image paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (colour_name, colour) in enumerate(COLOURS.items()):
        for j, shape in enumerate(SHAPES):
            background_name = list(BACKGROUNDS)[(i + j) % 2]
            image = draw_shape(size, shape, colour, BACKGROUNDS[background_name])
            stem = f"{colour_name}_{shape}"
            path = out / f"{stem}.png"
            image.save(path, optimize=True)
            (out / f"{stem}.txt").write_text(f"a {colour_name} {shape} on a {background_name} background\n")
            paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="sample_data/shapes", help="output folder (default: sample_data/shapes)"
    )
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (default: 64)")
    args = parser.parse_args()
    paths = make_dataset(args.out, args.size)
    print(f"wrote {len(paths)} images with captions to {args.out}")


if __name__ == "__main__":
    main()
