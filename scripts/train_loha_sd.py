#!/usr/bin/env python
"""Train a LoHa/LoRA adapter for Stable Diffusion 1.x/2.x and export it as a Kohya/LyCORIS file.

    accelerate launch scripts/train_loha_sd.py --config sample_configs/quickstart.toml [--flag value ...]
    python scripts/train_loha_sd.py --config sample_configs/sd15_loha.toml --dry_run

All logic lives in `loha_diffusion.training`; see `--help` for every flag (each is also a TOML key).
"""

from loha_diffusion.training.loop import main

if __name__ == "__main__":
    raise SystemExit(main())
