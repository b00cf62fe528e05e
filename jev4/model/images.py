"""Reading an image the way a viewer shows it: any PIL mode -> 8-bit RGB, within jev4's size limits.

One job: turn a path or a PIL image into an RGB, 8-bit PIL image of the
picture a person sees, or refuse it with an ``EncodeError`` that names the
image and the limit. Resizing and normalising are the image processor's job
(``jev4.model.image_resize``).

Why not ``img.convert("RGB")`` (what transformers' processors do): PIL clips
16-bit and 32-bit data instead of scaling it (a 16-bit grayscale PNG comes out
almost all white), ignores EXIF orientation, and drops alpha without
compositing. The rules here, per PIL mode:

- ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's
  own conversion to RGB (no ICC colour management, as upstream).
- Alpha (``LA``, ``PA``, ``RGBA``, premultiplied ``La``/``RGBa``, and ``L``,
  ``P`` or ``RGB`` with a ``transparency`` colour or palette entry): composited
  on opaque white, what image viewers and web pages show, with
  ``Image.alpha_composite``, as transformers' ``convert_to_rgb`` (upstream's
  path) does.
- 16-bit (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): 8-bit value =
  round(v / 257), so 0 -> 0, 65535 -> 255 and 257 * k -> k exactly.
- ``I`` (32-bit signed): PIL's PNG reader opens 16-bit PNGs as ``I`` in some
  versions and ``I;16`` in others, so ``I`` data within 0..65535 takes the
  16-bit rule. Other ``I`` data (negative, or over 65535) has no standard white
  point: it is stretched linearly from its minimum to its maximum, as
  scientific viewers (ImageJ, for one) display 32-bit data; a constant image
  becomes black.
- ``F`` (32-bit float): taken to be in 0..1 when its maximum is <= 1 (scaled by
  255), else in 0..255; values outside the range are clipped, NaN becomes 0.
- A ``transparency`` value on 16/32-bit data marks pixels that become white.
- EXIF orientation is applied (``ImageOps.exif_transpose``): what cameras
  record and viewers honour.
- Animated or multi-frame files (GIF, APNG, multi-page TIFF, MPO) give their
  first frame, with a logged warning (an in-memory image: the frame it is at).

Limits, checked from the file header before any pixel is decoded:
``MAX_IMAGE_PIXELS`` (a decompression-bomb guard) and ``MAX_ASPECT_RATIO``
(Qwen2-VL's ``smart_resize`` refuses a longer side over 200 x the shorter).
Both are fields of ``ImageLimits`` for callers that need other values.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from jev4.errors import EncodeError

__all__ = ["DEFAULT_LIMITS", "MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "ImageLimits", "decode_image", "to_rgb"]

log = logging.getLogger(__name__)

# PIL's own default Image.MAX_IMAGE_PIXELS (1024**3 // 4 // 3 = 89,478,485 pixels, about 256 MiB as 24-bit RGB),
# where PIL only warns; jev4 refuses there, before decoding. Far above any useful input: the real model's
# processor shrinks every image to at most 28 * 28 * 1280 (about 1 megapixel).
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# Qwen2-VL's smart_resize (transformers 5.23, models/qwen2_vl/image_processing_qwen2_vl.py) raises
# "absolute aspect ratio must be smaller than 200" for max(h, w) / min(h, w) > 200.
MAX_ASPECT_RATIO = 200.0

EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_BIT_DEPTH_MODES = (*SIXTEEN_BIT_MODES, "I", "F")
# What PIL raises for a broken file besides OSError (UnidentifiedImageError, "image file is truncated").
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageLimits:
    """What ``decode_image`` refuses, from the image's size alone (known from the header, before decoding).

    ``max_image_pixels`` bounds width x height of the file as stored (before
    any resize); ``max_aspect_ratio`` bounds max(w, h) / min(w, h).
    """

    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if self.max_image_pixels < 1:
            raise EncodeError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_aspect_ratio < 1:
            raise EncodeError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    def check(self, size: tuple[int, int], source: str) -> None:
        """Raise ``EncodeError`` naming ``source`` and the limit when ``size`` (width, height) breaks one."""
        width, height = size
        if width < 1 or height < 1:
            raise EncodeError(f"{source}: empty image ({width}x{height} pixels)")
        pixels = width * height
        if pixels > self.max_image_pixels:
            raise EncodeError(pixel_limit_message(source, f"{width}x{height} = {pixels:,} pixels", self.max_image_pixels))
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise EncodeError(
                f"{source}: aspect ratio {ratio:g} ({width}x{height} pixels) is over the limit of {self.max_aspect_ratio:g} "
                "(jev4.model.images.ImageLimits; Qwen2-VL's smart_resize refuses over 200); crop or pad the image"
            )


DEFAULT_LIMITS = ImageLimits()


def pixel_limit_message(source: str, what: str, limit: int) -> str:
    return (
        f"{source}: {what} is over jev4's limit of {limit:,} pixels (jev4.model.images.ImageLimits), "
        "refused before decoding as a possible decompression bomb; downscale the image first"
    )


def describe(item: Image.Image, index: int | None) -> str:
    """How errors name an in-memory image: its index in the call (when known) and its size."""
    size = f"{item.width}x{item.height} {item.mode}"
    filename = getattr(item, "filename", "")
    name = f"image {index}" if index is not None else "in-memory image"
    return f"{name} ({filename}, {size})" if filename else f"{name} ({size})"


def decode_image(item: Image.Image | str | Path, limits: ImageLimits = DEFAULT_LIMITS, index: int | None = None) -> Image.Image:
    """An RGB 8-bit PIL image of what a viewer shows for ``item`` (a path or a PIL image); see the module doc.

    A path is opened lazily: its size comes from the header and the limits
    are checked before any pixel is decoded. An in-memory image is checked
    too (one that ``Image.open`` left lazy is still undecoded then), and keeps
    the frame it is at (the caller may have chosen it). ``index`` names an
    in-memory image in errors (it has no path).
    """
    if isinstance(item, Image.Image):
        source = describe(item, index)
        limits.check(item.size, source)
        if getattr(item, "is_animated", False):
            log.warning("%s: an animated / multi-frame image; using the frame it is at (%d)", source, item.tell())
        item.load()
        return to_rgb(item)
    if not isinstance(item, (str, os.PathLike)):
        where = f"image #{index}" if index is not None else "an image"
        raise EncodeError(f"{where} is of type {type(item).__name__}; give a PIL image or a path to an image file")
    path = Path(item)
    _check_regular_file(path)
    try:
        with _open(path, limits) as img:
            limits.check(img.size, str(path))
            if getattr(img, "is_animated", False):
                log.warning("%s: an animated / multi-frame image; using its first frame only", path)
                img.seek(0)
            img.load()
            rgb = to_rgb(img)
            return rgb.copy() if rgb is img else rgb  # closing the file destroys img's pixels
    except DECODE_ERRORS as exc:
        raise EncodeError(f"{path}: not a readable image ({exc})") from exc


def _check_regular_file(path: Path) -> None:
    """Stat before opening: a FIFO or a device would block ``open`` (or read forever), so only a regular file is read."""
    try:
        mode = path.stat().st_mode  # follows symlinks: a link to an image is fine
    except (FileNotFoundError, NotADirectoryError):
        raise EncodeError(f"{path}: image file not found") from None
    if stat.S_ISDIR(mode):
        raise EncodeError(f"{path}: is a directory, not a readable image file")
    if not stat.S_ISREG(mode):
        raise EncodeError(f"{path}: is not a regular file ({_file_kind(mode)}); give an image file")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _open(path: Path, limits: ImageLimits) -> Image.Image:
    """``Image.open`` (header only) with PIL's own decompression-bomb check turned into jev4's error.

    PIL warns above its ``MAX_IMAGE_PIXELS`` and raises above twice that,
    inside ``Image.open``, before jev4 can read the size. The warning is
    silenced here (jev4's limit, checked next, is not above PIL's warning
    threshold by default), and PIL's error becomes jev4's message.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else None
        if pixels is not None and pixels <= limits.max_image_pixels:
            raise EncodeError(
                f"{path}: {pixels:,} pixels is within jev4's limit of {limits.max_image_pixels:,} but over PIL's "
                f"({exc}); raise PIL.Image.MAX_IMAGE_PIXELS as well"
            ) from exc
        what = f"{pixels:,} pixels" if pixels is not None else "the image"
        raise EncodeError(pixel_limit_message(str(path), what, limits.max_image_pixels)) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, as a viewer shows it (module doc); an RGB image without EXIF rotation is returned as is."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_rgb(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise EncodeError(f"image mode {image.mode!r} cannot be converted to RGB ({exc})") from exc


def has_alpha(image: Image.Image) -> bool:
    """An alpha band (straight ``A`` or premultiplied ``a``) or a transparent colour / palette entry."""
    bands = image.getbands()
    return "A" in bands or "a" in bands or image.info.get("transparency") is not None


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        gray = float_to_8bit(values)
    elif image.mode in SIXTEEN_BIT_MODES or (values.size and values.min() >= 0 and values.max() <= 65535):
        gray = sixteen_bit_to_8bit(values)
    else:
        gray = stretch_to_8bit(values)
    transparency = image.info.get("transparency")
    if isinstance(transparency, (int, float)):
        gray = np.where(values == transparency, np.uint8(255), gray)
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")


def sixteen_bit_to_8bit(values: np.ndarray) -> np.ndarray:
    """round(v / 257) in integers: (v + 128) // 257 (no ties: v / 257 is never k + 0.5 for integer v)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def float_to_8bit(values: np.ndarray) -> np.ndarray:
    """0..1 data when the maximum is <= 1, else 0..255 data; clipped, NaN -> 0, rounded to nearest."""
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if data.size and data.max() <= 1.0:
        data = data * 255.0
    return np.rint(np.clip(data, 0.0, 255.0)).astype(np.uint8)


def stretch_to_8bit(values: np.ndarray) -> np.ndarray:
    """Linear from the data's minimum (0) to its maximum (255); a constant image is black."""
    data = values.astype(np.float64)
    low, high = float(data.min()), float(data.max())
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((data - low) * (255.0 / (high - low))).astype(np.uint8)
