"""The per-device constants of the adapters' cost models, which pick per layer and call between the merged form
`op(x, W0 + ΔW)` and the low-rank bypass `base(x) + Δ(x)` (both exact; docs/cost-model.md).

The models count multiply-adds (MACs) and weigh what MACs miss with a few constants: how much slower a MAC of the
thin rank-r² matmuls of the bypass is than one of the base-shaped matmul, and what each out×in element of the
merged form's rebuild costs beyond its rank-r matmuls (memory traffic). Those ratios differ between devices, so
the constants are kept per device kind (`torch.device.type`), and a kind without measured constants gets the
conservative ones (`CONSERVATIVE`): the bypass wherever the merged form is not clearly cheaper, because the
bypass's cost grows with the layer's own work (a bounded multiple of the base op, never an out×in tensor),
while the merged form's rebuild is a fixed, memory-bound cost that dominates on few tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DeviceCosts:
    """Constants of the cost model for one device kind, in multiply-add (MAC) units of the base-shaped matmul.

    Attributes:
        bypass_mac_penalty: cost of one MAC of the bypass's thin rank-r² matmuls (or convs) relative to one of
            the big matmul of the merged form.
        long_linear_penalty: added to the penalty for a Linear, growing linearly with the number of positions up
            to `long_linear_tokens` (CPU: over many tokens the thin matmuls run at about half the speed of the
            square ones).
        long_linear_tokens: positions at which `long_linear_penalty` is reached in full.
        merged_train_per_element: cost per out×in element of the merged form's rebuild in training beyond its
            8 rank-r matmuls (writes and rereads out×in tensors: ΔW, W0 + ΔW, the weight gradient, the two
            halves recomputed in backward).
        merged_infer_per_element: the same without gradients (ΔW, W0 + ΔW).
        measured: how and where the constants were measured (or why they were not).
    """

    bypass_mac_penalty: float
    long_linear_penalty: float
    long_linear_tokens: int
    merged_train_per_element: float
    merged_infer_per_element: float
    measured: str


CPU_COSTS = DeviceCosts(
    bypass_mac_penalty=1.3,
    long_linear_penalty=0.7,
    long_linear_tokens=4096,
    merged_train_per_element=400.0,
    merged_infer_per_element=3.0,
    measured=(
        "Fitted on CPU, fp32, 1-2 threads (x86-64, torch 2.x), forward + backward per layer: "
        "benchmarks/bench_layers.py (SD1.5 shapes at r=8 and r=32, flat and CP convs) and "
        "benchmarks/bench_unet_layers.py (every adapted layer of the SD1.5 UNet at 256 and 512 px, forced "
        "merged / forced bypass against the model's pick)."
    ),
)

# Not measured (no GPU yet; the prepared check is ../shared/gpu/gpu_bench.py, which times the cost model's pick
# against forced merged and forced bypass). Derived, not fitted: a GPU's ratio of matmul throughput to memory
# bandwidth is 10-100x a CPU's, so every pass over an out×in fp32 tensor of the rebuild costs far more MACs'
# worth of time; thin matmuls are memory-bound too, so no extra long-token penalty is assumed.
CUDA_COSTS = DeviceCosts(
    bypass_mac_penalty=1.3,
    long_linear_penalty=0.0,
    long_linear_tokens=4096,
    merged_train_per_element=4000.0,
    merged_infer_per_element=1000.0,
    measured=(
        "Not measured yet (pending: ../shared/gpu/gpu_bench.py on a GPU). Conservative: the merged form's "
        "per-element costs are set 10x (training) and ~300x (inference) the CPU's, from the memory-bound "
        "analysis in docs/cost-model.md, so the bypass is kept wherever the merged form is not clearly cheaper."
    ),
)

DEVICE_COSTS: dict[str, DeviceCosts] = {"cpu": CPU_COSTS, "cuda": CUDA_COSTS}
#: The constants for device kinds without their own (mps, xpu, ...): CUDA's, the ones that prefer the bypass.
CONSERVATIVE = CUDA_COSTS


def device_costs(device_type: str) -> DeviceCosts:
    """The cost-model constants for a device kind (`x.device.type`: "cpu", "cuda", ...); kinds without measured
    constants (and `meta`) get `CONSERVATIVE`."""
    return DEVICE_COSTS.get(device_type, CONSERVATIVE)


def bypass_is_cheaper(
    spec: Any,
    x: torch.Tensor,
    *,
    inner_rank: int,
    rebuild_macs: tuple[int, int],
    is_cp: bool,
    training: bool,
    device_type: str,
    long_linear: bool = True,
) -> bool:
    """The one multiply-add (MAC) model both low-rank kinds decide with (docs/cost-model.md), for a layer of
    geometry `spec` (`base.LayerSpec`) and input `x` (any device, `meta` too; only its shape is read).

    Args:
        inner_rank: width of the bypass's thin ops (LoHa: r², LoRA: r).
        rebuild_macs: MACs per out×in element of the merged form's rank-r matmuls, `(training, inference)`
            (LoHa: `(8r, 2r)`; LoRA: `(3r, r)`), to which the device's memory-traffic constants are added.
        is_cp: the CP/Tucker chain (1×1, k×k core, 1×1) instead of one k×k op.
        training: gradients for the factors are computed (three passes' worth of bypass work; the merged form
            adds the weight-gradient matmul `P·out·in·k`).
        device_type: the device kind whose constants apply (`device_costs`).
        long_linear: apply `long_linear_penalty` to Linears over many tokens (measured for LoHa's rank-r²
            matmuls on CPU).

    Returns:
        True when `penalty · bypass` (×3 in training) is below the merged form's cost; False for grouped or
        non-zero-padded convs (no bypass).
    """
    if spec.groups != 1 or not spec.zero_padding:
        return False
    costs = device_costs(device_type)
    positions = spec.positions(x)
    out, in_, k, rank = spec.out_features, spec.in_features, spec.kernel_numel, inner_rank
    full = out * in_ * k
    if is_cp:
        in_positions = x.numel() // max(x.shape[1], 1)
        bypass = in_positions * rank * in_ + positions * rank * (rank * k + out)
    else:
        bypass = positions * rank * (in_ * k + out)
    penalty = costs.bypass_mac_penalty
    if long_linear and spec.op == "linear":
        penalty += costs.long_linear_penalty * min(1.0, positions / costs.long_linear_tokens)
    bypass *= penalty
    if training:
        return 3 * bypass < positions * full + (rebuild_macs[0] + costs.merged_train_per_element) * full
    return bypass < (rebuild_macs[1] + costs.merged_infer_per_element) * full
