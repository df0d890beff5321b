"""Adapter files in other tools' layouts, seen as Kohya files: `as_kohya_layout` renames their tensors to the Kohya
names of docs/kohya-format.md, so that `read_kohya`, `load_kohya` and `loha-diffusion convert` read one format.

Layouts recognised (each as the tool that writes it, and as diffusers' own converters accept it:
`diffusers/utils/state_dict_utils.py`, `diffusers/loaders/lora_pipeline.py`, `diffusers/loaders/peft.py`):

* diffusers LoRA files (`pytorch_lora_weights.safetensors` of diffusers' training scripts and
  `save_lora_weights`): `unet.<module path>.lora_A.weight` / `lora_B.weight` (PEFT names), `.lora.down.weight` /
  `.lora.up.weight` and `.lora_linear_layer.down.weight` / `.up.weight` (what `convert_state_dict_to_diffusers`
  makes of them), the old attention-processor layout `<attention>.processor.to_q_lora.down.weight`, each under
  `unet.`, `text_encoder.` or `text_encoder_2.` (the UNet also without a prefix); optional `<module>.alpha`;
* PEFT state dicts saved as one file: `base_model.model.<module path>.lora_A.weight` (`get_peft_model_state_dict`),
  with an adapter name (`lora_A.default.weight`, `model.state_dict()`), and PEFT's LoHa (`hada_w1_a`, ...) and LoKr
  (`lokr_w1`, ...) tensors, whose names and shapes are the Kohya ones (docs/kohya-format.md section 10);
* Kohya module names with PEFT tensor names (`lora_unet_..._to_q.lora_A.weight`), which ComfyUI loads;
* ComfyUI's LoraSave layout (`comfy_extras/nodes_lora_extract.py`): `diffusion_model.<LDM path>.lora_up.weight`,
  `text_encoders.clip_l.transformer.<CLIP path>.lora_down.weight` (`clip_g` for SDXL's second encoder); its
  full-difference patches (`.diff`, `.diff_b`) are kept under their names, which the Kohya reader refuses;
* embeddings bundled by A1111 (`bundle_emb.*`): split off (`formats.embeddings`), with a warning that they are not
  applied here;
* `<prefix>_text_model_text_projection`, the name loha_diffusion wrote for a text projection before it wrote
  OneTrainer's `lora_te2_text_projection` (which ComfyUI maps): renamed, with a warning.

Scales are those of the tool that wrote the file. A module with an `alpha` tensor keeps it (`alpha / rank`, as
ComfyUI applies it; diffusers refuses such files). Otherwise diffusers' rule: the PEFT config stored by
`save_lora_weights` in the `lora_adapter_metadata` header (`<component>.lora_alpha`, `.r`, `.rank_pattern`,
`.alpha_pattern`, `.use_rslora`) gives `alpha / r` (`alpha / sqrt(r)` for rsLoRA), and without it the scale is 1
(`diffusers/utils/peft_utils.py`, `get_peft_kwargs`: alpha = rank). Each module then gets the Kohya alpha that
gives that scale, so a converted file means the same in ComfyUI and A1111.

Module paths become Kohya names with `formats.naming`: SD1/SD2 UNets `lora_unet_<diffusers path>`, SDXL UNets
`lora_unet_<LDM path>` (when the paths tell SDXL; otherwise the diffusers path, which loads onto either), text
encoders `lora_te_`/`lora_te1_`/`lora_te2_` + `text_model_...`. Files of formats that carry no SD1/SDXL adapter
(Flux/SD3 LoRAs, full checkpoints, textual-inversion embeddings, model weights) are refused with what they look
like and the way forward.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..adapters import adapter_class, detect_kind
from ..config import get_pattern_key
from ..errors import KohyaFormatError
from . import embeddings as bundled
from . import naming

# Key prefixes of the components in diffusers' LoRA files (`unet_name`, `text_encoder_name`), longest first.
COMPONENT_PREFIXES = (
    ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
)
PEFT_PREFIX = "base_model.model."
# ComfyUI's LoraSave node (`comfy_extras/nodes_lora_extract.py`): the UNet under `diffusion_model.` with LDM paths,
# text encoders under `text_encoders.<clip_l|clip_h|clip_g>.transformer.` with transformers' CLIP paths.
COMFY_PREFIXES = (
    ("diffusion_model.", "unet"),
    ("text_encoders.clip_l.transformer.", "text_encoder"),
    ("text_encoders.clip_h.transformer.", "text_encoder"),
    ("text_encoders.clip_g.transformer.", "text_encoder_2"),
)
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers/loaders/lora_base.py, LORA_ADAPTER_METADATA_KEY
KOHYA_MODULE_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# The old attention-processor names of a text encoder's attention (diffusers DIFFUSERS_OLD_TO_PEFT); the UNet's
# keep their name, `to_out` being `to_out.0` (UNET_TO_DIFFUSERS).
_OLD_TE_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

_ADAPTER = r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?"
# (pattern, Kohya tensor name (None: the matched `tensor` group), a name no Kohya file uses). Order matters.
_TENSOR_RULES: tuple[tuple[re.Pattern[str], str | None, bool], ...] = (
    (re.compile(rf"(?P<module>.+)\.lora_A{_ADAPTER}\.weight"), "lora_down.weight", True),
    (re.compile(rf"(?P<module>.+)\.lora_B{_ADAPTER}\.weight"), "lora_up.weight", True),
    (re.compile(r"(?P<module>.+)\.lora(?:_linear_layer)?\.down\.weight"), "lora_down.weight", True),
    (re.compile(r"(?P<module>.+)\.lora(?:_linear_layer)?\.up\.weight"), "lora_up.weight", True),
    (re.compile(r"(?P<module>.+_lora)\.down\.weight"), "lora_down.weight", True),
    (re.compile(r"(?P<module>.+_lora)\.up\.weight"), "lora_up.weight", True),
    # DoRA and trained LoRA biases: kept under names the Kohya reader reports as unusable.
    (re.compile(rf"(?P<module>.+)\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?"), "dora_scale", True),
    (re.compile(rf"(?P<module>.+)\.lora_B{_ADAPTER}\.bias"), "lora_up.bias", True),
    (re.compile(rf"(?P<module>.+)\.(?P<tensor>lora_embedding_[AB]){_ADAPTER}"), None, True),
    (
        re.compile(
            rf"(?P<module>.+)\.(?P<tensor>hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2){_ADAPTER}"
        ),
        None,
        False,
    ),
    (re.compile(r"(?P<module>.+)\.alpha"), "alpha", False),
    # Kohya tensor names under dotted module paths (ComfyUI's LoraSave), and its full-difference patches.
    (re.compile(r"(?P<module>.+)\.(?P<tensor>lora_(?:up|down|mid)\.weight|diff|diff_b)"), None, False),
)


@dataclass(frozen=True)
class ForeignKey:
    """Where a tensor of another tool's layout goes: `component` ("unet", "text_encoder", "text_encoder_2"; None
    for a path of no SD UNet or CLIP text model) and module `path` in it, or with `kohya` a Kohya module name in
    `path`; the Kohya tensor name; the PEFT adapter name written in the key (`lora_A.default.weight`), if any."""

    component: str | None
    path: str
    tensor: str
    adapter: str | None = None
    kohya: bool = False
    ldm: bool = False  # `path` is an LDM/SGM UNet path (ComfyUI's `diffusion_model.` keys)


def _locate(module: str) -> tuple[str | None, str]:
    """(component, module path) of a key's module part: a component prefix, then PEFT's `base_model.model.`."""
    for prefix, component in COMPONENT_PREFIXES + COMFY_PREFIXES:
        if module.startswith(prefix):
            return component, module[len(prefix) :].removeprefix(PEFT_PREFIX)
    path = module.removeprefix(PEFT_PREFIX)
    return naming.diffusers_component(path), path


def _normalise(component: str | None, path: str) -> str:
    """The model's module path for diffusers' older names: `<attention>.to_q_lora` (attention processors) and
    `to_out` (ComfyUI's key map strips the `.0`); an `alpha` beside `lora_linear_layer` / `lora` belongs to the
    module."""
    for wrapper in (".lora_linear_layer", ".lora"):
        path = path.removesuffix(wrapper)
    parent, _, leaf = path.rpartition(".")
    if leaf.endswith("_lora"):
        leaf = leaf[: -len("_lora")]
        if component in TEXT_ENCODERS:
            leaf = _OLD_TE_ATTENTION.get(leaf, leaf)
        path = f"{parent}.{leaf}" if parent else leaf
    if component == "unet" and path.endswith(".to_out"):
        path += ".0"
    return path


def parse_key(key: str) -> ForeignKey | None:
    """Where key `key` of another tool's layout goes (`ForeignKey`), None for a Kohya key or one no layout here
    knows (left to the Kohya reader). `.processor.` is dropped first, as diffusers does
    (`state_dict_utils.KEYS_TO_ALWAYS_REPLACE`)."""
    key = key.replace(".processor.", ".")
    for pattern, name, foreign_only in _TENSOR_RULES:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        module, tensor = match["module"], name or match["tensor"]
        adapter = match.groupdict().get("adapter")
        if "." not in module and module.startswith(KOHYA_MODULE_PREFIXES):
            return ForeignKey(None, module, tensor, adapter, kohya=True) if foreign_only or adapter else None
        component, path = _locate(module)
        if component is None and not foreign_only:
            return None
        if component == "unet" and module.startswith("diffusion_model."):
            if not path.startswith(_LDM_ROOTS):
                return ForeignKey(None, path, tensor, adapter)  # another model's `diffusion_model.`
            return ForeignKey(component, path, tensor, adapter, ldm=True)
        return ForeignKey(component, _normalise(component, path), tensor, adapter)
    return None


# -- formats we do not load -----------------------------------------------------------------------------------

_LOADERS = (
    "loha_diffusion loads LoRA/LoHa/LoKr adapters of SD1.x, SD2.x and SDXL (UNet and CLIP text encoders)"
)


# Names of textual-inversion files' tensors (A1111 safetensors embeddings, SDXL's clip_l/clip_g) and the widths
# of the SD text encoders' token embeddings (CLIP ViT-L 768, OpenCLIP ViT-H 1024, ViT-bigG 1280).
_EMBEDDING_KEYS = frozenset({"emb_params", "clip_l", "clip_g"})
_EMBEDDING_WIDTHS = frozenset({768, 1024, 1280})


def _embedding_like(key: str, tensor: torch.Tensor) -> bool:
    """A key of a textual-inversion file: a known name, or a dotless token (diffusers' `learned_embeds`) with a
    `(width,)` or `(n, width)` tensor of a CLIP width."""
    if key in _EMBEDDING_KEYS:
        return True
    return "." not in key and tensor.dim() in (1, 2) and tensor.shape[-1] in _EMBEDDING_WIDTHS


def identify_unsupported(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """(what the file looks like, the way forward) for files that hold no SD1/SDXL adapter in any layout here:
    a textual-inversion embedding, a full checkpoint, model weights, a LoRA for Flux, SD3 or another transformer
    model; None when the keys match none of these."""
    keys = list(state_dict)
    joined = "\n".join(keys)
    if keys and all(_embedding_like(k, state_dict[k]) for k in keys):
        return (
            f"a textual-inversion embedding (keys {sorted(keys)[:4]}), not an adapter",
            "load it with diffusers' pipe.load_textual_inversion(path, token=...) (for an SDXL embedding, its "
            "clip_l and clip_g tensors each with text_encoder= and tokenizer=)",
        )
    if re.search(
        r"^(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner\.embedders)\.", joined, re.M
    ):
        return (
            "a full Stable Diffusion checkpoint (model weights), not an adapter",
            "use it as the base model (diffusers' StableDiffusionPipeline.from_single_file, or a pipeline folder "
            "made from it as --pipeline)",
        )
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", joined):
        return "a LoRA for Flux (FLUX.1)", f"{_LOADERS}; load it with diffusers' FluxPipeline or ComfyUI"
    if re.search(r"joint_blocks|context_block|\.add_[qkv]_proj", joined):
        return (
            "a LoRA for SD3 (MMDiT)",
            f"{_LOADERS}; load it with diffusers' StableDiffusion3Pipeline or ComfyUI",
        )
    if re.search(r"^(transformer\.|lora_transformer_|diffusion_model\.)", joined, re.M):
        return (
            "a LoRA for a transformer (DiT) model such as Flux, SD3 or PixArt",
            f"{_LOADERS}; load it with the diffusers pipeline of that model or ComfyUI",
        )
    weights = [k for k in keys if k.endswith((".weight", ".bias"))]
    if weights and len(weights) == len(keys) and all(naming.diffusers_component(k) for k in keys):
        return (
            "model weights in diffusers' layout (e.g. unet/diffusion_pytorch_model.safetensors), not an adapter",
            "they belong in a diffusers pipeline folder (--pipeline)",
        )
    return None


def _refusal(what: str, fix: str) -> KohyaFormatError:
    return KohyaFormatError(f"This file looks like {what}: {fix}.")


# -- scales -----------------------------------------------------------------------------------------------------


def diffusers_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """`{component: PEFT config dict}` from the `lora_adapter_metadata` header diffusers' `save_lora_weights`
    writes (JSON, keys `<component>.<config field>`); empty without it.

    Raises:
        KohyaFormatError: the header is not a JSON object.
    """
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise KohyaFormatError(
            f"The file's {DIFFUSERS_METADATA_KEY!r} header is not valid JSON: {err}"
        ) from None
    if not isinstance(data, dict):
        raise KohyaFormatError(f"The file's {DIFFUSERS_METADATA_KEY!r} header is not a JSON object.")
    configs: dict[str, dict] = {}
    for key, value in data.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def config_scaling(config: Mapping, path: str) -> float:
    """The scale PEFT gives module `path` under `config` (a PEFT LoRA/LoHa/LoKr config dict): `alpha / r`, or
    `alpha / sqrt(r)` with `use_rslora`, where `rank_pattern` / `alpha_pattern` entries override `r` and the
    alpha as PEFT's `get_pattern_key` matches them (`config.get_pattern_key`); 1.0 when r or alpha is missing."""
    r = config.get("r")
    alpha = config.get("lora_alpha", config.get("alpha"))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(rank_pattern), path)
    r = rank_pattern[key] if key is not None else r
    key = get_pattern_key(list(alpha_pattern), path)
    alpha = alpha_pattern[key] if key is not None else alpha
    if not r or alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _set_alpha(tensors: dict[str, torch.Tensor], scaling: float) -> None:
    """Give a converted module the Kohya alpha of `scaling` (alpha = scaling × rank, as fp32); a LoKr with both
    halves full has no alpha in Kohya files (scale 1 everywhere), so a scale other than 1 goes into `lokr_w1`.
    A module with an alpha tensor, of no kind, or with problems (the reader reports them) is left as it is."""
    kind = detect_kind(tensors)
    if "alpha" in tensors or kind is None or adapter_class(kind).file_problems(tensors):
        return
    rank = adapter_class(kind).file_rank(tensors)
    if rank:
        tensors["alpha"] = torch.tensor(scaling * rank, dtype=torch.float32)
    elif scaling != 1.0:
        factor = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        tensors[factor] = (tensors[factor].float() * scaling).to(tensors[factor].dtype)


# -- the conversion ----------------------------------------------------------------------------------------------


class _Names:
    """Kohya module names for (component, path) of a file whose UNet is `arch` (None: diffusers UNet names)."""

    def __init__(self, arch: str | None):
        self.arch = arch
        self.layout = naming.standard_layout("sdxl") if arch == "sdxl" else None

    def __call__(self, component: str, path: str, ldm: bool = False) -> str:
        if component == "unet" and ldm:
            return naming.to_kohya(naming.UNET_PREFIX, path)  # LDM names load onto SD1 and SDXL UNets alike
        if component == "unet":
            if self.layout is not None:
                try:
                    return naming.unet_kohya_name(path, "ldm", self.layout)
                except ValueError:  # no LDM name: the diffusers name still loads onto the model
                    pass
            return naming.to_kohya(naming.UNET_PREFIX, path)
        if component == "text_encoder_2":
            return naming.text_encoder_kohya_name(path, naming.TE2_PREFIX)
        prefix = naming.TE1_PREFIX if self.arch == "sdxl" else naming.TE_PREFIX
        return naming.text_encoder_kohya_name(path, prefix)


def _architecture(parsed: Mapping[str, ForeignKey]) -> str | None:
    if any(p.component == "text_encoder_2" for p in parsed.values()):
        return "sdxl"
    return naming.guess_unet_architecture(p.path for p in parsed.values() if p.component == "unet")


def _check_keys(state_dict: Mapping[str, torch.Tensor], parsed: Mapping[str, ForeignKey]) -> None:
    """Refuse files that hold several PEFT adapters or modules of no SD UNet / CLIP text model."""
    adapters = sorted({p.adapter for p in parsed.values() if p.adapter})
    if len(adapters) > 1:
        raise KohyaFormatError(
            f"This PEFT state dict holds {len(adapters)} adapters {adapters}; save one per file "
            "(peft.get_peft_model_state_dict(model, adapter_name=...)) or save_pretrained a folder."
        )
    unknown = sorted({key for key, p in parsed.items() if p.component is None and not p.kohya})
    if unknown:
        what, fix = identify_unsupported(state_dict) or (
            "an adapter for another model",
            f"{_LOADERS}; keys such as {unknown[:3]} name no module of those",
        )
        raise _refusal(what, fix)


def _group(
    state_dict: Mapping[str, torch.Tensor], parsed: Mapping[str, ForeignKey], names: _Names
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, ForeignKey]]:
    """The converted tensors by Kohya module name, and one parsed key of each module (its component and path)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    origin: dict[str, ForeignKey] = {}
    clashes = []
    for key, p in parsed.items():
        name = p.path if p.kohya else names(p.component, p.path, p.ldm)
        tensors = modules.setdefault(name, {})
        if p.tensor in tensors:
            clashes.append(f"{key} -> {name}.{p.tensor}")
        tensors[p.tensor] = state_dict[key]
        origin.setdefault(name, p)
    if clashes:
        raise KohyaFormatError(
            "Several keys of this file give the same Kohya tensor (the file names a module twice): "
            + "; ".join(clashes[:5])
        )
    return modules, origin


def _convert(
    state_dict: Mapping[str, torch.Tensor], parsed: Mapping[str, ForeignKey], metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _check_keys(state_dict, parsed)
    arch = _architecture(parsed)
    modules, origin = _group(state_dict, parsed, _Names(arch))
    configs = diffusers_configs(metadata)
    out = {k: v for k, v in state_dict.items() if k not in parsed}
    for name, tensors in modules.items():
        p = origin[name]
        if not p.kohya:  # a Kohya module keeps the Kohya meaning of its alpha (or of its missing alpha)
            config = configs.get(p.component)
            _set_alpha(tensors, config_scaling(config, p.path) if config else 1.0)
        out.update({f"{name}.{tensor}": value for tensor, value in tensors.items()})
    metadata.pop(DIFFUSERS_METADATA_KEY, None)  # consumed into the alphas; diffusers refuses it beside alphas
    if arch == "sdxl":  # SD1 and SD2 share their paths: only SDXL is certain (A1111 sorts its Lora tab by it)
        metadata.setdefault("ss_base_model_version", naming.BASE_MODEL_VERSIONS[arch])
    return out, metadata


def _rename_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<prefix>_text_model_text_projection.*` -> `<prefix>_text_projection.*`, with a warning."""
    renames = {}
    for prefix in (naming.TE_PREFIX, naming.TE1_PREFIX, naming.TE2_PREFIX):
        for module in naming.TE_TOP_LEVEL_MODULES:
            renames[naming.legacy_text_encoder_kohya_name(module, prefix)] = naming.text_encoder_kohya_name(
                module, prefix
            )
    out, renamed = {}, set()
    for key, tensor in state_dict.items():
        module, dot, rest = key.partition(".")
        if module in renames:
            renamed.add(module)
            key = renames[module] + dot + rest
        out[key] = tensor
    if renamed:
        warnings.warn(
            f"{sorted(renamed)}: the name older loha_diffusion versions wrote, which ComfyUI and A1111 do not map; "
            f"read as {sorted(renames[m] for m in renamed)} (OneTrainer's name, which ComfyUI maps). Re-save the "
            "file (loha-diffusion convert IN OUT) so that ComfyUI applies it.",
            UserWarning,
            stacklevel=4,
        )
    return out


def as_kohya_layout(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, bundled.BundledEmbedding]]:
    """The state dict and metadata of an adapter file with every tensor under its Kohya name (the layouts of
    this module's docstring; Kohya keys pass unchanged), tensors as given (same objects, plus fp32 0-dim alphas
    for converted modules), and the textual-inversion embeddings the file bundles (A1111's `bundle_emb.*`, by
    name; kept apart from the adapter). The `lora_adapter_metadata` header is consumed into the alphas and
    `ss_base_model_version` added when the paths tell SDXL.

    Warns (`formats.embeddings.BundledEmbeddingWarning`) when the file bundles embeddings: only
    `pipeline.load_adapter` applies them (it silences this warning).

    Raises:
        KohyaFormatError: a file that holds no SD1/SDXL adapter (only embeddings, a Flux/SD3 LoRA, a checkpoint,
            model weights: named, with the way forward), several PEFT adapters, or two keys for one tensor.
    """
    metadata = dict(metadata or {})
    found, state = bundled.split_bundled(state_dict)
    if found and not state:
        raise _refusal(
            f"textual-inversion embeddings {sorted(found)} bundled the A1111 way (bundle_emb.*) with no adapter",
            "load each with diffusers' pipe.load_textual_inversion(tensor, token=name) (tensors "
            "bundle_emb.<name>.string_to_param.*, or .clip_l / .clip_g with text_encoder= and tokenizer=)",
        )
    if found:
        warnings.warn(
            bundled.not_applied_message(sorted(found), "The file"), bundled.BundledEmbeddingWarning, 3
        )
    state = _rename_legacy(state)
    parsed = {key: p for key in state if (p := parse_key(key)) is not None}
    if not parsed:
        unsupported = identify_unsupported(state)
        if unsupported is not None:
            raise _refusal(*unsupported)
        return state, metadata, found
    state, metadata = _convert(state, parsed, metadata)
    return state, metadata, found
