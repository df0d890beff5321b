"""PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`) for LoHa and LoRA, and
conversions between them and Kohya files.

The directory is what `PeftModel.save_pretrained` writes: tensor keys `base_model.model.<module path>.<tensor>`
(PEFT strips that prefix again when loading into a bare model with `set_peft_model_state_dict`), LoHa tensors
`hada_*` and LoRA tensors `lora_A.weight`/`lora_B.weight` exactly as ours, and per-module rank/alpha in
`rank_pattern`/`alpha_pattern` (PEFT keeps no alpha tensor); docs/kohya-format.md compares the two layouts.
Which kinds a PEFT directory holds, and how their configs translate, is the `_PEFT_KINDS` table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import Adapter, LayerSpec, adapter_class, state_tensor_names
from ..adapters.base import compare_tensors
from ..config import CONFIG_NAME, AdapterConfig, LoHaConfig, LoRAConfig
from ..errors import (
    AdapterFileNotFoundError,
    AdapterNameError,
    AdapterNotFoundError,
    LoHaDiffusionError,
    PeftFormatError,
    format_problems,
)
from ..files import atomic_path, atomic_write_text
from ..finite import check_writable, non_finite_modules
from ..layers import check_adapter_name
from ..model import (
    adapter_layers,
    adapter_names,
    delete_adapter,
    get_adapter_state_dict,
    inject_adapter,
    set_adapter_scale,
    set_adapter_state_dict,
)
from ..targeting import find_target_modules
from ..utils import most_common
from .kohya import load_kohya, save_kohya
from .kohya.load import MAX_DELTA, _unwrap, delta_peak
from .kohya.read import MAX_ALPHA, read_safetensors

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


def _pattern_key(path: str) -> str:
    # A full module path as a PEFT pattern key: dots escaped, matched as a dot-boundary suffix by get_pattern_key.
    return re.escape(path)


def adapter_config_from_model(model: nn.Module, adapter_name: str = "default") -> LoHaConfig | LoRAConfig:
    """A config that recreates adapter `adapter_name` exactly: its modules as full-path `target_modules`, the most
    common rank/alpha as `r`/`alpha`, every other module's rank/alpha in `rank_pattern`/`alpha_pattern`.

    Works for adapters from `inject_adapter` and from `load_kohya` alike. Dropouts and `init_weights` come from the
    model's stored config when there is one.

    Raises:
        AdapterNameError: `adapter_name` breaks the name rule (`layers.check_adapter_name`).
        AdapterNotFoundError: the model has no adapter `adapter_name`.
        PeftFormatError: what a single PEFT config cannot express (LoKr, LoRA Tucker cores, CP on only some k×k
            convs, mixed kinds).
    """
    check_adapter_name(adapter_name)
    model = _unwrap(model)
    adapters: dict[str, Adapter] = {
        path: layer.adapters[adapter_name]
        for path, layer in adapter_layers(model).items()
        if adapter_name in layer.adapters
    }
    if not adapters:
        raise AdapterNotFoundError(
            f"The model has no adapter named {adapter_name!r}; it has {adapter_names(model)}."
        )
    kinds = Counter(a.kind for a in adapters.values())
    peft_kind = _PEFT_KINDS.get(next(iter(kinds)))
    if len(kinds) > 1 or peft_kind is None:
        held = " or ".join(adapter_class(k).title for k in _PEFT_KINDS)
        raise PeftFormatError(
            f"Adapter {adapter_name!r} has modules of kinds {dict(kinds)}; a PEFT directory holds one {held} "
            "adapter. Save other kinds or mixed adapters as a Kohya file (save_kohya) instead."
        )
    cp = {path: bool(getattr(a, "is_cp", False)) for path, a in adapters.items() if a.spec.kernel_numel > 1}
    if any(cp.values()) and not peft_kind.has_cp:
        raise PeftFormatError(
            f"{peft_kind.title} with CP/Tucker cores ({peft_kind.cp_tensors}) has no PEFT equivalent; save it as a "
            "Kohya file (save_kohya)."
        )
    if len(set(cp.values())) > 1:
        flat = sorted(p for p, is_cp in cp.items() if not is_cp)
        raise PeftFormatError(
            f"Only some k×k convs use the CP form (flat: {flat[:3]}...); PEFT's use_effective_conv2d applies to all. "
            "Save this adapter as a Kohya file (save_kohya) instead."
        )
    stored = getattr(model, "adapter_configs", {}).get(adapter_name)
    r = most_common([a.r for a in adapters.values()])
    alpha = most_common([a.alpha for a in adapters.values()])
    fields: dict[str, Any] = {
        "r": r,
        "alpha": alpha,
        "target_modules": sorted(adapters),
        "use_effective_conv2d": any(cp.values()),
        "rank_pattern": {_pattern_key(p): a.r for p, a in adapters.items() if a.r != r},
        "alpha_pattern": {_pattern_key(p): a.alpha for p, a in adapters.items() if a.alpha != alpha},
        "rank_dropout": most_common([a.rank_dropout for a in adapters.values()]),
        "module_dropout": most_common([a.module_dropout for a in adapters.values()]),
    }
    if stored is not None:
        fields["init_weights"] = stored.init_weights
        fields["modules_to_save"] = stored.modules_to_save
    return peft_kind.config_cls(**fields)


def peft_config_dict(config: AdapterConfig) -> dict[str, Any]:
    """`config` as PEFT's `adapter_config.json` dict: LoHa as is; LoRA with PEFT's names (`lora_alpha`, ...).

    Raises:
        PeftFormatError: a config kind PEFT directories do not hold here, or a LoRA with `use_effective_conv2d`
            (Tucker `lora_mid`), which PEFT's LoRA has no equivalent of.
    """
    peft_kind = _PEFT_KINDS.get(config.kind)
    if peft_kind is None:
        raise PeftFormatError(f"A {type(config).__name__} cannot be written as a PEFT adapter_config.json.")
    return peft_kind.to_peft(config)


def config_from_peft_dict(data: Mapping[str, Any]) -> LoHaConfig | LoRAConfig:
    """Our config from a PEFT `adapter_config.json` dict (LOHA or LORA).

    Raises:
        PeftFormatError: another `peft_type`, or PEFT features we do not implement (DoRA, rsLoRA, bias
            training, ...), named in the message.
        ConfigError: a value our config refuses (see `AdapterConfig`).
    """
    peft_kind = _BY_PEFT_TYPE.get(str(data.get("peft_type", "")).upper())
    if peft_kind is None:
        raise PeftFormatError(
            f"Unsupported PEFT adapter type {data.get('peft_type')!r}; "
            f"{' and '.join(_BY_PEFT_TYPE)} are supported."
        )
    return peft_kind.from_peft(data)


def _loha_to_peft(config: AdapterConfig) -> dict[str, Any]:
    # PEFT's LoHaConfig uses our field names (r, alpha, rank_dropout, module_dropout, use_effective_conv2d, ...).
    return config.to_dict()


def _loha_from_peft(data: Mapping[str, Any]) -> AdapterConfig:
    return LoHaConfig.from_dict(dict(data))


def _lora_to_peft(config: AdapterConfig) -> dict[str, Any]:
    if config.use_effective_conv2d:
        raise PeftFormatError("LoRA with use_effective_conv2d (Tucker lora_mid) has no PEFT equivalent.")
    if config.rank_dropout or config.module_dropout:
        warnings.warn(
            "PEFT's LoRA has no rank_dropout/module_dropout (only lora_dropout, on the input); they are not saved. "
            "They only affect training.",
            UserWarning,
            stacklevel=4,
        )
    data = config.to_dict()
    out = {peft_key: data[ours] for peft_key, ours in _LORA_FIELDS.items()}
    out.update(peft_type="LORA", init_lora_weights=bool(config.init_weights), lora_dropout=0.0)
    out.update({k: v for k, v in _LORA_UNSUPPORTED.items()})
    return out


def _lora_from_peft(data: Mapping[str, Any]) -> AdapterConfig:
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
            stacklevel=4,
        )
    fields = {
        ours: data[peft_key] for peft_key, ours in _LORA_FIELDS.items() if data.get(peft_key) is not None
    }
    fields["init_weights"] = data.get("init_lora_weights", True) is not False
    return LoRAConfig(**fields)


@dataclass(frozen=True)
class _PeftKind:
    """How the adapters of one config kind are written in and read from PEFT's `adapter_config.json`."""

    peft_type: str  # PEFT's `peft_type`
    config_cls: type[AdapterConfig]
    has_cp: bool  # PEFT's config of this type can express the CP/Tucker form (`use_effective_conv2d`)
    to_peft: Callable[[AdapterConfig], dict[str, Any]]
    from_peft: Callable[[Mapping[str, Any]], AdapterConfig]

    @property
    def title(self) -> str:
        return adapter_class(self.config_cls.kind).title

    @property
    def cp_tensors(self) -> str:
        return ", ".join(adapter_class(self.config_cls.kind).cp_file_tensors)


# The kinds a PEFT directory holds here, by config kind ("loha", "lora"), and by PEFT type ("LOHA", "LORA").
_PEFT_KINDS: dict[str, _PeftKind] = {
    kind.config_cls.kind: kind
    for kind in (
        _PeftKind("LOHA", LoHaConfig, True, _loha_to_peft, _loha_from_peft),
        _PeftKind("LORA", LoRAConfig, False, _lora_to_peft, _lora_from_peft),
    )
}
_BY_PEFT_TYPE = {kind.peft_type: kind for kind in _PEFT_KINDS.values()}


def _save_one(directory: Path, model: nn.Module, adapter_name: str, dtype: torch.dtype | None) -> Path:
    """Write one adapter folder: the weights, then the config (whose presence marks an adapter folder), each
    atomically (`files.atomic_path`, `files.atomic_write_text`): a kill leaves the old file or the new one."""
    config_dict = peft_config_dict(adapter_config_from_model(model, adapter_name))
    state = {
        PEFT_PREFIX + key: (tensor if dtype is None else tensor.to(dtype)).detach().cpu().contiguous()
        for key, tensor in get_adapter_state_dict(model, adapter_name).items()
    }
    needed = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_path(directory / WEIGHTS_NAME, needed=needed) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
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
    Files: `adapter_model.safetensors` with the factors under `base_model.model.<path>.<tensor>` (LoHa `hada_*`,
    LoRA `lora_A.weight (r, in[, kh, kw])` / `lora_B.weight (out, r[, 1, 1])`), on the CPU, in their dtype (fp32
    after training) unless `dtype` is given; `adapter_config.json` from `adapter_config_from_model` (no alpha
    tensor: alpha is in the config). Returns `directory`. Everything is checked before anything is written; each
    file is written atomically (a kill or a full disk leaves the previous file, never a torn one).

    Raises:
        AdapterNameError: `adapter_name` breaks the name rule (`layers.check_adapter_name`).
        ValueError: both or neither of `model` and the keyword models are given.
        AdapterNotFoundError: no given model has adapter `adapter_name`.
        PeftFormatError: an adapter a PEFT config cannot express (see `adapter_config_from_model`).
        NonFiniteError: NaN/Inf factors or alphas, or (with `dtype`) values beyond its range (fp16: 65,504),
            named by module; nothing is written (`finite.check_writable`).
        OutputWriteError: no space left, or no permission (the previous files are unchanged).
        OSError: the files cannot be written.
    """
    check_adapter_name(adapter_name)
    directory = Path(directory)
    components = _given(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    if (model is None) == (not components):
        raise ValueError("save_peft takes either one model or unet=/text_encoder=/text_encoder_2=, not both.")
    if model is not None:
        targets = {directory: _unwrap(model)}
    else:
        targets = {directory / c: m for c, m in components.items() if adapter_name in adapter_names(m)}
        if not targets:
            raise AdapterNotFoundError(f"No adapter named {adapter_name!r} on {sorted(components)}.")
    for target_dir, target_model in targets.items():
        config = adapter_config_from_model(target_model, adapter_name)
        peft_config_dict(config)  # raises before any write
        values = dict(get_adapter_state_dict(target_model, adapter_name))
        values.update({f"{p}.alpha": torch.tensor(float(a)) for p, a in config.alpha_pattern.items()})
        values["alpha"] = torch.tensor(float(config.alpha))
        check_writable(values, dtype, str(target_dir / WEIGHTS_NAME))
    for target_dir, target_model in targets.items():
        _save_one(target_dir, target_model, adapter_name, dtype)
    return directory


def read_peft(directory: str | os.PathLike) -> tuple[LoHaConfig | LoRAConfig, dict[str, torch.Tensor]]:
    """The config and state dict of a PEFT directory: keys without PEFT's `base_model.model.` prefix
    (`<module path>.<tensor>`), tensors as stored (file dtype, CPU). Every field of `adapter_config.json` is
    checked for its type and range first (`peft_config_problems`), so no value reaches a constructor or a regex
    unchecked.

    Raises:
        AdapterFileNotFoundError: `adapter_config.json` or `adapter_model.safetensors` is missing (also a
            `FileNotFoundError`); the message names the missing file.
        PeftFormatError: the config is not UTF-8 JSON, not an object, has fields of the wrong type or range
            (all listed), or is not a config we can use (`config_from_peft_dict`); the weights file is empty,
            truncated or corrupt. The message names the file.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise AdapterFileNotFoundError(
            f"{directory} is not a complete PEFT adapter folder: {' and '.join(missing)} missing (it needs "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}, as PeftModel.save_pretrained writes them)."
        )
    config = _read_peft_config(config_path)
    state, _ = read_safetensors(weights_path, PeftFormatError)
    return config, {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in state.items()}


def _read_peft_config(config_path: Path) -> LoHaConfig | LoRAConfig:
    """The config of `adapter_config.json` at `config_path`, every field checked first."""
    try:
        data = json.loads(config_path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise PeftFormatError(f"{config_path} is not UTF-8 text ({err}); re-save it as UTF-8 JSON.") from None
    except json.JSONDecodeError as err:
        raise PeftFormatError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise PeftFormatError(f"{config_path} must hold a JSON object, not a {type(data).__name__}.")
    problems = peft_config_problems(data)
    if problems:
        raise PeftFormatError(
            format_problems(
                f"{config_path} has invalid fields; nothing was loaded.",
                [("invalid fields", problems)],
                ["fix these fields, or save the adapter again with PeftModel.save_pretrained / save_peft"],
            )
        )
    try:
        return config_from_peft_dict(data)
    except (LoHaDiffusionError, TypeError, ValueError) as err:
        # The fields were checked above; a refusal left to the config's own checks still names the file.
        raise PeftFormatError(f"{config_path}: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _alpha_problem(key: str, value: Any) -> str | None:
    if not _is_number(value):
        return f"{key} must be a number, got {value!r}"
    if not math.isfinite(value) or value < 0:
        return f"{key} must be a finite number >= 0, got {value!r}"
    if value > MAX_ALPHA:
        return f"{key} {value:.3g} is beyond float16's range ({MAX_ALPHA:g}); the delta would overflow"
    return None


def _regex_problem(key: str, pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        return f"{key} {pattern!r} is not a valid regular expression: {err}"
    return None


def _names_problems(key: str, value: Any) -> list[str]:
    """`target_modules` / `exclude_modules`: None, a regex string (PEFT full-matches it) or a list of names."""
    if value is None:
        return []
    if isinstance(value, str):
        problem = _regex_problem(key, value)
        return [problem] if problem else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return []
    return [f"{key} must be a regex string or a list of module names, got {value!r}"]


def _pattern_problems(key: str, value: Any, check: Callable[[str, Any], str | None]) -> list[str]:
    """`rank_pattern` / `alpha_pattern`: an object of regex keys to values `check` accepts."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{key} must be an object of pattern -> value, got {value!r}"]
    problems = []
    for pattern, item in value.items():
        problems += [
            p for p in (_regex_problem(f"{key} key", pattern), check(f"{key}[{pattern!r}]", item)) if p
        ]
    return problems


def _rank_problem(key: str, value: Any) -> str | None:
    if not _is_int(value) or value < 1:
        return f"{key} must be an integer >= 1, got {value!r}"
    return None


def peft_config_problems(data: Mapping[str, Any]) -> list[str]:
    """Every field of a PEFT `adapter_config.json` dict with the wrong type or range, as `"<field> must ..."`
    lines (empty when all are usable): `r`/`rank_pattern` positive integers, `alpha`/`lora_alpha`/
    `alpha_pattern` finite numbers in [0, 65,504], dropouts in [0, 1), booleans, `target_modules` /
    `exclude_modules` and pattern keys valid regexes, `layers_to_transform` integers, name lists of strings.
    The rank against the layers' sizes is checked when loading (`load_peft`), before anything is allocated."""
    problems: list[str] = []
    if not isinstance(data.get("peft_type"), str):
        problems.append(f"peft_type must be a string such as 'LOHA' or 'LORA', got {data.get('peft_type')!r}")
    checks: list[str | None] = [_rank_problem("r", data.get("r", 8))]
    for key in ("alpha", "lora_alpha"):
        if key in data:
            checks.append(_alpha_problem(key, data[key]))
    for key in ("rank_dropout", "module_dropout", "lora_dropout"):
        value = data.get(key, 0.0)
        if key == "lora_dropout" and value is None:  # PEFT accepts null there (and it is not applied here)
            continue
        if not _is_number(value) or not 0.0 <= value < 1.0:
            checks.append(f"{key} must be a number in [0, 1), got {value!r}")
    for key in ("use_effective_conv2d", "init_weights"):
        if key in data and not isinstance(data[key], bool):
            checks.append(f"{key} must be true or false, got {data[key]!r}")
    if "init_lora_weights" in data and not isinstance(data["init_lora_weights"], (bool, str)):
        checks.append(
            f"init_lora_weights must be true, false or a PEFT init name, got {data['init_lora_weights']!r}"
        )
    problems += [c for c in checks if c]
    problems += _names_problems("target_modules", data.get("target_modules"))
    problems += _names_problems("exclude_modules", data.get("exclude_modules"))
    layers = data.get("layers_to_transform")
    if layers is not None and not (
        _is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))
    ):
        problems.append(f"layers_to_transform must be an integer or a list of integers, got {layers!r}")
    for key in ("layers_pattern", "modules_to_save"):
        value = data.get(key)
        if value is not None and not (
            (isinstance(value, str) and key == "layers_pattern")
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            problems.append(f"{key} must be a list of names, got {value!r}")
    problems += _pattern_problems("rank_pattern", data.get("rank_pattern"), _rank_problem)
    problems += _pattern_problems("alpha_pattern", data.get("alpha_pattern"), _alpha_problem)
    return problems


def _expected_tensors(model: nn.Module, config: AdapterConfig, directory: Path) -> dict[str, torch.Tensor]:
    """The tensors (meta device: shapes only, nothing allocated) the adapter `config` puts on `model`, keyed
    like the folder's state dict. A rank of 10**9 in the config costs nothing here; its shapes then differ from
    the weights file and the load is refused before any real tensor is made."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # entries that match nothing: inject_adapter says so, once
            targets = find_target_modules(model, config)
    except (LoHaDiffusionError, TypeError) as err:
        raise PeftFormatError(
            f"{directory / CONFIG_NAME} does not fit {type(model).__name__}: {err}"
        ) from None
    expected = {}
    cls = adapter_class(config.kind)
    with torch.device("meta"):
        for name in targets:
            layer = model.get_submodule(name)
            spec = LayerSpec.from_module(getattr(layer, "base_layer", layer))
            adapter = cls(
                spec,
                config.rank_for(name),
                config.alpha_for(name),
                use_effective_conv2d=config.use_effective_conv2d,
                init_weights=False,
            )
            expected.update({f"{name}.{k}": t for k, t in adapter.state_tensors().items()})
    return expected


def _fit_problems(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], config: AdapterConfig
) -> list[tuple[str, list[str]]]:
    """Problem groups of a folder's tensors against the adapter its config builds: missing, unexpected,
    misshaped (naming the rank the config gives), not floating point."""
    missing, unexpected, wrong = compare_tensors(dict(expected), dict(state))
    if wrong:
        wrong = [f"{w} (the config gives r={config.rank_for(_module_path(w.split(':')[0]))})" for w in wrong]
    not_float = sorted(k for k, t in state.items() if not t.is_floating_point() or t.dim() == 0)
    return [
        ("tensors the config asks for but the weights file lacks", missing),
        ("tensors of the weights file no targeted module has", unexpected),
        ("tensors whose shapes differ from the config's", wrong),
        ("tensors that are not floating-point factors", not_float),
    ]


def _check_fit(
    directory: Path,
    model: nn.Module,
    config: AdapterConfig,
    state: Mapping[str, torch.Tensor],
    allow_non_finite: bool,
) -> None:
    """Refuse a folder whose tensors do not fit the adapter its config builds on `model`, or (unless
    `allow_non_finite`) hold NaN/Inf, before the model is touched or a factor allocated."""
    groups = _fit_problems(_expected_tensors(model, config, directory), state, config)
    hints = []
    if not allow_non_finite:
        bad = non_finite_modules({k: t for k, t in state.items() if t.is_floating_point()})
        groups.append(("modules with NaN or infinite values", bad))
        if bad:
            hints.append(
                "the adapter diverged or the file is corrupt; use an earlier checkpoint, or pass "
                "allow_non_finite=True to load it anyway"
            )
    if any(items for _, items in groups):
        raise PeftFormatError(
            format_problems(
                f"Cannot load the PEFT adapter in {directory} onto {type(model).__name__}; nothing was changed.",
                groups,
                hints,
            )
        )


def _load_one(
    directory: Path, model: nn.Module, adapter_name: str, scale: float, allow_non_finite: bool = False
) -> None:
    config, state = read_peft(directory)
    _check_fit(directory, model, config, state, allow_non_finite)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    inject_adapter(model, config, adapter_name)
    try:
        set_adapter_state_dict(model, state, adapter_name)
        over = [] if allow_non_finite else _overflowing_adapters(model, adapter_name, scale)
        if over:
            raise PeftFormatError(
                format_problems(
                    f"{directory}: deltas beyond float16's range (Inf in half precision); nothing was changed",
                    [("modules", over)],
                    ["use an earlier checkpoint, or pass allow_non_finite=True to load it anyway"],
                )
            )
    except ValueError as err:
        delete_adapter(model, adapter_name)  # leave the model as it was
        for param, flag in flags:
            param.requires_grad_(flag)
        if isinstance(err, PeftFormatError):
            raise
        raise PeftFormatError(f"{directory} does not fit {type(model).__name__}:\n{err}") from None
    set_adapter_scale(model, adapter_name, scale)


def _overflowing_adapters(model: nn.Module, adapter_name: str, scale: float) -> list[str]:
    """Modules whose delta (times `scale`) is not finite or exceeds float16's range (`kohya.load.MAX_DELTA`)."""
    found = []
    for path, layer in adapter_layers(model).items():
        if adapter_name not in layer.adapters:
            continue
        peak = delta_peak(layer.adapters[adapter_name], MAX_DELTA / max(abs(scale), 1e-30))
        if peak is not None:
            found.append(
                f"{path}: the delta reaches {peak * abs(scale):.3g}, beyond float16's range ({MAX_DELTA:g})"
            )
    return found


def _module_path(key: str) -> str:
    """The module part of a state-dict key (`a.b.lora_A.weight` -> `a.b`, `a.b.hada_w1_a` -> `a.b`): what
    precedes an adapter tensor name with a dot in it (any kind's), else the last dot."""
    dotted = {name for name in state_tensor_names() if "." in name}
    for suffix in sorted(dotted, key=len, reverse=True):
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
    allow_non_finite: bool = False,
) -> str:
    """Load a PEFT LoHa/LoRA adapter as `adapter_name` (user scale `scale`, a unitless multiplier) and return
    the name.

    `directory` holds `adapter_config.json` + `adapter_model.safetensors` for `model`, or subfolders `unet/`,
    `text_encoder/`, `text_encoder_2/` for the models given by keyword (a single adapter folder with keywords goes
    to the one model that has all its modules). The config's targeting selects modules exactly as PEFT does; the
    tensors must match one to one. Factors are fp32 on each layer's device. A refused call leaves every model as
    it was (module tree, weights and `requires_grad`). Every config field is checked (`peft_config_problems`),
    and the tensors against the shapes the config gives each targeted layer, before any factor is allocated;
    NaN/Inf factors and deltas beyond float16's range are refused unless `allow_non_finite=True`.

    Raises:
        AdapterNameError: `adapter_name` breaks the name rule (`layers.check_adapter_name`) or is already used.
        ValueError: both or neither of `model` and the keyword models are given, or `scale` is not finite.
        AdapterFileNotFoundError: no PEFT adapter in `directory`, or a component folder (`unet/`,
            `text_encoder/`, ...) lacks its config or weights (also a `FileNotFoundError`); the file is named.
        PeftFormatError: the folder has adapters for models that are not given, an invalid or unusable config,
            an unreadable weights file, tensors that do not fit the models or hold NaN/Inf, or PEFT features we
            do not implement; the message names the file.
    """
    check_adapter_name(adapter_name)
    directory = Path(directory)
    components = _given(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    if (model is None) == (not components):
        raise ValueError("load_peft takes either one model or unet=/text_encoder=/text_encoder_2=, not both.")
    if model is not None:
        plan = {directory: _unwrap(model)}
    elif (directory / CONFIG_NAME).is_file() or (directory / WEIGHTS_NAME).is_file():
        plan = {directory: components[_owner(directory, components)]}
    else:
        plan = {path: components[c] for c, path in _component_folders(directory, components).items()}
    taken = [type(m).__name__ for m in plan.values() if adapter_name in adapter_names(m)]
    if taken:
        raise AdapterNameError(
            f"Adapter name {adapter_name!r} is already used on {taken}; pick another adapter_name."
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")
    done: list[nn.Module] = []
    flags = [(p, p.requires_grad) for m in plan.values() for p in m.parameters()]
    try:
        for path, target in plan.items():
            _load_one(path, target, adapter_name, scale, allow_non_finite)
            done.append(target)
    except Exception:
        for target in done:  # all or nothing: no adapter, and the flags injecting froze thawed again
            delete_adapter(target, adapter_name)
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    return adapter_name


def _component_folders(directory: Path, components: Mapping[str, nn.Module]) -> dict[str, Path]:
    """The `unet/`, `text_encoder/`, `text_encoder_2/` adapter folders of a pipeline folder; each must be
    complete (a component with a config but no weights, or weights but no config, is refused rather than
    leaving that component out) and its model given."""
    found = {c: directory / c for c in COMPONENTS if (directory / c).is_dir()}
    found = {c: p for c, p in found.items() if (p / CONFIG_NAME).exists() or (p / WEIGHTS_NAME).exists()}
    if not found:
        raise AdapterFileNotFoundError(
            f"{directory} holds no PEFT adapter ({CONFIG_NAME} and {WEIGHTS_NAME} in it or in "
            f"{', '.join(COMPONENTS)} subfolders)."
        )
    incomplete = [
        str(p / name)
        for p in found.values()
        for name in (CONFIG_NAME, WEIGHTS_NAME)
        if not (p / name).is_file()
    ]
    if incomplete:
        raise AdapterFileNotFoundError(
            f"{directory} is an incomplete PEFT pipeline folder: {', '.join(incomplete)} missing. Loading the "
            "other components alone would change only part of the model; restore the file or remove that "
            "component's folder."
        )
    missing = [c for c in found if c not in components]
    if missing:
        raise PeftFormatError(f"{directory} has PEFT adapters for {missing}; pass those models too.")
    return found


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
    with modules in the file) and return them by component. The models give names and shapes (their weights do
    not matter) and are left as they were afterwards. Tensors keep the file's dtype.

    Raises:
        KohyaFormatError: the file does not load onto the models (see `load_kohya`).
        PeftFormatError: the adapter has no PEFT form (LoKr, LoRA Tucker; see `adapter_config_from_model`).
    """
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
    `.safetensors` file and return its path. Extra keyword arguments go to `save_kohya` (dtype, default fp16;
    metadata, ...). The models give names and shapes and are left as they were afterwards.

    Raises:
        PeftFormatError: the folders do not load onto the models (see `load_peft`).
        KohyaFormatError: the adapter cannot be written as a Kohya file (see `save_kohya`).
    """
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
