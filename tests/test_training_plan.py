"""Adapter configs from TrainConfig and the dry-run plan, on the full-size SD1.5 UNet/text-encoder configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from torch import nn

from loha_diffusion import tiny
from loha_diffusion.errors import ConfigError
from loha_diffusion.training.config import load_config
from loha_diffusion.training.data import compute_schedule
from loha_diffusion.training.models import unet_adapter_config
from loha_diffusion.training.plan import build_plan, format_plan, setting_warnings

REPO = Path(__file__).resolve().parents[1]
ATTN_FF = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


@pytest.fixture(scope="module")
def sd15_config_dir(tmp_path_factory) -> Path:
    """A folder with only the configs of SD1.5's pipeline, UNet and text encoder: all a dry run reads."""
    root = tmp_path_factory.mktemp("sd15_configs")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    tiny.build_unet_from_config(tiny.full_size_unet_config("sd1")).save_config(root / "unet")
    tiny.full_size_text_encoder_config("sd1", 1).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i in range(10):
        Image.new("RGB", (64, 64), (i * 20, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a red square")
    return root


def sample_config(name: str, model: Path, data: Path, *flags: str):
    return load_config(
        ["--config", str(REPO / "sample_configs" / name), *flags],
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(data),
    )


def reference_loha_params(modules: dict[str, nn.Module], r: int) -> int:
    """LoHa parameters of flat (non-CP) layers: 2 r (out + in * k * k) each."""
    total = 0
    for module in modules.values():
        weight = module.weight
        total += 2 * r * (weight.shape[0] + weight[0].numel())
    return total


def test_sd15_attn_ff_plan(sd15_config_dir, data_dir):
    cfg = sample_config("sd15_loha.toml", sd15_config_dir, data_dir)
    plan = build_plan(cfg, num_samples=10)
    unet = tiny.build_unet_from_config(tiny.full_size_unet_config("sd1"))
    targets = {
        n: m for n, m in unet.named_modules() if n.endswith(ATTN_FF) and isinstance(m, (nn.Linear, nn.Conv2d))
    }
    assert sum(p.modules for p in plan.parts) == len(targets) == 192  # docs/kohya-format.md's table
    assert plan.trainable_parameters == reference_loha_params(targets, cfg.rank)
    assert all(p.effective_ranks == {64} for p in plan.parts)  # r^2 for r = 8
    # fp16 tensors + header: within a few percent of 2 bytes per parameter.
    assert 2 * plan.trainable_parameters < plan.file_bytes < 2.1 * plan.trainable_parameters
    schedule = plan.schedule
    assert schedule.total_batch_size == 4 and schedule.update_steps_per_epoch == 3
    assert schedule.max_train_steps == 2000 and schedule.num_epochs == 667


def test_sd15_full_preset_with_cp_convs(sd15_config_dir, data_dir):
    cfg = sample_config("sd15_loha_conv.toml", sd15_config_dir, data_dir)
    plan = build_plan(cfg)
    assert sum(p.modules for p in plan.parts) == 192 + 36 + 50
    kinds = sum((p.kinds for p in plan.parts), start=type(plan.parts[0].kinds)())
    assert kinds["conv 3x3"] == 50
    text = format_plan(cfg, plan)
    assert "conv rank 4, conv alpha 2" in text and "effective conv2d (CP)" in text


def test_lora_with_text_encoder(sd15_config_dir, data_dir):
    cfg = sample_config("sd15_lora.toml", sd15_config_dir, data_dir)
    plan = build_plan(cfg, num_samples=10)
    parts = {p.name: p for p in plan.parts}
    assert parts["text_encoder"].modules == 72 and parts["text_encoder"].effective_ranks == {16}
    te_linear = 12 * (4 * 2 * 768 + 2 * (768 + 3072))  # LoRA r (in + out) per layer, r = 16 -> times 16
    assert parts["text_encoder"].parameters == 16 * te_linear
    assert plan.schedule.max_train_steps == 10 * 3  # 10 epochs of ceil(10 / 4) steps


def test_every_sample_config_loads_and_plans(sd15_config_dir, data_dir):
    for path in sorted((REPO / "sample_configs").glob("*.toml")):
        cfg = sample_config(path.name, sd15_config_dir, data_dir, "--resolution", "64")
        assert build_plan(cfg).trainable_parameters > 0, path.name


def test_conv_settings_need_the_full_preset():
    cfg = load_config(
        [
            "--pretrained_model_name_or_path",
            "m",
            "--train_data_dir",
            "d",
            "--max_train_steps",
            "1",
            "--conv_dim",
            "4",
        ]
    )
    with pytest.raises(ConfigError, match="conv_rank"):
        unet_adapter_config(cfg)
    explicit = load_config(
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"]
        + ["--target_modules", "to_q", "to_v", "--rank_pattern", "to_v=2"]
    )
    config = unet_adapter_config(explicit)
    assert set(config.target_modules) == {"to_q", "to_v"} and config.rank_for("attn1.to_v") == 2


def test_schedule_and_warnings():
    cfg = load_config(
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--num_train_epochs", "3"]
        + ["--train_batch_size", "2", "--gradient_accumulation_steps", "3", "--rank", "48", "--alpha", "200"]
        + ["--lr_warmup_steps", "5"]
    )
    s = compute_schedule(cfg, num_samples=25, num_processes=2)
    # 25 samples / (2 per device x 2 processes) = 7 batches per process -> 3 optimizer steps per epoch.
    assert (s.batches_per_epoch, s.update_steps_per_epoch, s.max_train_steps, s.num_epochs) == (7, 3, 9, 3)
    assert s.total_batch_size == 12
    text = "\n".join(setting_warnings(cfg))
    assert "LoHa rank 48" in text and "alpha = 200" in text and "constant_with_warmup" in text
