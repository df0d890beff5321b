"""quiet.py drops exactly the library messages that are noise here; every other message still shows."""

from __future__ import annotations

import logging

import pytest
import torch

import loha_diffusion  # noqa: F401  (importing the package installs the filters)
from loha_diffusion import quiet
from loha_diffusion.quiet import DropMessages, quiet_library_noise
from loha_diffusion.tiny import build_tiny_pipeline, build_tiny_unet

TORCHVISION = (
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
    "backward compatibility. Install torchvision to use the default backend, or import `CLIPImageProcessorPil` "
    "directly to silence this warning."
)
EMPTY_FP32 = (
    "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly with `to()` "
    "can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead to keep these modules in "
    "float32."
)
REAL_FP32 = EMPTY_FP32.replace(": [].", ": ['norm_out'].")


@pytest.fixture
def records():
    """Records of WARNING and above that pass the loggers' filters, from the transformers/diffusers loggers."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep(logging.WARNING)
    names = list(quiet.NOISE)
    for name in names:
        logging.getLogger(name).addHandler(handler)
    yield seen
    for name in names:
        logging.getLogger(name).removeHandler(handler)


def test_the_noise_is_dropped_and_real_warnings_show(records):
    transformers_log = logging.getLogger("transformers.utils.import_utils")
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    transformers_log.warning(TORCHVISION)
    transformers_log.warning(TORCHVISION.replace("CLIPImageProcessor", "SiglipImageProcessor"))
    diffusers_log.warning(EMPTY_FP32)
    assert records == []

    transformers_log.warning("`AutoImageProcessor` could not load its config.")
    diffusers_log.warning(REAL_FP32)  # a model that really keeps modules in float32
    diffusers_log.warning("Keyword arguments {'foo': 1} are not expected and will be ignored.")
    assert [r.getMessage() for r in records] == [
        "`AutoImageProcessor` could not load its config.",
        REAL_FP32,
        "Keyword arguments {'foo': 1} are not expected and will be ignored.",
    ]


def test_installing_twice_adds_no_second_filter():
    quiet_library_noise()
    quiet_library_noise()
    for name in quiet.NOISE:
        assert sum(isinstance(f, DropMessages) for f in logging.getLogger(name).filters) == 1


def test_a_real_bf16_cast_of_a_diffusers_model_is_quiet(records, monkeypatch):
    logger = logging.getLogger("diffusers.models.modeling_utils")
    monkeypatch.setattr(logger, "level", logging.WARNING)  # whatever verbosity another test left
    unet = build_tiny_unet("sd1")
    unet.to(torch.bfloat16)  # diffusers logs EMPTY_FP32 here (its list of float32 modules is empty)
    unet.to(dtype=torch.float16)
    assert records == []

    # Control: without the filter the same casts do log it (the test above is not vacuous).
    monkeypatch.setattr(logger, "filters", [f for f in logger.filters if not isinstance(f, DropMessages)])
    unet.to(torch.bfloat16)
    assert [r.getMessage() for r in records] == [EMPTY_FP32]


def test_loading_a_bundled_embedding_is_quiet(records, tmp_path, monkeypatch):
    """diffusers' load_textual_inversion resizes the token embeddings, and transformers announces how it
    initializes the new rows, which diffusers overwrites at once with the embedding: dropped. The control
    shows the message is really emitted without the filter."""
    logger = logging.getLogger("transformers.modeling_utils")
    monkeypatch.setattr(logger, "level", logging.WARNING)
    pipe = build_tiny_pipeline("sd1")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion(torch.randn(2, width), token="<emb>")
    assert records == []

    monkeypatch.setattr(logger, "filters", [f for f in logger.filters if not isinstance(f, DropMessages)])
    # transformers' warning_once is cached per message: let the control emit it again.
    monkeypatch.setattr(logging.Logger, "warning_once", logging.Logger.warning, raising=False)
    pipe.load_textual_inversion(torch.randn(2, width), token="<emb2>")
    assert any("new embeddings will be initialized" in r.getMessage() for r in records)
