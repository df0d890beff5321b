"""The run's experiment tracker (TensorBoard, wandb or none) behind three calls: start, log scalars, log the
validation images. accelerate does the writing; with `report_to = "none"` every call does nothing."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from .config import TrainConfig

logger = logging.getLogger(__name__)

PROJECT_NAME = "loha_diffusion"  # the tracker run's project (wandb) / sub-folder of logging_dir (TensorBoard)
MAX_TAG_PROMPT = 80  # characters of a prompt shown in its TensorBoard tag


def image_tag(index: int, prompt: str) -> str:
    """The tracker tag of validation prompt `index`: `validation/00 a photo of sks dog` (TensorBoard images
    have no caption, so the prompt is in the tag; "/" would open a tag group and is replaced, long prompts
    are cut to `MAX_TAG_PROMPT` characters)."""
    shown = re.sub(r"\s+", " ", prompt.replace("/", "|")).strip()
    if len(shown) > MAX_TAG_PROMPT:
        shown = shown[: MAX_TAG_PROMPT - 3] + "..."
    return f"validation/{index:02d} {shown}"


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as tracker hyperparameters: TensorBoard's hparams take scalars and strings only, so lists,
    dicts and None become their `str`."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}


class Tracker:
    """Logs a run's numbers and validation images through `accelerator`'s tracker (`cfg.report_to`).

    `start` must run on the main process only (it creates the tracker); `log` and `log_validation` may run
    on every process (accelerate writes from the main one)."""

    def __init__(self, accelerator: Any, cfg: TrainConfig) -> None:
        self.accelerator = accelerator
        self.report_to = cfg.report_to

    @property
    def enabled(self) -> bool:
        """False for `report_to = "none"`."""
        return self.report_to != "none"

    def start(self, cfg: TrainConfig) -> None:
        """Create the tracker with the run's settings as hyperparameters (main process only).

        `config.check_packages` refused a tracker whose package is missing before any model loaded; should
        accelerate still leave it out (it drops a tracker it cannot use with a log line), logging is switched
        off with a warning here, so the run does not fail at its end when the validation grid is logged.
        """
        if not self.enabled:
            return
        self.accelerator.init_trackers(PROJECT_NAME, config=tracker_config(cfg))
        started = {getattr(tracker, "name", None) for tracker in self.accelerator.trackers}
        if self.report_to not in started:
            logger.warning(
                "report_to = %r: accelerate did not start this tracker (is the package installed and "
                "importable?); the run continues without experiment logging.",
                self.report_to,
            )
            self.report_to = "none"

    def log(self, values: dict[str, float], step: int) -> None:
        """Log scalars (`{"train/loss": 0.12, ...}`) at optimizer step `step`."""
        if self.enabled:
            self.accelerator.log(values, step=step)

    def log_validation(self, values: dict[str, float], images: Sequence[tuple[str, Any]], step: int) -> None:
        """Log scalars and the validation images at `step`: `images` holds one `(prompt, image)` per prompt (a
        PIL RGB image: that prompt's images in a row), logged as one image per prompt under `image_tag`.
        TensorBoard gets each through `add_image` (HWC uint8) and the full prompts as text
        ("validation/prompts"); wandb gets each as a `wandb.Image` captioned with its prompt."""
        if not self.enabled:
            return
        values = dict(values)
        if self.report_to == "tensorboard":
            import numpy as np

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            for index, (prompt, image) in enumerate(images):
                writer.add_image(image_tag(index, prompt), np.asarray(image), step, dataformats="HWC")
            if images:
                listing = "\n".join(f"{index:02d}: {prompt}  " for index, (prompt, _) in enumerate(images))
                writer.add_text("validation/prompts", listing, step)
        elif self.report_to == "wandb":
            import wandb

            for index, (prompt, image) in enumerate(images):
                values[image_tag(index, prompt)] = wandb.Image(image, caption=prompt)
        self.accelerator.log(values, step=step)
