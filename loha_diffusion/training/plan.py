"""From a `TrainConfig` to adapter configs, the step schedule and the `--dry_run` plan.

The plan (adapted modules per part, trainable parameters, LoHa effective rank, file size, steps, effective
batch, warnings about known-bad settings) is computed on models built on the `meta` device from the base
model's configs, so it costs no memory and loads no weights.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import AdapterConfig, LoHaConfig, LoRAConfig
from ..model import adapter_layers, inject_adapter
from ..targeting import text_encoder_preset, unet_preset
from .config import ConfigError, TrainConfig

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def unet_adapter_config(cfg: TrainConfig) -> AdapterConfig:
    """The UNet adapter config: the preset (or explicit `target_modules`) with the run's ranks and options."""
    common = {
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "exclude_modules": cfg.exclude_modules,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
    }
    if cfg.target_modules:
        if cfg.conv_rank is not None or cfg.conv_alpha is not None:
            raise ConfigError(
                "conv_rank/conv_alpha apply to preset = 'full'; with explicit target_modules set per-module "
                "ranks with rank_pattern/alpha_pattern"
            )
        config_cls = LoHaConfig if cfg.algo == "loha" else LoRAConfig
        return config_cls(
            r=cfg.rank, alpha=cfg.effective_alpha, target_modules=list(cfg.target_modules), **common
        )
    if cfg.preset != "full" and (cfg.conv_rank is not None or cfg.conv_alpha is not None):
        raise ConfigError(
            f"conv_rank/conv_alpha only apply to preset = 'full' (preset {cfg.preset!r} adapts no k x k convs)"
        )
    return unet_preset(
        cfg.preset,
        algo=cfg.algo,
        r=cfg.rank,
        alpha=cfg.effective_alpha,
        conv_r=cfg.conv_rank if cfg.preset == "full" else None,
        conv_alpha=cfg.conv_alpha if cfg.preset == "full" else None,
        **common,
    )


def text_encoder_adapter_config(cfg: TrainConfig) -> AdapterConfig | None:
    """The text-encoder adapter config (CLIP attention + MLP), or None when the text encoder is frozen."""
    if not cfg.train_text_encoder:
        return None
    return text_encoder_preset(
        algo=cfg.algo,
        r=cfg.rank,
        alpha=cfg.effective_alpha,
        rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
    )


@dataclass(frozen=True)
class Schedule:
    """How long training runs, in optimizer steps and epochs, for a dataset size and process count."""

    num_samples: int
    num_processes: int
    batches_per_epoch: int  # per process
    update_steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    total_batch_size: int  # samples per optimizer step over all processes


def compute_schedule(cfg: TrainConfig, num_samples: int, num_processes: int = 1) -> Schedule:
    """Steps per epoch, total steps and epochs as accelerate will run them (last batch kept, even batches)."""
    batches_per_epoch = math.ceil(num_samples / (cfg.train_batch_size * num_processes))
    update_steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * update_steps_per_epoch
    return Schedule(
        num_samples=num_samples,
        num_processes=num_processes,
        batches_per_epoch=batches_per_epoch,
        update_steps_per_epoch=update_steps_per_epoch,
        max_train_steps=max_train_steps,
        num_epochs=math.ceil(max_train_steps / update_steps_per_epoch),
        total_batch_size=cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes,
    )


@dataclass
class PartPlan:
    """Adapted modules of one model part (e.g. `unet.down_blocks`), with sizes."""

    name: str
    modules: int = 0
    parameters: int = 0
    kinds: Counter = field(default_factory=Counter)  # "linear" / "conv 1x1" / "conv 3x3" -> count
    effective_ranks: set = field(default_factory=set)


@dataclass
class Plan:
    """Everything `--dry_run` prints."""

    parts: list[PartPlan]
    trainable_parameters: int
    file_bytes: int
    schedule: Schedule | None
    warnings: list[str]


def _part_name(prefix: str, module_path: str) -> str:
    head = module_path.split(".")[0]
    return f"{prefix}.{head}" if prefix == "unet" else prefix


def _layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    kernel = "x".join(map(str, getattr(layer, "kernel_size", ())))
    return f"conv {kernel}"


def describe_adapters(model: nn.Module, prefix: str, save_precision: str) -> tuple[list[PartPlan], int, int]:
    """Per-part module counts, parameters and effective ranks of `model`'s adapters, and the file bytes they take."""
    parts: dict[str, PartPlan] = {}
    total_params = 0
    file_bytes = 0
    for path, layer in adapter_layers(model).items():
        for adapter in layer.adapters.values():
            part = parts.setdefault(_part_name(prefix, path), PartPlan(_part_name(prefix, path)))
            numel = sum(t.numel() for t in adapter.state_tensors().values())
            spec = adapter.spec
            full_rank = min(spec.out_features, spec.in_features * spec.kernel_numel)
            effective = min(adapter.r**2, full_rank) if adapter.kind == "loha" else min(adapter.r, full_rank)
            part.modules += 1
            part.parameters += numel
            part.kinds[_layer_kind(layer.base_layer)] += 1
            part.effective_ranks.add(effective)
            total_params += numel
            # Tensors, one 0-dim alpha per module, and ~160 header bytes per tensor (name, dtype, shape, offsets).
            tensors = len(adapter.state_tensors()) + 1
            file_bytes += numel * _BYTES[save_precision] + 4 + 160 * tensors
    return list(parts.values()), total_params, file_bytes


def build_meta_models(cfg: TrainConfig) -> tuple[nn.Module, nn.Module | None]:
    """The base UNet (and text encoder, when trained) built on the `meta` device from the model's configs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .loop import load_with_hint

    unet_config = load_with_hint(
        cfg,
        lambda **kw: UNet2DConditionModel.load_config(
            cfg.pretrained_model_name_or_path, subfolder="unet", **kw
        ),
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    text_encoder = None
    if cfg.train_text_encoder:
        te_config = load_with_hint(
            cfg,
            lambda **kw: CLIPTextConfig.from_pretrained(
                cfg.pretrained_model_name_or_path, subfolder="text_encoder", **kw
            ),
        )
        with torch.device("meta"):
            text_encoder = CLIPTextModel(te_config)
    return unet, text_encoder


def setting_warnings(cfg: TrainConfig) -> list[str]:
    """Known-bad or surprising settings, each with what to do instead."""
    warnings = []
    if cfg.algo == "loha" and cfg.rank > 32:
        warnings.append(
            f"LoHa rank {cfg.rank} gives effective rank up to {cfg.rank**2} with ~2x LoRA's parameters per rank; "
            "LoHa dims above 32 rarely help and can diverge (LyCORIS#15). Try rank 4-16."
        )
    for name, alpha, rank in (
        ("alpha", cfg.effective_alpha, cfg.rank),
        ("conv_alpha", cfg.effective_conv_alpha, cfg.effective_conv_rank),
    ):
        if alpha > 2 * rank:
            warnings.append(
                f"{name} = {alpha:g} is much larger than its rank {rank}: the update is multiplied by "
                f"{alpha / rank:g}, which usually needs a much smaller learning rate. Usual: alpha <= rank."
            )
    if cfg.use_effective_conv2d and cfg.preset != "full" and not cfg.target_modules:
        warnings.append(
            f"use_effective_conv2d has no effect with preset {cfg.preset!r} (no k x k convs adapted)."
        )
    if cfg.algo == "loha" and cfg.mixed_precision == "fp16":
        warnings.append(
            "LoHa with fp16 autocast can overflow (NaN); bf16 is safer where the hardware has it."
        )
    if cfg.validation_steps and not cfg.validation_prompt:
        warnings.append("validation_steps is set but there is no validation_prompt: no validation images.")
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
        warnings.append("lr_scheduler 'constant' ignores lr_warmup_steps; use 'constant_with_warmup'.")
    if cfg.max_grad_norm == 0:
        warnings.append(
            "max_grad_norm = 0 disables gradient clipping; LoHa is more stable with clipping (1.0)."
        )
    if cfg.max_train_steps is not None and cfg.lr_warmup_steps >= cfg.max_train_steps:
        warnings.append(
            f"lr_warmup_steps = {cfg.lr_warmup_steps} >= max_train_steps = {cfg.max_train_steps}: "
            "the learning rate never reaches its peak."
        )
    return warnings


def build_plan(cfg: TrainConfig, num_samples: int | None = None, num_processes: int = 1) -> Plan:
    """The dry-run plan for `cfg` (`num_samples` from the scanned dataset, if known)."""
    unet, text_encoder = build_meta_models(cfg)
    inject_adapter(unet, unet_adapter_config(cfg))
    parts, params, size = describe_adapters(unet, "unet", cfg.save_precision)
    if text_encoder is not None:
        inject_adapter(text_encoder, text_encoder_adapter_config(cfg))
        te_parts, te_params, te_size = describe_adapters(text_encoder, "text_encoder", cfg.save_precision)
        parts, params, size = parts + te_parts, params + te_params, size + te_size
    schedule = compute_schedule(cfg, num_samples, num_processes) if num_samples else None
    return Plan(parts, params, size + 8 + 2048, schedule, setting_warnings(cfg))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def format_plan(cfg: TrainConfig, plan: Plan, data_line: str | None = None) -> str:
    """The plan as text for the console."""
    rank_word = "effective rank (r^2)" if cfg.algo == "loha" else "rank"
    lines = [
        f"Plan: {cfg.algo.upper()} rank {cfg.rank}, alpha {cfg.effective_alpha:g}"
        + (
            f", conv rank {cfg.effective_conv_rank}, conv alpha {cfg.effective_conv_alpha:g}"
            if cfg.preset == "full"
            else ""
        )
        + (", effective conv2d (CP)" if cfg.use_effective_conv2d else "")
        + f" on {cfg.pretrained_model_name_or_path}",
        f"  {'part':<20} {'modules':>7} {'params':>12}  {'layers':<40} {rank_word}",
    ]
    for part in plan.parts:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(part.kinds.items()))
        ranks = "/".join(str(r) for r in sorted(part.effective_ranks))
        lines.append(f"  {part.name:<20} {part.modules:>7} {part.parameters:>12,}  {kinds:<40} {ranks}")
    modules = sum(p.modules for p in plan.parts)
    lines.append(f"  {'total':<20} {modules:>7} {plan.trainable_parameters:>12,}")
    lines.append(f"Expected file size ({cfg.save_precision}): {_human_bytes(plan.file_bytes)}")
    if data_line:
        lines.append(f"Data: {data_line}")
    if plan.schedule:
        s = plan.schedule
        lines.append(
            f"Steps: {s.max_train_steps} optimizer steps = {s.num_epochs} epochs of {s.update_steps_per_epoch} steps; "
            f"effective batch {s.total_batch_size} = {cfg.train_batch_size} per device x "
            f"{cfg.gradient_accumulation_steps} accumulation x {s.num_processes} processes"
        )
    for warning in plan.warnings:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)
