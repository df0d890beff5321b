"""The one image reader of training: the scan, the dataset and validation all read images through it.

`ImageReader.read(path)` opens a file with Pillow, checks its size against `max_image_pixels` before decoding,
decodes it fully, applies the EXIF orientation and returns an 8-bit RGB image. Every Pillow mode is turned into
RGB by one rule per mode:

| Pillow mode | rule |
|---|---|
| `RGB`, `L`, `1`, `RGBX` | Pillow's conversion (`L` grey `v` -> `(v, v, v)`, `1` -> 0 or 255) |
| `RGBA`, `LA`, `PA`, `RGBa`, `P`/`L`/`RGB` with a `transparency` entry | alpha composited onto `background_color` |
| `CMYK`, `YCbCr`, `LAB`, `HSV` | Pillow's conversion |
| `I;16`, `I;16B`, `I;16L`, `I;16N`, `I;16S` (16-bit grey) | `round(v * 255 / 65535)` (`I;16S`: `/ 32767`), so 65535 -> 255, 32768 -> 128 |
| `I` (32-bit integer grey) | scaled by the file's bit depth: a TIFF's `BitsPerSample`/`SampleFormat` (32-bit signed: `/ (2**31 - 1)`); other formats put 16-bit data in `I` (PGM with maxval > 255, old 16-bit PNG), so `/ 65535` |
| `F` (32-bit float grey) | `[0, 1]` when no finite value exceeds 1.0 (`round(v * 255)`), else `[0, 255]` (`round(v)`); clipped, NaN -> 0 |

Halves round up; negative values clip to 0 and values above the range to 255. Colour images with 16 bits per
channel (PNG, TIFF) reach us as 8-bit `RGB`/`RGBA` already (Pillow keeps the high byte). Compositing is
`round((c * a + b * (255 - a)) / 255)` per channel, for colour `c`, alpha `a` and background `b`, so a fully
transparent pixel becomes exactly the background colour (white by default) and an opaque one keeps its
colour. Animated files (GIF, APNG, WebP, ...) give their first frame.

The size limit: Pillow refuses images over 2 x `PIL.Image.MAX_IMAGE_PIXELS` (89,478,485 pixels by default)
and warns above it. The reader refuses any image over `max_image_pixels` (default: Pillow's limit) with a
`DataError` naming the file and the fix. A `max_image_pixels` above Pillow's limit raises
`PIL.Image.MAX_IMAGE_PIXELS` for the whole process (Pillow has no per-call limit).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

Image.init()  # register every plugin, so the accepted extensions are all those this Pillow opens

# Every extension whose format Pillow can open (not those it can only write, such as .pdf).
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(
    sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
)
WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PILLOW_CONVERTS = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_LIMIT_LOCK = threading.Lock()


def is_accepted_image(path: Path) -> bool:
    """Whether `path`'s extension (any case) is one the installed Pillow can open."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def pillow_pixel_limit() -> int | None:
    """Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, pixels; None when disabled)."""
    return Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ImageFacts:
    """What reading one image found: Pillow's `format` ("PNG", "JPEG", ...) and `mode` as stored ("RGBA",
    "I;16", ...), the `size` (width, height) in pixels after the EXIF orientation, whether some pixel was not
    opaque (`transparent`, composited onto the background) and whether the file has several frames
    (`animated`, the first is used)."""

    format: str
    mode: str
    size: tuple[int, int]
    transparent: bool
    animated: bool


def integer_max(image: Image.Image) -> float:
    """The value that becomes 255 for an integer grey image (`I;16*`, `I`): see the module docstring. Call it
    on the image as opened (a TIFF's tags are lost by copies)."""
    if image.mode.startswith("I;16"):
        return 32767.0 if image.mode == "I;16S" else 65535.0
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 258 in tags:  # TIFF BitsPerSample, SampleFormat (1 unsigned, 2 signed)
        bits = tags[258][0] if isinstance(tags[258], tuple) else tags[258]
        signed = tags.get(339, 1) in (2, (2,))
        return float(2 ** (int(bits) - 1) - 1 if signed else 2 ** int(bits) - 1)
    return 65535.0


def _grey_to_8bit(image: Image.Image, max_value: float | None) -> Image.Image:
    """An `I;16*`, `I` or `F` image as an 8-bit `L` image (an `LA` one when it has a `transparency` value);
    integer values are scaled so that `max_value` (default: `integer_max(image)`) becomes 255."""
    array = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        finite = array[np.isfinite(array)]
        scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 1.0
        values = values * scale
    else:
        values = array.astype(np.float64) * (255.0 / (max_value or integer_max(image)))
    grey = Image.fromarray(np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8), "L")  # halves round up
    if "transparency" in image.info and isinstance(image.info["transparency"], int):
        alpha = np.where(array == image.info["transparency"], 0, 255).astype(np.uint8)
        return Image.merge("LA", (grey, Image.fromarray(alpha, "L")))
    return grey


def composite(image: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, bool]:
    """`image` (mode `RGBA`) over an opaque `background` colour (0-255 per channel); returns the `RGB` image
    and whether some pixel was not opaque. Per channel: `round((c * a + b * (255 - a)) / 255)`."""
    alpha_band = image.getchannel("A")
    if alpha_band.getextrema()[0] == 255:
        return image.convert("RGB"), False
    rgba = np.asarray(image, dtype=np.uint32)
    alpha = rgba[..., 3:4]
    rgb = (rgba[..., :3] * alpha + np.asarray(background, dtype=np.uint32) * (255 - alpha) + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB"), True


def to_rgb(
    image: Image.Image, background: tuple[int, int, int] = WHITE, max_value: float | None = None
) -> tuple[Image.Image, bool]:
    """A decoded image of any Pillow mode as 8-bit `RGB` by the rules of the module docstring; returns it and
    whether it had transparency (composited onto `background`). `max_value`: the integer grey value that
    becomes 255 (default: `integer_max(image)`).

    Raises:
        ValueError: Pillow has no conversion from the image's mode to RGB.
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = _grey_to_8bit(image, max_value)
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if image.mode == "La":  # premultiplied grey + alpha: Pillow converts it only to LA
        image = image.convert("LA")
    if has_alpha:
        return composite(image.convert("RGBA"), background)
    if image.mode == "RGB":
        return image, False
    if image.mode not in _PILLOW_CONVERTS:
        raise ValueError(f"Pillow mode {image.mode!r} has no conversion to RGB")
    return image.convert("RGB"), False


@dataclass(frozen=True)
class ImageReader:
    """Reads training images as 8-bit RGB (see the module docstring for every mode's rule).

    `background_color` (r, g, b in 0-255) is what transparent pixels become; `max_image_pixels` is the
    largest width x height accepted (None: Pillow's limit)."""

    background_color: tuple[int, int, int] = WHITE
    max_image_pixels: int | None = None

    @property
    def pixel_limit(self) -> int | None:
        """The largest image accepted, in pixels (None: no limit)."""
        return self.max_image_pixels if self.max_image_pixels is not None else pillow_pixel_limit()

    def _raise_pillow_limit(self) -> None:
        if self.max_image_pixels is None:
            return
        with _LIMIT_LOCK:
            current = Image.MAX_IMAGE_PIXELS
            if current is not None and self.max_image_pixels > current:
                Image.MAX_IMAGE_PIXELS = self.max_image_pixels

    def _too_large(self, path: Path, detail: str) -> DataError:
        limit = self.pixel_limit
        return DataError(
            f"{path}: image too large ({detail}; the limit is max_image_pixels = {limit:,} pixels, as Pillow "
            "refuses larger images as possible decompression bombs); downscale it (training resizes it to "
            "`resolution` anyway), or raise max_image_pixels"
        )

    def _open(self, path: Path) -> Image.Image:
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise self._too_large(path, str(exc).split(" exceeds")[0].lower()) from None
        width, height = image.size
        limit = self.pixel_limit
        if limit is not None and width * height > limit:
            image.close()
            raise self._too_large(path, f"{width}x{height} = {width * height:,} pixels")
        return image

    def read_with_facts(self, path: str | Path) -> tuple[Image.Image, ImageFacts]:
        """Read `path` fully as an 8-bit RGB PIL image (EXIF orientation applied, first frame of an animation,
        transparency composited onto `background_color`), with what was found (`ImageFacts`).

        Raises:
            DataError: the file is missing, unreadable, truncated or corrupt, not an image Pillow can open,
                larger than `max_image_pixels`, or of a mode with no RGB conversion; the message names the
                file and the fix.
        """
        path = Path(path)
        self._raise_pillow_limit()
        try:
            with self._open(path) as image:
                fmt, mode = image.format or "?", image.mode
                animated = bool(getattr(image, "is_animated", False))
                image.load()  # decode every byte now: a truncated file fails here, not in training
                max_value = integer_max(image) if image.mode.startswith("I") else None
                oriented = ImageOps.exif_transpose(image)
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except PermissionError:
            raise DataError(f"{path}: unreadable image: permission denied; make it readable") from None
        except UnidentifiedImageError:
            raise DataError(
                f"{path}: unreadable image: not an image file this Pillow can open (empty, a text or HTML "
                "file, or a variant of the format it does not support); re-save it as PNG or JPEG"
            ) from None
        except Exception as exc:  # Pillow's plugins raise many kinds for a broken file
            raise DataError(
                f"{path}: unreadable image: truncated or corrupt ({type(exc).__name__}: {exc}); re-download or "
                "re-save it"
            ) from exc
        try:
            rgb, transparent = to_rgb(oriented, self.background_color, max_value)
        except ValueError as exc:
            raise DataError(
                f"{path}: unsupported image mode ({exc}); re-save it as an 8-bit RGB PNG"
            ) from None
        return rgb, ImageFacts(fmt, mode, rgb.size, transparent, animated)

    def read(self, path: str | Path) -> Image.Image:
        """`read_with_facts(path)`'s image: 8-bit RGB, EXIF orientation applied, transparency composited.

        Raises:
            DataError: as `read_with_facts` (the message names the file and the fix).
        """
        return self.read_with_facts(path)[0]

    def inspect(self, path: str | Path) -> ImageFacts:
        """Decode `path` fully, as training will, and return its `ImageFacts` (the pixels are dropped).

        Raises:
            DataError: as `read_with_facts` (the message names the file and the fix).
        """
        return self.read_with_facts(path)[1]


DEFAULT_READER = ImageReader()
