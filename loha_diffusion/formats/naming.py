"""Module names of Kohya/LyCORIS adapter files <-> module paths of diffusers/transformers models.

A Kohya module name is a prefix (``lora_unet``, ``lora_te``, ``lora_te1``, ``lora_te2``) plus ``_`` plus a module
path with every ``.`` replaced by ``_``. Which path: SD1.x/SD2.x UNets use the diffusers path, SDXL UNets the
LDM/SGM path (``input_blocks``/``middle_block``/``output_blocks``, as sd-scripts writes them), and text encoders
always ``text_model_encoder_layers_N_...`` (see docs/kohya-format.md, sections 2 and 9).

Pure name logic: no tensors, no models beyond reading a UNet's config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

UNET_PREFIX = "lora_unet"
LYCORIS_PREFIX = "lycoris"
TE_PREFIX = "lora_te"
TE1_PREFIX = "lora_te1"
TE2_PREFIX = "lora_te2"

Arch = Literal["sd1", "sd2", "sdxl"]
UNetNaming = Literal["diffusers", "ldm"]

# ss_base_model_version values per architecture (A1111 reads these to sort/filter its Lora tab).
BASE_MODEL_VERSIONS: dict[str, str] = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}

# diffusers ResnetBlock2D child -> LDM ResBlock child.
_RESNET_TO_LDM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
_RESNET_FROM_LDM = {v: k for k, v in _RESNET_TO_LDM.items()}

# The six text-encoder sublayers ComfyUI (LORA_CLIP_MAP) and A1111 (OpenCLIP conversion) know by name.
PORTABLE_TE_SUBLAYERS = (
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
)
TE_ATTENTION_SUBLAYERS = PORTABLE_TE_SUBLAYERS[:4]
# Text-encoder modules that live beside ``text_model``, not inside it (transformers' CLIPTextModelWithProjection);
# their Kohya names have no ``text_model_`` (OneTrainer writes ``lora_te2_text_projection``, ComfyUI maps it).
TE_TOP_LEVEL_MODULES = ("text_projection",)

_SD1_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD1_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def _config_dict(unet_or_config: Any) -> Mapping[str, Any]:
    """Accept a diffusers UNet, its FrozenDict config, or a plain dict (TypeError for anything else)."""
    config = getattr(unet_or_config, "config", unet_or_config)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a diffusers UNet or its config dict, got {type(unet_or_config).__name__}")
    return config


def detect_architecture(unet_or_config: Any) -> Arch | None:
    """Return "sd1", "sd2" or "sdxl" when the UNet has that topology (widths may differ), else None.

    Only the topology matters for names: block types, layers_per_block=2, a cross-attention mid block, and for
    SDXL the "text_time" added embedding. SD2 is told from SD1 by ``use_linear_projection`` (SD2 uses Linear
    proj_in/proj_out, SD1 1x1 convs).
    """
    config = _config_dict(unet_or_config)
    down = tuple(config.get("down_block_types", ()))
    up = tuple(config.get("up_block_types", ()))
    if config.get("layers_per_block") != 2:
        return None
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        return None
    if config.get("class_embed_type") is not None:
        return None
    addition = config.get("addition_embed_type")
    if down == _SDXL_DOWN and up == _SDXL_UP and addition == "text_time":
        return "sdxl"
    if down == _SD1_DOWN and up == _SD1_UP and addition is None:
        return "sd2" if config.get("use_linear_projection") else "sd1"
    return None


def unet_layout(unet_or_config: Any) -> UNetLayout | None:
    """``UNetLayout.from_config`` of a diffusers UNet (or its config), None when the config lacks the block
    types (not a diffusers UNet)."""
    try:
        return UNetLayout.from_config(unet_or_config)
    except (KeyError, TypeError):
        return None


def default_unet_naming(arch: Arch | None) -> UNetNaming | None:
    """The UNet naming sd-scripts uses: diffusers paths for SD1.x/SD2.x, LDM paths for SDXL, None if unknown."""
    if arch in ("sd1", "sd2"):
        return "diffusers"
    if arch == "sdxl":
        return "ldm"
    return None


@dataclass(frozen=True)
class UNetLayout:
    """The UNet topology that decides LDM block indices: resnets per level and which blocks have attention."""

    layers_per_block: tuple[int, ...]
    down_has_attention: tuple[bool, ...]
    up_has_attention: tuple[bool, ...]
    mid_has_attention: bool
    has_mid_block: bool = True

    @classmethod
    def from_config(cls, unet_or_config: Any) -> UNetLayout:
        """Read the layout from a diffusers UNet2DConditionModel (or its config).

        Raises:
            KeyError: the config has no ``down_block_types`` / ``up_block_types``.
            TypeError: neither a UNet nor a config mapping (``unet_layout`` returns None for both instead).
        """
        config = _config_dict(unet_or_config)
        down = tuple(config["down_block_types"])
        up = tuple(config["up_block_types"])
        lpb = config.get("layers_per_block", 2)
        lpb = tuple(lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * len(down)
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(
            layers_per_block=lpb,
            down_has_attention=tuple("Attn" in t for t in down),
            up_has_attention=tuple("Attn" in t for t in up),
            mid_has_attention=mid is not None and "Attn" in mid,
            has_mid_block=mid is not None,
        )

    def block_map(self) -> list[tuple[str, str, bool]]:
        """(diffusers prefix, LDM prefix, is_resnet) for every block, as ComfyUI's ``unet_to_diffusers`` maps them."""
        entries: list[tuple[str, str, bool]] = [
            ("conv_in", "input_blocks.0.0", False),
            ("time_embedding.linear_1", "time_embed.0", False),
            ("time_embedding.linear_2", "time_embed.2", False),
            ("add_embedding.linear_1", "label_emb.0.0", False),
            ("add_embedding.linear_2", "label_emb.0.2", False),
            ("conv_norm_out", "out.0", False),
            ("conv_out", "out.2", False),
        ]
        levels = len(self.layers_per_block)
        start = 1
        for x in range(levels):
            n = self.layers_per_block[x]
            for i in range(n):
                entries.append((f"down_blocks.{x}.resnets.{i}", f"input_blocks.{start + i}.0", True))
                if self.down_has_attention[x]:
                    entries.append((f"down_blocks.{x}.attentions.{i}", f"input_blocks.{start + i}.1", False))
            if x < levels - 1:
                entries.append(
                    (f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{start + n}.0.op", False)
                )
            start += n + 1
        if self.has_mid_block:
            entries.append(("mid_block.resnets.0", "middle_block.0", True))
            if self.mid_has_attention:
                entries.append(("mid_block.attentions.0", "middle_block.1", False))
                entries.append(("mid_block.resnets.1", "middle_block.2", True))
            else:
                entries.append(("mid_block.resnets.1", "middle_block.1", True))
        reversed_lpb = tuple(reversed(self.layers_per_block))
        start = 0
        for x in range(levels):
            n = reversed_lpb[x] + 1  # diffusers up blocks have one more resnet than the down blocks
            for i in range(n):
                entries.append((f"up_blocks.{x}.resnets.{i}", f"output_blocks.{start + i}.0", True))
                if self.up_has_attention[x]:
                    entries.append((f"up_blocks.{x}.attentions.{i}", f"output_blocks.{start + i}.1", False))
            if x < levels - 1:
                slot = 2 if self.up_has_attention[x] else 1
                entries.append(
                    (f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{start + n - 1}.{slot}.conv", False)
                )
            start += n
        return entries


def _translate(path: str, entries: Iterable[tuple[str, str, bool]], to_ldm: bool) -> str | None:
    for diffusers_prefix, ldm_prefix, is_resnet in entries:
        src, dst = (diffusers_prefix, ldm_prefix) if to_ldm else (ldm_prefix, diffusers_prefix)
        if path == src:
            return dst
        if not path.startswith(src + "."):
            continue
        rest = path[len(src) + 1 :]
        if is_resnet:
            renames = _RESNET_TO_LDM if to_ldm else _RESNET_FROM_LDM
            for old, new in renames.items():
                if rest == old or rest.startswith(old + "."):
                    return f"{dst}.{new}{rest[len(old) :]}"
            return None
        return f"{dst}.{rest}"
    return None


def diffusers_to_ldm(path: str, layout: UNetLayout) -> str:
    """Map a diffusers UNet module path to its LDM/SGM path (e.g. ``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``).

    Raises:
        ValueError: a module the LDM layout does not have.
    """
    result = _translate(path, layout.block_map(), to_ldm=True)
    if result is None:
        raise ValueError(
            f"UNet module {path!r} has no LDM/SGM name (the original SD UNets have no such module)"
        )
    return result


def ldm_to_diffusers(path: str, layout: UNetLayout) -> str:
    """Map an LDM/SGM UNet module path to the diffusers path (inverse of ``diffusers_to_ldm``).

    Raises:
        ValueError: not an LDM/SGM module path of this layout.
    """
    result = _translate(path, layout.block_map(), to_ldm=False)
    if result is None:
        raise ValueError(f"{path!r} is not an LDM/SGM UNet module path of this UNet layout")
    return result


def to_kohya(prefix: str, path: str) -> str:
    """``prefix`` + ``_`` + path with dots replaced (a Kohya module name never contains a dot)."""
    return f"{prefix}_{path.replace('.', '_')}"


def unet_kohya_name(path: str, naming: UNetNaming, layout: UNetLayout | None = None) -> str:
    """Kohya name of a diffusers UNet module: ``lora_unet_`` + diffusers path (SD1/SD2) or LDM path (SDXL).

    Raises:
        ValueError: an unknown ``naming``, LDM names without ``layout``, or a module without an LDM name.
    """
    if naming == "diffusers":
        return to_kohya(UNET_PREFIX, path)
    if naming == "ldm":
        if layout is None:
            raise ValueError("LDM names need the UNet layout (UNetLayout.from_config(unet))")
        return to_kohya(UNET_PREFIX, diffusers_to_ldm(path, layout))
    raise ValueError(f"unknown UNet naming {naming!r}; use 'diffusers' or 'ldm'")


def text_encoder_relative_path(path: str) -> str:
    """Path below ``text_model``: transformers 5 ``CLIPTextModel`` has no ``.text_model`` (paths start with
    ``encoder.``) while ``CLIPTextModelWithProjection`` keeps it; both give ``encoder.layers.N...`` here."""
    return path[len("text_model.") :] if path.startswith("text_model.") else path


def text_encoder_kohya_name(path: str, prefix: str) -> str:
    """Kohya name of a CLIP text-encoder module: ``<prefix>_text_model_<path below text_model>`` (e.g.
    ``lora_te1_text_model_encoder_layers_0_mlp_fc1``), and for the modules outside ``text_model``
    (``CLIPTextModelWithProjection.text_projection``) ``<prefix>_<path>``: ``lora_te2_text_projection`` is the name
    OneTrainer writes and ComfyUI maps to clip_g's projection (``comfy/lora.py``, ``model_lora_keys_clip``)."""
    relative = text_encoder_relative_path(path)
    if relative in TE_TOP_LEVEL_MODULES:
        return to_kohya(prefix, relative)
    return to_kohya(prefix, "text_model." + relative)


def legacy_text_encoder_kohya_name(path: str, prefix: str) -> str | None:
    """The name loha_diffusion wrote before `text_encoder_kohya_name` knew the modules outside ``text_model``
    (``lora_te2_text_model_text_projection``, which no loader maps), None for modules whose name did not change."""
    relative = text_encoder_relative_path(path)
    return to_kohya(prefix, "text_model." + relative) if relative in TE_TOP_LEVEL_MODULES else None


def text_encoder_prefixes(count: int) -> tuple[str, ...]:
    """sd-scripts' rule: one text encoder -> ``lora_te``; two -> ``lora_te1``, ``lora_te2``.

    Raises:
        ValueError: ``count`` is not 1 or 2.
    """
    if count == 1:
        return (TE_PREFIX,)
    if count == 2:
        return (TE1_PREFIX, TE2_PREFIX)
    raise ValueError(f"Kohya files hold one or two text encoders, not {count}")


def te_sublayer(kohya_name: str) -> tuple[int, str] | None:
    """``(layer index, sublayer)`` for a portable text-encoder name (``..._text_model_encoder_layers_3_mlp_fc1``),
    else None. Used to check the names ComfyUI and A1111 can map."""
    marker = "_text_model_encoder_layers_"
    pos = kohya_name.find(marker)
    if pos < 0:
        return None
    index, _, sub = kohya_name[pos + len(marker) :].partition("_")
    if not index.isdigit() or sub not in PORTABLE_TE_SUBLAYERS:
        return None
    return int(index), sub


def comfyui_maps_te_name(kohya_name: str) -> bool:
    """Whether ComfyUI maps this text-encoder module name (`comfy/lora.py`, `model_lora_keys_clip`): the six
    portable encoder-layer sublayers (`te_sublayer`), and OneTrainer's ``lora_te1_text_projection`` /
    ``lora_te2_text_projection``. A1111 maps only the six (``text_projection`` is a bare parameter there)."""
    if te_sublayer(kohya_name) is not None:
        return True
    return kohya_name in {to_kohya(p, m) for p in (TE1_PREFIX, TE2_PREFIX) for m in TE_TOP_LEVEL_MODULES}


def unet_name_candidates(path: str, layout: UNetLayout | None) -> list[str]:
    """Every Kohya-style name a file may use for this diffusers UNet module: ``lora_unet_`` + diffusers path,
    ``lora_unet_`` + LDM path (when it has one), and LyCORIS' generic ``lycoris_`` + diffusers path."""
    names = [to_kohya(UNET_PREFIX, path), to_kohya(LYCORIS_PREFIX, path)]
    if layout is not None:
        ldm = _translate(path, layout.block_map(), to_ldm=True)
        if ldm is not None:
            names.append(to_kohya(UNET_PREFIX, ldm))
    return names


def text_encoder_name_candidates(path: str, prefixes: Iterable[str]) -> list[str]:
    """Names a file may use for a text-encoder module: the portable ``text_model_`` form and the raw module path
    (what LyCORIS/PEFT derive from ``named_modules()`` with transformers 5), under each accepted prefix."""
    names = []
    for prefix in prefixes:
        names.append(text_encoder_kohya_name(path, prefix))
        raw = to_kohya(prefix, path)
        if raw not in names:
            names.append(raw)
    return names


def export_te_prefixes(two_encoders: bool, arch: Arch | None) -> tuple[str, str]:
    """The prefixes to write for (text_encoder, text_encoder_2): sd-scripts' rule (``lora_te`` for one encoder,
    ``lora_te1``/``lora_te2`` for two), and ``lora_te1``/``lora_te2`` for any SDXL set, so an SDXL file with only
    the first encoder still says which one it is."""
    if two_encoders or arch == "sdxl":
        return TE1_PREFIX, TE2_PREFIX
    return TE_PREFIX, TE2_PREFIX


def partial_attention(names: Iterable[str], prefix: str) -> list[str]:
    """Text-encoder layers under ``prefix`` whose Kohya ``names`` have some but not all of q/k/v/out_proj, one
    line each (A1111's OpenCLIP ``MultiheadAttention`` applies them only when all four are there)."""
    per_layer: dict[int, set[str]] = {}
    for name in names:
        if not name.startswith(prefix + "_"):
            continue
        parsed = te_sublayer(name)
        if parsed and parsed[1] in TE_ATTENTION_SUBLAYERS:
            per_layer.setdefault(parsed[0], set()).add(parsed[1])
    return [
        f"{prefix} layer {i}: has {sorted(s)}, missing {sorted(set(TE_ATTENTION_SUBLAYERS) - s)}"
        for i, s in sorted(per_layer.items())
        if len(s) != len(TE_ATTENTION_SUBLAYERS)
    ]


# -- diffusers module paths without a model (files in diffusers/PEFT layouts) ---------------------------------

# First path component of the modules of a diffusers UNet2DConditionModel and of a transformers CLIP text model
# (`CLIPTextModel` in transformers 5 has `encoder`/`embeddings`/`final_layer_norm` at the top, older versions and
# `CLIPTextModelWithProjection` `text_model` and `text_projection`).
UNET_ROOTS = frozenset(
    {
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "add_embedding",
        "class_embedding",
        "encoder_hid_proj",
        "down_blocks",
        "mid_block",
        "up_blocks",
    }
)
TE_ROOTS = frozenset({"text_model", "encoder", "embeddings", "final_layer_norm", "text_projection"})

# Diffusers UNet paths only one of the two layouts has (docs/kohya-format.md section 2.3): SDXL has 3 levels, no
# attention at level 0 of the down path but at level 0 of the up path, 2-10 transformer blocks per attention and
# the text-time embedding; SD1/SD2 have 4 levels, attention at down level 0 and at up levels 1-3, one block each.
# The second line of each pattern: the same kind of blocks by their LDM/SGM paths.
_SDXL_PATHS = re.compile(
    r"transformer_blocks\.[1-9]|^add_embedding|^up_blocks\.0\.attentions"
    r"|^label_emb|^output_blocks\.[0-2]\.1\."
)
_SD1_PATHS = re.compile(
    r"^(down|up)_blocks\.3\.|^down_blocks\.0\.attentions|^up_blocks\.2\.upsamplers|^down_blocks\.2\.downsamplers"
    r"|^input_blocks\.(9|10|11)\.|^output_blocks\.(9|10|11)\.|^input_blocks\.[12]\.1\."
)


def diffusers_component(path: str) -> str | None:
    """ "unet" or "text_encoder" for a module path of a diffusers UNet or a CLIP text model (by its first
    component, `UNET_ROOTS` / `TE_ROOTS`), None for anything else."""
    root = path.split(".", 1)[0]
    if root in UNET_ROOTS:
        return "unet"
    if root in TE_ROOTS:
        return "text_encoder"
    return None


def guess_unet_architecture(paths: Iterable[str]) -> Arch | None:
    """ "sdxl" or "sd1" when UNet module paths (diffusers or LDM/SGM) name blocks only that layout has (SD2 shares
    SD1's blocks and names), None when they name neither or both."""
    paths = list(paths)
    sdxl = any(_SDXL_PATHS.search(p) for p in paths)
    sd1 = any(_SD1_PATHS.search(p) for p in paths)
    if sdxl == sd1:
        return None
    return "sdxl" if sdxl else "sd1"


def standard_layout(arch: Arch) -> UNetLayout:
    """The block layout of the SD1.x/SD2.x or SDXL UNet (what the LDM names of a file without a model follow).

    Raises:
        ValueError: an unknown `arch`.
    """
    if arch in ("sd1", "sd2"):
        down, up = _SD1_DOWN, _SD1_UP
    elif arch == "sdxl":
        down, up = _SDXL_DOWN, _SDXL_UP
    else:
        raise ValueError(f"unknown architecture {arch!r}; use 'sd1', 'sd2' or 'sdxl'")
    return UNetLayout.from_config({"down_block_types": down, "up_block_types": up, "layers_per_block": 2})
