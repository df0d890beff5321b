"""`TrainConfig`: the one typed source of truth for a training run (SD1.x, SD2.x or SDXL, from a diffusers
folder, a hub id or a single `.safetensors`/`.ckpt` file), built from a TOML file and CLI flags.

Precedence is defaults < TOML (`--config file.toml`) < command-line flags. Flag names follow diffusers'
training scripts; kohya sd-scripts names are accepted as aliases (`--network_dim` = `--rank`, ...). Unknown
keys, wrong types and out-of-range values raise `ConfigError` naming the key.

Imports nothing heavy (no torch, diffusers or accelerate): `scripts/train_loha_sd.py` parses and checks its
command line with this module before it loads any of them, so `--help` and mistakes answer at once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .sample_prompts import read_sample_prompts

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the `tomli` package (a dependency there)
    import tomli as tomllib

OPTIMIZER_TYPES = ("AdamW", "AdamW8bit", "Adafactor", "Lion", "Prodigy")
MAX_TOKEN_LENGTHS = (75, 150, 225)  # kohya's --max_token_length: 1, 2 or 3 chunks of 75 tokens
# Keys of one `[[validation_prompts]]` table and their types (`check_validation_prompts`).
VALIDATION_PROMPT_KEYS: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "negative_prompt": (str,),
    "seed": (int,),
    "width": (int,),
    "height": (int,),
    "num_inference_steps": (int,),
    "guidance_scale": (int, float),
    "num_images": (int,),
}
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
    "adafactor",  # kohya's: transformers' AdafactorSchedule, with Adafactor's relative step (optimizers.py)
)


def _f(
    default: Any = None, help: str = "", *, choices: tuple | None = None, aliases: tuple = (), factory=None
):
    meta = {"help": help, "choices": choices, "aliases": aliases}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run; field names are the TOML keys and the `--flag` names."""

    # --- base model ---
    pretrained_model_name_or_path: str = _f(
        "",
        "base model (SD1.x, SD2.x or SDXL): a diffusers folder, a hub id, or one .safetensors/.ckpt file in the "
        "original (LDM/SGM) layout",
    )
    model_config: str | None = _f(
        None,
        "local diffusers folder whose component configs and tokenizers a single-file base model uses "
        "(default: the configs this package ships for SD1.5, SD2.1 and SDXL base)",
    )
    model_arch: str | None = _f(
        None,
        "architecture of the base model, overriding the detected one (kohya's --v2 means sd2)",
        choices=("sd1", "sd2", "sdxl"),
    )
    pretrained_vae_model_name_or_path: str | None = _f(
        None,
        "a separate VAE (diffusers folder or hub id), e.g. an fp16-safe SDXL VAE (default: the base model's)",
        aliases=("vae",),
    )
    no_half_vae: bool | None = _f(
        None,
        "keep the VAE in float32 under mixed precision (default: on for SDXL, whose VAE overflows in fp16, "
        "unless pretrained_vae_model_name_or_path gives a separate VAE; off for SD1.x/SD2.x)",
    )
    revision: str | None = _f(None, "model revision (hub branch, tag or commit)")
    variant: str | None = _f(None, "weight variant to load, e.g. fp16")
    prediction_type: str | None = _f(
        None,
        "override the scheduler's prediction type (default: read it from the scheduler config)",
        choices=("epsilon", "v_prediction"),
    )
    # --- adapter ---
    algo: str = _f("loha", "adapter kind", choices=("loha", "lora"))
    rank: int = _f(
        8, "rank r of every adapted module (LoHa's effective rank is r^2)", aliases=("network_dim",)
    )
    alpha: float | None = _f(
        None, "alpha; the update is scaled by alpha/rank (default: = rank)", aliases=("network_alpha",)
    )
    conv_rank: int | None = _f(
        None, "rank of 3x3 conv adapters (preset 'full'; default: = rank)", aliases=("conv_dim",)
    )
    conv_alpha: float | None = _f(None, "alpha of 3x3 conv adapters (default: = conv_rank)")
    use_effective_conv2d: bool = _f(
        False,
        "CP/Tucker decomposition for k x k convs (LyCORIS use_tucker)",
        aliases=("use_tucker", "use_cp"),
    )
    rank_dropout: float = _f(0.0, "probability of dropping a row of the update while training")
    module_dropout: float = _f(0.0, "probability of skipping a whole module's update while training")
    preset: str = _f(
        "attn_ff",
        "UNet modules to adapt (ignored when target_modules is set)",
        choices=("attn", "attn_ff", "full"),
    )
    target_modules: list[str] | None = _f(None, "explicit UNet module names/suffixes to adapt (PEFT rules)")
    exclude_modules: list[str] | None = _f(None, "UNet module names/suffixes never to adapt (PEFT rules)")
    rank_pattern: dict[str, int] = _f(help="per-module rank overrides, {name regex: rank}", factory=dict)
    alpha_pattern: dict[str, float] = _f(help="per-module alpha overrides, {name regex: alpha}", factory=dict)
    train_text_encoder: bool = _f(False, "also train an adapter on the text encoder (SDXL: on both)")
    unet_lr: float | None = _f(None, "learning rate of the UNet adapter (default: learning_rate)")
    text_encoder_lr: float | None = _f(
        None,
        "learning rate of the text encoder adapter (SDXL: the first, CLIP ViT-L) (default: learning_rate)",
    )
    text_encoder_2_lr: float | None = _f(
        None, "learning rate of SDXL's second text encoder adapter (OpenCLIP bigG) (default: text_encoder_lr)"
    )
    # --- data ---
    train_data_dir: str = _f(
        "",
        "folder of images + captions, of kohya '<N>_<concept>' folders, or an imagefolder with metadata.jsonl",
    )
    caption_extension: str = _f(".txt", "extension of the caption file next to each image")
    image_column: str = _f("file_name", "metadata.jsonl key holding the image file name")
    caption_column: str = _f("text", "metadata.jsonl key holding the caption")
    resolution: int | None = _f(
        None,
        "training resolution in pixels (square, divisible by 8) (default: the architecture's: 512 SD1.x, "
        "768 SD2.x v-prediction, 512 SD2.x epsilon, 1024 SDXL)",
    )
    center_crop: bool | None = _f(
        None,
        "center crop instead of random crop (default: center with enable_bucket or cache_latents, as kohya; "
        "random otherwise, as diffusers; kohya's random_crop = true means center_crop = false)",
    )
    random_flip: bool = _f(False, "randomly flip images horizontally", aliases=("flip_aug",))
    enable_bucket: bool = _f(
        False, "aspect-ratio buckets: batches of one bucket, images resized to cover it and cropped (kohya)"
    )
    min_bucket_reso: int | None = _f(None, "smallest bucket side in pixels (default: resolution / 2)")
    max_bucket_reso: int | None = _f(None, "largest bucket side in pixels (default: 2 x resolution)")
    bucket_reso_steps: int = _f(64, "bucket sides are multiples of this many pixels (a multiple of 8)")
    bucket_no_upscale: bool = _f(
        False, "never upscale: an image smaller than resolution^2 pixels gets a bucket of its own size"
    )
    cache_latents: bool = _f(
        False,
        "encode each image with the VAE once, before training (needs a fixed crop; with random_flip both "
        "flips are cached)",
    )
    cache_latents_to_disk: bool = _f(
        False, "keep the latent cache on disk (cache_dir) across runs; implies cache_latents"
    )
    cache_text_encoder_outputs: bool = _f(
        False,
        "encode each caption with the text encoder(s) once, before training (not with train_text_encoder, "
        "shuffle_caption or caption_tag_dropout_rate)",
    )
    cache_text_encoder_outputs_to_disk: bool = _f(
        False, "keep the text-encoder cache on disk (cache_dir); implies cache_text_encoder_outputs"
    )
    cache_dir: str | None = _f(
        None, "folder of the on-disk caches (default: .loha_cache inside train_data_dir)"
    )
    vae_batch_size: int = _f(1, "images per VAE call while caching latents")
    caption_dropout_rate: float = _f(0.0, "probability of training a sample with an empty caption")
    shuffle_caption: bool = _f(False, "shuffle the caption's tags (split at caption_separator) per sample")
    caption_separator: str = _f(",", "what separates the tags of a caption (kohya)")
    keep_tokens: int = _f(0, "the first N tags stay first and are never shuffled or dropped (kohya)")
    keep_tokens_separator: str = _f(
        "",
        "a marker in the caption: the tags before it stay in place (kohya; overrides keep_tokens where found)",
    )
    caption_tag_dropout_rate: float = _f(0.0, "probability of dropping each (not kept) tag per sample")
    caption_prefix: str | None = _f(None, "text put before every caption (kept in place)")
    caption_suffix: str | None = _f(None, "text put after every caption (kept in place)")
    reg_data_dir: str | None = _f(
        None,
        "regularization images for prior preservation (kohya '<N>_<class>' folders or a flat folder), "
        "interleaved with the training samples as kohya does",
    )
    prior_loss_weight: float = _f(1.0, "loss weight of regularization samples")
    max_token_length: int | None = _f(
        None,
        "caption length in tokens: 75 (CLIP's one window) or 150/225, encoded in chunks of 75 as kohya "
        "(default: 75)",
        choices=MAX_TOKEN_LENGTHS,
    )
    clip_skip: int | None = _f(
        None,
        "use the text encoder's hidden state this many layers from the end, with its final layer norm "
        "(kohya/A1111: 2 = penultimate; default: 1, the last; SD1.x/SD2.x only)",
    )
    on_missing_caption: str = _f(
        "error",
        "what to do with an image without caption: stop, skip it with a warning, or use the kohya folder's concept",
        choices=("error", "skip", "folder_name"),
    )
    on_bad_image: str = _f(
        "error",
        "what to do with an unreadable image or caption file (truncated, corrupt, too large, not UTF-8): "
        "stop before training, or skip it with a warning",
        choices=("error", "skip"),
    )
    background_color: str = _f(
        "white",
        "colour transparent pixels are composited onto: a name (white, black, gray, ...), '#rrggbb' or 'r,g,b'",
    )
    max_image_pixels: int | None = _f(
        None,
        "largest image accepted, width x height in pixels (default: Pillow's decompression-bomb limit, "
        "89,478,485); raise it to train on larger images",
    )
    dataloader_num_workers: int = _f(
        0, "data loading worker processes", aliases=("max_data_loader_n_workers",)
    )
    # --- optimisation ---
    train_batch_size: int = _f(1, "batch size per device")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(1e-4, "learning rate of the UNet adapter")
    lr_scheduler: str = _f("constant", "diffusers learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "warm-up optimizer steps")
    lr_num_cycles: int = _f(1, "cycles of cosine_with_restarts", aliases=("lr_scheduler_num_cycles",))
    lr_power: float = _f(1.0, "power of the polynomial schedule", aliases=("lr_scheduler_power",))
    max_train_steps: int | None = _f(None, "optimizer steps to train (overrides num_train_epochs)")
    num_train_epochs: int | None = _f(
        None, "epochs to train when max_train_steps is not set", aliases=("max_train_epochs",)
    )
    optimizer_type: str = _f(
        "AdamW",
        "optimizer (kohya names, any case): AdamW (torch), AdamW8bit (bitsandbytes), Adafactor "
        "(transformers), Lion (lion-pytorch), Prodigy (prodigyopt)",
        choices=OPTIMIZER_TYPES,
    )
    optimizer_args: list[str] = _f(
        help="extra optimizer arguments as key=value (kohya), e.g. weight_decay=0.1 betas=0.9,0.99",
        factory=list,
    )
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables clipping)")
    mixed_precision: str | None = _f(
        None,
        "autocast precision; adapter weights stay fp32 (default: accelerate config)",
        choices=("no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet (and text encoders)")
    enable_xformers_memory_efficient_attention: bool = _f(
        False, "use xformers attention instead of PyTorch SDPA", aliases=("xformers",)
    )
    snr_gamma: float | None = _f(
        None, "min-SNR-gamma loss weighting (5.0 is the paper's value)", aliases=("min_snr_gamma",)
    )
    noise_offset: float = _f(0.0, "noise offset (0.05-0.1 typical)")
    seed: int = _f(42, "seed of everything random: shuffling, crops, noise, timesteps, dropout, init")
    # --- outputs and checkpoints ---
    output_dir: str = _f("outputs/loha", "where files, checkpoints and logs go")
    output_name: str | None = _f(None, "file name stem of the exported adapter (default: the algo)")
    save_every_n_steps: int | None = _f(None, "also export the Kohya file every N optimizer steps")
    save_every_n_epochs: int | None = _f(None, "also export the Kohya file every N epochs")
    save_precision: str = _f("fp16", "dtype of exported adapter files", choices=("fp32", "fp16", "bf16"))
    save_peft_format: bool = _f(True, "also write the PEFT-format directory at the end")
    checkpointing_steps: int | None = _f(
        None, "save full training state (for resume) every N optimizer steps"
    )
    checkpoints_total_limit: int | None = _f(None, "keep at most this many training-state checkpoints")
    resume_from_checkpoint: str | None = _f(
        None, "'latest' or a checkpoint folder to continue from", aliases=("resume",)
    )
    # --- validation ---
    validation_prompt: list[str] = _f(help="prompts rendered into the validation grid", factory=list)
    validation_prompts: list[dict[str, Any]] = _f(
        help="validation prompts with their own settings: a TOML array of tables [[validation_prompts]] with "
        "prompt and optional negative_prompt, seed, width, height, num_inference_steps, guidance_scale, "
        "num_images",
        factory=list,
    )
    sample_prompts: str | None = _f(
        None,
        "kohya's prompt file (.txt with --n/--w/--h/--d/--l/--s options per line, .toml or .json), rendered as "
        "validation_prompts tables after them",
    )
    validation_negative_prompt: str = _f("", "negative prompt of the validation_prompt images")
    validation_steps: int | None = _f(
        None,
        "render validation every N optimizer steps (always at the end)",
        aliases=("sample_every_n_steps",),
    )
    validation_epochs: int | None = _f(
        None, "render validation every N epochs", aliases=("sample_every_n_epochs",)
    )
    num_validation_images: int = _f(2, "images per validation prompt")
    validation_num_inference_steps: int = _f(25, "sampler steps of validation images")
    validation_guidance_scale: float = _f(7.5, "classifier-free guidance of validation images")
    validation_resolution: int | None = _f(None, "validation image size (default: resolution)")
    # --- logging ---
    report_to: str = _f(
        "tensorboard", "experiment tracker", choices=("tensorboard", "wandb", "none"), aliases=("log_with",)
    )
    logging_dir: str = _f("logs", "tracker folder, relative to output_dir")
    dry_run: bool = _f(False, "print the plan (modules, parameters, file size, steps) and exit")

    def validate(self) -> None:
        """Check types, choices and ranges, and turn ints given for float fields into floats (in place); then
        what can be checked before any model is loaded: `output_name` is a plain file name, the optional
        packages the settings ask for are installed (`check_packages`), and the output folder can be written
        (`check_output_paths`).

        Raises:
            ConfigError: the first bad key, with what it must be.
        """
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name} = {value!r} is not one of {', '.join(map(repr, choices))}")
        if not self.pretrained_model_name_or_path:
            raise ConfigError(
                "pretrained_model_name_or_path is required (a diffusers folder, a hub id or a .safetensors file)"
            )
        if not self.train_data_dir:
            raise ConfigError("train_data_dir is required (a folder of images with captions)")
        if self.model_config is not None and not Path(self.model_config).expanduser().is_dir():
            raise ConfigError(
                f"model_config = {self.model_config!r} is not a folder; give a local diffusers folder (with "
                "model_index.json and the component configs), or leave it unset for the shipped configs"
            )
        self._check_ranges()
        for name in ("resolution", "validation_resolution", "bucket_reso_steps"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ConfigError(
                    f"{name} = {value} is not divisible by 8 (the VAE downsamples by 8); "
                    f"use {max(8, value // 8 * 8)} or {value // 8 * 8 + 8}"
                )
        if not self.caption_separator:
            raise ConfigError("caption_separator is empty; use ',' (kohya's default) or another separator")
        parse_optimizer_args(self.optimizer_args)
        check_validation_prompts(self.validation_prompts)
        if self.sample_prompts is not None:
            check_validation_prompts(read_sample_prompts(Path(self.sample_prompts).expanduser()))
        self._resolve_and_check_caches()
        if not self.caption_extension.startswith("."):
            raise ConfigError(
                f"caption_extension = {self.caption_extension!r} must start with a dot, e.g. '.txt'"
            )
        parse_color(self.background_color, "background_color")
        if self.max_train_steps is None and self.num_train_epochs is None:
            raise ConfigError("set max_train_steps or num_train_epochs (how long to train)")
        if self.resume_from_checkpoint == "":
            raise ConfigError("resume_from_checkpoint is empty; use 'latest' or a checkpoint folder")
        if self.output_name is not None:
            check_file_name(self.output_name, "output_name")
        check_packages(self)
        check_output_paths(self)

    def _check_ranges(self) -> None:
        """Every numeric setting within its range.

        Raises:
            ConfigError: the first setting out of range, with the range.
        """
        for name in (
            "rank",
            "train_batch_size",
            "gradient_accumulation_steps",
            "lr_num_cycles",
            "num_validation_images",
            "validation_num_inference_steps",
            "vae_batch_size",
        ):
            _check(name, getattr(self, name), lambda v: v >= 1, ">= 1")
        for name in (
            "conv_rank",
            "max_train_steps",
            "num_train_epochs",
            "save_every_n_steps",
            "save_every_n_epochs",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "validation_steps",
            "resolution",
            "validation_resolution",
            "max_image_pixels",
            "validation_epochs",
            "clip_skip",
            "min_bucket_reso",
            "max_bucket_reso",
        ):
            _check(name, getattr(self, name), lambda v: v is None or v >= 1, ">= 1 (or unset)")
        for name in (
            "lr_warmup_steps",
            "dataloader_num_workers",
            "noise_offset",
            "max_grad_norm",
            "adam_weight_decay",
            "keep_tokens",
            "prior_loss_weight",
        ):
            _check(name, getattr(self, name), lambda v: v >= 0, ">= 0")
        for name in ("rank_dropout", "module_dropout", "caption_dropout_rate", "caption_tag_dropout_rate"):
            _check(name, getattr(self, name), lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("adam_beta1", "adam_beta2"):
            _check(name, getattr(self, name), lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("learning_rate", "adam_epsilon"):
            _check(name, getattr(self, name), lambda v: v > 0 and math.isfinite(v), "> 0")
        for name in ("alpha", "conv_alpha", "unet_lr", "text_encoder_lr", "text_encoder_2_lr", "snr_gamma"):
            _check(
                name,
                getattr(self, name),
                lambda v: v is None or (v > 0 and math.isfinite(v)),
                "> 0 (or unset)",
            )
        for key, value in self.rank_pattern.items():
            _check(f"rank_pattern[{key!r}]", value, lambda v: v >= 1, ">= 1")
        for key, value in self.alpha_pattern.items():
            _check(f"alpha_pattern[{key!r}]", value, lambda v: v > 0, "> 0")

    def _resolve_and_check_caches(self) -> None:
        """Resolve `center_crop` and the `_to_disk` implications, and refuse cache settings that would serve
        stale data: a latent cache with per-step random crops, a text-encoder cache with captions that change
        per step or a trained text encoder.

        Raises:
            ConfigError: naming both settings of an incompatible pair and the fix.
        """
        self.cache_latents = self.cache_latents or self.cache_latents_to_disk
        self.cache_text_encoder_outputs = (
            self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk
        )
        if self.center_crop is None:  # kohya crops at the centre (random_crop off); diffusers at random
            self.center_crop = self.enable_bucket or self.cache_latents
        if self.cache_latents and not self.center_crop:
            raise ConfigError(
                "cache_latents cannot be used with random crops (center_crop = false, kohya's random_crop): a "
                "cached latent holds one crop. Set center_crop = true, or drop cache_latents"
            )
        if self.cache_text_encoder_outputs:
            changing = [
                (
                    "train_text_encoder",
                    self.train_text_encoder,
                    "the text encoder's output changes every step",
                ),
                ("shuffle_caption", self.shuffle_caption, "the caption changes every step"),
                (
                    "caption_tag_dropout_rate",
                    self.caption_tag_dropout_rate > 0,
                    "the caption changes every step",
                ),
            ]
            for key, on, why in changing:
                if on:
                    raise ConfigError(
                        f"cache_text_encoder_outputs cannot be used with {key} ({why}); drop one of the two"
                    )

    # --- derived values (one place, so the loop, the plan and the exporters agree) ---
    @property
    def effective_alpha(self) -> float:
        """Alpha of the attention/linear adapters: `alpha`, or `rank` when unset (scale 1)."""
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_unet_lr(self) -> float:
        """Learning rate of the UNet adapter: `unet_lr`, or `learning_rate` when unset (kohya's rule)."""
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    @property
    def effective_conv_rank(self) -> int:
        """Rank of k x k conv adapters: `conv_rank`, or `rank` when unset."""
        return self.rank if self.conv_rank is None else self.conv_rank

    @property
    def effective_conv_alpha(self) -> float:
        """Alpha of k x k conv adapters: `conv_alpha`, or the conv rank when unset."""
        return float(self.effective_conv_rank if self.conv_alpha is None else self.conv_alpha)

    @property
    def name(self) -> str:
        """File name stem of exported adapters."""
        return self.output_name or self.algo

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python values (a deep copy)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_toml(self) -> str:
        """The config as a TOML document that `load_config` reads back to an equal config (unset keys omitted)."""
        lines, tables = [], []
        for key, value in self.to_dict().items():
            if value is None:
                continue
            if isinstance(value, dict):
                if value:
                    tables.append(
                        f"\n[{key}]\n"
                        + "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in value.items())
                    )
                continue
            lines.append(f"{key} = {_toml_value(value)}\n")
        return "".join(lines) + "".join(tables)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # JSON scalars are valid TOML (strings are JSON-escaped, a TOML subset)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (the [[validation_prompts]] entries)
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def parse_color(text: str, key: str = "background_color") -> tuple[int, int, int]:
    """An opaque colour as (r, g, b), each 0-255, from a name Pillow knows (`white`, `black`, `gray`, CSS
    names), `#rgb`, `#rrggbb` or `r,g,b` (decimal).

    Raises:
        ConfigError: `text` is none of these; the message names `key` and the accepted forms.
    """
    from PIL import ImageColor  # only when validating: `--help` needs no Pillow

    value = text.strip()
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        rgb = tuple(int(p) for p in parts)
        if all(0 <= v <= 255 for v in rgb):
            return rgb
    elif len(parts) == 1 and not (value.startswith("#") and len(value) in (5, 9)):  # no alpha: opaque only
        try:
            return ImageColor.getcolor(value, "RGB")
        except ValueError:
            pass
    raise ConfigError(
        f"{key} = {text!r} is not a colour: use a name (white, black, gray, ...), '#rrggbb' or 'r,g,b' "
        "with values 0-255"
    )


def canonical_optimizer_type(name: str) -> str:
    """`name` spelled as in `OPTIMIZER_TYPES` when it matches one without regard to case (kohya compares
    optimizer names that way: "adamw8bit", "prodigy"), else unchanged (the choice check then names it)."""
    return next((known for known in OPTIMIZER_TYPES if known.lower() == name.lower()), name)


def parse_optimizer_args(items: list[str]) -> dict[str, Any]:
    """kohya's `optimizer_args` (`["weight_decay=0.1", "betas=0.9,0.99", "relative_step=False"]`) as a dict;
    values are Python literals as kohya reads them (`ast.literal_eval`: numbers, True/False/None, tuples,
    strings), anything else stays a string.

    Raises:
        ConfigError: an item is not `key=value`, or a key is given twice.
    """
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(
                f"optimizer_args item {item!r} is not key=value (e.g. weight_decay=0.01 or betas=0.9,0.99)"
            )
        if key in args:
            raise ConfigError(f"optimizer_args sets {key!r} twice; give it once")
        try:
            args[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            args[key] = text.strip()
    return args


def check_validation_prompts(tables: list[dict[str, Any]]) -> None:
    """Check the `[[validation_prompts]]` tables: each has a non-empty `prompt`, only keys of
    `VALIDATION_PROMPT_KEYS` with their types, and positive sizes (multiples of 8), steps, image counts and
    a guidance scale >= 0.

    Raises:
        ConfigError: naming the table (1-based) and the key.
    """
    for number, table in enumerate(tables, start=1):
        where = f"validation_prompts table {number}"
        if not isinstance(table, dict):
            raise ConfigError(f'{where} is not a table; write [[validation_prompts]] with prompt = "..."')
        if not isinstance(table.get("prompt"), str) or not table["prompt"].strip():
            raise ConfigError(f'{where} has no prompt; add prompt = "..."')
        for key, value in table.items():
            if key not in VALIDATION_PROMPT_KEYS:
                close = difflib.get_close_matches(key, list(VALIDATION_PROMPT_KEYS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{where}: unknown key {key!r}{hint} (known: {', '.join(VALIDATION_PROMPT_KEYS)})"
                )
            types_ = VALIDATION_PROMPT_KEYS[key]
            if not isinstance(value, types_) or isinstance(value, bool):
                raise ConfigError(
                    f"{where}: {key} = {value!r} must be {' or '.join(t.__name__ for t in types_)}"
                )
        for key in ("width", "height"):
            if key in table and (table[key] < 8 or table[key] % 8):
                raise ConfigError(f"{where}: {key} = {table[key]} must be a positive multiple of 8")
        for key in ("num_inference_steps", "num_images"):
            if key in table and table[key] < 1:
                raise ConfigError(f"{where}: {key} = {table[key]} must be >= 1")
        if table.get("guidance_scale", 0) < 0:
            raise ConfigError(f"{where}: guidance_scale = {table['guidance_scale']} must be >= 0")


# Characters Windows refuses in file names (ComfyUI and A1111 users copy adapters there), and its device names.
_FORBIDDEN_CHARACTERS = set('<>:"/\\|?*')
_WINDOWS_DEVICE_NAMES = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(1, 10)),
    *(f"LPT{i}" for i in range(1, 10)),
}
# Room for ".safetensors"/"_peft" and the writer's temporary name (`.NAME.PID.HEX.tmp`) in 255 bytes.
MAX_FILE_NAME_BYTES = 200
# Optional packages a setting needs: (setting, value or None for "true"), import name, how to install it.
OPTIONAL_PACKAGES = (
    ("report_to", "wandb", ("wandb",), "`pip install wandb` (then `wandb login`)"),
    ("report_to", "tensorboard", ("tensorboard", "tensorboardX"), "`pip install tensorboard`"),
    (
        "optimizer_type",
        "AdamW8bit",
        ("bitsandbytes",),
        "`pip install bitsandbytes` (or `pip install loha-diffusion[bnb]`)",
    ),
    (
        "optimizer_type",
        "Lion",
        ("lion_pytorch",),
        "`pip install lion-pytorch` (or `pip install loha-diffusion[optimizers]`)",
    ),
    (
        "optimizer_type",
        "Prodigy",
        ("prodigyopt",),
        "`pip install prodigyopt` (or `pip install loha-diffusion[optimizers]`)",
    ),
    (
        "enable_xformers_memory_efficient_attention",
        None,
        ("xformers",),
        "`pip install xformers` (matching your torch build)",
    ),
)
_INSTEAD = {
    "report_to": "or set report_to = 'none' (or another tracker)",
    "optimizer_type": "or use optimizer_type = 'AdamW' (torch, no extra package)",
    "enable_xformers_memory_efficient_attention": "or drop the flag to use PyTorch SDPA attention (the default)",
}


def check_file_name(name: str, key: str) -> None:
    """Refuse a file name stem that is not one plain file name on every system: empty, `.`/`..`, a path
    separator, a character Windows refuses (`<>:"/\\|?*`, control characters), a trailing dot or space, a
    Windows device name (CON, NUL, COM1, ...), or longer than `MAX_FILE_NAME_BYTES` bytes in UTF-8.

    Raises:
        ConfigError: naming `key`, what is wrong and the fix.
    """
    fix = f"give {key} a plain file name such as 'my_style' (the folder is output_dir)"
    if not name.strip():
        raise ConfigError(f"{key} is empty; {fix}")
    if name in (".", "..") or any(sep and sep in name for sep in ("/", "\\", os.sep, os.altsep)):
        raise ConfigError(f"{key} = {name!r} is a path, not a file name; {fix}")
    bad = sorted({c for c in name if c in _FORBIDDEN_CHARACTERS or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ConfigError(
            f"{key} = {name!r} contains {', '.join(map(repr, bad))}, not allowed in file names; {fix}"
        )
    if name[-1] in ". ":
        raise ConfigError(f"{key} = {name!r} ends with {name[-1]!r} (Windows drops it); {fix}")
    if name.split(".")[0].upper() in _WINDOWS_DEVICE_NAMES:
        raise ConfigError(f"{key} = {name!r} is a Windows device name; {fix}")
    if len(name.encode("utf-8")) > MAX_FILE_NAME_BYTES:
        raise ConfigError(
            f"{key} is {len(name.encode('utf-8'))} bytes long; use at most {MAX_FILE_NAME_BYTES}"
        )


def check_packages(cfg: TrainConfig) -> None:
    """Refuse settings whose optional package is not installed (`OPTIONAL_PACKAGES`: a `report_to` tracker,
    an optimizer's package (bitsandbytes, lion-pytorch, prodigyopt), xformers), before any model is loaded.

    accelerate drops a tracker whose package is missing with a log line, and the run then fails where it first
    uses it (the final validation grid, after the whole run); this makes that an error at start. Packages are
    found the way accelerate looks for them (`importlib.util.find_spec`), without importing them.

    Raises:
        ConfigError: naming the setting, the package and the install command.
    """
    for key, value, modules, install in OPTIONAL_PACKAGES:
        setting = getattr(cfg, key)
        if (setting != value) if value is not None else not setting:
            continue
        if any(_installed(module) for module in modules):
            continue
        shown = f"{key} = {value!r}" if value is not None else key
        raise ConfigError(f"{shown} needs {modules[0]}, which is not installed: {install}, {_INSTEAD[key]}.")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken package, or a module without a spec
        return False


def check_output_paths(cfg: TrainConfig) -> None:
    """Refuse outputs that cannot be written, before any model is loaded: `output_dir` (or a folder above
    it) is a file, or the folder that would hold it cannot be written; the tracker folder, the exported file
    or the PEFT folder exists as the wrong kind (a folder where the file goes, a file where a folder goes).

    Raises:
        ConfigError: naming the setting, the path and the fix.
    """
    out = Path(cfg.output_dir).expanduser()
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == out else f"is inside {existing}, which is a file"
        raise ConfigError(f"output_dir = {cfg.output_dir!r} {where}; choose a folder for the outputs")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        what = "output_dir" if existing == out else f"the folder {existing} that would hold output_dir"
        raise ConfigError(
            f"output_dir = {cfg.output_dir!r}: {what} is not writable (permission denied or a read-only "
            "filesystem); choose a folder you can write, or fix its permissions"
        )
    wrong_kind = [
        (out / cfg.logging_dir, True, "logging_dir"),
        (out / f"{cfg.name}.safetensors", False, "output_name"),
    ]
    if cfg.save_peft_format:
        wrong_kind.append((out / f"{cfg.name}_peft", True, "output_name"))
    for path, folder, key in wrong_kind:
        if path.exists() and path.is_dir() != folder:
            kind = "a file" if folder else "a folder"
            raise ConfigError(
                f"{path} exists and is {kind}, where the run writes {'a folder' if folder else 'a file'}; "
                f"move it away or change {key}"
            )


def _check(name: str, value: Any, ok, what: str) -> None:
    if value is not None and not ok(value):
        raise ConfigError(f"{name} = {value!r} must be {what}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check that a TOML/Python `value` fits the annotation `tp` (int -> float is the only conversion)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if tp is Any:  # checked by its own rule (`check_validation_prompts`)
        return value
    if tp is str and key == "optimizer_type" and isinstance(value, str):
        return canonical_optimizer_type(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [value]  # `validation_prompt = "a cat"` means one prompt
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, value_tp = typing.get_args(tp)
            return {str(k): _coerce(f"{key}[{k!r}]", v, value_tp) for k, v in value.items()}
    else:
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}")


def _parse_cli_value(key: str, text: str | list[str], tp: Any) -> Any:
    """Turn command-line text into a value of annotation `tp`, raising `ConfigError` naming the flag."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(text, str) and text.lower() in ("none", "null"):
            return None
        origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if text is True:
                return True
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is list:
            if typing.get_args(tp)[0] is not str:  # `--validation_prompts '{"prompt": "a cat", "seed": 1}'`
                return [json.loads(item) for item in text]
            return list(text)
        if origin is dict:
            # `--rank_pattern to_k=4 to_v=2` or one JSON object.
            if len(text) == 1 and text[0].lstrip().startswith("{"):
                raw = json.loads(text[0])
            else:
                raw = {}
                for item in text:
                    name, sep, number = item.rpartition("=")
                    if not sep or not name:
                        raise ValueError(f"{item!r} is not NAME=VALUE")
                    raw[name] = float(number)
            _, value_tp = typing.get_args(tp)
            return {k: int(v) if value_tp is int and float(v).is_integer() else v for k, v in raw.items()}
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--{key} {text!r}: {exc}") from None
    raise TypeError(f"unsupported annotation {tp} for {key}")


USER_ERROR_EXIT_STATUS = 2  # what the script returns for a bad config, file or dataset (argparse's status)


def report_user_error(exc: BaseException) -> int:
    """Print `error: <message>` to stderr, without a traceback, and return `USER_ERROR_EXIT_STATUS`."""
    print(f"error: {exc}", file=sys.stderr)
    return USER_ERROR_EXIT_STATUS


def _field_table() -> tuple[dict[str, dataclasses.Field], dict[str, str]]:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    aliases = {alias: f.name for f in fields.values() for alias in f.metadata.get("aliases", ())}
    return fields, aliases


def _unknown_key(key: str, where: str) -> ConfigError:
    fields, aliases = _field_table()
    close = difflib.get_close_matches(key, list(fields) + list(aliases), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown setting {key!r} in {where}{hint}")


# kohya sd-scripts' on/off switches that mean one value of one of our settings: `switch = true` sets it.
KOHYA_SWITCHES: dict[str, tuple[str, Any]] = {
    "v_parameterization": ("prediction_type", "v_prediction"),  # kohya's switch for v-prediction models
    "v2": ("model_arch", "sd2"),  # kohya's switch for SD2.x base models
    "random_crop": ("center_crop", False),  # kohya crops at random only with this switch
    "use_8bit_adam": ("optimizer_type", "AdamW8bit"),  # diffusers' scripts' switch (kohya's too, older)
}


# kohya's `network_module` values: the adapter kind each trains here (LyCORIS's is chosen by `algo=`).
KOHYA_NETWORK_MODULES = {"networks.lora": "lora", "lycoris.kohya": None}
_LYCORIS_ALGOS = {"loha": "loha", "lora": "lora", "locon": "lora"}
_LYCORIS_PRESETS = {"full": "full", "attn-mlp": "attn_ff", "attn-only": "attn"}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# network_args keys with no setting here, and what to use instead.
_NETWORK_ARGS_INSTEAD = {
    "dropout": "neuron dropout is not implemented; rank_dropout or module_dropout regularize the adapter",
    "down_lr_weight": "use rank_pattern/alpha_pattern for block-wise ranks, or unet_lr",
    "mid_lr_weight": "use rank_pattern/alpha_pattern for block-wise ranks, or unet_lr",
    "up_lr_weight": "use rank_pattern/alpha_pattern for block-wise ranks, or unet_lr",
    "block_dims": "use rank_pattern, e.g. rank_pattern = {'down_blocks\\.0\\..*' = 4}",
    "block_alphas": "use alpha_pattern, e.g. alpha_pattern = {'down_blocks\\.0\\..*' = 2}",
    "conv_block_dims": "use rank_pattern on the conv modules",
    "conv_block_alphas": "use alpha_pattern on the conv modules",
}


def kohya_network_settings(module: str | None, args: list[str] | None) -> dict[str, Any]:
    """kohya's `network_module` + `network_args` as this trainer's settings: `networks.lora` is LoRA;
    `lycoris.kohya` takes `algo=loha|lora|locon` (LyCORIS's default is LoRA/LoCon). `network_args` keys:
    `conv_dim` → `conv_rank` (and, as in kohya, the 3x3 convs are then adapted: `preset = "full"`),
    `conv_alpha`, `use_tucker`/`use_cp` → `use_effective_conv2d`, `rank_dropout`, `module_dropout`, LyCORIS's
    `preset` (full, attn-mlp, attn-only).

    Raises:
        ConfigError: a module or algo this trainer does not train, an arg without an equivalent here (the
            message names the nearest setting), or an arg that is not key=value.
    """
    settings: dict[str, Any] = {}
    if module is not None and module not in KOHYA_NETWORK_MODULES:
        raise ConfigError(
            f"network_module = {module!r} is not trained here; use 'networks.lora' (LoRA) or 'lycoris.kohya' "
            "with network_args = ['algo=loha'] (or set algo = 'loha' / 'lora' directly)"
        )
    if module is not None and KOHYA_NETWORK_MODULES[module]:
        settings["algo"] = KOHYA_NETWORK_MODULES[module]
    elif module is not None:
        settings["algo"] = "lora"  # LyCORIS's default algo
    for item in args or []:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep:
            raise ConfigError(f"network_args item {item!r} is not key=value (e.g. 'conv_dim=4')")
        if key == "algo":
            if text.lower() not in _LYCORIS_ALGOS:
                raise ConfigError(
                    f"network_args algo={text} is not trained here; use algo=loha or algo=lora/locon"
                )
            settings["algo"] = _LYCORIS_ALGOS[text.lower()]
        elif key == "preset":
            if text not in _LYCORIS_PRESETS:
                raise ConfigError(
                    f"network_args preset={text} has no equivalent; use {', '.join(_LYCORIS_PRESETS)}, or "
                    "target_modules for an explicit list"
                )
            settings["preset"] = _LYCORIS_PRESETS[text]
        elif key in ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout"):
            name = {"conv_dim": "conv_rank"}.get(key, key)
            try:
                settings[name] = int(text) if key == "conv_dim" else float(text)
            except ValueError:
                raise ConfigError(f"network_args {key}={text!r} is not a number") from None
            if key == "conv_dim":
                settings.setdefault("preset", "full")
        elif key in ("use_tucker", "use_cp"):
            if text.lower() not in _BOOL_WORDS:
                raise ConfigError(f"network_args {key}={text!r} is not True or False")
            settings["use_effective_conv2d"] = _BOOL_WORDS[text.lower()]
        elif key in _NETWORK_ARGS_INSTEAD:
            raise ConfigError(
                f"network_args {key}={text} has no equivalent here: {_NETWORK_ARGS_INSTEAD[key]}"
            )
        else:
            raise ConfigError(
                f"network_args {key}={text} is not understood; known: algo, preset, conv_dim (= conv_rank), "
                "conv_alpha, use_tucker (= use_effective_conv2d), rank_dropout, module_dropout"
            )
    return settings


def _canonical(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Map aliases to field names (and kohya's `network_module`/`network_args` and switches to settings);
    reject unknown keys and a key given twice under two names."""
    fields, aliases = _field_table()
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    raw = dict(raw)
    if "network_module" in raw or "network_args" in raw:
        module, args = raw.pop("network_module", None), raw.pop("network_args", None)
        if isinstance(args, str):
            args = [args]
        if not (module is None or isinstance(module, str)) or not (
            args is None or (isinstance(args, list) and all(isinstance(a, str) for a in args))
        ):
            raise ConfigError(
                f"network_module must be a string and network_args a list of 'key=value' in {where}"
            )
        for name, value in kohya_network_settings(module, args).items():
            out[name], given_as[name] = value, "network_args"
    for key, value in raw.items():
        if key in KOHYA_SWITCHES:
            if not isinstance(value, bool):
                raise ConfigError(f"{key} = {value!r} has the wrong type: expected bool")
            if not value:
                continue
            name, value = KOHYA_SWITCHES[key]
        elif key in fields:
            name = key
        elif key in aliases:
            name = aliases[key]
        else:
            raise _unknown_key(key, where)
        if name in out:
            raise ConfigError(f"{key!r} and {given_as[name]!r} both set {name} in {where}; keep one")
        out[name] = value
        given_as[name] = key
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file as `{field name: value}` (aliases resolved, unknown keys rejected).

    Raises:
        ConfigError: the file does not exist or is not TOML; a key is unknown (with the closest known name) or
            given twice under two names.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return _canonical(raw, str(path))


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"command line: {message} (see --help)")


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line: `--config FILE` plus one flag (and its aliases) for every `TrainConfig` field.

    Its `error` raises `ConfigError` instead of exiting; `--help` prints the flags and exits (`SystemExit(0)`).
    """
    parser = _ArgumentParser(
        prog="train_loha_sd.py",
        description="Train a LoHa/LoRA adapter for Stable Diffusion 1.x, 2.x or SDXL. Flags override the --config "
        "TOML.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="TOML file with any of the settings below (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        kind = typing.get_origin(tp) or tp
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.name == "optimizer_type":
            kwargs["type"] = canonical_optimizer_type
        elif kind is int and f.metadata.get("choices"):  # argparse compares choices with the converted value
            kwargs["type"] = int
        if kind is bool:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        elif kind in (list, dict):
            kwargs.update(nargs="+", metavar="NAME=VALUE" if kind is dict else "VALUE")
        flags = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", ())]
        parser.add_argument(*flags, **kwargs)
    for switch, (name, value) in KOHYA_SWITCHES.items():
        parser.add_argument(
            f"--{switch}",
            nargs="?",
            const=True,
            metavar="BOOL",
            help=f"alias: same as --{name} {value}",
        )
    parser.add_argument(
        "--network_module",
        help="kohya: networks.lora (LoRA) or lycoris.kohya (with network_args algo=loha|lora)",
    )
    parser.add_argument(
        "--network_args",
        nargs="+",
        metavar="KEY=VALUE",
        help="kohya/LyCORIS: algo, preset, conv_dim, conv_alpha, use_tucker, rank_dropout, module_dropout",
    )
    return parser


def _flag_names() -> list[str]:
    fields, aliases = _field_table()
    return ["config", "network_module", "network_args", *KOHYA_SWITCHES, *fields, *aliases]


def _unknown_flags(tokens: list[str]) -> ConfigError:
    """The error for command-line words no flag takes, with the closest flag for each mistyped one."""
    flags = [token.split("=", 1)[0] for token in tokens if token.startswith("-")]
    if not flags:
        return ConfigError(
            f"command line: unexpected {' '.join(tokens)!r} (every setting is a --flag; see --help)"
        )
    described = []
    for flag in flags:
        close = difflib.get_close_matches(flag.lstrip("-"), _flag_names(), n=1)
        described.append(flag + (f" (did you mean --{close[0]}?)" if close else ""))
    plural = "s" if len(flags) > 1 else ""
    return ConfigError(f"command line: unknown flag{plural} {', '.join(described)} (see --help)")


def _reject_repeated_flags(argv: list[str]) -> None:
    """argparse keeps the last of `--rank 4 --network_dim 8`; say so instead of silently dropping one."""
    fields, aliases = _field_table()
    seen: dict[str, str] = {}
    for token in argv:
        if not token.startswith("--"):
            continue
        flag = token[2:].split("=", 1)[0]
        name = aliases.get(flag, flag)
        if name not in fields:
            continue
        if name in seen:
            raise ConfigError(f"--{flag} and --{seen[name]} both set {name}; give it once")
        seen[name] = flag


def load_config(
    argv: list[str] | None = None, *, toml_path: str | Path | None = None, **overrides: Any
) -> TrainConfig:
    """Build and validate a `TrainConfig` from defaults, a TOML file, command-line flags and keyword overrides.

    `argv` is parsed like the script's command line (its `--config` names the TOML file); keyword overrides
    (used by tests and Python callers) win over everything. `--help` in `argv` prints the flags and raises
    `SystemExit(0)`, as argparse does.

    Raises:
        ConfigError: an unknown flag (with "did you mean --<closest>?") or key, a value of the wrong type or
            out of range, a setting given twice, a missing or unreadable TOML file; the message names the
            flag or key.
    """
    parser = build_arg_parser()
    parsed, unknown = parser.parse_known_args(argv or [])
    if unknown:
        raise _unknown_flags(unknown)
    args = vars(parsed)
    _reject_repeated_flags(argv or [])
    config_path = args.pop("config", None) or toml_path
    values: dict[str, Any] = read_toml(config_path) if config_path else {}
    hints = typing.get_type_hints(TrainConfig)
    cli: dict[str, Any] = {}
    network = {key: args.pop(key) for key in ("network_module", "network_args") if key in args}
    if network:
        cli.update(_canonical(network, "the command line"))
    for key, text in args.items():
        if key in KOHYA_SWITCHES:
            name, value = KOHYA_SWITCHES[key]
            if _parse_cli_value(key, text, bool):
                if name in args:
                    raise ConfigError(f"--{key} and --{name} both set {name}; give it once")
                cli[name] = value
            continue
        if key in cli:
            raise ConfigError(f"--network_args and --{key} both set {key}; give it once")
        cli[key] = _parse_cli_value(key, text, hints[key])
    values.update(cli)
    values.update(_canonical(overrides, "keyword arguments"))
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
