"""Which modules get adapters: PEFT's matching rules, and presets for SD UNets and CLIP text encoders."""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from typing import Literal

from torch import nn

from .config import AdapterConfig, LoHaConfig, LoRAConfig, config_class
from .errors import ConfigError
from .layers import AdapterLayer

ADAPTABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_TRANSFORMER_EXTRA = ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
UNET_RESNET_LINEAR = ["time_emb_proj", "conv_shortcut"]
UNET_KXK_CONVS = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class _Excluded:
    """Marks a module that exclude_modules / modules_to_save removed (kept apart from "not matched")."""


def _in_list(key: str, entries) -> bool:
    return key in entries or any(key.endswith(f".{entry}") for entry in entries)


def _layer_index(config: AdapterConfig, key: str) -> int | None:
    if not config.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = (
            [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        )
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def module_matches(config: AdapterConfig, key: str) -> bool | _Excluded:
    """PEFT's `check_target_module_exists` for one module name (exclusions first, then targets)."""
    if config.exclude_modules:
        if isinstance(config.exclude_modules, str):
            if re.fullmatch(config.exclude_modules, key):
                return _Excluded()
        elif _in_list(key, config.exclude_modules):
            return _Excluded()
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return _Excluded()
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.layers_to_transform
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    if found and using_layers:
        index = _layer_index(config, key)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules, without the internals of existing adapter layers (their base layers and factors)."""
    inside = [name for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    return {
        name: module
        for name, module in model.named_modules()
        if name and not any(name.startswith(prefix + ".") for prefix in inside)
    }


def _all_linear(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    names = {
        name
        for name, m in modules.items()
        if isinstance(m, nn.Linear) or (isinstance(m, AdapterLayer) and m.spec.op == "linear")
    }
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        names -= {name for name, m in modules.items() if m is output}
    return names


def find_target_modules(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules of `model` that `config` adapts, in `named_modules()` order.

    Raises a `ValueError` when nothing matches (naming the closest module names) or when a matched module
    is not a Linear/Conv1d/Conv2d; warns about list entries that match no module."""
    if config.target_modules is None:
        raise ConfigError(
            "target_modules is None: a diffusion model has no default targets. Set target_modules "
            "(e.g. ['to_q', 'to_k', 'to_v', 'to_out.0']) or build the config with unet_preset()/text_encoder_preset()."
        )
    modules = _candidate_modules(model)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        linear = _all_linear(model, modules)
        config = _with_targets(config, linear)
    matched, unsupported = [], []
    for name, module in modules.items():
        result = module_matches(config, name)
        if result is True:
            if isinstance(module, (*ADAPTABLE_TYPES, AdapterLayer)):
                matched.append(name)
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ConfigError(
            "target_modules matched modules that are not Linear/Conv1d/Conv2d: "
            + ", ".join(unsupported[:5])
            + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
            + ". Target their Linear/Conv children instead (e.g. 'to_out.0', not 'to_out')."
        )
    if not matched:
        raise ConfigError(_no_match_message(config, list(modules)))
    if not isinstance(config.target_modules, str):
        unused = [
            t
            for t in sorted(config.target_modules)
            if not any(n == t or n.endswith("." + t) for n in matched)
        ]
        if unused:
            warnings.warn(
                f"target_modules entries matched no module of {type(model).__name__}: {unused}", stacklevel=2
            )
    return matched


def _with_targets(config: AdapterConfig, targets: set[str]) -> AdapterConfig:
    config = copy.copy(config)
    config.target_modules = targets
    return config


def _no_match_message(config: AdapterConfig, names: list[str]) -> str:
    targets = (
        [config.target_modules] if isinstance(config.target_modules, str) else sorted(config.target_modules)
    )
    leaves = sorted({n.split(".")[-1] for n in names} | set(names))
    hints = []
    for target in targets[:5]:
        close = difflib.get_close_matches(target, leaves, n=3, cutoff=0.5)
        if close:
            hints.append(f"{target!r} -> closest: {', '.join(close)}")
    message = f"target_modules {targets} matched no module of the model"
    if config.exclude_modules or config.layers_to_transform is not None or config.modules_to_save:
        message += " (after exclude_modules / layers_to_transform / modules_to_save)"
    message += ". " + ("; ".join(hints) if hints else f"Some module names: {', '.join(names[:8])}") + "."
    return message


# -- presets ---------------------------------------------------------------------------------------

UNetPreset = Literal["attn", "attn_ff", "full"]


def unet_preset(
    preset: UNetPreset = "attn_ff",
    *,
    algo: Literal["loha", "lora"] = "loha",
    r: int = 8,
    alpha: float = 8,
    conv_r: int | None = None,
    conv_alpha: float | None = None,
    use_effective_conv2d: bool = False,
    **extra,
) -> LoHaConfig | LoRAConfig:
    """A config for an SD/SDXL diffusers UNet.

    * `"attn"`: attention projections `to_q/to_k/to_v/to_out.0` (diffusers' LoRA scripts);
    * `"attn_ff"`: every Linear of the transformer blocks — attention, feed-forward, `proj_in/proj_out`
      (Kohya's default LoRA targets);
    * `"full"`: `attn_ff` plus ResnetBlock2D `conv1/conv2/conv_shortcut/time_emb_proj` and the
      down/upsampler convs (Kohya LoCon / LyCORIS without conv_in/conv_out).

    k×k convs get `conv_r`/`conv_alpha` (Kohya's conv_dim/conv_alpha, default `r`/`alpha`) through
    `rank_pattern`/`alpha_pattern`; Linear and 1×1 convs get `r`/`alpha`.

    Raises:
        ConfigError: an unknown preset or algo, or `conv_r`/`conv_alpha` with a preset without k×k convs.
    """
    if preset not in ("attn", "attn_ff", "full"):
        raise ConfigError(f"Unknown UNet preset {preset!r}; choose 'attn', 'attn_ff' or 'full'.")
    targets = list(UNET_ATTENTION)
    if preset in ("attn_ff", "full"):
        targets += UNET_TRANSFORMER_EXTRA
    rank_pattern = dict(extra.pop("rank_pattern", {}) or {})
    alpha_pattern = dict(extra.pop("alpha_pattern", {}) or {})
    if preset == "full":
        targets += UNET_RESNET_LINEAR + UNET_KXK_CONVS
        conv_r = r if conv_r is None else conv_r
        conv_alpha = alpha if conv_alpha is None else conv_alpha
        # Patterns are dot-boundary suffixes; "conv" matches the samplers' `...samplers.0.conv` only.
        for key in ("conv1", "conv2", "conv"):
            if conv_r != r:
                rank_pattern.setdefault(key, conv_r)
            if conv_alpha != alpha:
                alpha_pattern.setdefault(key, conv_alpha)
    elif conv_r is not None or conv_alpha is not None:
        raise ConfigError(f"conv_r/conv_alpha only apply to the 'full' preset (convs are not in {preset!r}).")
    config_cls = config_class(algo)
    return config_cls(
        r=r,
        alpha=alpha,
        target_modules=targets,
        use_effective_conv2d=use_effective_conv2d,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **extra,
    )


def text_encoder_preset(
    *, algo: Literal["loha", "lora"] = "loha", r: int = 8, alpha: float = 8, **extra
) -> LoHaConfig | LoRAConfig:
    """A config for CLIP text encoders: attention `q/k/v/out_proj` and MLP `fc1/fc2` (Kohya's TE targets)."""
    return config_class(algo)(r=r, alpha=alpha, target_modules=list(TEXT_ENCODER_TARGETS), **extra)
