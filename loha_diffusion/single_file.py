"""Single-file base models: one `.safetensors` (or `.ckpt`) in the original layout, as people download them.

A Stable Diffusion checkpoint in the CompVis/Stability layout (LDM for SD1.x/SD2.x, SGM for SDXL) holds the
UNet (`model.diffusion_model.*`), the VAE (`first_stage_model.*`) and the text encoder(s)
(`cond_stage_model.*`, or `conditioner.embedders.0/1.*` for SDXL), but no configs and no tokenizer. They come
from a local diffusers folder (`config_dir`: the `--model-config` / `model_config` setting, e.g. the folder of
the base model the file was fine-tuned from) or, by default, from the configs this package ships for SD1.5,
SD2.1 (512 epsilon and 768 v-prediction) and SDXL base 1.0 (`base_configs/`, see its README for sources and
licences). Loading never touches the network: the weights go through diffusers' single-file conversion
(`UNet2DConditionModel/AutoencoderKL.from_single_file` and `create_diffusers_clip_model_from_ldm`, the code
`StableDiffusionPipeline.from_single_file` runs) with `config=<local folder>` and `local_files_only=True`.

What is read from the file (`inspect_checkpoint`, tensor names and shapes only):
- the architecture: SDXL has a second text encoder (`conditioner.embedders.1.*`), SD2.x's encoder is OpenCLIP
  (`cond_stage_model.model.*`) and SD1.x's OpenAI CLIP (`cond_stage_model.transformer.*`); a file without text
  encoders is told by the UNet's cross-attention width (768 SD1, 1024 SD2, 2048 SDXL). `arch=` overrides.
- the prediction type: epsilon for SD1.x and SDXL, v-prediction when the file has a `v_pred` key (ComfyUI's
  marker for v-prediction SDXL files); SD2.x's 768-v and 512-base files have the same tensors, so (as A1111's
  `modules/sd_models_config.py`) a `.yaml` beside the file with `parameterization: "v"` decides, else the weights
  do when they load (`detect_v_prediction`: A1111's `is_using_v_parameterization_for_sd2`, one UNet forward).
  `prediction_type=` overrides (kohya's explicit `--v_parameterization`).

`.ckpt` files are Python pickles, which can run code when loaded: they are read only with
`torch.load(weights_only=True)` (tensors and plain containers), and one that needs anything else is refused.
Prefer `.safetensors`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers import schedulers as diffusers_schedulers
from diffusers.loaders.single_file_utils import (
    SingleFileComponentError,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ConfigError, format_problems
from .formats.kohya.read import stored_dtypes_of
from .utils import most_common

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
ARCHS = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

# The configs shipped in base_configs/ (diffusers layout, no weights) and the shared CLIP BPE files.
SHIPPED = {"sd1": "sd15", "sd2-base": "sd2-base", "sd2-v": "sd2-v", "sdxl": "sdxl-base"}
CLIP_TOKENIZER = "clip_tokenizer"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # UNet cross-attention width of the real models
_ADAPTER_MARKERS = (".lora_down.", ".lora_up.", ".hada_w1_a", ".lokr_w1", "lora_A.", "lora_B.")
_DIFFUSERS_MARKERS = ("down_blocks.0.", "text_model.encoder.layers.0.", "encoder.layers.0.self_attn.")

HASH_CHUNK = 1 << 20  # bytes per read when hashing (A1111's and kohya's block size)
_hashes: dict[tuple[str, int, int], dict[str, str]] = {}

MODEL_CONFIG_HINT = (
    "give --model-config (the `model_config` setting) a local diffusers folder of the model family the file "
    "belongs to (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs), or choose the "
    "shipped configs with --model-arch sd1|sd2|sdxl"
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint is, and where its configs come from.

    Attributes:
        path: the checkpoint file.
        arch: "sd1" | "sd2" | "sdxl".
        prediction_type: "epsilon" | "v_prediction"; None for an SD2.x file whose type only its weights tell
            (`load_components` / `resolve_prediction_type` decide it).
        config_dir: a local diffusers-layout folder (model_index.json, `<component>/config.json`, tokenizer/
            [and tokenizer_2/], scheduler/). A shipped folder's tokenizer/ holds the settings only; the shared
            CLIP vocabulary is added by `load_components`, so load tokenizers through it.
        name: the file's stem, to name the base model in metadata (never the local path).
    """

    path: Path
    arch: str
    prediction_type: str | None
    config_dir: Path
    name: str


def is_single_file(path: str | os.PathLike) -> bool:
    """True for an existing regular file whose suffix is one of `SINGLE_FILE_SUFFIXES` (case-insensitive)."""
    p = Path(os.path.expanduser(os.fspath(path)))
    return p.suffix.lower() in SINGLE_FILE_SUFFIXES and p.is_file()


def base_configs_dir() -> Path:
    """The folder of the shipped configs (`loha_diffusion/base_configs`, installed as package data)."""
    return Path(str(resources.files("loha_diffusion") / "base_configs"))


def shipped_config_dir(arch: str, prediction_type: str | None = None) -> Path:
    """The shipped config folder for `arch`: SD1.5, SDXL base 1.0, or SD2.1 768-v ("v_prediction", and None:
    SD2.1's main release) / 512-base ("epsilon").

    Raises:
        ConfigError: `arch` is not one of `ARCHS`.
    """
    _check_choice("arch", arch, ARCHS)
    if arch == "sd2":
        return base_configs_dir() / SHIPPED["sd2-base" if prediction_type == "epsilon" else "sd2-v"]
    return base_configs_dir() / SHIPPED[arch]


def _check_choice(what: str, value: str | None, choices: Sequence[str]) -> None:
    if value is not None and value not in choices:
        raise ConfigError(f"{what} = {value!r} is not one of {', '.join(choices)}")


# -- reading the file ------------------------------------------------------------------------------------------


def _not_a_checkpoint(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{path} is not a readable Stable Diffusion checkpoint ({why}). Give a complete .safetensors (or .ckpt) "
        "of an SD1.x, SD2.x or SDXL base model, or a diffusers folder; download the file again if it is cut off."
    )


def _torch_load(path: Path, map_location: str) -> Any:
    """`torch.load` with `weights_only=True` (tensors and plain containers; no code runs)."""
    mmap = zipfile.is_zipfile(path)  # the zip format (torch >= 1.6) can be memory-mapped
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" not in text.lower():
            raise _not_a_checkpoint(
                path, f"not a torch pickle: {text.splitlines()[0] if text else ''}"
            ) from None
        # torch names the global it refused, e.g. "GLOBAL pytorch_lightning.callbacks...ModelCheckpoint".
        found = re.search(r"Unsupported global: (\S+(?: \S+)?)", text)
        needed = f" ({found.group(1)})" if found else ""
        raise ConfigError(
            f"{path} is a pickle that needs more than tensors to load{needed}. .ckpt files are loaded only with "
            "torch.load(weights_only=True), since unpickling anything else can run code from the file. Use the "
            "model's .safetensors release, or convert the file to .safetensors where you trust it (load it and "
            "save its state dict with safetensors)."
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file is a bad file here
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise _not_a_checkpoint(path, f"{type(exc).__name__}: {text}") from None


def _tensors_of(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a loaded `.ckpt`: CompVis/Stability releases nest them under "state_dict" (diffusers'
    `load_single_file_checkpoint` unwraps the same way); step counters and the like are left out."""
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise _not_a_checkpoint(path, f"the pickle holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """`{tensor name: shape}` of a checkpoint without reading its tensor data: the safetensors header, or a
    `.ckpt` loaded onto the `meta` device (weights-only).

    Raises:
        ConfigError: the file is missing, truncated or not a checkpoint, or a `.ckpt` needs code to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (or is not a file); check the path of the base model")
    if path.suffix.lower() == ".ckpt":
        return {k: tuple(v.shape) for k, v in _tensors_of(path, _torch_load(path, "meta")).items()}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise _not_a_checkpoint(path, f"safetensors: {exc}") from None


def load_state_dict(
    path: str | os.PathLike, prefixes: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint on the CPU, all or those whose names start with one of `prefixes` (a
    `.safetensors` file reads only those; a `.ckpt` is loaded weights-only, memory-mapped when zip-format).

    Raises:
        ConfigError: as `read_shapes`.
    """
    path = Path(path)
    if path.suffix.lower() == ".ckpt":
        tensors = _tensors_of(path, _torch_load(path, "cpu"))
        return (
            tensors
            if prefixes is None
            else {k: v for k, v in tensors.items() if k.startswith(tuple(prefixes))}
        )
    try:
        if prefixes is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(tuple(prefixes))}
    except (SafetensorError, OSError) as exc:
        raise _not_a_checkpoint(path, f"safetensors: {exc}") from None


class _Weights:
    """One component's tensors at a time (a `.safetensors` file is read per component, so an SDXL file's 7 GB
    are never all in memory next to the models being built; a `.ckpt` is unpickled once)."""

    def __init__(self, info: CheckpointInfo) -> None:
        self.path = info.path
        self.prefixes = {"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX,)}
        self.prefixes.update({c: (p,) for c, p in TEXT_ENCODER_PREFIXES[info.arch].items()})
        self._ckpt: dict[str, torch.Tensor] | None = None

    def of(self, component: str) -> dict[str, torch.Tensor]:
        prefixes = self.prefixes[component]
        if self.path.suffix.lower() != ".ckpt":
            return load_state_dict(self.path, prefixes)
        if self._ckpt is None:
            self._ckpt = load_state_dict(self.path)
        return {k: v for k, v in self._ckpt.items() if k.startswith(prefixes)}


# -- what the file is ------------------------------------------------------------------------------------------


def _check_base_model(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    if not shapes:
        raise _not_a_checkpoint(path, "it holds no tensors")
    names = list(shapes)
    if any(marker in name for name in names for marker in _ADAPTER_MARKERS) or any(
        name.startswith(("lora_unet_", "lora_te")) for name in names
    ):
        raise ConfigError(
            f"{path} is an adapter (LoRA/LoHa/LoKr) file, not a base model. Give it as the adapter (e.g. the FILE "
            "of `loha-diffusion verify FILE --pipeline BASE`), and as the base model a full checkpoint "
            "(.safetensors with model.diffusion_model.* tensors) or a diffusers folder."
        )
    if any(name.startswith("conditioner.embedders.0.model.") for name in names):
        raise ConfigError(
            f"{path} is an SDXL refiner (one OpenCLIP text encoder, conditioner.embedders.0.model.*): it is no base "
            "model to train adapters on; use an SDXL base checkpoint (e.g. sd_xl_base_1.0.safetensors)."
        )
    if not any(name.startswith(UNET_PREFIX) for name in names):
        if any(name.startswith(_DIFFUSERS_MARKERS) for name in names):
            why = (
                "its tensors have diffusers names: it is one component of a diffusers folder; give the folder"
            )
        else:
            why = f"no {UNET_PREFIX}* UNet tensors; a VAE or text encoder alone cannot be a base model"
        raise ConfigError(f"{path} is not a Stable Diffusion checkpoint in the original layout ({why}).")


def _context_dim(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The UNet's cross-attention width (the input width of the first `attn2.to_k`)."""
    keys = sorted(k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return shapes[keys[0]][-1] if keys else None


def detect_arch(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """ "sd1" | "sd2" | "sdxl" from tensor names (the text encoders' layout), else from the UNet's
    cross-attention width; None when neither tells (e.g. a UNet of unusual width without text encoders)."""
    names = list(shapes)
    if any(n.startswith("conditioner.embedders.1.") for n in names):
        return "sdxl"
    if any(n.startswith("cond_stage_model.model.") for n in names):
        return "sd2"
    if any(n.startswith("cond_stage_model.transformer.") for n in names):
        return "sd1"
    return CONTEXT_DIMS.get(_context_dim(shapes))


def _detect_prediction(path: Path, arch: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if "v_pred" in shapes:  # ComfyUI's marker key for v-prediction checkpoints (e.g. v-pred SDXL fine-tunes)
        return "v_prediction"
    if arch != "sd2":
        return "epsilon"
    beside = path.with_suffix(".yaml")
    if not beside.is_file():
        return None
    try:
        original = yaml.safe_load(beside.read_text(encoding="utf-8")) or {}
        params = original.get("model", {}).get("params", {})
    except (yaml.YAMLError, AttributeError, OSError) as exc:
        raise ConfigError(
            f"{beside} (the original config beside {path.name}) cannot be read: {exc}. Fix or remove it, or set "
            "prediction_type (--prediction_type v_prediction / epsilon)."
        ) from None
    # A1111 (`find_checkpoint_config_near_filename`) uses a same-named .yaml as the model's config.
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def _required_config_files(arch: str) -> list[str]:
    files = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"]
    files += ["scheduler/scheduler_config.json", "tokenizer"]
    return files + (["text_encoder_2/config.json", "tokenizer_2"] if arch == "sdxl" else [])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from None


def _check_config_fits(
    path: Path, arch: str, config_dir: Path, shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """The config folder has every file the architecture needs and its UNet takes the file's tensors."""
    if not config_dir.is_dir():
        raise ConfigError(f"model_config {config_dir} is not a folder; {MODEL_CONFIG_HINT}")
    missing = [f for f in _required_config_files(arch) if not (config_dir / f).exists()]
    if missing:
        raise ConfigError(
            format_problems(f"{config_dir} lacks configs a {arch} single file needs:", [("missing", missing)])
            + f"\n{MODEL_CONFIG_HINT}"
        )
    unet = _read_json(config_dir / "unet" / "config.json")
    problems = []
    stem = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if stem is not None and stem[1] != unet.get("in_channels", 4):
        problems.append(f"UNet input channels: file {stem[1]}, config {unet.get('in_channels', 4)}")
    context = _context_dim(shapes)
    if context is not None and context != unet.get("cross_attention_dim", 1280):
        problems.append(
            f"UNet cross-attention width: file {context}, config {unet.get('cross_attention_dim')}"
        )
    if (unet.get("addition_embed_type") == "text_time") != (arch == "sdxl"):
        problems.append(f"architecture: file {arch}, config {'sdxl' if arch != 'sdxl' else 'not sdxl'}")
    if problems:
        raise ConfigError(
            format_problems(f"{path} does not fit the configs in {config_dir}:", [("differences", problems)])
            + f"\n{MODEL_CONFIG_HINT} (an inpainting or other special model needs its own configs)"
        )


def inspect_checkpoint(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    prediction_type: str | None = None,
    config_dir: str | os.PathLike | None = None,
) -> CheckpointInfo:
    """What a single-file checkpoint is, from its tensor names and shapes only (no weights are read).

    Args:
        path: a `.safetensors` or `.ckpt` file in the original LDM/SGM layout.
        arch: "sd1" | "sd2" | "sdxl" to override the detection (kohya's `--v2` is "sd2").
        prediction_type: "epsilon" | "v_prediction" to override the detection (see the module docstring).
        config_dir: a local diffusers folder with the configs and tokenizer files to use; None = the shipped
            ones for the architecture (and, for SD2.x, the prediction type; 768-v while it is unknown).

    Raises:
        ConfigError: the file is missing, truncated, not a checkpoint (an adapter file, one diffusers
            component), a `.ckpt` that needs code to unpickle, of an architecture that cannot be told (give
            `arch`), or `config_dir` lacks configs or does not fit the file. The message names the file and fix.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    _check_choice("model_arch", arch, ARCHS)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ConfigError(f"{path}: a single-file base model is a {' or '.join(SINGLE_FILE_SUFFIXES)} file")
    shapes = read_shapes(path)
    _check_base_model(path, shapes)
    found = detect_arch(shapes)
    arch = arch or found
    if arch is None:
        raise ConfigError(
            f"{path}: cannot tell SD1.x, SD2.x and SDXL apart (no text encoder tensors, UNet cross-attention "
            f"width {_context_dim(shapes)}); set model_arch (--model-arch sd1|sd2|sdxl) and model_config."
        )
    prediction_type = prediction_type or _detect_prediction(path, arch, shapes)
    folder = (
        Path(config_dir).expanduser() if config_dir is not None else shipped_config_dir(arch, prediction_type)
    )
    _check_config_fits(path, arch, folder, shapes)
    return CheckpointInfo(
        path=path, arch=arch, prediction_type=prediction_type, config_dir=folder, name=path.stem
    )


# -- loading ---------------------------------------------------------------------------------------------------


def detect_v_prediction(unet: nn.Module) -> bool:
    """Whether a UNet predicts v (A1111's `is_using_v_parameterization_for_sd2`, modules/sd_models_config.py):
    at the last timestep (999) an epsilon model given a constant latent x = 0.5 (8x8) and a constant context
    (0.5, two tokens) answers close to x, a v model far below it; v when mean(output - x) < -1.

    A1111 runs it in float32 on the CPU; it runs here in the UNet's dtype and device (`load_components` loads
    the UNet in float32 for it).
    """
    param = next(unet.parameters())
    config = unet.config
    x = torch.full((1, config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
    timestep = torch.tensor([999], device=param.device)
    with torch.no_grad():
        out = unet(x, timestep, encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1


def _is_shipped(folder: Path) -> bool:
    return folder.resolve().parent == base_configs_dir().resolve()


def _with_prediction(info: CheckpointInfo, prediction_type: str) -> CheckpointInfo:
    """`info` with the prediction type decided; a shipped SD2 folder follows it (512-base / 768-v)."""
    folder = info.config_dir
    if info.arch == "sd2" and _is_shipped(folder):
        folder = shipped_config_dir("sd2", prediction_type)
    return dataclasses.replace(info, prediction_type=prediction_type, config_dir=folder)


def _load_model(
    cls: type, info: CheckpointInfo, state: dict[str, torch.Tensor], component: str, dtype: torch.dtype | None
) -> nn.Module:
    """The UNet or VAE through diffusers' `from_single_file`, configs from `info.config_dir` (offline)."""
    try:
        model = cls.from_single_file(
            state, config=str(info.config_dir), subfolder=component, local_files_only=True, torch_dtype=dtype
        )
    except SingleFileComponentError:
        fix = "use a complete checkpoint"
        if component == "vae":
            fix = "give a separate VAE (pretrained_vae_model_name_or_path, --vae) or " + fix
        raise ConfigError(
            f"{info.path} has no {component} weights (a base model file holds UNet, VAE and text encoders): {fix}."
        ) from None
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        missing = _missing_tensors(cls, info, state, component)
        if missing:
            raise _incomplete(info, component, missing) from None
        raise _misfit(info, component, exc) from None
    return _complete(model, info, component)


def _missing_tensors(
    cls: type, info: CheckpointInfo, state: dict[str, torch.Tensor], component: str
) -> list[str]:
    """The model parameters diffusers' conversion of the file does not provide (it fails moving such a model
    off the `meta` device, with a message that names none)."""
    try:
        config = cls.load_config(str(info.config_dir), subfolder=component, local_files_only=True)
        convert = convert_ldm_unet_checkpoint if cls is UNet2DConditionModel else convert_ldm_vae_checkpoint
        converted = convert(checkpoint=state, config=config)
        with torch.device("meta"):
            expected = cls.from_config(config).state_dict()
    except (ValueError, RuntimeError, KeyError, OSError):
        return []
    return sorted(set(expected) - set(converted))


def _incomplete(info: CheckpointInfo, component: str, missing: list[str]) -> ConfigError:
    return ConfigError(
        format_problems(
            f"{info.path} lacks {component} weights that {info.config_dir / component} expects:",
            [("missing parameters", missing)],
            [f"a truncated or pruned file, or another model family: {MODEL_CONFIG_HINT}"],
        )
    )


def _misfit(info: CheckpointInfo, component: str, exc: BaseException) -> ConfigError:
    detail = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"The {component} weights of {info.path} do not fit {info.config_dir / component}: {detail}\n"
        f"{MODEL_CONFIG_HINT}"
    )


def _complete(model: nn.Module, info: CheckpointInfo, component: str) -> nn.Module:
    """diffusers leaves parameters the file lacks on the `meta` device; a model with any is refused."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise _incomplete(info, component, missing)
    return model.eval()


_TEXT_ENCODER_CLASSES = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}


_OLD_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _transformers_v4_name(key: str, prefix: str) -> str:
    """OpenAI-CLIP names as transformers 4 wrote them (`...transformer.text_model.encoder...`): files saved
    with transformers 3 lack `text_model.`; A1111 renames them the same way (`checkpoint_dict_replacements_sd1`)."""
    rest = key[len(prefix) :]
    if prefix.endswith(".transformer.") and rest.startswith(_OLD_CLIP_ROOTS):
        return f"{prefix}text_model.{rest}"
    return key


def _load_text_encoder(
    info: CheckpointInfo, state: dict[str, torch.Tensor], component: str, dtype: torch.dtype | None
) -> nn.Module:
    """A CLIP text encoder through diffusers' `create_diffusers_clip_model_from_ldm`, given only the tensors of
    its own prefix, so SDXL's two encoders cannot be taken for each other (diffusers tells them apart by width,
    which a small model may share)."""
    prefix = TEXT_ENCODER_PREFIXES[info.arch][component]
    own = {_transformers_v4_name(k, prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise ConfigError(
            f"{info.path} has no {component} tensors ({prefix}*): is model_arch ({info.arch}) right? "
            "A base model file holds its text encoder(s); use a complete checkpoint or a diffusers folder."
        )
    try:
        model = create_diffusers_clip_model_from_ldm(
            _TEXT_ENCODER_CLASSES[component],
            own,
            subfolder=component,
            config=str(info.config_dir),
            torch_dtype=dtype,
            local_files_only=True,
        )
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise _misfit(info, component, exc) from None
    return _complete(model, info, component)


def _load_tokenizer(info: CheckpointInfo, component: str) -> CLIPTokenizer:
    """The folder's tokenizer; a shipped folder's settings (pad token, length) with the shared CLIP vocabulary."""
    folder = info.config_dir / component
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    settings = _read_json(folder / "tokenizer_config.json")
    settings = {k: v for k, v in settings.items() if k not in ("tokenizer_class", "added_tokens_decoder")}
    shared = base_configs_dir() / CLIP_TOKENIZER
    if not (shared / "vocab.json").is_file():
        raise ConfigError(
            f"{folder} has no vocab.json (nor the package's {shared}); reinstall loha-diffusion"
        )
    return CLIPTokenizer.from_pretrained(str(shared), local_files_only=True, **settings)


def _scheduler(info: CheckpointInfo, cls: type | None) -> SchedulerMixin:
    """The folder's scheduler config with the resolved prediction type, as `cls` (None: the folder's class)."""
    config = _read_json(info.config_dir / "scheduler" / "scheduler_config.json")
    if cls is None:
        cls = getattr(diffusers_schedulers, config.get("_class_name", ""), None) or DDPMScheduler
    return cls.from_config(config, prediction_type=info.prediction_type)


def _check_components(info: CheckpointInfo, components: Sequence[str]) -> list[str]:
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ConfigError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    absent = [c for c in components if c.endswith("_2") and info.arch != "sdxl"]
    if absent:
        raise ConfigError(f"{info.path} is an {info.arch} model: it has no {', '.join(absent)} (SDXL only)")
    return list(dict.fromkeys(components))


def _load(
    info: CheckpointInfo,
    components: Sequence[str],
    torch_dtype: torch.dtype | None,
    scheduler_cls: type | None,
    given_unet: nn.Module | None = None,
) -> tuple[CheckpointInfo, dict[str, Any]]:
    wanted = _check_components(info, components)
    resolve = info.prediction_type is None and ("unet" in wanted or "scheduler" in wanted)
    if resolve and given_unet is not None:
        # The caller's UNet is this file's: test it instead of loading another (SD2's 3.4 GB in float32).
        info = _with_prediction(info, "v_prediction" if detect_v_prediction(given_unet) else "epsilon")
        resolve = False
    weights = _Weights(info)
    out: dict[str, Any] = {}
    if resolve:
        unet = _load_model(UNet2DConditionModel, info, weights.of("unet"), "unet", torch.float32)
        resolved = _with_prediction(info, "v_prediction" if detect_v_prediction(unet) else "epsilon")
        if "unet" in wanted and resolved.config_dir == info.config_dir:
            out["unet"] = unet.to(torch_dtype) if torch_dtype is not None else unet
        info = resolved
        del unet
    for component in wanted:
        if component in out:
            continue
        if component in ("unet", "vae"):
            cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
            out[component] = _load_model(cls, info, weights.of(component), component, torch_dtype)
        elif component.startswith("text_encoder"):
            out[component] = _load_text_encoder(info, weights.of(component), component, torch_dtype)
        elif component.startswith("tokenizer"):
            out[component] = _load_tokenizer(info, component)
        else:
            out[component] = _scheduler(info, scheduler_cls)
    return info, {c: out[c] for c in wanted}


def resolve_prediction_type(info: CheckpointInfo) -> CheckpointInfo:
    """`info` with its prediction type decided: unchanged when known, else (SD2.x) by `detect_v_prediction` on
    the file's UNet (loaded in float32, then dropped); a shipped SD2 config folder follows the answer.

    Raises:
        ConfigError: the file's UNet cannot be loaded with `info.config_dir` (as `load_components`).
    """
    if info.prediction_type is not None:
        return info
    resolved, _ = _load(info, ["scheduler"], None, DDPMScheduler)
    return resolved


def load_components(
    info: CheckpointInfo, components: Sequence[str], *, torch_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Load parts of a single-file base model, fully offline.

    Args:
        info: from `inspect_checkpoint`.
        components: any of "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
            "scheduler" (the `_2` ones SDXL only).
        torch_dtype: dtype of the loaded weights; None keeps diffusers'/transformers' default (float32).

    Returns:
        `{component: object}` in the order asked: `UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel`,
        `CLIPTextModelWithProjection` (eval mode, CPU), `CLIPTokenizer`, and a `DDPMScheduler` (the training
        noise schedule) with the config folder's betas and the resolved prediction type. An SD2.x file whose
        prediction type is unknown is tested once (`detect_v_prediction`) when the UNet or scheduler is asked.

    Raises:
        ConfigError: an unknown component, or `_2` of a non-SDXL model; the file cannot be read; it lacks a
            component's tensors or they do not fit `info.config_dir` (the message names file, folder, fix).
    """
    return _load(info, components, torch_dtype, DDPMScheduler)[1]


def load_pipeline(
    info: CheckpointInfo, *, torch_dtype: torch.dtype | None = None, **components: Any
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A `StableDiffusionPipeline` (SD1.x/SD2.x) or `StableDiffusionXLPipeline` (SDXL) of a single file, offline;
    no safety checker, no watermarker. The scheduler is the config folder's class (PNDM, DDIM, Euler) with the
    resolved prediction type. Components passed in (e.g. `unet=` with adapters, `vae=`) are used as given; an
    SD2.x prediction type still unknown is then tested on the `unet=` given (else on the file's UNet).

    Raises:
        ConfigError: a passed component the pipeline does not take; as `load_components`.
    """
    names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    names += ["text_encoder_2", "tokenizer_2"] if info.arch == "sdxl" else []
    unknown = sorted(set(components) - set(names))
    if unknown:
        raise ConfigError(f"load_pipeline: {unknown} are not components of an {info.arch} pipeline ({names})")
    missing = [n for n in names if n not in components]
    info, parts = _load(info, missing, torch_dtype, None, components.get("unet"))
    parts.update(components)
    if info.arch == "sdxl":
        index = _read_json(info.config_dir / "model_index.json")
        zeros = index.get("force_zeros_for_empty_prompt", True)
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=zeros, add_watermarker=False)
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def stored_dtypes(info: CheckpointInfo) -> dict[str, torch.dtype | None]:
    """The dtype each component is stored in (`pipeline.stored_dtypes` for a single file): `{"unet", "vae",
    "text_encoder"[, "text_encoder_2"]: the most common floating dtype of its tensors}`, read from the
    safetensors header only; None for every component of a `.ckpt` (no header to read without loading).

    Raises:
        ConfigError: the safetensors header cannot be read.
    """
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, **TEXT_ENCODER_PREFIXES[info.arch]}
    if info.path.suffix.lower() != ".safetensors":
        return dict.fromkeys(prefixes)
    try:
        dtypes = stored_dtypes_of(info.path)
    except (SafetensorError, OSError) as exc:
        raise _not_a_checkpoint(info.path, f"safetensors: {exc}") from None
    return {
        component: most_common(d for k, d in dtypes.items() if k.startswith(prefix) and d is not None)
        for component, prefix in prefixes.items()
    }


# -- hashes ----------------------------------------------------------------------------------------------------


def checkpoint_hashes(path: str | os.PathLike) -> dict[str, str]:
    """The base model's hashes as kohya records them in a LoRA's metadata: `{"sd_model_hash": A1111's legacy
    hash (sha256 of the 0x10000 bytes at offset 0x100000, first 8 hex digits; A1111 `sd_models.model_hash`,
    kohya `train_util.model_hash`), "new_sd_model_hash": sha256 of the whole file (hex; A1111
    `hashes.calculate_sha256`, kohya `train_util.calculate_sha256`)}` - kohya's `ss_sd_model_hash` and
    `ss_new_sd_model_hash`. Cached per (path, size, mtime): a run hashes a multi-GB file once.

    Raises:
        ConfigError: the file does not exist or cannot be read.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _hashes:
            full = hashlib.sha256()
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
                    full.update(chunk)
                handle.seek(0x100000)
                legacy = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
            _hashes[key] = {"sd_model_hash": legacy, "new_sd_model_hash": full.hexdigest()}
    except OSError as exc:
        raise ConfigError(f"cannot hash the base model {path}: {exc.strerror or exc}") from None
    return dict(_hashes[key])
