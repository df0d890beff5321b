"""Adapter configurations: `LoHaConfig` (PEFT 0.21's fields, defaults and behaviour) and `LoRAConfig`.

Both share the targeting fields and their semantics (see `loha_diffusion.targeting`), the per-module
`rank_pattern` / `alpha_pattern` lookup and JSON save/load in PEFT's `adapter_config.json` layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import AdapterFileNotFoundError, ConfigError
from .files import atomic_write_text

CONFIG_NAME = "adapter_config.json"

# Keys PEFT writes into adapter_config.json that carry no meaning for us; accepted on load and ignored.
_PEFT_BOOKKEEPING_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "inference_mode",
        "base_model_name_or_path",
        "revision",
        "auto_mapping",
        "peft_version",
        "target_parameters",
        "layer_replication",
        "exclude_modules_regex",
    }
)


def get_pattern_key(pattern_keys: list[str], module_name: str) -> str | None:
    """First key of `pattern_keys` that matches `module_name` as PEFT's `get_pattern_key` does, else None.

    A key matches when `re.match(rf"(.*\\.)?({key})$", module_name)` succeeds: a dot-boundary suffix match in
    which the key may be a regex, and `^full.name` pins a full name. Dict order decides between several keys.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class AdapterConfig:
    """Fields shared by every adapter kind: rank/alpha, dropouts, targeting, per-module patterns.

    Targeting follows PEFT exactly, surprises included:

    * a `str` `target_modules` is a regex *full match* on the module name (`"to_q"` matches only a top-level
      module called `to_q`); a list matches exact names or dot-boundary suffixes (`"attn1.to_q"`);
      `"all-linear"` selects every `nn.Linear`;
    * `exclude_modules` follows the same two rules and wins over `target_modules`;
    * `layers_to_transform` / `layers_pattern` apply only to *list* targets matched by suffix (a regex target or
      a list entry equal to the full name ignores them). The layer index is the first numeric path segment after
      at least two segments, which for UNet names is the `attentions`/`resnets` index: use
      `layers_pattern="down_blocks"` (etc.) to index blocks;
    * `rank_pattern` / `alpha_pattern` keys are looked up independently with `get_pattern_key`, so
      `rank_pattern={"to_v": 2}` with the default alpha gives that module `alpha / r = 4`; keys that match no
      module are ignored, as in PEFT.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    peft_type: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self._validate()

    def _validate(self) -> None:
        name = type(self).__name__
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"{name}.r must be an integer >= 1, got {self.r!r}.")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"{name}.{key} must be in [0, 1), got {value!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                f"{name}: `layers_pattern` is set but `layers_to_transform` is not; "
                "set `layers_to_transform` to the layer indices to adapt, or drop `layers_pattern`."
            )
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}.rank_pattern[{key!r}] must be an integer >= 1, got {value!r}.")
        for pattern_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, pattern_name):
                try:
                    re.compile(key)
                except re.error as err:
                    raise ConfigError(
                        f"{name}.{pattern_name} key {key!r} is not a valid regex: {err}"
                    ) from None

    def rank_for(self, module_name: str) -> int:
        """The rank of `module_name`: the first matching `rank_pattern` entry, else `r`."""
        key = get_pattern_key(list(self.rank_pattern), module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """The alpha of `module_name`: the first matching `alpha_pattern` entry, else `alpha`."""
        key = get_pattern_key(list(self.alpha_pattern), module_name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in PEFT's `adapter_config.json` layout (sets become sorted lists)."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build a config from a dict; on the base class, dispatch on `peft_type`.

        Unknown keys raise a `ConfigError` (a `ValueError`) naming them (PEFT bookkeeping keys such as `task_type` are accepted).
        """
        data = dict(data)
        if cls is AdapterConfig:
            peft_type = str(data.get("peft_type", "")).upper()
            by_type = {c.peft_type: c for c in (LoHaConfig, LoRAConfig)}
            if peft_type not in by_type:
                raise ConfigError(
                    f"Unknown adapter peft_type {data.get('peft_type')!r}; expected one of {sorted(by_type)}."
                )
            return by_type[peft_type].from_dict(data)
        if "peft_type" in data and str(data["peft_type"]).upper() != cls.peft_type:
            raise ConfigError(f"{cls.__name__} cannot load a config with peft_type {data['peft_type']!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known and k not in _PEFT_BOOKKEEPING_KEYS)
        if unknown:
            raise ConfigError(
                f"Unknown {cls.__name__} field(s): {', '.join(unknown)}. Known fields: {', '.join(sorted(known))}."
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `adapter_config.json` into `directory` (created if needed), atomically; return its path.

        Raises:
            OutputWriteError: no space left, or no permission to write the folder.
            OSError: any other error of the filesystem.
        """
        path = Path(directory) / CONFIG_NAME
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AdapterConfig:
        """Read `adapter_config.json` from `directory` (or a path to the JSON file itself).

        Raises:
            AdapterFileNotFoundError: no such file (also a `FileNotFoundError`).
            ConfigError: the file is not valid JSON, has unknown keys or invalid values.
        """
        path = Path(directory)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise AdapterFileNotFoundError(
                f"No adapter config at {path}; expected a directory holding {CONFIG_NAME}."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)


@dataclass
class LoHaConfig(AdapterConfig):
    """LoHa (FedPara low-rank Hadamard product): `ΔW = alpha/r · (w1a @ w1b) ⊙ (w2a @ w2b)`.

    Same fields, defaults and matching rules as PEFT 0.21's `LoHaConfig` (see `AdapterConfig`).
    `use_effective_conv2d=True` uses the CP/Tucker form (FedPara Proposition 3) for convs with a kernel > 1;
    1×1 convs and Linear always use the flat form. `init_weights=True` starts at identity (`hada_w2_b = 0`),
    `False` draws every factor at random (tests only). `rank_dropout` drops output rows of ΔW in training
    (rescaled by 1/kept-fraction as PEFT does); `module_dropout` skips the whole adapter for a forward.
    """

    peft_type: ClassVar[str] = "LOHA"
    kind: ClassVar[str] = "loha"


@dataclass
class LoRAConfig(AdapterConfig):
    """Kohya LoRA / LoCon: `ΔW = alpha/r · up @ down` (`lora_B @ lora_A` in PEFT's names).

    For k×k convs `lora_A` is a k×k conv to r channels and `lora_B` a 1×1 conv (Kohya LoCon);
    `use_effective_conv2d=True` uses a 1×1 `lora_A`, an r×r×k×k Tucker core `lora_mid` and a 1×1 `lora_B`
    (LyCORIS `use_tucker`). `init_weights=True` sets `lora_B = 0` (identity at start). Its JSON is our own
    layout (peft_type "LORA"); `loha_diffusion.formats.peft` converts to and from PEFT's `LoraConfig`.
    """

    peft_type: ClassVar[str] = "LORA"
    kind: ClassVar[str] = "lora"


# The adapter configs a kind name ("loha", "lora": `TrainConfig.algo`, presets) stands for.
CONFIG_CLASSES: tuple[type[AdapterConfig], ...] = (LoHaConfig, LoRAConfig)


def config_class(kind: str) -> type[AdapterConfig]:
    """The config class of adapter kind `kind` ("loha" → `LoHaConfig`, "lora" → `LoRAConfig`).

    Raises:
        ConfigError: no config class has that kind; the message lists the kinds.
    """
    for cls in CONFIG_CLASSES:
        if cls.kind == kind:
            return cls
    raise ConfigError(f"Unknown adapter kind {kind!r}; choose one of {[c.kind for c in CONFIG_CLASSES]}.")
