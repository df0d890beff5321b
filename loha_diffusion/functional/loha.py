"""LoHa math without module state: delta rebuilds, their memory-lean autograd functions, and the
Khatri-Rao "bypass" factors that turn the Hadamard product of two rank-r products into one rank-r² product.

Layouts (PEFT / LyCORIS / Kohya): flat `w*_a (out, r)`, `w*_b (r, in·k)`; CP (effective conv2d)
`w*_a (r, out)`, `w*_b (r, in)`, `t* (r, r, *kernel)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bypass import FactorBuilder

# FedPara Proposition 3: M[p, q, *k] = Σ_ij t[i, j, *k] · w_b[j, q] · w_a[i, p]
_CP_EQUATION = "ij...,jq,ip->pq..."


def rebuild_cp(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """One Tucker half `(out, in, *kernel)` from its core `t (r, r, *kernel)`, `w_a (r, out)`, `w_b (r, in)`."""
    return torch.einsum(_CP_EQUATION, t, w_b, w_a)


def delta_weight_reference(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """The plain formula with ordinary autograd: flat `(out, in·k)` or CP `(out, in, *kernel)`."""
    if t1 is None:
        return (w1a @ w1b) * (w2a @ w2b) * scaling
    return rebuild_cp(t1, w1a, w1b) * rebuild_cp(t2, w2a, w2b) * scaling


class HadaWeight(torch.autograd.Function):
    """`scaling · (w1a @ w1b) ⊙ (w2a @ w2b)` that saves only the factors and recomputes the two out×in
    products in backward, so no out×in tensor stays alive between forward and backward.

    The scaling is folded into the rank-r factor before each product (`(s·w1a) @ w1b`, an out×r multiply
    instead of an out×in one) and the Hadamard products are taken in place, so forward writes two out×in
    tensors and backward three (the plain formula writes four and five): the rebuild is memory-bound, and
    at r=32 these passes are a large part of the merged form's cost (docs/cost-model.md).
    """

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scaling: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scaling = scaling
        return ((w1a * scaling) @ w1b).mul_(w2a @ w2b)

    @staticmethod
    def backward(ctx, grad_out):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        s = ctx.scaling
        # d/d(half 1) = grad · s · (w2a @ w2b), and symmetrically for half 2.
        grad_1 = ((w2a * s) @ w2b).mul_(grad_out)
        grad_w1a, grad_w1b = grad_1 @ w1b.T, w1a.T @ grad_1
        del grad_1
        grad_2 = ((w1a * s) @ w1b).mul_(grad_out)
        grad_w2a, grad_w2b = grad_2 @ w2b.T, w2a.T @ grad_2
        return grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


def rebuild_cp_grads(
    grad: torch.Tensor, t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `sum(grad * rebuild_cp(t, w_a, w_b))` w.r.t. `t`, `w_a`, `w_b` (shapes as theirs) for
    `grad (out, in, *kernel)`.

    From `M[p,q,k] = Σ_ij t[i,j,k] w_b[j,q] w_a[i,p]`: with `H[p,j,k] = Σ_q grad[p,q,k] w_b[j,q]` and
    `E[i,q,k] = Σ_p w_a[i,p] grad[p,q,k]` (the two out×in·k×r contractions, done once each),
    `dw_a[i,p] = Σ_jk H[p,j,k] t[i,j,k]`, `dt[i,j,k] = Σ_p w_a[i,p] H[p,j,k]`, `dw_b[j,q] = Σ_ik t[i,j,k] E[i,q,k]`
    (r×r-sized contractions).
    """
    h = torch.einsum("pq...,jq->pj...", grad, w_b)
    e = torch.einsum("ip,pq...->iq...", w_a, grad)
    grad_w_a = torch.einsum("pj...,ij...->ip", h, t)
    grad_t = torch.einsum("ip,pj...->ij...", w_a, h)
    grad_w_b = torch.einsum("ij...,iq...->jq", t, e)
    return grad_t, grad_w_a, grad_w_b


class HadaWeightCP(torch.autograd.Function):
    """CP/Tucker LoHa delta `scaling · M(t1, w1a, w1b) ⊙ M(t2, w2a, w2b)` saving only the factors.

    Backward recomputes both halves and applies the explicit gradients of `rebuild_cp` (`rebuild_cp_grads`),
    so every factor's gradient is the exact one (PEFT's hand-written `HadaWeightCP` backward swaps the
    w1a/w2a chains) and `torch.compile` traces it: no `torch.autograd.grad` inside backward, which made
    dynamo break the graph at every CP conv.
    """

    @staticmethod
    def forward(ctx, t1, w1a, w1b, t2, w2a, w2b, scaling: float):
        ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b)
        ctx.scaling = scaling
        return rebuild_cp(t1, w1a, w1b) * rebuild_cp(t2, w2a, w2b) * scaling

    @staticmethod
    def backward(ctx, grad_out):
        t1, w1a, w1b, t2, w2a, w2b = ctx.saved_tensors
        grad = grad_out * ctx.scaling
        grads_1 = rebuild_cp_grads(grad * rebuild_cp(t2, w2a, w2b), t1, w1a, w1b)
        grads_2 = rebuild_cp_grads(grad * rebuild_cp(t1, w1a, w1b), t2, w2a, w2b)
        return (*grads_1, *grads_2, None)


def delta_weight(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """LoHa ΔW through the memory-lean autograd functions (flat `(out, in·k)` or CP `(out, in, *kernel)`)."""
    if t1 is None:
        return HadaWeight.apply(w1a, w1b, w2a, w2b, scaling)
    return HadaWeightCP.apply(t1, w1a, w1b, t2, w2a, w2b, scaling)


def khatri_rao_rows(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri-Rao product: `(n, r1), (n, r2) -> (n, r1·r2)` with `out[n, i·r2 + j] = a1[n,i]·a2[n,j]`."""
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)


def bypass_factors(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Factors `P (out, r²)`, `Q (r², in·k or in)` and, for CP, a core `T (r², r², *kernel)` with
    `(w1a@w1b) ⊙ (w2a@w2b) = P @ Q` (flat) or `ΔW[o,i,*k] = Σ P[o,m] T[m,n,*k] Q[n,i]` (CP)."""
    if t1 is None:
        return khatri_rao_rows(w1a, w2a), khatri_rao_rows(w1b.T, w2b.T).T, None
    p = khatri_rao_rows(w1a.T, w2a.T)
    q = khatri_rao_rows(w1b.T, w2b.T).T
    r1, r2 = t1.shape[0], t2.shape[0]
    kernel = t1.shape[2:]
    # T[(a,c), (b,d), *k] = t1[a, b, *k] · t2[c, d, *k]
    core = t1[:, None, :, None] * t2[None, :, None, :]
    return p, q, core.reshape(r1 * r2, r1 * r2, *kernel)


@dataclass(frozen=True)
class KhatriRaoFactors(FactorBuilder):
    """LoHa's bypass factors from its own tensors, for the fused node (`functional.bypass`): sources
    `(w1a, w1b, w2a, w2b)` (flat) or `(w1a, w1b, w2a, w2b, t1, t2)` (CP), in PEFT's layouts (module docstring).

    `down = Q (r², in·k)` with `Q[i·r + j, n] = w1b[i, n]·w2b[j, n]` (reshaped `(r², in, *kernel)` for a flat
    conv; `kernel` is the conv's kernel size, empty for a Linear), `up = P (out, r²)` with `P[o, i·r + j] = w1a[o, i]·w2a[o, j]` (CP: `w1a[i, o]·w2a[j, o]`), and the
    CP core `T[(a, c), (b, d), *k] = t1[a, b, *k]·t2[c, d, *k]` shaped `(r², r², *kernel)` (PEFT's Conv1d cores
    are `(r, r, k, 1)`), so `(w1a@w1b) ⊙ (w2a@w2b) = P@Q`. Built in the
    layouts the matmuls read (`Q` row-major over the inputs). `backward` is the products' exact gradient."""

    kernel: tuple[int, ...] = ()

    def build(self, w1a, w1b, w2a, w2b, t1=None, t2=None):
        r = w1b.shape[0]
        q = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, w1b.shape[1])
        if t1 is None:
            p = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r * r)
            if self.kernel:
                q = q.reshape(r * r, -1, *self.kernel)
            return q, None, p
        p = (w1a[:, None, :] * w2a[None, :, :]).reshape(r * r, w1a.shape[1]).t()
        core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(
            r * r, r * r, *(self.kernel or t1.shape[2:])
        )
        return q, core, p

    def backward(self, sources, grad_down, grad_core, grad_up):
        w1a, w1b, w2a, w2b, *cores = sources
        r = w1b.shape[0]
        grad_q = grad_down.reshape(r, r, w1b.shape[1])
        grad_w1b, grad_w2b = (grad_q * w2b[None]).sum(1), (grad_q * w1b[:, None]).sum(0)
        if not cores:
            grad_p = grad_up.reshape(w1a.shape[0], r, r)
            grad_w1a, grad_w2a = (grad_p * w2a[:, None, :]).sum(2), (grad_p * w1a[:, :, None]).sum(1)
            return grad_w1a, grad_w1b, grad_w2a, grad_w2b
        grad_p = grad_up.t().reshape(r, r, w1a.shape[1])
        grad_w1a, grad_w2a = (grad_p * w2a[None]).sum(1), (grad_p * w1a[:, None]).sum(0)
        t1, t2 = cores
        kernel = t1.shape[2:]
        k = t1[0, 0].numel()
        # grad_core[(a, c), (b, d), k]: t1[a, b, k] meets t2[c, d, k]
        grad_t = grad_core.reshape(r, r, r, r, k)
        t1f, t2f = t1.reshape(r, r, k), t2.reshape(r, r, k)
        grad_t1 = (grad_t * t2f[None, :, None, :, :]).sum((1, 3)).reshape(r, r, *kernel)
        grad_t2 = (grad_t * t1f[:, None, :, None, :]).sum((0, 2)).reshape(r, r, *kernel)
        return grad_w1a, grad_w1b, grad_w2a, grad_w2b, grad_t1, grad_t2
