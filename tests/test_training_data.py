"""Dataset layouts, data checks with errors naming files, deterministic transforms and sampling."""

from __future__ import annotations

import codecs
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_only_flags
from PIL import Image

from loha_diffusion.errors import DataError
from loha_diffusion.training.config import load_config
from loha_diffusion.training.data import (
    CaptionedImageDataset,
    EpochSampler,
    make_dataloader,
    scan_dataset,
    scan_training_data,
    transform_image,
)
from loha_diffusion.training.plan import dry_run


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
    transformed = transform_image(image, 16, center_crop=True, random_flip=False, generator=gen)
    out = transformed.pixels
    assert out.shape == (3, 16, 16) and out.min() >= -1 and out.max() <= 1
    # Center crop of a 32x16 resize: left half white, right half black.
    assert out[:, :, :6].mean() > 0.9 and out[:, :, -6:].mean() < -0.9
    # SDXL's micro-conditioning: the size before resizing (h, w), the crop's (top, left) in the 16x32 resize.
    assert transformed.original_size == (30, 60) and transformed.crop_top_left == (0, 8)
    flips = set()
    for seed in range(8):
        crop = transform_image(
            image, 16, center_crop=False, random_flip=True, generator=torch.Generator().manual_seed(seed)
        ).pixels
        flips.add(bool(crop[:, :, 0].mean() < crop[:, :, -1].mean()))
    assert flips == {True, False}  # random crops/flips vary with the generator


def test_crop_offsets_are_measured_in_the_image_the_crop_came_from():
    """A random crop's (top, left) locates its pixels in the resized image, flipped or not (diffusers flips
    before cropping, so a flipped sample's left offset is counted from the flipped image's left edge)."""
    array = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    image = Image.fromarray(array)  # 40x20: resized to 32x16 for resolution 16
    resized = np.asarray(image.resize((32, 16), Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    seen_flip = seen_plain = False
    for seed in range(12):
        out = transform_image(
            image, 16, center_crop=False, random_flip=True, generator=torch.Generator().manual_seed(seed)
        )
        top, left = out.crop_top_left
        pixels = out.pixels.permute(1, 2, 0).numpy()
        plain = resized[top : top + 16, left : left + 16]
        flipped = resized[:, ::-1][top : top + 16, left : left + 16]
        if np.allclose(pixels, plain):
            seen_plain = True
        else:
            assert np.allclose(pixels, flipped), seed
            seen_flip = True
        assert out.original_size == (20, 40)
    assert seen_flip and seen_plain


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


# --- issue 9: captions read one strict way -------------------------------------------------------------------


def caption_bytes(folder, stem, data: bytes):
    make_image(folder / f"{stem}.png")
    (folder / f"{stem}.txt").write_bytes(data)


def test_caption_with_utf8_bom_has_no_junk_before_the_trigger_word(tmp_path):
    caption_bytes(tmp_path, "a", b"\xef\xbb\xbfsks dog")
    assert scan_dataset(tmp_path, resolution=32).records[0].caption == "sks dog"


def test_utf16_caption_with_bom_is_read(tmp_path):
    caption_bytes(tmp_path, "le", "sks dog, caf\u00e9".encode("utf-16"))  # BOM + little-endian
    caption_bytes(tmp_path, "be", codecs.BOM_UTF16_BE + "sks cat".encode("utf-16-be"))
    captions = {r.path.stem: r.caption for r in scan_dataset(tmp_path, resolution=32).records}
    assert captions == {"le": "sks dog, caf\u00e9", "be": "sks cat"}


BAD_CAPTIONS = {
    "latin1": ("caf\u00e9 sks".encode("latin-1"), r"not UTF-8: byte 0xe9 at offset 3 .*Latin-1"),
    "garbage": (
        bytes([0x89, 0x50, 0x00, 0xFF, 0xFE, 0x00, 0x13]),
        r"not UTF-8: byte 0x89 at offset 0 .*binary",
    ),
    "utf16_no_bom": ("sks dog".encode("utf-16-le"), r"looks like UTF-16 text without a byte-order mark"),
    "utf16_no_bom_accent": (
        "caf\u00e9".encode("utf-16-le"),
        r"not UTF-8: .*UTF-16 text without a byte-order mark",
    ),
    "control_chars": (b"sks\x00\x01dog", r"holds binary data \(control character U\+0000"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CAPTIONS))
def test_undecodable_caption_is_a_named_error_or_skipped(tmp_path, kind):
    data, message = BAD_CAPTIONS[kind]
    make_pair(tmp_path, "good", "fine")
    caption_bytes(tmp_path, "bad", data)
    with pytest.raises(DataError, match=r"unreadable caption files") as error:
        scan_dataset(tmp_path, resolution=32)
    assert re.search(rf"bad\.txt: {message}", str(error.value))
    assert "save it as UTF-8" in str(error.value) and "on_bad_image = 'skip'" in str(error.value)
    summary = scan_dataset(tmp_path, resolution=32, on_bad_image="skip")
    assert [r.path.name for r in summary.records] == ["good.png"]
    assert len(summary.skipped) == 1 and "bad.txt" in summary.skipped[0]


def test_whitespace_only_caption_counts_as_missing(tmp_path):
    make_pair(tmp_path, "good", "fine")
    caption_bytes(tmp_path, "blank", b"  \n\t \r\n")
    with pytest.raises(DataError, match=r"blank\.png: caption file blank\.txt is empty"):
        scan_dataset(tmp_path, resolution=32)
    summary = scan_dataset(tmp_path, resolution=32, on_missing_caption="skip")
    assert [r.path.name for r in summary.records] == ["good.png"]
    assert summary.skipped == (f"{tmp_path / 'blank.png'}: caption file blank.txt is empty",)
    # In a kohya folder, 'folder_name' gives it the concept, as for a missing file.
    caption_bytes(tmp_path / "2_sks dog", "blank", b"   ")
    make_pair(tmp_path / "2_sks dog", "good", "sks dog running")
    for name in ("good", "blank"):
        (tmp_path / f"{name}.png").unlink()
        (tmp_path / f"{name}.txt").unlink()
    summary = scan_dataset(tmp_path, resolution=32, on_missing_caption="folder_name")
    assert sorted(r.caption for r in summary.records) == ["sks dog", "sks dog running"]
    assert summary.folder_captions == 1 and "uses its kohya folder's concept" in summary.report()


@pytest.mark.parametrize("rule", ["error", "skip", "folder_name"])
def test_image_without_caption_under_each_rule(tmp_path, rule):
    flat, kohya = tmp_path / "flat", tmp_path / "kohya"
    make_pair(flat, "good")
    make_pair(flat, "nocap", None)
    make_pair(kohya / "3_red box", "good")
    make_pair(kohya / "3_red box", "nocap", None)
    if rule == "error":
        for root in (flat, kohya):
            with pytest.raises(DataError, match=r"nocap\.png: no caption file nocap\.txt"):
                scan_dataset(root, resolution=32, on_missing_caption=rule)
    elif rule == "skip":
        for root in (flat, kohya):
            summary = scan_dataset(root, resolution=32, on_missing_caption=rule)
            assert [r.path.name for r in summary.records] == ["good.png"]
            assert "1 image skipped: " in summary.report() and "nocap.png (no caption file nocap.txt)" in (
                summary.report()
            )
    else:  # folder_name: the concept in kohya folders; no folder to name elsewhere, so an error
        with pytest.raises(DataError, match=r"nocap\.png: no caption file"):
            scan_dataset(flat, resolution=32, on_missing_caption=rule)
        summary = scan_dataset(kohya, resolution=32, on_missing_caption=rule)
        assert {r.path.name: r.caption for r in summary.records} == {
            "good.png": "a red square",
            "nocap.png": "red box",
        }


def test_caption_extension_in_another_case_is_used(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.TXT").write_text("upper case extension")
    assert scan_dataset(tmp_path, resolution=32).records[0].caption == "upper case extension"


# --- issue 9: metadata.jsonl ---------------------------------------------------------------------------------


def write_metadata(root, rows, raw: bytes | None = None):
    data = raw if raw is not None else "\n".join(json.dumps(r) for r in rows).encode("utf-8")
    (root / "metadata.jsonl").write_bytes(data)


@pytest.mark.parametrize("name", ["../../elsewhere.png", "imgs/../../elsewhere.png", "/etc/elsewhere.png"])
def test_metadata_naming_a_file_outside_the_folder_is_refused(tmp_path, name):
    root = tmp_path / "data" / "set"
    make_image(root / "a.png")
    make_image(tmp_path / "elsewhere.png")
    write_metadata(root, [{"file_name": "a.png", "text": "ok"}, {"file_name": name, "text": "x"}])
    with pytest.raises(
        DataError, match=rf"metadata\.jsonl:2: 'file_name' '{re.escape(name)}' points outside"
    ):
        scan_dataset(root, resolution=32)


def test_metadata_paths_inside_the_folder_are_accepted(tmp_path):
    make_image(tmp_path / "imgs" / "a.png")
    make_image(tmp_path / "b.png")
    rows = [
        {"file_name": "imgs/../b.png", "text": "dotdot inside"},
        {"file_name": str(tmp_path / "imgs" / "a.png"), "text": "absolute inside"},
    ]
    write_metadata(tmp_path, rows)
    summary = scan_dataset(tmp_path, resolution=32)
    assert [(r.path, r.caption) for r in summary.records] == [
        (tmp_path / "b.png", "dotdot inside"),
        (tmp_path / "imgs" / "a.png", "absolute inside"),
    ]


def test_non_utf8_metadata_is_a_named_error(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    raw = b'{"file_name": "a.png", "text": "fine"}\n{"file_name": "b.png", "text": "caf\xe9"}\n'
    write_metadata(tmp_path, None, raw)
    base = data_only_flags(tmp_path)
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: not UTF-8: byte 0xe9 .*save it as UTF-8"):
        scan_training_data(load_config(base + ["--resolution", "32"]))


def test_metadata_with_bom_blank_caption_and_unlisted_images(tmp_path):
    for name in ("a", "b", "unlisted"):
        make_image(tmp_path / f"{name}.png")
    rows = [{"file_name": "a.png", "text": "alpha"}, {"file_name": "b.png", "text": "   "}]
    write_metadata(tmp_path, None, codecs.BOM_UTF8 + "\n".join(json.dumps(r) for r in rows).encode())
    with pytest.raises(DataError, match=r"b\.png: no 'text' in metadata\.jsonl line 2"):
        scan_dataset(tmp_path, resolution=32)
    summary = scan_dataset(tmp_path, resolution=32, on_missing_caption="skip")
    assert [r.caption for r in summary.records] == ["alpha"]
    assert summary.ignored == (f"{tmp_path / 'unlisted.png'}: not named in metadata.jsonl",)
    write_metadata(tmp_path, [{"file_name": 3, "text": "x"}, {"file_name": "a.png", "text": "ok\u0000"}])
    with pytest.raises(DataError, match=r"(?s)metadata\.jsonl:1: 'file_name' is 3.*:2: holds binary data"):
        scan_dataset(tmp_path, resolution=32)


# --- issue 9: nothing dropped without a word; the report -----------------------------------------------------


def test_files_not_used_are_listed(tmp_path):
    make_pair(tmp_path, "good")
    (tmp_path / "orphan.txt").write_text("a caption without its image")
    (tmp_path / "notes.md").write_text("todo")
    (tmp_path / "._good.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    make_pair(tmp_path / "more", "deep")
    summary = scan_dataset(tmp_path, resolution=32)
    assert [r.path.name for r in summary.records] == ["good.png"]
    reasons = {Path(entry.split(": ")[0]).name: entry.split(": ", 1)[1] for entry in summary.ignored}
    assert reasons == {
        "._good.png": "hidden (its name starts with '.')",
        "more": f"sub-folder, not searched (put its images directly in {tmp_path})",
        "notes.md": "not an image format this Pillow opens",
        "orphan.txt": "caption without an image",
    }
    assert "4 files not used: " in summary.report()


def test_kohya_folders_not_used_are_listed(tmp_path):
    make_pair(tmp_path / "2_x", "a")
    (tmp_path / "notes").mkdir()
    (tmp_path / "readme.txt").write_text("captions for the whole set?")
    summary = scan_dataset(tmp_path, resolution=32)
    assert summary.ignored == (
        f"{tmp_path / 'notes'}: folder not named '<repeats>_<concept>'",
        f"{tmp_path / 'readme.txt'}: not in a '<repeats>_<concept>' folder",
    )


def test_report_counts_small_images_and_crop_losses(tmp_path):
    make_pair(tmp_path, "square", size=(64, 64))
    make_pair(tmp_path, "wide", size=(128, 64))  # loses 50%
    make_pair(tmp_path, "photo", size=(64, 48))  # 4:3 loses 25%: not more than 25%
    make_pair(tmp_path, "tall", size=(40, 64))  # loses 37.5%, and is small
    summary = scan_dataset(tmp_path, resolution=48)
    assert [(p.name, round(x, 3)) for p, x in summary.crop_losses] == [("wide.png", 0.5), ("tall.png", 0.375)]
    assert summary.small_images == 1 and summary.smallest == ((tmp_path / "tall.png", 40, 64),)
    report = summary.report()
    assert (
        "2 images lose more than 25% of the area to the square crop, worst: wide.png 50%, tall.png 38%"
        in report
    )
    assert "1 image is smaller than resolution 48 and will be upscaled, smallest: tall.png 40x64" in report
    assert "formats: PNG 4; modes: RGB 4" in report


@pytest.fixture(scope="module")
def tokenizer():
    from loha_diffusion.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_long_captions_are_reported_with_the_tokenizer(tmp_path, tokenizer):
    """Issue row: a 183-token caption with the trigger word last was cut to 77 tokens without a warning."""
    long_caption = " ".join(["dog"] * 180 + ["sks"])  # 181 tokens + start and end = 183
    make_pair(tmp_path, "long", long_caption)
    make_pair(tmp_path, "longer", " ".join(["dog"] * 200))
    make_pair(tmp_path, "short", "sks dog")
    assert len(tokenizer(long_caption).input_ids) == 183
    assert scan_dataset(tmp_path, resolution=32).token_limit is None  # no tokenizer: not checked
    summary = scan_dataset(tmp_path, resolution=32, tokenizer=tokenizer)
    assert summary.token_limit == 77
    assert [(p.name, n) for p, n in summary.long_captions] == [("longer.png", 202), ("long.png", 183)]
    assert (
        "2 captions are longer than the text encoder's 77 tokens and cut there (later words are not trained), "
        "longest: longer.png 202 tokens, long.png 183 tokens"
    ) in summary.report()


def test_one_error_lists_every_kind_of_problem(tmp_path):
    make_pair(tmp_path, "good")
    make_pair(tmp_path, "nocap", None)
    (tmp_path / "broken.png").write_bytes(b"")
    (tmp_path / "broken.txt").write_text("x")
    caption_bytes(tmp_path, "latin", b"\xe9t\xe9")
    with pytest.raises(DataError) as error:
        scan_dataset(tmp_path, resolution=32)
    text = str(error.value)
    assert (
        "1 unreadable images" in text
        and "1 unreadable caption files" in text
        and "1 images have no caption" in text
    )


def test_dry_run_prints_the_scan_report_with_token_counts(tiny_sd1_pipeline_dir, tmp_path):
    make_pair(tmp_path / "data", "long", " ".join(["dog"] * 180 + ["sks"]))
    make_pair(tmp_path / "data", "wide", "sks dog", size=(96, 32))
    flags = ["--train_data_dir", str(tmp_path / "data"), "--resolution", "32", "--max_train_steps", "2"]
    cfg = load_config(["--pretrained_model_name_or_path", str(tiny_sd1_pipeline_dir), *flags])
    text = dry_run(cfg, num_processes=1)
    assert "Data: 2 images (flat layout in" in text and "formats: PNG 2; modes: RGB 2" in text
    assert "1 image loses more than 25% of the area to the square crop, worst: wide.png 67%" in text
    assert "longest: long.png 183 tokens" in text
    # Without a tokenizer in the model folder the dry run still checks the data, and says what it skipped.
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_pipeline_dir, model)
    shutil.rmtree(model / "tokenizer")
    cfg = load_config(["--pretrained_model_name_or_path", str(model), *flags])
    text = dry_run(cfg, num_processes=1)
    assert "formats: PNG 2" in text and "caption lengths not checked (no tokenizer: " in text
