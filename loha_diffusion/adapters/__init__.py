"""Adapter kinds: one `nn.Module` per kind, all following the `Adapter` contract, and the registry of kinds.

A kind declares itself on its class (`Adapter.kind`, `kohya_names`, `file_tensors`, `detect_tensors`,
`file_rank`, `file_scaling`, `from_file_tensors`, ...; see `adapters/base.py`). `ADAPTER_KINDS` lists them and
drives the rest: `detect_kind` tells a file module's kind, `adapter_class` gives the class of a kind. Adding a
kind is `functional/<kind>.py`, `adapters/<kind>.py` and one entry in `ADAPTER_KINDS`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ConfigError
from .base import Adapter, LayerSpec
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .lora import LoRAAdapter

# Every adapter kind, in the order a file module is tested (LoHa, then LoRA, then LoKr, as ComfyUI and A1111 do).
# The one registry: the functions below read it at each call.
ADAPTER_KINDS: tuple[type[Adapter], ...] = (LoHaAdapter, LoRAAdapter, LoKrAdapter)


def adapter_class(kind: str) -> type[Adapter]:
    """The adapter class of `kind` ("loha", "lora", "lokr"; `AdapterConfig.kind`, `KohyaModule.kind`).

    Raises:
        ConfigError: an unknown kind (a `ValueError`); the message lists the known ones.
    """
    for cls in ADAPTER_KINDS:
        if cls.kind == kind:
            return cls
    raise ConfigError(f"Unknown adapter kind {kind!r}; known kinds: {[cls.kind for cls in ADAPTER_KINDS]}.")


def detect_kind(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The kind of a Kohya/LyCORIS file module from its tensor names (`hada_w1_a` -> "loha", `lora_down.weight`
    or `lora_up.weight` -> "lora", `lokr_w1`/`lokr_w1_a` -> "lokr"; first match in `ADAPTER_KINDS` order), or
    None when no kind recognises them. Only names are read."""
    return next((cls.kind for cls in ADAPTER_KINDS if cls.detects(tensors)), None)


def state_tensor_names() -> set[str]:
    """Every tensor name (`Adapter.state_tensors` keys: `hada_w1_a`, `lora_A.weight`, `lokr_t2`, ...) any kind
    can have."""
    return {name for cls in ADAPTER_KINDS for name in cls.kohya_names}


def kind_titles() -> str:
    """The kinds as people name them, for messages: "LoHa, LoRA or LoKr"."""
    titles = [cls.title for cls in ADAPTER_KINDS]
    return ", ".join(titles[:-1]) + " or " + titles[-1] if len(titles) > 1 else titles[0]


__all__ = [
    "ADAPTER_KINDS",
    "Adapter",
    "LayerSpec",
    "LoHaAdapter",
    "LoKrAdapter",
    "LoRAAdapter",
    "adapter_class",
    "detect_kind",
    "kind_titles",
    "state_tensor_names",
]
