"""Kohya file metadata: `kohya_metadata` (the `ss_*` / `modelspec.*` keys A1111 and kohya tools read),
`read_metadata`, and A1111's `sshs_model_hash` (`addnet_hash`, `addnet_hash_file`)."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from torch import nn

from ...adapters import Adapter, LayerSpec
from ...utils import format_number, most_common
from .. import naming

# Short names accepted in `training_info` -> the sd-scripts metadata key they fill.
TRAINING_INFO_KEYS = {
    "steps": "ss_steps",
    "max_train_steps": "ss_max_train_steps",
    "epochs": "ss_num_epochs",
    "epoch": "ss_epoch",
    "resolution": "ss_resolution",
    "dataset_dirs": "ss_dataset_dirs",
    "tag_frequency": "ss_tag_frequency",
    "num_train_images": "ss_num_train_images",
    "training_started_at": "ss_training_started_at",
    "training_finished_at": "ss_training_finished_at",
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "lr_scheduler": "ss_lr_scheduler",
    "optimizer": "ss_optimizer",
    "batch_size": "ss_total_batch_size",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "mixed_precision": "ss_mixed_precision",
    "seed": "ss_seed",
    "clip_skip": "ss_clip_skip",
    "noise_offset": "ss_noise_offset",
    "min_snr_gamma": "ss_min_snr_gamma",
    "sd_model_name": "ss_sd_model_name",
    "prediction_type": "modelspec.prediction_type",
}
# Keys whose value names a model or file: written as a name, never as the writer's local path.
NAME_KEYS = ("ss_sd_model_name", "ss_vae_name", "ss_output_name", "modelspec.title")
# Keys holding JSON objects keyed by dataset folder (kohya writes the folder's name).
FOLDER_KEYED_KEYS = ("ss_dataset_dirs", "ss_tag_frequency")
_MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def public_name(value: str) -> str:
    """The name to publish for a model given as `value`: a hub id (`org/name`) as it is, a local path as its
    final folder name, or its file name without a model-file suffix (`/home/me/models/sd15.safetensors` ->
    `sd15`), so a shared adapter does not carry its author's directory layout.

    This is kohya sd-scripts' rule (train_network.py: `ss_sd_model_name` is `os.path.basename` of an existing
    path; the dataset folders' base names in `ss_dataset_dirs`); a path that no longer exists is recognised by
    its form (absolute, `~`, `./`, `../`, a drive letter or a backslash, or more than one `/` and no space)."""
    text = value.strip()
    if not text:
        return value
    is_path = (
        os.path.exists(os.path.expanduser(text))
        or text.startswith(("/", "~", "./", "../"))
        or "\\" in text
        or re.match(r"[A-Za-z]:/", text) is not None
        or (text.count("/") > 1 and " " not in text)
    )
    if not is_path:
        return value
    name = text.replace("\\", "/").rstrip("/").rpartition("/")[2]
    for suffix in _MODEL_FILE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name or value


def public_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """`metadata` (string values, as in a file) with local paths reduced to names (`public_name`): the model
    and output name keys (`NAME_KEYS`) and the folder keys of `ss_dataset_dirs` / `ss_tag_frequency`. Other
    values are kept as they are (a value that is not valid JSON is left alone)."""
    out = dict(metadata)
    for key in NAME_KEYS:
        if isinstance(out.get(key), str):
            out[key] = public_name(out[key])
    for key in FOLDER_KEYED_KEYS:
        try:
            folders = json.loads(out[key]) if isinstance(out.get(key), str) else None
        except json.JSONDecodeError:
            continue
        if isinstance(folders, dict):
            out[key] = json.dumps({public_name(str(k)): v for k, v in folders.items()})
    return out


def addnet_hash(data: bytes) -> str:
    """A1111's / sd-scripts' `sshs_model_hash` of the bytes of a `.safetensors` file: the hex sha256 of what
    follows the 8-byte header length and the JSON header (so it does not depend on the metadata)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_len :]).hexdigest()


def addnet_hash_file(path: str | os.PathLike) -> str:
    """`addnet_hash` of a file on disk, read in 1 MiB chunks (hex sha256 string).

    Raises:
        OSError: the file cannot be read.
    """
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def kohya_metadata(
    facts: Mapping[str, Any],
    *,
    base_model_version: str | None = None,
    output_name: str | None = None,
    training_info: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """The `__metadata__` A1111 and kohya users expect (ss_*, modelspec.*; docs/kohya-format.md section 8).

    Args:
        facts: the facts of `build_kohya_state_dict` (`arch`, `adapters`).
        base_model_version: `ss_base_model_version` (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0); default: from
            `arch`, or SDXL when there are `lora_te2_` modules.
        output_name: `ss_output_name` and `modelspec.title`.
        training_info: short names (`TRAINING_INFO_KEYS`; `resolution` an int or `(width, height)` in pixels)
            or `ss_*` / `modelspec.*` keys; None values are skipped.
        metadata: user keys, added last (may override).
        timestamp: seconds since the epoch for `modelspec.date` (default: now).

    Returns:
        key -> string value (dicts/lists as JSON), local paths reduced to names (`public_metadata`).
        `ss_network_dim`/`ss_network_alpha` are the most common
        rank/alpha of the Linear (and 1x1) modules, `conv_dim`/`conv_alpha` of the kxk convs; the network module
        is the kind's own sd-scripts module when it has one (`Adapter.kohya_network_module`), else
        `lycoris.kohya` with the kind's `algo`.

    Raises:
        ValueError: an unknown `training_info` key.
    """
    adapters: dict[str, tuple[Adapter, nn.Module]] = facts["adapters"]
    if base_model_version is None:
        if facts.get("arch") is not None:
            base_model_version = naming.BASE_MODEL_VERSIONS[facts["arch"]]
        elif any(n.startswith(naming.TE2_PREFIX + "_") for n in adapters):
            base_model_version = naming.BASE_MODEL_VERSIONS["sdxl"]
    timestamp = time.time() if timestamp is None else timestamp
    out: dict[str, Any] = {
        **_network_fields(adapters),
        "ss_v2": str(bool(base_model_version and base_model_version.startswith("sd_v2"))),
        "ss_output_name": output_name or "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": output_name or f"LoRA@{int(timestamp)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if base_model_version == "sd_v2_v" else "epsilon",
    }
    if base_model_version:
        out["ss_base_model_version"] = base_model_version
        out.update(_modelspec_architecture(base_model_version))
    out.update(_training_fields(training_info or {}))
    for key, value in (metadata or {}).items():
        out[key] = value
    return public_metadata({k: v if isinstance(v, str) else json.dumps(v) for k, v in out.items()})


def _network_fields(adapters: Mapping[str, tuple[Adapter, nn.Module]]) -> dict[str, str]:
    """`ss_network_module`, `ss_network_dim`, `ss_network_alpha`, `ss_network_args` of the adapters, from what
    their kinds declare (`kohya_network_module`, `lycoris_algo`)."""
    kinds = Counter(type(a) for a, _ in adapters.values())
    main_kind = kinds.most_common(1)[0][0]
    linear = [a for a, layer in adapters.values() if LayerSpec.from_module(layer).kernel_numel == 1]
    conv = [a for a, layer in adapters.values() if LayerSpec.from_module(layer).kernel_numel > 1]
    uses_cp = any(getattr(a, "is_cp", False) for a, _ in adapters.values())
    dims = linear or conv
    own_modules = {cls.kohya_network_module for cls in kinds}
    if len(own_modules) == 1 and None not in own_modules and not uses_cp:
        network_module = own_modules.pop()  # sd-scripts trains this kind itself (networks.lora)
        args: dict[str, str] = {}
    else:
        network_module = "lycoris.kohya"
        args = {"algo": main_kind.lycoris_algo, "use_tucker": str(uses_cp)}
    if conv:
        args["conv_dim"] = str(most_common([a.r for a in conv]))
        args["conv_alpha"] = format_number(most_common([a.alpha for a in conv]))
    rank_dropout = most_common([a.rank_dropout for a, _ in adapters.values()])
    module_dropout = most_common([a.module_dropout for a, _ in adapters.values()])
    if rank_dropout or module_dropout or network_module == "lycoris.kohya":
        args["rank_dropout"] = format_number(rank_dropout)
        args["module_dropout"] = format_number(module_dropout)
    return {
        "ss_network_module": network_module,
        "ss_network_dim": str(most_common([a.r for a in dims])),
        "ss_network_alpha": format_number(most_common([a.alpha for a in dims])),
        "ss_network_args": json.dumps(args),
    }


def _modelspec_architecture(base_model_version: str) -> dict[str, str]:
    """`modelspec.architecture`, `.implementation` and `.resolution` (pixels) for a base model version."""
    v_pred = base_model_version == "sd_v2_v"
    if base_model_version.startswith("sdxl"):
        spec_arch, impl, reso = (
            "stable-diffusion-xl-v1-base",
            "https://github.com/Stability-AI/generative-models",
            1024,
        )
    elif base_model_version.startswith("sd_v2"):
        spec_arch = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
        impl, reso = "diffusers", 768 if v_pred else 512
    else:
        spec_arch, impl, reso = "stable-diffusion-v1", "diffusers", 512
    return {
        "modelspec.architecture": spec_arch + "/lora",
        "modelspec.implementation": impl,
        "modelspec.resolution": f"{reso}x{reso}",
    }


def _training_fields(training_info: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata keys `training_info` fills (see `kohya_metadata`); ValueError for an unknown key."""
    out: dict[str, Any] = {}
    for key, value in training_info.items():
        if value is None:
            continue
        target = TRAINING_INFO_KEYS.get(key, key if key.startswith(("ss_", "modelspec.")) else None)
        if target is None:
            raise ValueError(
                f"Unknown training_info key {key!r}; use one of {sorted(TRAINING_INFO_KEYS)} or an 'ss_*' key."
            )
        if key == "resolution":
            reso = (value, value) if isinstance(value, int) else tuple(value)
            out["ss_resolution"] = f"({reso[0]}, {reso[1]})"
            out["modelspec.resolution"] = f"{reso[0]}x{reso[1]}"
            continue
        if key == "prediction_type":
            value = {"v_prediction": "v"}.get(value, value)
        out[target] = value
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Just the `__metadata__` of a `.safetensors` file (key -> string; no tensors are read; {} without one).

    Raises:
        OSError: the file cannot be read (`FileNotFoundError` when it does not exist).
        struct.error, json.JSONDecodeError: the file is not a `.safetensors` file.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.load(io.BytesIO(f.read(header_len)))
    return dict(header.get("__metadata__", {}))
