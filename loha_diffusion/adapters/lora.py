"""LoRA / LoCon adapter (Kohya `lora_down`/`lora_up`, LyCORIS Tucker `lora_mid`), PEFT tensor names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import lora as lora_fn
from .base import Adapter, LayerSpec


class LoRAAdapter(Adapter):
    """`ΔW = alpha/r · scale · up @ down` with PEFT's names: `lora_A.weight` (down), `lora_B.weight` (up).

    Linear: `A (r, in)`, `B (out, r)`. Conv (LoCon): `A (r, in, *kernel)` — a conv with the layer's
    stride/padding — and `B (out, r, 1...)`. With `use_effective_conv2d` and a kernel > 1 (Tucker):
    `A (r, in, 1...)`, `lora_mid.weight (r, r, *kernel)`, `B (out, r, 1...)`.
    """

    kind = "lora"

    def __init__(
        self,
        spec: LayerSpec,
        r: int,
        alpha: float,
        *,
        use_effective_conv2d: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        init_weights: bool = True,
    ):
        super().__init__(spec, r, alpha, rank_dropout=rank_dropout, module_dropout=module_dropout)
        out, in_ = spec.out_features, spec.in_features
        self.is_cp = bool(use_effective_conv2d and spec.is_conv and spec.kernel_numel > 1)
        pointwise = (1,) * len(spec.kernel_size)
        down_kernel = pointwise if self.is_cp else spec.kernel_size
        self.lora_A = nn.Parameter(torch.empty(r, in_, *down_kernel))
        self.lora_B = nn.Parameter(torch.empty(out, r, *pointwise))
        self.lora_mid = nn.Parameter(torch.empty(r, r, *spec.kernel_size)) if self.is_cp else None
        self.reset_parameters(init_weights)

    def reset_parameters(self, init_weights: bool = True) -> None:
        """PEFT's init: He-uniform `lora_A` (and core), `lora_B = 0` unless `init_weights=False`."""
        for name, tensor in self.state_tensors().items():
            if init_weights and name == "lora_B.weight":
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        if self.is_cp:
            out["lora_mid.weight"] = self.lora_mid
        return out

    def delta_weight(self) -> torch.Tensor:
        return lora_fn.delta_weight(
            self.lora_A, self.lora_B, self.lora_mid, self.spec.weight_shape, self.scaling
        )

    def bypass_is_cheaper(self, x: torch.Tensor) -> bool:
        # LoRA's bypass is the standard form (two thin matmuls); merged only pays off with grouped convs.
        return self.spec.groups == 1 and self.spec.zero_padding

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """`s · B(A(x))` as two (three with Tucker) thin ops, never building ΔW."""
        spec = self.spec
        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else self.lora_A.dtype
        down, up = self.lora_A.to(dtype), (self.lora_B * self.scaling).to(dtype)
        if spec.op == "linear":
            return F.linear(F.linear(x, down), up)
        conv = F.conv2d if spec.op == "conv2d" else F.conv1d
        if self.is_cp:
            hidden = conv(
                conv(x, down), self.lora_mid.to(dtype), None, spec.stride, spec.padding, spec.dilation
            )
        else:
            hidden = conv(x, down, None, spec.stride, spec.padding, spec.dilation)
        return conv(hidden, up)
