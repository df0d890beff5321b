"""LoKr (Kronecker-product) math without module state, as LyCORIS, ComfyUI and A1111 rebuild it.

`ΔW = scaling · kron(w1, w2)` reshaped to the base weight, with `w1 (a, c)` and `w2 (b, d[, *kernel])`,
`out = a·b`, `in = c·d`. Each half is stored either full or factorized:

* `w1`: `lokr_w1 (a, c)` or `lokr_w1_a (a, r)` @ `lokr_w1_b (r, c)`
* `w2`: `lokr_w2 (b, d[, *kernel])`, or `lokr_w2_a (b, r)` @ `lokr_w2_b (r, d·k)` (also `(r, d, *kernel)`),
  or CP/Tucker `lokr_t2 (r, r, *kernel)` with `lokr_w2_a (r, b)`, `lokr_w2_b (r, d)` (rank first, as LoHa CP).
"""

from __future__ import annotations

import torch

# Same contraction as LoHa CP / ComfyUI's LoKr: M[p, q, *k] = Σ_ij t[i, j, *k] · w_b[j, q] · w_a[i, p]
_CP_EQUATION = "ij...,jq,ip->pq..."


def rebuild_w1(
    w1: torch.Tensor | None = None, w1_a: torch.Tensor | None = None, w1_b: torch.Tensor | None = None
) -> torch.Tensor:
    """The first Kronecker factor `(a, c)`: `w1` itself or `w1_a (a, r) @ w1_b (r, c)`.

    Raises:
        ValueError: neither `w1` nor both of `w1_a`, `w1_b` are given.
    """
    if w1 is not None:
        return w1
    if w1_a is None or w1_b is None:
        raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
    return w1_a @ w1_b


def rebuild_w2(
    w2: torch.Tensor | None = None,
    w2_a: torch.Tensor | None = None,
    w2_b: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """The second Kronecker factor: `w2`, the CP rebuild from `t2`, or `w2_a @ w2_b` (keeping `w2_b`'s
    trailing dims, so LyCORIS' `(r, d, *kernel)` form gives `(b, d, *kernel)`).

    Raises:
        ValueError: neither `w2` nor both of `w2_a`, `w2_b` are given.
    """
    if w2 is not None:
        return w2
    if w2_a is None or w2_b is None:
        raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
    if t2 is not None:
        return torch.einsum(_CP_EQUATION, t2, w2_b, w2_a)
    r, *rest = w2_b.shape
    return (w2_a @ w2_b.reshape(r, -1)).reshape(w2_a.shape[0], *rest)


def kron_delta(
    w1: torch.Tensor, w2: torch.Tensor, shape: tuple[int, ...] | torch.Size, scaling: float = 1.0
) -> torch.Tensor:
    """`scaling · kron(w1, w2)` reshaped to `shape`; `w1` gets trailing unit dims to match a conv `w2`."""
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    delta = torch.kron(w1, w2.contiguous())
    if scaling != 1.0:
        delta = delta * scaling
    return delta.reshape(shape)


def delta_weight(
    tensors: dict[str, torch.Tensor], shape: tuple[int, ...] | torch.Size, scaling: float = 1.0
) -> torch.Tensor:
    """ΔW of a LoKr module from its tensors by their file names (`lokr_w1`, `lokr_w2_a`, ...)."""
    w1 = rebuild_w1(tensors.get("lokr_w1"), tensors.get("lokr_w1_a"), tensors.get("lokr_w1_b"))
    w2 = rebuild_w2(
        tensors.get("lokr_w2"), tensors.get("lokr_w2_a"), tensors.get("lokr_w2_b"), tensors.get("lokr_t2")
    )
    return kron_delta(w1, w2, shape, scaling)


def lokr_rank(tensors: dict[str, torch.Tensor]) -> int | None:
    """The rank that divides alpha: from `lokr_w2_b` (else `lokr_w1_b`), None when both halves are full.

    ComfyUI reads w1_b then w2_b (w2_b wins), A1111 w1_b first; the two agree because LyCORIS gives both the
    same rank.

    Raises:
        ValueError: `lokr_w1_b` and `lokr_w2_b` have different ranks (ComfyUI and A1111 would scale the module
            differently).
    """
    ranks = [tensors[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in tensors]
    if len(set(ranks)) > 1:
        raise ValueError(
            f"LoKr module has lokr_w1_b rank {ranks[0]} and lokr_w2_b rank {ranks[1]}: ComfyUI and A1111 would "
            "scale it differently, so it has no well-defined delta."
        )
    return ranks[-1] if ranks else None


def lokr_scaling(alpha: float | None, rank: int | None) -> float:
    """The file scaling of a LoKr module (user multiplier 1): `alpha / rank` when a half is factorized and
    alpha is present, else 1.0. ComfyUI (`comfy/weight_adapter/lokr.py`) and A1111
    (`extensions-builtin/Lora/network_lokr.py`) use 1.0 without alpha or without a `_b` factor; LyCORIS forces
    alpha = dim, i.e. scaling 1, when both halves are full (docs/kohya-format.md section 5)."""
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


lokr_scale = lokr_scaling  # the name before `scale` came to mean the user multiplier only


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of a dimension into `(m, n)`, `m <= n`, `m` as close to `factor` as allowed
    (factor -1: as square as possible). Used to build new LoKr adapters with LyCORIS' shapes."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)
