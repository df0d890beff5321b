"""Validation during training: image grids rendered through `loha_diffusion.pipeline.load_adapter` from the
exported file (so training and inference use the same path), and a fixed-set denoising loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..files import atomic_path
from ..pipeline import from_pretrained_dtype, list_adapters, load_adapter, unload_adapter
from .config import TrainConfig
from .data import ImageRecord, load_image, transform_image
from .models import Models, resolve_base_model, weight_dtype
from .step import derive_seed, encode_latents, prediction_target

logger = logging.getLogger(__name__)

VALIDATION_ADAPTER = "validation"


def make_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into a grid with `columns` columns (row-major).

    Raises:
        ValueError: `images` is empty.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


class Validator:
    """Renders the validation prompts with a separate pipeline of the base model plus the exported adapter.

    The pipeline is built once (it shares the frozen VAE and tokenizer with training) and reused; each call
    replaces the adapter with the file it is given. Images use a fixed seed, so grids are comparable. The
    pipeline runs on `device` in `dtype` (the run's weight dtype); `resolution` is in pixels."""

    def __init__(
        self,
        *,
        model_path: str,
        revision: str | None,
        variant: str | None,
        prompts: Sequence[str],
        images_per_prompt: int,
        resolution: int,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int,
        vae: nn.Module,
        tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        output_dir: str | Path,
    ) -> None:
        self.model_path, self.revision, self.variant = model_path, revision, variant
        self.prompts = list(prompts)
        self.images_per_prompt = images_per_prompt
        self.resolution = resolution
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.vae, self.tokenizer = vae, tokenizer
        self.device, self.dtype = device, dtype
        self.output_dir = Path(output_dir)
        self._pipe = None

    def pipeline(self):
        """The validation pipeline (built on first use), read from where `models.resolve_base_model` says: the
        local folder, the hub, or the local cache when offline or the hub cannot be reached (no minutes of
        download retries at the end of a run).

        Raises:
            ConfigError: the base model is a hub id that cannot be reached and is not in the local cache.
            OSError: the base model cannot be read.
        """
        if self._pipe is None:
            from diffusers import StableDiffusionPipeline

            self._pipe = StableDiffusionPipeline.from_pretrained(
                resolve_base_model(self.model_path, self.revision),
                revision=self.revision,
                variant=self.variant,
                vae=self.vae,
                tokenizer=self.tokenizer,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **from_pretrained_dtype(self.dtype),  # `dtype` from diffusers 0.40, `torch_dtype` before
            ).to(self.device)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    @torch.no_grad()
    def render(self, adapter_file: str | Path, step: int) -> tuple[Image.Image, Path]:
        """Load `adapter_file`, render every prompt `images_per_prompt` times, save the grid; returns it and its path.

        The grid has one row per prompt and `images_per_prompt` columns of `resolution` x `resolution` pixels;
        it is saved (atomically) as `<output_dir>/validation/step-<step:06d>.png`.

        Raises:
            LoHaDiffusionError: `load_adapter` cannot load `adapter_file`; the base model cannot be reached
                (`ConfigError`); the grid cannot be written for lack of space or permission
                (`OutputWriteError`).
            OSError: the base model cannot be read, or the grid cannot be written.
        """
        pipe = self.pipeline()
        if VALIDATION_ADAPTER in list_adapters(pipe):
            unload_adapter(pipe, VALIDATION_ADAPTER)
        load_adapter(pipe, adapter_file, adapter_name=VALIDATION_ADAPTER)
        # Newly wrapped layers start in training mode; inference must not apply adapter dropout.
        pipe.unet.eval()
        pipe.text_encoder.eval()
        images = []
        for prompt in self.prompts:
            generator = torch.Generator("cpu").manual_seed(self.seed)
            images += pipe(
                prompt,
                height=self.resolution,
                width=self.resolution,
                num_images_per_prompt=self.images_per_prompt,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                generator=generator,
            ).images
        grid = make_grid(images, self.images_per_prompt)
        path = self.output_dir / "validation" / f"step-{step:06d}.png"
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")  # the temporary name has no .png suffix to infer it from
        return grid, path


def make_validator(cfg: TrainConfig, accelerator: Any, models: Models) -> Validator | None:
    """The validation renderer on the main process when `validation_prompt` is set, else None."""
    if not (accelerator.is_main_process and cfg.validation_prompt):
        return None
    return Validator(
        model_path=cfg.pretrained_model_name_or_path,
        revision=cfg.revision,
        variant=cfg.variant,
        prompts=cfg.validation_prompt,
        images_per_prompt=cfg.num_validation_images,
        resolution=cfg.validation_resolution or cfg.resolution,
        num_inference_steps=cfg.validation_num_inference_steps,
        guidance_scale=cfg.validation_guidance_scale,
        seed=cfg.seed,
        vae=models.vae,
        tokenizer=models.tokenizer,
        device=accelerator.device,
        dtype=weight_dtype(accelerator.mixed_precision),
        output_dir=cfg.output_dir,
    )


@torch.no_grad()
def fixed_denoising_loss(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    vae: nn.Module,
    scheduler,
    records: Sequence[ImageRecord],
    *,
    resolution: int,
    prediction_type: str,
    seed: int = 0,
    timesteps_per_image: int = 4,
    max_images: int = 16,
    batch_size: int = 8,
) -> float:
    """Mean unweighted denoising MSE over a fixed set of (image, noise, timestep) triples.

    The first `max_images` images, center-cropped to `resolution` pixels, each at `timesteps_per_image`
    timesteps evenly spread over the schedule, with noise seeded from `seed`: the same arguments always give
    the same triples, so the value is comparable across training steps. Runs in batches of `batch_size` on
    the UNet's device, the UNet in eval mode (no adapter dropout; its mode is restored), the MSE in float32.

    Returns:
        The mean over all triples, a Python float.
    """
    records = list(records)[:max_images]
    num_t = scheduler.config.num_train_timesteps
    fixed_t = [int((j + 0.5) * num_t / timesteps_per_image) for j in range(timesteps_per_image)]
    device = next(p.device for p in unet.parameters())
    triples = []
    for i, record in enumerate(records):
        pixels = transform_image(
            load_image(record.path, record.reader),
            resolution,
            center_crop=True,
            random_flip=False,
            generator=torch.Generator(),
        )
        for t in fixed_t:
            triples.append((pixels, record.caption, derive_seed(seed, "eval", i, t), t))
    unet_dtype = next((p.dtype for p in unet.parameters() if not p.requires_grad), torch.float32)
    was_training = unet.training
    unet.eval()  # no adapter dropout while measuring
    total, count = 0.0, 0
    for start in range(0, len(triples), batch_size):
        chunk = triples[start : start + batch_size]
        pixels = torch.stack([c[0] for c in chunk])
        latents = encode_latents(vae, pixels, [c[2] for c in chunk]).float()
        noise = torch.stack(
            [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(c[2])) for c in chunk]
        ).to(latents.device)
        timesteps = torch.tensor([c[3] for c in chunk], device=latents.device)
        ids = tokenizer(
            [c[1] for c in chunk],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        states = text_encoder(ids, return_dict=False)[0]
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy.to(unet_dtype), timesteps, states.to(unet_dtype), return_dict=False)[0]
        target = prediction_target(scheduler, latents, noise, timesteps, prediction_type)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        total += per_sample.sum().item()
        count += len(chunk)
    unet.train(was_training)
    return total / count
