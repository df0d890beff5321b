"""Training-state checkpoints for resuming: accelerate `save_state`/`load_state` with only the adapter weights.

A checkpoint folder `checkpoint-<step>/` holds the adapter tensors (`unet_adapter.safetensors`,
`text_encoder_adapter.safetensors`), the optimizer, LR scheduler, scaler and RNG states written by accelerate,
and `TrainState` (global step, epoch geometry). Data position follows from the step, because the sample
order is a function of (seed, epoch) — see `data.py`. The files users load are written by `export.py`.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..model import get_adapter_state_dict, set_adapter_state_dict
from .config import TrainConfig
from .models import ADAPTER_NAME

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


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


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, total_limit: int | None) -> Path:
    """Save the training state after optimizer step `step` as `<output_dir>/checkpoint-<step>/`, first
    deleting the oldest checkpoints so that at most `total_limit` remain. Every process must call it."""
    path = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
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
