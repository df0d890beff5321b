"""Checks that adapter tensors are finite and fit the dtype they are written in: the one rule every writer
(`save_kohya`, `save_peft`, checkpoints) and loader applies, so a NaN never reaches a file or a model silently.

Keys are state-dict keys (`"<module>.<tensor>"`); problems are reported per module, the way users find them
in ComfyUI's or A1111's logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .errors import NonFiniteError, format_problems

HALF_DTYPES = (torch.float16, torch.bfloat16)


def module_name(key: str) -> str:
    """The module part of a state-dict key: `"lora_unet_x.hada_w1_a"` -> `"lora_unet_x"`."""
    return key.rsplit(".", 1)[0] if "." in key else key


def non_finite_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The modules (sorted, each once) with a NaN or infinite value in any floating-point tensor of `tensors`."""
    bad = {
        module_name(key)
        for key, t in tensors.items()
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    }
    return sorted(bad)


def overflowing_modules(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[str]:
    """The modules whose finite values exceed the largest finite value of `dtype` (65,504 for float16), i.e.
    that would become infinite when cast to it; `"<module> (max |x| = 7.2e+05)"`, sorted."""
    if not dtype.is_floating_point:
        return []
    limit = torch.finfo(dtype).max
    worst: dict[str, float] = {}
    for key, t in tensors.items():
        if not t.is_floating_point() or not t.numel():
            continue
        finite = t[torch.isfinite(t)]
        peak = float(finite.abs().max()) if finite.numel() else 0.0
        if peak > limit:
            name = module_name(key)
            worst[name] = max(worst.get(name, 0.0), peak)
    return [f"{name} (max |x| = {peak:.3g})" for name, peak in sorted(worst.items())]


def delta_bound(scaling: float, factors: Iterable[torch.Tensor], rank: int) -> float:
    """A cheap upper bound of an adapter's max|ΔW| without building ΔW: |`scaling`| times, per factor, its
    largest magnitude times `rank` (every inner sum of every kind — LoRA, LoHa, LoKr, CP/Tucker cores — runs
    over at most the rank). Exact enough to clear ordinary adapters; inf/nan when a factor is.

    Args:
        scaling: the factor the rebuilt product is multiplied by (alpha / rank, ...).
        factors: the adapter's non-empty factor tensors (any dtype, any device; alpha excluded).
        rank: the adapter's rank (values below 1 count as 1).
    """
    bound = abs(scaling)
    for tensor in factors:
        bound *= float(tensor.detach().abs().max()) * max(rank, 1)
    return bound


def check_writable(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None, target: str) -> None:
    """Refuse to write `tensors` to `target` (a file or folder name, for the message) if any is non-finite,
    or (with `dtype`) would overflow when cast to `dtype`.

    Raises:
        NonFiniteError: lists the modules; suggests retraining from a good checkpoint (non-finite) or saving
            in float32 / bfloat16 (overflow).
    """
    bad = non_finite_modules(tensors)
    if bad:
        raise NonFiniteError(
            format_problems(
                f"refusing to write {target}: {len(bad)} module(s) have NaN or infinite values",
                [("module(s) with NaN/Inf", bad)],
                [
                    "the adapter diverged; resume from an earlier checkpoint with a lower learning rate, or "
                    "use mixed_precision bf16 instead of fp16"
                ],
            )
        )
    if dtype is None:
        return
    over = overflowing_modules(tensors, dtype)
    if over:
        name = str(dtype).removeprefix("torch.")
        raise NonFiniteError(
            format_problems(
                f"refusing to write {target} in {name}: {len(over)} module(s) have values beyond {name}'s "
                f"range ({torch.finfo(dtype).max:.6g}), which would be written as infinity",
                [(f"module(s) overflowing {name}", over)],
                ['save in float32 or bfloat16 (`save_precision = "fp32"` / `"bf16"`, `--dtype fp32`)'],
            )
        )
