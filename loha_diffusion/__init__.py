"""loha_diffusion: LoHa and LoRA adapters for Stable Diffusion — train, export to Kohya/LyCORIS, load in diffusers."""

from .config import LoHaConfig, LoRAConfig
from .formats import load_kohya, save_kohya
from .model import LoHaModel, get_adapter_state_dict, inject_adapter, set_adapter_state_dict
from .pipeline import load_adapter

__all__ = [
    "LoHaConfig",
    "LoRAConfig",
    "LoHaModel",
    "inject_adapter",
    "get_adapter_state_dict",
    "set_adapter_state_dict",
    "save_kohya",
    "load_kohya",
    "load_adapter",
]
__version__ = "0.1.0"
