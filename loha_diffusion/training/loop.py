"""The training run, as named steps over a `Run` in the order of diffusers' train_text_to_image_lora.py:
accelerator → models → adapters → optimizer → data → schedule → prepare → resume → loop → export.

`train(cfg)` reads top to bottom as those steps. The loop's parts are functions too: `train_step` (one
micro-batch), `end_step` (count and log an optimizer step), `after_step` (the checkpoint / export /
validation policy), `after_epoch` and `finish` (the final files). `main(argv)` is the command line;
`scripts/train_loha_sd.py` parses first (without importing torch) and then calls `run_config`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, LoHaDiffusionError, TrainingDivergedError
from ..files import atomic_write_text, remove_stale_temporaries
from ..finite import non_finite_modules
from ..model import get_adapter_state_dict
from ..utils import format_number
from .buckets import BucketBatchSampler, check_buckets
from .checkpoint import (
    SCHEDULE_SETTINGS,
    Resumable,
    ResumeCheck,
    TrainState,
    check_checkpointable,
    check_resume,
    dataset_fingerprint,
    list_checkpoints,
    load_checkpoint,
    make_run_record,
    resolve_resume_path,
    run_settings,
    save_checkpoint,
    show_value,
)
from .conditioning import TextEncoding, check_text_encoding, conditioning_from_states, unet_conditioning
from .config import TrainConfig, load_config, report_user_error
from .data import (
    DatasetSummary,
    EpochSampler,
    Schedule,
    compute_schedule,
    scan_training_data,
    training_dataloader,
)
from .export import export_kohya, export_peft, training_metadata
from .latent_cache import attach_latent_cache
from .models import (
    ADAPTER_NAME,
    Models,
    add_adapters,
    base_model_arch,
    freeze_base_models,
    load_models,
    load_tokenizers,
    resolve_arch_defaults,
    text_encoder_adapter_config,
    unet_adapter_config,
    vae_in_float32,
    weight_dtype,
)
from .optimizers import (
    apply_optimizer_settings,
    check_optimizer,
    group_learning_rates,
    make_lr_scheduler,
    make_optimizer,
    optimizer_settings,
    trainable_param_groups,
    unet_rate_setting,
)
from .patterns import check_run_patterns
from .plan import dry_run
from .step import (
    denoising_loss,
    derive_seed,
    encode_latents,
    resolve_prediction_type,
    sample_latents,
    sample_noise_and_timesteps,
)
from .text_cache import TextEncoderCache, text_encoder_cache
from .tracker import Tracker
from .validation import Validator, fixed_denoising_loss, make_validator

__all__ = ["Run", "TrainConfig", "TrainResult", "dry_run", "load_config", "main", "run_config", "train"]

logger = logging.getLogger("loha_diffusion.training")


@dataclass
class TrainResult:
    """Where a run put its outputs, and its last numbers."""

    output_dir: Path
    global_step: int
    kohya_file: Path | None = None
    peft_dir: Path | None = None
    validation_images: list[Path] = field(default_factory=list)
    logging_dir: Path | None = None
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> fixed-set denoising loss
    last_loss: float | None = None


@dataclass
class Run:
    """A prepared training run: what the steps of `train` share.

    `models` holds the unwrapped modules (checkpoints, exports and validation read their adapters); `unet`,
    `text_encoder` and `text_encoder_2` (SDXL, else None) are what `accelerator.prepare` returned (the
    training step calls them; the text encoders are prepared only when trained). `state.global_step` counts
    optimizer steps, `epoch` is the 0-based epoch in progress, `micro_step`/`loss_sum` the micro-batches since
    the last optimizer step and their summed losses. `fingerprint` identifies the data (`checkpoint.dataset_fingerprint`); `changes` are
    the settings resumes changed (`{"after_step", "setting", "old", "new"}`), kept in checkpoints and files."""

    cfg: TrainConfig
    accelerator: Any
    summary: DatasetSummary
    schedule: Schedule
    models: Models
    unet: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module | None
    prediction_type: str
    params: list[nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    loader: Iterable[dict[str, Any]]
    sampler: EpochSampler | BucketBatchSampler
    state: TrainState
    tracker: Tracker
    result: TrainResult
    validator: Validator | None = None
    text_cache: TextEncoderCache | None = None  # cache_text_encoder_outputs: captions encoded once
    fingerprint: dict[str, Any] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)  # Unix time, for the file metadata
    last_finite_loss: tuple[int, float] | None = None  # (step, loss), for the message of a NaN loss
    epoch: int = 0
    micro_step: int = 0
    loss_sum: float = 0.0
    progress: Any = None  # tqdm bar of optimizer steps (main process shows it)

    @property
    def output_dir(self) -> Path:
        """Where the run writes its files (`cfg.output_dir`)."""
        return Path(self.cfg.output_dir)

    @property
    def is_main(self) -> bool:
        """True in the process that writes files, logs and validates (accelerate's main process)."""
        return self.accelerator.is_main_process

    @property
    def adapters(self) -> dict[str, nn.Module]:
        """The trained models by checkpoint name (`{"unet": ...}`, plus `"text_encoder"` and for SDXL
        `"text_encoder_2"` when the text encoders are trained)."""
        trained = {"unet": self.models.unet}
        if self.cfg.train_text_encoder:
            trained["text_encoder"] = self.models.text_encoder
            if self.models.text_encoder_2 is not None:
                trained["text_encoder_2"] = self.models.text_encoder_2
        return trained

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoders the training step calls: the prepared ones when trained, first then second."""
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]

    @property
    def resumable(self) -> Resumable:
        """What a checkpoint saves and restores: the adapters, the prepared optimizer and LR scheduler, the state."""
        return Resumable(self.adapters, self.optimizer, self.lr_scheduler, self.state)


def train(cfg: TrainConfig, *, stop_at_step: int | None = None) -> TrainResult:
    """Run the training `cfg` describes and return where the outputs are.

    `stop_at_step` stops after that optimizer step without the final export, as if the job were killed
    there (tests use it with `checkpointing_steps` to check that resume is exact).

    Raises:
        ConfigError: a setting, the base model, the launcher or a checkpoint to resume cannot be used (a
            resume with other data or a setting it cannot change is refused before any model is loaded).
        DataError: the training data cannot be used (checked before any model is loaded).
        TrainingDivergedError: the loss or the adapter weights became NaN or infinite (the message says what
            to change; nothing of that step is saved).
        OutputWriteError: a checkpoint or file cannot be written (disk full, permission); earlier outputs are
            intact.
    """
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    # Data and settings first: their errors should stop the run before minutes of model loading.
    # The architecture from the configs (it sets the default resolution), and only the tokenizers (small
    # files, no weights), so the scan can count caption tokens.
    arch = base_model_arch(cfg)
    resolve_arch_defaults(cfg, arch)
    check_optimizer(cfg, 2 if arch == "sdxl" else 1)  # optimizer_args against its signature, the schedule
    check_text_encoding(cfg, arch)  # clip_skip is refused for SDXL before any weights load
    if cfg.text_encoder_2_lr is not None and not (arch == "sdxl" and cfg.train_text_encoder):
        logger.warning(
            "text_encoder_2_lr is ignored: only SDXL with train_text_encoder has a second text encoder"
        )
    tokenizers = load_tokenizers(cfg)
    summary = scan_training_data(cfg, tokenizers[0])
    logger.info("data: %s", "\n  ".join([summary.describe(), *summary.facts()]))
    check_buckets(cfg, summary)  # bucket settings and every image's bucket, before any model is loaded
    unet_config, te_config = unet_adapter_config(cfg), text_encoder_adapter_config(cfg)
    check_run_patterns(cfg, unet_config)  # on the weightless UNet: keys that would set nothing
    fingerprint = dataset_fingerprint(summary)
    settings = run_settings(
        cfg, num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision, arch=arch
    )
    resume = check_resume(resolve_resume_path(cfg), settings, fingerprint)

    models = load_models(cfg, tokenizers)
    prediction_type = resolve_prediction_type(models.noise_scheduler, cfg.prediction_type)
    dtype = weight_dtype(accelerator.mixed_precision)
    freeze_base_models(models, accelerator.device, dtype, vae_float32=vae_in_float32(cfg, models.arch))
    # Seeded after loading (a single-file load draws random initialisations before the weights replace them):
    # the same adapter initialisation in every process, whatever the base model's format.
    set_seed(cfg.seed)
    add_adapters(models, cfg, unet_config, te_config)
    optimizer = make_optimizer(cfg, trainable_param_groups(cfg, models), accelerator.mixed_precision)
    loader, sampler = training_dataloader(cfg, summary)
    attach_latent_cache(cfg, loader.dataset, models.vae, accelerator)  # cache_latents: VAE once per image
    schedule = compute_schedule(cfg, len(loader.dataset), accelerator.num_processes, num_batches=len(loader))
    lr_scheduler = make_lr_scheduler(cfg, optimizer, schedule.max_train_steps, accelerator.num_processes)
    run = prepare(
        accelerator, cfg, summary, schedule, models, prediction_type, optimizer, lr_scheduler, loader, sampler
    )
    run.fingerprint = fingerprint
    run.text_cache = text_encoder_cache(cfg, summary, models, accelerator)  # the encoders once per caption
    start_outputs(run)
    if resume is not None:
        resume_run(run, resume)
    completed = train_epochs(run, stop_at_step)
    return finish(run, completed)


def make_accelerator(cfg: TrainConfig) -> Any:
    """The run's `accelerate.Accelerator`: accumulation, mixed precision, tracker and project folders from
    `cfg`; several CPU processes (a launch without GPUs) are joined with gloo.

    Raises:
        ConfigError: accelerate joined another number of processes than were launched, or DeepSpeed is used
            with `train_text_encoder` (DeepSpeed takes one model).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(cfg.output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Launched as several processes on a machine without GPUs: accelerate only joins them (gloo) with
        # cpu=True; otherwise every process would silently train alone and write the same files.
        cpu=world_size > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)
        ),
        # Module dropout leaves whole adapters out of some steps; DDP must then look for unused parameters.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.module_dropout > 0)],
    )
    if accelerator.num_processes != world_size:
        raise ConfigError(
            f"launched as {world_size} processes but accelerate joined {accelerator.num_processes}; "
            "check the launcher's settings (`accelerate config`)"
        )
    if accelerator.distributed_type == "DEEPSPEED" and cfg.train_text_encoder:
        raise ConfigError("train_text_encoder is not supported with DeepSpeed (it takes one model); use DDP")
    return accelerator


def setup_logging(is_main: bool) -> None:
    """INFO logs from the main process, errors only from the others; quiet accelerate, no loading bars."""
    import diffusers
    import transformers

    logging.basicConfig(
        format="%(levelname)s %(name)s: %(message)s", level=logging.INFO if is_main else logging.ERROR
    )
    logging.getLogger("loha_diffusion").setLevel(logging.INFO if is_main else logging.ERROR)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint
    diffusers.utils.logging.disable_progress_bar()  # pipeline-loading bars would break the training bar
    if is_main:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def prepare(
    accelerator: Any,
    cfg: TrainConfig,
    summary: DatasetSummary,
    schedule: Schedule,
    models: Models,
    prediction_type: str,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    loader: Any,
    sampler: EpochSampler | BucketBatchSampler,
) -> Run:
    """Hand the trained models, optimizer, loader and LR scheduler to `accelerator.prepare` and return the
    `Run`; with checkpoints or a resume, check first that checkpoints can store this optimizer and scheduler.

    Raises:
        ConfigError: checkpoints are asked for but cannot be stored (DeepSpeed, or an optimizer or scheduler
            state that is not tensors and plain values; see `checkpoint.check_checkpointable`).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]  # what gradient clipping sees
    text_encoders = models.text_encoders
    if cfg.train_text_encoder:
        unet, *text_encoders, optimizer, loader, lr_scheduler = accelerator.prepare(
            models.unet, *text_encoders, optimizer, loader, lr_scheduler
        )
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(
            models.unet, optimizer, loader, lr_scheduler
        )
    text_encoder, text_encoder_2 = (text_encoders + [None])[:2]
    models.unet, models.text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    if text_encoder_2 is not None:
        models.text_encoder_2 = accelerator.unwrap_model(text_encoder_2)
    state = TrainState(
        update_steps_per_epoch=schedule.update_steps_per_epoch,
        total_batch_size=schedule.total_batch_size,
        seed=cfg.seed,
    )
    output_dir = Path(cfg.output_dir)
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        summary=summary,
        schedule=schedule,
        models=models,
        unet=unet,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        prediction_type=prediction_type,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        loader=loader,
        sampler=sampler,
        state=state,
        tracker=Tracker(accelerator, cfg),
        result=TrainResult(output_dir=output_dir, global_step=0, logging_dir=output_dir / cfg.logging_dir),
        validator=make_validator(cfg, accelerator, models),
    )
    if cfg.checkpointing_steps or cfg.resume_from_checkpoint:
        check_checkpointable(accelerator, run.resumable)
    return run


def start_outputs(run: Run) -> None:
    """Main process: create `output_dir`, remove the temporary files and folders that killed runs left there
    (half-written checkpoints and exports), write the effective `train_config.toml`, start the tracker.

    Raises:
        OutputWriteError: `output_dir` cannot be written (no space, no permission).
    """
    if run.is_main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(run.output_dir):
            logger.info("removed %s, left by an interrupted run", path.name)
        atomic_write_text(run.output_dir / "train_config.toml", run.cfg.to_toml())
        run.tracker.start(run.cfg)


def current_settings(run: Run) -> dict[str, Any]:
    """This run's `checkpoint.run_settings`, with the schedule's `max_train_steps`."""
    return run_settings(
        run.cfg,
        num_processes=run.accelerator.num_processes,
        mixed_precision=run.accelerator.mixed_precision,
        max_train_steps=run.schedule.max_train_steps,
        arch=run.models.arch,
    )


def resume_run(run: Run, check: ResumeCheck) -> None:
    """Restore the checkpoint `check_resume` accepted, then use this run's optimizer hyperparameters, LR
    schedule and length from the resumed step on (`optimizers.apply_optimizer_settings`): one log line per
    changed setting, recorded in `run.changes` (later checkpoints, the file's metadata). The run keeps the
    start time of the run that wrote the checkpoint.

    Raises:
        ConfigError: as `checkpoint.load_checkpoint` (a changed file, another batch geometry, a missing
            adapter file).
    """
    load_checkpoint(run.accelerator, check.path, run.resumable)
    restored = optimizer_settings(run.cfg, run.optimizer)
    apply_optimizer_settings(run.cfg, run.optimizer, run.lr_scheduler)
    step = run.state.global_step
    changes = check.applied_changes(current_settings(run), restored)
    run.changes = check.history + [
        {"after_step": step, "setting": key, "old": old, "new": new} for key, old, new in changes
    ]
    run.started_at = check.record.get("started_at", run.started_at)
    for key, old, new in changes:
        note = ""
        if key in SCHEDULE_SETTINGS:
            note = f"; the learning rate follows the schedule of a {run.schedule.max_train_steps}-step run"
        logger.info(
            "resume: %s %s → %s, applied from step %d on%s",
            key,
            show_value(old),
            show_value(new),
            step + 1,
            note,
        )


def train_epochs(run: Run, stop_at_step: int | None) -> bool:
    """The loop, from the optimizer step after `run.state.global_step` (0, or where a resume left off) to
    `max_train_steps`; returns False if it stopped early at `stop_at_step`.

    A resumed epoch skips the batches already trained (the sample order is a function of seed and epoch).

    Raises:
        TrainingDivergedError: the loss or the adapter weights became NaN or infinite (see `end_step`).
        OutputWriteError: a checkpoint or step file cannot be written (see `after_step`).
    """
    state, schedule = run.state, run.schedule
    first_epoch = state.global_step // schedule.update_steps_per_epoch
    skip_batches = (state.global_step % schedule.update_steps_per_epoch) * run.cfg.gradient_accumulation_steps
    begin_loop(run)
    # A resume at the last step of the run (its final export was interrupted) trains no epoch: the file is then
    # of the last epoch, as in the uninterrupted run, not of one past the end.
    run.epoch = min(first_epoch, schedule.num_epochs - 1)
    for epoch in range(first_epoch, schedule.num_epochs):
        run.epoch = epoch
        if state.global_step >= schedule.max_train_steps:
            break
        for batch in epoch_batches(run, skip_batches if epoch == first_epoch else 0):
            if not train_step(run, batch):
                continue
            end_step(run)
            after_step(run)
            if stop_at_step is not None and state.global_step >= stop_at_step:
                return False
            if state.global_step >= schedule.max_train_steps:
                break
        after_epoch(run)
    return True


def begin_loop(run: Run) -> None:
    """A fresh run logs the fixed-set loss of step 0 (the adapter starts as a zero update); show the bar."""
    from tqdm.auto import tqdm

    if run.is_main and run.state.global_step == 0:
        run.tracker.log(eval_loss(run), step=0)
    run.progress = tqdm(
        total=run.schedule.max_train_steps,
        initial=run.state.global_step,
        desc="steps",
        disable=not run.is_main,
        dynamic_ncols=True,
    )


def epoch_batches(run: Run, skip: int) -> Iterable[dict[str, Any]]:
    """The batches of epoch `run.epoch` (the sampler's order for it), without the first `skip`."""
    run.sampler.set_position(run.epoch)
    return run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader


def train_step(run: Run, batch: dict[str, Any]) -> bool:
    """Forward and backward of one micro-batch and, when gradient accumulation is complete, the clipped
    optimizer and LR-scheduler step. Returns True when an optimizer step happened."""
    accelerator, cfg = run.accelerator, run.cfg
    # Dropout masks depend only on (seed, step, micro-step, process), not on RNG history: exact resume.
    torch.manual_seed(
        derive_seed(cfg.seed, "step", run.state.global_step, run.micro_step, accelerator.process_index)
    )
    trained = (run.unet, *run.text_encoders) if cfg.train_text_encoder else (run.unet,)
    with accelerator.accumulate(*trained):
        loss = batch_loss(run, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.loss_sum += accelerator.gather(loss.detach()).mean().item()
    run.micro_step += 1
    return accelerator.sync_gradients


def batch_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """The denoising loss (0-dim float32) of one micro-batch (`data.collate`'s dict) through the prepared
    UNet and text encoder(s): latents (`batch_latents`), noise and timesteps from the batch's per-sample seeds,
    the conditioning (`batch_conditioning`), and each sample's loss weight (`loss_weights`: 1, or
    `prior_loss_weight` for regularization samples)."""
    models, cfg = run.models, run.cfg
    seeds = batch["sample_seeds"]
    latents = batch_latents(run, batch)
    noise, timesteps = sample_noise_and_timesteps(
        latents, seeds, models.noise_scheduler.config.num_train_timesteps, cfg.noise_offset
    )
    encoder_hidden_states, added_cond_kwargs = batch_conditioning(run, batch)
    return denoising_loss(
        run.unet,
        models.noise_scheduler,
        latents,
        encoder_hidden_states,
        noise,
        timesteps,
        prediction_type=run.prediction_type,
        snr_gamma=cfg.snr_gamma,
        added_cond_kwargs=added_cond_kwargs,
        sample_weights=batch.get("loss_weights"),
    )


def batch_latents(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's VAE latents `(B, 4, H/8, W/8)`, sampled with each sample's seed: from the cached
    `latent_params` when the latent cache serves the batch (`step.sample_latents`, on the VAE's device and in
    its dtype, so the draws equal the uncached ones), else by encoding `pixel_values` (`step.encode_latents`)."""
    vae = run.models.vae
    if "latent_params" in batch:
        params = batch["latent_params"].to(device=vae.device, dtype=vae.dtype)
        return sample_latents(params, batch["sample_seeds"], vae.config.scaling_factor)
    return encode_latents(vae, batch["pixel_values"], batch["sample_seeds"])


def batch_conditioning(
    run: Run, batch: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """`(encoder_hidden_states, added_cond_kwargs)` of the batch's captions, encoded as the config says
    (`conditioning.TextEncoding`: long prompts, clip skip): from the text-encoder cache when it holds them
    (`run.text_cache`), else through the prepared text encoder(s) (`conditioning.unet_conditioning`), with
    gradients only when the text encoders are trained. SDXL's time ids come from each sample's original size
    and crop, and the batch's `target_size` (height, width; its bucket), else (resolution, resolution)."""
    cfg = run.cfg
    device = run.accelerator.device
    size = batch.get("target_size")
    target_size = (cfg.resolution, cfg.resolution) if size is None else (int(size[0]), int(size[1]))
    sizes = {"original_sizes": batch["original_sizes"], "crops_top_left": batch["crops_top_left"]}
    cached = None if run.text_cache is None else run.text_cache.lookup(batch["captions"], device)
    if cached is not None:
        return conditioning_from_states(*cached, device=device, target_size=target_size, **sizes)
    with torch.set_grad_enabled(cfg.train_text_encoder):
        return unet_conditioning(
            run.models,
            batch["captions"],
            device=device,
            target_size=target_size,
            text_encoders=run.text_encoders,
            encoding=TextEncoding.from_config(cfg),
            **sizes,
        )


def end_step(run: Run) -> None:
    """Count the optimizer step just taken; log its loss (mean over its micro-batches and processes) and
    learning rates to the bar and the tracker; stop the run if the loss or the updated adapter weights are not
    finite, before `after_step` could save a checkpoint or file of that state.

    Raises:
        TrainingDivergedError: the loss is NaN or infinite (the message names the likely causes for this run's
            settings, most likely first; see `nan_loss_message`), or the update made adapter weights NaN or
            infinite (`check_finite_weights`).
    """
    state = run.state
    state.global_step += 1
    loss = run.result.last_loss = run.loss_sum / run.micro_step
    run.micro_step, run.loss_sum = 0, 0.0
    lrs = run.lr_scheduler.get_last_lr()
    logs = {"train/loss": loss, "train/lr": lrs[0]}
    if run.cfg.train_text_encoder:
        logs["train/lr_text_encoder"] = lrs[1]
        if len(lrs) > 2:
            logs["train/lr_text_encoder_2"] = lrs[2]
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}")
    run.tracker.log(logs, step=state.global_step)
    if not math.isfinite(loss):
        raise TrainingDivergedError(nan_loss_message(run, loss))
    check_finite_weights(run)
    run.last_finite_loss = (state.global_step, loss)


def check_finite_weights(run: Run) -> None:
    """Check that every trained adapter parameter is finite after the optimizer step just taken: one max-norm
    per parameter (`torch._foreach_norm` with ord=inf, NaN propagates, no overflow: what torch's own
    `clip_grad_norm_` uses) and one reduction, so one device sync per optimizer step. The loss of step N is
    computed before update N, so a finite loss does not prove the weights it leaves are finite.

    Raises:
        TrainingDivergedError: names the modules with non-finite values (up to 10), the step, and the causes
            and checkpoint to resume from, as for a NaN loss.
    """
    norms = torch._foreach_norm([p.detach() for p in run.params], float("inf"))
    if not norms or bool(torch.stack(norms).isfinite().all()):
        return
    modules = [
        f"{name}.{module}"
        for name, model in run.adapters.items()
        for module in non_finite_modules(get_adapter_state_dict(model, ADAPTER_NAME))
    ]
    shown = ", ".join(modules[:10]) + (f" and {len(modules) - 10} more" if len(modules) > 10 else "")
    step, loss = run.state.global_step, run.result.last_loss
    header = (
        f"the adapter weights became NaN or infinite in the update of optimizer step {step} (its loss, "
        f"{loss:.4g}, was finite), in {len(modules)} module(s): {shown}. Nothing of this step was saved. "
        "Likely causes, most likely first:"
    )
    raise TrainingDivergedError(divergence_message(run, header, before_any_update=False))


def nan_loss_message(run: Run, loss: float) -> str:
    """What a non-finite `loss` at `run.state.global_step` likely comes from, for this run's settings, most
    likely first: fp16 overflow (only under fp16); at the first step, before any update, the base model or
    the data (not the learning rate); later, updates too large (learning rates, alpha, clipping off); then
    the data. With the last finite loss and the checkpoint to resume from with the fix."""
    step, last = run.state.global_step, run.last_finite_loss
    header = (
        f"loss is {loss} at optimizer step {step}"
        + (f" (last finite loss {last[1]:.4g} at step {last[0]})" if last else "")
        + ". Likely causes, most likely first:"
    )
    return divergence_message(run, header, before_any_update=step == 1)


def divergence_message(run: Run, header: str, *, before_any_update: bool) -> str:
    """`header`, then the numbered likely causes of a divergence for this run's settings (see
    `nan_loss_message`; `before_any_update`: no optimizer update was applied yet), then the newest complete
    checkpoint to resume from with the fix."""
    cfg = run.cfg
    causes = []
    if run.accelerator.mixed_precision == "fp16":
        causes.append(
            "fp16 overflow in the fp16 base model or VAE: set mixed_precision = 'bf16' (if the GPU has it) or 'no'"
        )
    if before_any_update:
        causes.append(
            "not the learning rate (no update was made yet): the base model (non-finite weights, or one that "
            "does not run in this precision) or the data"
        )
    else:
        names = (unet_rate_setting(cfg), "text_encoder_lr", "text_encoder_2_lr")
        group_rates = group_learning_rates(cfg, len(run.models.text_encoders))
        rates = ", ".join(f"{name} = {float(rate)!r}" for name, rate in zip(names, group_rates))
        scaling = format_number(cfg.effective_alpha / cfg.rank)
        clip = "; gradient clipping is off: set max_grad_norm = 1" if cfg.max_grad_norm == 0 else ""
        causes.append(
            f"updates too large: lower {rates}, or alpha = {format_number(cfg.effective_alpha)} (updates are "
            f"scaled by alpha/rank = {scaling}){clip}"
        )
        causes.append("the data: an image or caption the VAE or text encoder turns into non-finite values")
    lines = [header]
    lines += [f"  {i}. {cause}" for i, cause in enumerate(causes, start=1)]
    checkpoints = list_checkpoints(run.output_dir)
    if checkpoints:
        lines.append(
            f"Fix it, then resume from {checkpoints[-1]} (a resume applies a new learning rate or "
            "mixed_precision) or start again."
        )
    else:
        lines.append("Fix it and start again.")
    return "\n".join(lines)


def after_step(run: Run) -> None:
    """The policy after each optimizer step: the training state every `checkpointing_steps` (all
    processes), then on the main process the Kohya file every `save_every_n_steps` and validation every
    `validation_steps` (not at the last step: `finish` validates the final file).

    Raises:
        OutputWriteError: the checkpoint or step file cannot be written (disk full, permission); the earlier
            checkpoints and files are intact and no partial one is left.
    """
    cfg, step = run.cfg, run.state.global_step
    if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
        record = make_run_record(
            current_settings(run), run.fingerprint, run.changes, step=step, started_at=run.started_at
        )
        save_checkpoint(
            run.accelerator, run.output_dir, step, cfg.checkpoints_total_limit, run.resumable, record
        )
    if not run.is_main:
        return
    step_file = None
    if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
        step_file = write_kohya(run, run.output_dir / f"{cfg.name}-step{step:08d}.safetensors", run.epoch + 1)
    final = step >= run.schedule.max_train_steps
    if cfg.validation_steps and step % cfg.validation_steps == 0 and not final:
        validate(run, step_file)


def after_epoch(run: Run) -> None:
    """Main process, after each epoch but the last (`finish` writes and validates the final file): the Kohya
    file every `save_every_n_epochs` epochs, and validation every `validation_epochs` epochs (diffusers'
    setting; kohya's `sample_every_n_epochs`), unless `validation_steps` validated this very step.

    Raises:
        OutputWriteError: the epoch file or a validation image cannot be written (disk full, permission).
    """
    cfg, done, step = run.cfg, run.epoch + 1, run.state.global_step
    if not run.is_main or done >= run.schedule.num_epochs:
        return
    epoch_file = None
    if cfg.save_every_n_epochs and done % cfg.save_every_n_epochs == 0:
        epoch_file = write_kohya(run, run.output_dir / f"{cfg.name}-{done:06d}.safetensors", done)
    final = step >= run.schedule.max_train_steps
    if cfg.validation_epochs and done % cfg.validation_epochs == 0 and not final:
        if step not in run.result.eval_losses:  # validation_steps validated this step already
            validate(run, epoch_file)


def write_kohya(run: Run, path: Path, epoch: int, finished_at: float | None = None) -> Path:
    """Export the adapters as they are now to the Kohya file `path`, with the run's training metadata."""
    info = training_metadata(
        run.cfg,
        run.schedule,
        run.summary,
        prediction_type=run.prediction_type,
        mixed_precision=run.accelerator.mixed_precision,
        started_at=run.started_at,
        step=run.state.global_step,
        epoch=epoch,
        finished_at=finished_at,
        resume_changes=run.changes,
        arch=run.models.arch,
    )
    adapters = run.adapters
    return export_kohya(
        path,
        run.cfg,
        unet=run.models.unet,
        text_encoder=adapters.get("text_encoder"),
        text_encoder_2=adapters.get("text_encoder_2"),
        prediction_type=run.prediction_type,
        training_info=info,
    )


def eval_loss(run: Run) -> dict[str, float]:
    """Main process: the fixed-set denoising loss now, recorded in `run.result` and returned as tracker logs."""
    with run.accelerator.autocast():
        loss = fixed_denoising_loss(
            run.models,
            run.summary.records,
            resolution=run.cfg.resolution,
            prediction_type=run.prediction_type,
            seed=run.cfg.seed,
            encoding=TextEncoding.from_config(run.cfg),
        )
    run.result.eval_losses[run.state.global_step] = loss
    return {"eval/denoising_loss": loss}


def validate(run: Run, adapter_file: Path | None) -> None:
    """Main process: the fixed-set loss, and each validation prompt's images from `adapter_file` (a temporary
    export if None), to disk and the tracker.

    Raises:
        OutputWriteError: a validation image cannot be written (disk full, permission).
    """
    logs, step = eval_loss(run), run.state.global_step
    if run.validator is None:
        run.tracker.log(logs, step=step)
        return
    with tempfile.TemporaryDirectory() as tmp:
        file = adapter_file or write_kohya(run, Path(tmp) / f"{run.cfg.name}.safetensors", run.epoch)
        rendered = run.validator.render(file, step)
    run.result.validation_images += [r.path for r in rendered]
    logger.info("validation images: %s", ", ".join(r.path.name for r in rendered))
    run.tracker.log_validation(logs, [(r.prompt.prompt, r.grid) for r in rendered], step)


def finish(run: Run, completed: bool) -> TrainResult:
    """End the run. When it `completed`: the final Kohya file (and PEFT folder), validated, and a summary of
    what was written on stdout; when stopped early, nothing more is written. Returns `run.result`."""
    accelerator = run.accelerator
    run.progress.close()
    accelerator.wait_for_everyone()
    run.result.global_step = run.state.global_step
    if completed and run.is_main:
        write_final_outputs(run)
    if completed:
        accelerator.wait_for_everyone()
    accelerator.end_training()
    if completed and run.is_main:
        print(summary_text(run.result, run.cfg))
    return run.result


def write_final_outputs(run: Run) -> None:
    """Main process: `<name>.safetensors`, `<name>_peft/` (with `save_peft_format`), then validate the file."""
    cfg, result = run.cfg, run.result
    result.kohya_file = write_kohya(
        run, run.output_dir / f"{cfg.name}.safetensors", run.epoch + 1, finished_at=time.time()
    )
    if cfg.save_peft_format:
        adapters = run.adapters
        result.peft_dir = export_peft(
            run.output_dir / f"{cfg.name}_peft",
            cfg,
            unet=run.models.unet,
            text_encoder=adapters.get("text_encoder"),
            text_encoder_2=adapters.get("text_encoder_2"),
        )
    validate(run, result.kohya_file)


def summary_text(result: TrainResult, cfg: TrainConfig) -> str:
    """What a finished run wrote, and how to look at it."""
    lines = [f"Done: {result.global_step} steps. Outputs in {result.output_dir}/"]
    if result.kohya_file:
        lines.append(f"  Kohya/LyCORIS file (ComfyUI, A1111, load_adapter): {result.kohya_file}")
    if result.peft_dir:
        lines.append(f"  PEFT-format folder: {result.peft_dir}")
    if result.validation_images:
        lines.append(
            f"  validation images: {result.validation_images[-1].parent}/ (last: {result.validation_images[-1].name})"
        )
    if result.eval_losses:
        first, last = min(result.eval_losses), max(result.eval_losses)
        lines.append(f"  fixed-set denoising loss at step {last}: {result.eval_losses[last]:.4f}")
        if first != last:
            lines[-1] += f" (step {first}: {result.eval_losses[first]:.4f})"
    if cfg.report_to == "tensorboard":
        lines.append(f"  TensorBoard: tensorboard --logdir {result.logging_dir}")
    return "\n".join(lines)


def run_config(cfg: TrainConfig) -> int:
    """Train, or print the `--dry_run` plan, for a parsed config; returns the exit status: 0, or 2 after
    printing a user error (`error: ...` on stderr, no traceback)."""
    try:
        if cfg.dry_run:
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
            print(dry_run(cfg))
        else:
            train(cfg)
    except LoHaDiffusionError as exc:
        return report_user_error(exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse flags (and `--config`), then train or print the dry-run plan; returns the
    exit status (2 for a bad config, dataset or base model, with the message on stderr)."""
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        return report_user_error(exc)
    return run_config(cfg)
