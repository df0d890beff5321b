"""The run's `rank_pattern` / `alpha_pattern`, checked and described on the weightless `meta` UNet.

PEFT applies a key only where it matches a module's whole name or a dot-separated tail of it
(`targeting.pattern_key_matches`), and ignores a key that matches nothing: a kohya user's block-wise
`down_blocks.0 = 4` would train every module at the default rank without a word. `check_run_patterns` refuses
such keys at the start of `train` and of the dry run, before any weight is loaded (on `meta` models built from
the configs: ~0.1 s for SD1.5's UNet); `pattern_lines` are the dry run's lines of what each key changed.

The patterns apply to the UNet only: the text encoders' adapters (`models.text_encoder_adapter_config`) get
`rank` and `alpha`, so keys are checked against the UNet's modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from ..config import AdapterConfig
from ..targeting import PatternUse, check_pattern_keys, find_target_modules
from ..utils import format_number
from .config import TrainConfig
from .models import load_meta_models

TEXT_ENCODER_NOTE = (
    "rank_pattern/alpha_pattern apply to the UNet only (text-encoder adapters use rank and alpha); "
    "UNet module names look like down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
)


def user_pattern_keys(cfg: TrainConfig) -> list[tuple[str, str]]:
    """The `(setting, key)` pairs the user wrote (`cfg.rank_pattern`, `cfg.alpha_pattern`); the adapter config
    may hold more (preset 'full' adds `conv1`/`conv2`/`conv` keys for `conv_rank`/`conv_alpha`)."""
    return [("rank_pattern", key) for key in cfg.rank_pattern] + [
        ("alpha_pattern", key) for key in cfg.alpha_pattern
    ]


def check_patterns_on(
    cfg: TrainConfig, unet_config: AdapterConfig, adapted: Sequence[str], all_names: Sequence[str]
) -> list[PatternUse]:
    """`targeting.check_pattern_keys` for the keys the user wrote, on the UNet's `adapted` module names
    (`all_names`: every module name of the UNet).

    Raises:
        ConfigError: a key the user wrote sets no module (see `targeting.check_pattern_keys`).
    """
    return check_pattern_keys(
        unet_config,
        adapted,
        all_names,
        keys=user_pattern_keys(cfg),
        model="UNet",
        hints=[TEXT_ENCODER_NOTE],
    )


def check_run_patterns(
    cfg: TrainConfig, unet_config: AdapterConfig, unet: nn.Module | None = None
) -> list[PatternUse]:
    """Check the run's patterns before any weight is loaded: on `unet` (default: the base model's UNet built
    on the `meta` device, `models.load_meta_models`), the modules `unet_config` adapts. Does nothing (returns
    `[]`, builds nothing) when the run has no patterns.

    Raises:
        ConfigError: a key the user wrote sets no module; or the base model's configs cannot be read (see
            `models.load_meta_models`).
    """
    if not (cfg.rank_pattern or cfg.alpha_pattern):
        return []
    if unet is None:
        unet, _ = load_meta_models(cfg)
    names = [name for name, _ in unet.named_modules() if name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unused target_modules entries: the real injection warns once
        adapted = find_target_modules(unet, unet_config)
    return check_patterns_on(cfg, unet_config, adapted, names)


def pattern_lines(cfg: TrainConfig, uses: Sequence[PatternUse]) -> list[str]:
    """The dry run's lines, one per key: `rank_pattern 'down_blocks\\.0\\..*' = 4: 24 modules`, with how many
    more it matches that an earlier key sets, and the keys preset 'full' adds for `conv_rank`/`conv_alpha`
    marked as such."""
    written = set(user_pattern_keys(cfg))
    lines = []
    for use in uses:
        line = f"{use.setting} '{use.key}' = {format_number(use.value)}: {len(use.applied)} modules"
        if len(use.matched) > len(use.applied):
            line += (
                f" (matches {len(use.matched)}; {len(use.matched) - len(use.applied)} set by an earlier key)"
            )
        if (use.setting, use.key) not in written:
            line += f" (from {'conv_rank' if use.setting == 'rank_pattern' else 'conv_alpha'})"
        lines.append(line)
    return lines
