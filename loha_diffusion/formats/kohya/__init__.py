"""Kohya / LyCORIS `.safetensors` adapter files: read (`read_kohya`), load (`load_kohya`), write (`save_kohya`,
`write_kohya_file`) and metadata (`kohya_metadata`, `read_metadata`, `addnet_hash`); docs/kohya-format.md
describes the format.

One module per concern: `read` (parse files into `KohyaFile`/`KohyaModule`), `load` (map names to model layers,
`load_kohya`), `write` (`build_kohya_state_dict`, `save_kohya`, `write_kohya_file`) and `metadata`. Every name
is re-exported here, so `from loha_diffusion.formats.kohya import X` works for all of them.
"""

from .load import ModuleTarget, kohya_name_map, layer_modules, load_kohya
from .metadata import (
    TRAINING_INFO_KEYS,
    addnet_hash,
    addnet_hash_file,
    kohya_metadata,
    read_metadata,
)
from .read import (
    KOHYA_TO_PEFT_LORA,
    LOHA_CP_TENSORS,
    LOHA_TENSORS,
    LOKR_TENSORS,
    LORA_CP_TENSORS,
    LORA_TENSORS,
    PEFT_TO_KOHYA_LORA,
    KohyaFile,
    KohyaFormatError,
    KohyaModule,
    classify_module,
    parse_kohya_state_dict,
    read_kohya,
)
from .write import SAVE_DTYPES, build_kohya_state_dict, save_kohya, write_kohya_file

__all__ = [
    "KOHYA_TO_PEFT_LORA",
    "LOHA_CP_TENSORS",
    "LOHA_TENSORS",
    "LOKR_TENSORS",
    "LORA_CP_TENSORS",
    "LORA_TENSORS",
    "PEFT_TO_KOHYA_LORA",
    "SAVE_DTYPES",
    "TRAINING_INFO_KEYS",
    "KohyaFile",
    "KohyaFormatError",
    "KohyaModule",
    "ModuleTarget",
    "addnet_hash",
    "addnet_hash_file",
    "build_kohya_state_dict",
    "classify_module",
    "kohya_metadata",
    "kohya_name_map",
    "layer_modules",
    "load_kohya",
    "parse_kohya_state_dict",
    "read_kohya",
    "read_metadata",
    "save_kohya",
    "write_kohya_file",
]
