"""diffusers' own Kohya-LoRA loader (`pipe.load_lora_weights`, PEFT backend) accepts our SD1 LoRA/LoCon export and
gives the same UNet and text-encoder outputs as our adapters."""

from __future__ import annotations

import torch

from loha_diffusion.formats.kohya import save_kohya
from loha_diffusion.model import inject_adapter
from loha_diffusion.targeting import text_encoder_preset, unet_preset
from loha_diffusion.tiny import build_tiny_pipeline


def test_diffusers_load_lora_weights_matches_ours(tmp_path):
    ours, theirs, base = build_tiny_pipeline("sd1"), build_tiny_pipeline("sd1"), build_tiny_pipeline("sd1")
    torch.manual_seed(0)
    # LoCon: attention/FF Linear and 1x1 layers plus the ResNet 3x3 convs, with different conv rank/alpha.
    inject_adapter(
        ours.unet, unet_preset("full", algo="lora", r=4, alpha=2, conv_r=2, conv_alpha=1, init_weights=False)
    )
    inject_adapter(ours.text_encoder, text_encoder_preset(algo="lora", r=4, alpha=8, init_weights=False))
    path = save_kohya(
        tmp_path / "lora.safetensors", unet=ours.unet, text_encoder=ours.text_encoder, dtype=torch.float32
    )
    theirs.load_lora_weights(str(path))

    sample, hidden = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
    ids = torch.randint(0, 100, (1, 77))
    with torch.no_grad():
        a, b = ours.unet(sample, 10, hidden).sample, theirs.unet(sample, 10, hidden).sample
        unchanged = base.unet(sample, 10, hidden).sample
        ta, tb = ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0]
        te_unchanged = base.text_encoder(ids)[0]
    assert (a - unchanged).abs().max() > 1e-2 and (ta - te_unchanged).abs().max() > 1e-2
    assert (a - b).abs().max() <= 1e-5 * (a - unchanged).abs().max()
    assert (ta - tb).abs().max() <= 1e-5 * (ta - te_unchanged).abs().max()
