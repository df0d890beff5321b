"""PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`) for LoHa and LoRA, and
conversions between them and Kohya files.

The directory is what `PeftModel.save_pretrained` writes: tensor keys `base_model.model.<module path>.<tensor>`
(PEFT strips that prefix again when loading into a bare model with `set_peft_model_state_dict`), LoHa tensors
`hada_*` and LoRA tensors `lora_A.weight`/`lora_B.weight` exactly as ours, and per-module rank/alpha in
`rank_pattern`/`alpha_pattern` (PEFT keeps no alpha tensor).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import Adapter
from ..config import CONFIG_NAME, AdapterConfig, LoHaConfig, LoRAConfig
from ..model import (
    LoHaModel,
    adapter_layers,
    adapter_names,
    delete_adapter,
    get_adapter_state_dict,
    inject_adapter,
    set_adapter_scale,
    set_adapter_state_dict,
)
from .kohya import load_kohya, save_kohya

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# PeftConfig LoRA fields with a meaning we do not implement: (field, the value that means "off").
_LORA_UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
    "trainable_token_indices": None,
}
_LORA_FIELDS = {
    "r": "r",
    "lora_alpha": "alpha",
    "target_modules": "target_modules",
    "exclude_modules": "exclude_modules",
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
    "modules_to_save": "modules_to_save",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
}


class PeftFormatError(ValueError):
    """An adapter cannot be written in, or read from, PEFT's layout; the message says why and what to do."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, LoHaModel) else model


def _pattern_key(path: str) -> str:
    # A full module path as a PEFT pattern key: dots escaped, matched as a dot-boundary suffix by get_pattern_key.
    return re.escape(path)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def adapter_config_from_model(model: nn.Module, adapter_name: str = "default") -> LoHaConfig | LoRAConfig:
    """A config that recreates adapter `adapter_name` exactly: its modules as full-path `target_modules`, the most
    common rank/alpha as `r`/`alpha`, every other module's rank/alpha in `rank_pattern`/`alpha_pattern`.

    Works for adapters from `inject_adapter` and from `load_kohya` alike. Dropouts and `init_weights` come from the
    model's stored config when there is one. Raises `PeftFormatError` for what a single PEFT config cannot
    express (LoKr, LoRA Tucker cores, CP on only some k×k convs, mixed kinds)."""
    model = _unwrap(model)
    adapters: dict[str, Adapter] = {
        path: layer.adapters[adapter_name]
        for path, layer in adapter_layers(model).items()
        if adapter_name in layer.adapters
    }
    if not adapters:
        raise PeftFormatError(
            f"The model has no adapter named {adapter_name!r}; it has {adapter_names(model)}."
        )
    kinds = Counter(a.kind for a in adapters.values())
    if len(kinds) > 1 or next(iter(kinds)) not in ("loha", "lora"):
        raise PeftFormatError(
            f"Adapter {adapter_name!r} has modules of kinds {dict(kinds)}; a PEFT directory holds one LoHa or LoRA "
            "adapter. Save LoKr or mixed adapters as a Kohya file (save_kohya) instead."
        )
    kind = next(iter(kinds))
    cp = {path: bool(getattr(a, "is_cp", False)) for path, a in adapters.items() if a.spec.kernel_numel > 1}
    if kind == "lora" and any(cp.values()):
        raise PeftFormatError(
            "LoRA with Tucker cores (lora_mid) has no PEFT equivalent; save it as a Kohya file (save_kohya)."
        )
    if len(set(cp.values())) > 1:
        flat = sorted(p for p, is_cp in cp.items() if not is_cp)
        raise PeftFormatError(
            f"Only some k×k convs use the CP form (flat: {flat[:3]}...); PEFT's use_effective_conv2d applies to all. "
            "Save this adapter as a Kohya file (save_kohya) instead."
        )
    stored = getattr(model, "adapter_configs", {}).get(adapter_name)
    r = _most_common([a.r for a in adapters.values()])
    alpha = _most_common([a.alpha for a in adapters.values()])
    fields: dict[str, Any] = {
        "r": r,
        "alpha": alpha,
        "target_modules": sorted(adapters),
        "use_effective_conv2d": any(cp.values()),
        "rank_pattern": {_pattern_key(p): a.r for p, a in adapters.items() if a.r != r},
        "alpha_pattern": {_pattern_key(p): a.alpha for p, a in adapters.items() if a.alpha != alpha},
        "rank_dropout": _most_common([a.rank_dropout for a in adapters.values()]),
        "module_dropout": _most_common([a.module_dropout for a in adapters.values()]),
    }
    if stored is not None:
        fields["init_weights"] = stored.init_weights
        fields["modules_to_save"] = stored.modules_to_save
    config_cls = LoHaConfig if kind == "loha" else LoRAConfig
    return config_cls(**fields)


def peft_config_dict(config: AdapterConfig) -> dict[str, Any]:
    """`config` as PEFT's `adapter_config.json` dict: LoHa as is; LoRA with PEFT's names (`lora_alpha`, ...)."""
    data = config.to_dict()
    if isinstance(config, LoHaConfig):
        return data
    if config.use_effective_conv2d:
        raise PeftFormatError("LoRA with use_effective_conv2d (Tucker lora_mid) has no PEFT equivalent.")
    if config.rank_dropout or config.module_dropout:
        warnings.warn(
            "PEFT's LoRA has no rank_dropout/module_dropout (only lora_dropout, on the input); they are not saved. "
            "They only affect training.",
            UserWarning,
            stacklevel=3,
        )
    out = {peft_key: data[ours] for peft_key, ours in _LORA_FIELDS.items()}
    out.update(peft_type="LORA", init_lora_weights=bool(config.init_weights), lora_dropout=0.0)
    out.update({k: v for k, v in _LORA_UNSUPPORTED.items()})
    return out


def config_from_peft_dict(data: Mapping[str, Any]) -> LoHaConfig | LoRAConfig:
    """Our config from a PEFT `adapter_config.json` dict (LOHA or LORA); PEFT features we do not implement
    (DoRA, rsLoRA, bias training, ...) raise `PeftFormatError` naming them."""
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type == "LOHA":
        return LoHaConfig.from_dict(dict(data))
    if peft_type != "LORA":
        raise PeftFormatError(
            f"Unsupported PEFT adapter type {data.get('peft_type')!r}; LOHA and LORA are supported."
        )
    used = [
        f"{k}={data[k]!r}"
        for k, off in _LORA_UNSUPPORTED.items()
        if data.get(k, off) not in (off, None, [], {})
    ]
    if used:
        raise PeftFormatError(
            f"This PEFT LoRA uses {', '.join(used)}, which loha_diffusion does not implement."
        )
    if data.get("lora_dropout"):
        warnings.warn(
            f"PEFT lora_dropout={data['lora_dropout']} is not applied (loha_diffusion has rank/module dropout); "
            "it only affects training.",
            UserWarning,
            stacklevel=3,
        )
    fields = {
        ours: data[peft_key] for peft_key, ours in _LORA_FIELDS.items() if data.get(peft_key) is not None
    }
    fields["init_weights"] = data.get("init_lora_weights", True) is not False
    return LoRAConfig(**fields)


def _save_one(directory: Path, model: nn.Module, adapter_name: str, dtype: torch.dtype | None) -> Path:
    config_dict = peft_config_dict(adapter_config_from_model(model, adapter_name))
    state = {
        PEFT_PREFIX + key: (tensor if dtype is None else tensor.to(dtype)).detach().cpu().contiguous()
        for key, tensor in get_adapter_state_dict(model, adapter_name).items()
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return directory


def save_peft(
    directory: str | os.PathLike,
    model: nn.Module | None = None,
    adapter_name: str = "default",
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write adapter `adapter_name` as PEFT directories that `PeftModel.from_pretrained` and
    `inject_adapter_in_model` + `set_peft_model_state_dict` load.

    With `model` (a UNet or a text encoder) the adapter goes into `directory` itself; with `unet=`,
    `text_encoder=`, `text_encoder_2=` into `directory/<component>/` for each of them that has the adapter.
    Tensors keep their dtype unless `dtype` is given; keys are `base_model.model.<path>.<tensor>`.
    Everything is checked before anything is written."""
    directory = Path(directory)
    components = _given(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    if (model is None) == (not components):
        raise ValueError("save_peft takes either one model or unet=/text_encoder=/text_encoder_2=, not both.")
    if model is not None:
        targets = {directory: _unwrap(model)}
    else:
        targets = {directory / c: m for c, m in components.items() if adapter_name in adapter_names(m)}
        if not targets:
            raise PeftFormatError(f"No adapter named {adapter_name!r} on {sorted(components)}.")
    for target_model in targets.values():
        peft_config_dict(adapter_config_from_model(target_model, adapter_name))  # raises before any write
    for target_dir, target_model in targets.items():
        _save_one(target_dir, target_model, adapter_name, dtype)
    return directory


def read_peft(directory: str | os.PathLike) -> tuple[LoHaConfig | LoRAConfig, dict[str, torch.Tensor]]:
    """The config and state dict (keys without PEFT's `base_model.model.` prefix) of a PEFT directory."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a PEFT adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise PeftFormatError(f"{config_path} is not valid JSON: {err}") from None
    config = config_from_peft_dict(data)
    state = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in load_file(str(weights_path)).items()}
    return config, state


def _load_one(directory: Path, model: nn.Module, adapter_name: str, scale: float) -> None:
    config, state = read_peft(directory)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    inject_adapter(model, config, adapter_name)
    try:
        set_adapter_state_dict(model, state, adapter_name)
    except ValueError as err:
        delete_adapter(model, adapter_name)  # leave the model as it was
        for param, flag in flags:
            param.requires_grad_(flag)
        raise PeftFormatError(f"{directory} does not fit {type(model).__name__}:\n{err}") from None
    set_adapter_scale(model, adapter_name, scale)


def _module_path(key: str) -> str:
    """The module part of a state-dict key (`a.b.lora_A.weight` -> `a.b`, `a.b.hada_w1_a` -> `a.b`)."""
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_mid.weight"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    return key.rpartition(".")[0]


def _owner(directory: Path, components: Mapping[str, nn.Module]) -> str:
    """The one component that has a module for every tensor of a single PEFT adapter folder."""
    _, state = read_peft(directory)
    paths = {_module_path(key) for key in state}
    owners = [c for c, m in components.items() if paths <= {name for name, _ in m.named_modules()}]
    if len(owners) != 1:
        raise PeftFormatError(
            f"Cannot tell which of {sorted(components)} the PEFT adapter in {directory} belongs to "
            f"({owners or 'none'} have all its modules); pass that model alone, or use a folder with "
            "unet/, text_encoder/, text_encoder_2/ subfolders."
        )
    return owners[0]


def load_peft(
    directory: str | os.PathLike,
    model: nn.Module | None = None,
    adapter_name: str = "default",
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    scale: float = 1.0,
) -> str:
    """Load a PEFT LoHa/LoRA adapter as `adapter_name` (user scale `scale`) and return the name.

    `directory` holds `adapter_config.json` + `adapter_model.safetensors` for `model`, or subfolders `unet/`,
    `text_encoder/`, `text_encoder_2/` for the models given by keyword (a single adapter folder with keywords goes
    to the one model that has all its modules). The config's targeting selects modules exactly as PEFT does; the
    tensors must match one to one, else a `PeftFormatError` is raised and every model is left as it was."""
    directory = Path(directory)
    components = _given(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    if (model is None) == (not components):
        raise ValueError("load_peft takes either one model or unet=/text_encoder=/text_encoder_2=, not both.")
    if model is not None:
        plan = {directory: _unwrap(model)}
    elif (directory / CONFIG_NAME).is_file():
        plan = {directory: components[_owner(directory, components)]}
    else:
        found = {c: directory / c for c in COMPONENTS if (directory / c / CONFIG_NAME).is_file()}
        if not found:
            raise FileNotFoundError(
                f"{directory} holds no PEFT adapter ({CONFIG_NAME} in it or in {', '.join(COMPONENTS)} subfolders)."
            )
        missing = [c for c in found if c not in components]
        if missing:
            raise ValueError(f"{directory} has PEFT adapters for {missing}; pass those models too.")
        plan = {path: components[c] for c, path in found.items()}
    taken = [type(m).__name__ for m in plan.values() if adapter_name in adapter_names(m)]
    if taken:
        raise ValueError(
            f"Adapter name {adapter_name!r} is already used on {taken}; pick another adapter_name."
        )
    done: list[nn.Module] = []
    try:
        for path, target in plan.items():
            _load_one(path, target, adapter_name, scale)
            done.append(target)
    except Exception:
        for target in done:  # all or nothing
            delete_adapter(target, adapter_name)
        raise
    return adapter_name


def _given(**models: nn.Module | None) -> dict[str, nn.Module]:
    return {k: _unwrap(m) for k, m in models.items() if m is not None}


def kohya_to_peft(
    kohya_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> dict[str, Path]:
    """Convert a Kohya/LyCORIS LoHa or LoRA file into PEFT directories `out_dir/<component>` (one per model
    with modules in the file). The models give names and shapes (their weights do not matter) and are left
    as they were afterwards."""
    models = _given(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    name = _temporary_name(models)
    with _keep_requires_grad(*models.values()):
        load_kohya(kohya_path, adapter_name=name, **models)
        try:
            save_peft(out_dir, adapter_name=name, **models)
            return {c: Path(out_dir) / c for c, m in models.items() if name in adapter_names(m)}
        finally:
            _drop_adapter(models, name)


def peft_to_kohya(
    peft_dirs: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    **save_kohya_kwargs: Any,
) -> Path:
    """Convert PEFT adapter folders (what `load_peft` reads with these models: `unet/`, `text_encoder/`,
    `text_encoder_2/` subfolders as `kohya_to_peft` writes them, or one adapter folder) into one Kohya
    `.safetensors` file. Extra keyword arguments go to `save_kohya` (dtype, metadata, ...)."""
    models = _given(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    name = _temporary_name(models)
    with _keep_requires_grad(*models.values()):
        load_peft(peft_dirs, adapter_name=name, **models)
        try:
            return save_kohya(out_path, adapter_name=name, **models, **save_kohya_kwargs)
        finally:
            _drop_adapter(models, name)


def _drop_adapter(models: Mapping[str, nn.Module], name: str) -> None:
    for model in models.values():
        if name in adapter_names(model):
            delete_adapter(model, name)


def _temporary_name(models: Mapping[str, nn.Module]) -> str:
    """An adapter name no given model uses yet."""
    taken = {n for m in models.values() for n in adapter_names(m)}
    index = 0
    while f"convert_{index}" in taken:
        index += 1
    return f"convert_{index}"


@contextlib.contextmanager
def _keep_requires_grad(*models: nn.Module):
    """Injecting freezes the base model; restore each parameter's `requires_grad` for temporary adapters."""
    flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
