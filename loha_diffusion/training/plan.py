"""The `--dry_run` plan: what a run would train and write, computed without loading any weights.

The plan (the base model's architecture and the training resolution, adapted modules per part, trainable
parameters, effective rank, file size, steps, effective batch, warnings about known-bad settings) is computed
on models built on the `meta` device from the base model's configs (`models.load_meta_models`; a single-file
base from its config folder), so it costs no memory and loads no weights. Text-encoder parts are named as the
Kohya file names them: `text_encoder` (`lora_te_`) for SD1.x/SD2.x, `te1` / `te2` (`lora_te1_` / `lora_te2_`)
for SDXL's two encoders. Only the dry run uses this module; the run's adapter configs and step schedule come
from `models.py` and `data.py`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..model import adapter_layers, inject_adapter
from ..utils import BYTES_PER_ELEMENT, human_size
from .buckets import bucket_table, count_batches
from .conditioning import check_text_encoding
from .config import TrainConfig
from .data import Schedule, compute_schedule, scan_training_data
from .models import (
    ADAPTER_NAME,
    base_model_arch,
    load_meta_models,
    load_tokenizer,
    resolve_arch_defaults,
    text_encoder_adapter_config,
    unet_adapter_config,
)
from .optimizers import check_optimizer, optimizer_warnings
from .patterns import check_patterns_on, pattern_lines

HEADER_BYTES_PER_TENSOR = 160  # safetensors header entry: name, dtype, shape, offsets
FILE_OVERHEAD_BYTES = 8 + 2048  # header length field and the metadata
ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# Plan part names of the trained text encoders, by how many there are: the Kohya file's `lora_te_` (one) or
# `lora_te1_` / `lora_te2_` (SDXL).
TEXT_ENCODER_PARTS = {1: ("text_encoder",), 2: ("te1", "te2")}


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
    file_bytes: int  # expected size of the Kohya file, in bytes
    schedule: Schedule | None
    warnings: list[str]
    tensor_bytes: int = 0  # bytes of the Kohya file's tensors (exact): factors and alphas in save_precision
    arch: str | None = None  # "sd1" | "sd2" | "sdxl"
    patterns: list[str] = field(default_factory=list)  # `patterns.pattern_lines`: what each key changed


def _part_name(prefix: str, module_path: str) -> str:
    head = module_path.split(".")[0]
    return f"{prefix}.{head}" if prefix == "unet" else prefix


def _layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    kernel = "x".join(map(str, getattr(layer, "kernel_size", ())))
    return f"conv {kernel}"


def describe_adapters(
    model: nn.Module, prefix: str, save_precision: str
) -> tuple[list[PartPlan], int, int, int]:
    """Per-part module counts, parameters and effective ranks of `model`'s adapters, the total parameter
    count, the bytes of their tensors in a Kohya file saved in `save_precision` ("fp32"/"fp16"/"bf16": every
    factor and each module's 0-dim alpha in that dtype, as `formats.kohya.save_kohya` writes them), and those
    bytes plus an estimate of their header entries."""
    parts: dict[str, PartPlan] = {}
    total_params = 0
    tensor_bytes = 0
    header_bytes = 0
    for path, layer in adapter_layers(model).items():
        for adapter in layer.adapters.values():
            part = parts.setdefault(_part_name(prefix, path), PartPlan(_part_name(prefix, path)))
            tensors = adapter.state_tensors()
            numel = sum(t.numel() for t in tensors.values())
            part.modules += 1
            part.parameters += numel
            part.kinds[_layer_kind(layer.base_layer)] += 1
            part.effective_ranks.add(adapter.effective_rank)
            total_params += numel
            # The tensors and one 0-dim alpha per module, all in save_precision; a header entry per tensor.
            tensor_bytes += (numel + 1) * BYTES_PER_ELEMENT[save_precision]
            header_bytes += HEADER_BYTES_PER_TENSOR * (len(tensors) + 1)
    return list(parts.values()), total_params, tensor_bytes, tensor_bytes + header_bytes


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
    if (cfg.validation_steps or cfg.validation_epochs) and not (
        cfg.validation_prompt or cfg.validation_prompts
    ):
        warnings.append(
            "validation_steps/validation_epochs is set but there are no validation prompts: no validation images."
        )
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
    warnings += optimizer_warnings(cfg)
    return warnings


def build_plan(
    cfg: TrainConfig, num_samples: int | None = None, num_processes: int = 1, arch: str | None = None
) -> Plan:
    """The dry-run plan for `cfg` (`num_samples`: samples per epoch of the scanned dataset, if known) on a base
    model of architecture `arch` (None: `models.base_model_arch(cfg)`, and `resolve_arch_defaults` fills the
    architecture's defaults into `cfg` in place). With `train_text_encoder` the plan holds every text encoder
    the run trains (SDXL: `te1` and `te2`).

    Raises:
        ConfigError: the base model's configs cannot be read (see `models.load_meta_models`,
            `models.base_model_arch`), the adapter settings are inconsistent (see
            `models.unet_adapter_config`) or a `rank_pattern`/`alpha_pattern` key sets no module (see
            `patterns.check_patterns_on`).
    """
    if arch is None:
        arch = base_model_arch(cfg)
        resolve_arch_defaults(cfg, arch)
    unet, text_encoders = load_meta_models(cfg)
    unet_config, unet_names = unet_adapter_config(cfg), [name for name, _ in unet.named_modules() if name]
    inject_adapter(unet, unet_config, ADAPTER_NAME)
    uses = check_patterns_on(cfg, unet_config, list(adapter_layers(unet)), unet_names)
    parts, params, tensor_bytes, size = describe_adapters(unet, "unet", cfg.save_precision)
    te_config = text_encoder_adapter_config(cfg)
    if text_encoders and te_config is not None:
        for text_encoder, name in zip(text_encoders, TEXT_ENCODER_PARTS[len(text_encoders)]):
            inject_adapter(text_encoder, te_config, ADAPTER_NAME)
            te_parts, te_params, te_tensors, te_size = describe_adapters(
                text_encoder, name, cfg.save_precision
            )
            parts, params = parts + te_parts, params + te_params
            tensor_bytes, size = tensor_bytes + te_tensors, size + te_size
    schedule = compute_schedule(cfg, num_samples, num_processes) if num_samples else None
    return Plan(
        parts,
        params,
        size + FILE_OVERHEAD_BYTES,
        schedule,
        setting_warnings(cfg),
        tensor_bytes,
        arch,
        patterns=pattern_lines(cfg, uses),
    )


def _base_facts(cfg: TrainConfig, plan: Plan) -> str:
    """The header's base-model facts (architecture, training resolution), those known: " (SDXL, 1024 px)"."""
    facts = [ARCH_NAMES.get(plan.arch, plan.arch)] if plan.arch else []
    facts += [f"{cfg.resolution} px"] if cfg.resolution else []
    return f" ({', '.join(facts)})" if facts else ""


def _plural(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


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
        + f" on {cfg.pretrained_model_name_or_path}{_base_facts(cfg, plan)}",
        f"  {'part':<20} {'modules':>7} {'params':>12}  {'layers':<40} {rank_word}",
    ]
    for part in plan.parts:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(part.kinds.items()))
        ranks = "/".join(str(r) for r in sorted(part.effective_ranks))
        lines.append(f"  {part.name:<20} {part.modules:>7} {part.parameters:>12,}  {kinds:<40} {ranks}")
    modules = sum(p.modules for p in plan.parts)
    lines.append(f"  {'total':<20} {modules:>7} {plan.trainable_parameters:>12,}")
    lines += [f"  {line}" for line in plan.patterns]
    lines.append(f"Expected file size ({cfg.save_precision}): {human_size(plan.file_bytes)}")
    if data_line:
        lines.append(f"Data: {data_line}")
    if plan.schedule:
        s = plan.schedule
        lines.append(
            f"Steps: {s.max_train_steps} optimizer steps = {_plural(s.num_epochs, 'epoch')} of "
            f"{s.update_steps_per_epoch} steps; effective batch {s.total_batch_size} = {cfg.train_batch_size} per "
            f"device x {cfg.gradient_accumulation_steps} accumulation x {_plural(s.num_processes, 'process', 'processes')}"
        )
    for warning in plan.warnings:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def dry_run(cfg: TrainConfig, num_processes: int | None = None) -> str:
    """The `--dry_run` plan as text: checks the data and the model's configs, loads no weights, writes nothing.

    First the base model's architecture (`models.base_model_arch`: a folder's UNet config or a single file's
    header) and the defaults it sets (`models.resolve_arch_defaults`: the resolution), as `train` does, so the
    data is scanned at the resolution the run would use. The data part is the scan's full report
    (`DatasetSummary.report`), caption lengths counted with the base model's tokenizer when it can be loaded.
    `num_processes` defaults to accelerate's (the launcher's) process count.

    With `enable_bucket` the data part ends with the bucket table (`buckets.bucket_table`) and the schedule
    counts batches per bucket.

    Raises:
        DataError: the training data cannot be used (see `data.scan_dataset`), or with `enable_bucket` an
            image gets no bucket (see `buckets.assign_records`).
        ConfigError: as `build_plan` and `optimizers.check_optimizer`, or the bucket settings do not fit together
            (`buckets.BucketSettings.from_config`).
    """
    arch = base_model_arch(cfg)
    resolve_arch_defaults(cfg, arch)
    check_optimizer(cfg, 2 if arch == "sdxl" else 1)  # as `train` does, before the scan
    check_text_encoding(cfg, arch)  # clip_skip is refused for SDXL
    try:
        tokenizer, no_tokenizer = load_tokenizer(cfg), None
    except ConfigError as exc:
        tokenizer, no_tokenizer = None, str(exc).splitlines()[0]
    summary = scan_training_data(cfg, tokenizer, log=False)
    if num_processes is None:
        from accelerate import PartialState

        num_processes = PartialState().num_processes
    plan = build_plan(cfg, summary.num_samples, num_processes, arch=arch)
    data = summary.report()
    if cfg.enable_bucket:  # batches of one bucket each: the schedule counts them per bucket
        records = summary.epoch_records
        batches = count_batches(cfg, records)
        plan.schedule = compute_schedule(cfg, summary.num_samples, num_processes, num_batches=batches)
        data += "\n  " + bucket_table(cfg, records).replace("\n", "\n  ")
    if no_tokenizer:
        data += f"\n  caption lengths not checked (no tokenizer: {no_tokenizer})"
    return format_plan(cfg, plan, data)
