"""Training-state checkpoints for resuming: accelerate `save_state`/`load_state` with only the adapter weights,
and the check that a resume continues the same run.

A checkpoint folder `checkpoint-<step>/` holds the adapter tensors (`unet_adapter.safetensors`,
`text_encoder_adapter.safetensors`), the optimizer, LR scheduler, scaler and RNG states written by accelerate,
`TrainState` (global step, epoch geometry) and `run_record.json`: the settings of the run, the fingerprint of
its data (`dataset_fingerprint`) and the settings changed by earlier resumes. Data position follows from the
step, because the sample order is a function of (seed, epoch) — see `data.py`. The files users load are
written by `export.py`.

What a resume may change (`check_resume`): the settings in `APPLIED_ON_RESUME` (optimizer hyperparameters,
the LR schedule, the length, precision) are used from the resumed step on; those in `REFUSED_ON_RESUME` (the
data, the batch geometry, the seed, the adapter, the objective) and any change of the data are refused,
every difference named; all other settings (outputs, logging, validation, checkpointing, memory options) are
free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, format_problems
from ..model import get_adapter_state_dict, set_adapter_state_dict
from ..utils import format_number
from .config import TrainConfig
from .data import DatasetSummary
from .models import ADAPTER_NAME

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RUN_RECORD = "run_record.json"  # in every checkpoint folder: settings, data fingerprint, earlier changes
RUN_RECORD_FORMAT = 1

_GEOMETRY = "the batch geometry: the data position is computed from the step"
_SAMPLES = "what a training sample is"
_ADAPTER = "the adapter: its tensors, or what they mean"
_OBJECTIVE = "the training objective"
_ADAPTER_SETTINGS = (
    "algo",
    "rank",
    "alpha",
    "conv_rank",
    "conv_alpha",
    "use_effective_conv2d",
    "preset",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "train_text_encoder",
    "rank_dropout",
    "module_dropout",
)
# Settings a resume refuses to change (`run_settings` names), with what they shape. The data is compared too.
REFUSED_ON_RESUME: dict[str, str] = {
    "seed": "the sample order, augmentation, noise, timesteps and dropout masks",
    **dict.fromkeys(("train_batch_size", "gradient_accumulation_steps", "num_processes"), _GEOMETRY),
    **dict.fromkeys(
        ("resolution", "center_crop", "random_flip", "caption_dropout_rate", "background_color"), _SAMPLES
    ),
    **dict.fromkeys(_ADAPTER_SETTINGS, _ADAPTER),
    **dict.fromkeys(("prediction_type", "snr_gamma", "noise_offset"), _OBJECTIVE),
    "use_8bit_adam": "the optimizer state's format",
}
# Settings a resume applies from the resumed step on (the loop logs each change and records it in the file).
OPTIMIZER_SETTINGS = (
    "learning_rate",
    "text_encoder_lr",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "adam_weight_decay",
)  # read back from the restored optimizer (`models.optimizer_settings`)
SCHEDULE_SETTINGS = ("lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "max_train_steps")
APPLIED_ON_RESUME = (*OPTIMIZER_SETTINGS, "max_grad_norm", *SCHEDULE_SETTINGS, "mixed_precision")
# Settings whose change is allowed with a warning: a moved base model folder is the same model.
WARNED_ON_RESUME = ("pretrained_model_name_or_path", "revision")


@dataclass
class TrainState:
    """Progress saved with every checkpoint; the batch geometry guards against resuming with other settings."""

    global_step: int = 0
    update_steps_per_epoch: int = 0
    total_batch_size: int = 0
    seed: int = 0

    def state_dict(self) -> dict[str, Any]:
        """The fields as a dict (accelerate pickles it into `custom_checkpoint_0.pkl`)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the fields from `state_dict()`'s output."""
        for key, value in state.items():
            setattr(self, key, value)

    @property
    def geometry(self) -> tuple[int, int, int]:
        """(optimizer steps per epoch, samples per optimizer step over all processes, seed): what must not
        change across a resume for the data order and schedule to continue where they stopped."""
        return (self.update_steps_per_epoch, self.total_batch_size, self.seed)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-<step>` folders in `output_dir`, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names: `latest` is the newest in output_dir (None if there is
    none); a bare `checkpoint-500` is looked up in output_dir, as in diffusers.

    Raises:
        ConfigError: the named folder is not a checkpoint (the message lists the existing ones).
    """
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(cfg.output_dir)
        if not checkpoints:
            logger.warning(
                "resume_from_checkpoint = 'latest' but %s has no checkpoints; starting fresh", cfg.output_dir
            )
            return None
        return checkpoints[-1]
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_dir() and (Path(cfg.output_dir) / path).is_dir():
        path = Path(cfg.output_dir) / path  # `--resume_from_checkpoint checkpoint-500`, as in diffusers
    if not (path / "unet_adapter.safetensors").is_file():
        raise ConfigError(
            f"resume_from_checkpoint = {cfg.resume_from_checkpoint!r}: {path} is not a checkpoint folder "
            f"(expected {CHECKPOINT_PREFIX}<step>/ written by checkpointing_steps); existing: "
            f"{[p.name for p in list_checkpoints(cfg.output_dir)] or 'none'}"
        )
    return path


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that one more fits under `total_limit`; returns the deleted folders."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - total_limit + 1)]
    for path in doomed:
        logger.info("removing old checkpoint %s (checkpoints_total_limit = %d)", path, total_limit)
        shutil.rmtree(path)
    return doomed


def register_adapter_state_hooks(accelerator, models: dict[str, nn.Module]) -> None:
    """Make `save_state`/`load_state` store only the adapter tensors of `models` ({"unet": ..., ...}), not the
    frozen base weights (gigabytes per checkpoint otherwise): `<name>_adapter.safetensors` per model, in the
    adapters' own dtype (float32).

    Loading then raises `ConfigError` when a checkpoint lacks one of those files, and what
    `set_adapter_state_dict` raises when its keys or shapes differ (other adapter settings).
    """

    def find(model: nn.Module) -> str:
        unwrapped = accelerator.unwrap_model(model)
        for name, candidate in models.items():
            if unwrapped is candidate:
                return name
        raise RuntimeError(f"unexpected model {type(unwrapped).__name__} in accelerator state")

    def save_hook(prepared: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        for model in prepared:
            name = find(model)
            if accelerator.is_main_process:
                state = get_adapter_state_dict(models[name], ADAPTER_NAME)
                save_file(
                    {k: v.contiguous() for k, v in state.items()},
                    str(Path(output_dir) / f"{name}_adapter.safetensors"),
                )
        weights.clear()  # accelerate must not write the full models

    def load_hook(prepared: list[nn.Module], input_dir: str) -> None:
        for model in prepared:
            name = find(model)
            path = Path(input_dir) / f"{name}_adapter.safetensors"
            if not path.is_file():
                raise ConfigError(
                    f"checkpoint {input_dir} has no {path.name}; was it written with other settings?"
                )
            set_adapter_state_dict(models[name], load_file(str(path)), ADAPTER_NAME)
        prepared.clear()  # loaded here; accelerate must not load full models

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    total_limit: int | None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Save the training state after optimizer step `step` as `<output_dir>/checkpoint-<step>/`, first
    deleting the oldest checkpoints so that at most `total_limit` remain, with `record` (`make_run_record`)
    as its `run_record.json`. Every process must call it."""
    path = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process and record is not None:
        (path / RUN_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
    logger.info("saved training state %s", path)
    return path


def load_checkpoint(accelerator: Any, path: str | Path, state: TrainState) -> None:
    """Restore the training state saved in `path` into the prepared objects and `state` (registered with
    `accelerator.register_for_checkpointing`), which holds this run's geometry before the call.

    Raises:
        ConfigError: the checkpoint was written with another geometry (steps per epoch, total batch size,
            seed), or lacks an adapter file (see `register_adapter_state_hooks`).
    """
    expected = state.geometry
    accelerator.load_state(str(path))
    if state.geometry != expected:
        raise ConfigError(
            f"cannot resume from {path}: it was written with (steps per epoch, total batch size, seed) "
            f"= {state.geometry}, this run has {expected}; keep the dataset, batch settings, process count and "
            "seed"
        )
    logger.info("resumed from %s at step %d", path, state.global_step)


def run_settings(
    cfg: TrainConfig, *, num_processes: int, mixed_precision: str, max_train_steps: int | None = None
) -> dict[str, Any]:
    """The settings of a run as a resume compares them: every config field as given (`alpha` None stays None:
    a changed rank is then one difference, not three), except `text_encoder_lr`, the rate in effect (None
    without `train_text_encoder`); plus the process count, accelerate's resolved `mixed_precision` and the
    schedule's `max_train_steps` (also when it comes from `num_train_epochs`; None where not known yet)."""
    settings = cfg.to_dict()
    settings.update(
        text_encoder_lr=(cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else None,
        num_processes=num_processes,
        mixed_precision=mixed_precision,
        max_train_steps=max_train_steps,
    )
    return settings


def dataset_fingerprint(summary: DatasetSummary) -> dict[str, Any]:
    """What identifies the training data: per image its path relative to the data folder, its size in bytes,
    the sha256 of its caption and its repeats (not the modification time, nor the folder itself: a copied or
    moved dataset still matches). `{"root": str, "files": {relative path: {"size", "caption", "repeats"}},
    "digest": sha256 of the files}`.

    Raises:
        OSError: an image file can no longer be read (it was scanned moments before).
    """
    files: dict[str, dict[str, Any]] = {}
    for record in summary.records:
        name = Path(os.path.relpath(record.path, summary.root)).as_posix()
        key, n = name, 1
        while key in files:  # a metadata.jsonl may list an image twice
            n += 1
            key = f"{name} (#{n})"
        files[key] = {
            "size": record.path.stat().st_size,
            "caption": hashlib.sha256(record.caption.encode("utf-8")).hexdigest()[:16],
            "repeats": record.repeats,
        }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()
    return {"root": str(summary.root), "files": files, "digest": digest}


def make_run_record(
    settings: dict[str, Any],
    fingerprint: dict[str, Any],
    changes: list[dict[str, Any]],
    *,
    step: int,
    started_at: float,
) -> dict[str, Any]:
    """The `run_record.json` of a checkpoint after optimizer step `step`: `run_settings`, the
    `dataset_fingerprint`, the changes applied by earlier resumes (`{"after_step", "setting", "old", "new"}`)
    and when the run started (Unix time)."""
    return {
        "format": RUN_RECORD_FORMAT,
        "step": step,
        "started_at": started_at,
        "settings": settings,
        "dataset": fingerprint,
        "changes": changes,
    }


def read_run_record(path: str | Path) -> dict[str, Any] | None:
    """The `run_record.json` of checkpoint folder `path`, or None when it has none (written before records).

    Raises:
        ConfigError: the file is not valid JSON.
    """
    file = Path(path) / RUN_RECORD
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON ({exc}); resume from another checkpoint") from None


@dataclass(frozen=True)
class ResumeCheck:
    """A checkpoint `check_resume` accepted, with its `run_record.json` (None: an older checkpoint without one)."""

    path: Path
    record: dict[str, Any] | None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The setting changes of earlier resumes of this run (`{"after_step", "setting", "old", "new"}`)."""
        return list(self.record.get("changes", [])) if self.record else []

    def applied_changes(
        self, settings: dict[str, Any], restored_optimizer: dict[str, Any]
    ) -> list[tuple[str, Any, Any]]:
        """`(setting, old, new)` for each `APPLIED_ON_RESUME` setting this run changes: old values from the
        restored optimizer (`models.optimizer_settings`, what was really in use) and the record, new ones
        from this run's `run_settings`."""
        old = {**(self.record or {}).get("settings", {}), **restored_optimizer}
        return [
            (key, old[key], settings.get(key))
            for key in APPLIED_ON_RESUME
            if key in old and old[key] is not None and old[key] != settings.get(key)
        ]


def show_value(value: Any) -> str:
    """A setting's value as messages show it and a flag takes it: `0.001`, `1e-05`, `2`, `true`, `none`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return format_number(value) if abs(value) < 1e15 else repr(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def dataset_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The differences between two `dataset_fingerprint`s' files, as `errors.format_problems` groups:
    images removed, added, and changed (caption, size or repeats), each named by its relative path."""
    old_files, new_files = old.get("files", {}), new.get("files", {})
    changed = []
    for name in sorted(old_files.keys() & new_files.keys()):
        a, b = old_files[name], new_files[name]
        what = ["caption"] if a["caption"] != b["caption"] else []
        what += [f"{key} {a[key]} → {b[key]}" for key in ("size", "repeats") if a[key] != b[key]]
        if what:
            changed.append(f"{name}: {', '.join(what)}")
    return [
        ("image(s) removed", sorted(old_files.keys() - new_files.keys())),
        ("image(s) added", sorted(new_files.keys() - old_files.keys())),
        ("image(s) changed", changed),
    ]


def refused_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`"<setting>: <old> → <new> (<what it shapes>)"` for each `REFUSED_ON_RESUME` setting that differs
    between two `run_settings` (settings an older record lacks are not compared), and for a switch to fp16
    (a checkpoint written without fp16 has no gradient-scaler state)."""
    problems = [
        f"{key}: {show_value(old[key])} → {show_value(new.get(key))} ({why})"
        for key, why in REFUSED_ON_RESUME.items()
        if key in old and old[key] != new.get(key)
    ]
    if new.get("mixed_precision") == "fp16" and old.get("mixed_precision", "fp16") != "fp16":
        problems.append(
            f"mixed_precision: {old['mixed_precision']} → fp16 (the checkpoint has no fp16 gradient-scaler "
            "state; resume with bf16 or no)"
        )
    return problems


def _restore_hint(old: dict[str, Any], new: dict[str, Any]) -> str:
    flags = []
    for key in REFUSED_ON_RESUME:
        if key in old and old[key] != new.get(key):
            if key == "num_processes":
                flags.append(f"(launch {old[key]} processes)")
            elif not isinstance(old[key], (list, dict)):
                flags.append(f"--{key} {show_value(old[key])}")
            else:
                flags.append(f"--{key} as before")
    return "to continue this run, use its settings again: " + " ".join(flags)


def check_resume(
    path: Path | None, settings: dict[str, Any], fingerprint: dict[str, Any]
) -> ResumeCheck | None:
    """Check, before any model is loaded, that the checkpoint `path` (None: no resume) was written by this
    run: same data (`dataset_fingerprint`) and the same `REFUSED_ON_RESUME` settings (`run_settings`). A
    checkpoint without `run_record.json` (written before records) is accepted with a warning: only its batch
    geometry can be checked (by `load_checkpoint`). A changed base-model path or revision is a warning.

    Raises:
        ConfigError: the data or a refused setting changed; the message names every difference (images
            removed, added, changed; `setting: old → new`) and how to continue or start afresh.
    """
    if path is None:
        return None
    record = read_run_record(path)
    if record is None:
        logger.warning(
            "%s has no %s (written by an older version): the training data and settings cannot be checked, "
            "only the batch geometry; resume only with the data and settings that wrote it",
            path,
            RUN_RECORD,
        )
        return ResumeCheck(path, None)
    old = record.get("settings", {})
    problems = refused_changes(old, settings)
    data = dataset_changes(record.get("dataset", {}), fingerprint)
    data_changed = any(items for _, items in data)
    if problems or data_changed:
        hints = []
        if data_changed:
            hints.append("put the training data back as it was (same files, sizes, captions and repeats)")
        if problems:
            hints.append(_restore_hint(old, settings))
        hints.append("or start a new run: another output_dir, or without resume_from_checkpoint")
        raise ConfigError(
            format_problems(
                f"cannot resume from {path}: this run differs from the one that wrote it",
                [("setting(s) a resume cannot change", problems), *data],
                hints,
            )
        )
    for key in WARNED_ON_RESUME:
        if key in old and old[key] != settings.get(key):
            logger.warning(
                "resume: %s %s → %s; continuing (if this is another model, start a new run instead)",
                key,
                show_value(old[key]),
                show_value(settings.get(key)),
            )
    return ResumeCheck(path, record)
