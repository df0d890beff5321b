"""Training state checkpoints (accelerate `save_state`/`load_state` with only the adapter weights) and the
adapter files a run exports (Kohya `.safetensors`, PEFT-format folder).

A checkpoint folder `checkpoint-<step>/` holds the adapter tensors (`unet_adapter.safetensors`,
`text_encoder_adapter.safetensors`), the optimizer, LR scheduler, scaler and RNG states written by accelerate,
and `TrainState` (global step, epoch geometry). Data position follows from the step, because the sample
order is a function of (seed, epoch) — see `data.py`.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..model import get_adapter_state_dict, set_adapter_state_dict
from .config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_NAME = "default"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainState:
    """Progress saved with every checkpoint; the batch geometry guards against resuming with other settings."""

    global_step: int = 0
    update_steps_per_epoch: int = 0
    total_batch_size: int = 0
    seed: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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
    """The checkpoint `resume_from_checkpoint` names: `latest` is the newest in output_dir (None if there is none)."""
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
    frozen base weights (gigabytes per checkpoint otherwise)."""

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


def base_model_version(unet: nn.Module, prediction_type: str) -> str | None:
    """Kohya's `ss_base_model_version` for SD2 (cross-attention 1024); None lets the exporter detect SD1/SDXL."""
    if unet.config.get("cross_attention_dim") == 1024:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"
    return None


def dataset_facts(records) -> dict[str, Any]:
    """Kohya's `ss_dataset_dirs` and `ss_tag_frequency` (comma-separated tags per image folder)."""
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, Counter] = {}
    for record in records:
        folder = record.path.parent.name
        entry = dirs.setdefault(folder, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
        counter = tags.setdefault(folder, Counter())
        counter.update(t.strip() for t in record.caption.split(",") if t.strip())
    return {"dataset_dirs": dirs, "tag_frequency": {k: dict(v) for k, v in tags.items()}}


def export_kohya(
    path: str | Path,
    cfg: TrainConfig,
    *,
    unet: nn.Module,
    text_encoder: nn.Module | None,
    prediction_type: str,
    training_info: dict[str, Any],
) -> Path:
    """Write the trained adapter(s) as a Kohya/LyCORIS `.safetensors` in `save_precision`, with metadata."""
    from ..formats.kohya import save_kohya

    return save_kohya(
        path,
        unet=unet,
        text_encoder=text_encoder,
        adapter_name=ADAPTER_NAME,
        dtype=SAVE_DTYPES[cfg.save_precision],
        base_model_version=base_model_version(unet, prediction_type),
        output_name=cfg.name,
        training_info=training_info,
    )


def export_peft(
    directory: str | Path, cfg: TrainConfig, *, unet: nn.Module, text_encoder: nn.Module | None
) -> Path:
    """Write the PEFT-format folder(s) (`<dir>/unet/`, and `<dir>/text_encoder/` if trained) in `save_precision`."""
    from ..formats.peft import save_peft

    return save_peft(
        directory,
        unet=unet,
        text_encoder=text_encoder,
        adapter_name=ADAPTER_NAME,
        dtype=SAVE_DTYPES[cfg.save_precision],
    )
