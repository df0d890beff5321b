"""The offline quick start end to end: it learns, and writes the Kohya file, PEFT folder, grids and logs."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_training_loop import assert_export_reproduces

from loha_diffusion.formats.kohya import read_metadata
from loha_diffusion.training.config import load_config
from loha_diffusion.training.loop import train

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_config_is_valid():
    cfg = load_config(["--config", str(REPO / "sample_configs" / "quickstart.toml")])
    assert cfg.train_data_dir == "sample_data/shapes" and cfg.resolution == 64
    images = sorted((REPO / cfg.train_data_dir).glob("*.png"))
    assert 12 <= len(images) <= 24
    assert all(p.with_suffix(".txt").is_file() for p in images)


@pytest.mark.slow
def test_quickstart_learns_and_exports(tiny_sd1_pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the config's data path is relative to the repository root, as in the README
    cfg = load_config(
        ["--config", "sample_configs/quickstart.toml"],
        pretrained_model_name_or_path=str(tiny_sd1_pipeline_dir),
        output_dir=str(tmp_path / "quickstart"),
    )
    result = train(cfg)

    assert result.global_step == cfg.max_train_steps
    start, end = result.eval_losses[0], result.eval_losses[cfg.max_train_steps]
    assert end <= 0.7 * start, f"fixed-set denoising loss {start:.4f} -> {end:.4f}: less than a 30% drop"

    assert result.kohya_file == tmp_path / "quickstart" / "loha.safetensors"
    meta = read_metadata(result.kohya_file)
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo": "loha"' in meta["ss_network_args"]
    assert meta["ss_steps"] == str(cfg.max_train_steps)
    grids = sorted((tmp_path / "quickstart" / "validation").glob("step-*.png"))
    every = cfg.validation_steps
    assert [g.name for g in grids] == [
        f"step-{s:06d}-prompt-{i:02d}.png"
        for s in range(every, cfg.max_train_steps + 1, every)
        for i in range(len(cfg.validation_prompt))
    ]
    assert list((tmp_path / "quickstart" / "logs").rglob("events.out.tfevents.*"))
    assert [p.name for p in (tmp_path / "quickstart").glob("checkpoint-*")] == [
        f"checkpoint-{cfg.max_train_steps}"
    ]
    printed = capsys.readouterr().out
    assert str(result.kohya_file) in printed and "tensorboard --logdir" in printed

    checkpoint = tmp_path / "quickstart" / f"checkpoint-{cfg.max_train_steps}"
    assert_export_reproduces(cfg, result.kohya_file, checkpoint)
    assert_export_reproduces(cfg, result.peft_dir, checkpoint)
