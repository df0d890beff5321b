"""The low-rank bypass `Δ(x) = up ∘ [core ∘] down (x)` shared by LoHa (its Khatri-Rao factors, rank r²) and LoRA
(rank r), alone (`bypass_delta`) or fused with the frozen base op (`base_plus_bypass`).

Factor layouts, `R` = the bypass rank:
- `down`: Linear `(R, in)`; flat conv `(R, in, *kernel)` (a k×k conv with the layer's stride, padding and
  dilation); CP/Tucker conv `(R, in)` (a 1×1 conv);
- `core`: CP only, `(R, R, *kernel)` (the k×k conv), else None;
- `up`: `(out, R)` (a 1×1 conv for convs), with the scaling (and any dropout scale per output row) already in.

The fused form exists for speed. `base(x) + Δ(x)` as separate autograd ops writes the base output, the bypass
output and their sum (three activation-sized tensors; the same again for the input gradient), while the fused form
accumulates the bypass into the base op's own output with `addmm_`/`baddbmm_` (β = 1) and the bypass's input
gradient into the base op's. On the SD1.5 UNet at 256 px (CPU fp32, 1 thread) those extra passes over activations
were ~0.1-0.2 s of a 0.7 s adapter overhead (docs/cost-model.md). The backward is explicit (no `autograd.grad`
inside), so `torch.compile` traces it without graph breaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvGeometry:
    """The base conv's stride, padding and dilation (integers per spatial axis; groups must be 1)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`conv1d`/`conv2d` of `x` with `weight` at this geometry (the dimension from `weight`)."""
        op = F.conv2d if weight.dim() == 4 else F.conv1d
        return op(x, weight, bias, self.stride, self.padding, self.dilation)

    def backward(
        self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool, need_weight: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(∂x, ∂weight)` of `conv(x, weight)` for output gradient `grad` (each None unless asked for)."""
        if not (need_input or need_weight):
            return None, None
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0] * len(self.stride),
            1,
            [need_input, need_weight, False],
        )
        return grad_x, grad_w


def pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv of `x (N, in, *spatial)` with a matrix `weight (out, in)`: `(N, out, *spatial)`."""
    kernel = weight.reshape(*weight.shape, *((1,) * (x.dim() - 2)))
    return F.conv2d(x, kernel) if x.dim() == 4 else F.conv1d(x, kernel)


def bypass_delta(
    x: torch.Tensor,
    down: torch.Tensor,
    core: torch.Tensor | None,
    up: torch.Tensor,
    geometry: ConvGeometry | None = None,
) -> torch.Tensor:
    """`Δ(x)` alone, with ordinary autograd ops: `(x downᵀ) upᵀ` for a Linear (`x (..., in)`); for a conv
    (`x (N, in, *spatial)`, `geometry` given) the k×k `down` conv, or the 1×1 `down` then the k×k `core`, then the
    1×1 `up`. Shaped like the base op's output, in the operands' dtype (they must share one), on their device."""
    if geometry is None:
        return F.linear(F.linear(x, down), up)
    hidden = geometry.conv(x, down) if core is None else geometry.conv(pointwise(x, down), core)
    return pointwise(hidden, up)


def _channel_outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`Σ_n a[n] b[n]ᵀ` over the batch, the channels of `a (N, A, *spatial)` against `b (N, B, *spatial)`:
    `(A, B)` (a 1×1 conv's weight gradient)."""
    n = a.shape[0]
    a3, b3 = a.reshape(n, a.shape[1], -1), b.reshape(n, b.shape[1], -1)
    if n == 1:
        return a3[0] @ b3[0].t()
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


def _accumulate_pointwise_(out: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`out += pointwise(hidden, weight)` in place: one batched matmul with β = 1 into a contiguous `out`
    `(N, C, *spatial)`, else a separate 1×1 conv and add."""
    n = out.shape[0]
    if out.is_contiguous() and n > 0:
        out3, hidden3 = out.view(n, out.shape[1], -1), hidden.reshape(n, hidden.shape[1], -1)
        for i in range(n):
            out3[i].addmm_(weight, hidden3[i])
        return out
    return out.add_(pointwise(hidden, weight))


class FactorBuilder:
    """How a kind's bypass factors `(down, core, up)` come from its own tensors (the "sources", e.g. LoHa's
    `hada_w*`), forward (`build`, plain torch ops, so autograd can also run through it) and backward. The fused
    node keeps only the sources for backward and rebuilds the factors there: LoHa's Khatri-Rao factors are
    activation-independent but not free (on the SD1.5 UNet they would keep ~140 MiB alive per step, 0.14 of the
    0.25 GiB the adapters added at 256 px)."""

    def build(self, *sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`(down, core, up)` from the sources, in their dtype, on their device."""
        raise NotImplementedError

    def backward(
        self,
        sources: tuple[torch.Tensor, ...],
        grad_down: torch.Tensor | None,
        grad_core: torch.Tensor | None,
        grad_up: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        """The gradient of each source given the factors' gradients (None where a factor's is None)."""
        raise NotImplementedError


class GivenFactors(FactorBuilder):
    """The sources are the factors themselves: `(down, up)` or `(down, core, up)` (LoRA, and any kind that
    only declares `bypass_factors`)."""

    def build(self, *sources):
        return (sources[0], None, sources[1]) if len(sources) == 2 else tuple(sources)

    def backward(self, sources, grad_down, grad_core, grad_up):
        return (grad_down, grad_up) if len(sources) == 2 else (grad_down, grad_core, grad_up)


GIVEN_FACTORS = GivenFactors()


def _factors(builder: FactorBuilder, sources, up_scale, dtype: torch.dtype):
    """The factors for the fused node, `up` times `up_scale` (the scaling, with any dropout rows), in `dtype`."""
    down, core, up = builder.build(*sources)
    up = up * up_scale
    return down.to(dtype), None if core is None else core.to(dtype), up.to(dtype)


def _source_grads(ctx, sources, up_scale, grad_down, grad_core, grad_up, first: int) -> tuple:
    """The sources' gradients (None where not needed) from the factors' (in the compute dtype); `first` is the
    index of the first source among the node's inputs."""
    needs = ctx.needs_input_grad[first:]
    if not any(needs):
        return (None,) * len(sources)
    dtype = sources[0].dtype

    def cast(grad):
        return None if grad is None else grad.to(dtype)

    grads = ctx.builder.backward(sources, cast(grad_down), cast(grad_core), cast(grad_up) * up_scale)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _saved(ctx, up_scale, tensors: tuple, sources: tuple) -> None:
    """`save_for_backward` of `tensors`, then `up_scale` when it is a tensor (a dropout draw; else it is kept as a
    number), then `sources`."""
    ctx.scale_is_tensor = isinstance(up_scale, torch.Tensor)
    ctx.up_scale = None if ctx.scale_is_tensor else up_scale
    ctx.save_for_backward(*tensors, *((up_scale,) if ctx.scale_is_tensor else ()), *sources)


def _restored(ctx, count: int) -> tuple:
    """`(first count saved tensors, up_scale, the sources)` as `_saved` stored them."""
    saved = ctx.saved_tensors
    up_scale = saved[count] if ctx.scale_is_tensor else ctx.up_scale
    return saved[:count], up_scale, saved[count + int(ctx.scale_is_tensor) :]


class LinearWithBypass(torch.autograd.Function):
    """`F.linear(x, weight, bias) + (x downᵀ) upᵀ` with the bypass accumulated into the base matmul's output
    (`addmm_`) and, in backward, into the base's input gradient; `(down, _, up)` built by `builder` from
    `sources`, `up` times `up_scale`. `x (..., in)`, `weight`, `bias` one dtype (the compute dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, up_scale, builder, *sources):
        down, _, up = _factors(builder, sources, up_scale, x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        hidden = flat @ down.t()
        out = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        out.addmm_(hidden, up.t())
        ctx.builder = builder
        _saved(ctx, up_scale, (x, weight, hidden), sources)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (x, weight, hidden), up_scale, sources = _restored(ctx, 3)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_factors = any(ctx.needs_input_grad[5:])
        down, _, up = _factors(ctx.builder, sources, up_scale, grad.dtype)
        flat = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        g_hidden = g @ up
        grad_x = None
        if need_x:
            grad_x = (g @ weight).addmm_(g_hidden, down).view(x.shape)
        grad_weight = g.t() @ flat if need_weight else None
        grad_bias = g.sum(0) if need_bias else None
        grad_down = g_hidden.t() @ flat if need_factors else None
        grad_up = g.t() @ hidden if need_factors else None
        grads = _source_grads(ctx, sources, up_scale, grad_down, None, grad_up, 5)
        return grad_x, grad_weight, grad_bias, None, None, *grads


class ConvWithBypass(torch.autograd.Function):
    """`conv(x, weight, bias) + up ∘ [core ∘] down (x)` at `geometry` (groups 1, integer padding), the 1×1 `up`
    accumulated into the base conv's output and, for CP, the 1×1 `down`'s input gradient into the base conv's;
    factors from `builder` and `sources` as in `LinearWithBypass`. `x (N, in, *spatial)`."""

    @staticmethod
    def forward(ctx, x, weight, bias, up_scale, builder, geometry, *sources):
        down, core, up = _factors(builder, sources, up_scale, x.dtype)
        out = geometry.conv(x, weight, bias)
        inner = None if core is None else pointwise(x, down)
        hidden = geometry.conv(x, down) if core is None else geometry.conv(inner, core)
        _accumulate_pointwise_(out, up, hidden)
        ctx.builder, ctx.geometry = builder, geometry
        _saved(ctx, up_scale, (x, weight, inner, hidden), sources)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x, weight, inner, hidden), up_scale, sources = _restored(ctx, 4)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_factors = any(ctx.needs_input_grad[6:])
        geometry = ctx.geometry
        down, core, up = _factors(ctx.builder, sources, up_scale, grad.dtype)
        grad = grad.contiguous()
        g_hidden = pointwise(grad, up.t())
        grad_x, grad_weight = geometry.backward(grad, x, weight, need_x, need_weight)
        grad_bias = grad.sum(dim=[0, *range(2, grad.dim())]) if need_bias else None
        grad_up = _channel_outer(grad, hidden) if need_factors else None
        grad_core = None
        if core is None:
            grad_x_low, grad_down = geometry.backward(g_hidden, x, down, need_x, need_factors)
            if need_x:
                grad_x = grad_x.add_(grad_x_low)
        else:
            g_inner, grad_core = geometry.backward(
                g_hidden, inner, core, need_x or need_factors, need_factors
            )
            grad_down = _channel_outer(g_inner, x) if need_factors else None
            if need_x:
                grad_x = _accumulate_pointwise_(grad_x, down.t(), g_inner)
        grads = _source_grads(ctx, sources, up_scale, grad_down, grad_core, grad_up, 6)
        return grad_x, grad_weight, grad_bias, None, None, None, *grads


def base_plus_bypass(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    up_scale: float | torch.Tensor,
    builder: FactorBuilder,
    sources: tuple[torch.Tensor, ...],
    geometry: ConvGeometry | None = None,
) -> torch.Tensor:
    """`op(x, weight, bias) + Δ(x)` in one fused autograd node (`LinearWithBypass`; `ConvWithBypass` when
    `geometry` is given, which must have integer padding), `Δ` from `builder.build(*sources)` with `up` times
    `up_scale` (a number, or an `(out, 1)` tensor of per-row scales, not differentiated). Equal to
    `op(x, weight, bias) + bypass_delta(...)` up to float rounding (the sums run in another order); gradients for
    `x`, `weight`, `bias` and every source that requires them. `x`, `weight` and `bias` share the compute dtype;
    the sources may be in another (fp32 factors under autocast) and get their gradients in theirs. Output shaped
    like the base op's."""
    if geometry is None:
        return LinearWithBypass.apply(x, weight, bias, up_scale, builder, *sources)
    return ConvWithBypass.apply(x, weight, bias, up_scale, builder, geometry, *sources)
