"""End-to-end training on a tiny SD1-shaped model: exact resume, two processes equal one, dry run, errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from loha_diffusion.model import inject_adapter, set_adapter_state_dict
from loha_diffusion.pipeline import load_adapter
from loha_diffusion.training.config import load_config
from loha_diffusion.training.loop import main, train
from loha_diffusion.training.models import unet_adapter_config

REPO = Path(__file__).resolve().parents[1]
COLOURS = [(220, 40, 40), (40, 70, 220), (40, 170, 60), (235, 200, 40), (200, 60, 200), (30, 200, 200)]


def make_dataset(folder: Path, n: int, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size + 8 * (i % 2), size), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=COLOURS[i % len(COLOURS)])
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a red circle {i}")
    return folder


def base_flags(model_dir: Path, data_dir: Path, out: Path, **overrides: str) -> list[str]:
    """Small, fast settings for the tiny model; `overrides` replace or add flags (`rank="8"`)."""
    settings = {
        "pretrained_model_name_or_path": str(model_dir),
        "train_data_dir": str(data_dir),
        "output_dir": str(out),
        "resolution": "32",
        "rank": "2",
        "preset": "attn",
        "learning_rate": "1e-2",
        "report_to": "none",
        "save_precision": "fp32",
        "save_peft_format": "false",
        "seed": "3",
        **overrides,
    }
    return [token for key, value in settings.items() for token in (f"--{key}", value)]


def adapter_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "unet_adapter.safetensors"))


def assert_export_reproduces(cfg, exported: Path, checkpoint: Path, atol: float = 1e-5) -> None:
    """A fresh pipeline + `load_adapter(exported)` gives the trained UNet's output (trained = checkpoint state)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="unet")
    inject_adapter(trained, unet_adapter_config(cfg))
    set_adapter_state_dict(trained, adapter_tensors(checkpoint))
    pipe = StableDiffusionPipeline.from_pretrained(cfg.pretrained_model_name_or_path, safety_checker=None)
    load_adapter(pipe, exported)
    if exported.is_dir():
        # PEFT configs carry rank_dropout, and load_adapter leaves the new AdapterLayers in training mode
        # inside the eval-mode pipeline (reported to the core): switch them off as inference code should.
        pipe.unet.eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    states = torch.randn(2, 77, trained.config.cross_attention_dim, generator=gen)
    t = torch.tensor([50, 700])
    with torch.no_grad():
        expected = trained.eval()(sample, t, states).sample
        base = UNet2DConditionModel.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="unet")(
            sample, t, states
        ).sample
        got = pipe.unet(sample, t, states).sample
    assert (expected - base).abs().max() > 100 * atol  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)


# A resume mid-epoch with accumulation, a warm-up and cosine schedule, dropout, flips, caption dropout, noise
# offset and min-SNR (5 images: 3 steps per epoch, the last with one micro-batch); the SDXL test extends it.
RESUME_FLAGS = [
    "--max_train_steps", "6",
    "--train_batch_size", "1",
    "--gradient_accumulation_steps", "2",
    "--checkpointing_steps", "2",
    "--lr_scheduler", "cosine",
    "--lr_warmup_steps", "2",
    "--rank_dropout", "0.2",
    "--random_flip",
    "--caption_dropout_rate", "0.3",
    "--noise_offset", "0.05",
    "--snr_gamma", "5",
]  # fmt: skip


def test_resume_is_bit_exact(tiny_sd1_pipeline_dir, tmp_path):
    """6 steps straight == 4 steps, stop, resume from the step-4 checkpoint to 6 (mid-epoch, with accumulation)."""
    data = make_dataset(tmp_path / "data", 5)
    extra = RESUME_FLAGS
    straight_cfg = load_config(
        base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "a", save_peft_format="true") + extra
    )
    straight = train(straight_cfg)
    assert straight.global_step == 6 and straight.peft_dir is not None

    interrupted = load_config(base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "b") + extra)
    assert train(interrupted, stop_at_step=4).global_step == 4
    assert not (tmp_path / "b" / "loha.safetensors").exists()  # stopped like a killed job
    resumed = load_config(
        base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "b")
        + extra
        + ["--resume_from_checkpoint", "latest"]
    )
    assert train(resumed).global_step == 6

    a = adapter_tensors(tmp_path / "a" / "checkpoint-6")
    b = adapter_tensors(tmp_path / "b" / "checkpoint-6")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Training moved the adapter away from its start.
    start = adapter_tensors(tmp_path / "b" / "checkpoint-2")
    assert any(not torch.equal(start[k], a[k]) for k in a)
    # The final Kohya files agree too.
    fa, fb = (
        load_file(str(tmp_path / "a" / "loha.safetensors")),
        load_file(str(tmp_path / "b" / "loha.safetensors")),
    )
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    # Both exported formats reproduce the trained UNet through load_adapter.
    assert_export_reproduces(straight_cfg, straight.kohya_file, tmp_path / "a" / "checkpoint-6")
    assert_export_reproduces(straight_cfg, straight.peft_dir, tmp_path / "a" / "checkpoint-6")
    # Everything the run wrote is readable by other users (ComfyUI/A1111 in another container) under the
    # test process's umask, and no temporary file is left behind.
    umask = os.umask(0)
    os.umask(umask)
    written = [p for p in (tmp_path / "a").rglob("*") if p.is_file() and "logs" not in p.parts]
    assert written and all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in written)
    assert not [p for p in (tmp_path / "a").rglob(".*.tmp")]


def test_resume_rejects_other_batch_geometry(tiny_sd1_pipeline_dir, tmp_path):
    data = make_dataset(tmp_path / "data", 4)
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out") + ["--checkpointing_steps", "1"]
    train(load_config(flags + ["--max_train_steps", "1"]))
    code = main(
        flags + ["--max_train_steps", "2", "--train_batch_size", "2", "--resume_from_checkpoint", "latest"]
    )
    assert code == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(flags: list[str]) -> subprocess.CompletedProcess:
    """`scripts/train_loha_sd.py flags` under torchrun with 2 CPU processes (gloo, one thread each); asserts it
    exits 0 (showing the end of its stderr otherwise) and returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(REPO / "scripts" / "train_loha_sd.py"), *flags,
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_two_processes_equal_one(tiny_sd1_pipeline_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 2 == 1 process x batch 4; only rank 0 writes files."""
    data = make_dataset(tmp_path / "data", 8)
    common = ["--max_train_steps", "4", "--checkpointing_steps", "4", "--lr_scheduler", "linear"]
    single = train(
        load_config(
            base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "one") + common + ["--train_batch_size", "4"]
        )
    )
    assert single.global_step == 4

    run_two_processes(
        [*base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "two"), *common, "--train_batch_size", "2"]
    )

    one = load_file(str(tmp_path / "one" / "loha.safetensors"))
    two = load_file(str(tmp_path / "two" / "loha.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(
            two[key], one[key], rtol=1e-4, atol=2e-5, msg=key
        )  # Adam amplifies fp32 sums
    moved = adapter_tensors(tmp_path / "one" / "checkpoint-4")
    assert any(v.abs().sum() > 0 for k, v in moved.items() if "w1_b" in k or "w2_b" in k)

    def listing(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    # Same files as the single-process run, plus the second process's RNG state inside the checkpoint.
    assert listing(tmp_path / "two") - listing(tmp_path / "one") == {
        "checkpoint-4/random_states_1.json",
        "checkpoint-4/random_states_1.safetensors",
    }
    assert listing(tmp_path / "one") - listing(tmp_path / "two") == set()


def test_dry_run_prints_plan(tiny_sd1_pipeline_dir, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 3)
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", preset="full", rank="64", alpha="512")
    code = main(flags + ["--dry_run", "--num_train_epochs", "2"])
    assert code == 0
    out = capsys.readouterr().out
    for text in (
        "unet.down_blocks",
        "unet.mid_block",
        "unet.up_blocks",
        "effective rank (r^2)",
        "Expected file size",
    ):
        assert text in out
    assert "6 optimizer steps = 2 epochs of 3 steps" in out and "effective batch 1" in out
    assert "LoHa rank 64" in out and "alpha = 512" in out  # the known-bad settings are flagged
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_user_errors_exit_cleanly(tiny_sd1_pipeline_dir, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 2)
    (data / "img1.txt").unlink()
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out") + ["--max_train_steps", "1"]
    assert main(flags) == 2
    assert "img1.png: no caption file img1.txt" in capsys.readouterr().err
    missing = base_flags(tmp_path / "no" / "such" / "model", data, tmp_path / "out")
    assert main(missing + ["--max_train_steps", "1", "--on_missing_caption", "skip"]) == 2
    assert "make-tiny" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, package",
    [("--enable_xformers_memory_efficient_attention", "xformers"), ("--use_8bit_adam", "bitsandbytes")],
)
def test_optional_packages_are_checked(tiny_sd1_pipeline_dir, tmp_path, capsys, flag, package):
    """Without the package (or, for xformers, without CUDA) the run stops with a message naming the fix."""
    try:
        __import__(package)
        if package == "xformers" and torch.cuda.is_available():
            pytest.skip("xformers can run here")
        if package == "bitsandbytes":
            pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    data = make_dataset(tmp_path / "data", 2)
    code = main(base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out") + ["--max_train_steps", "1", flag])
    assert code == 2
    err = capsys.readouterr().err
    assert package in err and ("pip install" in err or "cannot run" in err)


def test_lora_text_encoder_v_prediction_kohya_folders(tiny_sd1_pipeline_dir, tmp_path):
    """LoRA on UNet + text encoder, v-prediction, kohya repeat folders: trains and exports what it says."""
    import json

    from loha_diffusion.formats.kohya import read_metadata

    make_dataset(tmp_path / "data" / "3_sks circle", 2)
    cfg = load_config(
        base_flags(tiny_sd1_pipeline_dir, tmp_path / "data", tmp_path / "out")
        + ["--algo", "lora", "--train_text_encoder", "--text_encoder_lr", "1e-3", "--v_parameterization"]
        + ["--max_train_steps", "2", "--train_batch_size", "3", "--snr_gamma", "5", "--output_name", "combo"]
    )
    result = train(cfg)
    assert result.global_step == 2
    tensors = load_file(str(result.kohya_file))
    assert any(
        k.startswith("lora_te_text_model_encoder_layers_0_") and k.endswith("lora_down.weight")
        for k in tensors
    )
    assert any(k.startswith("lora_unet_") and k.endswith("lora_up.weight") for k in tensors)
    meta = read_metadata(result.kohya_file)
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_sks circle": {"n_repeats": 3, "img_count": 2}}
    assert meta["ss_text_encoder_lr"] == "0.001"
