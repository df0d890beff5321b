"""Textual-inversion embeddings bundled in LoRA files (A1111's `bundle_emb.*` keys): split them from the adapter
tensors, and load them into a pipeline's tokenizer(s) and text encoder(s).

The layout is A1111's (`extensions-builtin/Lora/networks.py`, `load_network`, and
`modules/textual_inversion/textual_inversion.py`, `create_embedding_from_data`): a key is
`bundle_emb.<name>.<vectors>`, where `<vectors>` is `string_to_param.<anything>` for an SD1/SD2 embedding
(`(n_vectors, width)`), `clip_l` and `clip_g` for an SDXL one (one `(n_vectors, width)` tensor per text
encoder), or a single other name (a diffusers concept). A1111 registers each as an embedding named `<name>` and
skips it (keeping the LoRA) when its shape does not fit the model or the name is already taken; ComfyUI ignores
these keys. Here `pipeline.load_adapter` loads them with diffusers' `load_textual_inversion` (token `<name>`,
multi-vector embeddings as `<name>`, `<name>_1`, ..., which the pipelines expand in prompts), and skips with a
warning what A1111 skips.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

BUNDLE_PREFIX = "bundle_emb."

# The text encoders an SDXL embedding's tensors belong to (A1111's names -> the pipeline's components).
SDXL_PARTS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}


class BundledEmbeddingWarning(UserWarning):
    """An embedding bundled in a LoRA file was not applied (the reader keeps it apart, in `KohyaFile.embeddings`;
    `load_kohya` does not apply it; `pipeline.load_adapter` applies it and silences this warning)."""


@dataclass
class BundledEmbedding:
    """One embedding of a LoRA file: its `name` (the prompt token) and its tensors by A1111's names
    (`string_to_param.*`, or `clip_l` and `clip_g`), as stored (file dtype, CPU); `problems` says why it cannot
    be used anywhere (several `string_to_param` terms, an unknown layout)."""

    name: str
    tensors: dict[str, torch.Tensor]
    problems: list[str] = field(default_factory=list)

    @property
    def is_sdxl(self) -> bool:
        """Has a `clip_l` and a `clip_g` part (A1111's SDXL embedding)."""
        return all(part in self.tensors for part in SDXL_PARTS)

    def vectors(self) -> dict[str, torch.Tensor]:
        """`{text encoder component: (n_vectors, width) tensor}`: `text_encoder` for an SD1/SD2 embedding,
        `text_encoder` and `text_encoder_2` for an SDXL one; empty when `problems`. A 1-D vector counts as one."""
        if self.problems:
            return {}
        if self.is_sdxl:
            parts = {SDXL_PARTS[k][0]: v for k, v in self.tensors.items() if k in SDXL_PARTS}
        else:
            parts = {"text_encoder": next(iter(self.tensors.values()))}
        return {k: v.reshape(1, -1) if v.dim() == 1 else v for k, v in parts.items()}


def _embedding(name: str, tensors: dict[str, torch.Tensor]) -> BundledEmbedding:
    """Classify as A1111's `create_embedding_from_data` does: string_to_param, SDXL (clip_l + clip_g), one term."""
    embedding = BundledEmbedding(name, tensors)
    terms = [k for k in tensors if k.startswith("string_to_param")]
    if terms:
        if len(terms) > 1:
            embedding.problems.append(f"has {len(terms)} string_to_param terms {terms} (A1111 accepts one)")
        embedding.tensors = {terms[0]: tensors[terms[0]]}
    elif not embedding.is_sdxl and len(tensors) != 1:
        embedding.problems.append(
            f"has tensors {sorted(tensors)}: neither string_to_param.*, clip_l + clip_g, nor a single vector set"
        )
    bad = [k for k, v in embedding.tensors.items() if v.dim() not in (1, 2)]
    if bad:
        embedding.problems.append(f"tensors {bad} are not (n_vectors, width) matrices")
    return embedding


def split_bundled(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, BundledEmbedding], dict[str, torch.Tensor]]:
    """`({name: BundledEmbedding}, the other tensors)` of a LoRA file's state dict (tensors kept as given)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, vectors = key[len(BUNDLE_PREFIX) :].partition(".")
            grouped.setdefault(name, {})[vectors] = tensor
        else:
            rest[key] = tensor
    return {name: _embedding(name, tensors) for name, tensors in grouped.items()}, rest


def not_applied_message(names: list[str], where: str) -> str:
    """The warning for embeddings `names` that `where` (e.g. "load_kohya") does not apply, with the way to
    apply them."""
    return (
        f"{where} bundles textual-inversion embeddings {names} (A1111 `bundle_emb.*` keys): they are not part "
        "of the adapter, so load_kohya does not apply them and converted files do not carry them. "
        "loha_diffusion.pipeline.load_adapter loads them into the pipeline's tokenizer and text encoder(s), as "
        "A1111 does (ComfyUI ignores them)."
    )


@dataclass
class _Planned:
    name: str
    component: str  # text_encoder / text_encoder_2
    tokenizer: str  # tokenizer / tokenizer_2
    vectors: torch.Tensor


def _tokens(name: str, count: int) -> list[str]:
    """The tokens diffusers' `load_textual_inversion` adds for `count` vectors: `name`, `name_1`, ..."""
    return [name] + [f"{name}_{i}" for i in range(1, count)]


def _skip_reason(pipe: Any, embedding: BundledEmbedding) -> str | None:
    """Why A1111 would skip this embedding on this pipeline (shape, layout, name taken), None if it fits."""
    if embedding.problems:
        return "; ".join(embedding.problems)
    if not hasattr(pipe, "load_textual_inversion"):
        return f"{type(pipe).__name__} has no load_textual_inversion (diffusers' TextualInversionLoaderMixin)"
    two_encoders = getattr(pipe, "text_encoder_2", None) is not None
    if embedding.is_sdxl != two_encoders:
        kind = "an SDXL (clip_l + clip_g)" if embedding.is_sdxl else "a one-encoder (SD1/SD2)"
        return f"it is {kind} embedding and the pipeline has {'two text encoders' if two_encoders else 'one'}"
    for component, vectors in embedding.vectors().items():
        encoder = getattr(pipe, component, None)
        tokenizer = getattr(pipe, "tokenizer_2" if component == "text_encoder_2" else "tokenizer", None)
        if encoder is None or tokenizer is None:
            return f"the pipeline has no {component} or its tokenizer"
        width = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            return f"its {component} vectors are {vectors.shape[1]} wide, the encoder's embeddings {width}"
        taken = [t for t in _tokens(embedding.name, vectors.shape[0]) if t in tokenizer.get_vocab()]
        if taken:
            return f"the tokens {taken} are already in the pipeline's {component} tokenizer"
    return None


def plan_embeddings(pipe: Any, embeddings: Mapping[str, BundledEmbedding]) -> list[_Planned]:
    """What `load_embeddings` will load into `pipe`, checked before anything changes; embeddings A1111 would
    skip (a shape or layout that does not fit, a name already in the tokenizer) are skipped here too, each
    with a `BundledEmbeddingWarning` naming it and the reason."""
    planned = []
    for embedding in embeddings.values():
        reason = _skip_reason(pipe, embedding)
        if reason is not None:
            warnings.warn(
                f"Bundled embedding {embedding.name!r} is not loaded: {reason} (A1111 skips it too).",
                BundledEmbeddingWarning,
                stacklevel=3,
            )
            continue
        for component, vectors in embedding.vectors().items():
            tokenizer = "tokenizer_2" if component == "text_encoder_2" else "tokenizer"
            planned.append(_Planned(embedding.name, component, tokenizer, vectors))
    return planned


def load_embeddings(pipe: Any, planned: list[_Planned]) -> list[str]:
    """Load `plan_embeddings`' result with diffusers' `pipe.load_textual_inversion` (token = the embedding's name;
    vectors cast to the text encoder's dtype and device by diffusers) and return the names loaded. On an error the
    tokens added so far are removed again (`unload_textual_inversion`) before it propagates.

    Raises:
        ValueError, TypeError: (diffusers) the embedding cannot be loaded; the pipeline's tokenizers are as before.
    """
    done: list[_Planned] = []
    try:
        for item in planned:
            pipe.load_textual_inversion(
                item.vectors,
                token=item.name,
                text_encoder=getattr(pipe, item.component),
                tokenizer=getattr(pipe, item.tokenizer),
            )
            done.append(item)
    except Exception:
        for item in done:
            pipe.unload_textual_inversion(
                _tokens(item.name, item.vectors.shape[0]),
                tokenizer=getattr(pipe, item.tokenizer),
                text_encoder=getattr(pipe, item.component),
            )
        raise
    return list(dict.fromkeys(item.name for item in planned))
