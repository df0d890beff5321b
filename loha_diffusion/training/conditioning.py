"""What the UNet is conditioned on: the captions' text-encoder states and, for SDXL, the pooled text embedding
and the micro-conditioning time ids (original size, crop top-left, target size).

SD1.x/SD2.x: the last hidden state of the one CLIP text encoder, as diffusers' `train_text_to_image_lora.py`.
SDXL: as diffusers' `train_text_to_image_lora_sdxl.py` (`encode_prompt`, `compute_time_ids`) and the SDXL
pipeline: both encoders' penultimate hidden states concatenated (768 + 1280 = 2048 features), the second
encoder's pooled projection as `text_embeds`, and per sample `[orig_h, orig_w, crop_top, crop_left, target_h,
target_w]` as `time_ids`.

Long prompts and clip skip (`TextEncoding`) follow kohya sd-scripts (`library/strategy_base.py`
`TokenizeStrategy._get_input_ids`, `strategy_sd.py` `SdTextEncodingStrategy.encode_tokens`, `strategy_sdxl.py`
`_get_hidden_states_sdxl`):

* `max_token_length` 150 or 225: a caption is tokenized to `max_token_length + 2` ids (BOS, up to 150/225
  tokens, EOS, padding) and cut into 2 or 3 windows of 75 tokens, each wrapped as `BOS, 75 ids, last id` (the
  last id of the whole sequence: EOS, or padding). For tokenizers whose padding token is not EOS (SD2's, SDXL's
  second) a window whose 75th id is a word gets EOS as its last id, and a window that starts with padding
  starts with EOS instead (`BOS EOS PAD ...`). Every window goes through the text encoder (batch B x windows),
  and the states are joined as kohya does: the first window's BOS state, each window's 75 inner states, the
  last window's last state: `(B, windows * 75 + 2, D)`, 152 or 227 positions. (kohya's SD2 decoder has a
  "copy the next PAD state over an empty window's EOS" branch that compares ids with the token's *string*, so
  it never runs; its SDXL decoder has it commented out. Neither is copied: the join is the same for all.)
  SDXL's pooled embedding is the first window's (`pool2[::n_size]` in kohya), whose last id is an EOS.
  75 (or unset) is CLIP's one window of 77, exactly the encoding without chunks.
* `clip_skip` N (SD1.x/SD2.x): the hidden state N layers from the end (`hidden_states[-N]`) through the text
  model's final layer norm (kohya's `encode_tokens`; A1111's "Clip skip" setting). N = 1 is the last hidden
  state, as without it. SDXL is refused (`check_text_encoding`): its UNet was trained on the penultimate states
  of both encoders and kohya's SDXL scripts ignore the setting with a warning ("clip_skip will be unexpected");
  a refusal says so before a run that would silently ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig
    from .models import Models


@dataclass(frozen=True)
class TextEncoding:
    """How captions become text-encoder states: `max_token_length` (None or 75: one window of 77 ids; 150 or
    225: kohya's chunks of 75) and `clip_skip` (None or 1: the last hidden state; N: `hidden_states[-N]` with
    the final layer norm, SD1.x/SD2.x only). The default is the encoding without either setting."""

    max_token_length: int | None = None
    clip_skip: int | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TextEncoding:
        """The encoding a `TrainConfig` asks for (`max_token_length`, `clip_skip`)."""
        return cls(max_token_length=cfg.max_token_length, clip_skip=cfg.clip_skip)

    def windows(self, tokenizer: Any) -> int:
        """How many windows of `tokenizer.model_max_length - 2` (75) tokens a caption is cut into: 1 without
        `max_token_length` or when it fits one window, else `max_token_length // 75`."""
        inner = tokenizer.model_max_length - 2
        if self.max_token_length is None or self.max_token_length <= inner:
            return 1
        return -(-self.max_token_length // inner)

    @property
    def skips_layers(self) -> bool:
        """Whether `clip_skip` picks an earlier hidden state than the last (N >= 2)."""
        return self.clip_skip is not None and self.clip_skip > 1

    def key(self) -> dict[str, int | None]:
        """The settings that change the encoded states, normalised (75 and None alike, clip_skip 1 and None
        alike): part of the text-encoder cache's key."""
        length = self.max_token_length if self.max_token_length not in (None, 75) else None
        return {"max_token_length": length, "clip_skip": self.clip_skip if self.skips_layers else None}


def check_text_encoding(cfg: TrainConfig, arch: str) -> TextEncoding:
    """The run's `TextEncoding` for a base model of architecture `arch` (`models.ARCHS`), checked before any
    weights are loaded.

    Raises:
        ConfigError: `clip_skip` with an SDXL base model (kohya's SDXL scripts ignore it: SDXL already uses the
            penultimate states of both encoders).
    """
    if arch == "sdxl" and cfg.clip_skip is not None:
        raise ConfigError(
            f"clip_skip = {cfg.clip_skip} cannot be used with an SDXL base model: SDXL is conditioned on the "
            "penultimate hidden states of both text encoders already, and kohya's SDXL scripts ignore "
            "clip_skip ('clip_skip will be unexpected'); remove clip_skip (it is for SD1.x/SD2.x)"
        )
    return TextEncoding.from_config(cfg)


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


def chunked_token_ids(tokenizer: Any, captions: list[str], encoding: TextEncoding) -> torch.Tensor:
    """kohya's token windows of `captions`: int64 `(B, windows, tokenizer.model_max_length)` on the CPU (see
    the module docstring; `windows` is `encoding.windows(tokenizer)`, 1 gives `tokenize`'s ids).

    Each window is `BOS, ids[1 + 75k : 76 + 75k], ids[-1]` of the caption tokenized (truncated, padded) to
    `windows * 75 + 2` ids. With a padding token other than EOS, a window ending in a word gets EOS as its last
    id and one starting with padding gets EOS first (kohya's `_get_input_ids`, "v2 or SDXL")."""
    width = tokenizer.model_max_length
    windows = encoding.windows(tokenizer)
    if windows == 1:
        return tokenize(tokenizer, captions, "cpu")[:, None]
    inner = width - 2
    ids = tokenizer(
        captions, padding="max_length", max_length=windows * inner + 2, truncation=True, return_tensors="pt"
    ).input_ids
    out = torch.stack(
        [
            torch.cat([ids[:, :1], ids[:, 1 + k * inner : 1 + (k + 1) * inner], ids[:, -1:]], 1)
            for k in range(windows)
        ],
        dim=1,
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad != eos:
        before_last = out[..., -2]
        ends_in_word = (before_last != eos) & (before_last != pad)
        out[..., -1] = torch.where(ends_in_word, torch.full_like(before_last, eos), out[..., -1])
        out[..., 1] = torch.where(out[..., 1] == pad, torch.full_like(before_last, eos), out[..., 1])
    return out


def join_windows(states: torch.Tensor, windows: int) -> torch.Tensor:
    """The states of B captions' windows `(B * windows, W, D)` (window-major per caption, W =
    model_max_length) joined as kohya does: `(B, windows * (W - 2) + 2, D)`, the first window's first state,
    each window's W - 2 inner states, the last window's last state. One window is returned as it is.

    Raises:
        ValueError: the number of rows is not a multiple of `windows`.
    """
    if windows == 1:
        return states
    if states.shape[0] % windows:
        raise ValueError(f"{states.shape[0]} encoded windows are not a multiple of {windows} per caption")
    width = states.shape[1]
    flat = states.reshape(states.shape[0] // windows, windows * width, states.shape[-1])
    parts = [flat[:, :1]]
    parts += [flat[:, k * width + 1 : (k + 1) * width - 1] for k in range(windows)]
    parts.append(flat[:, -1:])
    return torch.cat(parts, dim=1)


def _final_layer_norm(text_encoder: Any) -> Any:
    """The final layer norm of a CLIP text encoder, also when DDP-wrapped (`.module`) or compiled
    (`._orig_mod`): `CLIPTextModel.final_layer_norm` in transformers 5, `.text_model.final_layer_norm` before
    it (and in `CLIPTextModelWithProjection`)."""
    module = text_encoder
    for wrapper in ("module", "_orig_mod"):
        module = getattr(module, wrapper, module)
    if hasattr(module, "final_layer_norm"):
        return module.final_layer_norm
    return module.text_model.final_layer_norm


def _skipped_states(text_encoder: Any, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """`final_layer_norm(hidden_states[-clip_skip])` of one CLIP text encoder (kohya's `encode_tokens`).

    Raises:
        ConfigError: `clip_skip` is more than the encoder's layers + 1 (its hidden states).
    """
    hidden = text_encoder(ids, output_hidden_states=True, return_dict=True).hidden_states
    if clip_skip > len(hidden):
        raise ConfigError(
            f"clip_skip = {clip_skip} but the text encoder has only {len(hidden) - 1} layers; use at most "
            f"{len(hidden) - 1} (2 is the usual value)"
        )
    return _final_layer_norm(text_encoder)(hidden[-clip_skip])


def encode_prompts(
    tokenizers: Sequence[Any],
    text_encoders: Sequence[Any],
    captions: list[str],
    *,
    device: torch.device | str,
    encoding: TextEncoding = TextEncoding(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text conditioning of `captions` (B strings) through one or two text encoders (gradients flow when
    the caller enables them: trained text-encoder adapters), encoded as `encoding` says (long prompts, clip
    skip: see the module docstring; the default is the encoding without them).

    Returns:
        One encoder (SD1.x/SD2.x): `(last hidden state (B, L, D), None)`, or with `clip_skip` N the final
        layer norm of the hidden state N layers from the end. Two (SDXL): `(both penultimate hidden states
        concatenated (B, L, 768 + 1280), the second encoder's pooled projection (B, 1280))`. L is 77, or 152
        / 227 with `max_token_length` 150 / 225. In the encoders' dtype, on their device.

    Raises:
        ValueError: not one or two encoders, or not one tokenizer per encoder.
        ConfigError: `clip_skip` with two encoders (SDXL), or more than the encoder has layers.
    """
    if len(text_encoders) not in (1, 2) or len(tokenizers) != len(text_encoders):
        raise ValueError(
            f"encode_prompts takes one or two text encoders with one tokenizer each, got {len(text_encoders)} "
            f"encoders and {len(tokenizers)} tokenizers"
        )
    if len(text_encoders) == 1:
        tokenizer, text_encoder = tokenizers[0], text_encoders[0]
        windows = encoding.windows(tokenizer)
        ids = (
            chunked_token_ids(tokenizer, captions, encoding)
            .reshape(-1, tokenizer.model_max_length)
            .to(device)
        )
        if encoding.skips_layers:
            states = _skipped_states(text_encoder, ids, encoding.clip_skip)
        else:
            states = text_encoder(ids, return_dict=False)[0]
        return join_windows(states, windows), None
    if encoding.skips_layers:
        raise ConfigError(
            f"clip_skip = {encoding.clip_skip} cannot be used with SDXL's two text encoders; remove clip_skip"
        )
    states, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        windows = encoding.windows(tokenizer)
        ids = chunked_token_ids(tokenizer, captions, encoding).reshape(-1, tokenizer.model_max_length)
        output = text_encoder(ids.to(device), output_hidden_states=True, return_dict=False)
        # CLIPTextModelWithProjection (the second) returns (text_embeds, last_hidden_state, hidden_states); its
        # pooled embedding is taken from each caption's first window (kohya: pool2[::n_size]).
        pooled = output[0][::windows]
        states.append(join_windows(output[-1][-2], windows))
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
    encoding: TextEncoding = TextEncoding(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """What the UNet of `models` (a `models.Models`) takes besides the noisy latents and timesteps, for B
    `captions`: `(encoder_hidden_states, added_cond_kwargs)`, the captions encoded as `encoding` says
    (`encode_prompts`).

    `added_cond_kwargs` is None for SD1.x/SD2.x; for SDXL `{"text_embeds": (B, 1280), "time_ids": (B, 6)}`
    (`sdxl_time_ids`, float32, on `device`): the sizes default to `target_size` (an uncropped image of the
    training size, as the SDXL pipeline conditions by default) and the crops to (0, 0). `text_encoders`
    overrides `models.text_encoders` (the loop passes the ones `accelerator.prepare` returned).

    Raises:
        ValueError: an SDXL model without `target_size`; the text encoders are not one per tokenizer.
        ConfigError: `encoding.clip_skip` with SDXL, or more than the text encoder has layers.
    """
    encoders = list(models.text_encoders if text_encoders is None else text_encoders)
    states, pooled = encode_prompts(models.tokenizers, encoders, captions, device=device, encoding=encoding)
    return conditioning_from_states(
        states,
        pooled,
        device=device,
        original_sizes=original_sizes,
        crops_top_left=crops_top_left,
        target_size=target_size,
    )


def conditioning_from_states(
    states: torch.Tensor,
    pooled: torch.Tensor | None,
    *,
    device: torch.device | str,
    original_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    crops_top_left: torch.Tensor | Sequence[Sequence[int]] | None = None,
    target_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """`unet_conditioning` from states already encoded (`encode_prompts`' `(states (B, L, D), pooled (B, 1280)
    or None)`, e.g. from the text-encoder cache): `(states, None)` for SD1.x/SD2.x, `(states, {"text_embeds":
    pooled, "time_ids": (B, 6) float32 on device})` for SDXL (sizes and crops as `unet_conditioning`).

    Raises:
        ValueError: `pooled` (SDXL) without `target_size`.
    """
    if pooled is None:
        return states, None
    if target_size is None:
        raise ValueError("SDXL conditioning needs target_size, the (height, width) of the training images")
    batch = len(states)
    sizes = _pairs(original_sizes, batch, tuple(target_size))
    crops = _pairs(crops_top_left, batch, (0, 0))
    time_ids = sdxl_time_ids(sizes, crops, target_size).to(device)
    return states, {"text_embeds": pooled, "time_ids": time_ids}


def pipeline_prompt_embeds(
    models: Models,
    prompts: list[str],
    negative_prompts: list[str],
    *,
    device: torch.device | str,
    encoding: TextEncoding = TextEncoding(),
    force_zeros_for_empty_prompt: bool = False,
) -> dict[str, torch.Tensor]:
    """The keyword arguments that give a diffusers SD/SDXL pipeline call the training's text conditioning of B
    `prompts` and their B `negative_prompts` (encoded as `encoding` says, with `models`' text encoders, no
    gradients): `prompt_embeds` and `negative_prompt_embeds` (B, L, D), and for SDXL `pooled_prompt_embeds`
    and `negative_pooled_prompt_embeds` (B, 1280), in the encoders' dtype on `device`.

    Positive and negative have the same length L (77, or 152/227 with `max_token_length`): both are cut into
    the same number of windows, as A1111 pads the shorter of the two to the longer's windows. With the default
    encoding the tensors equal what the pipeline's own `encode_prompt` computes from the strings; with
    `force_zeros_for_empty_prompt` (the SDXL base pipeline's config flag) an empty negative prompt is zeros,
    as that pipeline does when it is given no negative prompt (pass the flag only where the pipeline would get
    None for "").

    Raises:
        ValueError: not one negative prompt per prompt.
        ConfigError: `encoding.clip_skip` with SDXL, or more than the text encoder has layers.
    """
    if len(negative_prompts) != len(prompts):
        raise ValueError(
            f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts; give one each"
        )
    with torch.no_grad():
        states, pooled = encode_prompts(
            models.tokenizers, models.text_encoders, list(prompts), device=device, encoding=encoding
        )
        negative, negative_pooled = encode_prompts(
            models.tokenizers, models.text_encoders, list(negative_prompts), device=device, encoding=encoding
        )
    if force_zeros_for_empty_prompt:
        empty = torch.tensor([not p for p in negative_prompts], device=negative.device)
        negative = torch.where(empty[:, None, None], torch.zeros_like(negative), negative)
        if negative_pooled is not None:
            negative_pooled = torch.where(empty[:, None], torch.zeros_like(negative_pooled), negative_pooled)
    kwargs = {"prompt_embeds": states, "negative_prompt_embeds": negative}
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = pooled
        kwargs["negative_pooled_prompt_embeds"] = negative_pooled
    return kwargs
