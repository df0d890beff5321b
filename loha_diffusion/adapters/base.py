"""The adapter contract shared by LoHa, LoRA and LoKr, and `LayerSpec`, the geometry of the wrapped layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know about its base layer: the op and the weight geometry."""

    op: str  # "linear" | "conv1d" | "conv2d"
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    zero_padding: bool = True

    @classmethod
    def from_module(cls, module: nn.Module) -> LayerSpec:
        """The spec of an `nn.Linear`, `nn.Conv1d` or `nn.Conv2d`; anything else raises `TypeError`."""
        if isinstance(module, nn.Linear):
            return cls("linear", tuple(module.weight.shape))
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return cls(
                "conv1d" if isinstance(module, nn.Conv1d) else "conv2d",
                tuple(module.weight.shape),
                tuple(module.stride),
                module.padding if isinstance(module.padding, str) else tuple(module.padding),
                tuple(module.dilation),
                module.groups,
                module.padding_mode == "zeros",
            )
        raise TypeError(
            f"Adapters support nn.Linear, nn.Conv1d and nn.Conv2d, not {type(module).__name__}; "
            "remove this module from target_modules."
        )

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Input channels per group (the weight's second dimension)."""
        return self.weight_shape[1]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def kernel_numel(self) -> int:
        n = 1
        for k in self.kernel_size:
            n *= k
        return n

    @property
    def is_conv(self) -> bool:
        return self.op != "linear"

    @property
    def channel_dim(self) -> int:
        """Dimension of the output that holds channels: last for Linear, 1 for convs."""
        return 1 if self.is_conv else -1

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer's op with another weight: `F.linear` / `F.conv*d` with the layer's geometry."""
        if self.op == "linear":
            return F.linear(x, weight, bias)
        conv = F.conv2d if self.op == "conv2d" else F.conv1d
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def positions(self, x: torch.Tensor) -> int:
        """Number of output positions (tokens × batch) a call on `x` computes."""
        if self.op == "linear":
            return x.numel() // max(x.shape[-1], 1)
        n = x.shape[0]
        for axis, size in enumerate(x.shape[2:]):
            if self.padding == "same":
                n *= size
                continue
            pad = 0 if self.padding == "valid" else self.padding[axis]
            k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
            n *= max((size + 2 * pad - d * (k - 1) - 1) // s + 1, 1)
        return n


def compare_tensors(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """`(missing, unexpected, wrong_shapes)` of `given` against `expected`, names sorted, shapes described."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, wrong


class Adapter(nn.Module):
    """One adapter on one layer. Subclasses create their factors and implement `delta_weight`,
    `state_tensors` and `load_state_tensors`; kinds with a cheaper low-rank forward also implement
    `bypass` and `bypass_is_cheaper`."""

    kind: str = ""

    def __init__(
        self, spec: LayerSpec, r: int, alpha: float, *, rank_dropout: float = 0.0, module_dropout: float = 0.0
    ):
        super().__init__()
        if r < 1:
            raise ValueError(f"Adapter rank must be >= 1, got {r}.")
        self.spec = spec
        self.r = int(r)
        self.alpha = float(alpha)
        self.scale = 1.0
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)

    @property
    def scaling(self) -> float:
        """The factor ΔW is multiplied by: `alpha / r` times the user's `scale`."""
        return self.alpha / self.r * self.scale

    @property
    def effective_rank(self) -> int:
        """The largest rank ΔW can have on this layer: `r` (LoHa: `r²`, the rank of a Hadamard product of two
        rank-r matrices), capped by the weight's own rank `min(out, in·k)`."""
        return min(self.r, self.spec.out_features, self.spec.in_features * self.spec.kernel_numel)

    def delta_weight(self) -> torch.Tensor:
        """ΔW shaped like the base weight, including `scaling`, in the factors' dtype, without dropout."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their PEFT/Kohya names (`hada_w1_a`, `lora_A.weight`, ...)."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` (the names of `state_tensors`) into the factors; missing, extra or misshaped
        tensors raise a `ValueError` naming them."""
        own = self.state_tensors()
        missing, extra, wrong = compare_tensors(own, tensors)
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unexpected {extra}")
            if wrong:
                parts.append("wrong shapes: " + "; ".join(wrong))
            raise ValueError(f"Cannot load {self.kind} tensors: " + ", ".join(parts) + ".")
        with torch.no_grad():
            for k, target in own.items():
                target.copy_(tensors[k].to(device=target.device, dtype=target.dtype))

    def bypass_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether `bypass(x)` costs less than running the base op with a merged weight."""
        return False

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """Δ(x) computed without building ΔW (only for kinds that have a low-rank form)."""
        raise NotImplementedError(f"{self.kind} adapters have no bypass form")

    def rank_dropout_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """PEFT's rank dropout: keep each output row with probability 1-p, rescale by 1/kept-fraction.

        The all-rows-dropped case (PEFT divides by zero there) returns an all-zero mask."""
        keep = (torch.rand(self.spec.out_features) > self.rank_dropout).to(dtype)
        kept = keep.mean()
        if kept > 0:
            keep = keep / kept
        return keep.to(device)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale}"
