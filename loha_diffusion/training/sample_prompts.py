"""kohya sd-scripts' `--sample_prompts` file read as `[[validation_prompts]]` tables.

kohya's formats (sd-scripts `train_util.sample_images_common` / `line_to_prompt_dict`):

* `.txt`: one prompt per line, options after ` --`: `--n` negative prompt, `--w` / `--h` width / height,
  `--d` seed, `--l` guidance scale, `--s` sampler steps, `--ss` sampler name; empty lines and lines starting
  with `#` are skipped. Example: `a photo of sks dog --n blurry --w 512 --h 768 --d 42 --l 7 --s 28`.
* `.toml`: a `[prompt]` table of defaults and its `[[prompt.subset]]` tables, one per prompt.
* `.json`: a list of tables (or of `.txt`-style lines).

Table keys are kohya's (`prompt`, `negative_prompt`, `width`, `height`, `seed`, `scale`, `sample_steps`,
`sample_sampler`) or this trainer's (`config.VALIDATION_PROMPT_KEYS`); kohya's become ours (`scale` →
`guidance_scale`, `sample_steps` → `num_inference_steps`). As kohya does, sizes are rounded down to a multiple
of 8 (at least 64) and steps clamped to 1..1000. The sampler (`--ss`, `sample_sampler`) is not a per-prompt
choice here (validation uses the base model's sampler), so it is dropped with a warning.

This module imports no torch and no other training module, so `config.validate` can check the file.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the `tomli` package (a dependency there)
    import tomli as tomllib

logger = logging.getLogger(__name__)

# kohya's table keys -> ours.
KOHYA_KEYS = {"scale": "guidance_scale", "sample_steps": "num_inference_steps"}
# kohya's line options -> (our key, the value's type).
LINE_OPTIONS: dict[str, tuple[str, type]] = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("num_inference_steps", int),
    "ss": ("sample_sampler", str),
}
SAMPLER_KEY = "sample_sampler"


def parse_prompt_line(line: str, where: str = "line") -> dict[str, Any]:
    """One kohya prompt line as a table: `a dog --n blurry --w 512 --d 42` →
    `{"prompt": "a dog", "negative_prompt": "blurry", "width": 512, "seed": 42}` (kohya's rounding applied,
    the sampler dropped; see the module docstring).

    Raises:
        ConfigError: an option kohya does not have, or a value that is not a number; naming `where`.
    """
    prompt, *options = line.strip().split(" --")
    table: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        match = re.fullmatch(r"(\w+)\s+(.*)", option.strip(), re.DOTALL)
        name = match.group(1).lower() if match else option.strip()
        if not match or name not in LINE_OPTIONS:
            known = ", ".join(f"--{o}" for o in LINE_OPTIONS)
            raise ConfigError(f"{where}: unknown or empty option '--{name}' (kohya's options: {known})")
        key, type_ = LINE_OPTIONS[name]
        try:
            table[key] = type_(match.group(2).strip())
        except ValueError:
            raise ConfigError(
                f"{where}: --{name} {match.group(2).strip()!r} is not a{'n integer' if type_ is int else ' number'}"
            ) from None
    return kohya_table(table, where)


def kohya_table(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A kohya prompt table in this trainer's keys (`KOHYA_KEYS`), sizes rounded down to a multiple of 8
    (at least 64) and steps clamped to 1..1000 as kohya does, the sampler dropped with a warning.

    Raises:
        ConfigError: both a kohya key and ours for the same setting (`scale` and `guidance_scale`).
    """
    out: dict[str, Any] = {}
    for key, value in table.items():
        ours = KOHYA_KEYS.get(key, key)
        if ours in out:
            raise ConfigError(f"{where}: both {key!r} and {ours!r} are set; keep one")
        out[ours] = value
    if SAMPLER_KEY in out:
        logger.warning(
            "%s: sampler %r ignored: validation renders with the base model's sampler",
            where,
            out[SAMPLER_KEY],
        )
        del out[SAMPLER_KEY]
    for key in ("width", "height"):
        if isinstance(out.get(key), int) and not isinstance(out[key], bool):
            out[key] = max(64, out[key] - out[key] % 8)
    steps = out.get("num_inference_steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        out["num_inference_steps"] = max(1, min(1000, steps))
    return out


def read_sample_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompts of a kohya `--sample_prompts` file (`.txt`, `.toml` or `.json`; see the module docstring)
    as validation-prompt tables, in file order. The tables' keys and values are checked by
    `config.check_validation_prompts`, not here.

    Raises:
        ConfigError: the file cannot be read or parsed, has another suffix, or has no prompt; naming the file
            (and the line or entry).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise ConfigError(f"sample_prompts {path}: use a .txt, .toml or .json file (kohya's formats)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sample_prompts {path} cannot be read: {exc}") from None
    if suffix == ".txt":
        tables = [
            parse_prompt_line(line, f"sample_prompts {path} line {number}")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    else:
        tables = _structured_prompts(path, text, suffix)
    if not tables:
        raise ConfigError(f"sample_prompts {path} has no prompt")
    return tables


def _structured_prompts(path: Path, text: str, suffix: str) -> list[dict[str, Any]]:
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"sample_prompts {path} is not valid {suffix[1:].upper()}: {exc}") from None
    if suffix == ".toml":
        defaults = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(defaults, dict) or not isinstance(defaults.get("subset"), list):
            raise ConfigError(
                f"sample_prompts {path}: expected kohya's layout, a [prompt] table of defaults and one "
                '[[prompt.subset]] table per prompt (prompt = "...")'
            )
        shared = {k: v for k, v in defaults.items() if k != "subset"}
        entries: list[Any] = [{**shared, **subset} for subset in defaults["subset"]]
    elif isinstance(data, list):
        entries = data
    else:
        raise ConfigError(f"sample_prompts {path}: expected a JSON list of prompt tables or lines")
    tables = []
    for number, entry in enumerate(entries, start=1):
        where = f"sample_prompts {path} entry {number}"
        if isinstance(entry, str):
            tables.append(parse_prompt_line(entry, where))
        elif isinstance(entry, dict):
            tables.append(kohya_table({k: v for k, v in entry.items() if k != "enum"}, where))
        else:
            raise ConfigError(f'{where} is neither a table nor a line; write {{"prompt": "..."}}')
    return tables
