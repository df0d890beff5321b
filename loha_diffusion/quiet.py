"""Targeted filters for the library log messages that are noise for this package, and nothing else.

Each filter drops one exact message of one logger; every other message of transformers and diffusers still
shows at the level the user set (no `set_verbosity_error`, which would also hide real warnings):

* transformers >= 5 (`transformers.utils.import_utils`): "`CLIPImageProcessor` requires torchvision (not
  installed); falling back to `CLIPImageProcessorPil` ...", printed when diffusers' Stable Diffusion pipelines
  are imported. The fallback is the image processor transformers used before its torchvision backend (same
  results), and this package never preprocesses images through it (the processor only feeds the safety checker).
* diffusers (`diffusers.models.modeling_utils`): "There are modules in UNet2DConditionModel that should be kept
  in float32: []. Casting directly with `to()` ...", logged by every `model.to(dtype)` even when the list of
  such modules is empty (diffusers checks `fp32_modules is not None` on `self._keep_in_fp32_modules or []`,
  which is never None). Only the empty-list form is dropped: a model that really has float32 modules still
  warns.

* transformers (`transformers.modeling_utils`): "The new embeddings will be initialized from a multivariate normal
  distribution ...", logged by `resize_token_embeddings` when diffusers' `load_textual_inversion` makes room for
  the tokens of an embedding bundled in a LoRA file; diffusers then overwrites exactly those rows with the
  embedding's vectors, so the initialization it announces never reaches a prompt.

Filters are attached to the emitting loggers by name (`logging.getLogger` gives the same object the library
uses), so installing them imports neither library, and installing twice adds nothing.
"""

from __future__ import annotations

import logging
import re

# logger name -> the messages of that logger that are noise here
NOISE: dict[str, tuple[re.Pattern[str], ...]] = {
    "transformers.utils.import_utils": (
        re.compile(r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`"),
    ),
    "transformers.modeling_utils": (
        re.compile(r"^The new embeddings will be initialized from a multivariate normal distribution"),
    ),
    "diffusers.models.modeling_utils": (
        re.compile(r"^There are modules in \w+ that should be kept in float32: \[\]\."),
    ),
}


class DropMessages(logging.Filter):
    """A `logging.Filter` that drops the records whose message matches one of `patterns` (`re.search`)."""

    def __init__(self, patterns: tuple[re.Pattern[str], ...]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def quiet_library_noise() -> None:
    """Drop the library messages listed in `NOISE` (and only those); idempotent, cheap, imports no library.

    Called when `loha_diffusion` is imported, so the CLI, the training script and library users get it
    before diffusers' pipelines are imported (which is when transformers prints the torchvision notice).
    """
    for name, patterns in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))
