"""LoHa math without module state: delta rebuilds, their memory-lean autograd functions, and the
Khatri-Rao "bypass" factors that turn the Hadamard product of two rank-r products into one rank-r² product.

Layouts (PEFT / LyCORIS / Kohya): flat `w*_a (out, r)`, `w*_b (r, in·k)`; CP (effective conv2d)
`w*_a (r, out)`, `w*_b (r, in)`, `t* (r, r, *kernel)`.
"""

from __future__ import annotations

import torch

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
    products in backward, so no out×in tensor stays alive between forward and backward."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scaling: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scaling = scaling
        return (w1a @ w1b) * (w2a @ w2b) * scaling

    @staticmethod
    def backward(ctx, grad_out):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad_out * ctx.scaling
        grad_1 = grad * (w2a @ w2b)
        grad_w1a, grad_w1b = grad_1 @ w1b.T, w1a.T @ grad_1
        del grad_1
        grad_2 = grad * (w1a @ w1b)
        grad_w2a, grad_w2b = grad_2 @ w2b.T, w2a.T @ grad_2
        return grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


class HadaWeightCP(torch.autograd.Function):
    """CP/Tucker LoHa delta `scaling · M(t1, w1a, w1b) ⊙ M(t2, w2a, w2b)` saving only the factors.

    Backward recomputes each half under autograd and differentiates that recompute, so every factor's
    gradient is the exact one (PEFT's hand-written `HadaWeightCP` backward swaps the w1a/w2a chains).
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
        with torch.enable_grad():
            half_1 = [f.detach().requires_grad_() for f in (t1, w1a, w1b)]
            half_2 = [f.detach().requires_grad_() for f in (t2, w2a, w2b)]
            m1 = rebuild_cp(*half_1)
            m2 = rebuild_cp(*half_2)
            grads_1 = torch.autograd.grad(m1, half_1, grad * m2.detach())
            grads_2 = torch.autograd.grad(m2, half_2, grad * m1.detach())
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
