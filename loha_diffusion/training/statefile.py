"""Training state without pickle: the nested dicts, lists and tuples of tensors and plain values that
`state_dict()` of an optimizer, an LR scheduler or a gradient scaler returns, and the RNG states, stored as
one JSON document plus one safetensors file. Every optimizer of `config.OPTIMIZER_TYPES` round-trips exactly
(tests/test_training_optimizers.py): torch AdamW; bitsandbytes AdamW8bit (its 8-bit state, quantization maps
and block maxima are tensors under `__bnb_optimizer_quant_state__`, the shared maps stored once per
parameter); transformers' Adafactor (factored second moments, a 0-d `RMS` tensor, an int `step`; `eps` a
pair); Lion; Prodigy (scalars `d`, `d_max`, `k`, ... in the parameter groups, `growth_rate` infinite).

accelerate's `save_state` pickles these (`optimizer.bin`, `scheduler.bin`, `random_states_<rank>.pkl`, and
`custom_checkpoint_0.pkl`, which `load_state` unpickles with `weights_only=False`): resuming from a folder
someone else wrote could run their code. Here loading parses JSON and safetensors only, so a crafted file
can at worst hold wrong numbers (which `checkpoint.py` refuses by the manifest's checksums).

Encoding (`encode_state`): a tensor becomes `{"__tensor__": "<key>"}` with the tensor under `<key>` (the
dotted path to it, e.g. `state.0.exp_avg`) in the safetensors file; a tuple `{"__tuple__": [...]}`; a dict
with keys other than strings (an optimizer's `state` is keyed by parameter index) `{"__items__": [[key,
value], ...]}`; numbers, strings, booleans and None stay as they are (NaN and infinities as JSON's
`NaN`/`Infinity`, as Python's `json` writes them). Anything else is refused with the path to it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..errors import ConfigError

STATE_FORMAT = "loha_diffusion.training_state"
STATE_VERSION = 1
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_SCALARS = (bool, int, float, str, type(None))


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], what: str) -> Any:
    if isinstance(value, torch.Tensor):
        key, n = path or "value", 1
        while key in tensors:  # keys holding dots can make two paths alike
            n += 1
            key = f"{path}#{n}"
        # A copy: optimizers may share one tensor between parameters (bitsandbytes' qmap), which safetensors
        # refuses to write twice.
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    join = (lambda k: f"{path}.{k}") if path else str
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, join(i), tensors, what) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, join(i), tensors, what) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not {_TENSOR, _TUPLE, _ITEMS} & value.keys():
            return {k: _encode(v, join(k), tensors, what) for k, v in value.items()}
        bad = [k for k in value if not isinstance(k, _SCALARS)]
        if bad:
            raise ConfigError(_unstorable(what, join(bad[0]), f"a dict key of type {type(bad[0]).__name__}"))
        return {_ITEMS: [[k, _encode(v, join(k), tensors, what)] for k, v in value.items()]}
    raise ConfigError(
        _unstorable(what, path or "the top level", f"a {type(value).__module__}.{type(value).__name__}")
    )


def _unstorable(what: str, path: str, found: str) -> str:
    return (
        f"cannot checkpoint {what}: its state holds {found} at `{path}`; checkpoints store only tensors, "
        "numbers, strings, booleans, None, lists, tuples and dicts (no pickle, so that a resume runs no code). "
        "Use one of the optimizer_type values (AdamW, AdamW8bit, Adafactor, Lion, Prodigy) and a diffusers LR "
        "scheduler, or set checkpointing_steps = 0."
    )


def encode_state(state: Any, what: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """`state` (nested dicts/lists/tuples of tensors and plain values) as a JSON-able document and the
    tensors it refers to (CPU copies, contiguous), keyed by their dotted paths (`state.0.exp_avg`).

    Raises:
        ConfigError: `state` holds something else (a function, an object); the message names `what` (e.g.
            "the LR scheduler") and the path to the value.
    """
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, "", tensors, what), tensors


def decode_state(doc: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of `encode_state`: tuples, non-string dict keys and tensors restored.

    Raises:
        ValueError: the document refers to a tensor that is not in `tensors`, or is malformed.
    """
    if isinstance(doc, list):
        return [decode_state(v, tensors) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if _TENSOR in doc:
        key = doc[_TENSOR]
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"refers to tensor {key!r}, which the safetensors file does not hold")
        return tensors[key]
    if _TUPLE in doc:
        return tuple(decode_state(v, tensors) for v in doc[_TUPLE])
    if _ITEMS in doc:
        items = doc[_ITEMS]
        if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
            raise ValueError(f"malformed {_ITEMS} entry")
        return {k: decode_state(v, tensors) for k, v in items}
    return {k: decode_state(v, tensors) for k, v in doc.items()}


def state_files(name: str, state: Any, what: str) -> dict[str, bytes]:
    """The file contents that store `state`: `{"<name>.json": ..., "<name>.safetensors": ...}` (the latter
    only when `state` holds tensors).

    Raises:
        ConfigError: as `encode_state`.
    """
    doc, tensors = encode_state(state, what)
    text = json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "state": doc}, indent=1)
    files = {f"{name}.json": text.encode("utf-8")}
    if tensors:
        files[f"{name}.safetensors"] = save_tensors(tensors)
    return files


def parse_state_files(name: str, files: Mapping[str, bytes]) -> Any:
    """The state `state_files(name, ...)` stored, from the files' bytes (`{"<name>.json": ..., ...}`).

    Raises:
        ValueError: a file is missing or is not what `state_files` writes (the message says which and why;
            `safetensors` errors are reported as ValueError too).
    """
    try:
        doc = json.loads(files[f"{name}.json"].decode("utf-8"))
    except KeyError:
        raise ValueError(f"{name}.json is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}.json is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
        raise ValueError(f"{name}.json is not a training-state file of format {STATE_FORMAT} {STATE_VERSION}")
    tensors: Mapping[str, torch.Tensor] = {}
    if f"{name}.safetensors" in files:
        try:
            tensors = load_tensors(files[f"{name}.safetensors"])
        except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
            raise ValueError(f"{name}.safetensors is not a safetensors file ({exc})") from None
    try:
        return decode_state(doc.get("state"), tensors)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}.json {exc}") from None


def rng_state() -> dict[str, Any]:
    """This process's random states, as accelerate's `save_state` takes them: Python's `random`, NumPy's
    global generator, torch's CPU generator (uint8 tensor) and, with CUDA, every GPU's (uint8 tensors)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `rng_state()`'s output (the CUDA states only where this process has as many GPUs).

    Raises:
        ValueError: the state is malformed.
    """
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        keys = np.asarray(n["keys"], dtype=np.uint32)
        np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda") or []
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"malformed random state ({type(exc).__name__}: {exc})") from None
