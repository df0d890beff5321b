"""Dataset layouts, data checks with errors naming files, deterministic transforms and sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loha_diffusion.errors import DataError
from loha_diffusion.training.data import (
    CaptionedImageDataset,
    EpochSampler,
    make_dataloader,
    scan_dataset,
    transform_image,
)


def make_image(path, size=(40, 32), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_pair(folder, stem, caption="a red square", size=(40, 32)):
    make_image(folder / f"{stem}.png", size)
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption + "\n")


def test_flat_layout(tmp_path):
    make_pair(tmp_path, "a", "first")
    make_pair(tmp_path, "b", "second")
    summary = scan_dataset(tmp_path, resolution=32)
    assert summary.layout == "flat" and summary.num_samples == 2
    assert [(r.path.name, r.caption) for r in summary.records] == [("a.png", "first"), ("b.png", "second")]


def test_kohya_layout_repeats_and_folder_caption(tmp_path):
    make_pair(tmp_path / "3_sks dog", "a", "sks dog on grass")
    make_pair(tmp_path / "1_cat", "b", None)
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match=r"1_cat/b\.png"):
        scan_dataset(tmp_path, resolution=32)
    summary = scan_dataset(tmp_path, resolution=32, on_missing_caption="folder_name")
    assert summary.layout == "kohya" and summary.num_samples == 4
    assert {(r.caption, r.repeats) for r in summary.records} == {("sks dog on grass", 3), ("cat", 1)}
    assert len(CaptionedImageDataset(summary.records, resolution=32)) == 4


def test_kohya_layout_rejects_stray_images(tmp_path):
    make_pair(tmp_path / "2_x", "a")
    make_pair(tmp_path, "stray")
    with pytest.raises(DataError, match="stray.png"):
        scan_dataset(tmp_path, resolution=32)


def test_imagefolder_layout(tmp_path):
    make_image(tmp_path / "imgs" / "a.png")
    make_image(tmp_path / "imgs" / "b.png")
    lines = [{"file_name": "imgs/a.png", "text": "alpha"}, {"file_name": "imgs/b.png", "text": "beta"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    summary = scan_dataset(tmp_path, resolution=32)
    assert summary.layout == "imagefolder" and [r.caption for r in summary.records] == ["alpha", "beta"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": "imgs/a.png"}))
    with pytest.raises(DataError, match="metadata.jsonl:1.*'file_name'"):
        scan_dataset(tmp_path, resolution=32)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "imgs/missing.png", "text": "x"}))
    with pytest.raises(DataError, match="missing.png: file not found"):
        scan_dataset(tmp_path, resolution=32)


def test_missing_caption_error_or_skip(tmp_path):
    make_pair(tmp_path, "good")
    make_pair(tmp_path, "nocap", None)
    with pytest.raises(DataError, match=r"nocap\.png: no caption file nocap\.txt"):
        scan_dataset(tmp_path, resolution=32)
    summary = scan_dataset(tmp_path, resolution=32, on_missing_caption="skip")
    assert [r.path.name for r in summary.records] == ["good.png"] and len(summary.skipped) == 1


def test_unreadable_image_error_or_skip(tmp_path):
    make_pair(tmp_path, "good")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        scan_dataset(tmp_path, resolution=32)
    summary = scan_dataset(tmp_path, resolution=32, on_bad_image="skip")
    assert [r.path.name for r in summary.records] == ["good.png"]


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="no usable training images"):
        scan_dataset(tmp_path, resolution=32)
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nope", resolution=32)
    make_pair(tmp_path, "only", None)
    with pytest.raises(DataError, match="only.png"):
        scan_dataset(tmp_path, resolution=32)


def test_transform_resize_crop_flip():
    array = np.zeros((30, 60, 3), dtype=np.uint8)
    array[:, :30] = 255  # left half white
    image = Image.fromarray(array)
    gen = torch.Generator().manual_seed(0)
    out = transform_image(image, 16, center_crop=True, random_flip=False, generator=gen)
    assert out.shape == (3, 16, 16) and out.min() >= -1 and out.max() <= 1
    # Center crop of a 32x16 resize: left half white, right half black.
    assert out[:, :, :6].mean() > 0.9 and out[:, :, -6:].mean() < -0.9
    flips = set()
    for seed in range(8):
        crop = transform_image(
            image, 16, center_crop=False, random_flip=True, generator=torch.Generator().manual_seed(seed)
        )
        flips.add(bool(crop[:, :, 0].mean() < crop[:, :, -1].mean()))
    assert flips == {True, False}  # random crops/flips vary with the generator


def test_samples_are_deterministic_per_epoch_and_index(tmp_path):
    for i in range(3):
        make_pair(tmp_path, f"img{i}", f"caption {i}", size=(48, 40))
    records = scan_dataset(tmp_path, resolution=32).records
    ds = CaptionedImageDataset(records, resolution=32, random_flip=True, caption_dropout_rate=0.5, seed=7)
    a, b = ds[(1, 2)], ds[(1, 2)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["sample_seed"] == b["sample_seed"]
    assert ds[(2, 2)]["sample_seed"] != a["sample_seed"]
    dropped = sum(ds[(e, 0)]["caption"] == "" for e in range(40))
    assert 8 <= dropped <= 32


def test_sampler_order_depends_on_seed_and_epoch_only():
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(i for _, i in first) == list(range(10)) and all(e == 0 for e, _ in first)
    torch.manual_seed(123)  # global RNG must not matter
    assert list(EpochSampler(10, seed=3)) == first
    sampler.set_position(1)
    assert [i for _, i in sampler] != [i for _, i in first]


def test_dataloader_batches(tmp_path):
    for i in range(4):
        make_pair(tmp_path, f"img{i}", f"caption {i}")
    ds = CaptionedImageDataset(scan_dataset(tmp_path, resolution=16).records, resolution=16)
    loader, _ = make_dataloader(ds, batch_size=2)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["pixel_values"].shape == (2, 3, 16, 16)
    assert batches[0]["sample_seeds"].dtype == torch.int64 and len(batches[0]["captions"]) == 2
