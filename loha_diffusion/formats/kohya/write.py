"""Writing Kohya / LyCORIS files: `build_kohya_state_dict` (the tensors), `save_kohya` (tensors + metadata to a
file) and `write_kohya_file`, the one atomic writer of such files."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from ...adapters import Adapter, LayerSpec
from ...errors import AdapterNotFoundError, KohyaFormatError, format_problems
from ...files import atomic_write_bytes
from ...finite import check_writable
from ...layers import AdapterLayer, check_adapter_name
from .. import naming
from .load import _unwrap
from .metadata import addnet_hash, kohya_metadata
from .read import classify_module

SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
UNET_NAMINGS = ("auto", "diffusers", "ldm")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _adapters_of(model: nn.Module | None, adapter_name: str) -> dict[str, tuple[Adapter, nn.Module]]:
    if model is None:
        return {}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            out[name] = (module.adapters[adapter_name], module.base_layer)
    return out


def build_kohya_state_dict(
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float16,
    unet_naming: str = "auto",
    base_model_version: str | None = None,
    target: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The Kohya tensors of adapter `adapter_name` and facts for the metadata (see `save_kohya` for the names).

    Returns `(state, facts)`. `state`: `"<module>.<tensor>"` -> contiguous CPU tensor in `dtype`: the factors
    under their Kohya names (each kind's `Adapter.file_state_tensors`, in the shapes of docs/kohya-format.md
    sections 3-5) and a 0-dim `alpha` per module. `facts`: `arch` ("sd1", "sd2", "sdxl" or None),
    `unet_naming` ("diffusers", "ldm" or None) and `adapters` (Kohya module name -> `(adapter, base layer)`).
    The architecture comes from the UNet, else from `base_model_version` (so a text-encoder-only SDXL file
    still gets `lora_te1_`). Nothing is changed; the user multiplier (`scale`) is not part of the tensors.

    Raises:
        AdapterNameError: `adapter_name` breaks the name rule (`layers.check_adapter_name`).
        ValueError: `dtype` is not fp32/fp16/bf16, or `unet_naming` is not "auto", "diffusers" or "ldm".
        AdapterNotFoundError: no given model has adapter `adapter_name`.
        KohyaFormatError: everything a loader would reject or silently mis-apply (see `save_kohya`), listed in
            one message.
        NonFiniteError: factors or alphas that are NaN/Inf, or beyond `dtype`'s range (fp16: 65,504), which
            would be written as Inf (`finite.check_writable`; `target` names the file in the message).
    """
    check_adapter_name(adapter_name)
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, not {dtype}.")
    if unet_naming not in UNET_NAMINGS:
        raise ValueError(f"unet_naming must be 'auto', 'diffusers' or 'ldm', not {unet_naming!r}.")
    models = dict(zip(COMPONENTS, (_unwrap(unet), _unwrap(text_encoder), _unwrap(text_encoder_2))))
    arch = _architecture(models["unet"], base_model_version)
    parts = {component: _adapters_of(model, adapter_name) for component, model in models.items()}
    if not any(parts.values()):
        given = [k for k, m in models.items() if m is not None]
        raise AdapterNotFoundError(
            f"No adapter named {adapter_name!r} on {given or 'any model (none given)'}."
        )

    problems: dict[str, list[str]] = {"names": [], "naming": [], "attention": [], "shapes": []}
    hints: list[str] = []
    names, naming_style = _unet_names(models["unet"], parts["unet"], arch, unet_naming, problems, hints)
    two_encoders = models["text_encoder_2"] is not None
    _add_text_encoder_names(names, parts, naming.export_te_prefixes(two_encoders, arch), arch, problems)
    state = _file_state(names, problems)
    if any(problems.values()):
        raise KohyaFormatError(
            format_problems(
                f"Refusing to write adapter {adapter_name!r} as a Kohya file: loaders would reject or mis-apply it.",
                [
                    ("UNet naming problems", problems["naming"]),
                    ("modules without a Kohya name", problems["names"]),
                    (
                        "text-encoder layers with only some of q/k/v/out_proj (A1111 would apply none; "
                        "adapt all four or none)",
                        problems["attention"],
                    ),
                    ("modules whose tensors loaders would read differently", problems["shapes"]),
                ],
                hints,
            )
        )
    check_writable(state, dtype, target or f"adapter {adapter_name!r} as a Kohya file")
    state = {key: tensor.to(dtype).contiguous() for key, tensor in state.items()}
    facts = {"arch": arch, "unet_naming": naming_style, "adapters": names}
    return state, facts


def _architecture(unet: nn.Module | None, base_model_version: str | None) -> str | None:
    """ "sd1", "sd2", "sdxl" from the UNet's shape, else (no UNet) from `base_model_version`, else None."""
    if unet is not None:
        return naming.detect_architecture(unet)
    if not base_model_version:
        return None
    if base_model_version.startswith("sdxl"):
        return "sdxl"
    return "sd2" if base_model_version.startswith("sd_v2") else "sd1"


def _unet_names(
    unet: nn.Module | None,
    adapters: dict[str, tuple[Adapter, nn.Module]],
    arch: str | None,
    unet_naming: str,
    problems: dict[str, list[str]],
    hints: list[str],
) -> tuple[dict[str, tuple[Adapter, nn.Module]], str | None]:
    """Kohya name -> (adapter, layer) for the UNet's adapters, and the naming style used; problems and hints
    are appended to, the naming style warnings given."""
    names: dict[str, tuple[Adapter, nn.Module]] = {}
    if not adapters:
        return names, None
    naming_style = unet_naming if unet_naming != "auto" else naming.default_unet_naming(arch)
    if naming_style is None:
        problems["naming"].append(
            f"the UNet is not SD1/SD2/SDXL-shaped (blocks {list(unet.config.get('down_block_types', []))}, "
            f"layers_per_block {unet.config.get('layers_per_block')}), so there is no standard Kohya naming for it"
        )
        hints.append(
            "pass unet_naming='diffusers' to write diffusers module names (ComfyUI and LyCORIS map them by the "
            "model config; A1111 assumes the SD layout and may apply them to wrong layers), or unet_naming='ldm'"
        )
        return names, None
    if arch is None and naming_style == "diffusers":
        warnings.warn(
            "Writing diffusers names for a UNet that is not SD1/SD2/SDXL-shaped: ComfyUI and LyCORIS load "
            "them, A1111 may apply them to the wrong layers.",
            UserWarning,
            stacklevel=4,
        )
    if arch == "sdxl" and naming_style == "diffusers":
        warnings.warn(
            "Writing diffusers names for an SDXL UNet: A1111 drops up_blocks_0_upsamplers_0_conv and "
            "add_embedding keys of such files; the default (LDM names) loads everywhere.",
            UserWarning,
            stacklevel=4,
        )
    layout = naming.unet_layout(unet)
    for path, item in adapters.items():
        try:
            names[naming.unet_kohya_name(path, naming_style, layout)] = item
        except ValueError as err:
            problems["names"].append(str(err))
    return names, naming_style


def _add_text_encoder_names(
    names: dict[str, tuple[Adapter, nn.Module]],
    parts: dict[str, dict[str, tuple[Adapter, nn.Module]]],
    prefixes: tuple[str, str],
    arch: str | None,
    problems: dict[str, list[str]],
) -> None:
    """Add the text encoders' adapters to `names` under `prefixes` (text_encoder, text_encoder_2); record
    clashes and partial OpenCLIP attention, warn about names ComfyUI and A1111 ignore."""
    te_prefix, te2_prefix = prefixes
    for component, prefix in (("text_encoder", te_prefix), ("text_encoder_2", te2_prefix)):
        for path, item in parts[component].items():
            name = naming.text_encoder_kohya_name(path, prefix)
            if name in names:
                problems["names"].append(f"{component}.{path} and another module both get the name {name}")
            names[name] = item
    nonportable = [
        n for n in names if not n.startswith(naming.UNET_PREFIX) and not naming.comfyui_maps_te_name(n)
    ]
    if nonportable:
        warnings.warn(
            f"{len(nonportable)} text-encoder modules are not among q/k/v/out_proj, fc1, fc2 of the encoder layers "
            f"(e.g. {nonportable[0]}); LyCORIS loads them, ComfyUI and A1111 ignore them.",
            UserWarning,
            stacklevel=4,
        )
    # A1111 applies OpenCLIP attention (SDXL te2, SD2's text encoder) only with all of q, k, v and out_proj.
    problems["attention"] += naming.partial_attention(names, te2_prefix)
    if arch == "sd2":
        problems["attention"] += naming.partial_attention(names, te_prefix)


def _file_state(
    names: dict[str, tuple[Adapter, nn.Module]], problems: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """The file tensors of every named adapter on the CPU, plus a 0-dim alpha each, in their own dtype (fp32;
    the caller checks and casts them); each module is read back as loaders will read it (rank, CP layout,
    shapes) and what differs is recorded in `problems`."""
    state: dict[str, torch.Tensor] = {}
    for name, (adapter, layer) in names.items():
        tensors = adapter.file_state_tensors()
        record = classify_module(name, tensors)
        record.alpha = adapter.alpha
        try:
            record.to_adapter(LayerSpec.from_module(layer))
        except ValueError as err:
            problems["shapes"].append(f"{name}: {err}")
        for tensor_name, tensor in tensors.items():
            state[f"{name}.{tensor_name}"] = tensor.to(device="cpu")
        state[f"{name}.alpha"] = torch.tensor(float(adapter.alpha), dtype=torch.float32)
    return state


def save_kohya(
    path: str | os.PathLike,
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float16,
    base_model_version: str | None = None,
    unet_naming: str = "auto",
    output_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    training_info: Mapping[str, Any] | None = None,
    model_hash: bool = True,
) -> Path:
    """Write adapter `adapter_name` of a UNet and/or text encoders as one Kohya/LyCORIS `.safetensors` file
    (atomically, through `write_kohya_file`) and return its path.

    Names: SD1/SD2 UNet `lora_unet_` + diffusers path, SDXL `lora_unet_` + LDM path (`unet_naming` overrides),
    text encoders `lora_te_` (one) or `lora_te1_`/`lora_te2_` + `text_model_encoder_layers_N_...`. Tensors: LoHa
    `hada_*`, LoRA `lora_down/up(/mid).weight`, LoKr `lokr_*` in the shapes of docs/kohya-format.md sections 3-5,
    and a 0-dim alpha each, all in `dtype` (fp32, fp16 or bf16). Metadata: see `kohya_metadata`;
    `base_model_version` (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0) defaults to the UNet's. `sshs_model_hash` is
    A1111's hash of the tensor bytes. The user multiplier (`adapter.scale`) is not part of the file.

    Everything is checked before anything is written. Refused, in one error listing all problems: a non-SD UNet
    without an explicit `unet_naming`, te2 (SD2: te) attention with only some of q/k/v/out, and tensors loaders
    would misread.

    Raises:
        AdapterNameError: `adapter_name` breaks the name rule (`layers.check_adapter_name`).
        ValueError: an unsupported `dtype` or `unet_naming`, or an unknown `training_info` key.
        AdapterNotFoundError: no given model has adapter `adapter_name`.
        KohyaFormatError: what loaders would reject or mis-apply (see above).
        NonFiniteError: NaN/Inf factors or alphas, or values beyond `dtype`'s range (fp16: 65,504), named by
            module; save in float32/bfloat16 or from an earlier checkpoint (`finite.check_writable`).
        OutputWriteError: no space left, or no permission (the previous file is unchanged).
        OSError: the file cannot be written.
    """
    check_adapter_name(adapter_name)
    path = Path(path)
    state, facts = build_kohya_state_dict(
        unet=unet,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        adapter_name=adapter_name,
        dtype=dtype,
        unet_naming=unet_naming,
        base_model_version=base_model_version,
        target=str(path),
    )
    meta = kohya_metadata(
        facts,
        base_model_version=base_model_version,
        output_name=output_name or path.stem,
        training_info=training_info,
        metadata=metadata,
    )
    return write_kohya_file(path, state, meta, model_hash=model_hash)


def write_kohya_file(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    model_hash: bool = True,
) -> Path:
    """Write a Kohya/LyCORIS `.safetensors` file: the one writer every path that writes such a file uses
    (`save_kohya`, `loha-diffusion convert`).

    `state_dict` holds contiguous CPU tensors under Kohya keys; `metadata` string values. With `model_hash`,
    `sshs_model_hash` is set to A1111's hash of the tensor bytes (a stale `sshs_legacy_hash`, which depends on
    the old bytes, is dropped). The bytes are written atomically (`files.atomic_write_bytes`): an interrupted
    write never leaves a truncated adapter, and the file gets a normal file's mode. Returns `path`.

    Raises:
        NonFiniteError: a tensor holds NaN or Inf (e.g. from casting to fp16), named by module.
        OutputWriteError: no space left, or no permission (the previous file is unchanged).
        OSError: another error of the filesystem.
    """
    path = Path(path)
    check_writable(state_dict, None, str(path))
    meta = dict(metadata)
    meta.pop("sshs_legacy_hash", None)
    if model_hash:
        # The data section after the header does not depend on the metadata, so hash it first.
        meta["sshs_model_hash"] = addnet_hash(safetensors_save(dict(state_dict)))
    data = safetensors_save(dict(state_dict), metadata=meta)
    return atomic_write_bytes(path, data)
