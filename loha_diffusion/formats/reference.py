"""The plain formulas of the Kohya/LyCORIS file format: one module's ΔW from its file tensors, in float64.

Written straight from docs/kohya-format.md (sections 3-5: LoHa flat and CP, LoRA/LoCon and Tucker, LoKr in all
forms, scale `alpha / rank`) and deliberately independent of `loha_diffusion.adapters` and
`loha_diffusion.functional`: `loha-diffusion verify` and the tests compare our adapter classes against this
module, so it must not share their code. It follows the loaders that read the files:

* ComfyUI `comfy/weight_adapter/loha.py`, `lora.py`, `lokr.py` (`calculate_weight` of each adapter);
* A1111 `extensions-builtin/Lora/network_hada.py`, `network_lora.py`, `network_lokr.py` (`calc_updown`) and
  `lyco_helpers.py` (`make_weight_cp`, `rebuild_conventional`);
* LyCORIS `lycoris/functional/loha.py` and `lycoris/modules/{loha,locon,lokr}.py`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import KohyaFormatError

# The contraction every loader uses for CP/Tucker factors (t, w_b, w_a) -> (out, in, kh, kw), with `w_a`
# rank-first `(r, out)` (FedPara's Proposition 3; A1111 does it in two einsums, same result).
CP_EINSUM = "i j k l, j r, i p -> p r k l"


def _cp(core: torch.Tensor, w_b: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    return torch.einsum(CP_EINSUM, core, w_b, w_a)


def loha_delta(tensors: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """The unscaled LoHa product `(w1_a @ w1_b) * (w2_a @ w2_b)`, or with `hada_t1`/`hada_t2` the CP form
    `M1 * M2` with `M[o, i, h, w] = Σ_ab t[a, b, h, w] · w_b[b, i] · w_a[a, o]`, reshaped to `weight_shape`.

    Args:
        tensors: float64 `hada_w1_a (out, r)`, `hada_w1_b (r, in·kh·kw)`, same for w2; CP: `hada_t1 (r, r, kh,
            kw)`, `hada_w1_a (r, out)` (rank first), `hada_w1_b (r, in)`, same for t2/w2.
        weight_shape: the layer's weight shape, `(out, in)` or `(out, in, kh, kw)`.

    Returns:
        `(weight_shape)` tensor, dtype and device of `tensors`.

    Raises:
        RuntimeError: (torch) factors that do not multiply or do not fit `weight_shape`.
    """
    t = tensors
    if "hada_t1" in t:
        m1 = _cp(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        m2 = _cp(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
    else:
        m1 = t["hada_w1_a"] @ t["hada_w1_b"]
        m2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return (m1 * m2).reshape(weight_shape)


def lora_delta(tensors: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """The unscaled LoRA/LoCon product `up.flatten(1) @ down.flatten(1)`, or with `lora_mid.weight` the Tucker
    form `Δ[o, i, h, w] = Σ_ab up[o, a] · mid[a, b, h, w] · down[b, i]`, reshaped to `weight_shape`.

    Args:
        tensors: float64 `lora_down.weight (r, in[, kh, kw])`, `lora_up.weight (out, r[, 1, 1])`; Tucker:
            `lora_down.weight (r, in, 1, 1)`, `lora_mid.weight (r, r, kh, kw)`, `lora_up.weight (out, r, 1, 1)`.
        weight_shape: the layer's weight shape.

    Returns:
        `(weight_shape)` tensor, dtype and device of `tensors`.

    Raises:
        RuntimeError: (torch) factors that do not multiply or do not fit `weight_shape`.
    """
    down, up = tensors["lora_down.weight"].flatten(1), tensors["lora_up.weight"].flatten(1)
    if "lora_mid.weight" in tensors:
        return torch.einsum("o a, a b h w, b i -> o i h w", up, tensors["lora_mid.weight"], down)
    return (up @ down).reshape(weight_shape)


def lokr_delta(tensors: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """The unscaled LoKr product `kron(w1, w2)` reshaped to `weight_shape` (w1 unsqueezed to the kernel's
    dimensions for convs).

    Args:
        tensors: float64 `lokr_w1 (a, c)` or `lokr_w1_a (a, r)` + `lokr_w1_b (r, c)`; `lokr_w2 (b, d[, kh, kw])`,
            or `lokr_w2_a (b, r)` + `lokr_w2_b (r, d·kh·kw)`, or CP `lokr_t2 (r, r, kh, kw)` + `lokr_w2_a (r, b)`
            + `lokr_w2_b (r, d)`; `out = a·b`, `in = c·d` (LyCORIS `factorization`).
        weight_shape: the layer's weight shape.

    Returns:
        `(weight_shape)` tensor, dtype and device of `tensors`.

    Raises:
        RuntimeError: (torch) factors that do not multiply or do not fit `weight_shape`.
    """
    t = tensors
    kernel = tuple(weight_shape[2:])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _cp(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)).reshape(t["lokr_w2_a"].shape[0], -1, *kernel)
    if kernel and w2.dim() == 2:
        w2 = w2.reshape(w2.shape[0], -1, *kernel)
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    # torch.kron raises on some non-contiguous inputs (e.g. einsum outputs).
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight_shape)


def module_kind(tensors: Mapping[str, torch.Tensor]) -> str:
    """ "loha", "lora" or "lokr", from the detection keys the loaders use (`hada_w1_a`, `lora_down.weight`,
    `lokr_w1`/`lokr_w1_a`).

    Raises:
        KohyaFormatError: none of them is present.
    """
    if "hada_w1_a" in tensors:
        return "loha"
    if "lora_down.weight" in tensors:
        return "lora"
    if "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        return "lokr"
    raise KohyaFormatError(f"no LoHa, LoRA or LoKr tensors in {sorted(tensors)}")


def reference_scale(tensors: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    """The factor the loaders multiply the product by: `alpha / rank`, 1.0 without alpha.

    The rank is `hada_w1_b.shape[0]` (LoHa) or `lora_down.weight.shape[0]` (LoRA). LoKr: `lokr_w2_b.shape[0]`,
    else `lokr_w1_b.shape[0]` (ComfyUI reads w1_b, then w2_b), and scale 1 when neither half is factorized
    (ComfyUI/A1111 use 1.0 without a `_b` factor; LyCORIS forces alpha = dim there).

    Raises:
        KohyaFormatError: no known factor tensors.
    """
    kind = module_kind(tensors)
    if kind == "lokr":
        ranks = [tensors[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in tensors]
        rank = ranks[-1] if ranks else None
    else:
        rank = tensors["hada_w1_b" if kind == "loha" else "lora_down.weight"].shape[0]
    if alpha is None or not rank:
        return 1.0
    return float(alpha) / rank


def reference_delta(
    tensors: Mapping[str, torch.Tensor], alpha: float | None, weight_shape: tuple[int, ...]
) -> torch.Tensor:
    """ΔW of one file module as the loaders rebuild it: the product of its factors times `reference_scale`
    (multiplier 1), computed in float64.

    Args:
        tensors: the module's factor tensors under their file names (`hada_w1_a`, `lora_down.weight`, `lokr_w1`,
            ...; any dtype; an `alpha` entry here is ignored, pass it as `alpha`).
        alpha: the module's alpha (`None` when the file has none: scale 1).
        weight_shape: the layer's weight shape, `(out, in)` or `(out, in, kh, kw)`.

    Returns:
        A float64 tensor of shape `weight_shape` on the device of `tensors`.

    Raises:
        KohyaFormatError: no LoHa, LoRA or LoKr tensors.
        RuntimeError: (torch) factors that do not fit each other or `weight_shape`.
    """
    weight_shape = tuple(weight_shape)
    kind = module_kind(tensors)
    t = {k: v.to(torch.float64) for k, v in tensors.items() if k != "alpha"}
    product = {"loha": loha_delta, "lora": lora_delta, "lokr": lokr_delta}[kind](t, weight_shape)
    return product * reference_scale(t, alpha)
