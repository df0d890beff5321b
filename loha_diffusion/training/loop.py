"""The training loop: load the base model, inject the adapter, train with accelerate, checkpoint, validate, export.

`main(argv)` is what `scripts/train_loha_sd.py` runs; `train(cfg)` is the same from Python.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..model import inject_adapter
from .checkpoint import (
    CHECKPOINT_PREFIX,
    TrainState,
    dataset_facts,
    export_kohya,
    export_peft,
    prune_checkpoints,
    register_adapter_state_hooks,
    resolve_resume_path,
)
from .config import ConfigError, TrainConfig, load_config
from .data import CaptionedImageDataset, DataError, make_dataloader, scan_dataset
from .plan import (
    build_plan,
    compute_schedule,
    format_plan,
    text_encoder_adapter_config,
    unet_adapter_config,
)
from .step import (
    denoising_loss,
    derive_seed,
    encode_latents,
    resolve_prediction_type,
    sample_noise_and_timesteps,
)
from .validation import Validator, fixed_denoising_loss

logger = logging.getLogger("loha_diffusion.training")
T = TypeVar("T")


def load_with_hint(cfg: TrainConfig, loader: Callable[..., T]) -> T:
    """Call `loader(revision=...)`, turning "not found" errors into a `ConfigError` that says what to do."""
    path = cfg.pretrained_model_name_or_path
    # "org/name" may be a hub id; a path whose first folder exists here (e.g. outputs/tiny-sd) is local.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.isdir(path.split("/")[0])
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(
            f"pretrained_model_name_or_path {path!r} does not exist. For the offline quick start create it with "
            f"`loha-diffusion make-tiny {path}`."
        )
    try:
        return loader(revision=cfg.revision)
    except OSError as exc:
        raise ConfigError(
            f"cannot load the base model from pretrained_model_name_or_path = {path!r} "
            f"(revision {cfg.revision!r}): {exc}\nUse a local diffusers folder (model_index.json, unet/, vae/, "
            f"text_encoder/, tokenizer/, scheduler/) or a hub id you can reach; offline, make a tiny one with "
            f"`loha-diffusion make-tiny {path}`."
        ) from None


@dataclass
class Models:
    """The base model's parts, as diffusers' training scripts load them."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any


def load_models(cfg: TrainConfig) -> Models:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler from a diffusers folder or hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = cfg.pretrained_model_name_or_path
    weights = {"variant": cfg.variant}
    models = Models(
        tokenizer=load_with_hint(
            cfg, lambda **kw: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        ),
        text_encoder=load_with_hint(
            cfg, lambda **kw: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights, **kw)
        ),
        vae=load_with_hint(
            cfg, lambda **kw: AutoencoderKL.from_pretrained(path, subfolder="vae", **weights, **kw)
        ),
        unet=load_with_hint(
            cfg, lambda **kw: UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights, **kw)
        ),
        noise_scheduler=load_with_hint(
            cfg, lambda **kw: DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        ),
    )
    if models.unet.config.get("addition_embed_type") is not None:
        raise ConfigError(
            f"{path} is an SDXL-type model (its UNet has {models.unet.config.addition_embed_type!r} embeddings); "
            "this trainer handles SD1.x/SD2.x. Adapters for SDXL can be loaded and exported, not trained here."
        )
    return models


def enable_xformers(unet: nn.Module) -> None:
    """Switch the UNet to xformers attention, or raise a `ConfigError` saying why it cannot run."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` (matching your "
            "torch build), or drop the flag to use PyTorch SDPA attention (the default, usually as fast)."
        ) from None
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise ConfigError(
            f"xformers is installed but cannot run here: {exc}. Drop the flag to use SDPA."
        ) from None


def make_optimizer(cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with `use_8bit_adam` (a `ConfigError` if it is not installed)."""
    optimizer_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "use_8bit_adam needs bitsandbytes: `pip install bitsandbytes` (or `pip install "
                "loha-diffusion[bnb]`), or drop the flag to use torch AdamW."
            ) from None
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(
        param_groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )


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


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    # TensorBoard hparams take scalars and strings only.
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}


def _setup_logging(is_main: bool) -> None:
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


def train(cfg: TrainConfig, *, stop_at_step: int | None = None) -> TrainResult:
    """Run the training `cfg` describes and return where the outputs are.

    `stop_at_step` stops after that optimizer step without the final export, as if the job were killed
    there (tests use it with `checkpointing_steps` to check that resume is exact)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    output_dir = Path(cfg.output_dir)
    logging_dir = output_dir / cfg.logging_dir
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Launched as several processes on a machine without GPUs: accelerate only joins them (gloo) with
        # cpu=True; otherwise every process would silently train alone and write the same files.
        cpu=world_size > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
        # Module dropout leaves whole adapters out of some steps; DDP must then look for unused parameters.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.module_dropout > 0)],
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched as {world_size} processes but accelerate joined {accelerator.num_processes}; "
            "check the launcher's settings (`accelerate config`)"
        )
    if accelerator.distributed_type == "DEEPSPEED" and cfg.train_text_encoder:
        raise ConfigError("train_text_encoder is not supported with DeepSpeed (it takes one model); use DDP")
    is_main = accelerator.is_main_process
    _setup_logging(is_main)

    # Data first: bad data should stop the run before any model is loaded.
    summary = scan_training_data(cfg)
    logger.info("data: %s", summary.describe())
    # Config problems that need no model surface now, before minutes of loading.
    unet_config, te_config = unet_adapter_config(cfg), text_encoder_adapter_config(cfg)
    resume_path = resolve_resume_path(cfg)

    set_seed(cfg.seed)  # identical adapter init in every process
    models = load_models(cfg)
    tokenizer, text_encoder, vae, unet = models.tokenizer, models.text_encoder, models.vae, models.unet
    noise_scheduler = models.noise_scheduler
    prediction_type = resolve_prediction_type(noise_scheduler, cfg.prediction_type)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
        if weight_dtype != torch.float32:
            model.to(dtype=weight_dtype)
    # Adapters are created in fp32 on the base layer's device (mixed precision keeps trainable weights fp32).
    inject_adapter(unet, unet_config)
    if te_config is not None:
        inject_adapter(text_encoder, te_config)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if te_config is not None:
            text_encoder.gradient_checkpointing_enable()
    if cfg.enable_xformers_memory_efficient_attention:
        enable_xformers(unet)
    unet.train()
    text_encoder.train(te_config is not None)
    vae.eval()

    unet_params = [p for p in unet.parameters() if p.requires_grad]
    param_groups = [{"params": unet_params, "lr": cfg.learning_rate}]
    te_params: list[nn.Parameter] = []
    if te_config is not None:
        te_params = [p for p in text_encoder.parameters() if p.requires_grad]
        param_groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
    optimizer = make_optimizer(cfg, param_groups)

    dataset = CaptionedImageDataset(
        summary.records,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        caption_dropout_rate=cfg.caption_dropout_rate,
        seed=cfg.seed,
    )
    loader, sampler = make_dataloader(
        dataset, batch_size=cfg.train_batch_size, num_workers=cfg.dataloader_num_workers, seed=cfg.seed
    )
    schedule = compute_schedule(cfg, len(dataset), accelerator.num_processes)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor (as diffusers).
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=schedule.max_train_steps * accelerator.num_processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    if te_config is not None:
        unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, loader, lr_scheduler
        )
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    raw_unet = accelerator.unwrap_model(unet)
    raw_te = accelerator.unwrap_model(text_encoder)
    state = TrainState(
        update_steps_per_epoch=schedule.update_steps_per_epoch,
        total_batch_size=schedule.total_batch_size,
        seed=cfg.seed,
    )
    accelerator.register_for_checkpointing(state)
    register_adapter_state_hooks(
        accelerator, {"unet": raw_unet, **({"text_encoder": raw_te} if te_config else {})}
    )

    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.toml").write_text(cfg.to_toml(), encoding="utf-8")
        if cfg.report_to != "none":
            accelerator.init_trackers("loha_diffusion", config=_tracker_config(cfg))

    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        geometry = (schedule.update_steps_per_epoch, schedule.total_batch_size, cfg.seed)
        saved = (state.update_steps_per_epoch, state.total_batch_size, state.seed)
        if geometry != saved:
            raise ConfigError(
                f"cannot resume from {resume_path}: it was written with (steps per epoch, total batch size, seed) "
                f"= {saved}, this run has {geometry}; keep the dataset, batch settings, process count and seed"
            )
        logger.info("resumed from %s at step %d", resume_path, state.global_step)
    global_step = state.global_step
    first_epoch = global_step // schedule.update_steps_per_epoch
    skip_batches = (global_step % schedule.update_steps_per_epoch) * cfg.gradient_accumulation_steps

    result = TrainResult(output_dir=output_dir, global_step=global_step, logging_dir=logging_dir)
    started_at = time.time()
    training_info = {
        "max_train_steps": schedule.max_train_steps,
        "resolution": cfg.resolution,
        "num_train_images": len(summary.records),
        "training_started_at": started_at,
        "learning_rate": cfg.learning_rate,
        "unet_lr": cfg.learning_rate,
        "text_encoder_lr": (cfg.text_encoder_lr or cfg.learning_rate) if te_config else None,
        "lr_scheduler": cfg.lr_scheduler,
        "optimizer": "AdamW8bit" if cfg.use_8bit_adam else "AdamW",
        "batch_size": schedule.total_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "mixed_precision": accelerator.mixed_precision,
        "seed": cfg.seed,
        "noise_offset": cfg.noise_offset or None,
        "min_snr_gamma": cfg.snr_gamma,
        "sd_model_name": cfg.pretrained_model_name_or_path,
        "prediction_type": prediction_type,
        **dataset_facts(summary.records),
    }

    def export(path: Path, epoch: int) -> Path:
        info = {**training_info, "steps": global_step, "epoch": epoch, "epochs": schedule.num_epochs}
        te = raw_te if te_config is not None else None
        written = export_kohya(
            path, cfg, unet=raw_unet, text_encoder=te, prediction_type=prediction_type, training_info=info
        )
        logger.info("wrote %s", written)
        return written

    validator = None
    if is_main and cfg.validation_prompt:
        validator = Validator(
            model_path=cfg.pretrained_model_name_or_path,
            revision=cfg.revision,
            variant=cfg.variant,
            prompts=cfg.validation_prompt,
            images_per_prompt=cfg.num_validation_images,
            resolution=cfg.validation_resolution or cfg.resolution,
            num_inference_steps=cfg.validation_num_inference_steps,
            guidance_scale=cfg.validation_guidance_scale,
            seed=cfg.seed,
            vae=vae,
            tokenizer=tokenizer,
            device=accelerator.device,
            dtype=weight_dtype,
            output_dir=output_dir,
        )

    def eval_loss() -> dict[str, Any]:
        """Main process only: the fixed-set denoising loss, recorded and returned as tracker logs."""
        with accelerator.autocast():
            loss = fixed_denoising_loss(
                raw_unet,
                raw_te,
                tokenizer,
                vae,
                noise_scheduler,
                summary.records,
                resolution=cfg.resolution,
                prediction_type=prediction_type,
                seed=cfg.seed,
            )
        result.eval_losses[global_step] = loss
        return {"eval/denoising_loss": loss}

    def validate(adapter_file: Path | None) -> None:
        """Main process only: fixed-set loss, and the image grid from `adapter_file` (a temp export if None)."""
        logs = eval_loss()
        if validator is not None:
            with tempfile.TemporaryDirectory() as tmp:
                file = adapter_file or export(Path(tmp) / f"{cfg.name}.safetensors", epoch)
                grid, path = validator.render(file, global_step)
            result.validation_images.append(path)
            logger.info("validation grid: %s", path)
            if cfg.report_to == "tensorboard":
                import numpy as np

                writer = accelerator.get_tracker("tensorboard", unwrap=True)
                writer.add_image("validation", np.asarray(grid), global_step, dataformats="HWC")
            elif cfg.report_to == "wandb":
                import wandb

                logs["validation"] = wandb.Image(grid, caption=" | ".join(cfg.validation_prompt))
        if cfg.report_to != "none":
            accelerator.log(logs, step=global_step)

    if is_main and global_step == 0:
        # The starting point of the fixed-set loss curve (the adapter starts as a zero update).
        logs = eval_loss()
        if cfg.report_to != "none":
            accelerator.log(logs, step=0)
    progress = tqdm(
        total=schedule.max_train_steps,
        initial=global_step,
        desc="steps",
        disable=not is_main,
        dynamic_ncols=True,
    )
    trained = [m for m in (unet, text_encoder if te_config is not None else None) if m is not None]
    params = unet_params + te_params
    micro_step = 0
    loss_sum = 0.0
    epoch = first_epoch
    done = global_step >= schedule.max_train_steps
    for epoch in range(first_epoch, schedule.num_epochs):
        if done:
            break
        sampler.set_position(epoch)
        epoch_loader = loader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
        for batch in epoch_loader:
            # Dropout masks depend only on (seed, step, micro-step, process), not on RNG history: exact resume.
            torch.manual_seed(
                derive_seed(cfg.seed, "step", global_step, micro_step, accelerator.process_index)
            )
            with accelerator.accumulate(*trained):
                seeds = batch["sample_seeds"]
                latents = encode_latents(vae, batch["pixel_values"], seeds)
                noise, timesteps = sample_noise_and_timesteps(
                    latents, seeds, noise_scheduler.config.num_train_timesteps, cfg.noise_offset
                )
                input_ids = tokenizer(
                    batch["captions"],
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(accelerator.device)
                with torch.set_grad_enabled(te_config is not None):
                    encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
                loss = denoising_loss(
                    unet,
                    noise_scheduler,
                    latents,
                    encoder_hidden_states,
                    noise,
                    timesteps,
                    prediction_type=prediction_type,
                    snr_gamma=cfg.snr_gamma,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += accelerator.gather(loss.detach()).mean().item()
            micro_step += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            state.global_step = global_step
            result.last_loss = loss_sum / micro_step
            micro_step, loss_sum = 0, 0.0
            lrs = lr_scheduler.get_last_lr()
            logs = {"train/loss": result.last_loss, "train/lr": lrs[0]}
            if te_config is not None:
                logs["train/lr_text_encoder"] = lrs[1]
            progress.update(1)
            progress.set_postfix(loss=f"{result.last_loss:.4f}", lr=f"{lrs[0]:.2e}")
            if cfg.report_to != "none":
                accelerator.log(logs, step=global_step)
            if not math.isfinite(result.last_loss):
                raise FloatingPointError(
                    f"loss is {result.last_loss} at step {global_step}; lower learning_rate or alpha, use bf16 "
                    "instead of fp16, or resume from an earlier checkpoint"
                )

            if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
                if is_main:
                    prune_checkpoints(output_dir, cfg.checkpoints_total_limit)
                accelerator.wait_for_everyone()
                accelerator.save_state(str(output_dir / f"{CHECKPOINT_PREFIX}{global_step}"))
                logger.info("saved training state %s", output_dir / f"{CHECKPOINT_PREFIX}{global_step}")
            if is_main:
                step_file = None
                if cfg.save_every_n_steps and global_step % cfg.save_every_n_steps == 0:
                    step_file = export(
                        output_dir / f"{cfg.name}-step{global_step:08d}.safetensors", epoch + 1
                    )
                final = global_step >= schedule.max_train_steps  # the end of training validates anyway
                if cfg.validation_steps and global_step % cfg.validation_steps == 0 and not final:
                    validate(step_file)
            if stop_at_step is not None and global_step >= stop_at_step:
                progress.close()
                accelerator.wait_for_everyone()
                accelerator.end_training()
                result.global_step = global_step
                return result
            if global_step >= schedule.max_train_steps:
                done = True
                break
        if (
            is_main
            and cfg.save_every_n_epochs
            and (epoch + 1) % cfg.save_every_n_epochs == 0
            and (epoch + 1) < schedule.num_epochs
        ):
            export(output_dir / f"{cfg.name}-{epoch + 1:06d}.safetensors", epoch + 1)
    progress.close()

    accelerator.wait_for_everyone()
    result.global_step = global_step
    if is_main:
        training_info["training_finished_at"] = time.time()
        result.kohya_file = export(output_dir / f"{cfg.name}.safetensors", epoch + 1)
        if cfg.save_peft_format:
            result.peft_dir = export_peft(
                output_dir / f"{cfg.name}_peft",
                cfg,
                unet=raw_unet,
                text_encoder=raw_te if te_config else None,
            )
        validate(result.kohya_file)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if is_main:
        print(summary_text(result, cfg))
    return result


def summary_text(result: TrainResult, cfg: TrainConfig) -> str:
    """What a finished run wrote, and how to look at it."""
    lines = [f"Done: {result.global_step} steps. Outputs in {result.output_dir}/"]
    if result.kohya_file:
        lines.append(f"  Kohya/LyCORIS file (ComfyUI, A1111, load_adapter): {result.kohya_file}")
    if result.peft_dir:
        lines.append(f"  PEFT-format folder: {result.peft_dir}")
    if result.validation_images:
        lines.append(
            f"  validation grids: {result.validation_images[-1].parent}/ (last: {result.validation_images[-1].name})"
        )
    if result.eval_losses:
        first, last = min(result.eval_losses), max(result.eval_losses)
        lines.append(f"  fixed-set denoising loss at step {last}: {result.eval_losses[last]:.4f}")
        if first != last:
            lines[-1] += f" (step {first}: {result.eval_losses[first]:.4f})"
    if cfg.report_to == "tensorboard":
        lines.append(f"  TensorBoard: tensorboard --logdir {result.logging_dir}")
    return "\n".join(lines)


def scan_training_data(cfg: TrainConfig):
    """Check and summarise the training data as `cfg` describes it (errors name the file)."""
    return scan_dataset(
        cfg.train_data_dir,
        resolution=cfg.resolution,
        caption_extension=cfg.caption_extension,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        on_missing_caption=cfg.on_missing_caption,
        on_bad_image=cfg.on_bad_image,
    )


def dry_run(cfg: TrainConfig) -> str:
    """The `--dry_run` plan: checks the data and the model config, loads no weights."""
    from accelerate import PartialState

    summary = scan_training_data(cfg)
    plan = build_plan(cfg, summary.num_samples, PartialState().num_processes)
    return format_plan(cfg, plan, summary.describe())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse flags (and `--config`), then train or print the dry-run plan."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv)
        if cfg.dry_run:
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
            print(dry_run(cfg))
            return 0
        train(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
