"""Adapter configs from TrainConfig and the dry-run plan, on the full-size SD1.5 and SDXL UNet/text-encoder configs
(and a tiny SDXL model, whose written file the plan must match)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import safe_open
from torch import nn

from loha_diffusion import tiny
from loha_diffusion.errors import ConfigError
from loha_diffusion.model import inject_adapter
from loha_diffusion.training.config import load_config
from loha_diffusion.training.data import compute_schedule
from loha_diffusion.training.export import export_kohya
from loha_diffusion.training.models import text_encoder_adapter_config, unet_adapter_config
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


@pytest.fixture(scope="module")
def sdxl_config_dir(tmp_path_factory) -> Path:
    """A folder with only the configs of SDXL base's pipeline, UNet and both text encoders."""
    root = tmp_path_factory.mktemp("sdxl_configs")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    tiny.build_unet_from_config(tiny.full_size_unet_config("sdxl")).save_config(root / "unet")
    tiny.full_size_text_encoder_config("sdxl", 1).save_pretrained(root / "text_encoder")
    tiny.full_size_text_encoder_config("sdxl", 2).save_pretrained(root / "text_encoder_2")
    return root


def test_sdxl_plan_lists_both_text_encoders(sdxl_config_dir, data_dir):
    cfg = load_config(
        ["--pretrained_model_name_or_path", str(sdxl_config_dir), "--train_data_dir", str(data_dir)]
        + ["--max_train_steps", "100", "--algo", "lora", "--rank", "16", "--train_text_encoder"]
    )
    plan = build_plan(cfg, num_samples=10)
    parts = {p.name: p for p in plan.parts}
    assert plan.arch == "sdxl" and cfg.resolution == 1024  # the architecture's default, filled in
    # CLIP ViT-L (12 layers, 768 wide) and OpenCLIP bigG (32 layers, 1280 wide): q, k, v, out, fc1, fc2 each.
    assert parts["te1"].modules == 12 * 6 and parts["te2"].modules == 32 * 6
    assert parts["te1"].parameters == 16 * 12 * (4 * 2 * 768 + 2 * (768 + 3072))
    assert parts["te2"].parameters == 16 * 32 * (4 * 2 * 1280 + 2 * (1280 + 5120))
    assert "text_encoder" not in parts
    unet_params = sum(p.parameters for p in plan.parts if p.name.startswith("unet."))
    assert plan.trainable_parameters == unet_params + parts["te1"].parameters + parts["te2"].parameters
    text = format_plan(cfg, plan)
    assert f"on {sdxl_config_dir} (SDXL, 1024 px)" in text.splitlines()[0]
    assert "\n  te1 " in text and "\n  te2 " in text


def test_tiny_sdxl_plan_matches_the_written_file(tiny_sdxl_pipeline_dir, data_dir, tmp_path):
    """The plan's tensor bytes are exactly those of the Kohya file the run writes (te1 and te2 included)."""
    cfg = load_config(
        ["--pretrained_model_name_or_path", str(tiny_sdxl_pipeline_dir), "--train_data_dir", str(data_dir)]
        + ["--max_train_steps", "1", "--resolution", "64", "--train_text_encoder", "--preset", "full"]
        + ["--conv_dim", "2", "--use_effective_conv2d", "--output_dir", str(tmp_path)]
    )
    plan = build_plan(cfg, num_samples=10)
    assert {"te1", "te2"} <= {p.name for p in plan.parts} and plan.arch == "sdxl"
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    inject_adapter(pipe.unet, unet_adapter_config(cfg))
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        inject_adapter(te, text_encoder_adapter_config(cfg))
    path = export_kohya(
        tmp_path / "tiny.safetensors",
        cfg,
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        prediction_type="epsilon",
        training_info={},
    )
    with safe_open(path, "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    assert plan.tensor_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert plan.trainable_parameters == sum(t.numel() for t in tensors) - len(
        [t for t in tensors if t.dim() == 0]
    )
    assert 0.8 < plan.file_bytes / path.stat().st_size < 1.25


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_single_file_base_plans_from_its_config_folder(arch, request, data_dir):
    """A single-file base plans on the configs it would load with (`model_config`, here the folder the file was
    converted from), reading only the file's header: the same plan as the diffusers folder's."""
    folder = request.getfixturevalue(f"tiny_{arch}_pipeline_dir")
    checkpoint = request.getfixturevalue(f"tiny_{arch}_single_file")
    flags = ("--model_config", str(folder), "--resolution", "64")
    cfg = sample_config("sd15_lora.toml", checkpoint, data_dir, *flags)  # LoRA r=16 with train_text_encoder
    plan = build_plan(cfg, num_samples=10)
    expected = build_plan(
        sample_config("sd15_lora.toml", folder, data_dir, "--resolution", "64"), num_samples=10
    )
    assert plan.arch == expected.arch == arch
    assert [(p.name, p.modules, p.parameters) for p in plan.parts] == [
        (p.name, p.modules, p.parameters) for p in expected.parts
    ]
    assert {p.name for p in plan.parts} >= ({"text_encoder"} if arch == "sd1" else {"te1", "te2"})
    assert plan.tensor_bytes == expected.tensor_bytes > 0
    assert f"on {checkpoint} ({'SD1.x' if arch == 'sd1' else 'SDXL'}, 64 px)" in format_plan(cfg, plan)
