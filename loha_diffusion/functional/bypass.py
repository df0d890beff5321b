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


class LinearWithBypass(torch.autograd.Function):
    """`F.linear(x, weight, bias) + (x downᵀ) upᵀ` with the bypass accumulated into the base matmul's output
    (`addmm_`) and, in backward, into the base's input gradient. `x (..., in)`; all operands one dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up):
        flat = x.reshape(-1, x.shape[-1])
        hidden = flat @ down.t()
        out = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        out.addmm_(hidden, up.t())
        ctx.save_for_backward(x, weight, down, up, hidden)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight, down, up, hidden = ctx.saved_tensors
        need_x, need_weight, need_bias, need_down, need_up = ctx.needs_input_grad
        flat = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        g_hidden = g @ up
        grad_x = None
        if need_x:
            grad_x = (g @ weight).addmm_(g_hidden, down).view(x.shape)
        grad_weight = g.t() @ flat if need_weight else None
        grad_bias = g.sum(0) if need_bias else None
        grad_down = g_hidden.t() @ flat if need_down else None
        grad_up = g.t() @ hidden if need_up else None
        return grad_x, grad_weight, grad_bias, grad_down, grad_up


class ConvWithBypass(torch.autograd.Function):
    """`conv(x, weight, bias) + up ∘ [core ∘] down (x)` at `geometry` (groups 1, integer padding), the 1×1 `up`
    accumulated into the base conv's output and, for CP, the 1×1 `down`'s input gradient into the base conv's.
    `x (N, in, *spatial)`; all operands one dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, core, up, geometry):
        out = geometry.conv(x, weight, bias)
        inner = None if core is None else pointwise(x, down)
        hidden = geometry.conv(x, down) if core is None else geometry.conv(inner, core)
        _accumulate_pointwise_(out, up, hidden)
        ctx.geometry = geometry
        ctx.save_for_backward(x, weight, down, core, up, inner, hidden)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, down, core, up, inner, hidden = ctx.saved_tensors
        need_x, need_weight, need_bias, need_down, need_core, need_up, _ = ctx.needs_input_grad
        geometry = ctx.geometry
        grad = grad.contiguous()
        g_hidden = pointwise(grad, up.t())
        grad_x, grad_weight = geometry.backward(grad, x, weight, need_x, need_weight)
        grad_bias = grad.sum(dim=[0, *range(2, grad.dim())]) if need_bias else None
        grad_up = _channel_outer(grad, hidden) if need_up else None
        grad_core = None
        if core is None:
            grad_x_low, grad_down = geometry.backward(g_hidden, x, down, need_x, need_down)
            if need_x:
                grad_x = grad_x.add_(grad_x_low)
        else:
            g_inner, grad_core = geometry.backward(g_hidden, inner, core, need_x or need_down, need_core)
            grad_down = _channel_outer(g_inner, x) if need_down else None
            if need_x:
                grad_x = _accumulate_pointwise_(grad_x, down.t(), g_inner)
        return grad_x, grad_weight, grad_bias, grad_down, grad_core, grad_up, None


def base_plus_bypass(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    core: torch.Tensor | None,
    up: torch.Tensor,
    geometry: ConvGeometry | None = None,
) -> torch.Tensor:
    """`op(x, weight, bias) + Δ(x)` in one fused autograd node (`LinearWithBypass`; `ConvWithBypass` when
    `geometry` is given, which must have integer padding). Equal to `op(x, weight, bias) + bypass_delta(...)` up
    to float rounding (the sums run in another order); gradients for every operand that requires them (`weight`
    too, e.g. a base weight with merged adapters added). All operands one dtype, on one device; output shaped
    like the base op's."""
    if geometry is None:
        return LinearWithBypass.apply(x, weight, bias, down, up)
    return ConvWithBypass.apply(x, weight, bias, down, core, up, geometry)
