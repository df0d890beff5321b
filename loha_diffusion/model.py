"""Put adapters into a model and manage them: injection, state dicts, scales, merge/unmerge, delete, unload.

Words (one meaning each, as in PEFT): *merge* bakes adapters into the base weights and *unmerge* restores the
exact originals (diffusers and `pipeline.py` call these *fuse* / *unfuse*); *delete* removes one adapter and keeps
the others; *unload* removes every adapter and returns the plain model (`merge_and_unload` merges first).
`scale` is the user multiplier of an adapter, `scaling` = alpha / r × scale is what ΔW is multiplied by.

Merged adapters and the calls that change adapters (the rule: a call never leaves merged weights that disagree
with the adapters' state; a merged adapter is always active and enabled, and the weight is always W0 + the sum
of the merged adapters' ΔW at their current scales and factors, rebuilt from the kept exact original):

| call while merged                                  | what it does                                               |
|----------------------------------------------------|------------------------------------------------------------|
| `set_adapter_scale`, `set_adapter_state_dict`      | refuses (`AdapterMergedError`): unmerge, change, merge     |
| `set_active_adapters`                              | re-merges exactly the merged adapters that stay active     |
| `disable_adapters` / `enable_adapters`             | unmerges at once / merges the same adapters again          |
| `delete_adapter`                                   | removes it from the weights, re-merges the others exactly  |
| `inject_adapter`, `add_adapter` (a new adapter)    | allowed: the new adapter runs unmerged on top              |
| `unload` / `merge_and_unload`                      | the exact originals / the active adapters merged           |
| `merge_adapters` of an inactive adapter, disabled  | refuses (`AdapterStateError`): a merged adapter would run  |
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapters import Adapter, LayerSpec, adapter_class
from .adapters.base import compare_tensors
from .config import CONFIG_CLASSES, AdapterConfig
from .errors import (
    AdapterMergedError,
    AdapterNameError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    format_problems,
)
from .layers import AdapterLayer, check_adapter_name
from .targeting import find_target_modules


class TrainableCopy(nn.Module):
    """PEFT's `ModulesToSaveWrapper`: keeps the original module frozen and trains a copy per adapter."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_enabled = True

    def add_adapter(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[name] = copy_
        self.active_adapter = name

    def forward(self, *args, **kwargs):
        if not self.adapters_enabled or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every `AdapterLayer` of `model`, keyed by the path of the module it wraps."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _trainable_copies(model: nn.Module) -> dict[str, TrainableCopy]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TrainableCopy)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in `model`, in order of first appearance."""
    names: list[str] = []
    for layer in adapter_layers(model).values():
        names += [n for n in layer.adapters if n not in names]
    for wrapper in _trainable_copies(model).values():
        names += [n for n in wrapper.modules_to_save if n not in names]
    return names


def add_adapter(model: nn.Module, module_name: str, adapter_name: str, adapter: Adapter) -> AdapterLayer:
    """Attach a ready `adapter` to the module at `module_name`, wrapping it in an `AdapterLayer` if needed.

    Raises:
        AdapterNameError: `adapter_name` breaks the name rule (`layers.check_adapter_name`) or is taken there;
            checked before the module is wrapped.
        ConfigError: the model has no module `module_name`.
        AdapterStateError: `adapter` was built for another weight shape.
    """
    check_adapter_name(adapter_name)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ConfigError(f"{type(model).__name__} has no module {module_name!r}.") from None
    if not isinstance(module, AdapterLayer):
        module = AdapterLayer(module)
        _set_module(model, module_name, module)
    module.add_adapter(adapter_name, adapter)
    return module


def build_adapter(config: AdapterConfig, module: nn.Module, module_name: str) -> Adapter:
    """The adapter `config` asks for on `module` (rank and alpha resolved through the patterns), with fp32
    factors (float64 for a float64 layer) on the layer's device."""
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    adapter_cls = adapter_class(config.kind)
    adapter = adapter_cls(
        LayerSpec.from_module(base),
        config.rank_for(module_name),
        config.alpha_for(module_name),
        use_effective_conv2d=config.use_effective_conv2d,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        init_weights=config.init_weights,
    )
    # Factors train in fp32 whatever the base precision (mixed precision), but keep a float64 base's precision.
    dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
    return adapter.to(device=base.weight.device, dtype=dtype)


def inject_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` described by `config` to `model` in place, and return `model`.

    Matched modules are wrapped in `AdapterLayer`s (a module already wrapped gets one more adapter); the
    base model is frozen and only the new adapter's factors (and `modules_to_save` copies) are trainable.
    Factors are fp32 (float64 on a float64 model) on each layer's device, whatever the base dtype.

    All checks run before the model is changed (as PEFT's `BaseTuner.inject_adapter`): a refused call leaves
    the module tree and every weight as they were.

    Raises:
        TypeError: `config` is not a `LoHaConfig` / `LoRAConfig`.
        AdapterNameError: the name breaks the rule of `layers.check_adapter_name` or is already used.
        ConfigError: `target_modules` / `modules_to_save` match nothing (the message names close module names).
    """
    if not isinstance(config, CONFIG_CLASSES):
        raise TypeError(f"config must be a LoHaConfig or LoRAConfig, got {type(config).__name__}.")
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise AdapterNameError(
            f"The model already has an adapter named {adapter_name!r}; pick another adapter_name."
        )
    targets = find_target_modules(model, config)
    save_targets = _modules_to_save_targets(model, config)
    adapters = {name: build_adapter(config, model.get_submodule(name), name) for name in targets}

    for param in model.parameters():
        param.requires_grad_(False)
    for name, adapter in adapters.items():
        add_adapter(model, name, adapter_name, adapter)
    for name in save_targets:
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, TrainableCopy):
            wrapper = TrainableCopy(wrapper)
            _set_module(model, name, wrapper)
        wrapper.add_adapter(adapter_name)
    if not hasattr(model, "adapter_configs"):
        model.adapter_configs = {}
    model.adapter_configs[adapter_name] = config
    return model


def _modules_to_save_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n]
    found = [n for n in names if any(n == m or n.endswith("." + m) for m in config.modules_to_save)]
    missing = [m for m in config.modules_to_save if not any(n == m or n.endswith("." + m) for n in found)]
    if missing:
        raise ConfigError(f"modules_to_save entries match no module of {type(model).__name__}: {missing}.")
    return found


def get_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name`, keyed `<module path>.<tensor name>` as PEFT's
    `get_peft_model_state_dict` keys them (e.g. `...attn1.to_q.hada_w1_a`).

    The tensors are the live factors, detached (no copy): shapes as the adapter classes document them
    (LoHa `hada_w1_a (out, r)`, ...), fp32 unless the model is float64, on the model's device.

    Raises:
        AdapterNotFoundError: the model has no adapter `adapter_name` (also a `KeyError`).
    """
    state: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model).items():
        if adapter_name in layer.adapters:
            for tensor_name, tensor in layer.adapters[adapter_name].state_tensors().items():
                state[f"{path}.{tensor_name}"] = tensor.detach()
    for path, wrapper in _trainable_copies(model).items():
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                # PEFT saves the trainable copy under the wrapped module's own path (`head.weight`).
                state[f"{path}.{key}"] = tensor.detach()
    if not state:
        raise AdapterNotFoundError(
            f"The model has no adapter named {adapter_name!r}; it has {adapter_names(model)}."
        )
    return state


def set_adapter_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Load `state_dict` (keys as `get_adapter_state_dict` gives them) into adapter `adapter_name`.

    Strict: missing keys, unknown keys and wrong shapes raise one error listing them, before any tensor is
    copied. Tensors are copied into the factors' dtype and device. A merged adapter is refused: its ΔW is in
    the weights, and new factors would disagree with them (unmerge, load, merge again).

    Raises:
        AdapterNotFoundError: the model has no adapter `adapter_name`.
        AdapterMergedError: the adapter is merged (nothing is copied).
        AdapterStateError: missing, unknown or misshaped keys (all listed).
    """
    _refuse_if_merged(model, adapter_name, "loading new tensors into it")
    missing, unknown, wrong = compare_tensors(get_adapter_state_dict(model, adapter_name), state_dict)
    if missing or unknown or wrong:
        raise AdapterStateError(
            format_problems(
                f"Cannot load adapter {adapter_name!r}:",
                [("missing keys", missing), ("unknown keys", unknown), ("shape mismatches", wrong)],
            )
        )
    with torch.no_grad():
        for path, layer in adapter_layers(model).items():
            if adapter_name in layer.adapters:
                adapter = layer.adapters[adapter_name]
                adapter.load_state_tensors({t: state_dict[f"{path}.{t}"] for t in adapter.state_tensors()})
        for path, wrapper in _trainable_copies(model).items():
            if adapter_name in wrapper.modules_to_save:
                prefix = f"{path}."
                module = wrapper.modules_to_save[adapter_name]
                module.load_state_dict(
                    {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
                )


def _require_adapter(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in adapter_names(model):
        raise AdapterNotFoundError(
            f"The model has no adapter named {adapter_name!r}; it has {adapter_names(model)}."
        )


def merged_adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters merged into at least one weight of `model`, in order of first appearance."""
    names: list[str] = []
    for layer in adapter_layers(model).values():
        names += [n for n in layer.merged_adapters if n not in names]
    return names


def _refuse_if_merged(model: nn.Module, adapter_name: str, change: str) -> None:
    _require_adapter(model, adapter_name)
    if adapter_name in merged_adapter_names(model):
        raise AdapterMergedError(
            f"Adapter {adapter_name!r} is merged into the weights; {change} would leave weights that disagree "
            "with it. Unmerge first (unmerge_adapters / pipeline.unfuse), change it, then merge again."
        )


def set_adapter_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    """Multiply adapter `adapter_name`'s delta by `scale` (1.0 = as trained; PEFT's `set_scale`).

    Raises:
        AdapterNotFoundError: no such adapter.
        AdapterMergedError: the adapter is merged (its scale is baked into the weights); unmerge first.
    """
    _refuse_if_merged(model, adapter_name, "changing its scale")
    for layer in adapter_layers(model).values():
        if adapter_name in layer.adapters:
            layer.adapters[adapter_name].scale = float(scale)


def set_active_adapters(model: nn.Module, names: list[str] | str) -> None:
    """Make exactly `names` the adapters that run in forward (the others stay loaded).

    Merged adapters are kept consistent: one that is left out is taken out of the weights, and the merged ones
    that stay active are re-merged exactly (`AdapterLayer.set_active`); a newly active adapter runs unmerged
    until the next `merge_adapters`.

    Raises:
        AdapterNotFoundError: a name is not an adapter of the model (nothing is changed).
    """
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        _require_adapter(model, name)
    for layer in adapter_layers(model).values():
        layer.set_active([n for n in names if n in layer.adapters])
    for wrapper in _trainable_copies(model).values():
        wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)


def _set_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in adapter_layers(model).values():
        layer.set_enabled(enabled)
    for wrapper in _trainable_copies(model).values():
        wrapper.adapters_enabled = enabled


def enable_adapters(model: nn.Module) -> None:
    """Run the active adapters again after `disable_adapters`; the adapters `disable_adapters` unmerged are
    merged again (those still present and active, at their current scales)."""
    _set_enabled(model, True)


def disable_adapters(model: nn.Module) -> None:
    """Run the base model only. Merged adapters are unmerged at once (PEFT does it on the next forward; here
    the weights are the exact originals as soon as the call returns) and merged again by `enable_adapters`."""
    _set_enabled(model, False)


def check_mergeable(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Check, without changing anything, that `merge_adapters(model, adapter_names)` can run.

    Raises:
        AdapterNotFoundError: a name is not an adapter of the model.
        AdapterStateError: an adapter to merge is not active, or the adapters are disabled: a merged adapter
            always runs, so merging it would change the output (the message says what to call first).
    """
    for name in adapter_names or []:
        _require_adapter(model, name)
    for path, layer in adapter_layers(model).items():
        names = (
            layer.active_adapters
            if adapter_names is None
            else [n for n in adapter_names if n in layer.adapters]
        )
        layer.check_mergeable(names, f" at {path}")


def merge_adapters(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Bake adapters (default: the active ones) into the base weights; `unmerge_adapters` undoes it exactly.

    The merged weight is computed in fp32 from the kept original and rounded once to the base dtype: for a
    float16 weight, `(W0.float() + ΔW).half()`, whatever was merged before.

    Raises:
        AdapterNotFoundError: a name is not an adapter of the model (nothing is merged).
        AdapterStateError: an adapter to merge is not active, or the adapters are disabled (nothing is merged).
    """
    check_mergeable(model, adapter_names)
    for layer in adapter_layers(model).values():
        names = None if adapter_names is None else [n for n in adapter_names if n in layer.adapters]
        layer.merge(names)


def unmerge_adapters(model: nn.Module) -> None:
    """Restore every merged base weight to its exact original (and cancel the re-merge `enable_adapters`
    would do after `disable_adapters`)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name`; layers left without adapters go back to their plain base module. If it is
    merged, each weight is rebuilt from its exact original with the other merged adapters only (unmerge,
    delete, re-merge), so the weights equal those of a model that never had it.

    Raises:
        AdapterNotFoundError: no such adapter.
    """
    _require_adapter(model, adapter_name)
    for path, layer in adapter_layers(model).items():
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            if not layer.adapters:
                layer.unmerge()
                _set_module(model, path, layer.base_layer)
    for path, wrapper in _trainable_copies(model).items():
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
            if not wrapper.modules_to_save:
                _set_module(model, path, wrapper.original_module)
            elif wrapper.active_adapter == adapter_name:
                wrapper.active_adapter = next(iter(wrapper.modules_to_save))
    getattr(model, "adapter_configs", {}).pop(adapter_name, None)


def _replace_with_base(model: nn.Module, merge: bool) -> nn.Module:
    for path, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_module(model, path, layer.base_layer)
    for path, wrapper in _trainable_copies(model).items():
        keep = wrapper.modules_to_save[wrapper.active_adapter] if merge and wrapper.active_adapter else None
        _set_module(model, path, keep if keep is not None else wrapper.original_module)
    if hasattr(model, "adapter_configs"):
        del model.adapter_configs
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Bake the active adapters into the weights and return the plain model (no adapter layers left). Computed
    in fp32 from the exact originals and rounded once to each weight's dtype.

    Raises:
        AdapterStateError: the adapters are disabled (nothing is changed): enable them, or call `unload`.
    """
    check_mergeable(model)
    return _replace_with_base(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the plain model with its original weights."""
    return _replace_with_base(model, merge=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class LoHaModel(nn.Module):
    """A model with an adapter injected, with PEFT-like methods: `print_trainable_parameters`,
    `merge_and_unload`, `unload`, `get_adapter_state_dict`, `set_adapter_scale`, ...

    `LoHaModel(model, config, adapter_name="default")` injects into `model` in place; `.model` is it.
    The config may be a `LoHaConfig` or a `LoRAConfig`. Each method is the module-level function of the same
    name on `.model`, with the same rules for merged adapters (the table in this module's docstring)."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = inject_adapter(model, config, adapter_name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def adapter_configs(self) -> dict[str, AdapterConfig]:
        return self.model.adapter_configs

    def add_adapter(self, config: AdapterConfig, adapter_name: str) -> None:
        inject_adapter(self.model, config, adapter_name)

    def print_trainable_parameters(self) -> None:
        trainable, total = count_parameters(self.model)
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        )

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        return get_adapter_state_dict(self.model, adapter_name)

    def set_adapter_state_dict(
        self, state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
    ) -> None:
        """`set_adapter_state_dict`: refused for a merged adapter (`AdapterMergedError`)."""
        set_adapter_state_dict(self.model, state_dict, adapter_name)

    def set_adapter_scale(self, adapter_name: str, scale: float) -> None:
        """`set_adapter_scale`: refused for a merged adapter (`AdapterMergedError`)."""
        set_adapter_scale(self.model, adapter_name, scale)

    def set_adapter(self, names: list[str] | str) -> None:
        """`set_active_adapters`: merged adapters left out are unmerged, the others re-merged exactly."""
        set_active_adapters(self.model, names)

    def enable_adapters(self) -> None:
        enable_adapters(self.model)

    def disable_adapters(self) -> None:
        """`disable_adapters`: unmerges at once; `enable_adapters` merges the same adapters again."""
        disable_adapters(self.model)

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        merge_adapters(self.model, adapter_names)

    def unmerge_adapter(self) -> None:
        unmerge_adapters(self.model)

    def delete_adapter(self, adapter_name: str) -> None:
        """`delete_adapter`: a merged adapter leaves the weights, the other merged ones are re-merged exactly."""
        delete_adapter(self.model, adapter_name)

    def merge_and_unload(self) -> nn.Module:
        return merge_and_unload(self.model)

    def unload(self) -> nn.Module:
        return unload(self.model)
