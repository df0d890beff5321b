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

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the `tomli` package (a dependency there)
    import tomli as tomllib

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
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
    center_crop: bool = _f(False, "center crop instead of random crop")
    random_flip: bool = _f(False, "randomly flip images horizontally")
    caption_dropout_rate: float = _f(0.0, "probability of training a sample with an empty caption")
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
    dataloader_num_workers: int = _f(0, "data loading worker processes")
    # --- optimisation ---
    train_batch_size: int = _f(1, "batch size per device")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(1e-4, "learning rate of the UNet adapter")
    lr_scheduler: str = _f("constant", "diffusers learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "warm-up optimizer steps")
    lr_num_cycles: int = _f(1, "cycles of cosine_with_restarts")
    lr_power: float = _f(1.0, "power of the polynomial schedule")
    max_train_steps: int | None = _f(None, "optimizer steps to train (overrides num_train_epochs)")
    num_train_epochs: int | None = _f(
        None, "epochs to train when max_train_steps is not set", aliases=("max_train_epochs",)
    )
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (needs bitsandbytes)")
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
    validation_steps: int | None = _f(None, "render validation every N optimizer steps (always at the end)")
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
        for name in (
            "rank",
            "train_batch_size",
            "gradient_accumulation_steps",
            "lr_num_cycles",
            "num_validation_images",
            "validation_num_inference_steps",
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
        ):
            _check(name, getattr(self, name), lambda v: v is None or v >= 1, ">= 1 (or unset)")
        for name in (
            "lr_warmup_steps",
            "dataloader_num_workers",
            "noise_offset",
            "max_grad_norm",
            "adam_weight_decay",
        ):
            _check(name, getattr(self, name), lambda v: v >= 0, ">= 0")
        for name in ("rank_dropout", "module_dropout", "caption_dropout_rate"):
            _check(name, getattr(self, name), lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("adam_beta1", "adam_beta2"):
            _check(name, getattr(self, name), lambda v: 0 <= v < 1, "in [0, 1)")
        for name in ("learning_rate", "adam_epsilon"):
            _check(name, getattr(self, name), lambda v: v > 0 and math.isfinite(v), "> 0")
        for name in ("alpha", "conv_alpha", "text_encoder_lr", "text_encoder_2_lr", "snr_gamma"):
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
        for name in ("resolution", "validation_resolution"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ConfigError(
                    f"{name} = {value} is not divisible by 8 (the VAE downsamples by 8); "
                    f"use {value // 8 * 8} or {value // 8 * 8 + 8}"
                )
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

    # --- derived values (one place, so the loop, the plan and the exporters agree) ---
    @property
    def effective_alpha(self) -> float:
        """Alpha of the attention/linear adapters: `alpha`, or `rank` when unset (scale 1)."""
        return float(self.rank if self.alpha is None else self.alpha)

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
        "use_8bit_adam",
        None,
        ("bitsandbytes",),
        "`pip install bitsandbytes` (or `pip install loha-diffusion[bnb]`)",
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
    "use_8bit_adam": "or drop the flag to use torch AdamW",
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
    bitsandbytes for `use_8bit_adam`, xformers), before any model is loaded.

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
KOHYA_SWITCHES: dict[str, tuple[str, str]] = {
    "v_parameterization": ("prediction_type", "v_prediction"),  # kohya's switch for v-prediction models
    "v2": ("model_arch", "sd2"),  # kohya's switch for SD2.x base models
}


def _canonical(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Map aliases to field names; reject unknown keys and a key given twice under two names."""
    fields, aliases = _field_table()
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
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
            help=f"kohya alias: same as --{name} {value}",
        )
    return parser


def _flag_names() -> list[str]:
    fields, aliases = _field_table()
    return ["config", *KOHYA_SWITCHES, *fields, *aliases]


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
    for key, text in args.items():
        if key in KOHYA_SWITCHES:
            name, value = KOHYA_SWITCHES[key]
            if _parse_cli_value(key, text, bool):
                if name in args:
                    raise ConfigError(f"--{key} and --{name} both set {name}; give it once")
                cli[name] = value
            continue
        cli[key] = _parse_cli_value(key, text, hints[key])
    values.update(cli)
    values.update(_canonical(overrides, "keyword arguments"))
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
