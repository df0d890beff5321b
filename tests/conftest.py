"""Shared fixtures: tiny SD1/SDXL-shaped models and pipelines built offline from configs (loha_diffusion.tiny).

Models that tests may mutate (inject adapters, merge, move) are function-scoped and built fresh: they are tiny.
Saved pipeline folders are session-scoped; tests must treat them as read-only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loha_diffusion import tiny


@pytest.fixture
def tiny_sd1_unet():
    """A fresh tiny UNet with the SD1.5 block layout (Conv2d 1x1 proj_in/proj_out, cross-attention dim 32)."""
    return tiny.build_tiny_unet("sd1")


@pytest.fixture
def tiny_sdxl_unet():
    """A fresh tiny UNet with the SDXL block layout (Linear proj_in/proj_out, text-time embedding)."""
    return tiny.build_tiny_unet("sdxl")


@pytest.fixture
def tiny_sd1_text_encoder():
    """A fresh tiny `CLIPTextModel` (module paths `encoder.layers.N...`, no `.text_model` in transformers 5)."""
    return tiny.build_tiny_text_encoder("sd1", 1)


@pytest.fixture
def tiny_sdxl_text_encoders():
    """Fresh tiny SDXL text encoders: (`CLIPTextModel` te1, `CLIPTextModelWithProjection` te2)."""
    return tiny.build_tiny_text_encoder("sdxl", 1), tiny.build_tiny_text_encoder("sdxl", 2)


@pytest.fixture
def tiny_sd1_pipeline():
    """A fresh in-memory tiny `StableDiffusionPipeline`."""
    return tiny.build_tiny_pipeline("sd1")


@pytest.fixture
def tiny_sdxl_pipeline():
    """A fresh in-memory tiny `StableDiffusionXLPipeline`."""
    return tiny.build_tiny_pipeline("sdxl")


@pytest.fixture(scope="session")
def tiny_sd1_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny SD1 diffusers folder (read-only for tests: copy it before changing anything)."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd1") / "pipeline", "sd1")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny SDXL diffusers folder (read-only for tests: copy it before changing anything)."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipeline", "sdxl")
