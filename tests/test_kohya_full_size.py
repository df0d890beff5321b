"""Full-size SD1.5 and SDXL (configs of the real checkpoints, weights on the meta device): module counts of the
"full" preset against docs/kohya-format.md section 7, and every Kohya name of every targeted module maps back."""

from __future__ import annotations

import pytest

from loha_diffusion.formats import naming
from loha_diffusion.formats.kohya import kohya_name_map
from loha_diffusion.targeting import find_target_modules, text_encoder_preset, unet_preset
from loha_diffusion.tiny import build_full_size_text_encoder, build_unet_from_config, full_size_unet_config

# docs/kohya-format.md section 7: (TE modules, Transformer2DModel layers, ResNet/Down/Up Linear+1x1, ResNet/Down/Up 3x3)
DOC_COUNTS = {"sd1": (72, 192, 36, 50), "sdxl": (72 + 192, 722, 28, 38)}
LYCORIS_FULL_EXTRAS = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def full_size(request):
    arch = request.param
    unet = build_unet_from_config(full_size_unet_config(arch), device="meta")
    encoders = [build_full_size_text_encoder(arch, i) for i in ((1, 2) if arch == "sdxl" else (1,))]
    return arch, unet, encoders


def test_full_preset_counts_match_the_doc(full_size):
    arch, unet, encoders = full_size
    te_count, transformer, resnet_linear, resnet_kxk = DOC_COUNTS[arch]
    targets = find_target_modules(unet, unet_preset("full"))
    in_transformers = [t for t in targets if ".attentions." in t]
    kxk = [
        t
        for t in targets
        if ".attentions." not in t
        and unet.get_submodule(t).weight.dim() == 4
        and unet.get_submodule(t).weight.shape[-1] > 1
    ]
    assert len(in_transformers) == transformer
    assert len(kxk) == resnet_kxk
    assert len(targets) - len(in_transformers) - len(kxk) == resnet_linear
    te_targets = [find_target_modules(te, text_encoder_preset()) for te in encoders]
    assert sum(len(t) for t in te_targets) == te_count
    if arch == "sd1":
        # LyCORIS "full" adds conv_in, conv_out and time_embedding.linear_1/2: 354 modules on SD1.5.
        assert sum(len(t) for t in te_targets) + len(targets) + len(LYCORIS_FULL_EXTRAS) == 354
    else:
        assert sum(len(t) for t in te_targets) + len(targets) == 1052


def test_every_targeted_module_has_a_kohya_name_that_maps_back(full_size):
    arch, unet, encoders = full_size
    layout = naming.UNetLayout.from_config(unet)
    style = naming.default_unet_naming(arch)
    components = {
        "unet": unet,
        "text_encoder": encoders[0],
        "text_encoder_2": encoders[1] if len(encoders) > 1 else None,
    }
    names = kohya_name_map(**components)
    prefixes = naming.text_encoder_prefixes(len(encoders))
    exported = {}
    for path in find_target_modules(unet, unet_preset("full")) + LYCORIS_FULL_EXTRAS:
        exported[naming.unet_kohya_name(path, style, layout)] = ("unet", path)
    for component, prefix in zip(("text_encoder", "text_encoder_2"), prefixes):
        for path in find_target_modules(components[component], text_encoder_preset()):
            name = naming.text_encoder_kohya_name(path, prefix)
            assert naming.te_sublayer(name) is not None  # one of the six names ComfyUI and A1111 map
            exported[name] = (component, path)
    assert len(exported) == sum(DOC_COUNTS[arch]) + len(LYCORIS_FULL_EXTRAS)
    for name, (component, path) in exported.items():
        assert (names[name].component, names[name].path) == (component, path)
    unet_names = [n for n in exported if n.startswith("lora_unet_")]
    if arch == "sdxl":
        assert all(
            n.startswith(
                (
                    "lora_unet_input_blocks",
                    "lora_unet_middle_block",
                    "lora_unet_output_blocks",
                    "lora_unet_time_embed_",
                    "lora_unet_out_",
                )
            )
            for n in unet_names
        )
        assert "lora_unet_output_blocks_2_2_conv" in exported
        assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in exported
    else:
        assert all(
            n.startswith(
                (
                    "lora_unet_down_blocks",
                    "lora_unet_mid_block",
                    "lora_unet_up_blocks",
                    "lora_unet_conv_",
                    "lora_unet_time_embedding",
                )
            )
            for n in unet_names
        )
