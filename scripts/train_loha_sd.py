#!/usr/bin/env python
"""Train a LoHa/LoRA adapter for Stable Diffusion 1.x/2.x and export it as a Kohya/LyCORIS file.

    accelerate launch scripts/train_loha_sd.py --config sample_configs/quickstart.toml [--flag value ...]
    python scripts/train_loha_sd.py --config sample_configs/sd15_loha.toml --dry_run

All logic lives in `loha_diffusion.training`; see `--help` for every flag (each is also a TOML key).
The command line and the TOML file are parsed and checked before torch, diffusers and accelerate are
imported, so `--help`, a mistyped flag or a bad value answer at once.
"""

from __future__ import annotations

import sys

from loha_diffusion.errors import ConfigError
from loha_diffusion.training.config import load_config, report_user_error


def main(argv: list[str] | None = None) -> int:
    """Parse and check the settings, then train (or print the dry-run plan); returns the exit status."""
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        return report_user_error(exc)
    # Only a valid configuration pays for importing torch, diffusers and accelerate.
    from loha_diffusion.training.loop import run_config

    return run_config(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
