"""LoRA / LoCon adapter (Kohya `lora_down`/`lora_up`, LyCORIS Tucker `lora_mid`), PEFT tensor names."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..functional import lora as lora_fn
from .base import Adapter, LayerSpec
from .costs import bypass_is_cheaper


class LoRAAdapter(Adapter):
    """`ΔW = alpha/r · scale · up @ down` with PEFT's names: `lora_A.weight` (down), `lora_B.weight` (up).

    Linear: `A (r, in)`, `B (out, r)`. Conv (LoCon): `A (r, in, *kernel)` — a conv with the layer's
    stride/padding — and `B (out, r, 1...)`. With `use_effective_conv2d` and a kernel > 1 (Tucker):
    `A (r, in, 1...)`, `lora_mid.weight (r, r, *kernel)`, `B (out, r, 1...)`.
    """

    kind = "lora"
    title = "LoRA"
    file_tensors = ("lora_down.weight", "lora_up.weight")
    optional_file_tensors = ("lora_mid.weight",)
    kohya_names = {
        "lora_A.weight": "lora_down.weight",
        "lora_B.weight": "lora_up.weight",
        "lora_mid.weight": "lora_mid.weight",
    }
    detect_tensors = ("lora_down.weight", "lora_up.weight")
    cp_file_tensors = ("lora_mid.weight",)
    lycoris_algo = "locon"
    kohya_network_module = "networks.lora"

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

    @classmethod
    def file_rank(cls, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """`lora_down.weight.shape[0]`, as ComfyUI and A1111 read it (None without `lora_down.weight`)."""
        return int(tensors["lora_down.weight"].shape[0]) if "lora_down.weight" in tensors else None

    @classmethod
    def file_delta_weight(
        cls,
        tensors: Mapping[str, torch.Tensor],
        weight_shape: tuple[int, ...] | torch.Size,
        scaling: float,
    ) -> torch.Tensor:
        """`scaling · up @ down` (Tucker: through `lora_mid.weight`) shaped `weight_shape`, in the tensors'
        dtype and on their device."""
        t = tensors
        return lora_fn.delta_weight(
            t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight"), weight_shape, scaling
        )

    def _own_tensors(self, file_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """File tensors under PEFT's names; a 2-D `lora_down`/`lora_up` on a 1x1 conv is given its unit dims,
        as A1111 and ComfyUI accept it."""
        own = self.state_tensors()
        return {
            name: fit_unit_dims(tensor, tuple(own[name].shape)) if name in own else tensor
            for name, tensor in super()._own_tensors(file_tensors).items()
        }

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
        """The cost model's pick for this call: `prefers_bypass` on `x`'s device."""
        return self.prefers_bypass(x)

    def prefers_bypass(
        self, x: torch.Tensor, device_type: str | None = None, training: bool | None = None
    ) -> bool:
        """Whether the bypass (PEFT's form, two thin ops) costs less than the merged form for input `x` on a
        device kind (default `x.device.type`), in training (default: autograd on and the factors require grad).

        The LoHa model with rank r instead of r² (docs/cost-model.md): bypass `P·r·(in·k + out)` (Tucker:
        `P_in·r·in + P·r·(r·k + out)`) per pass, ×3 in training, times the device's thin-matmul penalty;
        merged `P·out·in·k + (3r + c_train)·out·in·k` in training, `(r + c_infer)·out·in·k` without. So the
        bypass wins unless r approaches the layer's width (in training on many tokens, CPU: r > in·out /
        (3.9·(in + out)), e.g. r > 41 on a 320×320 Linear); grouped convs have no bypass.
        """
        if training is None:
            training = torch.is_grad_enabled() and self.lora_A.requires_grad
        return bypass_is_cheaper(
            self.spec,
            x,
            inner_rank=self.r,
            rebuild_macs=(3 * self.r, self.r),
            is_cp=self.is_cp,
            training=training,
            device_type=x.device.type if device_type is None else device_type,
            long_linear=False,
        )

    def bypass_factors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`(down, core, up)` = `(A, mid, B)`, PEFT's two (Tucker: three) thin ops, never building ΔW: `A (r, in)`
        for a Linear or Tucker conv, `(r, in, *kernel)` for a flat conv, `mid (r, r, *kernel)` or None,
        `B (out, r)`; no scaling."""
        down = self.lora_A.flatten(1) if self.is_cp else self.lora_A
        return down, self.lora_mid, self.lora_B.flatten(1)


def fit_unit_dims(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`tensor` reshaped to `shape` when only trailing unit dims differ (a 2-D `lora_down` on a 1x1 conv, as
    A1111 and ComfyUI accept), else `tensor` unchanged."""

    def core(s: tuple[int, ...]) -> tuple[int, ...]:
        while len(s) > 2 and s[-1] == 1:
            s = s[:-1]
        return s

    if tuple(tensor.shape) != shape and core(tuple(tensor.shape)) == core(shape):
        return tensor.reshape(shape)
    return tensor
