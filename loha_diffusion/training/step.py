"""The diffusion training objective: latents, noise, timesteps, the scheduler's target, min-SNR-γ, the loss.

Randomness is per sample: every sample carries a seed (see `data.py`), and its VAE sample, timestep, noise and
noise offset come from a generator seeded from it. A sample's loss therefore does not depend on which batch or
process it is in, which makes resume exact and multi-process runs equal to single-process ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from ..errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any mix of ints and strings (same value on every machine and process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _seed_list(seeds: torch.Tensor | Sequence[int]) -> list[int]:
    return [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]


def resolve_prediction_type(scheduler, override: str | None = None) -> str:
    """The target the UNet predicts: `override` if given, else the scheduler config's `prediction_type`.

    Raises:
        ConfigError: the result is not "epsilon" or "v_prediction" (e.g. a scheduler configured for "sample").
    """
    prediction_type = override or scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type {prediction_type!r} is not supported for training; use one of {PREDICTION_TYPES}"
        )
    return prediction_type


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor, seeds: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """VAE latents of `pixel_values`, sampled with one CPU generator per sample, times the scaling factor.

    Args:
        vae: diffusers `AutoencoderKL` (its device and dtype are used).
        pixel_values: `(B, 3, H, W)` in [-1, 1], any device/dtype (moved to the VAE's).
        seeds: B per-sample seeds.

    Returns:
        `(B, 4, H/8, W/8)` latents on the VAE's device, in its dtype; no gradient.
    """
    generators = [torch.Generator().manual_seed(derive_seed(s, "vae")) for s in _seed_list(seeds)]
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixel_values).latent_dist.sample(generator=generators)
    return latents * vae.config.scaling_factor


@torch.no_grad()
def sample_latents(
    params: torch.Tensor, seeds: torch.Tensor | Sequence[int], scaling_factor: float
) -> torch.Tensor:
    """Latents sampled from cached VAE `latent_dist.parameters`, drawn exactly as `encode_latents` draws them.

    The same diffusers `DiagonalGaussianDistribution` that `vae.encode` returns is rebuilt from the parameters
    and sampled with the same per-sample CPU generators, so given the parameters `encode_latents` computed (same
    device and dtype) the latents are bitwise equal; the latent cache (`latent_cache.py`) relies on it.

    Args:
        params: `(B, 2 * latent_channels, h, w)` (mean then log-variance, SD's `(B, 8, H/8, W/8)`), on the
            device and in the dtype to sample in (the VAE's, for the uncached run's numbers).
        seeds: B per-sample seeds.
        scaling_factor: the VAE's `config.scaling_factor`.

    Returns:
        `(B, latent_channels, h, w)` latents on `params`' device, in its dtype; no gradient.
    """
    generators = [torch.Generator().manual_seed(derive_seed(s, "vae")) for s in _seed_list(seeds)]
    return DiagonalGaussianDistribution(params).sample(generator=generators) * scaling_factor


def sample_noise_and_timesteps(
    latents: torch.Tensor,
    seeds: torch.Tensor | Sequence[int],
    num_train_timesteps: int,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Gaussian noise shaped like `latents` and integer timesteps in [0, num_train_timesteps).

    Noise offset adds `noise_offset * n` with one `n ~ N(0, 1)` per sample and channel (Guttenberg's trick,
    as in diffusers), which lets the model learn overall brightness.

    Args:
        latents: `(B, C, h, w)`; only its shape, device and dtype are used.
        seeds: B per-sample seeds; each sample's draws come from its own CPU generator.

    Returns:
        `noise` `(B, C, h, w)` in the latents' dtype and `timesteps` int64 `(B,)`, both on the latents' device.
    """
    noises, timesteps = [], []
    channels = latents.shape[1]
    for seed in _seed_list(seeds):
        generator = torch.Generator().manual_seed(derive_seed(seed, "noise"))
        timesteps.append(torch.randint(0, num_train_timesteps, (), generator=generator))
        noise = torch.randn(latents.shape[1:], generator=generator)
        offset = torch.randn((channels,) + (1,) * (latents.dim() - 2), generator=generator)
        if noise_offset:
            noise = noise + noise_offset * offset
        noises.append(noise)
    noise = torch.stack(noises).to(device=latents.device, dtype=latents.dtype)
    return noise, torch.stack(timesteps).to(device=latents.device, dtype=torch.long)


def prediction_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet should output: the noise (epsilon) or the velocity `sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0`.

    `latents` and `noise` are `(B, C, h, w)`, `timesteps` `(B,)`; the target has the latents' shape.

    Raises:
        ValueError: `prediction_type` is not one of `PREDICTION_TYPES` (`resolve_prediction_type` checks first).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def snr_loss_weights(
    scheduler, timesteps: torch.Tensor, snr_gamma: float | None, prediction_type: str
) -> torch.Tensor | None:
    """Per-sample min-SNR-γ weights (Hang et al. 2023) at `timesteps` `(B,)`: float32 `(B,)` on their device
    (SNR from diffusers' `compute_snr`), or None when `snr_gamma` is unset. See `min_snr_weights`.

    Raises:
        ValueError: `prediction_type` is not one of `PREDICTION_TYPES`.
    """
    if snr_gamma is None:
        return None
    return min_snr_weights(compute_snr(scheduler, timesteps), snr_gamma, prediction_type)


def min_snr_weights(snr: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """The min-SNR-γ loss weight of each SNR value (float32, same shape), finite for every SNR >= 0.

    The weight turns the loss of the predicted target into `min(SNR, γ)` times the x0 loss, as diffusers'
    `train_text_to_image_lora.py` does:

    * epsilon: `min(SNR, γ) / SNR`, computed as `min(1, γ / SNR)` (the same value for SNR > 0). At SNR = 0 (the
      last timestep of a zero-terminal-SNR schedule, `rescale_betas_zero_snr=True`) the quotient is 0/0, and
      its limit is 1: `γ / 0 = inf` gives exactly that instead of NaN.
    * v-prediction: `min(SNR, γ) / (SNR + 1)`, which is 0 at SNR = 0.

    Raises:
        ValueError: `prediction_type` is not one of `PREDICTION_TYPES`.
    """
    snr = snr.float()
    if prediction_type == "epsilon":
        return torch.clamp(torch.full_like(snr, snr_gamma) / snr, max=1.0)  # a true division, as diffusers
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=snr_gamma) / (snr + 1)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def diffusion_loss(
    model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample MSE (in fp32) times optional per-sample weights `(B,)`, averaged over the batch.

    `model_pred` and `target` are `(B, ...)` of the same shape; returns a 0-dim float32 tensor."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()


def denoising_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    prediction_type: str,
    snr_gamma: float | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss for given latents, text states, noise and timesteps (one forward of `unet`).

    `latents`/`noise` `(B, 4, h, w)`, `encoder_hidden_states` `(B, 77, cross_attention_dim)`, `timesteps`
    int64 `(B,)`, all on the UNet's device; `added_cond_kwargs` SDXL's `{"text_embeds", "time_ids"}`
    (`conditioning.unet_conditioning`), None for SD1.x/SD2.x; `sample_weights` `(B,)` multiply each sample's
    loss (kohya's `prior_loss_weight` on regularization samples). Returns the (min-SNR and sample weighted)
    MSE averaged over the batch as a 0-dim float32 tensor.
    """
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )[0]
    target = prediction_target(scheduler, latents, noise, timesteps, prediction_type)
    weights = snr_loss_weights(scheduler, timesteps, snr_gamma, prediction_type)
    if sample_weights is not None:
        sample_weights = sample_weights.to(device=model_pred.device, dtype=torch.float32)
        weights = sample_weights if weights is None else weights * sample_weights
    return diffusion_loss(model_pred, target, weights)
