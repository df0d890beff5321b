"""Adapter kinds: one `nn.Module` per kind, all following the `Adapter` contract."""

from .base import Adapter, LayerSpec
from .loha import LoHaAdapter
from .lora import LoRAAdapter

__all__ = ["Adapter", "LayerSpec", "LoHaAdapter", "LoRAAdapter"]
