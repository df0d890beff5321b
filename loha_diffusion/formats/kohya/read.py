"""Reading Kohya / LyCORIS `.safetensors` adapter files: `read_kohya`, `parse_kohya_state_dict`, and the
per-module records `KohyaModule` / `KohyaFile` (nothing is applied to a model here).

The reference for names, layouts, scales and metadata is docs/kohya-format.md. In short: one key per tensor,
`<module name>.<tensor name>`; LoHa `hada_w1_a ... (hada_t1/t2 for CP)`, LoRA/LoCon `lora_down.weight`,
`lora_up.weight` (`lora_mid.weight` for Tucker), LoKr `lokr_*`; a 0-dim `alpha` per module; scaling `alpha / r`.
Which tensors make which kind, and how each kind is rebuilt, is declared by the adapter classes
(`loha_diffusion.adapters.ADAPTER_KINDS`); this module only groups, checks and dispatches.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ...adapters import (
    Adapter,
    LayerSpec,
    LoHaAdapter,
    LoKrAdapter,
    LoRAAdapter,
    adapter_class,
    detect_kind,
    kind_titles,
)
from ...errors import AdapterFileNotFoundError, KohyaFormatError, LoHaDiffusionError
from ...finite import delta_bound
from .. import foreign, naming
from ..embeddings import BundledEmbedding
from ..reference import reference_delta

# The Kohya tensor names of each kind, as the adapter classes declare them (kept for callers of the old module).
LOHA_TENSORS = LoHaAdapter.file_tensors
LOHA_CP_TENSORS = LoHaAdapter.optional_file_tensors
LORA_TENSORS = LoRAAdapter.file_tensors
LORA_CP_TENSORS = LoRAAdapter.optional_file_tensors
LOKR_TENSORS = LoKrAdapter.optional_file_tensors
# Kohya LoRA names <-> our (PEFT) adapter tensor names.
PEFT_TO_KOHYA_LORA = dict(LoRAAdapter.kohya_names)
KOHYA_TO_PEFT_LORA = {v: k for k, v in PEFT_TO_KOHYA_LORA.items()}

UNKNOWN_KIND = "unknown"


@dataclass
class KohyaModule:
    """One module of a Kohya/LyCORIS file: its kind, factor tensors (file names, no alpha; as stored: file
    dtype, CPU) and alpha.

    `kind` is an adapter kind ("loha", "lora", "lokr": `adapters.adapter_class`) or "unknown". `problems` lists what
    makes the module unusable (unknown tensors, DoRA, a malformed alpha, ...), `value_problems` the values that
    would make its delta NaN/Inf (non-finite factors; an alpha that is NaN, infinite, negative or too large)."""

    name: str
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    problems: list[str] = field(default_factory=list)
    #: Values loaders would turn into NaN/Inf output: non-finite factors, an alpha that is non-finite, negative
    #: or beyond float16's range. Refused by `load_kohya` unless `allow_non_finite=True`; FAIL in `verify`.
    value_problems: list[str] = field(default_factory=list)

    @property
    def adapter_class(self) -> type[Adapter] | None:
        """The adapter class of `kind` (`adapters.adapter_class`), None for an unknown kind."""
        try:
            return adapter_class(self.kind)
        except ValueError:
            return None

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
        """The rank the loaders divide alpha by (`hada_w1_b.shape[0]`, `lora_down.shape[0]`, LoKr's rule: see
        each kind's `file_rank`); None when the kind is unknown or the rank cannot be read."""
        cls = self.adapter_class
        if cls is None or _tensor_problems(self.tensors):
            return None
        return cls.file_rank(self.tensors)

    @property
    def is_cp(self) -> bool:
        """CP/Tucker form (`hada_t1`, `lora_mid`, `lokr_t2`); False for an unknown kind."""
        cls = self.adapter_class
        return cls is not None and not _tensor_problems(self.tensors) and cls.file_is_cp(self.tensors)

    @property
    def scaling(self) -> float:
        """The factor ComfyUI and A1111 multiply the rebuilt product by (user multiplier 1): `alpha / rank`,
        1.0 without alpha (and for LoKr without a factorized half); each kind's `file_scaling`. Unitless."""
        cls = self.adapter_class
        if cls is None or _tensor_problems(self.tensors):
            return 1.0
        return cls.file_scaling(self.alpha, self.tensors)

    @property
    def scale(self) -> float:
        """Deprecated name of `scaling` (`scale` is the user multiplier everywhere else)."""
        warnings.warn(
            "KohyaModule.scale is deprecated; use KohyaModule.scaling (alpha / rank).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.scaling

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the module's tensors (of the first; `problems` notes a mix), None without tensors."""
        return next(iter(self.tensors.values())).dtype if self.tensors else None

    def delta_bound(self) -> float:
        """A cheap upper bound of max|ΔW| (`scaling` applied, multiplier 1) without building ΔW: the product of
        the factors' largest magnitudes and `scaling`, times the rank once per factor (every inner sum of
        every kind runs over a rank). inf/nan when a factor is; 0.0 for an unusable module."""
        if self.problems:
            return 0.0
        return delta_bound(self.scaling, self.tensors.values(), self.rank or 1)

    def peak_delta(self, limit: float = 0.0) -> float:
        """max|ΔW| of the module (`scaling` applied, multiplier 1) from the plain formulas in float64
        (`formats.reference`; inf when ΔW has NaN/Inf). ΔW is only built when `delta_bound` exceeds `limit`,
        otherwise the bound is returned, and also when the factors do not multiply (a shape problem `verify` and
        the loaders report against the base layer). The base layer's shape is not needed: the values are the
        same in any arrangement."""
        bound = self.delta_bound()
        if self.problems or bound <= limit:
            return bound
        try:
            delta = reference_delta(self.tensors, self.alpha, (-1,))
        except RuntimeError:  # torch: factors whose shapes do not multiply
            return bound
        return float(delta.abs().max()) if bool(torch.isfinite(delta).all()) else math.inf

    def num_params(self) -> int:
        """Number of factor elements (alpha not counted)."""
        return sum(t.numel() for t in self.tensors.values())

    def delta_weight(self, weight_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """ΔW as the loaders rebuild it from the file: an fp32 tensor shaped `weight_shape` on the tensors'
        device (the CPU for a read file), `scaling` applied, user multiplier 1.

        Raises:
            KohyaFormatError: the module's kind is unknown.
        """
        cls = self.adapter_class
        if cls is None:
            raise KohyaFormatError(f"{self.name}: cannot rebuild a delta for an unknown module kind")
        tensors = {k: v.float() for k, v in self.tensors.items()}
        return cls.file_delta_weight(tensors, weight_shape, self.scaling)

    def to_adapter(self, spec: LayerSpec) -> Adapter:
        """An adapter of this module's kind holding its factors (fp32, CPU) for a layer of geometry `spec`.

        Missing alpha gives scaling 1 (alpha = rank), as ComfyUI and A1111 do.

        Raises:
            KohyaFormatError: the module has `problems` (unknown kind, unknown tensors, ...).
            ValueError: (`AdapterStateError`) shapes that do not fit `spec`, named in the message (LyCORIS would
                crash, ComfyUI and A1111 would skip or mis-apply the module).
        """
        if self.problems:
            raise KohyaFormatError("; ".join(self.problems))
        return self.adapter_class.from_file_tensors(spec, self.tensors, self.alpha)


@dataclass
class KohyaFile:
    """A parsed Kohya/LyCORIS file: `modules` by Kohya module name, the string `metadata`, file-level problems,
    and the textual-inversion embeddings bundled with the adapter (A1111's `bundle_emb.*`, by name)."""

    modules: dict[str, KohyaModule]
    metadata: dict[str, str]
    problems: list[str] = field(default_factory=list)
    path: Path | None = None
    embeddings: dict[str, BundledEmbedding] = field(default_factory=dict)

    @property
    def all_problems(self) -> list[str]:
        """File problems and every module's problems (`"<module>: <problem>"`); not `value_problems`."""
        return self.problems + [f"{m.name}: {p}" for m in self.modules.values() for p in m.problems]

    @property
    def value_problems(self) -> list[str]:
        """Every module's `value_problems` (`"<module>: <problem>"`): NaN/Inf factors, bad alphas."""
        return [f"{m.name}: {p}" for m in self.modules.values() for p in m.value_problems]

    @property
    def dtypes(self) -> list[str]:
        """The tensor dtypes in the file, sorted ("float16", ...)."""
        return sorted(
            {str(t.dtype).replace("torch.", "") for m in self.modules.values() for t in m.tensors.values()}
        )

    @property
    def kinds(self) -> dict[str, int]:
        """Module count per kind ("loha", "lora", "lokr", "unknown")."""
        return dict(Counter(m.kind for m in self.modules.values()))

    @property
    def prefixes(self) -> dict[str, int]:
        """Module count per name prefix (`lora_unet`, `lora_te1`, ...)."""
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
    and classify each one; problems are recorded, not raised (see `KohyaFile.all_problems`).

    Tensors are kept as given (same objects: dtype, device); `metadata` values are strings."""
    # Files in other tools' layouts (diffusers/PEFT LoRA, A1111's bundled embeddings, ...) under Kohya names, or
    # a KohyaFormatError naming a format that holds no SD adapter (formats/foreign.py).
    state_dict, metadata, embeddings = foreign.as_kohya_layout(state_dict, metadata)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in state_dict.items():
        module, dot, tensor_name = key.partition(".")
        if not dot:
            problems.append(f"key {key!r} has no '<module>.<tensor>' form")
            continue
        grouped.setdefault(module, {})[tensor_name] = tensor
    modules = {name: classify_module(name, tensors) for name, tensors in grouped.items()}
    return KohyaFile(modules=modules, metadata=dict(metadata or {}), problems=problems, embeddings=embeddings)


def classify_module(name: str, tensors: Mapping[str, torch.Tensor]) -> KohyaModule:
    """The record of file module `name` from its tensors (file names, `alpha` included): the kind the adapter
    classes detect (`adapters.detect_kind`), the alpha, and every problem (recorded, not raised): `problems`
    for what makes it unusable, `value_problems` for values that would give a NaN/Inf delta."""
    tensors = dict(tensors)
    problems: list[str] = []
    alpha = None
    if "alpha" in tensors:
        alpha, alpha_problem = _read_alpha(tensors.pop("alpha"))
        if alpha_problem:
            problems.append(alpha_problem)
    if "dora_scale" in tensors:
        problems.append(
            "has dora_scale (DoRA/DoHa weight decomposition), which loha_diffusion does not apply; "
            "ignoring it would give a different delta than ComfyUI/A1111. Re-export the adapter without DoRA."
        )
        tensors.pop("dora_scale")
    kind = detect_kind(tensors)
    malformed = _tensor_problems(tensors)
    problems += malformed
    if kind is None:
        kind = UNKNOWN_KIND
        problems.append(f"no {kind_titles()} tensors (has {sorted(tensors)}); only those kinds are supported")
    elif not malformed:
        problems += adapter_class(kind).file_problems(tensors)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        problems.append(
            f"mixes dtypes {sorted(str(d) for d in dtypes)} (A1111 multiplies factors in their stored dtype)"
        )
    return KohyaModule(
        name=name,
        kind=kind,
        tensors=tensors,
        alpha=alpha,
        problems=problems,
        value_problems=_value_problems(tensors, alpha) if not malformed else [],
    )


# The largest alpha a file may carry: float16's largest value. save_kohya writes alpha in the factors' dtype
# (fp16 by default), and ComfyUI/A1111 compute fp16 models' deltas in fp16, so a larger alpha becomes Inf there.
MAX_ALPHA = float(torch.finfo(torch.float16).max)


def _read_alpha(tensor: torch.Tensor) -> tuple[float | None, str | None]:
    """A module's alpha as a float, or the reason it is not a number (checked like kohya's `alpha.item()`)."""
    if not isinstance(tensor, torch.Tensor):
        return None, f"alpha must be a number tensor, got {type(tensor).__name__}"
    if tensor.dtype == torch.bool or tensor.is_complex():
        return None, f"alpha must be a real number, got a {str(tensor.dtype).removeprefix('torch.')} tensor"
    if tensor.numel() != 1:
        return None, f"alpha must be a 0-dim or 1-element tensor, got shape {tuple(tensor.shape)}"
    return float(tensor.double().item()), None


def _tensor_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Factor tensors no loader can use: not floating point, 0-dim, or with a zero-sized dimension."""
    problems = []
    for tensor_name, tensor in sorted(tensors.items()):
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{tensor_name} is a {type(tensor).__name__}, not a tensor")
        elif not tensor.is_floating_point():
            problems.append(
                f"{tensor_name} has dtype {str(tensor.dtype).removeprefix('torch.')}; factors are "
                "floating point (float32, float16 or bfloat16)"
            )
        elif tensor.dim() == 0 or tensor.numel() == 0:
            problems.append(f"{tensor_name} has shape {tuple(tensor.shape)}; factors have no empty dimension")
    return problems


def _value_problems(tensors: Mapping[str, torch.Tensor], alpha: float | None) -> list[str]:
    """NaN/Inf factors and alphas that are NaN, infinite, negative or beyond `MAX_ALPHA` (kohya's trainers
    write a positive alpha <= the rank's order of magnitude; LyCORIS' `alpha 0` means alpha = rank)."""
    problems = []
    bad = [k for k, t in sorted(tensors.items()) if not bool(torch.isfinite(t.float()).all())]
    if bad:
        problems.append(f"NaN or infinite values in {bad}")
    if alpha is not None:
        if not math.isfinite(alpha):
            problems.append(f"alpha is {alpha}")
        elif alpha < 0:
            problems.append(f"alpha {alpha:g} is negative (it would flip the delta's sign)")
        elif alpha > MAX_ALPHA:
            problems.append(
                f"alpha {alpha:.3g} is beyond float16's range ({MAX_ALPHA:g}): the delta overflows in "
                "half precision (ComfyUI/A1111) and the alpha cannot be written in fp16"
            )
    return problems


def read_kohya(path: str | os.PathLike) -> KohyaFile:
    """Read a Kohya/LyCORIS `.safetensors` file into per-module records plus its metadata (nothing is applied).

    Tensors stay in the file's dtype, on the CPU.

    Raises:
        AdapterFileNotFoundError: no file at `path` (also a `FileNotFoundError`).
        KohyaFormatError: the file is empty, truncated or corrupt (not a readable `.safetensors` file), or in a
            layout that holds no SD adapter (`formats.foreign`); the message names the file. Problems of its
            modules are recorded in the result (`KohyaFile.all_problems`, `value_problems`), not raised.
    """
    path = Path(path)
    state_dict, metadata = read_safetensors(path, KohyaFormatError)
    try:
        parsed = parse_kohya_state_dict(state_dict, metadata)
    except KohyaFormatError as err:
        # Layout refusals (formats.foreign) know the tensors, not the file: name it here.
        raise KohyaFormatError(f"{path}: {err}") from None
    parsed.path = path
    return parsed


# safetensors dtype names -> torch dtypes (the floating ones adapters and models store weights in)
SAFETENSORS_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def stored_dtypes_of(path: str | os.PathLike) -> dict[str, torch.dtype | None]:
    """`{tensor name: dtype}` of the `.safetensors` file `path`, in the file's key order, read from the header
    only (no tensor data): a floating torch dtype, or None for any other (integer, bool, float8).

    Raises:
        OSError, safetensors' errors: the file cannot be read.
    """
    with safe_open(str(path), framework="pt") as f:
        return {key: SAFETENSORS_FLOAT_DTYPES.get(f.get_slice(key).get_dtype()) for key in f.keys()}


def read_safetensors(
    path: Path, error: type[LoHaDiffusionError] = KohyaFormatError
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (as stored: file dtype, CPU) and the metadata of the `.safetensors` file `path`.

    Raises:
        AdapterFileNotFoundError: no file at `path` (also a `FileNotFoundError`).
        LoHaDiffusionError: (`error`) the file is empty, truncated or has a corrupt header; the message names
            the file and what safetensors found.
    """
    if not path.is_file():
        what = "a folder, not a .safetensors file" if path.is_dir() else "no such file"
        raise AdapterFileNotFoundError(f"No adapter file at {path} ({what}).")
    size = path.stat().st_size
    if size == 0:
        raise error(f"{path} is empty (0 bytes); the download or save did not finish. Get the file again.")
    state_dict = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                state_dict[key] = f.get_tensor(key)
    except Exception as err:  # safetensors raises its own types (SafetensorError, ...) for corrupt files
        reason = str(err) or type(err).__name__
        raise error(
            f"{path} is not a readable .safetensors file ({size:,} bytes): {reason}. It is truncated or "
            "corrupt, or not a safetensors file; get or export it again."
        ) from None
    return state_dict, dict(metadata)
