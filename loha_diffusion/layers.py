"""`AdapterLayer`: wraps one Linear/Conv1d/Conv2d (`base_layer`) and applies its named adapters."""

from __future__ import annotations

import re

import torch
from torch import nn

from .adapters.base import Adapter, LayerSpec, autocast_dtype
from .errors import AdapterNameError, AdapterNotFoundError, AdapterStateError
from .functional.bypass import base_plus_bypass

# Names an adapter may not have: the wrapper's own attributes.
RESERVED_ADAPTER_NAMES = ("base_layer", "adapters")
# Base weights (or autocast dtypes) that must not hold ΔW in forward: see `AdapterLayer.can_merge_in_forward`.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_adapter_name(name: str) -> None:
    """The one adapter-name rule, checked wherever a name enters (injection, loading, pipelines) before
    anything is wrapped.

    Adapters live in `nn.ModuleDict`s keyed by name, so a name must be letters, digits, `_` or `-`, and not an
    attribute of `nn.ModuleDict` (`half`, `to`, `train`, `keys`, `items`, ...), which the dict cannot hold.

    Raises:
        AdapterNameError: the name breaks the rule; the message suggests one that does not.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise AdapterNameError(
            f"Adapter name {name!r} is not allowed: use only letters, digits, '_' and '-' (e.g. 'style_v2')."
        )
    if hasattr(nn.ModuleDict(), name) or name in RESERVED_ADAPTER_NAMES:
        raise AdapterNameError(
            f"Adapter name {name!r} is not allowed: it is the name of a torch Module attribute "
            f"(like 'half', 'to', 'train' or 'keys'); pick another, e.g. {name + '_1'!r}."
        )


class AdapterLayer(nn.Module):
    """A frozen base layer plus named adapters, one class for Linear, Conv1d and Conv2d.

    Forward picks, per adapter and call, the cheaper exact form: the base op with a merged weight
    `op(x, W0 + ΔW)`, or `base(x) + bypass(x)` (a low-rank form that never builds ΔW). Merged adapters
    (`merge`) are baked into `base_layer.weight`; an exact copy of the original weight is kept so `unmerge`
    restores it bit for bit.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.spec = LayerSpec.from_module(base_layer)
        if not self.spec.zero_padding:
            raise TypeError(
                f"Adapters support convs with padding_mode='zeros' only, not {base_layer.padding_mode!r}; "
                "exclude this module."
            )
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.adapters_enabled = True
        self.merged_adapters: list[str] = []
        # Adapters that were merged when `set_enabled(False)` unmerged them; `set_enabled(True)` merges them again.
        self.merge_on_enable: list[str] = []
        self.register_buffer("original_weight", None, persistent=False)
        # Take the wrapped layer's mode: an adapter added to an eval-mode model must not apply dropout.
        self.train(base_layer.training)

    # Code that inspects the wrapped layer (`.weight.dtype`, `.in_features`, ...) keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- adapters ----------------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter: Adapter, active: bool = True) -> None:
        """Attach `adapter` under `name`, on the base weight's device (its dtype is kept: fp32 factors).

        Raises:
            AdapterNameError: the name breaks `check_adapter_name` or is already used on this layer.
            AdapterStateError: `adapter` was built for another op or weight shape.
        """
        check_adapter_name(name)
        if name in self.adapters:
            raise AdapterNameError(
                f"Adapter {name!r} already exists on this layer; delete it first or pick another name."
            )
        if adapter.spec.weight_shape != self.spec.weight_shape or adapter.spec.op != self.spec.op:
            raise AdapterStateError(
                f"Adapter {name!r} was built for a {adapter.spec.op} weight {adapter.spec.weight_shape}, "
                f"but this layer is a {self.spec.op} with weight {self.spec.weight_shape}."
            )
        self.adapters[name] = adapter.to(self.base_layer.weight.device).train(self.training)
        if active and name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`. If it is merged, the weight is rebuilt from the kept original with the other
        merged adapters only (unmerge, delete, re-merge: exactly the weight a merge of those would give)."""
        if name in self.merged_adapters:
            self._set_merged([n for n in self.merged_adapters if n != name])
        del self.adapters[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        if name in self.merge_on_enable:
            self.merge_on_enable.remove(name)

    def set_active(self, names: list[str]) -> None:
        """Run exactly `names` (adapters of this layer). A merged adapter left out is taken out of the weight
        and the merged ones that stay active are re-merged exactly (from the kept original), so the weight
        never holds an adapter that does not run (PEFT unmerges in `set_adapter`; diffusers' `set_adapters`
        after `fuse_lora` leaves the old weights, the bug this avoids).

        Raises:
            AdapterNotFoundError: a name is not an adapter of this layer (nothing is changed).
        """
        self._require(names)
        self.active_adapters = list(names)
        kept = [n for n in self.merged_adapters if n in names]
        if kept != self.merged_adapters:
            self._set_merged(kept)

    def set_enabled(self, enabled: bool) -> None:
        """Switch all adapters off (`False`: the base layer only) or on again. Switching off unmerges at once
        (the weight is the exact original from then on, not only from the next forward as in PEFT) and
        remembers what was merged; switching on merges those again, if still present and active."""
        if not enabled:
            self.merge_on_enable += [n for n in self.merged_adapters if n not in self.merge_on_enable]
            self._set_merged([])
            self.adapters_enabled = False
            return
        self.adapters_enabled = True
        again = [n for n in self.merge_on_enable if n in self.adapters and n in self.active_adapters]
        self.merge_on_enable = []
        if again:
            self._set_merged(again)

    def _require(self, names: list[str]) -> None:
        for name in names:
            if name not in self.adapters:
                raise AdapterNotFoundError(f"No adapter {name!r} on this layer; have {list(self.adapters)}.")

    # -- merge -------------------------------------------------------------------------------------

    def merge(self, names: list[str] | None = None) -> None:
        """Bake adapters `names` (default: the active ones) into the base weight, with those already merged.

        The weight is rebuilt from the kept original in fp32 and rounded once, so merging more adapters later
        never accumulates rounding, and the result depends only on which adapters are merged (they are summed
        in the order they were added), not on the order of the calls.

        Raises:
            AdapterNotFoundError: a name is not an adapter of this layer (nothing is merged).
            AdapterStateError: a name is not active, or the adapters are disabled: a merged adapter that does
                not run would still change the output (nothing is merged).
        """
        names = list(self.active_adapters if names is None else names)
        self._require(names)
        self.check_mergeable(names)
        self._set_merged(self.merged_adapters + names)

    def check_mergeable(self, names: list[str], where: str = "") -> None:
        """Check that adapters `names` of this layer can be merged: a merged adapter always runs, so it must
        be active and the adapters enabled. `where` (e.g. " at down_blocks.0...to_q") goes into the message.

        Raises:
            AdapterStateError: the adapters are disabled, or a name is not active (the message says what to
                call first).
        """
        if names and not self.adapters_enabled:
            raise AdapterStateError(
                f"Cannot merge {names}{where}: the adapters are disabled; enable them first (enable_adapters)."
            )
        inactive = [n for n in names if n not in self.active_adapters]
        if inactive:
            raise AdapterStateError(
                f"Cannot merge {inactive}: not active{where} (active: {self.active_adapters}); a merged adapter "
                "always runs. Make it active first (set_active_adapters)."
            )

    def unmerge(self) -> None:
        """Restore the original base weight exactly (and forget what `set_enabled(True)` would merge again)."""
        self._set_merged([])
        self.merge_on_enable = []

    @torch.no_grad()
    def _set_merged(self, names: list[str]) -> None:
        """Make the base weight W0 + sum of ΔW of `names` (summed in fp32 from the exact original, in the order
        the adapters were added, rounded once to the weight's dtype), or W0 itself for no names."""
        wanted = set(names)
        merged = [n for n in self.adapters if n in wanted]
        weight = self.base_layer.weight
        if not merged:
            if self.original_weight is not None:
                weight.copy_(self.original_weight)
            self.original_weight = None
            self.merged_adapters = []
            return
        if self.original_weight is None:
            self.original_weight = weight.detach().clone()
        total = self.original_weight.float()
        for name in merged:
            total = total + self.adapters[name].delta_weight().float().to(total.device)
        weight.copy_(total.to(weight.dtype))
        self.merged_adapters = merged

    # -- forward -----------------------------------------------------------------------------------

    def can_merge_in_forward(self, x: torch.Tensor) -> bool:
        """Whether forward may run `op(x, W0 + ΔW)`: only with a full-precision base op and no accelerate hook.

        Half precision (a bf16/fp16 base weight, or autocast to bf16/fp16 on `x`'s device, which casts the
        merged weight): `W0 + ΔW` rounds ΔW at W0's scale, so a small update is largely rounded away. The
        error of the adapter's effect `layer(x) - base(x)` against float64 (320×320 Linear on 2×64 tokens and
        3×3 Conv2d 320→320 on 2×320×16×16, LoHa r=8, |ΔW|/|W0| in Frobenius norm; measured as
        tests/test_half_precision.py does), merged / bypass / separate `base(x) + op(x, ΔW)`:

            bf16  1e-3: 1.73 / 0.79 / 0.79    1e-2: 0.28 / 0.17 / 0.17
            fp16  1e-3: 0.35 / 0.21 / 0.21    1e-2: 0.036 / 0.021 / 0.021   (Linear; Conv2d within 0.01)

        Bypass and separate sit at the floor set by rounding the half-precision output itself; merged is about
        twice that. So with half precision the bypass is used where the kind has one (it is also cheaper than
        the separate form), else the separate form.

        Offload: with an accelerate hook on the base layer (`_hf_hook`, e.g. sequential CPU offload) the weight
        may be on `meta` until the hook's `pre_forward` moves it, so `base_layer(x)` must run and the adapter's
        output is added separately (PEFT's layers also call `base_layer(x)` and add to it).
        """
        weight = self.base_layer.weight
        if getattr(self.base_layer, "_hf_hook", None) is not None or weight.dtype in HALF_DTYPES:
            return False
        return autocast_dtype(x.device.type) not in HALF_DTYPES

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output plus every running adapter's, each in the form chosen per call (merged,
        bypass or separate; `can_merge_in_forward` and the kinds' cost models), with PEFT's rank and module
        dropout in training mode (`Adapter.dropout_scale`: drawn on `x`'s device, no host sync)."""
        if not self.adapters_enabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        running = [self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters]
        if not running:
            return self.base_layer(x, *args, **kwargs)

        # accelerate's sequential offload (`cpu_offload`) hooks every module with parameters, the adapters too;
        # their factors are on `meta` until the hook's `pre_forward`, which only `adapter(...)` would run, and
        # forward calls their methods instead: run the hooks around the adapter math here.
        hooked = [a for a in running if getattr(a, "_hf_hook", None) is not None]
        for adapter in hooked:
            adapter._hf_hook.pre_forward(adapter)
        try:
            return self._adapted_forward(running, x, args, kwargs)
        finally:
            for adapter in hooked:
                adapter._hf_hook.post_forward(adapter, None)

    def _adapted_forward(
        self, running: list[Adapter], x: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        """`forward` with the `running` adapters' factors in place: ΔWs summed for the merged (or separate)
        form, bypasses added after, each scaled by its dropout draw. Where `fused_dtype` allows, the first bypass
        runs fused with the base op (`functional.bypass.base_plus_bypass`)."""
        can_merge = self.can_merge_in_forward(x)
        summed_delta = None
        bypassed = []
        for adapter in running:
            scale = adapter.dropout_scale(x.device, torch.float32) if self.training else None
            if adapter.has_bypass() and (not can_merge or adapter.bypass_is_cheaper(x)):
                bypassed.append((adapter, scale))
                continue
            delta = adapter.delta_weight()
            if scale is not None:
                delta = delta * scale.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
            summed_delta = delta if summed_delta is None else summed_delta + delta

        fused_dtype = self.fused_dtype(x, args, kwargs) if bypassed else None
        if fused_dtype is not None and (summed_delta is None or can_merge):
            out = self._base_plus_bypass(x, summed_delta, *bypassed.pop(0), fused_dtype)
        elif summed_delta is None:
            out = self.base_layer(x, *args, **kwargs)
        elif can_merge:
            weight = self.base_layer.weight
            out = self.spec.apply(x, weight + summed_delta.to(weight.dtype), self.base_layer.bias)
        else:
            out = self.base_layer(x, *args, **kwargs)
            out = out + self.spec.apply(x, summed_delta.to(x.dtype)).to(out.dtype)
        for adapter, scale in bypassed:
            delta_out = adapter.bypass(x)
            if scale is not None:
                shape = [1] * delta_out.dim()
                shape[self.spec.channel_dim] = -1
                delta_out = delta_out * scale.to(delta_out.dtype).view(shape)
            out = out + delta_out.to(out.dtype)
        return out

    def fused_dtype(
        self, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None
    ) -> torch.dtype | None:
        """The dtype the base op and a bypass can run in fused (`functional.bypass.base_plus_bypass`), or None
        when they must run apart: the base layer is a plain `nn.Linear`/`nn.Conv1d`/`nn.Conv2d` called with `x`
        alone, without hooks (an accelerate `_hf_hook`, forward or backward hooks must see `base_layer` run), with
        integer padding; the dtype is autocast's on `x`'s device (what the base op would compute in), else `x`'s,
        which must then be the base weight's (otherwise the base op itself would fail)."""
        base = self.base_layer
        if args or kwargs or type(base) not in (nn.Linear, nn.Conv1d, nn.Conv2d):
            return None
        hooks = (base._forward_hooks, base._forward_pre_hooks, base._backward_hooks, base._backward_pre_hooks)
        if getattr(base, "_hf_hook", None) is not None or any(hooks):
            return None
        if isinstance(self.spec.padding, str):
            return None
        dtype = autocast_dtype(x.device.type)
        if dtype is None and x.dtype != base.weight.dtype:
            return None
        return x.dtype if dtype is None else dtype

    def _base_plus_bypass(
        self,
        x: torch.Tensor,
        summed_delta: torch.Tensor | None,
        adapter: Adapter,
        scale: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The base op (its weight plus `summed_delta`, the merged adapters' ΔW, if any) and `adapter`'s bypass in
        one fused node, in `dtype`; the scaling and the dropout draw `scale` go into the `(out, R)` factor, and the
        node keeps the adapter's `bypass_sources` (not the factors built from them) for backward."""
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if summed_delta is not None:
            weight = weight + summed_delta.to(weight.dtype)
        builder, sources = adapter.bypass_sources()
        up_scale = adapter.scaling
        if scale is not None:
            up_scale = scale.to(sources[0].dtype).reshape(-1, 1) * adapter.scaling
        return base_plus_bypass(
            x.to(dtype),
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            up_scale,
            builder,
            sources,
            self.spec.geometry,
        )

    def extra_repr(self) -> str:
        return (
            f"active={self.active_adapters}, merged={self.merged_adapters}, enabled={self.adapters_enabled}"
        )
