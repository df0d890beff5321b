"""Training-state checkpoints for resuming, in our own pickle-free format, and the check that a resume
continues the same run.

A checkpoint folder `checkpoint-<step>/` holds the adapter tensors (`unet_adapter.safetensors`,
`text_encoder_adapter.safetensors`, SDXL's `text_encoder_2_adapter.safetensors`), the optimizer, LR
scheduler, fp16 gradient-scaler and per-process RNG states (`optimizer.json` + `optimizer.safetensors`,
`scheduler.json`, `scaler.json`, `random_states_<rank>.json` + `.safetensors`; see `statefile.py`),
`train_state.json` (`TrainState`: global step, epoch geometry), `run_record.json` (the settings of the run, the fingerprint of its data
(`dataset_fingerprint`) and the settings changed by earlier resumes) and, written last, the manifest
`checkpoint.json` (format version, every file's size and sha256). Nothing is pickled: accelerate's
`save_state` would write `custom_checkpoint_0.pkl`, which its `load_state` unpickles with `weights_only=False`,
so resuming from someone else's folder could run their code. The optimizer and scheduler are saved with
`state_dict()` / restored with `load_state_dict()` on the objects `accelerator.prepare` returned, as
accelerate's own `save_state` does.

Crash safety: a checkpoint is written into a temporary folder and renamed when complete
(`files.atomic_directory`); only folders whose manifest matches their files count (`list_checkpoints`,
`latest`); older checkpoints are pruned only after the new one is complete. Data position follows from the
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
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from ..errors import ConfigError, format_problems
from ..files import atomic_directory, temporary_name
from ..finite import check_writable
from ..model import get_adapter_state_dict, set_adapter_state_dict
from ..utils import format_number
from .config import TrainConfig
from .data import DatasetSummary
from .models import ADAPTER_NAME, vae_in_float32
from .optimizers import adafactor_relative_step
from .statefile import encode_state, parse_state_files, rng_state, set_rng_state, state_files

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RUN_RECORD = "run_record.json"  # in every checkpoint folder: settings, data fingerprint, earlier changes
RUN_RECORD_FORMAT = 1
MANIFEST = (
    "checkpoint.json"  # written last: a folder without it, or whose files differ from it, is incomplete
)
CHECKPOINT_FORMAT = "loha_diffusion.checkpoint"
CHECKPOINT_VERSION = 1
TRAIN_STATE = "train_state"
# What accelerate's `save_state` wrote (pickles): recognised only to explain why such a folder is refused.
ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_warned: set[str] = set()  # incomplete checkpoint folders already named in a warning

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
        (
            "resolution",
            "center_crop",
            "random_flip",
            "caption_dropout_rate",
            "background_color",
            "enable_bucket",
            "min_bucket_reso",
            "max_bucket_reso",
            "bucket_reso_steps",
            "bucket_no_upscale",
            "shuffle_caption",
            "caption_separator",
            "keep_tokens",
            "keep_tokens_separator",
            "caption_tag_dropout_rate",
            "caption_prefix",
            "caption_suffix",
        ),
        _SAMPLES,
    ),
    "reg_data_dir": "the regularization samples interleaved with the training samples",
    **dict.fromkeys(_ADAPTER_SETTINGS, _ADAPTER),
    **dict.fromkeys(("prediction_type", "snr_gamma", "noise_offset", "prior_loss_weight"), _OBJECTIVE),
    **dict.fromkeys(("max_token_length", "clip_skip"), "the text conditioning the adapter learns from"),
    "model_arch": "the base model's architecture (its text encoders and conditioning)",
    "pretrained_vae_model_name_or_path": "the latents the UNet learns to denoise",
    **dict.fromkeys(("optimizer_type", "optimizer_args"), "the optimizer and its state's format"),
}
# Settings a resume applies from the resumed step on (the loop logs each change and records it in the file).
OPTIMIZER_SETTINGS = (
    "learning_rate",
    "unet_lr",
    "text_encoder_lr",
    "text_encoder_2_lr",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "adam_weight_decay",
)  # read back from the restored optimizer where it has them (`optimizers.optimizer_settings`)
SCHEDULE_SETTINGS = ("lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "max_train_steps")
# `no_half_vae` only changes the precision the frozen VAE encodes in, as `mixed_precision` does.
APPLIED_ON_RESUME = (
    *OPTIMIZER_SETTINGS,
    "max_grad_norm",
    *SCHEDULE_SETTINGS,
    "mixed_precision",
    "no_half_vae",
)
# Settings whose change is allowed with a warning: a moved base model folder (or config folder) is the same model.
WARNED_ON_RESUME = ("pretrained_model_name_or_path", "revision", "model_config")


@dataclass
class TrainState:
    """Progress saved with every checkpoint (`train_state.json`); the batch geometry guards against resuming
    with other settings."""

    global_step: int = 0
    update_steps_per_epoch: int = 0
    total_batch_size: int = 0
    seed: int = 0

    def state_dict(self) -> dict[str, Any]:
        """The fields as a dict of ints."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the fields from `state_dict()`'s output.

        Raises:
            ValueError: a field is missing or not an integer.
        """
        for key in asdict(self):
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} is {value!r}, not an integer")
            setattr(self, key, value)

    @property
    def geometry(self) -> tuple[int, int, int]:
        """(optimizer steps per epoch, samples per optimizer step over all processes, seed): what must not
        change across a resume for the data order and schedule to continue where they stopped."""
        return (self.update_steps_per_epoch, self.total_batch_size, self.seed)


@dataclass(frozen=True)
class Resumable:
    """What a checkpoint stores besides its run record: the trained models by name (`{"unet": ...,
    "text_encoder": ..., "text_encoder_2": ...}`, unwrapped; only their adapter tensors are stored), the
    optimizer and LR scheduler as `accelerator.prepare` returned them, and the `TrainState`."""

    adapters: dict[str, nn.Module]
    optimizer: Any
    lr_scheduler: Any
    state: TrainState


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` folder in `output_dir`, complete or not, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _manifest_error(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{path / MANIFEST}: {problem}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest `checkpoint.json` of checkpoint folder `path`: `{"format", "version", "step", "files":
    {name: {"size": bytes, "sha256": hex}}}`, checked for form (not yet against the files).

    Raises:
        ConfigError: there is none (an interrupted save, or a checkpoint in accelerate's pickle format from an
            older version, which is not loaded because unpickling can run code), or it is not ours.
    """
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        if any((path / name).exists() for name in ACCELERATE_FILES):
            raise _manifest_error(
                path,
                "missing: this checkpoint is in accelerate's pickle format (optimizer.bin, "
                "custom_checkpoint_0.pkl, ...), written by an older version of loha_diffusion; it is not loaded "
                "because unpickling a file can run code. Finish that run with the version that wrote it, or "
                "start again",
            )
        raise _manifest_error(
            path,
            "missing: the save of this checkpoint did not complete (the process was "
            "killed or the disk filled up); resume from another checkpoint",
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _manifest_error(
            path, f"not JSON ({exc}); this is not a checkpoint written by loha_diffusion"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise _manifest_error(path, "not a loha_diffusion checkpoint manifest")
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise _manifest_error(
            path,
            f"version {manifest.get('version')!r}; this version of loha_diffusion reads {CHECKPOINT_VERSION}",
        )
    step = path.name[len(CHECKPOINT_PREFIX) :]
    if str(manifest.get("step")) != step:
        raise _manifest_error(
            path, f"written for step {manifest.get('step')!r}, but the folder is {path.name}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _manifest_error(path, "lists no files")
    for name, entry in files.items():
        if not _FILE_NAME.fullmatch(name) or name == MANIFEST:
            raise _manifest_error(path, f"lists {name!r}, which is not a file name a checkpoint holds")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise _manifest_error(path, f"the entry of {name} has no size and sha256")
    return manifest


def checkpoint_problem(path: str | Path) -> str | None:
    """Why folder `path` is not a complete checkpoint, or None when it is: no manifest, a manifest that is not
    ours, a listed file missing or of another size than listed (cheap: `verify_checkpoint` also compares the
    checksums)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except ConfigError as exc:
        return str(exc)
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing or not a regular file"
        if file.stat().st_size != entry["size"]:
            return f"{file} has {file.stat().st_size} bytes, {MANIFEST} says {entry['size']}"
    return None


def incomplete_checkpoints(output_dir: str | Path) -> list[tuple[Path, str]]:
    """`(folder, problem)` for each `checkpoint-<step>` folder in `output_dir` that is not complete."""
    found = [(path, checkpoint_problem(path)) for path in checkpoint_folders(output_dir)]
    return [(path, problem) for path, problem in found if problem is not None]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `output_dir` (manifest present and consistent with the files), oldest
    (lowest step) first. An incomplete `checkpoint-<step>` folder is left out with a warning (once per
    folder and process)."""
    complete = []
    for path in checkpoint_folders(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        elif str(path) not in _warned:
            _warned.add(str(path))
            logger.warning("ignoring %s, not a complete checkpoint: %s", path, problem)
    return complete


def _complete_names(output_dir: str | Path) -> str:
    return str([p.name for p in list_checkpoints(output_dir)] or "none")


def resolve_resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names: `latest` is the newest complete one in output_dir (None
    if there is no checkpoint folder at all); a bare `checkpoint-500` is looked up in output_dir, as in
    diffusers.

    Raises:
        ConfigError: the named folder is not a complete checkpoint (the message says why and lists the
            complete ones), or `latest` finds only incomplete checkpoints (starting afresh would silently
            throw their progress away).
    """
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(cfg.output_dir)
        if checkpoints:
            return checkpoints[-1]
        incomplete = incomplete_checkpoints(cfg.output_dir)
        if incomplete:
            raise ConfigError(
                format_problems(
                    f"resume_from_checkpoint = 'latest': {cfg.output_dir} has no complete checkpoint",
                    [("incomplete checkpoint folder(s)", [problem for _, problem in incomplete])],
                    [
                        "resume from a complete checkpoint elsewhere, or remove these folders (or choose "
                        "another output_dir) to start a new run"
                    ],
                )
            )
        logger.warning(
            "resume_from_checkpoint = 'latest' but %s has no checkpoints; starting fresh", cfg.output_dir
        )
        return None
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_dir() and (Path(cfg.output_dir) / path).is_dir():
        path = Path(cfg.output_dir) / path  # `--resume_from_checkpoint checkpoint-500`, as in diffusers
    if not path.is_dir():
        raise ConfigError(
            f"resume_from_checkpoint = {cfg.resume_from_checkpoint!r}: {path} is not a checkpoint folder "
            f"(expected {CHECKPOINT_PREFIX}<step>/ written by checkpointing_steps); existing: "
            f"{_complete_names(cfg.output_dir)}"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(
            f"resume_from_checkpoint = {cfg.resume_from_checkpoint!r}: {path} is not a complete checkpoint: "
            f"{problem}. Complete checkpoints in {cfg.output_dir}: {_complete_names(cfg.output_dir)}"
        )
    return path


def prune_checkpoints(
    output_dir: str | Path, total_limit: int | None, keep: Path | None = None
) -> list[Path]:
    """Delete the oldest complete checkpoints (never `keep`, the one just written) so that at most
    `total_limit` remain; returns the deleted folders. Called only after the new checkpoint is complete, so a
    crash never leaves fewer good checkpoints than before. Incomplete folders are left alone. A folder is
    renamed to a temporary name before it is removed: a kill mid-removal leaves a temporary that
    `files.remove_stale_temporaries` clears, not a half-deleted checkpoint."""
    if total_limit is None:
        return []
    others = [p for p in list_checkpoints(output_dir) if keep is None or p.resolve() != keep.resolve()]
    doomed = others[: max(0, len(others) + (keep is not None) - total_limit)]
    for path in doomed:
        logger.info("removing old checkpoint %s (checkpoints_total_limit = %d)", path, total_limit)
        trash = temporary_name(path)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def check_checkpointable(accelerator: Any, resumable: Resumable) -> None:
    """Refuse at the start of a run, not at its first checkpoint, what checkpoints cannot store: DeepSpeed's
    partitioned optimizer, or an optimizer or LR scheduler whose state holds more than tensors and plain
    values.

    Raises:
        ConfigError: names what cannot be stored and the fix.
    """
    if accelerator.distributed_type == "DEEPSPEED":
        raise ConfigError(
            "checkpoints (checkpointing_steps, resume_from_checkpoint) are not supported with DeepSpeed: its "
            "optimizer state is partitioned over processes. Use DDP (sample_configs/accelerate/multi_gpu.yaml) "
            "for a resumable run, or train without checkpoints"
        )
    encode_state(resumable.optimizer.state_dict(), "the optimizer")
    encode_state(resumable.lr_scheduler.state_dict(), "the LR scheduler")


def checkpoint_files(
    accelerator: Any, resumable: Resumable, rng_states: list[dict[str, Any]], record: dict[str, Any]
) -> dict[str, bytes]:
    """The files of a checkpoint, `{name: bytes}`: `<name>_adapter.safetensors` per trained model (the
    adapters' float32 tensors), the optimizer, LR scheduler, fp16 gradient scaler (when there is one),
    `random_states_<rank>` per process (`rng_states`, in rank order) and `train_state` as `statefile`
    JSON + safetensors, and `run_record.json` (`record`).

    Raises:
        NonFiniteError: an adapter tensor is NaN or infinite (`TrainingDivergedError` should have stopped the
            run before).
        ConfigError: a state holds what a checkpoint cannot store (see `statefile.encode_state`).
    """
    files: dict[str, bytes] = {}
    for name, model in resumable.adapters.items():
        tensors = {k: v.detach().contiguous() for k, v in get_adapter_state_dict(model, ADAPTER_NAME).items()}
        check_writable(tensors, None, f"{name}_adapter.safetensors of a checkpoint")
        files[f"{name}_adapter.safetensors"] = save_tensors(tensors)
    files.update(state_files("optimizer", resumable.optimizer.state_dict(), "the optimizer"))
    files.update(state_files("scheduler", resumable.lr_scheduler.state_dict(), "the LR scheduler"))
    if accelerator.scaler is not None:
        files.update(state_files("scaler", accelerator.scaler.state_dict(), "the fp16 gradient scaler"))
    for rank, rng in enumerate(rng_states):
        files.update(state_files(f"random_states_{rank}", rng, "the random state"))
    progress = {**resumable.state.state_dict(), "accelerator_step": accelerator.step}
    files.update(state_files(TRAIN_STATE, progress, "the training progress"))
    files[RUN_RECORD] = json.dumps(record, indent=1).encode("utf-8")
    return files


def _write_file(folder: Path, name: str, data: bytes) -> None:
    # One function for every file of a checkpoint: the crash tests stop the process here.
    (folder / name).write_bytes(data)


def write_checkpoint(path: Path, step: int, files: dict[str, bytes]) -> Path:
    """Write `files` (`{name: bytes}`) as checkpoint folder `path` for optimizer step `step`: into a temporary
    folder, the manifest `checkpoint.json` (every file's size and sha256) last, then renamed to `path`
    (`files.atomic_directory`), so `path` is complete or absent. Returns `path`.

    Raises:
        OutputWriteError: no space left (checked against the checkpoint's size first) or no permission; the
            temporary folder is removed and older checkpoints are untouched.
    """
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "files": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        },
    }
    body = json.dumps(manifest, indent=1).encode("utf-8")
    with atomic_directory(path, needed=sum(map(len, files.values())) + len(body)) as tmp:
        for name, data in files.items():
            _write_file(tmp, name, data)
        _write_file(tmp, MANIFEST, body)
    return path


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    total_limit: int | None,
    resumable: Resumable,
    record: dict[str, Any],
) -> Path:
    """Save the training state after optimizer step `step` as `<output_dir>/checkpoint-<step>/` with `record`
    (`make_run_record`) as its `run_record.json`, then delete the oldest checkpoints so that at most
    `total_limit` remain. Every process must call it: each hands its random state to the main process,
    which writes the folder (`write_checkpoint`); all wait for it.

    Raises:
        OutputWriteError: the folder cannot be written (disk full, permission); older checkpoints are intact.
        NonFiniteError: an adapter tensor is not finite.
        ConfigError: a state holds what a checkpoint cannot store.
    """
    from accelerate.utils import gather_object

    path = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    rng = rng_state()
    rng_states = [rng] if accelerator.num_processes == 1 else gather_object([rng])
    if accelerator.is_main_process:
        write_checkpoint(path, step, checkpoint_files(accelerator, resumable, rng_states, record))
        prune_checkpoints(output_dir, total_limit, keep=path)
    accelerator.wait_for_everyone()
    logger.info("saved training state %s", path)
    return path


def verify_checkpoint(path: str | Path, *, warn_unlisted: bool = True) -> dict[str, Any]:
    """Check that checkpoint folder `path` is complete and that every file is the one its save wrote (the
    sha256 in the manifest); files it does not list (accelerate's `optimizer.bin`, ...) are never read and
    are named in a warning (unless `warn_unlisted` is False). Returns the manifest.

    Raises:
        ConfigError: the folder is incomplete, or a file differs from what was written (the message names it).
    """
    return _read_checkpoint(Path(path), warn_unlisted=warn_unlisted)[0]


def _complete_manifest(path: Path) -> dict[str, Any]:
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"cannot resume from {path}: {problem}")
    return read_manifest(path)


def _read_checkpoint(path: Path, *, warn_unlisted: bool) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and every file it lists (`{name: bytes}`), each read once and checked against its
    sha256 (see `verify_checkpoint`)."""
    manifest = _complete_manifest(path)
    files = {name: _read_verified(path, manifest, name) for name in manifest["files"]}
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in manifest["files"])
    if extra and warn_unlisted:
        logger.warning(
            "%s: ignoring files its %s does not list (never read): %s", path, MANIFEST, ", ".join(extra)
        )
    return manifest, files


def _listed(path: Path, files: Mapping[str, Any], name: str) -> Any:
    # `files`: a manifest's entries or a checkpoint's verified bytes, by file name.
    if name not in files:
        raise ConfigError(f"cannot resume from {path}: it has no {name} ({MANIFEST} does not list it)")
    return files[name]


def _read_verified(path: Path, manifest: dict[str, Any], name: str) -> bytes:
    entry = _listed(path, manifest["files"], name)
    file = path / name
    if not file.is_file():  # also a link to a device such as /dev/zero, which would never end
        raise ConfigError(f"cannot resume from {path}: {file} is missing or not a regular file")
    with open(file, "rb") as f:
        data = f.read(
            entry["size"] + 1
        )  # no more than the manifest promises: a swapped file cannot flood memory
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ConfigError(
            f"cannot resume from {path}: {path / name} is not the file this checkpoint's save wrote (its "
            f"size or sha256 differs from {MANIFEST}); the checkpoint was changed or damaged. Resume from "
            f"another checkpoint ({_complete_names(path.parent)})"
        )
    return data


def _parse_state(path: Path, files: Mapping[str, bytes], name: str) -> Any:
    """The state stored as `name` in a checkpoint's verified `files` (`{file name: bytes}`)."""
    state_files = {f"{name}.json": _listed(path, files, f"{name}.json")}
    if f"{name}.safetensors" in files:
        state_files[f"{name}.safetensors"] = files[f"{name}.safetensors"]
    try:
        return parse_state_files(name, state_files)
    except ValueError as exc:
        raise ConfigError(f"cannot resume from {path}: {exc}") from None


def read_checkpoint_state(path: str | Path, name: str) -> Any:
    """The state stored as `name` (`"optimizer"`, `"scheduler"`, `"train_state"`, `"random_states_0"`, ...) in
    checkpoint folder `path`, after checking the files against the manifest.

    Raises:
        ConfigError: the checkpoint is incomplete, the file differs from what was written, or is malformed.
    """
    path = Path(path)
    manifest = _complete_manifest(path)
    wanted = [f for f in (f"{name}.json", f"{name}.safetensors") if f in manifest["files"]]
    return _parse_state(path, {f: _read_verified(path, manifest, f) for f in wanted}, name)


def load_checkpoint(accelerator: Any, path: str | Path, resumable: Resumable) -> None:
    """Restore the training state saved in `path` into `resumable` (whose `state` holds this run's geometry
    before the call) and the accelerator (gradient scaler, accumulation counter), and this process's random
    states. Only JSON and safetensors are parsed, each file checked against the manifest's sha256 first.

    Raises:
        ConfigError: the checkpoint is incomplete or a file differs from what was written (named), it was
            written with another geometry (steps per epoch, total batch size, seed), lacks an adapter file or
            this process's random state, or its optimizer state does not fit this optimizer.
    """
    path = Path(path)
    # Every file read once and checked before anything changes; check_resume has named unlisted files.
    _, files = _read_checkpoint(path, warn_unlisted=False)
    state = resumable.state
    expected = state.geometry
    progress = _parse_state(path, files, TRAIN_STATE)
    try:
        state.load_state_dict(progress)
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"cannot resume from {path}: {TRAIN_STATE}.json: {exc}") from None
    if state.geometry != expected:
        raise ConfigError(
            f"cannot resume from {path}: it was written with (steps per epoch, total batch size, seed) "
            f"= {state.geometry}, this run has {expected}; keep the dataset, batch settings, process count and "
            "seed"
        )
    for name, model in resumable.adapters.items():
        tensors = load_tensors(_listed(path, files, f"{name}_adapter.safetensors"))
        set_adapter_state_dict(model, tensors, ADAPTER_NAME)
    _restore(path, "optimizer", resumable.optimizer, _parse_state(path, files, "optimizer"))
    _restore(path, "scheduler", resumable.lr_scheduler, _parse_state(path, files, "scheduler"))
    if accelerator.scaler is not None:
        _restore(path, "scaler", accelerator.scaler, _parse_state(path, files, "scaler"))
    rank = f"random_states_{accelerator.process_index}"
    try:
        set_rng_state(_parse_state(path, files, rank))
    except ValueError as exc:
        raise ConfigError(f"cannot resume from {path}: {rank}: {exc}") from None
    accelerator.step = int(progress.get("accelerator_step", 0))
    logger.info("resumed from %s at step %d", path, state.global_step)


def _restore(path: Path, name: str, target: Any, state: Any) -> None:
    try:
        target.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"cannot resume from {path}: {name}.json does not fit this run's {name} ({type(exc).__name__}: "
            f"{exc}); resume with the settings that wrote it"
        ) from None


def run_settings(
    cfg: TrainConfig,
    *,
    num_processes: int,
    mixed_precision: str,
    max_train_steps: int | None = None,
    arch: str | None = None,
) -> dict[str, Any]:
    """The settings of a run as a resume compares them: every config field as given (`alpha` None stays None:
    a changed rank is then one difference, not three), except the text-encoder learning rates, the rates in
    effect (None without `train_text_encoder`; `text_encoder_2_lr` only for SDXL), and no learning rate at all
    (None) with Adafactor's relative step, which computes its own (`optimizers.adafactor_relative_step`); plus
    the process count, accelerate's resolved `mixed_precision` and the schedule's `max_train_steps` (also
    when it comes from `num_train_epochs`; None where not known yet). With the base model's `arch`
    (`models.ARCHS`), `model_arch` is the architecture in effect and `no_half_vae` whether the VAE runs in
    float32 (`models.vae_in_float32`), not what the config left unset."""
    settings = cfg.to_dict()
    te_lr = (cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else None
    settings.update(
        text_encoder_lr=te_lr,
        text_encoder_2_lr=(cfg.text_encoder_2_lr or te_lr) if te_lr and arch in (None, "sdxl") else None,
        num_processes=num_processes,
        mixed_precision=mixed_precision,
        max_train_steps=max_train_steps,
    )
    if arch is not None:
        settings.update(model_arch=arch, no_half_vae=vae_in_float32(cfg, arch))
    if adafactor_relative_step(cfg):
        settings.update(dict.fromkeys(("learning_rate", "unet_lr", "text_encoder_lr", "text_encoder_2_lr")))
    return settings


def dataset_fingerprint(summary: DatasetSummary) -> dict[str, Any]:
    """What identifies the training data: per image its path relative to the data folder, its size in bytes,
    the sha256 of its caption and its repeats (not the modification time, nor the folder itself: a copied or
    moved dataset still matches). `{"root": str, "files": {relative path: {"size", "caption", "repeats"}},
    "digest": sha256 of the files}`. Regularization images (`summary.regularization`) are in `files` too, as
    `"reg_data_dir/<path relative to it>"`, so changed regularization data is refused on resume as well.

    Raises:
        OSError: an image file can no longer be read (it was scanned moments before).
    """
    files: dict[str, dict[str, Any]] = {}
    named = [(summary.root, "", record) for record in summary.records]
    if (reg := summary.regularization) is not None:
        named += [(reg.root, "reg_data_dir/", record) for record in reg.records]
    for root, prefix, record in named:
        name = prefix + Path(os.path.relpath(record.path, root)).as_posix()
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


def read_run_record(path: str | Path) -> dict[str, Any]:
    """The `run_record.json` of checkpoint folder `path`, after checking every file of the checkpoint against
    its manifest (`verify_checkpoint`).

    Raises:
        ConfigError: the checkpoint is incomplete or changed, or the record is not a JSON object.
    """
    path = Path(path)
    _, files = _read_checkpoint(path, warn_unlisted=True)
    data = _listed(path, files, RUN_RECORD)
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path / RUN_RECORD} is not valid JSON ({exc}); resume from another checkpoint"
        ) from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path / RUN_RECORD} is not a run record; resume from another checkpoint")
    return record


@dataclass(frozen=True)
class ResumeCheck:
    """A checkpoint `check_resume` accepted, with its `run_record.json`."""

    path: Path
    record: dict[str, Any]

    @property
    def history(self) -> list[dict[str, Any]]:
        """The setting changes of earlier resumes of this run (`{"after_step", "setting", "old", "new"}`)."""
        return list(self.record.get("changes", []))

    def applied_changes(
        self, settings: dict[str, Any], restored_optimizer: dict[str, Any]
    ) -> list[tuple[str, Any, Any]]:
        """`(setting, old, new)` for each `APPLIED_ON_RESUME` setting this run changes: old values from the
        restored optimizer (`optimizers.optimizer_settings`, what was really in use) and the record, new ones
        from this run's `run_settings`."""
        old = {**self.record.get("settings", {}), **restored_optimizer}
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
    """Check, before any model is loaded, that the checkpoint `path` (None: no resume) is intact (every file
    as its save wrote it, `verify_checkpoint`) and was written by this run: same data (`dataset_fingerprint`)
    and the same `REFUSED_ON_RESUME` settings (`run_settings`). A changed base-model path or revision is a
    warning.

    Raises:
        ConfigError: the checkpoint is incomplete or a file was changed (named); the data or a refused setting
            changed (the message names every difference: images removed, added, changed; `setting: old →
            new`, and how to continue or start afresh).
    """
    if path is None:
        return None
    record = read_run_record(path)
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
