"""Small helpers shared by the formats, the CLI and training: precision names, the most common value, and
numbers and sizes written for people. Imports no torch at module level (the CLI and the script parse first)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# The precision names of accelerate, diffusers' scripts and kohya (`--save_precision`) -> torch dtype names.
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}


def torch_dtype(precision: str) -> torch.dtype:
    """`torch.float32` / `torch.float16` / `torch.bfloat16` for "fp32" / "fp16" / "bf16".

    Raises:
        ValueError: another name; the message lists the valid ones.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}.")
    return getattr(torch, PRECISIONS[precision])


def most_common(values: Iterable[T]) -> T | None:
    """The most frequent value (the first seen among equals), or None for no values."""
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else None


def format_number(value: Any) -> str:
    """A number as people and kohya metadata write it: `8` for 8.0, `0.5`, `1e-05` (shortest exact `%g`-like
    form for floats that are not whole)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def human_size(num_bytes: float) -> str:
    """`512 B`, `1.5 KiB`, `37.2 MiB`, `6.5 GiB` (binary units, one decimal above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")
