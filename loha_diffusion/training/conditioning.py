"""What the UNet is conditioned on: the captions' text-encoder states and, for SDXL, the pooled text embedding
and the micro-conditioning time ids (original size, crop top-left, target size).

SD1.x/SD2.x: the last hidden state of the one CLIP text encoder, as diffusers' `train_text_to_image_lora.py`.
SDXL: as diffusers' `train_text_to_image_lora_sdxl.py` (`encode_prompt`, `compute_time_ids`) and the SDXL
pipeline: both encoders' penultimate hidden states concatenated (768 + 1280 = 2048 features), the second
encoder's pooled projection as `text_embeds`, and per sample `[orig_h, orig_w, crop_top, crop_left, target_h,
target_w]` as `time_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .models import Models


def tokenize(tokenizer: Any, captions: list[str], device: torch.device | str) -> torch.Tensor:
    """`captions` as padded, truncated token ids: int64 `(B, tokenizer.model_max_length)` (77 for CLIP) on
    `device`."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode_prompts(
    tokenizers: Sequence[Any],
    text_encoders: Sequence[Any],
    captions: list[str],
    *,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text conditioning of `captions` (B strings) through one or two text encoders (gradients flow when
    the caller enables them: trained text-encoder adapters).

    Returns:
        One encoder (SD1.x/SD2.x): `(last hidden state (B, 77, D), None)`. Two (SDXL): `(both penultimate
        hidden states concatenated (B, 77, 768 + 1280), the second encoder's pooled projection (B, 1280))`,
        in the encoders' dtype, on their device.

    Raises:
        ValueError: not one or two encoders, or not one tokenizer per encoder.
    """
    if len(text_encoders) not in (1, 2) or len(tokenizers) != len(text_encoders):
        raise ValueError(
            f"encode_prompts takes one or two text encoders with one tokenizer each, got {len(text_encoders)} "
            f"encoders and {len(tokenizers)} tokenizers"
        )
    if len(text_encoders) == 1:
        ids = tokenize(tokenizers[0], captions, device)
        return text_encoders[0](ids, return_dict=False)[0], None
    states, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        output = text_encoder(
            tokenize(tokenizer, captions, device), output_hidden_states=True, return_dict=False
        )
        # CLIPTextModelWithProjection (the second) returns (text_embeds, last_hidden_state, hidden_states).
        pooled = output[0]
        states.append(output[-1][-2])
    return torch.cat(states, dim=-1), pooled


def _pairs(
    values: torch.Tensor | Sequence[Sequence[int]] | None, batch: int, default: tuple[int, int]
) -> torch.Tensor:
    if values is None:
        return torch.tensor([default] * batch, dtype=torch.float32)
    return torch.as_tensor(values).reshape(-1, 2).to(torch.float32)


def sdxl_time_ids(
    original_sizes: torch.Tensor | Sequence[Sequence[int]],
    crops_top_left: torch.Tensor | Sequence[Sequence[int]],
    target_size: tuple[int, int],
) -> torch.Tensor:
    """SDXL's micro-conditioning: per sample `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]` in
    pixels (the SDXL pipeline's `_get_add_time_ids` order), float32 `(B, 6)` on the CPU.

    Args:
        original_sizes: `(B, 2)` (height, width) of each image before resizing.
        crops_top_left: `(B, 2)` (top, left) of each crop in the resized image.
        target_size: (height, width) of the training images.

    Raises:
        ValueError: `original_sizes` and `crops_top_left` hold different numbers of samples.
    """
    sizes = _pairs(original_sizes, 0, (0, 0))
    crops = _pairs(crops_top_left, 0, (0, 0))
    if len(sizes) != len(crops):
        raise ValueError(f"{len(sizes)} original sizes but {len(crops)} crop offsets")
    target = torch.tensor([list(target_size)], dtype=torch.float32).expand(len(sizes), 2)
    return torch.cat([sizes, crops, target], dim=1)


def unet_conditioning(
    models: Models,
    captions: list[str],
    *,
    device: torch.device | str,
    original_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    crops_top_left: torch.Tensor | Sequence[Sequence[int]] | None = None,
    target_size: tuple[int, int] | None = None,
    text_encoders: Sequence[Any] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """What the UNet of `models` (a `models.Models`) takes besides the noisy latents and timesteps, for B
    `captions`: `(encoder_hidden_states, added_cond_kwargs)`.

    `added_cond_kwargs` is None for SD1.x/SD2.x; for SDXL `{"text_embeds": (B, 1280), "time_ids": (B, 6)}`
    (`sdxl_time_ids`, float32, on `device`): the sizes default to `target_size` (an uncropped image of the
    training size, as the SDXL pipeline conditions by default) and the crops to (0, 0). `text_encoders`
    overrides `models.text_encoders` (the loop passes the ones `accelerator.prepare` returned).

    Raises:
        ValueError: an SDXL model without `target_size`; the text encoders are not one per tokenizer.
    """
    encoders = list(models.text_encoders if text_encoders is None else text_encoders)
    states, pooled = encode_prompts(models.tokenizers, encoders, captions, device=device)
    if pooled is None:
        return states, None
    if target_size is None:
        raise ValueError("SDXL conditioning needs target_size, the (height, width) of the training images")
    batch = len(captions)
    sizes = _pairs(original_sizes, batch, tuple(target_size))
    crops = _pairs(crops_top_left, batch, (0, 0))
    time_ids = sdxl_time_ids(sizes, crops, target_size).to(device)
    return states, {"text_embeds": pooled, "time_ids": time_ids}
