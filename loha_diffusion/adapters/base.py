"""The adapter contract shared by LoHa, LoRA and LoKr, and `LayerSpec`, the geometry of the wrapped layer.

An adapter kind declares itself on its class (the LyCORIS `weight_list` / `algo_check` /
`make_module_from_state_dict` pattern): its tensors under Kohya/LyCORIS file names, how to recognise a file
module of its kind, how to build itself from one, its rank and scaling there. The registry in
`adapters/__init__.py` (`ADAPTER_KINDS`, `adapter_class`, `detect_kind`) and the file formats read only these
declarations, so adding a kind touches `functional/<kind>.py`, `adapters/<kind>.py` and one registry line.
The file layouts are those of docs/kohya-format.md (sections 3-5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterStateError
from ..functional.bypass import GIVEN_FACTORS, ConvGeometry, FactorBuilder, bypass_delta


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type` ("cpu", "cuda", ...), or None when autocast is off there
    or the device has no autocast (`meta`, where `torch.is_autocast_enabled` raises). `torch.compile` traces it."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


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
    def geometry(self) -> ConvGeometry | None:
        """The conv's stride, padding and dilation for the bypass ops (`functional.bypass`); None for a Linear.
        The padding may be a string ("same"/"valid") here; the fused form needs integers."""
        if not self.is_conv:
            return None
        return ConvGeometry(self.stride, self.padding, self.dilation)

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
    `bypass` and `bypass_is_cheaper`.

    Words: `scale` is the user multiplier (1.0 by default), `scaling` = alpha / r × scale is what ΔW is
    multiplied by. A kind also declares its Kohya/LyCORIS file form through the class attributes below and the
    `file_*` class methods; the registry (`adapters.ADAPTER_KINDS`) and `formats/` use nothing else.
    """

    # -- what a kind declares ------------------------------------------------------------------------
    #: "loha", "lora", "lokr": `AdapterConfig.kind`, `KohyaModule.kind`, the key of `adapters.adapter_class`.
    kind: ClassVar[str] = ""
    #: The name people use ("LoHa"), for messages.
    title: ClassVar[str] = ""
    #: Own tensor name (`state_tensors` keys) -> its Kohya/LyCORIS file name, for every tensor the kind can have.
    kohya_names: ClassVar[Mapping[str, str]] = {}
    #: Kohya names every file module of this kind has, and those it may have (CP/Tucker cores, LoKr halves).
    file_tensors: ClassVar[tuple[str, ...]] = ()
    optional_file_tensors: ClassVar[tuple[str, ...]] = ()
    #: A file module holding any of these is of this kind (the test ComfyUI, A1111 and LyCORIS make).
    detect_tensors: ClassVar[tuple[str, ...]] = ()
    #: A file module holding any of these is in the CP/Tucker form.
    cp_file_tensors: ClassVar[tuple[str, ...]] = ()
    #: Files of this kind routinely omit `alpha` (LoKr with full halves); loading them warns about nothing.
    file_alpha_optional: ClassVar[bool] = False
    #: LyCORIS' `algo` network argument for this kind (`ss_network_args` of the metadata).
    lycoris_algo: ClassVar[str] = ""
    #: sd-scripts' own `--network_module` when it trains the flat form of this kind (`networks.lora`), else None.
    kohya_network_module: ClassVar[str | None] = None

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

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy `tensors` (the names of `state_tensors`, any dtype and device) into the factors, converted to
        the factors' dtype and device.

        Raises:
            AdapterStateError: missing, extra or misshaped tensors (a `ValueError`); the message names them.
        """
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
            raise AdapterStateError(f"Cannot load {self.kind} tensors: " + ", ".join(parts) + ".")
        with torch.no_grad():
            for k, target in own.items():
                target.copy_(tensors[k].to(device=target.device, dtype=target.dtype))

    def bypass_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether `bypass(x)` costs less than running the base op with a merged weight."""
        return False

    def bypass_factors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`(down, core, up)` of the low-rank form `Δ(x) = scaling · up ∘ [core ∘] down (x)`, without the
        scaling, in the factors' dtype and on their device, with autograd to the factors. Layouts as in
        `functional.bypass` (`down (R, in)` / `(R, in, *kernel)`, `core (R, R, *kernel)` or None, `up (out, R)`).
        Only kinds with a low-rank form implement it (LoHa: the Khatri-Rao factors, R = r²; LoRA: R = r).

        Raises:
            NotImplementedError: the kind has no low-rank form (LoKr).
        """
        raise NotImplementedError(f"{self.kind} adapters have no bypass form")

    def bypass_sources(self) -> tuple[FactorBuilder, tuple[torch.Tensor, ...]]:
        """`(builder, sources)` with `builder.build(*sources) == bypass_factors()`: what the fused node
        (`functional.bypass.base_plus_bypass`) keeps for backward and rebuilds the factors from. By default the
        factors themselves (`GIVEN_FACTORS`); kinds whose factors are products of their tensors (LoHa's
        Khatri-Rao factors) give their tensors and a builder, so the products are not kept alive.

        Raises:
            NotImplementedError: the kind has no low-rank form (LoKr).
        """
        down, core, up = self.bypass_factors()
        return GIVEN_FACTORS, (down, up) if core is None else (down, core, up)

    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """Δ(x) computed without building ΔW (`functional.bypass.bypass_delta`), in `x`'s dtype (under autocast
        the factors' dtype, which autocast then casts), shaped like the base layer's output.

        Raises:
            NotImplementedError: the kind has no low-rank form (LoKr).
        """
        down, core, up = self.bypass_factors()
        dtype = x.dtype if autocast_dtype(x.device.type) is None else up.dtype
        return bypass_delta(
            x,
            down.to(dtype),
            None if core is None else core.to(dtype),
            (up * self.scaling).to(dtype),
            self.spec.geometry,
        )

    def has_bypass(self) -> bool:
        """Whether `bypass` is exact on this layer: the kind has a low-rank form (`bypass_factors`) and the layer
        is ungrouped with zero padding (the low-rank convs are ungrouped)."""
        return (
            type(self).bypass_factors is not Adapter.bypass_factors
            and self.spec.groups == 1
            and self.spec.zero_padding
        )

    def rank_dropout_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """PEFT's rank dropout: keep each output row with probability 1-p, rescale by 1/kept-fraction;
        shape `(out_features,)`, `dtype`, on `device`.

        Drawn on `device` from that device's default generator, so nothing crosses to or from the host (no
        copy, no `.item()`); `torch.manual_seed`, which the training loop calls before every micro-step, seeds
        the CPU and every CUDA generator, so a resumed run draws the same masks. The all-rows-dropped case
        (PEFT divides by zero there) gives an all-zero mask without a branch: the kept fraction is clamped to
        the smallest normal number, and 0 / tiny = 0.
        """
        keep = (torch.rand(self.spec.out_features, device=device) > self.rank_dropout).to(dtype)
        return keep / keep.mean().clamp(min=torch.finfo(dtype).tiny)

    def module_dropout_keep(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """PEFT's module dropout as a 0-d 0/1 tensor on `device`: 1 (run the adapter) with probability 1-p.

        PEFT and LyCORIS skip the adapter in Python (`if torch.rand(1) > p`), a host sync per layer and call
        and a data-dependent branch that breaks `torch.compile` graphs; multiplying the adapter's contribution
        by this scalar gives the same output (a dropped adapter adds exactly zero) without either. Differences:
        the dropped adapter is still computed, and its factors get a zero gradient rather than none (an
        optimizer then steps them with a zero gradient, as it does in PEFT whenever another call of the step
        kept the adapter). Drawn from `device`'s default generator, as `rank_dropout_mask`.
        """
        return (torch.rand((), device=device) > self.module_dropout).to(dtype)

    def dropout_scale(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The factor the adapter's output rows are multiplied by in one training call: the rank-dropout mask
        `(out_features,)` times the module-dropout 0/1 scalar (a 0-d tensor with module dropout only), or None
        when neither dropout is set. Draws the module scalar first, then the rank mask."""
        scale = None
        if self.module_dropout > 0:
            scale = self.module_dropout_keep(device, dtype)
        if self.rank_dropout > 0:
            mask = self.rank_dropout_mask(device, dtype)
            scale = mask if scale is None else mask * scale
        return scale

    # -- the Kohya/LyCORIS file form of the kind (docs/kohya-format.md, sections 3-5) -----------------

    @classmethod
    def detects(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether a file module with these tensors (Kohya names, no `alpha`) is of this kind."""
        return any(name in tensors for name in cls.detect_tensors)

    @classmethod
    def file_problems(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """What makes a file module of this kind unusable: missing or unknown tensors, and the kind's own rules
        (subclasses add to this list). Empty when the module can be built (shapes against a layer are checked
        by `from_file_tensors`)."""
        problems = []
        missing = [k for k in cls.file_tensors if k not in tensors]
        extra = sorted(set(tensors) - set(cls.file_tensors) - set(cls.optional_file_tensors))
        if missing:
            problems.append(f"{cls.kind} module is missing {missing}")
        if extra:
            problems.append(f"unsupported tensors {extra} in a {cls.kind} module")
        return problems

    @classmethod
    def file_rank(cls, tensors: Mapping[str, torch.Tensor]) -> int | None:
        """The rank loaders divide alpha by, read from the file tensors; None when it cannot be read."""
        raise NotImplementedError

    @classmethod
    def file_is_cp(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether the file module is in the CP/Tucker form (`hada_t1`, `lora_mid.weight`, `lokr_t2`)."""
        return any(name in tensors for name in cls.cp_file_tensors)

    @classmethod
    def file_scaling(cls, alpha: float | None, tensors: Mapping[str, torch.Tensor]) -> float:
        """The factor ComfyUI and A1111 multiply the rebuilt product by (user multiplier 1): `alpha / rank`,
        and 1.0 when the file has no alpha (not `1 / rank`; docs/kohya-format.md section 3) or no rank."""
        rank = cls.file_rank(tensors)
        if alpha is None or not rank:
            return 1.0
        return alpha / rank

    @classmethod
    def file_delta_weight(
        cls,
        tensors: Mapping[str, torch.Tensor],
        weight_shape: tuple[int, ...] | torch.Size,
        scaling: float,
    ) -> torch.Tensor:
        """ΔW rebuilt from file tensors (Kohya names) as the loaders do, times `scaling`, shaped
        `weight_shape`, in the tensors' dtype and on their device."""
        raise NotImplementedError

    @classmethod
    def from_file_tensors(
        cls, spec: LayerSpec, tensors: Mapping[str, torch.Tensor], alpha: float | None
    ) -> Adapter:
        """An adapter of this kind for a layer of geometry `spec` holding the file module `tensors` (Kohya
        names, any dtype), with the file's `alpha` (None: scaling 1 as in ComfyUI and A1111, i.e. alpha = rank).

        Factors are fp32 on the CPU (the constructor's), loaded from `tensors`. This default serves kinds whose
        constructor takes `(spec, r, alpha, use_effective_conv2d=...)`; other kinds override it.

        Raises:
            AdapterStateError: (a `ValueError`) the module is unusable (`file_problems`), has CP/Tucker tensors
                for a layer without a spatial kernel > 1, or its shapes do not fit `spec`; the message names them.
        """
        problems = cls.file_problems(tensors)
        if problems:
            raise AdapterStateError("; ".join(problems))
        rank = cls.file_rank(tensors)
        is_cp = cls.file_is_cp(tensors)
        alpha = alpha if alpha is not None else float(rank)
        adapter = cls(spec, rank, alpha, use_effective_conv2d=is_cp, init_weights=False)
        if is_cp and not getattr(adapter, "is_cp", False):
            raise AdapterStateError(
                f"CP/Tucker tensors given for a {spec.op} layer without a spatial kernel > 1"
            )
        adapter.load_state_tensors(adapter._own_tensors(tensors))
        return adapter

    def _own_tensors(self, file_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """File tensors under this adapter's own names (the inverse of `kohya_names`)."""
        own = {file: ours for ours, file in self.kohya_names.items()}
        return {own.get(name, name): tensor for name, tensor in file_tensors.items()}

    def file_state_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's factors under their Kohya/LyCORIS file names (LoRA: `lora_down.weight`, ...),
        detached, in the factors' dtype and on their device (no `alpha`)."""
        return {self.kohya_names[name]: t.detach() for name, t in self.state_tensors().items()}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale}"
