"""LoRA / LoCon math without module state (Kohya `lora_down`/`lora_up`/`lora_mid` = PEFT `lora_A`/`lora_B`).

Layouts: Linear `down (r, in)`, `up (out, r)`; conv `down (r, in, *kernel)`, `up (out, r, 1...)`; Tucker
`down (r, in, 1...)`, `mid (r, r, *kernel)`, `up (out, r, 1...)`.
"""

from __future__ import annotations

import torch


def delta_weight(
    down: torch.Tensor,
    up: torch.Tensor,
    mid: torch.Tensor | None = None,
    shape: torch.Size | tuple[int, ...] | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """ΔW = scaling · up @ down, reshaped to `shape` (the base weight's shape) when given.

    With a Tucker core: `ΔW[o, i, *k] = scaling · Σ_ab up[o, a] · mid[a, b, *k] · down[b, i]`.
    """
    up_2d = up.reshape(up.shape[0], -1)
    down_2d = down.reshape(down.shape[0], -1)
    if mid is None:
        delta = up_2d @ down_2d
    else:
        delta = torch.einsum("ab...,oa,bi->oi...", mid, up_2d, down_2d)
    delta = delta * scaling
    return delta if shape is None else delta.reshape(shape)
