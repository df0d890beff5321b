"""Adapter file formats: Kohya/LyCORIS `.safetensors` (`kohya`), PEFT directories (`peft`), module names (`naming`)."""

from .kohya import KohyaFile, KohyaFormatError, KohyaModule, load_kohya, read_kohya, save_kohya

__all__ = ["KohyaFile", "KohyaFormatError", "KohyaModule", "load_kohya", "read_kohya", "save_kohya"]
