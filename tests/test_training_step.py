"""Training objective: per-sample noise/timesteps, targets, min-SNR weights, the loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from loha_diffusion.training.step import (
    denoising_loss,
    derive_seed,
    diffusion_loss,
    min_snr_weights,
    prediction_target,
    resolve_prediction_type,
    sample_noise_and_timesteps,
    snr_loss_weights,
)


@pytest.fixture
def scheduler():
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2)
    assert len({derive_seed(1, "a", i) for i in range(100)}) == 100
    assert 0 <= derive_seed(5) < 2**63


def test_noise_is_per_sample(scheduler):
    latents = torch.zeros(3, 4, 8, 8)
    noise, t = sample_noise_and_timesteps(latents, [11, 22, 33], 1000)
    assert noise.shape == latents.shape and t.shape == (3,) and t.dtype == torch.long
    assert ((0 <= t) & (t < 1000)).all()
    # The same seed gives the same noise whatever the batch it is in.
    noise2, t2 = sample_noise_and_timesteps(latents[:1], [22], 1000)
    assert torch.equal(noise2[0], noise[1]) and t2[0] == t[1]
    assert not torch.equal(noise[0], noise[1])


def test_noise_offset_shifts_channels(scheduler):
    latents = torch.zeros(64, 4, 8, 8)
    seeds = list(range(64))
    plain, _ = sample_noise_and_timesteps(latents, seeds, 1000)
    offset, _ = sample_noise_and_timesteps(latents, seeds, 1000, noise_offset=0.5)
    shift = offset - plain
    # A constant per (sample, channel), with standard deviation noise_offset.
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert 0.35 < shift[:, :, 0, 0].std() < 0.65


def test_targets(scheduler):
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(prediction_target(scheduler, latents, noise, t, "epsilon"), noise)
    v = prediction_target(scheduler, latents, noise, t, "v_prediction")
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-6)


def test_prediction_type_from_scheduler(scheduler):
    assert resolve_prediction_type(scheduler) == "epsilon"
    v_sched = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    assert resolve_prediction_type(v_sched) == "v_prediction"
    assert resolve_prediction_type(scheduler, "v_prediction") == "v_prediction"
    with pytest.raises(ValueError, match="sample"):
        resolve_prediction_type(DDPMScheduler.from_config(scheduler.config, prediction_type="sample"))


def test_min_snr_weights(scheduler):
    t = torch.tensor([1, 500, 999])
    assert snr_loss_weights(scheduler, t, None, "epsilon") is None
    a = scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    eps = snr_loss_weights(scheduler, t, 5.0, "epsilon")
    assert torch.allclose(eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert eps[0] < 1 and eps[2] == 1  # low-noise steps are down-weighted, high-noise steps keep weight 1
    v = snr_loss_weights(scheduler, t, 5.0, "v_prediction")
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_diffusion_loss():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[1] *= 2
    assert diffusion_loss(pred, target).item() == pytest.approx(2.5)
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx(1.5)
    assert diffusion_loss(pred.half(), target.half()).dtype == torch.float32


def test_min_snr_weights_exact_values():
    """ε: min(SNR, γ)/SNR with its limit 1 at SNR 0; v: min(SNR, γ)/(SNR + 1), 0 at SNR 0 (γ = 5)."""
    snr = torch.tensor([0.0, 1e-6, 5.0, 100.0])
    assert torch.equal(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.05]))
    v = min_snr_weights(snr, 5.0, "v_prediction")
    assert v[0] == 0.0
    torch.testing.assert_close(v, torch.tensor([0.0, 1e-6 / (1 + 1e-6), 5 / 6, 5 / 101]), rtol=1e-6, atol=0)


def test_min_snr_with_zero_terminal_snr_is_finite_everywhere(tiny_sd1_unet):
    zero_snr = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        rescale_betas_zero_snr=True,
    )
    t = torch.arange(1000)
    assert zero_snr.alphas_cumprod[-1] == 0  # SNR 0 at t = 999
    eps = snr_loss_weights(zero_snr, t, 5.0, "epsilon")
    v = snr_loss_weights(zero_snr, t, 5.0, "v_prediction")
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    assert eps[-1] == 1.0 and v[-1] == 0.0
    latents, noise, states = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    for prediction_type in ("epsilon", "v_prediction"):
        loss = denoising_loss(
            tiny_sd1_unet,
            zero_snr,
            latents,
            states,
            noise,
            torch.tensor([999, 998]),
            prediction_type=prediction_type,
            snr_gamma=5.0,
        )
        assert torch.isfinite(loss)
