"""Diffusers -> original single-file checkpoints (LDM layout for SD1/SD2, SGM layout for SDXL), for tests.

Ported from diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` and
`scripts/convert_diffusers_to_original_sdxl.py` (https://github.com/huggingface/diffusers, Apache-2.0,
Copyright The HuggingFace Team), with two changes so the tiny models convert too:
- the block and layer counts come from the model's config instead of being hard-coded (diffusers' scripts assume
  SD1.5's 4 UNet blocks / SDXL's 3 and the VAE's 4), and the upsampler's slot (`output_blocks.N.1` or `.2`)
  follows whether that up block has attentions (the SDXL script's special case, made general);
- SDXL's OpenCLIP `text_projection` is written as the original stores it (transposed, no `.weight`), as the
  SGM checkpoints and kohya's `sdxl_model_util` do; the diffusers script left it under the diffusers name.

The output is what real checkpoints look like: `model.diffusion_model.*`, `first_stage_model.*`, and
`cond_stage_model.transformer.text_model.*` (SD1, OpenAI CLIP in transformers 4 names),
`cond_stage_model.model.*` (SD2, OpenCLIP), `conditioner.embedders.0.transformer.text_model.*` +
`conditioner.embedders.1.model.*` (SDXL). Test fixtures write tiny single files with it (tests/conftest.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from loha_diffusion import tiny

# (LDM, diffusers) name pieces, as in diffusers' conversion scripts.
_UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    ("label_emb.0.0.", "add_embedding.linear_1."),  # SDXL
    ("label_emb.0.2.", "add_embedding.linear_2."),
]
_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
_VAE_ATTN = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]
_OPENCLIP = [
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
]

TEXT_ENCODER_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}


def unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) pairs of a UNet's blocks, for any block count and layers per block."""
    n = len(config["down_block_types"])
    layers = config["layers_per_block"]
    pairs = []
    for i, block in enumerate(config["down_block_types"]):
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in block:
                pairs.append(
                    (f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
                )
        if i < n - 1:
            pairs.append(
                (f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.")
            )
    for i, block in enumerate(config["up_block_types"]):
        attn = "CrossAttn" in block
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if attn:
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            slot = 2 if attn else 1
            pairs.append(
                (f"output_blocks.{(layers + 1) * i + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0.")
            )
    pairs += [
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    return pairs + _UNET_TOP


def convert_unet(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the original names (without `model.diffusion_model.`)."""
    pairs = unet_prefix_map(config)
    out = {}
    for key, value in state_dict.items():
        ldm, hf = next(((ldm, hf) for ldm, hf in pairs if key.startswith(hf)), (None, None))
        if ldm is None:
            raise KeyError(f"no original name for the diffusers UNet key {key!r}")
        rest = key[len(hf) :]
        if ".resnets." in hf:
            for ldm_part, hf_part in _UNET_RESNET:
                rest = rest.replace(hf_part, ldm_part)
        out[ldm + rest] = value
    return out


def convert_vae(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original names (without `first_stage_model.`): the decoder's
    up blocks count down, and the mid attention's linear weights become 1x1 convolutions."""
    n = len(config["up_block_types"])
    pairs = []
    for i in range(len(config["down_block_types"])):
        pairs += [(f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets.")]
        pairs += [(f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.")]
    for i in range(n):
        pairs += [(f"decoder.up.{n - 1 - i}.block.", f"decoder.up_blocks.{i}.resnets.")]
        pairs += [(f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.mid.block_{k + 1}.", f"{side}.mid_block.resnets.{k}.") for k in range(2)]
        pairs += [
            (f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0."),
            (f"{side}.norm_out.", f"{side}.conv_norm_out."),
        ]
    out = {}
    for key, value in state_dict.items():
        new = next((ldm + key[len(hf) :] for ldm, hf in pairs if key.startswith(hf)), key)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            head, leaf = new.split(".mid.attn_1.")
            for ldm, hf in _VAE_ATTN:
                if leaf.startswith(hf):
                    leaf = ldm + leaf[len(hf) :]
                    break
            new = f"{head}.mid.attn_1.{leaf}"
            if value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def _with_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 dropped `text_model.` from CLIPTextModel's names; the original files keep transformers 4's."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"] = value
    return out


def convert_openai_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD1, SDXL te1): the transformers names, with `text_model.` (transformers 4)."""
    return _with_text_model_prefix(state_dict)


def convert_openclip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD2, SDXL te2): q/k/v fused into `in_proj_*`, OpenCLIP names, `text_projection` transposed."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _with_text_model_prefix(state_dict).items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        for proj in ("q", "k", "v"):
            marker = f".self_attn.{proj}_proj."
            if marker in key:
                pre, kind = key.split(marker)
                qkv.setdefault(f"{pre}.self_attn.in_proj_{kind}", {})[proj] = value
                break
        else:
            out[_openclip_name(key)] = value
    for key, parts in qkv.items():
        out[_openclip_name(key)] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _openclip_name(key: str) -> str:
    for ldm, hf in _OPENCLIP:
        key = key.replace(hf, ldm)
    return key


def _read_component(folder: Path, component: str) -> tuple[dict[str, torch.Tensor], dict]:
    sub = folder / component
    files = sorted(sub.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{sub}: expected one .safetensors weights file, found {len(files)}")
    return load_file(str(files[0])), json.loads((sub / "config.json").read_text(encoding="utf-8"))


def detect_folder_arch(folder: str | Path) -> str:
    """ "sdxl" (two text encoders), "sd2" (UNet with linear projections, one encoder) or "sd1", from the configs."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if index.get("text_encoder_2", [None])[0]:
        return "sdxl"
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    return "sd2" if unet.get("use_linear_projection") else "sd1"


def modules_to_original(arch: str, **components: Any) -> dict[str, torch.Tensor]:
    """The single-file state dict of models given as `unet=`, `vae=`, `text_encoder=` [, `text_encoder_2=`]:
    modules (a `meta` model gives meta tensors: names and shapes of a full-size file without memory) or
    `(state_dict, config)` pairs."""
    parts = {}
    for name, value in components.items():
        if isinstance(value, tuple):
            parts[name] = value
        else:
            config = getattr(value, "config", None)  # diffusers: a dict; transformers: not needed here
            parts[name] = (value.state_dict(), dict(config) if isinstance(config, Mapping) else {})
    out = {f"model.diffusion_model.{k}": v for k, v in convert_unet(*parts["unet"]).items()}
    out.update({f"first_stage_model.{k}": v for k, v in convert_vae(*parts["vae"]).items()})
    for component, prefix in TEXT_ENCODER_PREFIXES[arch].items():
        weights = parts[component][0]
        converted = convert_openclip(weights) if prefix.endswith(".model.") else convert_openai_clip(weights)
        out.update({prefix + k: v for k, v in converted.items()})
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_original(folder: str | Path, arch: str | None = None) -> dict[str, torch.Tensor]:
    """The whole single-file state dict of a saved diffusers pipeline folder (UNet, VAE, text encoder(s)).

    Args:
        folder: a diffusers folder with `.safetensors` weights (e.g. `tiny.save_tiny_pipeline`'s).
        arch: "sd1" | "sd2" | "sdxl"; None = `detect_folder_arch(folder)`.
    """
    folder = Path(folder)
    arch = arch or detect_folder_arch(folder)
    names = ["unet", "vae", *TEXT_ENCODER_PREFIXES[arch]]
    return modules_to_original(arch, **{name: _read_component(folder, name) for name in names})


def write_single_file(
    folder: str | Path,
    path: str | Path,
    arch: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `folder`'s weights as one original-layout checkpoint: `.safetensors`, or `.ckpt` (a torch pickle of
    `{"state_dict": ...}`, as the CompVis/Stability releases are, loadable with `weights_only=True`)."""
    path = Path(path)
    tensors = diffusers_to_original(folder, arch)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors, "global_step": 0}, path)
    else:
        save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    return path


def tiny_sd2_unet_config() -> dict:
    """Tiny SD2-shaped UNet: SD1's block layout with linear projections and per-block head counts (SD2.x's
    `use_linear_projection` and `attention_head_dim` [5, 10, 20, 20], scaled down)."""
    config = dict(tiny.tiny_unet_config("sd1"))
    config.update(use_linear_projection=True, attention_head_dim=(2, 4, 8, 8))
    return config


def build_tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD2-shaped `StableDiffusionPipeline`: the tiny SD1 parts, except the UNet's linear projections and
    an OpenCLIP-style text encoder (gelu), and a DDIM scheduler as stabilityai/stable-diffusion-2-1's."""
    base = tiny.build_tiny_pipeline("sd1", seed=seed)
    text_config = base.text_encoder.config
    text_config.hidden_act = "gelu"
    torch.manual_seed(seed + 5)
    text_encoder = CLIPTextModel(text_config).eval()
    unet = tiny.build_unet_from_config(tiny_sd2_unet_config(), device="cpu", seed=seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd2_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Write `build_tiny_sd2_pipeline()` as a diffusers folder (safetensors weights)."""
    out_dir = Path(out_dir)
    build_tiny_sd2_pipeline(seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
