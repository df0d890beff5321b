"""The adapter files a run writes for users: the Kohya/LyCORIS `.safetensors` (what ComfyUI, A1111 and
`load_adapter` read) with sd-scripts' training metadata, and the PEFT-format folder.

`training_metadata` is the one place the file's training facts (`ss_steps`, `ss_dataset_dirs`, ...) are
built, from the config, the step schedule and the data summary. Settings a resume changed are recorded with
the value in force at the end (`ss_learning_rate`, ...) and their history in `loha_diffusion.resume_changes`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..formats import naming
from ..formats.convert import peft_output_folder
from ..formats.kohya import save_kohya
from ..formats.kohya.metadata import public_name
from ..formats.peft import save_peft
from ..single_file import checkpoint_hashes, is_single_file
from ..utils import torch_dtype
from .buckets import BucketSettings, assign_records, bucket_resolutions, record_size
from .config import TrainConfig
from .data import DatasetSummary, ImageRecord, Schedule
from .models import ADAPTER_NAME
from .optimizers import optimizer_description

logger = logging.getLogger(__name__)

RESUME_CHANGES_KEY = "loha_diffusion.resume_changes"  # file metadata: the settings resumes changed


def base_model_version(unet: nn.Module, prediction_type: str) -> str | None:
    """Kohya's `ss_base_model_version` of the trained base: "sdxl_base_v1-0" for an SDXL UNet (its "text_time"
    added embeddings; sd-scripts' `sdxl_train_network.py` writes this for SDXL whatever the prediction type),
    "sd_v2" / "sd_v2_v" for SD2 (cross-attention 1024; `_v` for v-prediction, as kohya's `--v_parameterization`),
    None for SD1 (the exporter detects "sd_v1" from the UNet's shape).

    The value also sets `modelspec.architecture` and `ss_v2`, which A1111 and ComfyUI use to sort and filter."""
    if unet.config.get("addition_embed_type") == "text_time":
        return naming.BASE_MODEL_VERSIONS["sdxl"]
    if unet.config.get("cross_attention_dim") == 1024:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"
    return None


def text_encoder_lrs(cfg: TrainConfig, arch: str | None) -> float | list[float] | None:
    """Kohya's `ss_text_encoder_lr`: None when no text encoder is trained; else the text-encoder learning rate
    (`text_encoder_lr`, default `learning_rate`), or for SDXL with a different `text_encoder_2_lr` the list
    `[te1 lr, te2 lr]`, as sd-scripts writes its per-encoder `--text_encoder_lr te1 te2` (train_network.py
    passes the list through to the metadata). One value when both encoders share it, as older readers expect."""
    if not cfg.train_text_encoder:
        return None
    te1 = cfg.text_encoder_lr or cfg.learning_rate
    te2 = cfg.text_encoder_2_lr or te1
    return [te1, te2] if arch == "sdxl" and te2 != te1 else te1


def dataset_facts(records: Iterable[ImageRecord]) -> dict[str, Any]:
    """Kohya's `ss_dataset_dirs` (`{folder: {"n_repeats", "img_count"}}`) and `ss_tag_frequency`
    (`{folder: {tag: count}}`, tags = the comma-separated parts of the captions)."""
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, Counter] = {}
    for record in records:
        folder = record.path.parent.name
        entry = dirs.setdefault(folder, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
        counter = tags.setdefault(folder, Counter())
        counter.update(t.strip() for t in record.caption.split(",") if t.strip())
    return {"dataset_dirs": dirs, "tag_frequency": {k: dict(v) for k, v in tags.items()}}


def bucket_info(cfg: TrainConfig, records: Sequence[ImageRecord]) -> dict[str, Any] | None:
    """kohya's `ss_bucket_info` (`BaseDataset.bucket_info`, library/train_util.py) of the epoch's `records`
    (regularization images included, as kohya buckets them): `{"buckets": {index: {"resolution": [width,
    height], "count": samples per epoch (repeats counted)}}, "mean_img_ar_error": mean |bucket w/h - image
    w/h| over the images}`, the index being the bucket's place among kohya's sorted bucket resolutions (all
    of `bucket_resolutions`, or with `bucket_no_upscale` the ones used); buckets without samples are left
    out. None without `enable_bucket` (kohya writes null).

    Raises:
        ConfigError: the bucket settings do not fit together (`buckets.BucketSettings.from_config`).
        DataError: an image gets no bucket, or a hand-built record's image cannot be read (`record_size`).
    """
    if not cfg.enable_bucket:
        return None
    settings = BucketSettings.from_config(cfg)
    sizes = [record_size(r) for r in records]
    choices = assign_records(records, settings, sizes)
    if settings.no_upscale:
        resolutions = sorted({c.bucket for c in choices})
    else:
        resolutions = sorted(
            bucket_resolutions(settings.resolution, settings.min_reso, settings.max_reso, settings.steps)
        )
    counts: Counter = Counter()
    for record, choice in zip(records, choices):
        counts[choice.bucket] += record.repeats
    buckets = {
        i: {"resolution": list(reso), "count": counts[reso]}
        for i, reso in enumerate(resolutions)
        if counts[reso]
    }
    errors = [abs(c.bucket[0] / c.bucket[1] - w / h) for c, (w, h) in zip(choices, sizes)]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def data_settings(cfg: TrainConfig, summary: DatasetSummary) -> dict[str, Any]:
    """The data, caption and text-encoding settings of issue 12 under sd-scripts' `ss_*` names
    (train_network.py's metadata; booleans as Python writes them, "True"/"False", as kohya's `str()` does):
    `ss_enable_bucket`, `ss_min_bucket_reso` / `ss_max_bucket_reso` (resolved; only with buckets, kohya's
    None otherwise), `ss_bucket_no_upscale`, `ss_bucket_info` (`bucket_info`), `ss_flip_aug`,
    `ss_random_crop`, `ss_cache_latents`, `ss_shuffle_caption`, `ss_keep_tokens`,
    `ss_caption_dropout_rate`, `ss_caption_tag_dropout_rate`, `ss_prior_loss_weight`, `ss_num_reg_images`
    (regularization images times their folders' repeats, kohya's count before it grows them to the training
    samples), `ss_reg_dataset_dirs` (`{folder: {"n_repeats", "img_count"}}`), `ss_max_token_length`,
    `ss_clip_skip` (None values are left out of the file).

    Raises:
        ConfigError: the bucket settings do not fit together.
        DataError: an image gets no bucket.
    """
    settings = BucketSettings.from_config(cfg) if cfg.enable_bucket else None
    reg = summary.regularization.records if summary.regularization is not None else ()
    return {
        "ss_enable_bucket": str(bool(cfg.enable_bucket)),
        "ss_min_bucket_reso": settings.min_reso if settings else None,
        "ss_max_bucket_reso": settings.max_reso if settings else None,
        "ss_bucket_no_upscale": str(bool(settings and settings.no_upscale)),
        "ss_bucket_info": bucket_info(cfg, summary.epoch_records),
        "ss_flip_aug": str(bool(cfg.random_flip)),
        "ss_random_crop": str(cfg.center_crop is False),
        "ss_cache_latents": str(bool(cfg.cache_latents)),
        "ss_shuffle_caption": str(bool(cfg.shuffle_caption)),
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_num_reg_images": sum(r.repeats for r in reg),
        "ss_reg_dataset_dirs": dataset_facts(reg)["dataset_dirs"],
        "ss_max_token_length": cfg.max_token_length,
        "ss_clip_skip": cfg.clip_skip,
    }


def base_model_facts(cfg: TrainConfig) -> dict[str, str]:
    """The base model as the file names it, never by local path (a published adapter must not carry its
    author's folders): `sd_model_name` (`ss_sd_model_name`) the hub id or the folder's / file's name
    (`formats.kohya.metadata.public_name`); for a single-file base also kohya's `ss_sd_model_hash` (A1111's
    legacy 8-hex hash) and `ss_new_sd_model_hash` (sha256), as sd-scripts' `train_network.py` writes them
    (`single_file.checkpoint_hashes`, hashed once per file and run); `ss_vae_name` for a separate VAE.

    Raises:
        OSError: the single-file base model cannot be read."""
    facts = {"sd_model_name": public_name(cfg.pretrained_model_name_or_path)}
    if is_single_file(cfg.pretrained_model_name_or_path):
        hashes = checkpoint_hashes(cfg.pretrained_model_name_or_path)
        facts["ss_sd_model_hash"] = hashes["sd_model_hash"]
        facts["ss_new_sd_model_hash"] = hashes["new_sd_model_hash"]
    if cfg.pretrained_vae_model_name_or_path:
        facts["ss_vae_name"] = public_name(cfg.pretrained_vae_model_name_or_path)
    return facts


def training_metadata(
    cfg: TrainConfig,
    schedule: Schedule,
    summary: DatasetSummary,
    *,
    prediction_type: str,
    mixed_precision: str,
    started_at: float,
    step: int,
    epoch: int,
    finished_at: float | None = None,
    resume_changes: list[dict[str, Any]] | None = None,
    arch: str | None = None,
) -> dict[str, Any]:
    """The training facts of a file written after optimizer step `step` in (1-based) `epoch`, as the short
    `training_info` names of `formats.kohya.kohya_metadata` (None values are left out of the file), plus
    `RESUME_CHANGES_KEY` when a resume changed settings.

    `prediction_type` is the one trained ("epsilon"/"v_prediction"), `mixed_precision` accelerate's ("no",
    "fp16", "bf16"); `started_at`/`finished_at` are Unix times in seconds (`finished_at` only for the final
    file). `cfg` holds the settings in force now: after a resume that changed `learning_rate`,
    `ss_learning_rate` is the new value, and `resume_changes` (`[{"after_step", "setting", "old", "new"}]`,
    e.g. learning_rate 0.001 until step 4, then 1e-05) is written as JSON under `RESUME_CHANGES_KEY`.
    `arch` ("sd1", "sd2", "sdxl"; `Models.arch`) picks the SDXL form of `ss_text_encoder_lr`
    (`text_encoder_lrs`). Only names go into the file, never local paths: the base model as `base_model_facts`
    says (name, and a single file's hashes), the dataset keys are folder names. `ss_resolution` and
    `modelspec.resolution` are `cfg.resolution` (the architecture's default once `resolve_arch_defaults` ran:
    1024 for SDXL). As sd-scripts' train_network.py: `ss_num_train_images` counts images times repeats,
    `ss_unet_lr` is the UNet's rate (`unet_lr`, else `learning_rate`), `ss_optimizer` the optimizer class and
    its `optimizer_args` (`optimizers.optimizer_description`), and the data, caption, bucket and text-encoding
    settings are `data_settings`.

    Raises:
        OSError: the single-file base model cannot be read to hash it.
        ConfigError: the bucket settings do not fit together (checked at the start of a run already).
        DataError: an image gets no bucket (checked at the start of a run already)."""
    return {
        "max_train_steps": schedule.max_train_steps,
        "resolution": cfg.resolution,
        "num_train_images": summary.num_train_samples,
        "training_started_at": started_at,
        "learning_rate": cfg.learning_rate,
        "unet_lr": cfg.effective_unet_lr,
        "text_encoder_lr": text_encoder_lrs(cfg, arch),
        "lr_scheduler": cfg.lr_scheduler,
        "optimizer": optimizer_description(cfg),
        "batch_size": schedule.total_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_num_batches_per_epoch": schedule.batches_per_epoch,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "mixed_precision": mixed_precision,
        "seed": cfg.seed,
        "noise_offset": cfg.noise_offset or None,
        "min_snr_gamma": cfg.snr_gamma,
        **base_model_facts(cfg),
        "prediction_type": prediction_type,
        **dataset_facts(summary.records),
        **data_settings(cfg, summary),
        "steps": step,
        "epoch": epoch,
        "epochs": schedule.num_epochs,
        **({"training_finished_at": finished_at} if finished_at is not None else {}),
        **({RESUME_CHANGES_KEY: json.dumps(resume_changes)} if resume_changes else {}),
    }


def export_kohya(
    path: str | Path,
    cfg: TrainConfig,
    *,
    unet: nn.Module,
    text_encoder: nn.Module | None,
    text_encoder_2: nn.Module | None = None,
    prediction_type: str,
    training_info: dict[str, Any],
) -> Path:
    """Write the trained adapter(s) as one Kohya/LyCORIS `.safetensors` in `save_precision`, with metadata.

    `unet`/`text_encoder`/`text_encoder_2` are the unwrapped models holding adapter `ADAPTER_NAME`
    (`text_encoder` None: not trained; `text_encoder_2` SDXL's second encoder). One text encoder is written as
    `lora_te_*`, SDXL's two as `lora_te1_*` / `lora_te2_*` and the UNet under sd-scripts' SDXL (LDM) names, with
    `ss_base_model_version` "sdxl_base_v1-0" (`base_model_version`). `training_info` comes from
    `training_metadata` (its `loha_diffusion.*` keys are written as they are). The file is written atomically;
    returns `path`.

    Raises:
        KohyaFormatError: the adapters cannot be written as a Kohya file (the message lists every problem).
        OSError: the folder cannot be written.
    """
    own = {k: v for k, v in training_info.items() if k.startswith("loha_diffusion.")}
    written = save_kohya(
        path,
        unet=unet,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        adapter_name=ADAPTER_NAME,
        dtype=torch_dtype(cfg.save_precision),
        base_model_version=base_model_version(unet, prediction_type),
        output_name=cfg.name,
        training_info={k: v for k, v in training_info.items() if k not in own},
        metadata=own,
    )
    logger.info("wrote %s", written)
    return written


def export_peft(
    directory: str | Path,
    cfg: TrainConfig,
    *,
    unet: nn.Module,
    text_encoder: nn.Module | None,
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write the PEFT-format folder(s) (`<dir>/unet/`, and `<dir>/text_encoder/`, SDXL also
    `<dir>/text_encoder_2/`, if trained: diffusers' pipeline component names) in `save_precision`; returns
    `directory`.

    The folder is written whole (`formats.convert.peft_output_folder`): a kill during the export leaves the
    previous folder or the new one, never a mix of two runs' components.

    Raises:
        PeftFormatError: the adapters cannot be written in PEFT's format (checked before anything is written).
        NonFiniteError: a tensor is non-finite or overflows `save_precision` (nothing is written).
        OutputWriteError: no space left, or no permission (the previous folder is unchanged).
        OSError: the folder cannot be written.
    """
    directory = Path(directory)
    with peft_output_folder(directory) as tmp:
        save_peft(
            tmp,
            unet=unet,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            adapter_name=ADAPTER_NAME,
            dtype=torch_dtype(cfg.save_precision),
        )
    logger.info("wrote %s", directory)
    return directory
