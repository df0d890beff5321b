"""LoHa adapter (flat and CP/effective-conv2d) with the merged-weight / low-rank-bypass fast path."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..functional import loha as loha_fn
from .base import Adapter, LayerSpec
from .costs import bypass_is_cheaper


class LoHaAdapter(Adapter):
    """`ΔW = alpha/r · scale · (w1a @ w1b) ⊙ (w2a @ w2b)` on a Linear / Conv1d / Conv2d layer.

    Parameter names and shapes are PEFT's and LyCORIS's (`hada_w1_a`, ...). With `use_effective_conv2d`
    and a kernel larger than 1 the CP/Tucker form is used: `w*_a (r, out)`, `w*_b (r, in)`,
    `hada_t* (r, r, *kernel)` (PEFT's Conv1d layout `(r, r, k, 1)`).
    """

    kind = "loha"
    title = "LoHa"
    file_tensors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    optional_file_tensors = ("hada_t1", "hada_t2")
    kohya_names = {name: name for name in file_tensors + optional_file_tensors}
    detect_tensors = ("hada_w1_a",)
    cp_file_tensors = ("hada_t1",)
    lycoris_algo = "loha"

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
        if self.is_cp:
            core_kernel = spec.kernel_size if spec.op == "conv2d" else (*spec.kernel_size, 1)
            shapes = {"w_a": (r, out), "w_b": (r, in_), "t": (r, r, *core_kernel)}
        else:
            shapes = {"w_a": (out, r), "w_b": (r, in_ * spec.kernel_numel)}
        self.hada_w1_a = nn.Parameter(torch.empty(shapes["w_a"]))
        self.hada_w1_b = nn.Parameter(torch.empty(shapes["w_b"]))
        self.hada_w2_a = nn.Parameter(torch.empty(shapes["w_a"]))
        self.hada_w2_b = nn.Parameter(torch.empty(shapes["w_b"]))
        if self.is_cp:
            self.hada_t1 = nn.Parameter(torch.empty(shapes["t"]))
            self.hada_t2 = nn.Parameter(torch.empty(shapes["t"]))
        else:
            self.hada_t1 = self.hada_t2 = None
        self.reset_parameters(init_weights)

    @classmethod
    def file_problems(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """The generic checks plus: CP needs both cores, and both halves must have the same rank (loaders
        scale by the w1 rank)."""
        problems = super().file_problems(tensors)
        present = [k for k in cls.optional_file_tensors if k in tensors]
        if len(present) == 1:
            problems.append(f"CP LoHa needs both hada_t1 and hada_t2, has only {present}")
        if (
            all(k in tensors for k in cls.file_tensors)
            and tensors["hada_w1_b"].shape[0] != tensors["hada_w2_b"].shape[0]
        ):
            problems.append(
                f"hada_w1_b rank {tensors['hada_w1_b'].shape[0]} differs from hada_w2_b rank "
                f"{tensors['hada_w2_b'].shape[0]} (loaders scale by the w1 rank)"
            )
        return problems

    @classmethod
    def file_rank(cls, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """`hada_w1_b.shape[0]`, as ComfyUI, A1111 and LyCORIS read it (None without `hada_w1_b`)."""
        return int(tensors["hada_w1_b"].shape[0]) if "hada_w1_b" in tensors else None

    @classmethod
    def file_delta_weight(
        cls,
        tensors: Mapping[str, torch.Tensor],
        weight_shape: tuple[int, ...] | torch.Size,
        scaling: float,
    ) -> torch.Tensor:
        """`scaling · (w1a @ w1b) ⊙ (w2a @ w2b)` (CP: the Tucker rebuild of each half) shaped `weight_shape`,
        with plain autograd, in the tensors' dtype and on their device."""
        t = tensors
        delta = loha_fn.delta_weight_reference(
            t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"), t.get("hada_t2")
        )
        return (delta * scaling).reshape(weight_shape)

    def reset_parameters(self, init_weights: bool = True) -> None:
        """PEFT's init: He-uniform everywhere and `hada_w2_b = 0` (identity at start) unless `init_weights=False`."""
        for name, tensor in self.state_tensors().items():
            if init_weights and name == "hada_w2_b":
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if self.is_cp:
            names += ["hada_t1", "hada_t2"]
        return {n: getattr(self, n) for n in names}

    @property
    def effective_rank(self) -> int:
        """`r²` (the Hadamard product of two rank-r matrices; FedPara, Hyeon-Woo et al. 2022, Prop. 1), capped
        by the weight's rank `min(out, in·k)`."""
        spec = self.spec
        return min(self.r * self.r, spec.out_features, spec.in_features * spec.kernel_numel)

    def _factors(self) -> tuple[torch.Tensor, ...]:
        return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.hada_t1, self.hada_t2

    def delta_weight(self) -> torch.Tensor:
        w1a, w1b, w2a, w2b, t1, t2 = self._factors()
        delta = loha_fn.delta_weight(w1a, w1b, w2a, w2b, t1, t2, scaling=self.scaling)
        return delta.reshape(self.spec.weight_shape)

    # -- fast path ---------------------------------------------------------------------------------

    def bypass_is_cheaper(self, x: torch.Tensor) -> bool:
        """The cost model's pick for this call: `prefers_bypass` on `x`'s device, with gradients when autograd
        is on and the factors require them."""
        return self.prefers_bypass(x)

    def prefers_bypass(
        self, x: torch.Tensor, device_type: str | None = None, training: bool | None = None
    ) -> bool:
        """Whether the bypass costs less than the merged form for input `x` on a device kind (default
        `x.device.type`; `x` may be on `meta`), in training (gradients for the factors; default: whether
        autograd is on and the factors require grad) or not.

        Cost in multiply-adds (docs/cost-model.md), through `costs.bypass_is_cheaper` with the device's constants:
        bypass `P·r²·(in·k + out)` (CP: `P_in·r²·in + P·r²·(r²·k + out)`) per pass, times 3 in training
        (forward, input gradient, factor gradients), times the thin-matmul penalty; merged in training
        `P·out·in·k` (the weight-gradient matmul) `+ (8r + c_train)·out·in·k` (rebuild), without gradients
        `(2r + c_infer)·out·in·k`. `P` = output positions.
        """
        if training is None:
            training = torch.is_grad_enabled() and self.hada_w1_a.requires_grad
        return bypass_is_cheaper(
            self.spec,
            x,
            inner_rank=self.r * self.r,
            rebuild_macs=(8 * self.r, 2 * self.r),
            is_cp=self.is_cp,
            training=training,
            device_type=x.device.type if device_type is None else device_type,
        )

    def bypass_sources(self) -> tuple[loha_fn.KhatriRaoFactors, tuple[torch.Tensor, ...]]:
        """`(KhatriRaoFactors, the factors)`: the fused node keeps the factors, not their Khatri-Rao products."""
        return loha_fn.KhatriRaoFactors(self.spec.kernel_size), tuple(self.state_tensors().values())

    def bypass_factors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`(down, core, up)` = `(Q, T, P)` of `functional.loha.bypass_factors` (the Khatri-Rao form, R = r²):
        `Q (r², in)` for a Linear or CP conv, `(r², in, *kernel)` for a flat conv, the CP core `T (r², r², *kernel)`
        or None, `P (out, r²)`; no scaling. Built by `KhatriRaoFactors` in the layouts the matmuls read (`Q`
        row-major over the inputs: no transposed Khatri-Rao rows and no copy before the matmul), which cut the
        bypass's fixed cost on small-token layers by ~0.15 ms of ~0.5-1.5 ms (CPU fp32, 1280-wide Linear)."""
        builder, sources = self.bypass_sources()
        return builder.build(*sources)
