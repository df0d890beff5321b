"""Regularization images (kohya's prior preservation): the scan of `reg_data_dir`, kohya's repeat rule for
how many reg samples an epoch holds, errors naming the folder, the data fingerprint, and long-caption limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import data_only_flags
from PIL import Image

from loha_diffusion.errors import DataError
from loha_diffusion.training.checkpoint import dataset_changes, dataset_fingerprint
from loha_diffusion.training.config import load_config
from loha_diffusion.training.scan import (
    ImageRecord,
    interleave_regularization,
    scan_dataset,
    scan_training_data,
)


def make_image(path: Path, size=(40, 32), color=(0, 0, 255)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def records(n: int, repeats: int, prefix: str = "img") -> list[ImageRecord]:
    return [ImageRecord(Path(f"{prefix}{i}.png"), f"{prefix} {i}", repeats) for i in range(n)]


def reg_repeats(train: list[ImageRecord], reg: list[ImageRecord]) -> list[tuple[str, int]]:
    out = interleave_regularization(train, reg)
    assert out[: len(train)] == tuple(train)
    assert all(r.is_reg for r in out[len(train) :])
    return [(r.path.name, r.repeats) for r in out[len(train) :]]


def test_interleave_matches_hand_computed_kohya_counts():
    # 3 train images x 10 repeats = 30 samples; 2 reg images x 1: first pass 2, then +1 each in turn -> 15 each.
    assert reg_repeats(records(3, 10), records(2, 1, "reg")) == [("reg0.png", 15), ("reg1.png", 15)]
    # 7 samples, 3 reg images x 1: 3 after the first pass, then reg0, reg1, reg2, reg0 -> 3, 2, 2.
    assert reg_repeats(records(7, 1), records(3, 1, "reg")) == [
        ("reg0.png", 3),
        ("reg1.png", 2),
        ("reg2.png", 2),
    ]
    # Reg images with repeats: the first pass takes their own repeats (2 + 2 = 4 of 9), then +1 in turn.
    assert reg_repeats(records(3, 3), records(2, 2, "reg")) == [("reg0.png", 5), ("reg1.png", 4)]


def test_more_reg_samples_than_train_samples_uses_only_the_first_ones_as_kohya_does():
    # 2 training samples; 3 reg images x 1: the first two are used once each, the third not at all.
    assert reg_repeats(records(2, 1), records(3, 1, "reg")) == [("reg0.png", 1), ("reg1.png", 1)]
    # kohya registers a reg image with its full repeats, so one image of 5 repeats covers (and passes) 2 samples.
    assert reg_repeats(records(2, 1), records(3, 5, "reg")) == [("reg0.png", 5)]


def test_no_reg_images_leave_the_training_records_as_they_are():
    train = records(3, 2)
    assert interleave_regularization(train, []) == tuple(train)


def write_dataset(root: Path, *, reg_captions: bool = False) -> tuple[Path, Path]:
    """3 training images x 10 repeats (captioned); 2 uncaptioned reg images in a kohya '1_dog' folder."""
    train, reg = root / "train", root / "reg"
    for i in range(3):
        make_image(train / "10_sks dog" / f"t{i}.png", color=(255, i, 0))
        (train / "10_sks dog" / f"t{i}.txt").write_text(f"sks dog, pose {i}")
    for i in range(2):
        make_image(reg / "1_dog" / f"r{i}.png", size=(32, 48), color=(0, i, 255))
        if reg_captions:
            (reg / "1_dog" / f"r{i}.txt").write_text(f"a dog {i}")
    return train, reg


def config(train: Path, reg: Path | None, **overrides):
    flags = ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(train), "--max_train_steps", "1"]
    if reg is not None:
        flags += ["--reg_data_dir", str(reg)]
    return load_config(flags + ["--resolution", "32"], **overrides)


def test_scan_counts_reg_images_with_kohyas_repeats(tmp_path):
    train, reg = write_dataset(tmp_path)
    summary = scan_training_data(config(train, reg, on_missing_caption="folder_name"))
    assert summary.regularization is not None and summary.regularization.layout == "kohya"
    assert all(not r.is_reg for r in summary.records) and len(summary.records) == 3
    assert [
        (r.path.name, r.caption, r.repeats, r.is_reg, r.size) for r in summary.regularization.records
    ] == [
        ("r0.png", "dog", 1, True, (32, 48)),
        ("r1.png", "dog", 1, True, (32, 48)),
    ]
    assert (summary.num_train_samples, summary.num_reg_samples, summary.num_samples) == (30, 30, 60)
    assert [(r.path.name, r.repeats) for r in summary.epoch_records if r.is_reg] == [
        ("r0.png", 15),
        ("r1.png", 15),
    ]
    text = summary.report()
    assert f"3 images (kohya layout in {train}) + 2 regularization images (kohya layout in {reg})" in text
    assert "30 training + 30 regularization = 60 samples per epoch" in text
    assert "regularization: 2 images used, 30 samples per epoch" in text and "loss weight 1 (prior" in text
    assert "regularization: 2 images have no caption and use their kohya folder's concept" in text
    # Without reg_data_dir nothing changes.
    plain = scan_training_data(config(train, None))
    assert plain.regularization is None and plain.num_samples == 30 and plain.epoch_records == plain.records
    assert "regularization" not in plain.report()


def test_unused_reg_images_are_reported(tmp_path):
    train, reg = write_dataset(tmp_path)
    for i in range(2, 40):
        make_image(reg / "1_dog" / f"r{i:02d}.png")
    summary = scan_training_data(config(train, reg, on_missing_caption="folder_name"))
    assert summary.num_reg_samples == 30 and len(summary.regularization.records) == 40
    assert (
        "10 regularization images are not used: 40 regularization samples for 30 training samples"
        in summary.report()
    )


def test_reg_captions_follow_the_training_rules(tmp_path):
    train, reg = write_dataset(tmp_path)
    with pytest.raises(DataError) as error:
        scan_training_data(config(train, reg))  # on_missing_caption = "error" applies to reg images too
    text = str(error.value)
    assert f"The regularization images in {reg} cannot be used" in text and "1_dog/r0.png" in text
    assert "on_missing_caption = 'skip' or 'folder_name'" in text
    train, reg = write_dataset(tmp_path / "captioned", reg_captions=True)
    summary = scan_training_data(config(train, reg))
    assert [r.caption for r in summary.regularization.records] == ["a dog 0", "a dog 1"]


def test_a_flat_reg_folder_is_scanned_like_a_flat_training_folder(tmp_path):
    train, _ = write_dataset(tmp_path)
    flat = tmp_path / "flat_reg"
    make_image(flat / "x.png")
    (flat / "x.txt").write_text("a dog")
    summary = scan_training_data(config(train, flat))
    assert summary.regularization.layout == "flat"
    assert [(r.repeats, r.is_reg) for r in summary.epoch_records if r.is_reg] == [(30, True)]


def test_a_missing_or_empty_reg_folder_is_an_error_naming_it(tmp_path):
    train, _ = write_dataset(tmp_path)
    missing = tmp_path / "no_such_reg"
    with pytest.raises(DataError, match=rf"reg_data_dir {missing} does not exist .*remove reg_data_dir"):
        scan_training_data(config(train, missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no usable regularization images in reg_data_dir .*empty"):
        scan_training_data(config(train, tmp_path / "empty"))


def test_fingerprint_covers_the_reg_images(tmp_path):
    train, reg = write_dataset(tmp_path)
    cfg = config(train, reg, on_missing_caption="folder_name")
    first = dataset_fingerprint(scan_training_data(cfg))
    assert set(first["files"]) == {
        *(f"10_sks dog/t{i}.png" for i in range(3)),
        "reg_data_dir/1_dog/r0.png",
        "reg_data_dir/1_dog/r1.png",
    }
    assert dataset_fingerprint(scan_training_data(cfg)) == first
    make_image(reg / "1_dog" / "r1.png", size=(64, 80))  # another image, another size in bytes
    changed = dataset_fingerprint(scan_training_data(cfg))
    assert changed["digest"] != first["digest"]
    groups = dict(dataset_changes(first, changed))
    assert len(groups["image(s) changed"]) == 1
    assert groups["image(s) changed"][0].startswith("reg_data_dir/1_dog/r1.png: size ")
    without = dataset_fingerprint(scan_training_data(config(train, None)))
    assert dict(dataset_changes(first, without))["image(s) removed"] == [
        "reg_data_dir/1_dog/r0.png",
        "reg_data_dir/1_dog/r1.png",
    ]


@pytest.fixture(scope="module")
def tokenizer():
    from loha_diffusion.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_long_captions_use_max_token_length_without_start_and_end_tokens(tmp_path, tokenizer):
    for name, words in (("w100", 100), ("w149", 149), ("w150", 150), ("w151", 151), ("w300", 300)):
        make_image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(" ".join(["dog"] * words))
    assert len(tokenizer(" ".join(["dog"] * 150)).input_ids) == 152  # one token a word, plus start and end
    summary = scan_dataset(tmp_path, resolution=32, tokenizer=tokenizer, max_token_length=150)
    assert summary.token_limit == 150
    assert [(p.name, n) for p, n in summary.long_captions] == [("w300.png", 300), ("w151.png", 151)]
    assert "longer than max_token_length = 150 tokens (start and end tokens not counted)" in summary.report()
    # 75 is CLIP's one window: the same captions as the default check, counted without start and end.
    default = scan_dataset(tmp_path, resolution=32, tokenizer=tokenizer)
    short = scan_dataset(tmp_path, resolution=32, tokenizer=tokenizer, max_token_length=75)
    assert [p for p, _ in short.long_captions] == [p for p, _ in default.long_captions]
    assert [n for _, n in short.long_captions] == [n - 2 for _, n in default.long_captions]
    # The run's setting reaches the scan, and the caption prefix/suffix count.
    (tmp_path / "w149.txt").write_text(" ".join(["dog"] * 149))
    cfg = load_config(
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path), "--max_train_steps", "1"],
        resolution=32,
        max_token_length=150,
        caption_prefix="sks dog",
    )
    summary = scan_training_data(cfg, tokenizer)
    assert [(p.name, n) for p, n in summary.long_captions] == [
        ("w300.png", 302),
        ("w151.png", 153),
        ("w150.png", 152),
        ("w149.png", 151),
    ]


def test_a_keep_tokens_separator_that_has_no_effect_is_reported(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks ||| red, blue")
    train_cfg = dict(resolution=32, keep_tokens_separator="|||")
    flags = data_only_flags(tmp_path)
    report = scan_training_data(load_config(flags, **train_cfg)).report()
    assert "1 caption holds keep_tokens_separator, which takes effect only with shuffle_caption" in report
    shuffled = scan_training_data(load_config(flags, shuffle_caption=True, **train_cfg)).report()
    assert "caption holds" not in shuffled


def test_dry_run_counts_reg_samples_and_refuses_a_missing_reg_folder(tmp_path, tiny_sd1_pipeline_dir):
    from loha_diffusion.training.plan import dry_run

    train, reg = write_dataset(tmp_path)
    flags = ["--pretrained_model_name_or_path", str(tiny_sd1_pipeline_dir), "--train_data_dir", str(train)]
    flags += ["--resolution", "32", "--num_train_epochs", "1", "--on_missing_caption", "folder_name"]
    text = dry_run(load_config(flags + ["--reg_data_dir", str(reg)]), num_processes=1)
    assert "30 training + 30 regularization = 60 samples per epoch" in text
    assert "Steps: 60 optimizer steps = 1 epoch of 60 steps" in text  # reg samples count in the schedule
    plain = dry_run(load_config(flags), num_processes=1)
    assert "Steps: 30 optimizer steps = 1 epoch of 30 steps" in plain
    with pytest.raises(DataError, match=r"reg_data_dir .*no_such_reg does not exist"):
        dry_run(load_config(flags + ["--reg_data_dir", str(tmp_path / "no_such_reg")]), num_processes=1)


def test_images_that_are_both_training_and_reg_images_are_refused(tmp_path):
    train, _ = write_dataset(tmp_path)
    with pytest.raises(DataError, match=r"3 images are both a training image .*t0\.png.*folder of their own"):
        scan_training_data(config(train, train / "10_sks dog"))


def test_reg_samples_reach_the_loss_with_prior_loss_weight(tiny_sd1_pipeline_dir, tmp_path, monkeypatch):
    """A tiny run with reg images: one epoch holds kohya's count of reg samples, each weighted
    prior_loss_weight in the loss the optimizer steps on (checked against the same batch's loss with other
    weights: the loss is linear in the per-sample weights, kohya's `loss * loss_weights`)."""
    from loha_diffusion.training import loop

    train, reg = tmp_path / "train", tmp_path / "reg"
    for i in range(2):  # 2 images x 2 repeats = 4 training samples -> the one reg image gets 4 repeats
        make_image(train / "2_sks dog" / f"t{i}.png", color=(255, 60 * i, 0))
        (train / "2_sks dog" / f"t{i}.txt").write_text("sks dog")
    make_image(reg / "1_dog" / "r0.png", color=(0, 0, 255))
    flags = {
        "pretrained_model_name_or_path": str(tiny_sd1_pipeline_dir),
        "train_data_dir": str(train),
        "reg_data_dir": str(reg),
        "on_missing_caption": "folder_name",
        "prior_loss_weight": "0.25",
        "output_dir": str(tmp_path / "out"),
        "resolution": "32",
        "rank": "2",
        "preset": "attn",
        "train_batch_size": "4",
        "max_train_steps": "2",  # 8 samples per epoch: one epoch
        "report_to": "none",
        "save_peft_format": "false",
        "seed": "3",
    }
    seen: list[tuple[str, float]] = []
    original = loop.batch_loss

    def batch_loss(run, batch):
        weights = batch["loss_weights"]
        seen.extend(zip(batch["captions"], weights.tolist()))
        loss = original(run, batch)
        is_reg = torch.tensor([c == "dog" for c in batch["captions"]], dtype=torch.float32)
        with torch.no_grad():
            all_ones = original(run, {**batch, "loss_weights": torch.ones_like(weights)})
            train_only = original(run, {**batch, "loss_weights": 1 - is_reg})
        torch.testing.assert_close(loss.detach(), train_only + 0.25 * (all_ones - train_only))
        return loss

    monkeypatch.setattr(loop, "batch_loss", batch_loss)
    loop.train(load_config([token for key, value in flags.items() for token in (f"--{key}", value)]))
    assert sorted(seen) == [("dog", 0.25)] * 4 + [("sks dog", 1.0)] * 4
