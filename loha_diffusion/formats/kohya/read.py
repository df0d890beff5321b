"""Reading Kohya / LyCORIS `.safetensors` adapter files: `read_kohya`, `parse_kohya_state_dict`, and the
per-module records `KohyaModule` / `KohyaFile` (nothing is applied to a model here).

The reference for names, layouts, scales and metadata is the shared docs' kohya-format.md. In short: one key per
tensor, `<module name>.<tensor name>`; LoHa `hada_w1_a ... (hada_t1/t2 for CP)`, LoRA/LoCon `lora_down.weight`,
`lora_up.weight` (`lora_mid.weight` for Tucker), LoKr `lokr_*`; a 0-dim `alpha` per module; scale `alpha / r`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ...adapters import Adapter, LayerSpec, LoHaAdapter, LoRAAdapter
from ...adapters.lokr import LoKrAdapter
from ...functional import lokr as lokr_fn
from ...functional import lora as lora_fn
from ...functional.loha import delta_weight_reference as loha_delta
from .. import naming

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


class KohyaFormatError(ValueError):
    """A Kohya file, or a model/adapter to be written as one, has problems; the message lists all of them."""


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
