"""Single-file base models (`loha_diffusion.single_file`) and the test converter that writes them
(`tests/ldm_checkpoint.py`)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from ldm_checkpoint import TEXT_ENCODER_PREFIXES
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, what: str) -> None:
    exp, act = expected.state_dict(), actual.state_dict()
    assert exp.keys() == act.keys(), f"{what}: key sets differ: {sorted(set(exp) ^ set(act))[:5]}"
    differ = [k for k in exp if exp[k].dtype != act[k].dtype or not torch.equal(exp[k], act[k])]
    assert not differ, f"{what}: tensors differ: {differ[:5]}"


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_converter_output_loads_back_with_diffusers(arch, request):
    """The converted file is what diffusers' single-file loading reads: every tensor comes back unchanged."""
    folder = request.getfixturevalue(f"tiny_{arch}_pipeline_dir")
    state = load_file(str(request.getfixturevalue(f"tiny_{arch}_single_file")))
    unet = UNet2DConditionModel.from_single_file(
        state, config=str(folder), subfolder="unet", local_files_only=True
    )
    _assert_same_weights(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"), unet, "unet")
    vae = AutoencoderKL.from_single_file(state, config=str(folder), subfolder="vae", local_files_only=True)
    _assert_same_weights(AutoencoderKL.from_pretrained(folder, subfolder="vae"), vae, "vae")
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    for component, prefix in TEXT_ENCODER_PREFIXES[arch].items():
        own = {k: v for k, v in state.items() if k.startswith(prefix)}
        cls = classes[component]
        model = create_diffusers_clip_model_from_ldm(
            cls, own, subfolder=component, config=str(folder), local_files_only=True
        )
        _assert_same_weights(cls.from_pretrained(folder, subfolder=component), model, component)
