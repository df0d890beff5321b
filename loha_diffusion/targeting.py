"""Which modules get adapters: PEFT's matching rules, and presets for SD UNets and CLIP text encoders."""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .config import AdapterConfig, LoHaConfig, LoRAConfig, config_class, get_pattern_key
from .errors import ConfigError, format_problems
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


# -- rank_pattern / alpha_pattern ---------------------------------------------------------------------

PATTERN_SETTINGS = ("rank_pattern", "alpha_pattern")


def pattern_key_matches(key: str, module_name: str) -> bool:
    r"""Whether a `rank_pattern`/`alpha_pattern` key matches `module_name` by PEFT's rule
    (`peft.utils.other.get_pattern_key`: `re.match(rf"(.*\.)?({key})$", name)`): the key, a regex, must match
    the whole name or a tail of it that starts after a dot. So `"to_q"` and `"down_blocks\.0\..*"` match
    `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, but `"down_blocks.0"` does not."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


@dataclass(frozen=True)
class PatternUse:
    """How one `rank_pattern`/`alpha_pattern` key applies to a model's adapted modules.

    `matched`: the adapted modules the key matches (`pattern_key_matches`); `applied`: those of them that get
    its `value`, i.e. where it is the first matching key in the dict's order (PEFT's `get_pattern_key`
    returns the first), so `applied` is a subset of `matched`."""

    setting: str  # "rank_pattern" | "alpha_pattern"
    key: str
    value: float
    matched: tuple[str, ...]
    applied: tuple[str, ...]


def pattern_uses(config: AdapterConfig, module_names: Sequence[str]) -> list[PatternUse]:
    """Every `rank_pattern` then `alpha_pattern` key of `config`, in dict order, with the modules of
    `module_names` (the adapted modules' names) it matches and those it sets (`PatternUse`)."""
    uses = []
    for setting in PATTERN_SETTINGS:
        pattern: dict[str, float] = getattr(config, setting)
        keys = list(pattern)
        winners = {name: get_pattern_key(keys, name) for name in module_names}
        for key, value in pattern.items():
            matched = tuple(name for name in module_names if pattern_key_matches(key, name))
            applied = tuple(name for name in matched if winners[name] == key)
            uses.append(PatternUse(setting, key, value, matched, applied))
    return uses


def suggested_pattern(key: str) -> str:
    r"""The key a user most likely meant when `key` names a module prefix (`"down_blocks.0"`): that prefix with
    its dots escaped, followed by any tail (`down_blocks\.0\..*`)."""
    return re.escape(key.rstrip(".")) + r"\..*"


def _starting_with(key: str, names: Sequence[str]) -> list[str]:
    """Module names that have `key` (as a regex) at their start or after a dot, followed by a dot."""
    try:
        pattern = re.compile(rf"(.*\.)?({key})\.")
    except re.error:
        return []
    return [name for name in names if pattern.match(name)]


def _unmatched_problem(use: PatternUse, adapted: Sequence[str], others: Sequence[str]) -> str:
    """Why `use.key` sets nothing, and the key that would (see `check_pattern_keys`)."""
    setting, key = use.setting, use.key
    inside = _starting_with(key, adapted)
    if inside:
        shown = ", ".join(inside[:3]) + (f" and {len(inside) - 3} more" if len(inside) > 3 else "")
        better, simple = suggested_pattern(key), key.rstrip(".") + ".*"
        return (
            f"{setting} key '{key}' matches no adapted module: a key must match a module's whole name or a "
            f"tail of it after a dot (PEFT's rule). {len(inside)} adapted modules start with it ({shown}); "
            f"to set them all write '{better}' or '{simple}' "
            f"(TOML: {setting} = {{ '{better}' = {use.value:g} }})"
        )
    outside = [name for name in others if pattern_key_matches(key, name)] or _starting_with(key, others)
    if outside:
        return (
            f"{setting} key '{key}' only matches modules that get no adapter ({', '.join(outside[:3])}); "
            "adapt them first (target_modules, or preset = 'full' for the convs) or remove the key"
        )
    leaves = sorted({part for name in adapted for part in name.split(".") if not part.isdigit()})
    close = difflib.get_close_matches(key.split(".")[-1], leaves, n=3, cutoff=0.5)
    hint = f"; closest module name parts: {', '.join(close)}" if close else ""
    return f"{setting} key '{key}' matches no module of the model{hint}"


def check_pattern_keys(
    config: AdapterConfig,
    adapted: Sequence[str],
    all_names: Sequence[str] = (),
    *,
    keys: Iterable[tuple[str, str]] | None = None,
    model: str = "model",
    hints: Sequence[str] = (),
) -> list[PatternUse]:
    """Check that each `rank_pattern`/`alpha_pattern` key named in `keys` (`(setting, key)` pairs; default:
    every key of `config`) sets the rank or alpha of at least one of the `adapted` module names, and return
    every key's `PatternUse` (`pattern_uses`).

    PEFT ignores a key that matches nothing (its `get_pattern_key` falls back to the module name), so a kohya
    user's `down_blocks.0 = 4` silently changes nothing; the error says which key would match and names
    modules it was meant for. A key that matches modules but never applies, because an earlier key of the
    dict matches each of them first, is refused too, naming that key. `all_names` (every module name of the
    model) lets the message tell a key that matches only modules without an adapter; `hints` are added to it.

    Raises:
        ConfigError: one message for all such keys, naming each key, the `model` and the fix.
    """
    uses = pattern_uses(config, adapted)
    checked = None if keys is None else set(keys)
    adapted_set = set(adapted)
    others = [name for name in all_names if name not in adapted_set]
    problems = []
    for use in uses:
        if checked is not None and (use.setting, use.key) not in checked:
            continue
        if not use.matched:
            problems.append(_unmatched_problem(use, adapted, others))
        elif not use.applied:
            first = {get_pattern_key(list(getattr(config, use.setting)), name) for name in use.matched}
            earlier = ", ".join(f"'{k}'" for k in sorted(first))
            problems.append(
                f"{use.setting} key '{use.key}' matches {len(use.matched)} modules but an earlier key sets each "
                f"of them ({earlier}): the first matching key wins (PEFT's "
                "rule), so put the more specific key first"
            )
    if problems:
        raise ConfigError(
            format_problems(
                f"rank_pattern/alpha_pattern keys that change no module of the {model}:",
                [("key(s) set nothing", problems)],
                hints,
            )
        )
    return uses


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
