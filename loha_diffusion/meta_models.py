"""Weightless models: a base model's UNet and text encoders built on the `meta` device from configs only.

They have the real module names and weight shapes but no storage, so building SDXL's costs well under a second
and no memory. The dry-run plan, `loha-diffusion verify/convert` and the file-size estimates use them to name,
count and shape adapters without loading gigabytes of weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import transformers
from diffusers import DiffusionPipeline, UNet2DConditionModel
from torch import nn

from .errors import ConfigError
from .tiny import build_full_size_text_encoder, build_unet_from_config, full_size_unet_config

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def meta_models(
    source: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    components: Sequence[str] = COMPONENTS,
    revision: str | None = None,
) -> dict[str, nn.Module]:
    """The UNet and text encoder(s) of a base model on the `meta` device, keyed by pipeline component name.

    Args:
        source: a diffusers pipeline folder or hub id (its `model_index.json` and component configs are read,
            no weights). None: the real SD1.5 / SDXL configs for `arch`.
        arch: "sd1" or "sdxl", used when `source` is None.
        components: which of "unet", "text_encoder", "text_encoder_2" to build; those the model lacks are
            left out of the result (SD1 has no "text_encoder_2").
        revision: hub revision of `source`.

    Returns:
        `{component: module}` with parameters on the `meta` device (float32 shapes, no storage).

    Raises:
        ConfigError: `source` is None and `arch` is not "sd1"/"sdxl"; a text encoder is not a transformers
            model. `OSError` from diffusers/transformers when `source` cannot be read.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ConfigError(f"components {unknown} are not among {list(COMPONENTS)}.")
    if source is None:
        return _standard_meta_models(arch, components)
    source = str(source)
    index = DiffusionPipeline.load_config(source, revision=revision)
    models: dict[str, nn.Module] = {}
    if "unet" in components:
        config = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)
        with torch.device("meta"):
            models["unet"] = UNet2DConditionModel.from_config(config)
    for component in ("text_encoder", "text_encoder_2"):
        library, class_name = (index.get(component) or [None, None])[:2]
        if component not in components or class_name is None:
            continue
        cls = getattr(transformers, class_name, None)
        if library != "transformers" or cls is None:
            raise ConfigError(f"{source}: {component} is a {library}.{class_name}, not a transformers model.")
        config = transformers.AutoConfig.from_pretrained(source, subfolder=component, revision=revision)
        with torch.device("meta"):
            models[component] = cls(config)
    return models


def _standard_meta_models(arch: str | None, components: Sequence[str]) -> dict[str, nn.Module]:
    if arch not in ("sd1", "sdxl"):
        raise ConfigError(
            f"Cannot build a standard base model for arch {arch!r}: use 'sd1' or 'sdxl', or give the base "
            "model's diffusers folder."
        )
    models: dict[str, nn.Module] = {}
    if "unet" in components:
        models["unet"] = build_unet_from_config(full_size_unet_config(arch), device="meta")
    if "text_encoder" in components:
        models["text_encoder"] = build_full_size_text_encoder(arch, 1)
    if arch == "sdxl" and "text_encoder_2" in components:
        models["text_encoder_2"] = build_full_size_text_encoder(arch, 2)
    return models
