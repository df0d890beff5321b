"""The files a run writes for SDXL (Kohya `lora_te1_`/`lora_te2_`, PEFT `text_encoder_2/`) and their metadata:
the architecture, the resolution, per-encoder learning rates, and the base model by name and hash, never by path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loha_diffusion import tiny
from loha_diffusion.config import LoHaConfig
from loha_diffusion.formats.kohya.metadata import read_metadata
from loha_diffusion.model import inject_adapter
from loha_diffusion.single_file import checkpoint_hashes
from loha_diffusion.targeting import text_encoder_preset
from loha_diffusion.training.config import load_config
from loha_diffusion.training.data import DatasetSummary, ImageRecord, Schedule
from loha_diffusion.training.export import (
    base_model_version,
    export_kohya,
    export_peft,
    text_encoder_lrs,
    training_metadata,
)


def config(model: str | Path, tmp_path: Path, *flags: str):
    return load_config(
        ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tmp_path / "data")]
        + ["--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", *flags]
    )


def adapted_sdxl():
    """Tiny SDXL UNet and both text encoders with LoHa "default" adapters."""
    unet = tiny.build_tiny_unet("sdxl")
    te1, te2 = tiny.build_tiny_text_encoder("sdxl", 1), tiny.build_tiny_text_encoder("sdxl", 2)
    inject_adapter(unet, LoHaConfig(r=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for te in (te1, te2):
        inject_adapter(te, text_encoder_preset(algo="loha", r=2, alpha=2))
    return unet, te1, te2


def metadata_for(cfg, arch: str = "sdxl") -> dict:
    schedule = Schedule(
        num_samples=1,
        num_processes=1,
        batches_per_epoch=1,
        update_steps_per_epoch=1,
        max_train_steps=2,
        num_epochs=2,
        total_batch_size=1,
    )
    data = Path("/home/someone/private/data")
    records = (ImageRecord(data / "10_cat" / "a.png", "a cat"),)
    summary = DatasetSummary(root=data, layout="kohya", records=records, skipped=(), small_images=0)
    return training_metadata(
        cfg,
        schedule,
        summary,
        prediction_type="epsilon",
        mixed_precision="no",
        started_at=0.0,
        step=2,
        epoch=2,
        arch=arch,
    )


def test_sdxl_kohya_file_and_peft_folder(tmp_path):
    unet, te1, te2 = adapted_sdxl()
    cfg = config(
        "stabilityai/stable-diffusion-xl-base-1.0", tmp_path, "--resolution", "1024", "--train_text_encoder"
    )
    assert base_model_version(unet, "epsilon") == "sdxl_base_v1-0"
    info = metadata_for(cfg)
    path = export_kohya(
        tmp_path / "a.safetensors",
        cfg,
        unet=unet,
        text_encoder=te1,
        text_encoder_2=te2,
        prediction_type="epsilon",
        training_info=info,
    )
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    prefixes = {key.split(".")[0].split("_")[1] for key in keys}
    assert prefixes == {"unet", "te1", "te2"}
    meta = read_metadata(path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_resolution"] == "(1024, 1024)" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["ss_sd_model_name"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "/home/someone" not in "".join(meta.values())

    folder = export_peft(tmp_path / "a_peft", cfg, unet=unet, text_encoder=te1, text_encoder_2=te2)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert (folder / component / "adapter_model.safetensors").is_file(), component


def test_text_encoder_learning_rates(tmp_path):
    base = ("--learning_rate", "1e-4")
    assert text_encoder_lrs(config("m", tmp_path, *base), "sdxl") is None  # no text encoder trained
    same = config("m", tmp_path, *base, "--train_text_encoder", "--text_encoder_lr", "1e-5")
    assert text_encoder_lrs(same, "sdxl") == 1e-5
    assert text_encoder_lrs(config("m", tmp_path, *base, "--train_text_encoder"), "sdxl") == 1e-4
    both = config("m", tmp_path, *base, "--train_text_encoder", "--text_encoder_lr", "1e-5")
    both.text_encoder_2_lr = 2e-5
    # sd-scripts writes its per-encoder --text_encoder_lr list for SDXL; SD1 has one encoder.
    assert text_encoder_lrs(both, "sdxl") == [1e-5, 2e-5] and text_encoder_lrs(both, "sd1") == 1e-5
    unet, te1, te2 = adapted_sdxl()
    path = export_kohya(
        tmp_path / "lr.safetensors",
        both,
        unet=unet,
        text_encoder=te1,
        text_encoder_2=te2,
        prediction_type="epsilon",
        training_info=metadata_for(both),
    )
    assert read_metadata(path)["ss_text_encoder_lr"] == "[1e-05, 2e-05]"


@pytest.mark.parametrize("fixture", ["tiny_sd1_single_file", "tiny_sdxl_single_file"])
def test_single_file_base_is_recorded_by_name_and_hash(fixture, request, tmp_path):
    checkpoint = request.getfixturevalue(fixture)
    cfg = config(checkpoint, tmp_path, "--resolution", "64")
    cfg.pretrained_vae_model_name_or_path = str(tmp_path / "my-vaes" / "sdxl-vae-fp16-fix")
    meta = metadata_for(cfg, arch="sdxl" if "sdxl" in fixture else "sd1")
    hashes = checkpoint_hashes(checkpoint)
    assert meta["sd_model_name"] == checkpoint.stem
    assert meta["ss_sd_model_hash"] == hashes["sd_model_hash"] and len(hashes["sd_model_hash"]) == 8
    assert meta["ss_new_sd_model_hash"] == hashes["new_sd_model_hash"]
    assert meta["ss_vae_name"] == "sdxl-vae-fp16-fix"
    unet = tiny.build_tiny_unet("sd1")
    inject_adapter(unet, LoHaConfig(r=2, alpha=2, target_modules=["to_q"]))
    path = export_kohya(
        tmp_path / "b.safetensors",
        cfg,
        unet=unet,
        text_encoder=None,
        prediction_type="epsilon",
        training_info=meta,
    )
    written = read_metadata(path)
    assert written["ss_sd_model_hash"] == hashes["sd_model_hash"]
    assert str(tmp_path) not in "".join(written.values()) and str(checkpoint.parent) not in "".join(
        written.values()
    )


def test_kohya_tensor_dtype_follows_save_precision(tmp_path):
    unet, te1, te2 = adapted_sdxl()
    cfg = config("m", tmp_path, "--save_precision", "bf16")
    path = export_kohya(
        tmp_path / "c.safetensors",
        cfg,
        unet=unet,
        text_encoder=None,
        prediction_type="epsilon",
        training_info={},
    )
    with safe_open(path, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert not any(k.startswith("lora_te") for k in f.keys())


def test_issue_12_settings_in_the_metadata_under_kohyas_names(tmp_path):
    """Buckets (kohya's bucket_info, hand-computed), caption tools, regularization images, long prompts, clip
    skip and the optimizer with its arguments, as sd-scripts' train_network.py names and writes them."""
    flags = (
        "--resolution",
        "256",
        "--enable_bucket",
        "--random_flip",
        "--shuffle_caption",
        "--keep_tokens",
        "2",
    )
    flags += (
        "--caption_tag_dropout_rate",
        "0.1",
        "--caption_dropout_rate",
        "0.05",
        "--prior_loss_weight",
        "0.5",
    )
    flags += (
        "--optimizer_type",
        "adafactor",
        "--optimizer_args",
        "relative_step=False",
        "scale_parameter=False",
    )
    flags += ("--unet_lr", "2e-4", "--clip_skip", "2", "--cache_latents")
    cfg = config("m", tmp_path, *flags)
    cfg.max_token_length = 225
    data = Path("/home/someone/private/data")
    records = (
        ImageRecord(data / "10_cat" / "a.png", "a cat", repeats=10, size=(256, 256)),
        ImageRecord(data / "10_cat" / "b.png", "a wide cat", repeats=10, size=(512, 256)),
    )
    reg = (ImageRecord(data / "reg" / "1_cat" / "r.png", "a cat", repeats=1, size=(200, 400), is_reg=True),)
    summary = DatasetSummary(
        root=data,
        layout="kohya",
        records=records,
        skipped=(),
        small_images=0,
        regularization=DatasetSummary(
            root=data / "reg", layout="kohya", records=reg, skipped=(), small_images=0
        ),
    )
    schedule = Schedule(
        num_samples=40,
        num_processes=1,
        batches_per_epoch=40,
        update_steps_per_epoch=40,
        max_train_steps=2,
        num_epochs=1,
        total_batch_size=1,
    )
    info = training_metadata(
        cfg,
        schedule,
        summary,
        prediction_type="epsilon",
        mixed_precision="no",
        started_at=0.0,
        step=2,
        epoch=1,
    )
    unet, _, _ = adapted_sdxl()
    path = export_kohya(
        tmp_path / "m.safetensors",
        cfg,
        unet=unet,
        text_encoder=None,
        prediction_type="epsilon",
        training_info=info,
    )
    meta = read_metadata(path)
    # kohya's sorted buckets of 256² pixels, sides 128-512 in steps of 64: (128,384) (128,448) (128,512)
    # (192,320) (256,256) (320,192) ... The square image is bucket 4, the 2:1 one (320,192) = 5 (|5/3 - 2| =
    # 1/3), the 1:2 regularization image (192,320) = 3 (|0.6 - 0.5| = 0.1), its repeats grown to the 20
    # training samples.
    assert json.loads(meta["ss_bucket_info"]) == {
        "buckets": {
            "3": {"resolution": [192, 320], "count": 20},
            "4": {"resolution": [256, 256], "count": 10},
            "5": {"resolution": [320, 192], "count": 10},
        },
        "mean_img_ar_error": pytest.approx((1 / 3 + 0.1) / 3),
    }
    expected = {
        "ss_enable_bucket": "True",
        "ss_min_bucket_reso": "128",
        "ss_max_bucket_reso": "512",
        "ss_bucket_no_upscale": "False",
        "ss_flip_aug": "True",
        "ss_random_crop": "False",
        "ss_cache_latents": "True",
        "ss_shuffle_caption": "True",
        "ss_keep_tokens": "2",
        "ss_caption_dropout_rate": "0.05",
        "ss_caption_tag_dropout_rate": "0.1",
        "ss_prior_loss_weight": "0.5",
        "ss_num_reg_images": "1",
        "ss_reg_dataset_dirs": json.dumps({"1_cat": {"n_repeats": 1, "img_count": 1}}),
        "ss_dataset_dirs": json.dumps({"10_cat": {"n_repeats": 10, "img_count": 2}}),
        "ss_num_train_images": "20",
        "ss_max_token_length": "225",
        "ss_clip_skip": "2",
        "ss_optimizer": "transformers.optimization.Adafactor(relative_step=False,scale_parameter=False)",
        "ss_unet_lr": "0.0002",
        "ss_batch_size_per_device": "1",
        "ss_num_batches_per_epoch": "40",
    }
    assert {k: meta.get(k) for k in expected} == expected


def test_default_settings_leave_the_new_keys_out_or_false(tmp_path):
    """Without buckets, reg images, long prompts or clip skip: kohya's False/0 values, the unset ones absent."""
    cfg = config("m", tmp_path)
    unet, _, _ = adapted_sdxl()
    path = export_kohya(
        tmp_path / "d.safetensors",
        cfg,
        unet=unet,
        text_encoder=None,
        prediction_type="epsilon",
        training_info=metadata_for(cfg),
    )
    meta = read_metadata(path)
    assert meta["ss_enable_bucket"] == "False" and meta["ss_num_reg_images"] == "0"
    assert meta["ss_reg_dataset_dirs"] == "{}" and meta["ss_optimizer"] == "torch.optim.AdamW"
    for key in ("ss_bucket_info", "ss_min_bucket_reso", "ss_max_token_length", "ss_clip_skip"):
        assert key not in meta
