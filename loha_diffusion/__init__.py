"""loha_diffusion: LoHa and LoRA adapters for Stable Diffusion — train, export to Kohya/LyCORIS, load in diffusers.

The public names below are imported on first use (PEP 562), so `import loha_diffusion.errors` or the training
script's argument parsing does not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .quiet import quiet_library_noise

# Before any diffusers pipeline is imported: transformers prints its torchvision notice at that import.
quiet_library_noise()

if TYPE_CHECKING:
    from .config import LoHaConfig, LoRAConfig
    from .errors import LoHaDiffusionError
    from .formats import load_kohya, save_kohya
    from .model import LoHaModel, get_adapter_state_dict, inject_adapter, set_adapter_state_dict
    from .pipeline import load_adapter

# public name -> the module that defines it
_EXPORTS = {
    "LoHaConfig": ".config",
    "LoRAConfig": ".config",
    "LoHaModel": ".model",
    "inject_adapter": ".model",
    "get_adapter_state_dict": ".model",
    "set_adapter_state_dict": ".model",
    "save_kohya": ".formats",
    "load_kohya": ".formats",
    "load_adapter": ".pipeline",
    "LoHaDiffusionError": ".errors",
}

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
    "LoHaDiffusionError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loha_diffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
