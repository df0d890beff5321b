"""Loading Kohya / LyCORIS files onto diffusers/transformers models: `load_kohya`, and `kohya_name_map`, every
Kohya module name a file may use for a layer of the given models (the names themselves: `formats.naming`)."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ...adapters import Adapter, LayerSpec
from ...errors import AdapterNameError, KohyaFormatError, format_problems
from ...finite import delta_bound
from ...layers import AdapterLayer, check_adapter_name
from ...model import LoHaModel, adapter_names, add_adapter
from .. import naming
from .read import KohyaFile, read_kohya


def _unwrap(model: nn.Module | None) -> nn.Module | None:
    """Accept a `LoHaModel`-style wrapper (`.model`) as well as the bare model."""
    return model.model if isinstance(model, LoHaModel) else model


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1d/Conv2d of `model` by its original path (an `AdapterLayer` counts as its base layer)."""
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdapterLayer):
                found[path] = child.base_layer
            elif isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                found[path] = child
            else:
                walk(child, path)

    walk(model, "")
    return found


@dataclass
class ModuleTarget:
    """Where a Kohya module name lands: the component ("unet", "text_encoder", "text_encoder_2"), the module
    path in it, the Linear/Conv layer, and the naming style the name uses ("diffusers", "ldm", "lycoris" for
    UNet names; "te" for portable `text_model_` names, "te_raw" for raw module paths)."""

    component: str
    path: str
    layer: nn.Module
    style: str


def kohya_name_map(
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> dict[str, ModuleTarget]:
    """Every Kohya module name a file may use for a layer of the given models -> that layer.

    UNet: `lora_unet_` + diffusers path, `lora_unet_` + LDM path, `lycoris_` + diffusers path. Text encoders:
    `lora_te_`/`lora_te1_` (first) and `lora_te2_` (second; with two encoders `lora_te_` also means the first,
    as in ComfyUI), each with the portable `text_model_...` name and the raw module path."""
    unet, text_encoder, text_encoder_2 = _unwrap(unet), _unwrap(text_encoder), _unwrap(text_encoder_2)
    names: dict[str, ModuleTarget] = {}
    if unet is not None:
        layout = naming.unet_layout(unet)
        for path, layer in layer_modules(unet).items():
            candidates = naming.unet_name_candidates(path, layout)
            for name, style in zip(candidates, ("diffusers", "lycoris", "ldm")):
                names[name] = ModuleTarget("unet", path, layer, style)
    two = text_encoder_2 is not None
    te_sets = [
        (
            "text_encoder",
            text_encoder,
            (naming.TE1_PREFIX, naming.TE_PREFIX) if two else (naming.TE_PREFIX, naming.TE1_PREFIX),
        ),
        ("text_encoder_2", text_encoder_2, (naming.TE2_PREFIX,)),
    ]
    for component, model, prefixes in te_sets:
        if model is None:
            continue
        for path, layer in layer_modules(model).items():
            for prefix in prefixes:
                names[naming.text_encoder_kohya_name(path, prefix)] = ModuleTarget(
                    component, path, layer, "te"
                )
                names.setdefault(
                    naming.to_kohya(prefix, path), ModuleTarget(component, path, layer, "te_raw")
                )
    return names


def load_kohya(
    path: str | os.PathLike | KohyaFile,
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    scale: float = 1.0,
    allow_non_finite: bool = False,
) -> str:
    """Load a Kohya/LyCORIS LoHa, LoRA/LoCon or LoKr file onto diffusers/transformers models as adapter
    `adapter_name` (user scale `scale`, a unitless multiplier) and return the adapter name.

    Accepts SD1.x/SD2.x and SDXL files with diffusers, LDM (`input_blocks...`) or `lycoris_` UNet names, `lora_te`,
    `lora_te1`, `lora_te2` text-encoder names, fp32/fp16/bf16. Each module becomes an adapter with fp32 factors
    on its layer's device, `scaling = alpha / rank × scale` as ComfyUI and A1111 apply it (docs/kohya-format.md
    section 9). Every check runs before the first layer is wrapped: a refused call leaves every model as it was.

    Args:
        path: a `.safetensors` file, or a `KohyaFile` already read (`read_kohya`, `parse_kohya_state_dict`).
        unet, text_encoder, text_encoder_2: the models (or `LoHaModel`s) to load onto; at least one.
        adapter_name: the new adapter's name (`layers.check_adapter_name`), unused on the given models.
        scale: the user multiplier of the new adapter (a finite number).
        allow_non_finite: load modules with NaN/Inf factors, an alpha that is NaN, infinite, negative or beyond
            float16's range, or a delta beyond float16's range (`MAX_DELTA`, 65,504). Refused by default: they
            give NaN/Inf (black) images here and in ComfyUI/A1111.

    Raises:
        AdapterNameError: `adapter_name` breaks the name rule or is already used on a given model.
        ValueError: no model is given, or `scale` is not a finite number.
        AdapterFileNotFoundError: no file at `path` (a `FileNotFoundError`).
        KohyaFormatError: an unreadable file, or keys that map to no module, unusable modules, shapes that do
            not fit, modules given twice, non-finite values or overflowing deltas (see `allow_non_finite`): one
            message names the file and lists them all, with hints.
    """
    check_adapter_name(adapter_name)
    unet, text_encoder, text_encoder_2 = _unwrap(unet), _unwrap(text_encoder), _unwrap(text_encoder_2)
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    given = {k: m for k, m in models.items() if m is not None}
    if not given:
        raise ValueError("load_kohya needs at least one of unet=, text_encoder=, text_encoder_2=.")
    taken = [k for k, m in given.items() if adapter_name in adapter_names(m)]
    if taken:
        raise AdapterNameError(
            f"Adapter name {adapter_name!r} is already used on {taken}; pick another adapter_name."
        )
    kfile = path if isinstance(path, KohyaFile) else read_kohya(path)
    source = str(kfile.path) if kfile.path is not None else "the Kohya state dict"
    if not kfile.modules and not kfile.problems:
        raise KohyaFormatError(f"{source} holds no adapter modules (no '<module>.<tensor>' keys).")

    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")

    names = kohya_name_map(unet, text_encoder, text_encoder_2)
    bad_modules = [f"{m.name}: {p}" for m in kfile.modules.values() for p in m.problems]
    built, unmatched, shape_errors, duplicates = _build_adapters(kfile, names)
    bad_values = [] if allow_non_finite else kfile.value_problems + _overflowing(built, names, kfile, scale)

    if kfile.problems or bad_modules or unmatched or shape_errors or duplicates or bad_values:
        hints = _mismatch_hints(kfile, unet, text_encoder, text_encoder_2, unmatched)
        if bad_values:
            hints.append(
                "the file holds values that give NaN/Inf outputs (a diverged or corrupted training); use an "
                "earlier checkpoint, or pass allow_non_finite=True to load it anyway"
            )
        raise KohyaFormatError(
            format_problems(
                f"Cannot load {source} ({len(kfile.modules)} modules) onto "
                f"{', '.join(f'{k} ({type(m).__name__})' for k, m in given.items())}; nothing was changed.",
                [
                    ("file problems", kfile.problems),
                    ("unusable modules", bad_modules),
                    ("keys that match no module of the given models", unmatched),
                    ("tensors whose shapes do not fit their module", shape_errors),
                    ("modules given twice", duplicates),
                    ("modules with NaN/Inf values, bad alphas or overflowing deltas", bad_values),
                ],
                hints,
            )
        )

    _warn_on_load(kfile, names, unet)
    for (component, path_), adapter in built.items():
        adapter.scale = float(scale)
        add_adapter(given[component], path_, adapter_name, adapter)
    return adapter_name


def _build_adapters(
    kfile: KohyaFile, names: dict[str, ModuleTarget]
) -> tuple[dict[tuple[str, str], Adapter], list[str], list[str], list[str]]:
    """An adapter for every usable module of `kfile`, keyed by (component, module path), and the modules that
    could not be placed: names that match no layer, shapes that do not fit, two names for one layer."""
    unmatched, shape_errors, duplicates = [], [], []
    built: dict[tuple[str, str], Adapter] = {}
    first_name: dict[tuple[str, str], str] = {}
    for name, module in kfile.modules.items():
        if module.problems:
            continue
        target = names.get(name)
        if target is None:
            unmatched.append(name)
            continue
        key = (target.component, target.path)
        if key in built:
            duplicates.append(f"{name} and {first_name[key]} both map to {target.component} {target.path}")
            continue
        try:
            built[key] = module.to_adapter(LayerSpec.from_module(target.layer))
            first_name[key] = name
        except (ValueError, TypeError) as err:
            shape_errors.append(
                f"{name} -> {target.component}.{target.path} {tuple(target.layer.weight.shape)}: {err}"
            )
    return built, unmatched, shape_errors, duplicates


def delta_peak(adapter: Adapter, limit: float) -> float | None:
    """max|ΔW| of `adapter` when it exceeds `limit` (or ΔW is not finite: inf), else None. ΔW is only built
    when the cheap `finite.delta_bound` exceeds `limit`."""
    if delta_bound(adapter.scaling, adapter.state_tensors().values(), adapter.r) <= limit:
        return None
    with torch.no_grad():
        delta = adapter.delta_weight().double()
    peak = float(delta.abs().max()) if bool(torch.isfinite(delta).all()) else math.inf
    return peak if peak > limit else None


# The largest delta a module may have: float16's largest value. SD weights are O(1); a delta beyond this is
# Inf in ComfyUI/A1111 running half precision (and in an fp16 model here), whatever the model's dtype now.
MAX_DELTA = float(torch.finfo(torch.float16).max)


def _overflowing(
    built: dict[tuple[str, str], Adapter], names: dict[str, ModuleTarget], kfile: KohyaFile, scale: float
) -> list[str]:
    """File modules whose ΔW (user `scale` applied) is not finite or exceeds `MAX_DELTA` (float16's range)."""
    found = []
    for name in kfile.modules:
        target = names.get(name)
        adapter = built.get((target.component, target.path)) if target is not None else None
        if adapter is None:
            continue
        peak = delta_peak(adapter, MAX_DELTA / max(abs(scale), 1e-30))
        if peak is not None:
            found.append(
                f"{name} ({target.component}.{target.path}): the delta reaches {peak * abs(scale):.3g} at scale "
                f"{scale:g}, beyond float16's range ({MAX_DELTA:g}): Inf in half precision"
            )
    return found


def _mismatch_hints(
    kfile: KohyaFile,
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    text_encoder_2: nn.Module | None,
    unmatched: list[str],
) -> list[str]:
    hints = []
    file_arch = kfile.guess_architecture()
    model_arch = naming.detect_architecture(unet) if unet is not None else None
    if model_arch is None and text_encoder_2 is not None:
        model_arch = "sdxl"
    if file_arch and model_arch and (file_arch == "sdxl") != (model_arch == "sdxl"):
        hints.append(f"the file is for {file_arch.upper()} but the UNet is {model_arch.upper()}-shaped")
    prefixes = Counter(kfile.modules[n].prefix for n in unmatched)
    missing_component = {
        naming.UNET_PREFIX: ("unet", unet),
        naming.LYCORIS_PREFIX: ("unet", unet),
        naming.TE_PREFIX: ("text_encoder", text_encoder),
        naming.TE1_PREFIX: ("text_encoder", text_encoder),
        naming.TE2_PREFIX: ("text_encoder_2", text_encoder_2),
    }
    for prefix, count in prefixes.items():
        component, model = missing_component.get(prefix, (None, None))
        if component and model is None:
            hints.append(f"{count} {prefix}_ modules need {component}=; pass it to load them")
    return hints


def _warn_on_load(kfile: KohyaFile, names: dict[str, ModuleTarget], unet: nn.Module | None) -> None:
    """Report what loads here but would not load (the same way) in ComfyUI/A1111 (docs/kohya-format.md
    section 9)."""
    no_alpha = [
        n
        for n, m in kfile.modules.items()
        if m.alpha is None and m.adapter_class is not None and not m.adapter_class.file_alpha_optional
    ]
    if no_alpha:
        warnings.warn(
            f"{len(no_alpha)} modules have no alpha (e.g. {no_alpha[0]}); using scaling 1.0 (not 1/rank) as "
            "ComfyUI and A1111 do (LyCORIS' own loader would crash on this file).",
            UserWarning,
            stacklevel=3,
        )
    zero_alpha = [n for n, m in kfile.modules.items() if m.alpha == 0 and m.scaling == 0]
    if zero_alpha:
        warnings.warn(
            f"{len(zero_alpha)} modules have alpha 0 (e.g. {zero_alpha[0]}): their delta is zero here and in "
            "ComfyUI/A1111, while LyCORIS treats alpha 0 as alpha = rank.",
            UserWarning,
            stacklevel=3,
        )
    _warn_full_lokr_alpha(kfile)
    raw_te = [n for n in kfile.modules if names[n].style == "te_raw"]
    if raw_te:
        warnings.warn(
            f"{len(raw_te)} text-encoder modules use names without 'text_model_' (e.g. {raw_te[0]}), as LyCORIS/PEFT "
            "write them with transformers 5; ComfyUI and A1111 ignore these keys. Re-export with save_kohya.",
            UserWarning,
            stacklevel=3,
        )
    module_names = list(kfile.modules)
    partial = naming.partial_attention(module_names, naming.TE2_PREFIX)
    if partial:
        warnings.warn(
            f"te2 attention with only some of q/k/v/out_proj ({partial[0]}; {len(partial)} layers): applied here "
            "per projection, but A1111 applies none of them for such layers.",
            UserWarning,
            stacklevel=3,
        )
    if unet is not None and naming.detect_architecture(unet) == "sdxl":
        a1111_drops = [
            n
            for n in module_names
            if names[n].style == "diffusers"
            and ("up_blocks_0_upsamplers_0_conv" in n or "add_embedding" in n)
        ]
        if a1111_drops:
            warnings.warn(
                f"SDXL file with diffusers UNet names: A1111 silently drops {a1111_drops}; SDXL files should use "
                "LDM names (save_kohya writes them).",
                UserWarning,
                stacklevel=3,
            )


def _network_dims(metadata: dict[str, str]) -> set[float]:
    """The network dims a trainer recorded (`ss_network_dim`, and `conv_dim` in `ss_network_args`)."""
    dims = set()
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    values = [metadata.get("ss_network_dim"), args.get("conv_dim") if isinstance(args, dict) else None]
    for value in values:
        try:
            dims.add(float(value))
        except (TypeError, ValueError):
            pass
    return dims


def _warn_full_lokr_alpha(kfile: KohyaFile) -> None:
    """One warning per file for LoKr modules whose halves are both full (no `lokr_w1_a/_b`, `lokr_w2_a/_b`)
    and whose alpha differs from the network dims in the metadata (`ss_network_dim`, `conv_dim`): LyCORIS
    (`lokr.py`: alpha = dim for full halves), ComfyUI (`weight_adapter/lokr.py`) and A1111 (`network_lokr.py`)
    ignore such an alpha and apply scaling 1, and so does loha_diffusion; a trainer that meant alpha / dim gives
    a delta dim / alpha times stronger than intended. Without dims in the metadata nothing tells what the
    trainer meant (LyCORIS' full-matrix files store alpha = dim), so nothing is said."""
    dims = _network_dims(kfile.metadata)
    ignored = [
        m
        for m in kfile.modules.values()
        if m.kind == "lokr"
        and not m.problems
        and m.alpha is not None
        and m.rank is None
        and m.alpha not in dims
    ]
    if not dims or not ignored:
        return
    alphas = ", ".join(f"{a:g}" for a in sorted({m.alpha for m in ignored}))
    shown = ", ".join(m.name for m in ignored[:5]) + (
        f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
    )
    file = f" of {kfile.path}" if kfile.path is not None else ""
    warnings.warn(
        f"{len(ignored)} LoKr module(s){file} have both halves full and alpha {alphas}, not the network dim "
        f"({', '.join(f'{d:g}' for d in sorted(dims))}): {shown}. The alpha is ignored and scaling 1.0 applied, "
        "as LyCORIS, ComfyUI and A1111 do; if the trainer meant alpha / dim, the delta is dim / alpha times "
        "stronger than intended: lower the adapter's scale accordingly.",
        UserWarning,
        stacklevel=4,
    )
