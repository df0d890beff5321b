"""The one image reader (`training/images.py`) and the scan's image checks: every Pillow mode to 8-bit RGB with
exact values, transparency onto the background colour, every way a file can be unreadable, the size limit,
every format Pillow opens, and what the scan reports (issue 9, data half)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import data_only_flags
from PIL import Image, ImageFile

from loha_diffusion.errors import ConfigError, DataError
from loha_diffusion.training.config import load_config, parse_color
from loha_diffusion.training.data import (
    IMAGE_EXTENSIONS,
    CaptionedImageDataset,
    ImageReader,
    load_image,
    scan_dataset,
    scan_training_data,
)
from loha_diffusion.training.images import to_rgb

REPO = Path(__file__).resolve().parents[1]
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
BACKGROUND = (10, 20, 30)


def pixels(path: Path, reader: ImageReader = ImageReader()) -> np.ndarray:
    """The reader's RGB pixels of `path` as uint8 (H, W, 3)."""
    image = reader.read(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def caption(path: Path, text: str = "a thing") -> Path:
    path.with_suffix(".txt").write_text(text)
    return path


def jpeg_bytes(size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# --- every Pillow mode, exact values -------------------------------------------------------------------------


def test_rgb_and_l_and_bilevel(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [1, 2, 3]]], dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    assert (pixels(tmp_path / "rgb.png") == rgb).all()
    Image.fromarray(np.array([[0, 7, 200, 255]], dtype=np.uint8), "L").save(tmp_path / "l.png")
    assert pixels(tmp_path / "l.png")[0].tolist() == [[0] * 3, [7] * 3, [200] * 3, [255] * 3]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    bilevel.save(tmp_path / "bilevel.png")
    assert Image.open(tmp_path / "bilevel.png").mode == "1"
    assert pixels(tmp_path / "bilevel.png")[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_rgba_hidden_colour_is_never_seen(tmp_path):
    """Issue row: alpha 0 everywhere except a red square; the RGB under the transparent part is green."""
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[..., 1] = 255  # invisible green
    array[2:4, 2:4] = (255, 0, 0, 255)  # the visible red square
    Image.fromarray(array, "RGBA").save(tmp_path / "a.png")
    out = pixels(tmp_path / "a.png")
    assert out[2:4, 2:4].tolist() == [[[255, 0, 0]] * 2] * 2
    outside = np.ones((8, 8), dtype=bool)
    outside[2:4, 2:4] = False
    assert (out[outside] == WHITE).all()  # white by default, never green
    out = pixels(tmp_path / "a.png", ImageReader(background_color=BACKGROUND))
    assert (out[outside] == BACKGROUND).all() and out[2, 2].tolist() == [255, 0, 0]


def test_partial_alpha_is_composited_exactly(tmp_path):
    array = np.array([[[0, 0, 0, 128], [200, 100, 50, 51], [9, 9, 9, 255]]], dtype=np.uint8)
    Image.fromarray(array, "RGBA").save(tmp_path / "a.png")
    out = pixels(tmp_path / "a.png")[0].astype(int)
    # round((c * a + 255 * (255 - a)) / 255)
    assert out.tolist() == [[127, 127, 127], [244, 224, 214], [9, 9, 9]]


def test_opaque_rgba_is_not_counted_as_transparent(tmp_path):
    Image.new("RGBA", (4, 4), (1, 2, 3, 255)).save(tmp_path / "a.png")
    facts = ImageReader().inspect(tmp_path / "a.png")
    assert facts.mode == "RGBA" and not facts.transparent
    assert pixels(tmp_path / "a.png")[0, 0].tolist() == [1, 2, 3]


def test_la(tmp_path):
    array = np.array([[[90, 0], [90, 255]]], dtype=np.uint8)
    Image.fromarray(array, "LA").save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "LA"
    assert pixels(tmp_path / "a.png", ImageReader(BACKGROUND))[0].tolist() == [list(BACKGROUND), [90, 90, 90]]


def palette_image(mode: str = "P") -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    for x in range(3):
        image.putpixel((x, 0), x)
    return image


def test_p_without_and_with_transparency(tmp_path):
    palette_image().save(tmp_path / "p.png")
    assert pixels(tmp_path / "p.png")[0].tolist() == [[255, 0, 0], [0, 0, 255], [0, 255, 0]]
    palette_image().save(tmp_path / "pt.png", transparency=2)  # index 2 (green) is transparent
    opened = Image.open(tmp_path / "pt.png")
    assert opened.mode == "P" and "transparency" in opened.info
    assert pixels(tmp_path / "pt.png")[0].tolist() == [[255, 0, 0], [0, 0, 255], list(WHITE)]
    assert ImageReader().inspect(tmp_path / "pt.png").transparent


def test_pa(tmp_path):
    image = palette_image().convert("PA")
    image.putalpha(Image.fromarray(np.array([[255, 0, 255]], dtype=np.uint8), "L"))
    image.save(tmp_path / "pa.tiff")
    assert Image.open(tmp_path / "pa.tiff").mode == "PA"
    assert pixels(tmp_path / "pa.tiff", ImageReader(BLACK))[0].tolist() == [
        [255, 0, 0],
        [0, 0, 0],
        [0, 255, 0],
    ]


def test_l_and_rgb_with_a_transparent_colour_key(tmp_path):
    Image.fromarray(np.array([[5, 6]], dtype=np.uint8), "L").save(tmp_path / "l.png", transparency=5)
    assert pixels(tmp_path / "l.png", ImageReader(BACKGROUND))[0].tolist() == [list(BACKGROUND), [6, 6, 6]]
    rgb = np.array([[[0, 255, 0], [1, 2, 3]]], dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png", transparency=(0, 255, 0))
    assert pixels(tmp_path / "rgb.png")[0].tolist() == [list(WHITE), [1, 2, 3]]


def test_cmyk_uses_pillows_conversion(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "a.tiff")
    assert Image.open(tmp_path / "a.tiff").mode == "CMYK"
    assert pixels(tmp_path / "a.tiff")[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "a.jpg", quality=100)
    assert Image.open(tmp_path / "a.jpg").mode == "CMYK"
    assert pixels(tmp_path / "a.jpg").shape == (1, 3, 3)


def test_16_bit_grey_scales_by_bit_depth(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    expected = [[0] * 3, [1] * 3, [128] * 3, [255] * 3]  # Pillow's own convert("L") clips 257.. to 255
    assert pixels(tmp_path / "a.png")[0].tolist() == expected
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())  # convert() would clip
    big_endian.save(tmp_path / "b.tiff")
    assert Image.open(tmp_path / "b.tiff").mode == "I;16B"
    assert pixels(tmp_path / "b.tiff")[0].tolist() == expected


def test_32_bit_integer_grey_scales_by_the_files_bit_depth(tmp_path):
    values = np.array([[0, 2**30, 2**31 - 1, -5]], dtype=np.int32)  # a 32-bit signed TIFF
    Image.fromarray(values, "I").save(tmp_path / "a.tiff")
    assert Image.open(tmp_path / "a.tiff").mode == "I"
    assert pixels(tmp_path / "a.tiff")[0].tolist() == [[0] * 3, [128] * 3, [255] * 3, [0] * 3]
    # PGM with maxval 65535: Pillow gives mode I holding 16-bit values.
    (tmp_path / "b.pgm").write_bytes(b"P5 3 1 65535\n" + np.array([0, 32768, 65535], dtype=">u2").tobytes())
    assert Image.open(tmp_path / "b.pgm").mode == "I"
    assert pixels(tmp_path / "b.pgm")[0].tolist() == [[0] * 3, [128] * 3, [255] * 3]


def test_float_grey_range_rule(tmp_path):
    unit = np.array([[0.0, 0.25, 0.5, 1.0, np.nan]], dtype=np.float32)  # [0, 1]: no value above 1
    Image.fromarray(unit, "F").save(tmp_path / "a.tiff")
    assert Image.open(tmp_path / "a.tiff").mode == "F"
    assert pixels(tmp_path / "a.tiff")[0, :, 0].tolist() == [0, 64, 128, 255, 0]
    byte_range = np.array([[0.0, 0.5, 100.4, 254.5, 300.0, -3.0]], dtype=np.float32)  # [0, 255]
    Image.fromarray(byte_range, "F").save(tmp_path / "b.tiff")
    assert pixels(tmp_path / "b.tiff")[0, :, 0].tolist() == [0, 1, 100, 255, 255, 0]


def _writable(mode: str, fmt: str) -> bool:
    try:
        Image.new(mode, (5, 3)).save(io.BytesIO(), format=fmt)
    except (OSError, KeyError, ValueError):
        return False
    return True


FORMATS = {"png": "PNG", "tiff": "TIFF", "webp": "WEBP", "bmp": "BMP", "gif": "GIF", "jpg": "JPEG"}
MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "I;16", "I;16B", "I", "F", "YCbCr", "LAB")
# Every (mode, format) pair this Pillow can write: the modes a training folder can really hold.
MODES_AND_FORMATS = [(m, ext) for m in MODES for ext, fmt in FORMATS.items() if _writable(m, fmt)]


@pytest.mark.parametrize(("mode", "fmt"), MODES_AND_FORMATS)
def test_every_mode_pillow_can_store_reads_as_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"a.{fmt}"
    Image.new(mode, (5, 3)).save(path)
    image, facts = ImageReader().read_with_facts(path)
    assert image.mode == "RGB" and image.size == (5, 3) and facts.size == (5, 3)


def test_to_rgb_refuses_a_mode_without_conversion():
    image = Image.new("RGB", (1, 1))
    image._mode = "XYZ"  # a mode Pillow may add one day
    with pytest.raises(ValueError, match="no conversion"):
        to_rgb(image)


# --- orientation, animation, formats -------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (1, 2, 3))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "a.jpg", exif=exif)
    assert ImageReader().inspect(tmp_path / "a.jpg").size == (2, 4)
    assert load_image(tmp_path / "a.jpg").size == (2, 4)


def test_animation_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    image, facts = ImageReader().read_with_facts(tmp_path / "a.gif")
    assert facts.animated and facts.format == "GIF"
    assert np.asarray(image)[0, 0].tolist() == [255, 0, 0]


def test_accepted_extensions_are_those_pillow_opens():
    for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"):
        assert ext in IMAGE_EXTENSIONS
    assert ".pdf" not in IMAGE_EXTENSIONS  # Pillow writes PDF, it does not read it
    assert ".txt" not in IMAGE_EXTENSIONS


def test_avif_tiff_gif_beside_png_are_all_used(tmp_path):
    """Issue row: captioned .avif, .tiff and .gif beside a .png were silently ignored."""
    for ext in ("png", "avif", "tiff", "gif"):
        Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / f"img_{ext}.{ext}")
        caption(tmp_path / f"img_{ext}.{ext}")
    summary = scan_dataset(tmp_path, resolution=16)
    assert sorted(r.path.suffix for r in summary.records) == [".avif", ".gif", ".png", ".tiff"]
    assert summary.formats == {"PNG": 1, "AVIF": 1, "TIFF": 1, "GIF": 1}
    assert "formats: AVIF 1, GIF 1, PNG 1, TIFF 1" in summary.report()


def test_captioned_file_of_an_unaccepted_format_is_named(tmp_path):
    caption(Image.new("RGB", (8, 8)).save(tmp_path / "good.png") or tmp_path / "good.png")
    (tmp_path / "drawing.svg").write_text("<svg/>")
    caption(tmp_path / "drawing.svg")
    summary = scan_dataset(tmp_path, resolution=8)
    assert [r.path.name for r in summary.records] == ["good.png"]
    assert summary.ignored == (
        f"{tmp_path / 'drawing.svg'}: .svg is not an image format this Pillow opens, so its caption drawing.txt "
        "is not used; convert it to PNG or JPEG",
    )
    assert "1 file not used: drawing.svg (.svg is not an image format this Pillow opens" in summary.report()


# --- unreadable files ----------------------------------------------------------------------------------------


def write_unreadable(tmp_path: Path, kind: str) -> Path:
    if kind == "truncated_png":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "full.png"
        )
        data = (tmp_path / "full.png").read_bytes()
        (tmp_path / "full.png").unlink()
        path = tmp_path / "bad.png"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_jpeg":
        data = jpeg_bytes()
        path = tmp_path / "bad.jpg"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path = tmp_path / "bad.png"
        path.write_bytes(b"")
    elif kind == "text_named_png":
        path = tmp_path / "bad.png"
        path.write_text("<html>404 not found</html>")
    else:
        raise AssertionError(kind)
    return path


UNREADABLE = {
    "truncated_png": "truncated or corrupt",
    "truncated_jpeg": "truncated or corrupt",
    "zero_bytes": "not an image file",
    "text_named_png": "not an image file",
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_file_is_a_named_data_error(tmp_path, kind):
    path = write_unreadable(tmp_path, kind)
    with pytest.raises(DataError, match=rf"{path.name}: unreadable image: {UNREADABLE[kind]}"):
        ImageReader().read(path)


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_file_stops_the_scan_or_is_skipped(tmp_path, kind):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    caption(tmp_path / "good.png")
    caption(write_unreadable(tmp_path, kind))
    with pytest.raises(DataError, match=r"1 unreadable images .*on_bad_image = 'skip'"):
        scan_dataset(tmp_path, resolution=8)
    summary = scan_dataset(tmp_path, resolution=8, on_bad_image="skip")
    assert [r.path.name for r in summary.records] == ["good.png"]
    assert len(summary.skipped) == 1 and UNREADABLE[kind] in summary.skipped[0]
    assert "1 image skipped: bad." in summary.report()


def test_truncated_jpeg_among_good_images_is_caught_by_the_scan(tmp_path):
    """Issue row: a truncated JPEG among 17 good images passed the header-only scan, then stopped the run."""
    for i in range(17):
        (tmp_path / f"good{i:02d}.jpg").write_bytes(jpeg_bytes())
        caption(tmp_path / f"good{i:02d}.jpg")
    data = jpeg_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    caption(tmp_path / "half.jpg")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(DataError, match=r"half\.jpg: unreadable image: truncated"):
        scan_dataset(tmp_path, resolution=32)
    summary = scan_dataset(tmp_path, resolution=32, on_bad_image="skip")
    assert len(summary.records) == 17 and "half.jpg" in summary.skipped[0]
    dataset = CaptionedImageDataset(summary.records, resolution=32)
    assert all(dataset[i]["pixel_values"].shape == (3, 32, 32) for i in range(len(dataset)))


def test_missing_and_unreadable_permission(tmp_path):
    with pytest.raises(DataError, match="nothere.png: file not found"):
        ImageReader().read(tmp_path / "nothere.png")
    if os.name != "posix" or os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    Image.new("RGB", (2, 2)).save(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    with pytest.raises(DataError, match="locked.png: unreadable image: permission denied"):
        ImageReader().read(tmp_path / "locked.png")


# --- the size limit (decompression bombs) --------------------------------------------------------------------


def test_image_over_max_image_pixels_is_a_named_error(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    with pytest.raises(
        DataError, match=r"big\.png: image too large \(20x10 = 200 pixels.*max_image_pixels = 199"
    ):
        ImageReader(max_image_pixels=199).read(tmp_path / "big.png")
    assert ImageReader(max_image_pixels=200).read(tmp_path / "big.png").size == (20, 10)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillows_bomb_error_and_warning_become_data_errors(tmp_path, monkeypatch):
    """Issue row: a 14000x14000 PNG gave a raw DecompressionBombError; here Pillow's limit is lowered instead."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "bomb.png")  # 400 > 2 x 100: Pillow's error
    Image.new("RGB", (15, 10)).save(tmp_path / "warn.png")  # 150 > 100: Pillow's warning
    for name in ("bomb.png", "warn.png"):
        with pytest.raises(
            DataError, match=rf"{name}: image too large.*downscale it.*raise max_image_pixels"
        ):
            ImageReader().read(tmp_path / name)
    # The setting raises Pillow's limit.
    assert ImageReader(max_image_pixels=400).read(tmp_path / "bomb.png").size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 400


def test_too_large_image_in_the_scan_error_or_skip(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "huge.png")
    for name in ("good", "huge"):
        (tmp_path / f"{name}.txt").write_text("x")
    base = data_only_flags(tmp_path)
    cfg = load_config(base + ["--resolution", "8", "--max_image_pixels", "1000"])
    with pytest.raises(DataError, match=r"huge\.png: image too large.*max_image_pixels = 1,000"):
        scan_training_data(cfg)
    cfg = load_config(base + ["--resolution", "8", "--max_image_pixels", "1000", "--on_bad_image", "skip"])
    summary = scan_training_data(cfg)
    assert [r.path.name for r in summary.records] == ["good.png"] and "huge.png" in summary.skipped[0]


# --- settings ------------------------------------------------------------------------------------------------


def test_background_color_setting(tmp_path):
    assert parse_color("white") == WHITE and parse_color("black") == BLACK
    assert parse_color("#0a141e") == BACKGROUND and parse_color("10, 20, 30") == BACKGROUND
    assert parse_color("gray") == (128, 128, 128)
    for bad in ("nocolour", "#12345", "#11223344", "1,2", "300,0,0", "1,2,x"):
        with pytest.raises(ConfigError, match="background_color"):
            parse_color(bad)
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "1"]
    with pytest.raises(ConfigError, match="background_color = 'transparent'"):
        load_config(base + ["--background_color", "transparent"])
    with pytest.raises(ConfigError, match="max_image_pixels"):
        load_config(base + ["--max_image_pixels", "0"])


def test_one_reader_for_scan_samples_and_validation(tmp_path):
    """The run's background colour reaches the training samples through the scanned records."""
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[..., 1] = 255  # transparent green everywhere
    Image.fromarray(array, "RGBA").save(tmp_path / "a.png")
    caption(tmp_path / "a.png")
    base = data_only_flags(tmp_path)
    cfg = load_config(base + ["--resolution", "8", "--background_color", "black"])
    summary = scan_training_data(cfg)
    assert summary.transparent == (tmp_path / "a.png",)
    assert "1 image has transparency, composited onto #000000" in summary.report()
    record = summary.records[0]
    assert record.reader.background_color == BLACK
    sample = CaptionedImageDataset(summary.records, resolution=8)[0]["pixel_values"]
    assert (sample == -1).all()  # black in [-1, 1]; the hidden green is gone
    assert np.asarray(load_image(record.path, record.reader)).max() == 0  # what validation reads


def test_bundled_quickstart_images_give_the_same_pixels():
    """`sample_data/shapes` (all RGB PNGs) gives exactly the tensors of the reader before issue 9."""
    summary = scan_dataset(REPO / "sample_data" / "shapes", resolution=64)
    dataset = CaptionedImageDataset(summary.records, resolution=48, random_flip=True, seed=5)
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        digest.update(dataset[(1, i)]["pixel_values"].numpy().tobytes())
    assert digest.hexdigest() == PINNED_SHAPES_DIGEST


PINNED_SHAPES_DIGEST = "386d0feae92f2e63b505a8370e5025009ed4f78ef08e02b99e83f885d7f737c9"
