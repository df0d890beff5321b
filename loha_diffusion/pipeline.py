"""Adapters on diffusers pipelines: load Kohya/LyCORIS files and PEFT-format folders into the UNet and text
encoder(s), combine several with scales, switch them off, fuse them into the weights and back.

Works on any pipeline object with a `unet` and `text_encoder` / `text_encoder_2` attributes
(`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`,
`StableDiffusionXLPipeline`, ...). The adapters are submodules of those components, so `pipe.to(...)`,
`enable_model_cpu_offload()` and dtype casts move them along with the weights they modify.

Words, as diffusers uses them: *fuse* / *unfuse* bake adapters into the weights and restore the exact originals
(`model.merge_adapters` / `unmerge_adapters` underneath); *delete_adapter* removes one adapter; *unload* removes
all of them. `scale` is an adapter's strength (the user multiplier, 1.0 = as trained).

Fused pipelines: a call never leaves fused weights that disagree with the adapters' state. A fused adapter is
always active and enabled, and each fused weight is W0 + the sum of the fused adapters' ΔW at their current
scales, rebuilt from the kept exact original (so after any of these calls the weights are bit for bit those of
a pipeline loaded fresh into the same state and fused). Per call, while something is fused:

| call                                   | while fused                                                          |
|----------------------------------------|----------------------------------------------------------------------|
| `set_adapter_scales`                   | refuses (`AdapterMergedError`): `unfuse`, set, `fuse` (diffusers too: |
|                                        | a fused `lora_scale` needs `unfuse_lora`)                            |
| `set_active_adapters`                  | an adapter left out leaves the weights; the fused ones that stay     |
|                                        | active are re-fused exactly; newly active ones run unfused on top    |
|                                        | (PEFT's `set_adapter` unmerges; diffusers' `set_adapters` after      |
|                                        | `fuse_lora` keeps the old weights, the bug this avoids)              |
| `disable_adapters` / `enable_adapters` | unfuses at once (exact original weights) / fuses the same ones again |
| `delete_adapter`                       | it leaves the weights, the other fused adapters are re-fused exactly |
| `load_adapter` (a new adapter)         | allowed: the new adapter runs unfused on top of the fused weights    |
| `unload`                               | the exact original weights and modules                               |
| `fuse` of an inactive adapter, or      | refuses (`AdapterStateError`): a fused adapter always runs           |
| while disabled                         |                                                                      |
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import model as core
from .errors import (
    AdapterFileNotFoundError,
    AdapterMergedError,
    AdapterNameError,
    AdapterNotFoundError,
    LoHaDiffusionError,
)
from .files import atomic_directory
from .formats import embeddings
from .formats.kohya import load_kohya, read_kohya
from .formats.kohya.read import stored_dtypes_of
from .formats.peft import load_peft
from .layers import check_adapter_name
from .utils import most_common

# Pipeline attributes that can hold adapters, in the order Kohya files list them.
ADAPTER_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def adapter_components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's components that can carry adapters (`unet`, `text_encoder`, `text_encoder_2`), those present.

    Raises:
        TypeError: the pipeline has no `unet` module (not a Stable Diffusion pipeline).
    """
    found = {name: getattr(pipe, name, None) for name in ADAPTER_COMPONENTS}
    found = {name: module for name, module in found.items() if isinstance(module, nn.Module)}
    if "unet" not in found:
        raise TypeError(
            f"{type(pipe).__name__} has no `unet` module; load_adapter works on Stable Diffusion pipelines "
            "(components unet, text_encoder, text_encoder_2)."
        )
    return found


def list_adapters(pipe: Any) -> dict[str, list[str]]:
    """`{adapter name: [components it lives in]}` for every adapter loaded into the pipeline."""
    result: dict[str, list[str]] = {}
    for component, module in adapter_components(pipe).items():
        for name in core.adapter_names(module):
            result.setdefault(name, []).append(component)
    return result


def _require_adapters(pipe: Any, names: list[str]) -> dict[str, list[str]]:
    loaded = list_adapters(pipe)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise AdapterNotFoundError(
            f"No adapter named {unknown} in this pipeline; loaded adapters: {sorted(loaded)}."
        )
    return loaded


def _default_adapter_name(path: Path, taken: dict[str, list[str]]) -> str:
    """A name from the file name that passes `check_adapter_name`, made unique with a numeric suffix."""
    stem = path.name.removesuffix(".safetensors") if path.is_file() else path.name
    base = re.sub(r"[^A-Za-z0-9_\-]+", "_", stem).strip("_") or "adapter"
    try:
        check_adapter_name(base)
    except AdapterNameError:
        base += "_1"  # a torch Module attribute such as "half"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def load_adapter(
    pipe: Any,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    scale: float = 1.0,
    *,
    allow_non_finite: bool = False,
) -> str:
    """Load a Kohya/LyCORIS `.safetensors` file (LoHa, LoRA/LoCon, LoKr) or a PEFT-format folder into the
    pipeline's UNet and text encoder(s), unmerged and active, and return the adapter's name.

    The name defaults to the file name. The adapter's factors are kept in fp32 on each component's device
    (its delta is cast to the component's dtype when applied); `scale` is its strength (1.0 = as trained).
    Every key must map to a module of this pipeline with the right shapes; otherwise one error lists the
    problems and the pipeline is left unchanged (module tree and weights identical). Files in diffusers' or
    PEFT's LoRA layout load too (`formats.foreign`); textual-inversion embeddings bundled in the file (A1111's
    `bundle_emb.<name>.*`) are loaded into the tokenizer(s) and text encoder(s) as the token `<name>` (diffusers'
    `load_textual_inversion`; they stay when the adapter is deleted: `pipe.unload_textual_inversion(name)`).
    Files with NaN/Inf factors, bad alphas or deltas beyond float16's range are refused unless
    `allow_non_finite` (for inspection only: such an adapter makes NaN images).

    Raises:
        AdapterFileNotFoundError: `path` does not exist (also a `FileNotFoundError`).
        AdapterNameError: `adapter_name` breaks the name rule (`layers.check_adapter_name`) or is taken.
        KohyaFormatError / PeftFormatError: the file does not fit this pipeline or is malformed (all listed).
        LoHaDiffusionError: `path` is neither a `.safetensors` file nor a PEFT folder.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterFileNotFoundError(f"Adapter file {str(path)!r} does not exist.")
    components = adapter_components(pipe)
    loaded = list_adapters(pipe)
    if adapter_name is None:
        adapter_name = _default_adapter_name(path, loaded)
    check_adapter_name(adapter_name)
    if adapter_name in loaded:
        raise AdapterNameError(
            f"The pipeline already has an adapter named {adapter_name!r}; pass another adapter_name "
            f"or delete_adapter(pipe, {adapter_name!r}) first."
        )
    if path.is_dir():
        load_peft(
            path, adapter_name=adapter_name, scale=scale, allow_non_finite=allow_non_finite, **components
        )
    elif path.suffix == ".safetensors":
        _load_kohya_file(pipe, path, adapter_name, scale, components, allow_non_finite)
    else:
        raise LoHaDiffusionError(
            f"{str(path)!r} is neither a .safetensors file (Kohya/LyCORIS format) nor a folder with "
            "adapter_config.json (PEFT format)."
        )
    return adapter_name


def _load_kohya_file(
    pipe: Any,
    path: Path,
    adapter_name: str,
    scale: float,
    components: dict[str, nn.Module],
    allow_non_finite: bool = False,
) -> None:
    """`load_kohya`, then the textual-inversion embeddings the file bundles (A1111's `bundle_emb.*`) into the
    tokenizer(s) and text encoder(s) as A1111 does (`formats.embeddings`; those A1111 skips are skipped with a
    warning). If an embedding fails to load, the adapter is removed again before the error propagates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", embeddings.BundledEmbeddingWarning)  # loaded below, not dropped
        kfile = read_kohya(path)
    load_kohya(kfile, adapter_name=adapter_name, scale=scale, allow_non_finite=allow_non_finite, **components)
    try:
        embeddings.load_embeddings(pipe, embeddings.plan_embeddings(pipe, kfile.embeddings))
    except Exception:
        delete_adapter(pipe, adapter_name)
        raise


def set_adapter_scales(pipe: Any, scales: dict[str, float]) -> None:
    """Set the strength of each named adapter (1.0 = as trained, 0 = off); e.g. `{"style": 0.8, "face": 0.5}`.

    Fused adapters cannot change scale: call `unfuse(pipe)` first.

    Raises:
        AdapterNotFoundError: a name is not loaded (no scale is changed).
        AdapterMergedError: an adapter is fused (no scale is changed).
    """
    loaded = _require_adapters(pipe, list(scales))
    components = adapter_components(pipe)
    # Check every adapter before changing any, so a refused call leaves all scales as they were.
    for name in scales:
        for component in loaded[name]:
            for layer in core.adapter_layers(components[component]).values():
                if name in layer.merged_adapters:
                    raise AdapterMergedError(
                        f"Adapter {name!r} is fused; call unfuse(pipe) before changing its scale."
                    )
    for name, scale in scales.items():
        for component in loaded[name]:
            core.set_adapter_scale(components[component], name, float(scale))


def set_active_adapters(pipe: Any, names: list[str] | str) -> None:
    """Run exactly the adapters `names` (others stay loaded but inactive); several active adapters add up.

    On a fused pipeline, a fused adapter that is left out is taken out of the weights and the fused ones that
    stay active are re-fused exactly; adapters that become active run unfused until the next `fuse`. So
    `fuse(pipe)` with "a" and "b" active, then `set_active_adapters(pipe, ["a"])`, computes "a" alone (fused).

    Raises:
        AdapterNotFoundError: a name is not loaded (nothing is changed).
    """
    names = [names] if isinstance(names, str) else list(names)
    _require_adapters(pipe, names)
    for module in adapter_components(pipe).values():
        if core.adapter_layers(module):
            core.set_active_adapters(module, [n for n in names if n in core.adapter_names(module)])


def disable_adapters(pipe: Any) -> None:
    """Run the base model only, keeping the adapters loaded. A fused pipeline is unfused at once (the weights
    are the exact originals when the call returns) and `enable_adapters` fuses the same adapters again."""
    for module in adapter_components(pipe).values():
        core.disable_adapters(module)


def enable_adapters(pipe: Any) -> None:
    """Run the active adapters again after `disable_adapters`, re-fusing those it unfused (the ones still
    loaded and active; `unfuse` in between cancels that)."""
    for module in adapter_components(pipe).values():
        core.enable_adapters(module)


def delete_adapter(pipe: Any, name: str) -> None:
    """Remove adapter `name` from every component; the other adapters stay loaded. If it is fused, the weights
    are rebuilt from the exact originals with the other fused adapters only (they stay fused).

    Raises:
        AdapterNotFoundError: `name` is not loaded.
    """
    loaded = _require_adapters(pipe, [name])
    components = adapter_components(pipe)
    for component in loaded[name]:
        core.delete_adapter(components[component], name)


def unload(pipe: Any) -> None:
    """Remove every adapter, restoring the original modules and exact original weights (diffusers'
    `unload_lora_weights`)."""
    for module in adapter_components(pipe).values():
        core.unload(module)


def unload_adapter(pipe: Any, name: str | None = None) -> None:
    """Older name: `delete_adapter(pipe, name)`, or `unload(pipe)` when `name` is None.

    Raises:
        AdapterNotFoundError: `name` is not loaded.
    """
    if name is None:
        unload(pipe)
    else:
        delete_adapter(pipe, name)


def fuse(pipe: Any, adapter_names: list[str] | None = None) -> None:
    """Bake adapters (default: the active ones, at their current scales) into the weights for the fastest
    inference (diffusers' `fuse_lora`; `model.merge_adapters` underneath). The merge is computed in fp32 and
    rounded once to each weight's dtype; the original weights are kept, so `unfuse` restores them bit for bit.
    Fusing more adapters later rebuilds the weights from the originals (no rounding accumulates).

    Raises:
        AdapterNotFoundError: a name is not loaded (nothing is fused).
        AdapterStateError: a named adapter is not active, or the adapters are disabled: a fused adapter always
            runs, so fusing it would change the output (nothing is fused).
    """
    if adapter_names is not None:
        _require_adapters(pipe, adapter_names)
    plan = []
    for module in adapter_components(pipe).values():
        present = core.adapter_names(module)
        if not present:
            continue
        names = None if adapter_names is None else [n for n in adapter_names if n in present]
        if names == []:
            continue
        core.check_mergeable(module, names)  # every component before changing any
        plan.append((module, names))
    for module, names in plan:
        core.merge_adapters(module, names)


def unfuse(pipe: Any) -> None:
    """Restore the exact original weights of every fused layer; the adapters stay loaded and active
    (diffusers' `unfuse_lora`; `model.unmerge_adapters` underneath)."""
    for module in adapter_components(pipe).values():
        core.unmerge_adapters(module)


def fused_adapters(pipe: Any) -> list[str]:
    """Names of the adapters currently baked into the weights."""
    names: list[str] = []
    for module in adapter_components(pipe).values():
        for layer in core.adapter_layers(module).values():
            names += [n for n in layer.merged_adapters if n not in names]
    return names


# -- loading and writing whole pipelines ---------------------------------------------------------------------

# Weight files `from_pretrained` reads without a `variant`: plain or sharded (`-00001-of-00002`).
_WEIGHT_FILE = re.compile(r"^(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors$")


def from_pretrained_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The keyword that sets the dtype of `DiffusionPipeline.from_pretrained` for the installed diffusers:
    `{"dtype": dtype}` from diffusers 0.40 (which deprecates `torch_dtype` with a FutureWarning), else
    `{"torch_dtype": dtype}` (older versions do not know `dtype`)."""
    version = importlib.metadata.version("diffusers")
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 40) else {"torch_dtype": dtype}


def stored_dtypes(pipeline_dir: str | os.PathLike) -> dict[str, torch.dtype | None]:
    """The dtype each component of a diffusers pipeline folder stores its weights in: `{component folder:
    dtype}`, the most common floating dtype of the tensors in its `.safetensors` weight files (the files
    `from_pretrained` reads without a `variant`, else any, e.g. `model.fp16.safetensors`). None for a component
    with `.bin` weights only.

    Only the file headers are read (no tensor data).
    """
    result: dict[str, torch.dtype | None] = {}
    for folder in sorted(p for p in Path(pipeline_dir).iterdir() if p.is_dir()):
        files = [f for f in folder.iterdir() if _WEIGHT_FILE.match(f.name)] or sorted(
            folder.glob("*.safetensors")
        )
        if not files and not any(folder.glob("*.bin")):
            continue  # a tokenizer or scheduler: no weights
        dtypes = [dtype for file in files for dtype in stored_dtypes_of(file).values()]
        result[folder.name] = most_common(dtype for dtype in dtypes if dtype is not None)
    return result


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def save_merged(
    pipe: Any, out: str | os.PathLike, dtypes: dict[str, torch.dtype | None]
) -> dict[str, tuple[torch.dtype, int]]:
    """Bake every active adapter into the weights (`model.merge_and_unload`), cast each model component to
    `dtypes[component]` (None or absent: left as loaded) and write the pipeline folder `out` atomically
    (`files.atomic_directory`: it appears complete or not at all; an existing folder is replaced).

    Load the pipeline in float32 and pass the base model's dtypes (`stored_dtypes`) to keep its precision:
    each merged weight is then computed in fp32 and rounded once, `(W0.float() + ΔW).half()` for an fp16 base
    (kohya's `merge_lora.py` and A1111's merge do the same: merge in fp32, save in the chosen precision).

    Returns `{component: (dtype written, bytes on disk)}` for the model components.

    Raises:
        AdapterStateError: the adapters are disabled (nothing is written); enable them first.
        OutputWriteError: no space or no permission for `out` (the message names both; nothing is left).
    """
    components = {name: module for name, module in pipe.components.items() if isinstance(module, nn.Module)}
    for module in adapter_components(pipe).values():
        core.check_mergeable(module)
    for module in adapter_components(pipe).values():
        core.merge_and_unload(module)
    for name, module in components.items():
        if dtypes.get(name) is not None:
            module.to(dtype=dtypes[name])
    needed = sum(
        t.numel() * t.element_size()
        for module in components.values()
        for t in [*module.parameters(), *module.buffers()]
    )
    out = Path(out)
    with atomic_directory(out, needed=needed) as tmp:
        pipe.save_pretrained(tmp)
    return {
        name: (next(module.parameters()).dtype, _folder_bytes(out / name))
        for name, module in components.items()
        if (out / name).is_dir()
    }
