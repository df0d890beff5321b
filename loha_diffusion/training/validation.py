"""Validation during training: each validation prompt's images rendered through
`loha_diffusion.pipeline.load_adapter` from the exported file (so training and inference use the same path),
and a fixed-set denoising loss.

The prompts (`resolve_validation_prompts`) come from `validation_prompt` (run-wide settings), the
`[[validation_prompts]]` tables and kohya's `sample_prompts` file, each with its own negative prompt, seed,
size, steps, guidance and image count; they are encoded as training encodes captions (max_token_length,
clip_skip). Each prompt's images go to `validation/step-<step>-prompt-<index>.png` (one row per file, so
prompts of different sizes need no padding) and to the tracker as one image per prompt.

The validation pipeline is built from the run's own modules (UNet, text encoder(s), VAE, tokenizer(s)), not
loaded a second time: a second SD1.5 UNet and text encoder would hold ≈2 GB more on the device in fp16, SDXL's
≈6.8 GB. The exported file is loaded into those modules as a second adapter, `VALIDATION_ADAPTER`, which alone
is active while rendering; afterwards it is deleted and the trained adapter's state (active adapters,
train/eval modes, random states) is restored exactly (`validation_adapter`). Rendering runs in the modules'
own dtypes, as a user's half-precision pipeline with `load_adapter` does (adapter factors fp32, their delta
cast to the layer's dtype); the VAE decodes in its own dtype (SDXL's fp32 VAE under fp16 weights).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.utils import HFValidationError
from PIL import Image
from torch import nn

from ..files import atomic_path, atomic_write_text
from ..model import adapter_layers
from ..pipeline import adapter_components, delete_adapter, list_adapters, load_adapter, set_active_adapters
from .conditioning import TextEncoding, pipeline_prompt_embeds, unet_conditioning
from .config import TrainConfig, check_validation_prompts
from .data import ImageRecord, load_image, transform_image
from .models import Models, single_file_info
from .sample_prompts import read_sample_prompts
from .step import derive_seed, encode_latents, prediction_target

logger = logging.getLogger(__name__)

VALIDATION_ADAPTER = "validation"
# The sampler when the model folder names none: diffusers' DreamBooth LoRA scripts (train_dreambooth_lora.py,
# train_dreambooth_lora_sdxl.py) validate with DPM-Solver++ built from the model's scheduler config.
DEFAULT_INFERENCE_SCHEDULER = "DPMSolverMultistepScheduler"


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


def model_index_file(cfg: TrainConfig) -> Path | None:
    """Where the base model's `model_index.json` is on this machine, without any network request: in a local
    diffusers folder; for a single file, in the config folder it is loaded with (`models.single_file_info`:
    `model_config` or the shipped configs); for a hub id, in the local Hugging Face cache (`try_to_load_from_cache`,
    which the run's own loading filled). None when there is none.

    Raises:
        ConfigError: a single-file base model cannot be inspected (the run has loaded it before, so this is rare).
    """
    info = single_file_info(cfg)
    if info is not None:
        return info.config_dir / "model_index.json"
    path = cfg.pretrained_model_name_or_path
    local = Path(path).expanduser()
    if local.is_dir():
        return local / "model_index.json"
    try:
        cached = huggingface_hub.try_to_load_from_cache(path, "model_index.json", revision=cfg.revision)
    except HFValidationError:
        return None
    return Path(cached) if isinstance(cached, str) else None


def inference_scheduler(noise_scheduler: Any, model_index: Path | None) -> Any:
    """The sampler of the validation pipeline: the scheduler class the model's `model_index.json` names (as a
    `from_pretrained` pipeline of the model would use: PNDM for SD1.5, Euler for SDXL base), else
    `DEFAULT_INFERENCE_SCHEDULER`; configured from the run's training scheduler (`noise_scheduler.config`), so
    the betas, the prediction type and a zero-terminal-SNR rescale are the ones trained with. A missing or
    unreadable index, or a class diffusers does not have, falls back to the default."""
    import diffusers

    name = DEFAULT_INFERENCE_SCHEDULER
    try:
        entry = json.loads(model_index.read_text(encoding="utf-8")).get("scheduler") if model_index else None
    except (OSError, ValueError, AttributeError):
        entry = None
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        found = getattr(diffusers, entry[1], None)
        if isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin):
            name = entry[1]
    return getattr(diffusers, name).from_config(noise_scheduler.config)


def build_pipeline(models: Models, scheduler: Any) -> Any:
    """A `StableDiffusionPipeline` (SD1/SD2) or `StableDiffusionXLPipeline` (SDXL) around the run's own modules:
    nothing is loaded or copied, no module is moved or cast (the pipeline runs where the modules are). No
    safety checker, no watermark."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if models.arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            text_encoder_2=models.text_encoder_2,
            tokenizer=models.tokenizer,
            tokenizer_2=models.tokenizer_2,
            unet=models.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            unet=models.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _modes(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, bool]]:
    return [(sub, sub.training) for module in modules for sub in module.modules()]


@contextmanager
def validation_adapter(pipe: Any, adapter_file: str | Path) -> Iterator[None]:
    """Within the block, `adapter_file` is loaded into the pipeline's modules as `VALIDATION_ADAPTER`, it alone
    is active (the trained adapter stays loaded, inactive) and every module is in eval mode (no adapter dropout,
    no gradient checkpointing). On leaving, also after an error: the validation adapter is deleted, then every
    adapter layer's active adapters and every module's train/eval mode are set back to what they were. The
    trained adapter's tensors, `requires_grad` and the optimizer are never touched; the global torch RNG states
    (CPU, and CUDA of the modules' device) are restored, so validation does not shift training's random draws.

    Raises:
        LoHaDiffusionError: `load_adapter` cannot load `adapter_file` (the pipeline is left as it was).
        AdapterNameError: the pipeline already has an adapter named `VALIDATION_ADAPTER`.
    """
    modules = [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    modes = _modes(modules)
    active = [
        (layer, list(layer.active_adapters))
        for module in adapter_components(pipe).values()
        for layer in adapter_layers(module).values()
    ]
    device = pipe.unet.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        load_adapter(pipe, adapter_file, adapter_name=VALIDATION_ADAPTER)
        try:
            set_active_adapters(pipe, [VALIDATION_ADAPTER])
            for module in modules:
                module.eval()
            yield
        finally:
            if VALIDATION_ADAPTER in list_adapters(pipe):
                delete_adapter(pipe, VALIDATION_ADAPTER)
            for layer, names in active:
                layer.set_active(names)
            for sub, training in modes:
                sub.training = training


@torch.no_grad()
def decode_images(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images of `latents` `(B, 4, h, w)` (the pipeline's `output_type="latent"` result), decoded one at a
    time on the VAE's device as the pipelines decode (SDXL's `latents_mean`/`_std` when the VAE config has
    them, else division by `scaling_factor`): in the VAE's dtype, or in float32 for an fp16 VAE whose config
    says `force_upcast` (the SDXL VAE overflows in fp16; the SDXL pipeline's `upcast_vae`).

    Decoding here instead of in the pipeline keeps the VAE as training has it: `StableDiffusionXLPipeline`
    upcasts such a VAE in place and never casts it back, and the SD1 pipeline does not cast fp16 latents for an
    fp32 VAE. Here the upcast VAE is cast back to fp16 afterwards, which is exact (fp16 -> fp32 -> fp16)."""
    vae = pipe.vae
    stored = next(vae.parameters()).dtype
    upcast = stored == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        return [image for latent in latents.split(1) for image in _decode(pipe, latent)]
    finally:
        if upcast:
            vae.to(stored)


def _decode(pipe: Any, latent: torch.Tensor) -> list[Image.Image]:
    vae, config = pipe.vae, pipe.vae.config
    dtype = next(vae.parameters()).dtype
    latent = latent.to(device=vae.device, dtype=dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean, device=latent.device, dtype=dtype).view(shape)
        std_t = torch.tensor(std, device=latent.device, dtype=dtype).view(shape)
        latent = latent * std_t / config.scaling_factor + mean_t
    else:
        latent = latent / config.scaling_factor
    image = vae.decode(latent, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


@dataclass(frozen=True)
class ValidationPrompt:
    """One validation prompt and the settings it renders with (sizes in pixels, multiples of 8)."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    num_images: int


def resolve_validation_prompts(cfg: TrainConfig) -> list[ValidationPrompt]:
    """Every validation prompt of `cfg`, in this order: `validation_prompt` (each with the run-wide settings:
    `validation_negative_prompt`, `validation_resolution` (default `resolution`) square,
    `validation_num_inference_steps`, `validation_guidance_scale`, `num_validation_images`), then the
    `[[validation_prompts]]` tables, then the kohya `sample_prompts` file (`sample_prompts.read_sample_prompts`),
    a table's missing keys taken from the run-wide settings. Prompt i (0-based, over the whole list) without
    its own seed gets `cfg.seed + i`: deterministic, and different per prompt as kohya's numbered samples.

    Raises:
        ConfigError: the `sample_prompts` file cannot be read or parsed (see `read_sample_prompts`) or one of
            its tables is refused by `config.check_validation_prompts`.
    """
    size = cfg.validation_resolution or cfg.resolution
    shared = {
        "negative_prompt": cfg.validation_negative_prompt,
        "width": size,
        "height": size,
        "num_inference_steps": cfg.validation_num_inference_steps,
        "guidance_scale": cfg.validation_guidance_scale,
        "num_images": cfg.num_validation_images,
    }
    tables = [{"prompt": prompt} for prompt in cfg.validation_prompt] + list(cfg.validation_prompts)
    if cfg.sample_prompts:
        from_file = read_sample_prompts(Path(cfg.sample_prompts).expanduser())
        check_validation_prompts(from_file)
        tables += from_file
    return [
        ValidationPrompt(**{**shared, "seed": cfg.seed + index, **table})
        for index, table in enumerate(tables)
    ]


@dataclass
class RenderedPrompt:
    """One prompt's images of one validation: `grid` (its `num_images` in a row) saved at `path`."""

    index: int
    prompt: ValidationPrompt
    grid: Image.Image
    path: Path


class Validator:
    """Renders the validation prompts with a pipeline around the run's own modules plus the exported adapter.

    The pipeline (`build_pipeline`) holds the same UNet, text encoder(s), VAE and tokenizer(s) objects as
    `models` (the unwrapped ones: accelerate's prepared wrappers are not pipeline components), so it costs no
    memory beyond the validation adapter's factors; it is built once and reused. Each `render` loads the file
    it is given as `VALIDATION_ADAPTER` and removes it again (`validation_adapter`). Each prompt renders with
    its own `ValidationPrompt` settings from a CPU generator seeded with its seed, so its images are
    comparable across steps; prompts are encoded as training encodes captions (`encoding`: max_token_length,
    clip_skip; `conditioning.pipeline_prompt_embeds`). SDXL: the pipeline's micro-conditioning defaults
    (original and target size = the prompt's size, crop (0, 0))."""

    def __init__(
        self,
        *,
        models: Models,
        scheduler: Any,
        prompts: Sequence[ValidationPrompt],
        output_dir: str | Path,
        encoding: TextEncoding = TextEncoding(),
    ) -> None:
        self.models, self.scheduler = models, scheduler
        self.prompts = list(prompts)
        self.output_dir = Path(output_dir)
        self.encoding = encoding
        self._pipe = None
        self._described = False

    @property
    def folder(self) -> Path:
        """Where the images go: `<output_dir>/validation`."""
        return self.output_dir / "validation"

    def pipeline(self) -> Any:
        """The validation pipeline around the run's modules (built on first use; see `build_pipeline`)."""
        if self._pipe is None:
            self._pipe = build_pipeline(self.models, self.scheduler)
        return self._pipe

    def _embeds(self, pipe: Any, prompt: ValidationPrompt) -> dict[str, torch.Tensor]:
        # An empty negative prompt is the pipeline's "no negative prompt": zeros for SDXL base
        # (force_zeros_for_empty_prompt), the empty caption's states otherwise.
        zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        return pipeline_prompt_embeds(
            self.models,
            [prompt.prompt],
            [prompt.negative_prompt],
            device=pipe.unet.device,
            encoding=self.encoding,
            force_zeros_for_empty_prompt=zeros,
        )

    @torch.no_grad()
    def images(self, adapter_file: str | Path) -> list[list[Image.Image]]:
        """Each prompt's `num_images` images with `adapter_file` (alone) active, prompt by prompt, each
        prompt at its size, steps and guidance, from a CPU generator seeded with its seed.

        Raises:
            LoHaDiffusionError: `load_adapter` cannot load `adapter_file` (the modules are left as they were).
        """
        pipe = self.pipeline()
        images: list[list[Image.Image]] = []
        with validation_adapter(pipe, adapter_file):
            for prompt in self.prompts:
                latents = pipe(
                    **self._embeds(pipe, prompt),
                    height=prompt.height,
                    width=prompt.width,
                    num_images_per_prompt=prompt.num_images,
                    num_inference_steps=prompt.num_inference_steps,
                    guidance_scale=prompt.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(prompt.seed),
                    output_type="latent",
                ).images
                images.append(decode_images(pipe, latents))
        return images

    def render(self, adapter_file: str | Path, step: int) -> list[RenderedPrompt]:
        """Render the prompts with `adapter_file` (`images`) and save one file per prompt: its images in a
        row, `<output_dir>/validation/step-<step:06d>-prompt-<index:02d>.png` (written atomically). The first
        render also writes `validation/prompts.json`: each index's prompt and settings.

        Raises:
            LoHaDiffusionError: `load_adapter` cannot load `adapter_file`; a file cannot be written for lack
                of space or permission (`OutputWriteError`).
            OSError: a file cannot be written.
        """
        rendered = []
        for index, (prompt, images) in enumerate(zip(self.prompts, self.images(adapter_file), strict=True)):
            grid = make_grid(images, prompt.num_images)
            path = self.folder / f"step-{step:06d}-prompt-{index:02d}.png"
            with atomic_path(path) as tmp:
                grid.save(tmp, format="PNG")  # the temporary name has no .png suffix to infer it from
            rendered.append(RenderedPrompt(index, prompt, grid, path))
        if not self._described:
            described = [{"index": i, **asdict(p)} for i, p in enumerate(self.prompts)]
            atomic_write_text(self.folder / "prompts.json", json.dumps(described, indent=2) + "\n")
            self._described = True
        return rendered


def make_validator(cfg: TrainConfig, accelerator: Any, models: Models) -> Validator | None:
    """The validation renderer on the main process when the run has validation prompts
    (`resolve_validation_prompts`), else None. `models` are the run's unwrapped modules; the sampler is
    `inference_scheduler` of the base model's `model_index.json`; prompts are encoded with the run's
    `conditioning.TextEncoding`.

    Raises:
        ConfigError: a single-file base model cannot be inspected (see `model_index_file`), or the
            `sample_prompts` file cannot be used (see `resolve_validation_prompts`).
    """
    if not accelerator.is_main_process:
        return None
    prompts = resolve_validation_prompts(cfg)
    if not prompts:
        return None
    return Validator(
        models=models,
        scheduler=inference_scheduler(models.noise_scheduler, model_index_file(cfg)),
        prompts=prompts,
        output_dir=cfg.output_dir,
        encoding=TextEncoding.from_config(cfg),
    )


def fixed_triples(
    records: Sequence[ImageRecord],
    *,
    resolution: int,
    seed: int,
    timesteps_per_image: int,
    num_timesteps: int,
) -> list[dict[str, Any]]:
    """The fixed evaluation set: per image (center-cropped to `resolution`), `timesteps_per_image` timesteps
    evenly spread over `num_timesteps`, each `{"pixels": (3, H, W) float32, "caption", "seed", "timestep",
    "original_size": (h, w), "crop_top_left": (top, left)}` with a seed derived from `seed`, image and timestep."""
    fixed_t = [int((j + 0.5) * num_timesteps / timesteps_per_image) for j in range(timesteps_per_image)]
    triples = []
    for i, record in enumerate(records):
        image = transform_image(
            load_image(record.path, record.reader),
            resolution,
            center_crop=True,
            random_flip=False,
            generator=torch.Generator(),
        )
        for t in fixed_t:
            triples.append(
                {
                    "pixels": image.pixels,
                    "caption": record.caption,
                    "seed": derive_seed(seed, "eval", i, t),
                    "timestep": t,
                    "original_size": image.original_size,
                    "crop_top_left": image.crop_top_left,
                }
            )
    return triples


@torch.no_grad()
def fixed_denoising_loss(
    models: Models,
    records: Sequence[ImageRecord],
    *,
    resolution: int,
    prediction_type: str,
    seed: int = 0,
    timesteps_per_image: int = 4,
    max_images: int = 16,
    batch_size: int = 8,
    encoding: TextEncoding = TextEncoding(),
) -> float:
    """Mean unweighted denoising MSE over a fixed set of (image, noise, timestep) triples (`fixed_triples`).

    The first `max_images` images, center-cropped to `resolution` pixels, each at `timesteps_per_image`
    timesteps evenly spread over the schedule, with noise seeded from `seed`: the same arguments always give
    the same triples, so the value is comparable across training steps. The conditioning is the training
    step's (`conditioning.unet_conditioning` with the run's `encoding`; SDXL: both encoders and the
    micro-conditioning of each image's original size and crop, target size `resolution`). Runs in batches of `batch_size` on the UNet's device,
    the UNet and text encoders in eval mode (no adapter dropout; their modes are restored), the MSE in float32.

    Returns:
        The mean over all triples, a Python float.
    """
    unet = models.unet
    triples = fixed_triples(
        list(records)[:max_images],
        resolution=resolution,
        seed=seed,
        timesteps_per_image=timesteps_per_image,
        num_timesteps=models.noise_scheduler.config.num_train_timesteps,
    )
    device = next(p.device for p in unet.parameters())
    unet_dtype = next((p.dtype for p in unet.parameters() if not p.requires_grad), torch.float32)
    modes = _modes([unet, *models.text_encoders])
    for module in (unet, *models.text_encoders):
        module.eval()  # no adapter dropout while measuring
    total = 0.0
    try:
        for start in range(0, len(triples), batch_size):
            chunk = triples[start : start + batch_size]
            seeds = [c["seed"] for c in chunk]
            latents = encode_latents(models.vae, torch.stack([c["pixels"] for c in chunk]), seeds).float()
            latents = latents.to(device)
            noise = torch.stack(
                [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
            ).to(device)
            timesteps = torch.tensor([c["timestep"] for c in chunk], device=device)
            states, added = unet_conditioning(
                models,
                [c["caption"] for c in chunk],
                device=device,
                original_sizes=torch.tensor([c["original_size"] for c in chunk], dtype=torch.long),
                crops_top_left=torch.tensor([c["crop_top_left"] for c in chunk], dtype=torch.long),
                target_size=(resolution, resolution),
                encoding=encoding,
            )
            noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
            pred = unet(
                noisy.to(unet_dtype),
                timesteps,
                states.to(unet_dtype),
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            target = prediction_target(models.noise_scheduler, latents, noise, timesteps, prediction_type)
            total += (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1).sum().item()
    finally:
        for sub, training in modes:
            sub.training = training
    return total / len(triples)
