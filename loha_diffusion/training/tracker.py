"""The run's experiment tracker (TensorBoard, wandb or none) behind three calls: start, log scalars, log the
validation grid. accelerate does the writing; with `report_to = "none"` every call does nothing."""

from __future__ import annotations

import logging
from typing import Any

from .config import TrainConfig

logger = logging.getLogger(__name__)

PROJECT_NAME = "loha_diffusion"  # the tracker run's project (wandb) / sub-folder of logging_dir (TensorBoard)


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as tracker hyperparameters: TensorBoard's hparams take scalars and strings only, so lists,
    dicts and None become their `str`."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}


class Tracker:
    """Logs a run's numbers and validation grids through `accelerator`'s tracker (`cfg.report_to`).

    `start` must run on the main process only (it creates the tracker); `log` and `log_validation` may run
    on every process (accelerate writes from the main one)."""

    def __init__(self, accelerator: Any, cfg: TrainConfig) -> None:
        self.accelerator = accelerator
        self.report_to = cfg.report_to
        self.caption = " | ".join(cfg.validation_prompt)

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

    def log_validation(self, values: dict[str, float], grid: Any, step: int) -> None:
        """Log scalars and the validation grid (a PIL RGB image) at `step`: TensorBoard gets it as image
        "validation" (HWC uint8), wandb as a `wandb.Image` captioned with the prompts."""
        if not self.enabled:
            return
        values = dict(values)
        if self.report_to == "tensorboard":
            import numpy as np

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif self.report_to == "wandb":
            import wandb

            values["validation"] = wandb.Image(grid, caption=self.caption)
        self.accelerator.log(values, step=step)
