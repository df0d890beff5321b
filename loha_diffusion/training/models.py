"""The run's models: the base model loaded with errors that say what to do, frozen and placed; the adapter
configs the run injects; and the weightless (`meta` device) models the dry run plans on. (The optimizer, its
parameter groups and learning-rate schedule are in `optimizers.py`.)

Where the base model is read from (`resolve_base_model`): a local folder as it is; a hub id from the hub, or
from the local Hugging Face cache alone with `HF_HUB_OFFLINE` set or when one quick request finds the hub
unreachable, so a run without network fails (or starts from the cache) at once instead of after minutes of
huggingface_hub's download retries.

Everything here reads a `TrainConfig`; the loop (`loop.py`) calls these steps in diffusers' order.
"""

from __future__ import annotations

import difflib
import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import huggingface_hub
import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..config import AdapterConfig, config_class
from ..errors import ConfigError
from ..meta_models import meta_models
from ..model import inject_adapter
from ..single_file import CheckpointInfo, inspect_checkpoint, is_single_file, load_components
from ..targeting import text_encoder_preset, unet_preset
from ..utils import torch_dtype
from .config import TrainConfig

T = TypeVar("T")

ADAPTER_NAME = "default"  # the trained adapter's name on the UNet and text encoder (checkpoints, exports)

MAX_SANE_TOKENS = 100_000  # a text encoder's token limit above this is transformers' "no limit" placeholder


HUB_PROBE_TIMEOUT_S = 5.0  # one request to the hub endpoint before a download (its own retries take minutes)
HUB_PROBE_TTL_S = 60.0  # how long a probe's answer is reused (a run loads six components in a row)
DEMO_MODEL_PATH = "outputs/tiny-sd"  # the tiny random-weight model of sample_configs/quickstart.toml
_probes: dict[str, tuple[float, str | None]] = {}  # endpoint -> (time.monotonic(), None or why unreachable)
# (file, size, mtime, overrides) -> what inspect_checkpoint found (a .ckpt is read whole to inspect it)
_inspected: dict[tuple, CheckpointInfo] = {}


def base_model_options() -> str:
    """What `pretrained_model_name_or_path` can be, for error messages (the `make-tiny` demo named as such)."""
    return (
        "Use one of:\n"
        "  - a local diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/): "
        "check the path for typos;\n"
        "  - a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5', with network access, or with "
        "HF_HUB_OFFLINE=1 once it is in the Hugging Face cache (an earlier online run puts it there);\n"
        f"  - only to try the trainer offline (the demo of sample_configs/quickstart.toml): `loha-diffusion "
        f"make-tiny {DEMO_MODEL_PATH}` writes a tiny model with RANDOM weights to {DEMO_MODEL_PATH}; it makes "
        "noise, not images, and is no stand-in for a real base model."
    )


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or transformers' `TRANSFORMERS_OFFLINE`) is set, now or when
    huggingface_hub was imported (it reads the variable once, at import)."""
    now = any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return now or bool(hf_constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """None when the hub endpoint (`huggingface_hub.constants.ENDPOINT`, `HF_ENDPOINT` for a mirror) answers
    one request within `HUB_PROBE_TIMEOUT_S` seconds, else why not. The answer is reused for
    `HUB_PROBE_TTL_S` seconds.

    huggingface_hub retries every file of a download on network errors (5 times, with back-off): a hub id
    without network takes minutes and hundreds of warnings before it fails. One quick request first lets the
    loaders fall back to the local cache at once instead.
    """
    endpoint = hf_constants.ENDPOINT
    checked = _probes.get(endpoint)
    if checked is not None and time.monotonic() - checked[0] < HUB_PROBE_TTL_S:
        return checked[1]
    try:
        # The hub's own HTTP session (its proxies, certificates and client factory). Any answer, even an
        # error status, means the hub can be reached.
        huggingface_hub.get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
        reason = None
    except Exception as exc:  # its transport errors are requests', httpx's... by huggingface_hub version
        reason = f"{type(exc).__name__}: {exc}"
    _probes[endpoint] = (time.monotonic(), reason)
    return reason


def _looks_local(path: str) -> bool:
    """True for what can only be a local path: absolute, `./`, `~`, a Windows path, more than one `/`, the
    demo model's path, a first folder that exists here (`outputs/...`), or not a valid hub id."""
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return True
    if os.path.normpath(path) == os.path.normpath(DEMO_MODEL_PATH):  # the quick start before `make-tiny`
        return True
    if "/" in path and os.path.isdir(path.split("/")[0]):
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return False


def _close_folder(path: str) -> str:
    """`; did you mean '<folder>'?` for a folder beside the missing `path` with a similar name, else ''."""
    missing = Path(os.path.expanduser(path))
    parent = missing.parent
    if not parent.is_dir():
        return f" (nor does the folder {str(parent)!r} that would hold it)"
    try:
        names = [entry.name for entry in parent.iterdir() if entry.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(missing.name, names, n=1)
    return f"; did you mean {str(parent / close[0])!r}?" if close else ""


def resolve_base_model(
    path: str,
    revision: str | None = None,
    *,
    key: str = "pretrained_model_name_or_path",
    options: str | None = None,
) -> str:
    """Where to load the base model `path` from without waiting on the network: `path` itself when it is a
    local folder or a hub id the hub can be reached for, else the model's folder in the local Hugging Face
    cache (with `HF_HUB_OFFLINE` set, or when `hub_unreachable`). `key` names the setting in messages (e.g.
    `pretrained_vae_model_name_or_path`) and `options` what it can be (default: `base_model_options`).

    Raises:
        ConfigError: `path` is a local path that does not exist, or a hub id that is not in the local cache
            while offline or the hub cannot be reached; the message lists `options`.
    """
    options = base_model_options() if options is None else options
    if os.path.exists(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if _looks_local(path):
        raise ConfigError(f"{key} = {path!r} does not exist{_close_folder(path)}.\n{options}")
    if hub_offline():
        why = "HF_HUB_OFFLINE is set"
    else:
        reason = hub_unreachable()
        if reason is None:
            return path
        why = f"the Hugging Face hub ({hf_constants.ENDPOINT}) cannot be reached ({reason})"
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, local_files_only=True)
    except OSError:  # LocalEntryNotFoundError: not in the cache
        rev = f" at revision {revision!r}" if revision else ""
        what = "the base model" if key == "pretrained_model_name_or_path" else key
        raise ConfigError(
            f"cannot load {what} {path!r}{rev}: {why}, and it is not in the local Hugging Face cache "
            f"({hf_constants.HF_HUB_CACHE}); no folder {path!r} exists here either.\n{options}"
        ) from None


def load_with_hint(cfg: TrainConfig, loader: Callable[..., T]) -> T:
    """Call `loader(source, revision=cfg.revision)` for the base model `cfg.pretrained_model_name_or_path`,
    `source` being where `resolve_base_model` says to read it from (a local folder, the hub id, or its folder
    in the local cache when offline).

    Raises:
        ConfigError: as `resolve_base_model` (a missing local path, a hub id offline and not cached), or
            `loader` raised `OSError` (repository or file not found, missing component); the message lists
            `base_model_options`.
    """
    path = cfg.pretrained_model_name_or_path
    source = resolve_base_model(path, cfg.revision)
    try:
        return loader(source, revision=cfg.revision)
    except OSError as exc:
        raise ConfigError(
            f"cannot load the base model from pretrained_model_name_or_path = {path!r} "
            f"(revision {cfg.revision!r}): {exc}\n{base_model_options()}"
        ) from None


ARCHS = ("sd1", "sd2", "sdxl")  # base-model architectures the trainer knows (kohya: SD1.x, `--v2`, sdxl_*)
# The size each was trained at (SD2.x: its 768-v models; `resolve_arch_defaults` picks 512 for SD2 epsilon).
DEFAULT_RESOLUTIONS = {"sd1": 512, "sd2": 768, "sdxl": 1024}


@dataclass
class Models:
    """The base model's parts, as diffusers' training scripts load them (`CLIPTokenizer`, `CLIPTextModel`,
    `AutoencoderKL`, `UNet2DConditionModel`, `DDPMScheduler`); SDXL adds its second tokenizer and text
    encoder (`CLIPTextModelWithProjection`, OpenCLIP bigG), None for SD1.x/SD2.x.

    `arch` is one of `ARCHS`."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any
    tokenizer_2: Any = None
    text_encoder_2: nn.Module | None = None
    arch: str = "sd1"

    @classmethod
    def from_pipeline(cls, pipe: Any, noise_scheduler: Any = None) -> Models:
        """The parts of a loaded diffusers SD/SDXL pipeline (its scheduler unless `noise_scheduler` is given),
        with `arch` from its UNet config (`arch_of_unet_config`).

        Raises:
            ConfigError: the UNet is of no architecture the trainer knows.
        """
        return cls(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            vae=pipe.vae,
            unet=pipe.unet,
            noise_scheduler=pipe.scheduler if noise_scheduler is None else noise_scheduler,
            tokenizer_2=getattr(pipe, "tokenizer_2", None),
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
            arch=arch_of_unet_config(pipe.unet.config, type(pipe).__name__),
        )

    @property
    def tokenizers(self) -> list[Any]:
        """The tokenizers, first then second (SDXL)."""
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoders, first then second (SDXL)."""
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]


def single_file_info(cfg: TrainConfig) -> CheckpointInfo | None:
    """What `single_file.inspect_checkpoint` finds in the base model when `pretrained_model_name_or_path` is
    one `.safetensors`/`.ckpt` file (architecture, prediction type, the config folder to use), with
    `model_arch`, `prediction_type` and `model_config` as overrides; None for a folder or hub id. Inspected
    once per file, settings and file version (a `.ckpt` is read whole to inspect it).

    Raises:
        ConfigError: the file is not a checkpoint of a known architecture, or `model_config` does not fit it
            (from `inspect_checkpoint`: the message names the file and the fix).
    """
    path = os.path.expanduser(cfg.pretrained_model_name_or_path)
    if not is_single_file(path):
        return None
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, cfg.model_arch, cfg.prediction_type)
    key += (cfg.model_config,)
    if key not in _inspected:
        _inspected[key] = inspect_checkpoint(
            path, arch=cfg.model_arch, prediction_type=cfg.prediction_type, config_dir=cfg.model_config
        )
    return _inspected[key]


def arch_of_unet_config(config: Mapping[str, Any], where: str) -> str:
    """The architecture (`ARCHS`) of a diffusers UNet config: SDXL's UNet has the "text_time" added embedding
    (the pooled text embedding and the size/crop time ids), SD2.x's cross-attends to 1024 features (OpenCLIP
    ViT-H) through linear projections (`use_linear_projection`), SD1.x's to 768 (CLIP ViT-L) through 1x1
    convs. (The SDXL refiner has no first text encoder: loading it fails there.)

    Raises:
        ConfigError: a UNet with other added embeddings (not a model the trainer knows), naming `where`.
    """
    added = config.get("addition_embed_type")
    if added == "text_time":
        return "sdxl"
    if added is not None:
        raise ConfigError(
            f"{where} has a UNet with {added!r} added embeddings; this trainer trains SD1.x, SD2.x and SDXL "
            "base models"
        )
    sd2 = config.get("cross_attention_dim") == 1024 or config.get("use_linear_projection", False)
    return "sd2" if sd2 else "sd1"


def base_model_arch(cfg: TrainConfig) -> str:
    """The base model's architecture (`ARCHS`), read cheaply: a single file's tensor names
    (`single_file_info`, where `model_arch` overrides the detection), or the UNet config of a folder or hub
    id (where `model_arch`, if set, must agree with it).

    Raises:
        ConfigError: the model cannot be read (see `load_with_hint`, `single_file_info`), is not a UNet the
            trainer knows (`arch_of_unet_config`), or `model_arch` contradicts the folder's UNet config.
    """
    info = single_file_info(cfg)
    if info is not None:
        return info.arch
    path = cfg.pretrained_model_name_or_path
    config = load_with_hint(
        cfg, lambda src, **kw: UNet2DConditionModel.load_config(src, subfolder="unet", **kw)
    )
    arch = arch_of_unet_config(config, path)
    if cfg.model_arch is not None and cfg.model_arch != arch:
        raise ConfigError(
            f"model_arch = {cfg.model_arch!r}, but {path} is a diffusers {arch} model (its unet/config.json); "
            "model_arch only chooses for single-file checkpoints: drop it (or --v2)"
        )
    return arch


def base_prediction_type(cfg: TrainConfig) -> str | None:
    """The prediction type the run will train (`prediction_type`, else the single file's detected one or the
    scheduler config's), without loading weights; None when only the weights can tell (a single SD2.x file
    whose header does not say).

    Raises:
        ConfigError: the scheduler config cannot be read (see `load_with_hint`).
    """
    if cfg.prediction_type is not None:
        return cfg.prediction_type
    info = single_file_info(cfg)
    if info is not None:
        return info.prediction_type
    config = load_with_hint(
        cfg, lambda src, **kw: DDPMScheduler.load_config(src, subfolder="scheduler", **kw)
    )
    return config.get("prediction_type", "epsilon")


def resolve_arch_defaults(cfg: TrainConfig, arch: str) -> None:
    """Fill in (in place) the settings whose default depends on the architecture: `resolution` when unset, the
    size the base model was trained at: 512 for SD1.x, 1024 for SDXL, for SD2.x 768 (the 768-v models) or
    512 (the epsilon "base" models), as kohya's and diffusers' SD2 guides do. A single SD2.x file whose
    prediction type only its weights can tell gets 768 (SD2.1's main release).

    Raises:
        ConfigError: `arch` is not one of `ARCHS`, or the scheduler config cannot be read (SD2.x).
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown base-model architecture {arch!r}; use one of {', '.join(ARCHS)}")
    if cfg.resolution is None:
        if arch == "sd2":
            cfg.resolution = 512 if base_prediction_type(cfg) == "epsilon" else 768
        else:
            cfg.resolution = DEFAULT_RESOLUTIONS[arch]


def _checked_tokenizer(tokenizer: Any, path: str, folder: str) -> Any:
    # transformers 5 builds an empty tokenizer (2 tokens, no length limit) from a missing folder.
    if len(tokenizer) <= 2 or tokenizer.model_max_length > MAX_SANE_TOKENS:
        raise ConfigError(
            f"{path} has no usable tokenizer ({folder}/ is missing or incomplete: {len(tokenizer)} tokens, "
            f"limit {tokenizer.model_max_length}); a diffusers folder has {folder}/vocab.json and merges.txt"
        )
    return tokenizer


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The base model's first `CLIPTokenizer` alone (`tokenizer/` of a folder or hub id, or of a single file's
    config folder): small files, no weights, so the data scan can count caption tokens before any model is
    loaded. SDXL's second tokenizer has the same vocabulary and limit, so the first counts for both.

    Raises:
        ConfigError: the tokenizer cannot be loaded (see `models.load_with_hint`, `single_file_info`), or
            what loads is empty (transformers builds one from a missing `tokenizer/` folder).
    """
    return load_tokenizers(cfg, count=1)[0]


def load_tokenizers(cfg: TrainConfig, count: int | None = None) -> list[Any]:
    """The base model's `CLIPTokenizer`s, first then second (SDXL): `count` of them, or as many as the
    architecture has (`base_model_arch`) when None.

    Raises:
        ConfigError: as `load_tokenizer`.
    """
    path = cfg.pretrained_model_name_or_path
    if count is None:
        count = 2 if base_model_arch(cfg) == "sdxl" else 1
    folders = ("tokenizer", "tokenizer_2")[:count]
    info = single_file_info(cfg)
    if info is not None:
        parts = load_components(info, folders)
        return [_checked_tokenizer(parts[name], str(info.config_dir), name) for name in folders]
    return [_checked_tokenizer(_load_folder_tokenizer(cfg, name), path, name) for name in folders]


def _load_folder_tokenizer(cfg: TrainConfig, folder: str) -> Any:
    return load_with_hint(cfg, lambda src, **kw: CLIPTokenizer.from_pretrained(src, subfolder=folder, **kw))


def load_models(cfg: TrainConfig, tokenizers: Sequence[Any] | None = None) -> Models:
    """Load the tokenizer(s), text encoder(s), VAE, UNet and a DDPM noise scheduler of the base model: a
    diffusers folder or hub id (SD1.x/SD2.x: `CLIPTextModel`; SDXL adds `tokenizer_2` and the
    `CLIPTextModelWithProjection` `text_encoder_2`), or a single file through `single_file.load_components`
    (offline, configs from `model_config` or the shipped ones). `pretrained_vae_model_name_or_path` replaces
    the VAE (`load_vae`).

    `tokenizers`: what `load_tokenizers(cfg)` already gave (the run loads them first for the data scan); None
    loads them here. Weights come in the dtype they are stored in (`cfg.variant` picks e.g. the fp16 files of
    a folder), on the CPU.

    Raises:
        ConfigError: the model or VAE cannot be loaded (see `load_with_hint`, `single_file_info`, `load_vae`),
            or its UNet is not one the trainer knows (`arch_of_unet_config`).
    """
    arch = base_model_arch(cfg)
    names = ["text_encoder", "vae", "unet", "scheduler"] + (["text_encoder_2"] if arch == "sdxl" else [])
    tokenizers = list(tokenizers) if tokenizers is not None else load_tokenizers(cfg)
    info = single_file_info(cfg)
    if info is not None:
        parts = load_components(info, names)
    else:
        parts = {name: _load_folder_component(cfg, name) for name in names}
    if cfg.pretrained_vae_model_name_or_path:
        parts["vae"] = load_vae(cfg)
    arch_of_unet_config(parts["unet"].config, cfg.pretrained_model_name_or_path)
    return Models(
        tokenizer=tokenizers[0],
        text_encoder=parts["text_encoder"],
        vae=parts["vae"],
        unet=parts["unet"],
        noise_scheduler=parts["scheduler"],
        tokenizer_2=tokenizers[1] if arch == "sdxl" else None,
        text_encoder_2=parts.get("text_encoder_2"),
        arch=arch,
    )


_FOLDER_CLASSES = {
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
    "vae": AutoencoderKL,
    "unet": UNet2DConditionModel,
}


def _load_folder_component(cfg: TrainConfig, name: str) -> Any:
    """One component of a diffusers folder or hub id, with `load_with_hint`'s errors."""
    if name == "scheduler":
        return load_with_hint(
            cfg, lambda src, **kw: DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        )
    cls = _FOLDER_CLASSES[name]
    return load_with_hint(
        cfg, lambda src, **kw: cls.from_pretrained(src, subfolder=name, variant=cfg.variant, **kw)
    )


def load_vae(cfg: TrainConfig) -> nn.Module:
    """The separate VAE of `pretrained_vae_model_name_or_path` (kohya's `--vae`, diffusers'
    `--pretrained_vae_model_name_or_path`): a diffusers `AutoencoderKL` folder (`config.json` at its top, or
    a pipeline folder's `vae/`) or hub id, e.g. `madebyollin/sdxl-vae-fp16-fix`, an SDXL VAE that does not
    overflow in fp16.

    Raises:
        ConfigError: the path is a single file (give a diffusers VAE folder), does not exist, is a hub id that
            cannot be reached or is not cached offline, or holds no VAE.
    """
    key, path = "pretrained_vae_model_name_or_path", cfg.pretrained_vae_model_name_or_path
    fix = (
        "give a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors) or a hub id such as "
        "'madebyollin/sdxl-vae-fp16-fix'"
    )
    if os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(f"{key} = {path!r} is a file; {fix}")
    source = resolve_base_model(path, key=key, options=fix)
    local = Path(source)
    subfolder = "vae" if local.is_dir() and not (local / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder)
    except OSError as exc:
        raise ConfigError(f"cannot load the VAE {key} = {path!r}: {exc}\n{fix}") from None


def vae_in_float32(cfg: TrainConfig, arch: str) -> bool:
    """Whether the frozen VAE stays in float32 under mixed precision: `no_half_vae` when set, else for SDXL
    unless a separate VAE is given (the SDXL VAE overflows to NaN in fp16, which is why kohya's
    `--no_half_vae` and diffusers' SDXL script keep it in float32; a separate VAE is usually the fp16-fixed
    one, used in the weight dtype)."""
    if cfg.no_half_vae is not None:
        return cfg.no_half_vae
    return arch == "sdxl" and not cfg.pretrained_vae_model_name_or_path


def load_meta_models(cfg: TrainConfig) -> tuple[nn.Module, list[nn.Module]]:
    """The base UNet, and the text encoders `train_text_encoder` trains (`[]` when off, `[te]` SD1.x/SD2.x,
    `[te1, te2]` SDXL), on the `meta` device (from the model's configs only: no weights read, no memory
    used), for the dry run. A single file's configs come from its config folder (`single_file_info`).

    Raises:
        ConfigError: as `load_with_hint` (the folder has no `model_index.json` or component config, the hub
            id cannot be reached) or `single_file_info`, or `train_text_encoder` is set and the model has no
            `text_encoder`.
    """
    components = ("unet", "text_encoder", "text_encoder_2") if cfg.train_text_encoder else ("unet",)
    path = cfg.pretrained_model_name_or_path
    info = single_file_info(cfg)
    if info is not None:
        models = meta_models(info.config_dir, components=components)
    else:
        models = load_with_hint(cfg, lambda src, **kw: meta_models(src, components=components, **kw))
    if cfg.train_text_encoder and "text_encoder" not in models:
        raise ConfigError(f"train_text_encoder is set but {path} has no text_encoder.")
    return models["unet"], [models[name] for name in ("text_encoder", "text_encoder_2") if name in models]


def unet_adapter_config(cfg: TrainConfig) -> AdapterConfig:
    """The UNet adapter config: the preset (or explicit `target_modules`) with the run's ranks and options.

    Raises:
        ConfigError: `conv_rank`/`conv_alpha` are set with a preset other than "full" or with explicit
            `target_modules` (where `rank_pattern`/`alpha_pattern` set per-module ranks).
    """
    common = {
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "exclude_modules": cfg.exclude_modules,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
    }
    if cfg.target_modules:
        if cfg.conv_rank is not None or cfg.conv_alpha is not None:
            raise ConfigError(
                "conv_rank/conv_alpha apply to preset = 'full'; with explicit target_modules set per-module "
                "ranks with rank_pattern/alpha_pattern"
            )
        config_cls = config_class(cfg.algo)
        return config_cls(
            r=cfg.rank, alpha=cfg.effective_alpha, target_modules=list(cfg.target_modules), **common
        )
    if cfg.preset != "full" and (cfg.conv_rank is not None or cfg.conv_alpha is not None):
        raise ConfigError(
            f"conv_rank/conv_alpha only apply to preset = 'full' (preset {cfg.preset!r} adapts no k x k convs)"
        )
    return unet_preset(
        cfg.preset,
        algo=cfg.algo,
        r=cfg.rank,
        alpha=cfg.effective_alpha,
        conv_r=cfg.conv_rank if cfg.preset == "full" else None,
        conv_alpha=cfg.conv_alpha if cfg.preset == "full" else None,
        **common,
    )


def text_encoder_adapter_config(cfg: TrainConfig) -> AdapterConfig | None:
    """The text-encoder adapter config (CLIP attention + MLP), or None when the text encoder is frozen."""
    if not cfg.train_text_encoder:
        return None
    return text_encoder_preset(
        algo=cfg.algo,
        r=cfg.rank,
        alpha=cfg.effective_alpha,
        rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
    )


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen base weights: fp16/bf16 under that mixed precision, else float32 (as diffusers'
    scripts do). `mixed_precision` is accelerate's value ("no", "fp16", "bf16", "fp8")."""
    return torch_dtype(mixed_precision) if mixed_precision in ("fp16", "bf16") else torch.float32


def freeze_base_models(
    models: Models, device: torch.device, dtype: torch.dtype, *, vae_float32: bool = False
) -> None:
    """Freeze the VAE, text encoder(s) and UNet and move them to `device` (and to `dtype` unless float32);
    with `vae_float32` (`vae_in_float32`) the VAE stays in float32."""
    for model in (models.vae, *models.text_encoders, models.unet):
        model.requires_grad_(False)
        model.to(device)
        if dtype != torch.float32 and not (vae_float32 and model is models.vae):
            model.to(dtype=dtype)
    if vae_float32:
        models.vae.to(dtype=torch.float32)


def _non_reentrant_checkpoint(module: nn.Module, *args: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def enable_gradient_checkpointing(models: Models, text_encoders: bool) -> None:
    """Gradient checkpointing in the UNet and, with `text_encoders`, in every text encoder, all
    non-reentrant (`use_reentrant=False`): reentrant checkpointing gives no gradient to trainable weights
    inside a segment whose inputs need none (the text encoders' embeddings are frozen), so a text-encoder
    adapter would silently not train. diffusers' UNets are non-reentrant in every supported version (the
    function is passed where `enable_gradient_checkpointing` takes one, diffusers 0.32 on); transformers
    takes the checkpoint kwargs (its default was reentrant before 5.x)."""
    unet = models.unet
    if "gradient_checkpointing_func" in inspect.signature(unet.enable_gradient_checkpointing).parameters:
        unet.enable_gradient_checkpointing(_non_reentrant_checkpoint)
    else:
        unet.enable_gradient_checkpointing()
    if text_encoders:
        for text_encoder in models.text_encoders:
            # transformers 5.x renamed it (the old name warns); 4.x has only the old one.
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )


def add_adapters(
    models: Models, cfg: TrainConfig, unet_config: AdapterConfig, te_config: AdapterConfig | None
) -> None:
    """Inject the adapters (`te_config` None: the text encoders stay frozen; else into each text encoder,
    SDXL's two alike, as kohya's `te1`/`te2`), then switch on gradient checkpointing
    (`enable_gradient_checkpointing`) and xformers as `cfg` says, and set train/eval modes (VAE always eval).

    Adapters are created in float32 on each base layer's device (mixed precision keeps trainable weights
    fp32); their initialisation draws from the global torch RNG (seed it first).

    Raises:
        ConfigError: `enable_xformers_memory_efficient_attention` is set and xformers cannot run.
    """
    inject_adapter(models.unet, unet_config, ADAPTER_NAME)
    if te_config is not None:
        for text_encoder in models.text_encoders:
            inject_adapter(text_encoder, te_config, ADAPTER_NAME)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(models, te_config is not None)
    if cfg.enable_xformers_memory_efficient_attention:
        enable_xformers(models.unet)
    models.unet.train()
    for text_encoder in models.text_encoders:
        text_encoder.train(te_config is not None)
    models.vae.eval()


def enable_xformers(unet: nn.Module) -> None:
    """Switch the UNet to xformers attention.

    Raises:
        ConfigError: xformers is not installed, or it cannot run here (e.g. no CUDA); the message says to
            drop the flag (PyTorch SDPA attention is the default).
    """
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
