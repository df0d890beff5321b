"""Tiny SD1/SDXL-shaped models and pipelines with random weights, for tests and offline demos.

The tiny models keep the real module *topology* (block types and counts, layers per block, linear vs 1x1-conv
projections, SDXL's text-time embedding and two text encoders), so module names and Kohya key names are the same
as on the real models; only the widths are small. Nothing is downloaded: every model is built from a config.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .files import atomic_directory

Arch = Literal["sd1", "sdxl"]
ARCHS: tuple[str, ...] = ("sd1", "sdxl")

# Common prompt words, so that prompts used in tests and demos become a few whole-word tokens.
TINY_WORDS = (
    "a an the of in on at with and by photo picture painting portrait drawing sketch watercolor oil render "
    "cat dog bird horse person man woman child robot toy car house tree flower forest river mountain city "
    "sky sea beach night sunset red blue green yellow black white small big beautiful detailed high low "
    "quality blurry style sks ohwx"
).split()

# Widths of the tiny models. CLIP hidden 32 for every text encoder; SDXL's UNet cross-attends to the
# concatenation of both encoders' hidden states (as the real model: 768 + 1280 = 2048).
_CLIP_HIDDEN = 32
_TINY_TE_LAYERS = {("sd1", 1): 2, ("sdxl", 1): 2, ("sdxl", 2): 3}
_SDXL_TIME_EMBED_DIM = 8  # real: 256; SDXL packs 6 size/crop numbers, each embedded to this width


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}: use one of {', '.join(ARCHS)}.")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars]))


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the lowest-ranked adjacent pair (leftmost first)."""
    while len(pieces) > 1:
        candidates = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny CLIP BPE vocabulary (byte alphabet, its end-of-word forms, the words of a small list, the two
    special tokens, in CLIP's order) and merges under which every listed word is one token."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in TINY_WORDS:
        # Merges are appended with the highest rank so far, so they never change how earlier words encode:
        # those already end as a single token, where no pair is left to merge.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            if pieces[0] + pieces[1] not in tokens:
                tokens.append(pieces[0] + pieces[1])
            pieces = _apply_merges(pieces, ranks)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, list(ranks)


def write_tiny_tokenizer(directory: str | Path) -> Path:
    """Write a CLIP tokenizer (vocab.json, merges.txt and the saved tokenizer files) as the folder
    `directory`, atomically (`files.atomic_directory`: an existing folder is replaced whole).

    Raises:
        OutputWriteError: no space left, or no permission to write the folder.
        OSError: any other error of the filesystem.
    """
    directory = Path(directory)
    vocab, merges = tiny_vocab_and_merges()
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    with atomic_directory(directory) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        # Round-trip through CLIPTokenizer so the folder also has tokenizer_config.json (model_max_length).
        CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(tmp)
    return directory


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer built in memory from the tiny vocabulary (model_max_length 77, like SD)."""
    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Fork the global RNG so building a model with a seed leaves the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_text_config(arch: str, index: int) -> CLIPTextConfig:
    vocab, _ = tiny_vocab_and_merges()
    eos = vocab["<|endoftext|>"]
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=_TINY_TE_LAYERS[(arch, index)],
        num_attention_heads=4,
        max_position_embeddings=77,
        # CLIP ViT-L (SD1, SDXL te1) uses quick_gelu, OpenCLIP bigG (SDXL te2) gelu.
        hidden_act="quick_gelu" if index == 1 else "gelu",
        projection_dim=_CLIP_HIDDEN,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=eos,
        pad_token_id=eos,
    )


def build_tiny_text_encoder(
    arch: Arch = "sd1", index: int = 1, seed: int = 0
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A tiny CLIP text encoder: `CLIPTextModel` for SD1 and SDXL te1, `CLIPTextModelWithProjection` for SDXL te2.

    Raises:
        ValueError: an unknown arch, or an encoder index the arch does not have.
    """
    _check_arch(arch)
    if (arch, index) not in _TINY_TE_LAYERS:
        raise ValueError(f"arch {arch!r} has no text encoder {index}: SD1 has 1, SDXL has 1 and 2.")
    config = _tiny_text_config(arch, index)
    cls = CLIPTextModelWithProjection if index == 2 else CLIPTextModel
    with _seeded(seed):
        model = cls(config)
    return model.eval()


def tiny_unet_config(arch: Arch = "sd1") -> dict[str, Any]:
    """Config of the tiny UNet: the real block layout of SD1.5 / SDXL with small widths (32x32 latents)."""
    _check_arch(arch)
    if arch == "sd1":
        return {
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "block_out_channels": (16, 32, 64, 64),  # same x1, x2, x4, x4 pattern as (320, 640, 1280, 1280)
            "layers_per_block": 2,
            "norm_num_groups": 8,
            "attention_head_dim": 4,  # diffusers' legacy name for the head count
            "cross_attention_dim": _CLIP_HIDDEN,
            "use_linear_projection": False,
        }
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (16, 32, 64),  # same x1, x2, x4 pattern as (320, 640, 1280)
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 2),  # real SDXL: (1, 2, 10)
        "norm_num_groups": 8,
        "attention_head_dim": (2, 4, 8),  # head counts; head width 8 everywhere, as SDXL keeps 64
        "cross_attention_dim": 2 * _CLIP_HIDDEN,  # te1 hidden + te2 hidden
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
        # te2 pooled projection + 6 time ids (original size, crop, target size), as the SDXL pipeline builds it.
        "projection_class_embeddings_input_dim": _CLIP_HIDDEN + 6 * _SDXL_TIME_EMBED_DIM,
    }


def full_size_unet_config(arch: Arch = "sd1") -> dict[str, Any]:
    """The UNet config of the real SD1.5 / SDXL-base-1.0 checkpoints (their unet/config.json, non-default keys)."""
    _check_arch(arch)
    if arch == "sd1":
        return {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "attention_head_dim": 8,
            "cross_attention_dim": 768,
            "use_linear_projection": False,
        }
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "norm_num_groups": 32,
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }


def full_size_text_encoder_config(arch: Arch = "sd1", index: int = 1) -> CLIPTextConfig:
    """The text-encoder config of the real models: CLIP ViT-L/14 (SD1, SDXL te1) or OpenCLIP ViT-bigG (SDXL te2).

    Raises:
        ValueError: an unknown arch, or an encoder index the arch does not have.
    """
    _check_arch(arch)
    if (arch, index) not in _TINY_TE_LAYERS:
        raise ValueError(f"arch {arch!r} has no text encoder {index}: SD1 has 1, SDXL has 1 and 2.")
    if index == 1:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=49406,
            eos_token_id=49407,
        )
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1280,
        bos_token_id=49406,
        eos_token_id=49407,
    )


def build_unet_from_config(
    config: dict[str, Any], *, device: str | torch.device = "meta", seed: int = 0
) -> UNet2DConditionModel:
    """Build a UNet from a config with random weights; on the `meta` device (the default) it costs no memory,
    which is enough for module names, shapes and counts of the full-size models."""
    with _seeded(seed):
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    return unet.eval()


def build_full_size_text_encoder(
    arch: Arch = "sd1", index: int = 1, *, device: str | torch.device = "meta"
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A real-size text encoder with random weights (on `meta` by default), for name and count checks."""
    config = full_size_text_encoder_config(arch, index)
    cls = CLIPTextModelWithProjection if index == 2 else CLIPTextModel
    with torch.device(device):
        model = cls(config)
    return model.eval()


def build_tiny_unet(arch: Arch = "sd1", seed: int = 0) -> UNet2DConditionModel:
    """A tiny UNet with the SD1.5 or SDXL block layout and random weights (fast on CPU at 32x32 latents)."""
    return build_unet_from_config(tiny_unet_config(arch), device="cpu", seed=seed)


def build_tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny AutoencoderKL with 4 latent channels and a downscale factor of 2 (64 px images <-> 32x32 latents)."""
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=64,
        )
    return vae.eval()


def build_tiny_pipeline(
    arch: Arch = "sd1", seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A complete tiny `StableDiffusionPipeline` (sd1) or `StableDiffusionXLPipeline` (sdxl), no safety checker."""
    _check_arch(arch)
    # Different seeds per component, so e.g. te1 and te2 do not share weights by accident.
    unet = build_tiny_unet(arch, seed=seed)
    vae = build_tiny_vae(seed=seed + 1)
    if arch == "sd1":
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=build_tiny_text_encoder("sd1", 1, seed=seed + 2),
            tokenizer=build_tiny_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=build_tiny_text_encoder("sdxl", 1, seed=seed + 2),
        text_encoder_2=build_tiny_text_encoder("sdxl", 2, seed=seed + 3),
        tokenizer=build_tiny_tokenizer(),
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def save_tiny_pipeline(out_dir: str | Path, arch: Arch = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline as a normal diffusers folder (loadable offline with `from_pretrained(out_dir)`).

    The folder is written atomically (`files.atomic_directory`): it appears complete or not at all, so a
    killed `make-tiny` leaves no half model that a training run would then fail on; an existing `out_dir` is
    replaced whole.

    Raises:
        ValueError: `arch` is not "sd1" or "sdxl".
        OutputWriteError: no space left, or no permission to write the folder.
        OSError: any other error of the filesystem.
    """
    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(arch, seed=seed)
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # save_pretrained writes tokenizer.json; also keep the plain BPE files a person can read.
        for name in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
            write_tiny_tokenizer(tmp / name)
    return out_dir
