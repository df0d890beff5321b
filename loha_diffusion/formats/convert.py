"""Conversions of adapter files: LoHa/LoKr -> LoRA by truncated SVD, SDXL UNet name styles, dtype, Kohya <-> PEFT.

What `loha-diffusion convert` does, as library functions that take a read `KohyaFile` (or a PEFT folder) and the
base model's layers (weightless models from `loha_diffusion.meta_models.meta_models` are enough: only names and
shapes are read) and write the result. Kohya files are written through `write_kohya_file` (atomic, with
`sshs_model_hash`). Every problem raises a `LoHaDiffusionError` subclass (`KohyaFormatError`, `PeftFormatError`)
that names the module or file; the file format is described in docs/kohya-format.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import KohyaFormatError, LoHaDiffusionError, PeftFormatError, format_problems
from ..files import atomic_directory
from ..finite import check_writable
from ..utils import most_common
from . import naming
from .kohya import KohyaFile, ModuleTarget, kohya_name_map, load_kohya, write_kohya_file
from .kohya.metadata import public_metadata
from .kohya.read import stored_dtypes_of
from .peft import load_peft, peft_to_kohya, read_peft, save_peft

UNET_NAME_STYLES = ("ldm", "diffusers")
_ADAPTER_NAME = "convert"  # the adapter name used on the throwaway models of a Kohya <-> PEFT conversion


# -- names ---------------------------------------------------------------------------------------------


def module_targets(kfile: KohyaFile, models: Mapping[str, nn.Module]) -> dict[str, ModuleTarget]:
    """`{module name: ModuleTarget}` for the modules of `kfile` that name a layer of `models` (keyword names
    `unet`, `text_encoder`, `text_encoder_2`); modules naming no layer are left out."""
    names = kohya_name_map(**models)
    return {name: names[name] for name in kfile.modules if name in names}


def _mapped_targets(kfile: KohyaFile, models: Mapping[str, nn.Module]) -> dict[str, ModuleTarget]:
    """`module_targets`, refusing a file with modules that name no layer of `models`."""
    targets = module_targets(kfile, models)
    missing = [n for n in kfile.modules if n not in targets]
    if missing:
        raise KohyaFormatError(
            format_problems(
                f"{len(missing)} modules of {kfile.path or 'the file'} name no layer of the base model:",
                [("unknown module names", missing)],
                ["use the base model the file was made for"],
            )
        )
    return targets


def renamed_modules(
    kfile: KohyaFile, unet_names: str | None, models: Mapping[str, nn.Module] | None = None
) -> dict[str, str]:
    """New module names: SDXL UNet names in `unet_names` style ("ldm" as Kohya writes SDXL, "diffusers"), text
    encoder names in the portable `text_model_` form (docs/kohya-format.md section 2); unchanged (`{name:
    name}`) when `unet_names` is None.

    Raises:
        KohyaFormatError: `unet_names` is given for a non-SDXL base (`models` without "text_encoder_2"), is not
            a style, or a module names no layer of `models`.
    """
    if unet_names is None:
        return {name: name for name in kfile.modules}
    if unet_names not in UNET_NAME_STYLES:
        raise KohyaFormatError(f"unet_names must be one of {UNET_NAME_STYLES}, not {unet_names!r}.")
    if models is None or "text_encoder_2" not in models:
        raise KohyaFormatError(
            "SDXL UNet name styles apply to SDXL files only (SD1/SD2 files always use diffusers names)."
        )
    layout = naming.UNetLayout.from_config(models["unet"])
    out = {}
    for name, target in _mapped_targets(kfile, models).items():
        if target.component == "unet":
            out[name] = naming.unet_kohya_name(target.path, unet_names, layout)
        else:
            out[name] = naming.text_encoder_kohya_name(target.path, kfile.modules[name].prefix)
    return out


# -- Kohya -> Kohya (dtype, names, LoRA by SVD) ------------------------------------------------------------


@dataclass
class LowRankFactors:
    """The best rank-k approximation `up @ down` of a ΔW flattened to `(out, in·kh·kw)` (Eckart-Young), with
    the singular values split evenly between the factors; float64 on ΔW's device."""

    up: torch.Tensor  # (out, k)
    down: torch.Tensor  # (k, in·kh·kw)
    norm: float  # ||ΔW||_F
    error: float  # ||ΔW - up @ down||_F

    @property
    def relative_error(self) -> float:
        """`error / norm` (0 for a zero ΔW)."""
        return self.error / self.norm if self.norm > 0 else 0.0


def svd_factors(delta: torch.Tensor, rank: int) -> LowRankFactors:
    """Truncated SVD of `delta` (`(out, in)` or `(out, in, kh, kw)`, any float dtype) at `rank` (at most the
    matrix's smaller side), computed in float64."""
    matrix = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    up, down = u[:, :k] * root, root[:, None] * vh[:k]
    return LowRankFactors(up, down, matrix.norm().item(), (matrix - up @ down).norm().item())


def lora_tensors(factors: LowRankFactors, weight_shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    """Kohya LoRA/LoCon tensors of `factors` in `dtype`, contiguous: Linear `lora_down.weight (k, in)`,
    `lora_up.weight (out, k)`; conv `lora_down.weight (k, in, kh, kw)`, `lora_up.weight (out, k, 1, 1)`, and a
    0-dim `alpha` = k (scale 1)."""
    up, down = factors.up, factors.down
    k = up.shape[1]
    if len(weight_shape) > 2:
        down = down.reshape(k, *weight_shape[1:])
        up = up.reshape(*up.shape, *([1] * (len(weight_shape) - 2)))
    return {
        "lora_down.weight": down.to(dtype).contiguous(),
        "lora_up.weight": up.to(dtype).contiguous(),
        "alpha": torch.tensor(float(k), dtype=dtype),
    }


@dataclass
class KohyaConversion:
    """What `convert_kohya` wrote: the file, its module count and dtype, and for `to="lora"` the relative
    Frobenius error of each module's approximation (by new module name) and of the whole file."""

    path: Path
    modules: int
    dtype: torch.dtype
    errors: dict[str, float] = field(default_factory=dict)
    total_error: float | None = None


def _check_readable(kfile: KohyaFile) -> None:
    if kfile.all_problems:
        raise KohyaFormatError(
            format_problems(f"{kfile.path or 'The file'} has problems:", [("problems", kfile.all_problems)])
        )


def _same_kind_tensors(kfile: KohyaFile, names: Mapping[str, str], dtype: torch.dtype) -> dict:
    tensors = {}
    for name, module in kfile.modules.items():
        for tensor_name, tensor in module.tensors.items():
            tensors[f"{names[name]}.{tensor_name}"] = tensor.to(dtype).contiguous()
        if module.alpha is not None:
            tensors[f"{names[name]}.alpha"] = torch.tensor(module.alpha, dtype=dtype)
    return tensors


def _lora_by_svd(
    kfile: KohyaFile,
    models: Mapping[str, nn.Module],
    names: Mapping[str, str],
    rank: int,
    dtype: torch.dtype,
    progress: Callable[[str, float], None] | None,
) -> tuple[dict, dict[str, float], float]:
    targets = _mapped_targets(kfile, models)
    tensors, errors = {}, {}
    total_norm2 = total_err2 = 0.0
    for name, module in kfile.modules.items():
        target = targets[name]
        shape = tuple(target.layer.weight.shape)
        try:
            delta = module.delta_weight(shape)
        except RuntimeError as err:
            raise KohyaFormatError(
                f"{name} does not fit {target.component}.{target.path} {shape} ({err}); use the base model "
                "the file was made for."
            ) from None
        factors = svd_factors(delta, rank)
        total_norm2, total_err2 = total_norm2 + factors.norm**2, total_err2 + factors.error**2
        errors[names[name]] = factors.relative_error
        if progress is not None:
            progress(names[name], factors.relative_error)
        for tensor_name, tensor in lora_tensors(factors, shape, dtype).items():
            tensors[f"{names[name]}.{tensor_name}"] = tensor
    total = math.sqrt(total_err2 / total_norm2) if total_norm2 > 0 else 0.0
    return tensors, errors, total


def _lora_metadata(kfile: KohyaFile, tensors: Mapping[str, torch.Tensor], rank: int, total: float) -> dict:
    """kohya's `networks.lora` metadata for a converted file (conv_dim/conv_alpha when it has kxk convs)."""
    convs = any(
        t.dim() == 4 and t.shape[-1] > 1 for k, t in tensors.items() if k.endswith("lora_down.weight")
    )
    kind = most_common(m.kind for m in kfile.modules.values())
    source = kfile.path.name if kfile.path else "?"
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(rank)} if convs else {}),
        "loha_diffusion.converted_from": f"{kind} ({source})",
        "loha_diffusion.svd_relative_error": f"{total:.3e}",
    }


def convert_kohya(
    kfile: KohyaFile,
    path: str | os.PathLike,
    *,
    to: str = "kohya",
    rank: int = 16,
    dtype: torch.dtype | None = None,
    unet_names: str | None = None,
    models: Mapping[str, nn.Module] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> KohyaConversion:
    """Write `kfile` as a new Kohya file at `path` (atomically, with a fresh `sshs_model_hash`; the metadata is
    kept, updated for a LoRA, with local paths reduced to names by `formats.kohya.metadata.public_metadata`).

    Args:
        kfile: the file to convert (`read_kohya`).
        path: the `.safetensors` file to write.
        to: "kohya" (same kinds and factors) or "lora": each module's ΔW (loaders' scale applied) replaced by
            its best rank-`rank` approximation (truncated SVD) as Kohya LoRA/LoCon tensors with alpha = rank,
            so LoRA-only tools can use a LoHa/LoKr.
        rank: the LoRA rank for `to="lora"` (lower when a layer is smaller).
        dtype: tensor dtype of the output (default: the input's).
        unet_names: SDXL UNet name style of the output ("ldm" | "diffusers"; text encoders get portable
            `text_model_` names); None keeps the names.
        models: `{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}` of the base model (meta-device
            models do); needed for `to="lora"` and `unet_names`.
        progress: called with (new module name, relative error) after each module's SVD.

    Returns:
        What was written (`KohyaConversion`; errors are relative Frobenius norms, unitless).

    Raises:
        KohyaFormatError: the file has problems, a module names no layer of `models` or does not fit it,
            `models` is missing where needed, or `unet_names` does not apply.
        NonFiniteError: a value is NaN/Inf or beyond the range of `dtype` (the modules are named).
        OutputWriteError: no space left or no permission (the previous file is unchanged).
        OSError: another error of the filesystem.
    """
    if to not in ("kohya", "lora"):
        raise KohyaFormatError(f"to must be 'kohya' or 'lora', not {to!r}.")
    _check_readable(kfile)
    if not kfile.modules:
        raise KohyaFormatError(f"{kfile.path or 'The file'} holds no adapter modules.")
    if to == "lora" and models is None:
        raise KohyaFormatError("A conversion to LoRA needs the base model's layers (models=...).")
    names = renamed_modules(kfile, unet_names, models)
    dtype = dtype or next(iter(kfile.modules.values())).dtype
    metadata = public_metadata(kfile.metadata)  # a path another tool wrote is not passed on
    errors: dict[str, float] = {}
    total = None
    # Built in float32 and checked before the cast, so a value the output dtype cannot hold is named as an
    # overflow (with the fix) instead of surfacing as "infinite" after the cast; the cast is lossless otherwise.
    if to == "lora":
        tensors, errors, total = _lora_by_svd(kfile, models, names, rank, torch.float32, progress)
        metadata.update(_lora_metadata(kfile, tensors, rank, total))
    else:
        tensors = _same_kind_tensors(kfile, names, torch.float32)
    check_writable(tensors, dtype, str(path))
    tensors = {key: tensor.to(dtype).contiguous() for key, tensor in tensors.items()}
    written = write_kohya_file(path, tensors, metadata)
    return KohyaConversion(written, len(kfile.modules), dtype, errors, total)


# -- Kohya <-> PEFT folders ------------------------------------------------------------------------------


def stand_in_weights(models: Mapping[str, nn.Module], paths: Mapping[str, set[str]]) -> None:
    """Give the named meta-device layers (`{component: {module path}}`) a CPU weight of their shape that stores
    one number (an expanded float32 zero): importers need the layers' shapes and device, never their values.
    Layers that already have storage are left alone."""
    for component, component_paths in paths.items():
        for path in component_paths:
            layer = models[component].get_submodule(path)
            if layer.weight.is_meta:
                stand_in = torch.zeros((), dtype=torch.float32).expand(layer.weight.shape)
                layer.weight = nn.Parameter(stand_in, requires_grad=False)


def _peft_module_path(key: str) -> str:
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_mid.weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key.rpartition(".")[0]


def peft_folders(src: str | os.PathLike, models: Mapping[str, nn.Module]) -> dict[str, Path]:
    """`{component: folder}` of the PEFT adapters under `src`: `src/<component>/` subfolders as `save_peft`
    writes them, or `src` itself for every component when it is one adapter folder.

    Raises:
        PeftFormatError: no adapter_config.json in `src` or its component subfolders.
    """
    src = Path(src)
    if (src / "adapter_config.json").is_file():
        return {c: src for c in models}  # one adapter folder: load_peft picks the component that fits
    folders = {c: src / c for c in models if (src / c / "adapter_config.json").is_file()}
    if not folders:
        raise PeftFormatError(
            f"{src} holds no PEFT adapter (adapter_config.json in it or in unet/, text_encoder/, "
            "text_encoder_2/ subfolders)."
        )
    return folders


def _stand_ins_for_peft(src: str | os.PathLike, models: Mapping[str, nn.Module]) -> None:
    """Stand-in weights for the layers the PEFT adapter(s) under `src` name."""
    paths = {}
    for component, folder in peft_folders(src, models).items():
        _, state = read_peft(folder)
        names = {name for name, _ in models[component].named_modules()}
        paths[component] = {p for p in map(_peft_module_path, state) if p in names}
    stand_in_weights(models, paths)


def guess_peft_architecture(src: str | os.PathLike) -> str | None:
    """ "sdxl" when the PEFT folder `src` has a `text_encoder_2/` adapter, else None (a folder does not say)."""
    return "sdxl" if (Path(src) / "text_encoder_2").is_dir() else None


def peft_dtype(src: str | os.PathLike) -> torch.dtype:
    """The dtype of the first tensor of the first `adapter_model.safetensors` under `src` (float16, bfloat16,
    else float32)."""
    for weights in sorted(Path(src).rglob("adapter_model.safetensors")):
        dtypes = list(stored_dtypes_of(weights).values())
        if dtypes:
            return dtypes[0] if dtypes[0] in (torch.float16, torch.bfloat16) else torch.float32
    return torch.float32


def peft_folder_to_kohya(
    src: str | os.PathLike,
    path: str | os.PathLike,
    models: Mapping[str, nn.Module],
    *,
    dtype: torch.dtype | None = None,
    unet_names: str | None = None,
) -> torch.dtype:
    """Write the PEFT adapter(s) under `src` as one Kohya file at `path` (through `save_kohya`: atomic, with
    metadata and `sshs_model_hash`). `models` (meta-device models do; they get stand-in weights and are left
    without the adapter) give names and shapes. Returns the dtype written (default: the PEFT tensors').

    Raises:
        PeftFormatError: `src` holds no PEFT adapter, or it does not fit `models`.
        KohyaFormatError: the adapter cannot be written as a Kohya file.
        OSError: a file cannot be read or written.
    """
    _stand_ins_for_peft(src, models)
    dtype = dtype or peft_dtype(src)
    peft_to_kohya(src, path, dtype=dtype, unet_naming=unet_names or "auto", **models)
    return dtype


def kohya_to_peft_folders(
    kfile: KohyaFile,
    out_dir: str | os.PathLike,
    models: Mapping[str, nn.Module],
    *,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Write `kfile` as PEFT adapter folders `out_dir/<component>/` (adapter_config.json +
    adapter_model.safetensors) for the components it has modules for. `models` (meta-device models do) give
    names and shapes; they get stand-in weights and keep the adapter (name "convert"). Returns the component
    names written. `dtype` defaults to the file's. The folder appears whole or not at all, replacing an existing
    one.

    Raises:
        KohyaFormatError: the file does not fit `models` (names, shapes).
        PeftFormatError: the adapter has no PEFT equivalent.
        OSError: a file cannot be written.
    """
    paths: dict[str, set[str]] = {}
    for target in module_targets(kfile, models).values():
        paths.setdefault(target.component, set()).add(target.path)
    stand_in_weights(models, paths)
    load_kohya(kfile, adapter_name=_ADAPTER_NAME, **models)
    dtype = dtype or next(iter(kfile.modules.values())).dtype
    return _write_peft_folders(out_dir, models, dtype)


def peft_folder_to_peft(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    models: Mapping[str, nn.Module],
    *,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Rewrite the PEFT adapter(s) under `src` as `out_dir/<component>/` folders (e.g. one adapter folder into
    the per-component layout, or another `dtype`), written whole (replacing an existing `out_dir`; `src` is read
    first, so it may be `out_dir`). Returns the component names written.

    Raises:
        PeftFormatError: `src` holds no PEFT adapter, or it does not fit `models`.
        OSError: a file cannot be read or written.
    """
    _stand_ins_for_peft(src, models)
    load_peft(src, adapter_name=_ADAPTER_NAME, **models)
    return _write_peft_folders(out_dir, models, dtype)


def _write_peft_folders(
    out_dir: str | os.PathLike, models: Mapping[str, nn.Module], dtype: torch.dtype | None
) -> list[str]:
    """`save_peft` of the models' "convert" adapter as the folder `out_dir`, written whole
    (`peft_output_folder`). Returns the component names written."""
    with peft_output_folder(out_dir) as tmp:
        save_peft(tmp, adapter_name=_ADAPTER_NAME, dtype=dtype, **models)
        written = sorted(p.parent.name for p in tmp.rglob("adapter_config.json"))
    return written


@contextmanager
def peft_output_folder(directory: str | os.PathLike) -> Iterator[Path]:
    """`files.atomic_directory(directory)` for a PEFT adapter folder with several components: it appears
    whole or not at all, so a kill never leaves one component of a new adapter beside one of an old one (or
    alone), and an existing folder is replaced without leftovers. The errors raised inside (a non-finite
    tensor, a full disk) name `directory`, not the temporary folder they were written to.

    Raises:
        OutputWriteError: no space left, or no permission (the previous folder is unchanged).
        OSError: any other error of the filesystem.
    """
    directory = Path(directory)
    tmp: Path | None = None
    try:
        with atomic_directory(directory) as tmp:
            yield tmp
    except (LoHaDiffusionError, OSError) as exc:
        if tmp is not None and exc.args and isinstance(exc.args[0], str):
            exc.args = (exc.args[0].replace(str(tmp), str(directory)), *exc.args[1:])
        raise
