"""Write the base-model configs this package ships (`loha_diffusion/base_configs/`), for single-file bases.

    python scripts/make_base_configs.py [--clip-bpe path/to/bpe_simple_vocab_16e6.txt.gz]

Each `base_configs/<name>/` is a diffusers folder without weights: model_index.json, unet/vae/text_encoder
[/text_encoder_2] config.json, scheduler/scheduler_config.json and tokenizer[/tokenizer_2] settings. The UNet and
the SD1/SDXL text-encoder configs are `loha_diffusion.tiny`'s full-size ones (a test checks the shipped JSON
against them); the SD2 UNet/text encoder, the VAEs, schedulers and tokenizer settings are the values of the model
repos (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1[-base], stabilityai/stable-diffusion-xl-
base-1.0) with defaults left out.

The CLIP BPE vocabulary (one copy, `base_configs/clip_tokenizer/vocab.json` + `merges.txt`) is built with
`--clip-bpe` from OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT; shipped in the `open_clip_torch` wheel:
`pip download --no-deps open_clip_torch`) by CLIP's `SimpleTokenizer` rule: the 256 byte characters, the same
with `</w>`, the first 48894 merges joined, `<|startoftext|>`, `<|endoftext|>` (49408 tokens, the ids of
openai/clip-vit-large-patch14). Without `--clip-bpe` the tokenizer files already there are kept.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

from loha_diffusion.files import atomic_write_text
from loha_diffusion.tiny import _bytes_to_unicode, full_size_text_encoder_config, full_size_unet_config

OUT = Path(__file__).resolve().parent.parent / "loha_diffusion" / "base_configs"
CLIP_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer keeps this many merges of the BPE file

BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
SCHEDULERS = {
    # runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1-base
    "pndm": {
        "_class_name": "PNDMScheduler",
        **BETAS,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    },
    # stabilityai/stable-diffusion-2-1 (768-v)
    "ddim-v": {
        "_class_name": "DDIMScheduler",
        **BETAS,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "v_prediction",
    },
    # stabilityai/stable-diffusion-xl-base-1.0
    "euler": {
        "_class_name": "EulerDiscreteScheduler",
        **BETAS,
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    },
}


def vae_config(sample_size: int, *, sdxl: bool = False) -> dict[str, Any]:
    """The SD VAE (f=8, 4 latent channels): scaling 0.18215 (SD1/SD2) or 0.13025 with fp32 upcast (SDXL)."""
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": 0.13025 if sdxl else 0.18215,
    }
    if sdxl:
        config["force_upcast"] = True  # the SDXL VAE overflows in fp16
    return config


def unet_config(name: str) -> dict[str, Any]:
    """The UNet config: tiny.py's full-size SD1.5 / SDXL ones; SD2.1 is SD1.5's layout with OpenCLIP-H context
    (1024), linear projections, 64-wide heads and (768-v only) attention upcast."""
    if name in ("sd15", "sdxl-base"):
        config = full_size_unet_config("sd1" if name == "sd15" else "sdxl")
    else:
        config = full_size_unet_config("sd1")
        config.update(
            attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=name == "sd2-v",
            sample_size=96 if name == "sd2-v" else 64,
        )
    return {"_class_name": "UNet2DConditionModel", **_jsonable(config)}


def text_encoder_config(name: str, index: int) -> dict[str, Any]:
    """The CLIP text-encoder config: ViT-L/14 (SD1.5, SDXL te1), OpenCLIP ViT-bigG (SDXL te2) from tiny.py;
    SD2.1's OpenCLIP ViT-H/14 with its last layer dropped (23 layers: SD2 conditions on the penultimate)."""
    if name == "sd15" or (name == "sdxl-base"):
        config = full_size_text_encoder_config("sd1" if name == "sd15" else "sdxl", index)
        config.architectures = ["CLIPTextModel" if index == 1 else "CLIPTextModelWithProjection"]
    else:
        config = full_size_text_encoder_config("sd1", 1)
        config.update(
            {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 23,
                "num_attention_heads": 16,
                "hidden_act": "gelu",
                "projection_dim": 512,
            }
        )
        config.architectures = ["CLIPTextModel"]
    out = config.to_diff_dict()
    out.pop("transformers_version", None)
    return out


def tokenizer_settings(pad: str) -> tuple[dict[str, Any], dict[str, str]]:
    """tokenizer_config.json and special_tokens_map.json of an SD CLIP tokenizer: pad `<|endoftext|>` (SD1.5,
    SDXL tokenizer) or `!` (SD2, SDXL tokenizer_2, as the OpenCLIP tokenizer pads with id 0)."""
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad,
        "unk_token": "<|endoftext|>",
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    return config, special


MODELS: dict[str, dict[str, Any]] = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "scheduler": "pndm",
        "size": 512,
        "pads": ["<|endoftext|>"],
    },
    "sd2-base": {"pipeline": "StableDiffusionPipeline", "scheduler": "pndm", "size": 512, "pads": ["!"]},
    "sd2-v": {"pipeline": "StableDiffusionPipeline", "scheduler": "ddim-v", "size": 768, "pads": ["!"]},
    "sdxl-base": {
        "pipeline": "StableDiffusionXLPipeline",
        "scheduler": "euler",
        "size": 1024,
        "pads": ["<|endoftext|>", "!"],
    },
}


def model_files(name: str) -> dict[str, Any]:
    """`{relative path: JSON value}` of one shipped config folder."""
    spec = MODELS[name]
    sdxl = name == "sdxl-base"
    scheduler = SCHEDULERS[spec["scheduler"]]
    index: dict[str, Any] = {
        "_class_name": spec["pipeline"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=True,
        )
    else:
        # No safety checker is shipped (its weights are not in the single files people train on).
        index.update(
            safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False
        )
    files = {
        "model_index.json": index,
        "unet/config.json": unet_config(name),
        "vae/config.json": vae_config(spec["size"], sdxl=sdxl),
        "scheduler/scheduler_config.json": scheduler,
    }
    for i, pad in enumerate(spec["pads"], start=1):
        suffix = "" if i == 1 else f"_{i}"
        files[f"text_encoder{suffix}/config.json"] = text_encoder_config(name, i)
        config, special = tokenizer_settings(pad)
        files[f"tokenizer{suffix}/tokenizer_config.json"] = config
        files[f"tokenizer{suffix}/special_tokens_map.json"] = special
    return files


def clip_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's SimpleTokenizer vocabulary (49408 tokens) and merge lines from `bpe_simple_vocab_16e6.txt.gz`."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_MERGES + 1]  # line 0 is the "#version" header
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-bpe", type=Path, help="OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz")
    args = parser.parse_args()
    for name in MODELS:
        for rel, value in model_files(name).items():
            atomic_write_text(OUT / name / rel, dump(value))
    if args.clip_bpe:
        vocab, merges = clip_vocab_and_merges(args.clip_bpe)
        assert len(vocab) == 49408, len(vocab)
        atomic_write_text(OUT / "clip_tokenizer" / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
        atomic_write_text(OUT / "clip_tokenizer" / "merges.txt", "\n".join(["#version: 0.2", *merges]) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
