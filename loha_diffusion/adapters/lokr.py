"""LoKr adapter (Kronecker product, LyCORIS' layouts), for importing and applying LoKr files."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import AdapterStateError
from ..functional import lokr as lokr_fn
from .base import Adapter, LayerSpec


class LoKrAdapter(Adapter):
    """`ΔW = scaling · kron(w1, w2)` with `w1 (a, c)`, `w2 (b, d, *kernel)`, `out = a·b`, `in = c·d`.

    Each half is full (`lokr_w1`, `lokr_w2`) or factorized with rank `r` (`lokr_w1_a @ lokr_w1_b`,
    `lokr_w2_a @ lokr_w2_b`, or CP `lokr_t2` + rank-first `lokr_w2_a (r, b)`, `lokr_w2_b (r, d)` for kernels > 1).
    Scaling rule (ComfyUI, A1111, LyCORIS): `scaling = alpha / r · scale` when some half is factorized, else just
    `scale` (alpha is then ignored, as LyCORIS forces alpha = dim for full halves).
    """

    kind = "lokr"
    title = "LoKr"
    file_tensors = ()
    optional_file_tensors = (
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
    )
    kohya_names = {name: name for name in optional_file_tensors}
    detect_tensors = ("lokr_w1", "lokr_w1_a")
    cp_file_tensors = ("lokr_t2",)
    file_alpha_optional = True  # alpha is optional for LoKr files (docs/kohya-format.md section 5)
    lycoris_algo = "lokr"

    def __init__(
        self,
        spec: LayerSpec,
        r: int,
        alpha: float,
        *,
        w1_shape: tuple[int, int] | None = None,
        factor: int = -1,
        decompose_w1: bool = False,
        decompose_w2: bool = True,
        use_tucker: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        init_weights: bool = True,
    ):
        super().__init__(spec, r, alpha, rank_dropout=rank_dropout, module_dropout=module_dropout)
        out, in_ = spec.out_features, spec.in_features
        if w1_shape is None:
            w1_shape = (lokr_fn.factorization(out, factor)[0], lokr_fn.factorization(in_, factor)[0])
        a, c = w1_shape
        if out % a or in_ % c:
            raise ValueError(
                f"LoKr w1 shape {w1_shape} does not divide the weight shape {spec.weight_shape}."
            )
        b, d = out // a, in_ // c
        kernel = spec.kernel_size
        self.w1_shape = (a, c)
        self.decompose_w1 = bool(decompose_w1)
        self.decompose_w2 = bool(decompose_w2)
        self.is_cp = bool(decompose_w2 and use_tucker and spec.kernel_numel > 1)
        if self.decompose_w1:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        if not self.decompose_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif self.is_cp:
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * spec.kernel_numel))
        self.reset_parameters(init_weights)

    @classmethod
    def file_problems(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """The generic checks plus LoKr's rank rule: `lokr_w1_b` and `lokr_w2_b` must agree on the rank."""
        problems = super().file_problems(tensors)
        try:
            lokr_fn.lokr_rank(tensors)
        except ValueError as err:
            problems.append(str(err))
        return problems

    @classmethod
    def file_rank(cls, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """`lokr_w2_b.shape[0]`, else `lokr_w1_b.shape[0]`; None when both halves are full or the two ranks
        differ (`functional.lokr.lokr_rank`, ComfyUI/A1111's rule)."""
        try:
            return lokr_fn.lokr_rank(tensors)
        except ValueError:
            return None

    @classmethod
    def file_scaling(cls, alpha: float | None, tensors: Mapping[str, torch.Tensor]) -> float:
        """`alpha / rank` when a half is factorized and alpha is present, else 1.0: ComfyUI
        (`comfy/weight_adapter/lokr.py`) and A1111 (`extensions-builtin/Lora/network_lokr.py`) use 1.0 without
        a `_b` factor, and LyCORIS forces alpha = dim for full halves (`functional.lokr.lokr_scaling`)."""
        return lokr_fn.lokr_scaling(alpha, cls.file_rank(tensors))

    @classmethod
    def file_delta_weight(
        cls,
        tensors: Mapping[str, torch.Tensor],
        weight_shape: tuple[int, ...] | torch.Size,
        scaling: float,
    ) -> torch.Tensor:
        """`scaling · kron(w1, w2)` from the file tensors, shaped `weight_shape`, in the tensors' dtype and on
        their device (`functional.lokr.delta_weight`)."""
        return lokr_fn.delta_weight(dict(tensors), weight_shape, scaling)

    @classmethod
    def from_file_tensors(
        cls, spec: LayerSpec, tensors: Mapping[str, torch.Tensor], alpha: float | None
    ) -> LoKrAdapter:
        """Build an adapter of the form `tensors` (file names: `lokr_w1`, `lokr_w2_a`, ...) have, and load them
        (fp32 factors on the CPU).

        `alpha=None` (no alpha in the file) means scaling 1, as in ComfyUI and A1111.

        Raises:
            AdapterStateError: (a `ValueError`) unknown or missing tensors, or shapes that do not fit the layer;
                the message names them.
            ValueError: `lokr_w1_b` and `lokr_w2_b` have different ranks (`functional.lokr.lokr_rank`).
        """
        tensors = dict(tensors)
        extra = sorted(set(tensors) - set(cls.optional_file_tensors))
        if extra:
            raise AdapterStateError(f"unexpected LoKr tensors {extra}")
        decompose_w1 = "lokr_w1" not in tensors
        decompose_w2 = "lokr_w2" not in tensors
        needed = (["lokr_w1_a", "lokr_w1_b"] if decompose_w1 else []) + (
            ["lokr_w2_a", "lokr_w2_b"] if decompose_w2 else []
        )
        missing = [k for k in needed if k not in tensors]
        if missing:
            raise AdapterStateError(f"LoKr module is missing {missing}")
        rank = lokr_fn.lokr_rank(tensors)
        w1 = tensors.get("lokr_w1")
        w1_shape = (
            tuple(w1.shape)
            if w1 is not None
            else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
        )
        if len(w1_shape) != 2:
            raise AdapterStateError(f"lokr_w1 must be 2-D, got shape {tuple(w1.shape)}")
        if spec.out_features % w1_shape[0] or spec.in_features % w1_shape[1]:
            raise AdapterStateError(
                f"LoKr w1 shape {w1_shape} does not divide the layer weight {spec.weight_shape}"
            )
        if decompose_w2 and "lokr_t2" not in tensors and tensors["lokr_w2_b"].dim() > 2:
            # LyCORIS' functional form keeps w2_b as (r, d, *kernel); the module (and files) use (r, d·k).
            tensors["lokr_w2_b"] = tensors["lokr_w2_b"].reshape(tensors["lokr_w2_b"].shape[0], -1)
        r = rank if rank is not None else 1
        adapter = cls(
            spec,
            r,
            float(alpha) if alpha is not None else float(r),
            w1_shape=w1_shape,
            decompose_w1=decompose_w1,
            decompose_w2=decompose_w2,
            use_tucker="lokr_t2" in tensors,
            init_weights=False,
        )
        if "lokr_t2" in tensors and not adapter.is_cp:
            raise AdapterStateError("lokr_t2 (CP core) given for a layer without a spatial kernel")
        adapter.load_state_tensors(tensors)
        return adapter

    from_tensors = from_file_tensors  # the name before the registry; kept for callers

    def reset_parameters(self, init_weights: bool = True) -> None:
        """LyCORIS' init: He-uniform everywhere, the w2 half zero (`lokr_w2` or `lokr_w2_b`) unless
        `init_weights=False`."""
        for name, tensor in self.state_tensors().items():
            if init_weights and name in ("lokr_w2", "lokr_w2_b"):
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        """`alpha / r · scale` when a half is factorized, else `scale` (see the class docstring)."""
        if self.decompose_w1 or self.decompose_w2:
            return self.alpha / self.r * self.scale
        return self.scale

    def state_tensors(self) -> dict[str, torch.Tensor]:
        names = ["lokr_w1_a", "lokr_w1_b"] if self.decompose_w1 else ["lokr_w1"]
        if not self.decompose_w2:
            names.append("lokr_w2")
        else:
            names += ["lokr_w2_a", "lokr_w2_b"] + (["lokr_t2"] if self.is_cp else [])
        return {n: getattr(self, n) for n in names}

    def delta_weight(self) -> torch.Tensor:
        w2 = lokr_fn.rebuild_w2(
            getattr(self, "lokr_w2", None),
            getattr(self, "lokr_w2_a", None),
            getattr(self, "lokr_w2_b", None),
            getattr(self, "lokr_t2", None),
        )
        if w2.dim() == 2 and self.spec.is_conv:
            # (b, d·k) from the flat factorized form: give it the kernel dims so kron lines up per position.
            w2 = w2.reshape(w2.shape[0], -1, *self.spec.kernel_size)
        w1 = lokr_fn.rebuild_w1(
            getattr(self, "lokr_w1", None), getattr(self, "lokr_w1_a", None), getattr(self, "lokr_w1_b", None)
        )
        return lokr_fn.kron_delta(w1, w2, self.spec.weight_shape, self.scaling)

    def extra_repr(self) -> str:
        form = f"w1={'a@b' if self.decompose_w1 else 'full'}, w2={'cp' if self.is_cp else 'a@b' if self.decompose_w2 else 'full'}"
        return f"{super().extra_repr()}, w1_shape={self.w1_shape}, {form}"
