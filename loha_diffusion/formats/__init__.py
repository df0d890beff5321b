"""Adapter file formats: Kohya/LyCORIS `.safetensors` (`kohya`), PEFT directories (`peft`), module names (`naming`)."""

from .kohya import (
    KohyaFile,
    KohyaFormatError,
    KohyaModule,
    build_kohya_state_dict,
    kohya_name_map,
    load_kohya,
    read_kohya,
    save_kohya,
)
from .peft import PeftFormatError, kohya_to_peft, load_peft, peft_to_kohya, read_peft, save_peft

__all__ = [
    "KohyaFile",
    "KohyaFormatError",
    "KohyaModule",
    "PeftFormatError",
    "build_kohya_state_dict",
    "kohya_name_map",
    "kohya_to_peft",
    "load_kohya",
    "load_peft",
    "peft_to_kohya",
    "read_kohya",
    "read_peft",
    "save_kohya",
    "save_peft",
]
