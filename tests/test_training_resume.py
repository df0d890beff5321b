"""Resume refuses a changed run and applies changed optimizer settings: data fingerprints, refused settings,
a new learning rate or length from the resumed step on (logged, recorded in the file), old checkpoints; the
NaN-loss message; min-SNR with a zero-terminal-SNR schedule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_training_loop import base_flags, make_dataset

from loha_diffusion.formats.kohya import read_metadata
from loha_diffusion.training import loop
from loha_diffusion.training.checkpoint import (
    RUN_RECORD,
    dataset_changes,
    dataset_fingerprint,
    read_checkpoint_state,
    verify_checkpoint,
)
from loha_diffusion.training.config import load_config
from loha_diffusion.training.loop import main, train


def test_changed_learning_rate_is_applied_logged_and_recorded(tiny_sd1_pipeline_dir, tmp_path, caplog):
    """1e-3 for 4 steps, then resumed with 1e-5 from a copy of the dataset elsewhere: steps 5-6 use 1e-5."""
    data = make_dataset(tmp_path / "data", 4)
    extra = ["--max_train_steps", "6", "--checkpointing_steps", "2"]
    train(
        load_config(base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", learning_rate="1e-3") + extra),
        stop_at_step=4,
    )
    moved = shutil.copytree(data, tmp_path / "elsewhere" / "data")  # a moved dataset is the same data
    flags = base_flags(tiny_sd1_pipeline_dir, moved, tmp_path / "out", learning_rate="1e-5")
    with caplog.at_level("INFO", logger="loha_diffusion"):
        result = train(load_config(flags + extra + ["--resume_from_checkpoint", "latest"]))
    assert result.global_step == 6
    assert "resume: learning_rate 0.001 → 1e-05, applied from step 5 on" in caplog.text
    optimizer = read_checkpoint_state(tmp_path / "out" / "checkpoint-6", "optimizer")
    assert optimizer["param_groups"][0]["lr"] == optimizer["param_groups"][0]["initial_lr"] == 1e-5
    assert read_checkpoint_state(tmp_path / "out" / "checkpoint-6", "scheduler")["base_lrs"] == [1e-5]
    change = {"after_step": 4, "setting": "learning_rate", "old": 0.001, "new": 1e-05}
    meta = read_metadata(result.kohya_file)
    assert meta["ss_learning_rate"] == "1e-05"  # in force at the end; the history says since when
    assert json.loads(meta["loha_diffusion.resume_changes"]) == [change]
    record = json.loads((tmp_path / "out" / "checkpoint-6" / RUN_RECORD).read_text())
    assert record["changes"] == [change]


def test_grown_max_train_steps_continues_to_the_new_total(tiny_sd1_pipeline_dir, tmp_path):
    """A finished 4-step run resumed with max_train_steps 6 ends equal to a straight 6-step run (constant LR)."""
    data = make_dataset(tmp_path / "data", 3)
    straight = train(
        load_config(base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "a") + ["--max_train_steps", "6"])
    )
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "b") + ["--checkpointing_steps", "2"]
    assert train(load_config(flags + ["--max_train_steps", "4"])).global_step == 4
    resumed = train(load_config(flags + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"]))
    assert resumed.global_step == 6
    a, b = load_file(str(straight.kohya_file)), load_file(str(resumed.kohya_file))
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = read_metadata(resumed.kohya_file)
    assert meta["ss_max_train_steps"] == "6" and meta["ss_steps"] == "6"
    assert json.loads(meta["loha_diffusion.resume_changes"]) == [
        {"after_step": 4, "setting": "max_train_steps", "old": 4, "new": 6}
    ]


def train_one_step(model_dir: Path, data: Path, out: Path) -> list[str]:
    """Train one step at batch 2 with a checkpoint; returns the flags (without max_train_steps)."""
    flags = base_flags(model_dir, data, out, train_batch_size="2", checkpointing_steps="1")
    train(load_config(flags + ["--max_train_steps", "1"]))
    return flags


@pytest.mark.parametrize("edit", ["delete", "caption"])
def test_changed_data_is_refused(tiny_sd1_pipeline_dir, tmp_path, capsys, edit):
    """8 images at batch 2 and 7 give the same steps per epoch: only the fingerprint sees the difference."""
    data = make_dataset(tmp_path / "data", 8)
    flags = train_one_step(tiny_sd1_pipeline_dir, data, tmp_path / "out")
    if edit == "delete":
        (data / "img3.png").unlink()
        (data / "img3.txt").unlink()
        expected = "1 image(s) removed:\n    - img3.png"
    else:
        (data / "img5.txt").write_text("a blue square")
        expected = "1 image(s) changed:\n    - img5.png: caption"
    assert main(flags + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and expected in err and "put the training data back" in err


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("seed", "4", "seed: 3 → 4"),
        ("train_batch_size", "1", "train_batch_size: 2 → 1"),
        ("rank", "4", "rank: 2 → 4"),
    ],
)
def test_changed_settings_are_refused(tiny_sd1_pipeline_dir, tmp_path, capsys, flag, value, expected):
    data = make_dataset(tmp_path / "data", 4)
    flags = train_one_step(tiny_sd1_pipeline_dir, data, tmp_path / "out")
    changed = [t if i == 0 or flags[i - 1] != f"--{flag}" else value for i, t in enumerate(flags)]
    assert main(changed + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    old = expected.split(": ")[1].split(" → ")[0]
    assert (
        expected in err and f"--{flag} {old}" in err
    )  # names old → new, and the flag that continues the run
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_checkpoint_of_the_pickle_format_is_refused(tiny_sd1_pipeline_dir, tmp_path, capsys):
    """A checkpoint folder as accelerate's save_state wrote it (older versions) is refused, saying why."""
    data = make_dataset(tmp_path / "data", 3)
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out") + ["--max_train_steps", "3"]
    old = tmp_path / "out" / "checkpoint-1"
    old.mkdir(parents=True)
    for name in ("unet_adapter.safetensors", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl"):
        (old / name).write_bytes(b"x")
    assert main(flags + ["--resume_from_checkpoint", "checkpoint-1"]) == 2
    err = capsys.readouterr().err
    assert "accelerate's pickle format" in err and "unpickling a file can run code" in err
    # `latest` does not silently start from step 0 when the only checkpoint cannot be used.
    assert main(flags + ["--resume_from_checkpoint", "latest"]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out" / "loha.safetensors").exists()


def test_fingerprint_ignores_place_and_mtime_and_names_changes(tmp_path):
    def summary(root: Path, captions: dict[str, str], repeats: int = 1):
        records = []
        for name, caption in captions.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            if not (root / name).exists():
                (root / name).write_bytes(b"x" * len(name))
            records.append(SimpleNamespace(path=root / name, caption=caption, repeats=repeats))
        return SimpleNamespace(root=root, records=tuple(records), regularization=None)

    first = dataset_fingerprint(summary(tmp_path / "a", {"1_x/p.png": "a", "1_x/q.png": "b"}))
    assert first["files"]["1_x/p.png"]["size"] == 9
    moved = dataset_fingerprint(summary(tmp_path / "b", {"1_x/p.png": "a", "1_x/q.png": "b"}))
    assert moved["files"] == first["files"] and moved["digest"] == first["digest"]
    changed = dataset_fingerprint(summary(tmp_path / "c", {"1_x/p.png": "A", "1_x/r.png": "b"}, repeats=2))
    assert dataset_changes(first, changed) == [
        ("image(s) removed", ["1_x/q.png"]),
        ("image(s) added", ["1_x/r.png"]),
        ("image(s) changed", ["1_x/p.png: caption, repeats 1 → 2"]),
    ]


def test_nan_loss_message_names_the_causes_for_the_settings(tiny_sd1_pipeline_dir, tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    flags = base_flags(tiny_sd1_pipeline_dir, data, tmp_path / "out", learning_rate="1e30")
    with pytest.raises(FloatingPointError) as info:
        train(load_config(flags + ["--max_train_steps", "4", "--checkpointing_steps", "1"]))
    message = str(info.value)
    assert "at optimizer step 2 (last finite loss" in message and "at step 1)" in message
    assert "1. updates too large: lower learning_rate = 1e+30, or alpha = 2" in message
    assert "2. the data" in message and "fp16" not in message
    assert "snr" not in message.lower()
    assert f"Fix it, then resume from {tmp_path / 'out' / 'checkpoint-1'}" in message


@pytest.mark.parametrize("pipeline_dir", ["tiny_sd1_pipeline_dir", "tiny_sdxl_pipeline_dir"])
def test_zero_terminal_snr_with_min_snr_stays_finite(pipeline_dir, request, tmp_path):
    """Epsilon prediction, min-SNR γ=5, a zero-terminal-SNR schedule of 2 timesteps: t=1 (SNR 0) is drawn;
    SDXL behaves as SD1."""
    model = shutil.copytree(request.getfixturevalue(pipeline_dir), tmp_path / "model")
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_train_timesteps": 2, "rescale_betas_zero_snr": True}))
    data = make_dataset(tmp_path / "data", 4)
    flags = base_flags(model, data, tmp_path / "out", train_batch_size="4", snr_gamma="5")
    result = train(load_config(flags + ["--max_train_steps", "3"]))
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.last_loss))


def test_non_finite_weights_stop_the_run_before_anything_is_saved(
    tiny_sd1_pipeline_dir, tmp_path, monkeypatch, capsys
):
    """The update of the last step makes a weight NaN (its loss was finite): the run exits with an error
    naming the step and module; neither a checkpoint nor a file of that state is written, and the last good
    checkpoint and step file are untouched."""
    original = loop.train_step

    def poisoning_step(run, batch):
        stepped = original(run, batch)
        if stepped and run.state.global_step + 1 == 4:
            with torch.no_grad():
                run.params[0].view(-1)[0] = float("nan")
        return stepped

    monkeypatch.setattr(loop, "train_step", poisoning_step)
    data = make_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    flags = base_flags(tiny_sd1_pipeline_dir, data, out, checkpointing_steps="2", save_every_n_steps="2")
    assert main(flags + ["--max_train_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "the adapter weights became NaN or infinite in the update of optimizer step 4" in err
    assert "1 module(s): unet." in err and "Nothing of this step was saved" in err
    assert f"resume from {out / 'checkpoint-2'}" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-2",
        "loha-step00000002.safetensors",
        "train_config.toml",
    ]
    verify_checkpoint(out / "checkpoint-2")
    assert all(
        torch.isfinite(t).all()
        for t in load_file(str(out / "checkpoint-2" / "unet_adapter.safetensors")).values()
    )
