"""Kohya / LyCORIS `.safetensors` adapter files: write (`save_kohya`), read (`read_kohya`), load (`load_kohya`).

The reference for names, layouts, scales and metadata is the shared docs' kohya-format.md. In short: one key per
tensor, `<module name>.<tensor name>`; LoHa `hada_w1_a ... (hada_t1/t2 for CP)`, LoRA/LoCon `lora_down.weight`,
`lora_up.weight` (`lora_mid.weight` for Tucker), LoKr `lokr_*`; a 0-dim `alpha` per module; scale `alpha / r`.
Every problem with a file or a model is collected and raised as one `KohyaFormatError` before anything changes.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from ..adapters import Adapter, LayerSpec, LoHaAdapter, LoRAAdapter
from ..adapters.lokr import LoKrAdapter
from ..functional import lokr as lokr_fn
from ..functional import lora as lora_fn
from ..functional.loha import delta_weight_reference as loha_delta
from ..layers import AdapterLayer
from ..model import LoHaModel, adapter_names, add_adapter
from . import naming

LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOHA_CP_TENSORS = ("hada_t1", "hada_t2")
LORA_TENSORS = ("lora_down.weight", "lora_up.weight")
LORA_CP_TENSORS = ("lora_mid.weight",)
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# Kohya LoRA names <-> our (PEFT) adapter tensor names.
KOHYA_TO_PEFT_LORA = {
    "lora_down.weight": "lora_A.weight",
    "lora_up.weight": "lora_B.weight",
    "lora_mid.weight": "lora_mid.weight",
}
PEFT_TO_KOHYA_LORA = {v: k for k, v in KOHYA_TO_PEFT_LORA.items()}

SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SHOWN = 5  # problems listed per category in an error message

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


class KohyaFormatError(ValueError):
    """A Kohya file, or a model/adapter to be written as one, has problems; the message lists all of them."""


# -- reading ----------------------------------------------------------------------------------------


@dataclass
class KohyaModule:
    """One module of a Kohya/LyCORIS file: its kind, factor tensors (file names, no alpha) and alpha.

    `problems` lists what makes the module unusable (unknown tensors, DoRA, a malformed alpha, ...)."""

    name: str
    kind: str  # "loha" | "lora" | "lokr" | "unknown"
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """`lora_unet`, `lora_te`, `lora_te1`, `lora_te2`, `lycoris` or the text before the first `_`."""
        for prefix in (
            naming.TE1_PREFIX,
            naming.TE2_PREFIX,
            naming.TE_PREFIX,
            naming.UNET_PREFIX,
            naming.LYCORIS_PREFIX,
        ):
            if self.name.startswith(prefix + "_"):
                return prefix
        return self.name.split("_", 1)[0]

    @property
    def rank(self) -> int | None:
        """The rank the loaders divide alpha by (`hada_w1_b.shape[0]`, `lora_down.shape[0]`, LoKr's rule)."""
        if self.kind == "loha" and "hada_w1_b" in self.tensors:
            return int(self.tensors["hada_w1_b"].shape[0])
        if self.kind == "lora" and "lora_down.weight" in self.tensors:
            return int(self.tensors["lora_down.weight"].shape[0])
        if self.kind == "lokr":
            try:
                return lokr_fn.lokr_rank(self.tensors)
            except ValueError:
                return None
        return None

    @property
    def is_cp(self) -> bool:
        """CP/Tucker form (`hada_t1`, `lora_mid`, `lokr_t2`)."""
        return any(k in self.tensors for k in ("hada_t1", "lora_mid.weight", "lokr_t2"))

    @property
    def scale(self) -> float:
        """The factor ComfyUI and A1111 multiply the rebuilt product by: `alpha / rank`, 1.0 without alpha
        (and for LoKr without a factorized half)."""
        if self.kind == "lokr":
            return lokr_fn.lokr_scale(self.alpha, self.rank)
        if self.alpha is None or not self.rank:
            return 1.0
        return self.alpha / self.rank

    @property
    def dtype(self) -> torch.dtype | None:
        return next(iter(self.tensors.values())).dtype if self.tensors else None

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def delta_weight(self, weight_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """ΔW as the loaders rebuild it from the file (fp32, `scale` applied, multiplier 1), shaped `weight_shape`."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "loha":
            delta = loha_delta(
                t["hada_w1_a"],
                t["hada_w1_b"],
                t["hada_w2_a"],
                t["hada_w2_b"],
                t.get("hada_t1"),
                t.get("hada_t2"),
            )
            return (delta * self.scale).reshape(weight_shape)
        if self.kind == "lora":
            return lora_fn.delta_weight(
                t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight"), weight_shape, self.scale
            )
        if self.kind == "lokr":
            return lokr_fn.delta_weight(t, weight_shape, self.scale)
        raise KohyaFormatError(f"{self.name}: cannot rebuild a delta for an unknown module kind")

    def to_adapter(self, spec: LayerSpec) -> Adapter:
        """An fp32 adapter of our kind holding this module's factors for a layer of geometry `spec`.

        Missing alpha gives scale 1 (alpha = rank), as ComfyUI and A1111 do. Shapes that do not fit raise a
        `ValueError` naming them (LyCORIS would crash, ComfyUI and A1111 would skip or mis-apply the module)."""
        if self.problems:
            raise ValueError("; ".join(self.problems))
        rank = self.rank
        if self.kind == "lokr":
            return LoKrAdapter.from_tensors(spec, self.tensors, self.alpha)
        alpha = self.alpha if self.alpha is not None else float(rank)
        if self.kind == "loha":
            adapter = LoHaAdapter(spec, rank, alpha, use_effective_conv2d=self.is_cp, init_weights=False)
            tensors = self.tensors
        elif self.kind == "lora":
            adapter = LoRAAdapter(spec, rank, alpha, use_effective_conv2d=self.is_cp, init_weights=False)
            own = adapter.state_tensors()
            tensors = {
                KOHYA_TO_PEFT_LORA[k]: _fit_unit_dims(v, tuple(own[KOHYA_TO_PEFT_LORA[k]].shape))
                for k, v in self.tensors.items()
            }
        else:
            raise ValueError(f"unknown module kind {self.kind!r}")
        if self.is_cp and not getattr(adapter, "is_cp", False):
            raise ValueError(f"CP/Tucker tensors given for a {spec.op} layer without a spatial kernel > 1")
        adapter.load_state_tensors(tensors)
        return adapter


def _fit_unit_dims(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Reshape when only trailing unit dims differ (a 2-D `lora_down` on a 1x1 conv, as A1111 and ComfyUI accept)."""

    def core(s: tuple[int, ...]) -> tuple[int, ...]:
        while len(s) > 2 and s[-1] == 1:
            s = s[:-1]
        return s

    if tuple(tensor.shape) != shape and core(tuple(tensor.shape)) == core(shape):
        return tensor.reshape(shape)
    return tensor


@dataclass
class KohyaFile:
    """A parsed Kohya/LyCORIS file: `modules` by Kohya module name, the string `metadata`, file-level problems."""

    modules: dict[str, KohyaModule]
    metadata: dict[str, str]
    problems: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def all_problems(self) -> list[str]:
        return self.problems + [f"{m.name}: {p}" for m in self.modules.values() for p in m.problems]

    @property
    def dtypes(self) -> list[str]:
        return sorted(
            {str(t.dtype).replace("torch.", "") for m in self.modules.values() for t in m.tensors.values()}
        )

    @property
    def kinds(self) -> dict[str, int]:
        return dict(Counter(m.kind for m in self.modules.values()))

    @property
    def prefixes(self) -> dict[str, int]:
        return dict(Counter(m.prefix for m in self.modules.values()))

    def guess_architecture(self) -> str | None:
        """The base model the file is for: "sdxl", "sd2" or "sd1" from `ss_base_model_version`, else from the
        names (te2, SDXL-only blocks, or SD1-only blocks); None when nothing tells."""
        version = self.metadata.get("ss_base_model_version", "")
        if version.startswith("sdxl"):
            return "sdxl"
        if version.startswith("sd_v2") or self.metadata.get("ss_v2") == "True":
            return "sd2"
        if version.startswith("sd_v1"):
            return "sd1"
        names = " ".join(self.modules)
        if naming.TE2_PREFIX + "_" in names or _SDXL_ONLY.search(names):
            return "sdxl"
        if _SD1_ONLY.search(names) or naming.TE_PREFIX + "_text" in names:
            return "sd1"
        return None


# Blocks only one of the two UNet layouts has (SDXL: 3 levels, no attention at level 0, up to 10 transformer
# blocks per attention and the text-time embedding; SD1/SD2: 4 levels, attention at level 0, one block each).
_SDXL_ONLY = re.compile(r"transformer_blocks_[1-9]|label_emb|add_embedding")
_SD1_ONLY = re.compile(
    r"(down|up)_blocks_3_|down_blocks_0_attentions|up_blocks_3_attentions|input_blocks_(1|2|10|11)_1_|"
    r"input_blocks_1[01]_|output_blocks_(9|10|11)_"
)


def parse_kohya_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> KohyaFile:
    """Group a Kohya/LyCORIS state dict into modules (`<module>.<tensor>` split at the first dot, as A1111 does)
    and classify each one; problems are recorded, not raised (see `KohyaFile.all_problems`)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in state_dict.items():
        module, dot, tensor_name = key.partition(".")
        if not dot:
            problems.append(f"key {key!r} has no '<module>.<tensor>' form")
            continue
        grouped.setdefault(module, {})[tensor_name] = tensor
    modules = {name: _classify(name, tensors) for name, tensors in grouped.items()}
    return KohyaFile(modules=modules, metadata=dict(metadata or {}), problems=problems)


def _classify(name: str, tensors: dict[str, torch.Tensor]) -> KohyaModule:
    tensors = dict(tensors)
    problems = []
    alpha = None
    if "alpha" in tensors:
        alpha_tensor = tensors.pop("alpha")
        if alpha_tensor.numel() != 1:
            problems.append(
                f"alpha must be a 0-dim or 1-element tensor, got shape {tuple(alpha_tensor.shape)}"
            )
        else:
            alpha = float(alpha_tensor.float().item())
    if "dora_scale" in tensors:
        problems.append(
            "has dora_scale (DoRA/DoHa weight decomposition), which loha_diffusion does not apply; "
            "ignoring it would give a different delta than ComfyUI/A1111. Re-export the adapter without DoRA."
        )
        tensors.pop("dora_scale")
    if "hada_w1_a" in tensors:
        kind, required, optional = "loha", LOHA_TENSORS, LOHA_CP_TENSORS
    elif "lora_down.weight" in tensors or "lora_up.weight" in tensors:
        kind, required, optional = "lora", LORA_TENSORS, LORA_CP_TENSORS
    elif "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        kind, required, optional = "lokr", (), LOKR_TENSORS
    else:
        kind, required, optional = "unknown", (), ()
        problems.append(
            f"no LoHa, LoRA or LoKr tensors (has {sorted(tensors)}); only those kinds are supported"
        )
    if kind != "unknown":
        missing = [k for k in required if k not in tensors]
        extra = sorted(set(tensors) - set(required) - set(optional))
        if missing:
            problems.append(f"{kind} module is missing {missing}")
        if extra:
            problems.append(f"unsupported tensors {extra} in a {kind} module")
        if kind == "loha":
            present = [k for k in LOHA_CP_TENSORS if k in tensors]
            if len(present) == 1:
                problems.append(f"CP LoHa needs both hada_t1 and hada_t2, has only {present}")
            if not missing and tensors["hada_w1_b"].shape[0] != tensors["hada_w2_b"].shape[0]:
                problems.append(
                    f"hada_w1_b rank {tensors['hada_w1_b'].shape[0]} differs from hada_w2_b rank "
                    f"{tensors['hada_w2_b'].shape[0]} (loaders scale by the w1 rank)"
                )
        if kind == "lokr":
            try:
                lokr_fn.lokr_rank(tensors)
            except ValueError as err:
                problems.append(str(err))
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        problems.append(
            f"mixes dtypes {sorted(str(d) for d in dtypes)} (A1111 multiplies factors in their stored dtype)"
        )
    return KohyaModule(name=name, kind=kind, tensors=tensors, alpha=alpha, problems=problems)


def read_kohya(path: str | os.PathLike) -> KohyaFile:
    """Read a Kohya/LyCORIS `.safetensors` file into per-module records plus its metadata (nothing is applied)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No Kohya/LyCORIS adapter file at {path}.")
    state_dict = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                state_dict[key] = f.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise KohyaFormatError(f"{path} is not a readable .safetensors file: {err}") from None
    parsed = parse_kohya_state_dict(state_dict, metadata)
    parsed.path = path
    return parsed


# -- model <-> names --------------------------------------------------------------------------------


def _unwrap(model: nn.Module | None) -> nn.Module | None:
    """Accept a `LoHaModel`-style wrapper (`.model`) as well as the bare model."""
    return model.model if isinstance(model, LoHaModel) else model


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1d/Conv2d of `model` by its original path (an `AdapterLayer` counts as its base layer)."""
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdapterLayer):
                found[path] = child.base_layer
            elif isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                found[path] = child
            else:
                walk(child, path)

    walk(model, "")
    return found


def _unet_layout(unet: nn.Module) -> naming.UNetLayout | None:
    try:
        return naming.UNetLayout.from_config(unet)
    except (KeyError, TypeError):
        return None


def _te_prefixes(
    text_encoder: nn.Module | None, text_encoder_2: nn.Module | None, arch: str | None
) -> tuple[str, str]:
    """Export prefixes for (text_encoder, text_encoder_2): sd-scripts' rule, and te1/te2 for any SDXL set."""
    if text_encoder_2 is not None or arch == "sdxl":
        return naming.TE1_PREFIX, naming.TE2_PREFIX
    return naming.TE_PREFIX, naming.TE2_PREFIX


@dataclass
class ModuleTarget:
    """Where a Kohya module name lands: the component ("unet", "text_encoder", "text_encoder_2"), the module
    path in it, the Linear/Conv layer, and the naming style the name uses ("diffusers", "ldm", "lycoris" for
    UNet names; "te" for portable `text_model_` names, "te_raw" for raw module paths)."""

    component: str
    path: str
    layer: nn.Module
    style: str


def kohya_name_map(
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> dict[str, ModuleTarget]:
    """Every Kohya module name a file may use for a layer of the given models -> that layer.

    UNet: `lora_unet_` + diffusers path, `lora_unet_` + LDM path, `lycoris_` + diffusers path. Text encoders:
    `lora_te_`/`lora_te1_` (first) and `lora_te2_` (second; with two encoders `lora_te_` also means the first,
    as in ComfyUI), each with the portable `text_model_...` name and the raw module path."""
    unet, text_encoder, text_encoder_2 = _unwrap(unet), _unwrap(text_encoder), _unwrap(text_encoder_2)
    names: dict[str, ModuleTarget] = {}
    if unet is not None:
        layout = _unet_layout(unet)
        for path, layer in layer_modules(unet).items():
            candidates = naming.unet_name_candidates(path, layout)
            for name, style in zip(candidates, ("diffusers", "lycoris", "ldm")):
                names[name] = ModuleTarget("unet", path, layer, style)
    two = text_encoder_2 is not None
    te_sets = [
        (
            "text_encoder",
            text_encoder,
            (naming.TE1_PREFIX, naming.TE_PREFIX) if two else (naming.TE_PREFIX, naming.TE1_PREFIX),
        ),
        ("text_encoder_2", text_encoder_2, (naming.TE2_PREFIX,)),
    ]
    for component, model, prefixes in te_sets:
        if model is None:
            continue
        for path, layer in layer_modules(model).items():
            for prefix in prefixes:
                names[naming.text_encoder_kohya_name(path, prefix)] = ModuleTarget(
                    component, path, layer, "te"
                )
                names.setdefault(
                    naming.to_kohya(prefix, path), ModuleTarget(component, path, layer, "te_raw")
                )
    return names


def _format_problems(title: str, groups: list[tuple[str, list[str]]], hints: list[str] = ()) -> str:
    """One message: the title, hints, then per category its count and first few items."""
    lines = [title]
    lines += [f"  hint: {h}" for h in hints]
    for label, items in groups:
        if not items:
            continue
        lines.append(f"  {len(items)} {label}:")
        lines += [f"    - {item}" for item in items[:_SHOWN]]
        if len(items) > _SHOWN:
            lines.append(f"    ... and {len(items) - _SHOWN} more")
    return "\n".join(lines)


def _partial_attention(names: list[str], prefix: str) -> list[str]:
    """Text-encoder layers under `prefix` that have some but not all of q/k/v/out_proj (A1111's OpenCLIP
    MultiheadAttention applies them only when all four are there)."""
    per_layer: dict[int, set[str]] = {}
    for name in names:
        if not name.startswith(prefix + "_"):
            continue
        parsed = naming.te_sublayer(name)
        if parsed and parsed[1] in naming.TE_ATTENTION_SUBLAYERS:
            per_layer.setdefault(parsed[0], set()).add(parsed[1])
    return [
        f"{prefix} layer {i}: has {sorted(s)}, missing {sorted(set(naming.TE_ATTENTION_SUBLAYERS) - s)}"
        for i, s in sorted(per_layer.items())
        if len(s) != len(naming.TE_ATTENTION_SUBLAYERS)
    ]


# -- loading ----------------------------------------------------------------------------------------


def load_kohya(
    path: str | os.PathLike | KohyaFile,
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    scale: float = 1.0,
) -> str:
    """Load a Kohya/LyCORIS LoHa, LoRA/LoCon or LoKr file onto diffusers/transformers models as adapter
    `adapter_name` (user scale `scale`) and return the adapter name.

    Accepts SD1.x/SD2.x and SDXL files with diffusers, LDM (`input_blocks...`) or `lycoris_` UNet names, `lora_te`,
    `lora_te1`, `lora_te2` text-encoder names, fp32/fp16/bf16. Every key must map to a module of the given models
    with fitting shapes; otherwise one `KohyaFormatError` lists the problems and nothing is changed."""
    kfile = path if isinstance(path, KohyaFile) else read_kohya(path)
    source = str(kfile.path) if kfile.path is not None else "the Kohya state dict"
    unet, text_encoder, text_encoder_2 = _unwrap(unet), _unwrap(text_encoder), _unwrap(text_encoder_2)
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    given = {k: m for k, m in models.items() if m is not None}
    if not given:
        raise ValueError("load_kohya needs at least one of unet=, text_encoder=, text_encoder_2=.")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
        raise ValueError(f"adapter_name {adapter_name!r} may only contain letters, digits, '_' and '-'.")
    taken = [k for k, m in given.items() if adapter_name in adapter_names(m)]
    if taken:
        raise ValueError(
            f"Adapter name {adapter_name!r} is already used on {taken}; pick another adapter_name."
        )
    if not kfile.modules and not kfile.problems:
        raise KohyaFormatError(f"{source} holds no adapter modules (no '<module>.<tensor>' keys).")

    names = kohya_name_map(unet, text_encoder, text_encoder_2)
    bad_modules = [f"{m.name}: {p}" for m in kfile.modules.values() for p in m.problems]
    unmatched, shape_errors, duplicates = [], [], []
    built: dict[tuple[str, str], Adapter] = {}
    first_name: dict[tuple[str, str], str] = {}
    for name, module in kfile.modules.items():
        if module.problems:
            continue
        target = names.get(name)
        if target is None:
            unmatched.append(name)
            continue
        key = (target.component, target.path)
        if key in built:
            duplicates.append(f"{name} and {first_name[key]} both map to {target.component} {target.path}")
            continue
        try:
            built[key] = module.to_adapter(LayerSpec.from_module(target.layer))
            first_name[key] = name
        except (ValueError, TypeError) as err:
            shape_errors.append(
                f"{name} -> {target.component}.{target.path} {tuple(target.layer.weight.shape)}: {err}"
            )

    if kfile.problems or bad_modules or unmatched or shape_errors or duplicates:
        hints = _mismatch_hints(kfile, unet, text_encoder, text_encoder_2, unmatched)
        raise KohyaFormatError(
            _format_problems(
                f"Cannot load {source} ({len(kfile.modules)} modules) onto "
                f"{', '.join(f'{k} ({type(m).__name__})' for k, m in given.items())}; nothing was changed.",
                [
                    ("file problems", kfile.problems),
                    ("unusable modules", bad_modules),
                    ("keys that match no module of the given models", unmatched),
                    ("tensors whose shapes do not fit their module", shape_errors),
                    ("modules given twice", duplicates),
                ],
                hints,
            )
        )

    _warn_on_load(kfile, names, unet)
    for (component, path_), adapter in built.items():
        adapter.scale = float(scale)
        add_adapter(given[component], path_, adapter_name, adapter)
    return adapter_name


def _mismatch_hints(
    kfile: KohyaFile,
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    text_encoder_2: nn.Module | None,
    unmatched: list[str],
) -> list[str]:
    hints = []
    file_arch = kfile.guess_architecture()
    model_arch = naming.detect_architecture(unet) if unet is not None else None
    if model_arch is None and text_encoder_2 is not None:
        model_arch = "sdxl"
    if file_arch and model_arch and (file_arch == "sdxl") != (model_arch == "sdxl"):
        hints.append(f"the file is for {file_arch.upper()} but the UNet is {model_arch.upper()}-shaped")
    prefixes = Counter(kfile.modules[n].prefix for n in unmatched)
    missing_component = {
        naming.UNET_PREFIX: ("unet", unet),
        naming.LYCORIS_PREFIX: ("unet", unet),
        naming.TE_PREFIX: ("text_encoder", text_encoder),
        naming.TE1_PREFIX: ("text_encoder", text_encoder),
        naming.TE2_PREFIX: ("text_encoder_2", text_encoder_2),
    }
    for prefix, count in prefixes.items():
        component, model = missing_component.get(prefix, (None, None))
        if component and model is None:
            hints.append(f"{count} {prefix}_ modules need {component}=; pass it to load them")
    return hints


def _warn_on_load(kfile: KohyaFile, names: dict[str, ModuleTarget], unet: nn.Module | None) -> None:
    """Report what loads here but would not load (the same way) in ComfyUI/A1111 (kohya-format.md section 9)."""
    no_alpha = [n for n, m in kfile.modules.items() if m.alpha is None and m.kind != "lokr"]
    if no_alpha:
        warnings.warn(
            f"{len(no_alpha)} modules have no alpha (e.g. {no_alpha[0]}); using scale 1.0 as ComfyUI and A1111 do "
            "(LyCORIS' own loader would crash on this file).",
            UserWarning,
            stacklevel=3,
        )
    zero_alpha = [n for n, m in kfile.modules.items() if m.alpha == 0]
    if zero_alpha:
        warnings.warn(
            f"{len(zero_alpha)} modules have alpha 0 (e.g. {zero_alpha[0]}): their delta is zero here and in "
            "ComfyUI/A1111, while LyCORIS treats alpha 0 as alpha = rank.",
            UserWarning,
            stacklevel=3,
        )
    raw_te = [n for n in kfile.modules if names[n].style == "te_raw"]
    if raw_te:
        warnings.warn(
            f"{len(raw_te)} text-encoder modules use names without 'text_model_' (e.g. {raw_te[0]}), as LyCORIS/PEFT "
            "write them with transformers 5; ComfyUI and A1111 ignore these keys. Re-export with save_kohya.",
            UserWarning,
            stacklevel=3,
        )
    module_names = list(kfile.modules)
    partial = _partial_attention(module_names, naming.TE2_PREFIX)
    if partial:
        warnings.warn(
            f"te2 attention with only some of q/k/v/out_proj ({partial[0]}; {len(partial)} layers): applied here "
            "per projection, but A1111 applies none of them for such layers.",
            UserWarning,
            stacklevel=3,
        )
    if unet is not None and naming.detect_architecture(unet) == "sdxl":
        a1111_drops = [
            n
            for n in module_names
            if names[n].style == "diffusers"
            and ("up_blocks_0_upsamplers_0_conv" in n or "add_embedding" in n)
        ]
        if a1111_drops:
            warnings.warn(
                f"SDXL file with diffusers UNet names: A1111 silently drops {a1111_drops}; SDXL files should use "
                "LDM names (save_kohya writes them).",
                UserWarning,
                stacklevel=3,
            )


# -- saving -----------------------------------------------------------------------------------------


def _adapters_of(model: nn.Module | None, adapter_name: str) -> dict[str, tuple[Adapter, nn.Module]]:
    if model is None:
        return {}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            out[name] = (module.adapters[adapter_name], module.base_layer)
    return out


def _file_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's factors under Kohya names (LoRA: `lora_down.weight`, ...), detached."""
    tensors = {k: v.detach() for k, v in adapter.state_tensors().items()}
    if adapter.kind == "lora":
        tensors = {PEFT_TO_KOHYA_LORA[k]: v for k, v in tensors.items()}
    return tensors


def build_kohya_state_dict(
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float16,
    unet_naming: str = "auto",
    base_model_version: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The Kohya tensors of adapter `adapter_name` (one dtype, contiguous, CPU) and facts for the metadata.

    The architecture comes from the UNet, else from `base_model_version` (so a text-encoder-only SDXL file
    still gets `lora_te1_`). Raises one `KohyaFormatError` for everything a loader would silently mis-apply
    (see `save_kohya`)."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, not {dtype}.")
    unet, text_encoder, text_encoder_2 = _unwrap(unet), _unwrap(text_encoder), _unwrap(text_encoder_2)
    arch = naming.detect_architecture(unet) if unet is not None else None
    if arch is None and unet is None and base_model_version:
        arch = (
            "sdxl"
            if base_model_version.startswith("sdxl")
            else "sd2"
            if base_model_version.startswith("sd_v2")
            else "sd1"
        )
    parts = {
        "unet": _adapters_of(unet, adapter_name),
        "text_encoder": _adapters_of(text_encoder, adapter_name),
        "text_encoder_2": _adapters_of(text_encoder_2, adapter_name),
    }
    if not any(parts.values()):
        given = [
            k
            for k, m in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
            if m is not None
        ]
        raise KohyaFormatError(f"No adapter named {adapter_name!r} on {given or 'any model (none given)'}.")

    problems: dict[str, list[str]] = {"names": [], "naming": [], "attention": [], "shapes": []}
    hints: list[str] = []
    names: dict[str, tuple[Adapter, nn.Module]] = {}
    naming_style = None
    if parts["unet"]:
        naming_style = unet_naming if unet_naming != "auto" else naming.default_unet_naming(arch)
        if naming_style is None:
            problems["naming"].append(
                f"the UNet is not SD1/SD2/SDXL-shaped (blocks {list(unet.config.get('down_block_types', []))}, "
                f"layers_per_block {unet.config.get('layers_per_block')}), so there is no standard Kohya naming for it"
            )
            hints.append(
                "pass unet_naming='diffusers' to write diffusers module names (ComfyUI and LyCORIS map them by the "
                "model config; A1111 assumes the SD layout and may apply them to wrong layers), or unet_naming='ldm'"
            )
        elif naming_style not in ("diffusers", "ldm"):
            raise ValueError(f"unet_naming must be 'auto', 'diffusers' or 'ldm', not {unet_naming!r}.")
        else:
            if arch is None and naming_style == "diffusers":
                warnings.warn(
                    "Writing diffusers names for a UNet that is not SD1/SD2/SDXL-shaped: ComfyUI and LyCORIS load "
                    "them, A1111 may apply them to the wrong layers.",
                    UserWarning,
                    stacklevel=3,
                )
            if arch == "sdxl" and naming_style == "diffusers":
                warnings.warn(
                    "Writing diffusers names for an SDXL UNet: A1111 drops up_blocks_0_upsamplers_0_conv and "
                    "add_embedding keys of such files; the default (LDM names) loads everywhere.",
                    UserWarning,
                    stacklevel=3,
                )
            layout = _unet_layout(unet)
            for path, item in parts["unet"].items():
                try:
                    names[naming.unet_kohya_name(path, naming_style, layout)] = item
                except ValueError as err:
                    problems["names"].append(str(err))
    te_prefix, te2_prefix = _te_prefixes(text_encoder, text_encoder_2, arch)
    for component, prefix in (("text_encoder", te_prefix), ("text_encoder_2", te2_prefix)):
        for path, item in parts[component].items():
            name = naming.text_encoder_kohya_name(path, prefix)
            if name in names:
                problems["names"].append(f"{component}.{path} and another module both get the name {name}")
            names[name] = item
    nonportable = [n for n in names if not n.startswith(naming.UNET_PREFIX) and naming.te_sublayer(n) is None]
    if nonportable:
        warnings.warn(
            f"{len(nonportable)} text-encoder modules are not among q/k/v/out_proj, fc1, fc2 of the encoder layers "
            f"(e.g. {nonportable[0]}); LyCORIS loads them, ComfyUI and A1111 ignore them.",
            UserWarning,
            stacklevel=3,
        )
    # A1111 applies OpenCLIP attention (SDXL te2, SD2's text encoder) only with all of q, k, v and out_proj.
    problems["attention"] += _partial_attention(list(names), te2_prefix)
    if arch == "sd2":
        problems["attention"] += _partial_attention(list(names), te_prefix)

    state: dict[str, torch.Tensor] = {}
    for name, (adapter, layer) in names.items():
        tensors = _file_tensors(adapter)
        record = _classify(name, tensors)
        record.alpha = adapter.alpha
        # Check the file record rebuilds on this layer exactly as loaders will read it (rank, CP layout, shapes).
        try:
            record.to_adapter(LayerSpec.from_module(layer))
        except ValueError as err:
            problems["shapes"].append(f"{name}: {err}")
        for tensor_name, tensor in tensors.items():
            state[f"{name}.{tensor_name}"] = tensor.to(device="cpu", dtype=dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(adapter.alpha), dtype=dtype)

    if any(problems.values()):
        raise KohyaFormatError(
            _format_problems(
                f"Refusing to write adapter {adapter_name!r} as a Kohya file: loaders would reject or mis-apply it.",
                [
                    ("UNet naming problems", problems["naming"]),
                    ("modules without a Kohya name", problems["names"]),
                    (
                        "text-encoder layers with only some of q/k/v/out_proj (A1111 would apply none; "
                        "adapt all four or none)",
                        problems["attention"],
                    ),
                    ("modules whose tensors loaders would read differently", problems["shapes"]),
                ],
                hints,
            )
        )
    facts = {"arch": arch, "unet_naming": naming_style, "adapters": names}
    return state, facts


def addnet_hash(data: bytes) -> str:
    """A1111's / sd-scripts' `sshs_model_hash`: sha256 of the safetensors bytes after the 8-byte length and
    the JSON header (so it does not depend on the metadata)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_len :]).hexdigest()


def addnet_hash_file(path: str | os.PathLike) -> str:
    """`addnet_hash` of a file on disk, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0] if values else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def kohya_metadata(
    facts: Mapping[str, Any],
    *,
    base_model_version: str | None = None,
    output_name: str | None = None,
    training_info: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """The `__metadata__` A1111 and kohya users expect (ss_*, modelspec.*), from the facts of
    `build_kohya_state_dict`, plus `training_info` (short names, see `TRAINING_INFO_KEYS`, or `ss_*` keys) and
    user `metadata` (added last, may override). All values become strings (dicts/lists as JSON)."""
    adapters: dict[str, tuple[Adapter, nn.Module]] = facts["adapters"]
    arch = facts.get("arch")
    kinds = Counter(a.kind for a, _ in adapters.values())
    main_kind = kinds.most_common(1)[0][0]
    linear = [a for a, layer in adapters.values() if LayerSpec.from_module(layer).kernel_numel == 1]
    conv = [a for a, layer in adapters.values() if LayerSpec.from_module(layer).kernel_numel > 1]
    uses_cp = any(getattr(a, "is_cp", False) for a, _ in adapters.values())
    dims = linear or conv
    network_dim, network_alpha = _most_common([a.r for a in dims]), _most_common([a.alpha for a in dims])

    if base_model_version is None:
        if arch is not None:
            base_model_version = naming.BASE_MODEL_VERSIONS[arch]
        elif any(n.startswith(naming.TE2_PREFIX + "_") for n in adapters):
            base_model_version = naming.BASE_MODEL_VERSIONS["sdxl"]
    v2 = bool(base_model_version and base_model_version.startswith("sd_v2"))
    sdxl = bool(base_model_version and base_model_version.startswith("sdxl"))
    v_pred = base_model_version == "sd_v2_v"

    if set(kinds) == {"lora"} and not uses_cp:
        network_module = "networks.lora"
        args: dict[str, str] = {}
    else:
        network_module = "lycoris.kohya"
        algo = {"loha": "loha", "lokr": "lokr", "lora": "locon"}[main_kind]
        args = {"algo": algo, "use_tucker": str(uses_cp)}
    if conv:
        args["conv_dim"] = str(_most_common([a.r for a in conv]))
        args["conv_alpha"] = _number(_most_common([a.alpha for a in conv]))
    rank_dropout = _most_common([a.rank_dropout for a, _ in adapters.values()])
    module_dropout = _most_common([a.module_dropout for a, _ in adapters.values()])
    if rank_dropout or module_dropout or network_module == "lycoris.kohya":
        args["rank_dropout"] = _number(rank_dropout)
        args["module_dropout"] = _number(module_dropout)

    timestamp = time.time() if timestamp is None else timestamp
    out: dict[str, Any] = {
        "ss_network_module": network_module,
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": _number(network_alpha),
        "ss_network_args": json.dumps(args),
        "ss_v2": str(v2),
        "ss_output_name": output_name or "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": output_name or f"LoRA@{int(timestamp)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    if base_model_version:
        out["ss_base_model_version"] = base_model_version
        if sdxl:
            spec_arch, impl, reso = (
                "stable-diffusion-xl-v1-base",
                "https://github.com/Stability-AI/generative-models",
                1024,
            )
        elif v2:
            spec_arch = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
            impl, reso = "diffusers", 768 if v_pred else 512
        else:
            spec_arch, impl, reso = "stable-diffusion-v1", "diffusers", 512
        out["modelspec.architecture"] = spec_arch + "/lora"
        out["modelspec.implementation"] = impl
        out["modelspec.resolution"] = f"{reso}x{reso}"

    for key, value in (training_info or {}).items():
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
    for key, value in (metadata or {}).items():
        out[key] = value
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in out.items()}


def save_kohya(
    path: str | os.PathLike,
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float16,
    base_model_version: str | None = None,
    unet_naming: str = "auto",
    output_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    training_info: Mapping[str, Any] | None = None,
    model_hash: bool = True,
) -> Path:
    """Write adapter `adapter_name` of a UNet and/or text encoders as one Kohya/LyCORIS `.safetensors` file.

    Names: SD1/SD2 UNet `lora_unet_` + diffusers path, SDXL `lora_unet_` + LDM path (`unet_naming` overrides),
    text encoders `lora_te_` (one) or `lora_te1_`/`lora_te2_` + `text_model_encoder_layers_N_...`. Tensors: LoHa
    `hada_*`, LoRA `lora_down/up(/mid).weight`, LoKr `lokr_*`, a 0-dim alpha each, all in `dtype`. Metadata: see
    `kohya_metadata`; `base_model_version` (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0) defaults to the UNet's.
    `sshs_model_hash` is A1111's hash of the tensor bytes. Refuses (one error listing all problems) a non-SD UNet
    without an explicit `unet_naming`, te2 attention with only some of q/k/v/out, and tensors loaders would misread.
    The user multiplier (`adapter.scale`) is not part of the file."""
    path = Path(path)
    state, facts = build_kohya_state_dict(
        unet=unet,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        adapter_name=adapter_name,
        dtype=dtype,
        unet_naming=unet_naming,
        base_model_version=base_model_version,
    )
    meta = kohya_metadata(
        facts,
        base_model_version=base_model_version,
        output_name=output_name or path.stem,
        training_info=training_info,
        metadata=metadata,
    )
    return write_kohya_file(path, state, meta, model_hash=model_hash)


def write_kohya_file(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    model_hash: bool = True,
) -> Path:
    """Write a Kohya/LyCORIS `.safetensors` file: the one writer every path that writes such a file uses
    (`save_kohya`, `loha-diffusion convert`).

    `state_dict` holds contiguous CPU tensors under Kohya keys; `metadata` string values. With `model_hash`,
    `sshs_model_hash` is set to A1111's hash of the tensor bytes (a stale `sshs_legacy_hash`, which depends on
    the old bytes, is dropped). The bytes go to a temporary file in the same folder that is then renamed, so an
    interrupted write never leaves a truncated adapter. Returns `path`.

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    meta = dict(metadata)
    meta.pop("sshs_legacy_hash", None)
    if model_hash:
        # The data section after the header does not depend on the metadata, so hash it first.
        meta["sshs_model_hash"] = addnet_hash(safetensors_save(dict(state_dict)))
    data = safetensors_save(dict(state_dict), metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False
    ) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Just the `__metadata__` of a `.safetensors` file (no tensors are read)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.load(io.BytesIO(f.read(header_len)))
    return dict(header.get("__metadata__", {}))
