"""Images read as a viewer shows them: every PIL mode to the right 8-bit RGB pixels, and the limits refused clearly."""

import logging
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from jev4.errors import EncodeError
from jev4.model.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageLimits, decode_image, to_rgb
from jev4.model.preprocess import load_image

WHITE = (255, 255, 255)


def rgb_of(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def gray3(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.uint8)
    return np.stack([values] * 3, axis=-1)


def png_header(path, width: int, height: int) -> None:
    """A PNG whose header says width x height, with a broken IDAT: opening works, decoding would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\x9c\x03") + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any file image gets decoded."""

    def refuse(self):
        raise AssertionError("decoded an image that should have been refused from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- modes -------------------------------------------------------------------


def test_rgb_is_passed_through_untouched():
    img = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3))
    assert decode_image(img) is img


def test_bilevel_and_gray():
    bits = Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8)).convert("1")
    assert np.array_equal(rgb_of(decode_image(bits)), gray3([[0, 255, 0]]))
    gray = Image.fromarray(np.array([[0, 7, 128, 255]], dtype=np.uint8))
    assert np.array_equal(rgb_of(decode_image(gray)), gray3([[0, 7, 128, 255]]))


def test_sixteen_bit_is_scaled_not_clipped():
    """I;16 -> round(v / 257); PIL's convert('RGB') clips all but the darkest values to white."""
    values = np.array([[0, 128, 129, 257, 385, 386, 32896, 65407, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    assert np.array_equal(rgb_of(decode_image(img)), gray3([[0, 0, 1, 1, 1, 2, 128, 255, 255]]))
    ramp = Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256))
    clipped = np.asarray(ramp.convert("RGB"))
    assert (clipped == 255).mean() > 0.99  # the bug this module exists for
    ours = rgb_of(decode_image(ramp))[..., 0]
    assert ours.min() == 0 and ours.max() == 255 and abs(ours.mean() - 127.5) < 0.01
    assert np.array_equal(ours.ravel(), np.rint(np.arange(65536) / 257).astype(np.uint8))


def test_sixteen_bit_png_file(tmp_path):
    """A 16-bit grayscale PNG, however PIL opens it (I;16 or I), reads as the top byte rounded."""
    values = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode in ("I;16", "I")
    got = rgb_of(decode_image(tmp_path / "deep.png"))
    assert np.array_equal(got, gray3((values.astype(np.uint32) + 128) // 257))


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2")])
def test_sixteen_bit_byte_orders(mode, dtype):
    img = Image.frombytes(mode, (3, 1), np.array([0, 257, 65535], dtype=dtype).tobytes())
    assert np.array_equal(rgb_of(decode_image(img)), gray3([[0, 1, 255]]))


def test_int32_within_sixteen_bits_is_sixteen_bit():
    img = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.int32))
    assert img.mode == "I"
    assert np.array_equal(rgb_of(decode_image(img)), gray3([[0, 1, 128, 255]]))


def test_int32_beyond_sixteen_bits_is_stretched_min_to_max():
    img = Image.fromarray(np.array([[-1000, 0, 99000, 199000]], dtype=np.int32))
    assert np.array_equal(rgb_of(decode_image(img)), gray3([[0, 1, 128, 255]]))
    constant = Image.fromarray(np.full((2, 2), 100000, dtype=np.int32))
    assert np.array_equal(rgb_of(decode_image(constant)), gray3(np.zeros((2, 2))))


def test_float_unit_range_and_byte_range():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.2, np.nan]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.array_equal(rgb_of(decode_image(unit)), gray3([[0, 128, 255, 0, 0]]))
    byte = Image.fromarray(np.array([[0.0, 1.0, 127.6, 300.0]], dtype=np.float32))
    assert np.array_equal(rgb_of(decode_image(byte)), gray3([[0, 1, 128, 255]]))


def test_alpha_is_composited_on_white():
    rgba = np.array([[[200, 10, 10, 0], [200, 10, 10, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    got = rgb_of(decode_image(Image.fromarray(rgba)))
    assert tuple(got[0, 0]) == WHITE  # fully transparent: white whatever the colour
    assert tuple(got[0, 1]) == (200, 10, 10)  # opaque: the colour
    assert np.all(np.abs(got[0, 2].astype(int) - 127) <= 1)  # half-transparent black on white: mid gray
    la = Image.fromarray(np.array([[[30, 0], [30, 255]]], dtype=np.uint8))
    assert la.mode == "LA"
    assert np.array_equal(rgb_of(decode_image(la)), np.array([[WHITE, (30, 30, 30)]], dtype=np.uint8))


def test_premultiplied_alpha_is_composited():
    img = Image.fromarray(np.array([[[0, 0, 0, 0], [100, 50, 25, 255]]], dtype=np.uint8)).convert("RGBa")
    assert np.array_equal(rgb_of(decode_image(img)), np.array([[WHITE, (100, 50, 25)]], dtype=np.uint8))


def palette_image() -> Image.Image:
    img = Image.new("P", (4, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2, 1])
    return img


def test_palette_with_and_without_transparency(tmp_path):
    img = palette_image()
    assert np.array_equal(rgb_of(decode_image(img)), np.array([[(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 0)]], dtype=np.uint8))
    img.info["transparency"] = 1
    expected = np.array([[(255, 0, 0), WHITE, (0, 0, 255), WHITE]], dtype=np.uint8)
    assert np.array_equal(rgb_of(decode_image(img)), expected)
    img.save(tmp_path / "trns.png")  # a tRNS chunk in the file
    assert np.array_equal(rgb_of(decode_image(tmp_path / "trns.png")), expected)
    pa = Image.new("PA", (2, 1))
    pa.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pa.putdata([(0, 0), (1, 255)])
    assert np.array_equal(rgb_of(decode_image(pa)), np.array([[WHITE, (0, 255, 0)]], dtype=np.uint8))


def test_rgb_with_transparent_colour(tmp_path):
    img = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8))
    img.save(tmp_path / "trns.png", transparency=(1, 2, 3))
    assert np.array_equal(rgb_of(decode_image(tmp_path / "trns.png")), np.array([[WHITE, (4, 5, 6)]], dtype=np.uint8))


def test_cmyk_and_ycbcr():
    cmyk = Image.new("CMYK", (4, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)])
    expected = np.array([[WHITE, (0, 255, 255), (255, 255, 0), (0, 0, 0)]], dtype=np.uint8)
    assert np.array_equal(rgb_of(decode_image(cmyk)), expected)
    ycbcr = Image.new("YCbCr", (2, 1))
    ycbcr.putdata([(128, 128, 128), (255, 128, 128)])
    got = rgb_of(decode_image(ycbcr)).astype(int)
    assert np.all(np.abs(got - np.array([[[128] * 3, [255] * 3]])) <= 1)


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6: the camera was turned; a viewer rotates the stored pixels 90 degrees clockwise."""
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "turned.png", exif=exif)
    got = rgb_of(decode_image(tmp_path / "turned.png"))
    assert got.shape == (3, 2, 3)
    assert np.array_equal(got, np.rot90(stored, k=-1))
    img.getexif()[0x0112] = 6  # in memory too
    assert np.array_equal(rgb_of(decode_image(img)), np.rot90(stored, k=-1))


@pytest.mark.parametrize("suffix", ["gif", "png", "tiff"])
def test_animated_gives_first_frame_and_a_notice(tmp_path, caplog, suffix):
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / f"anim.{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with caplog.at_level(logging.WARNING, logger="jev4.model.images"):
        got = rgb_of(decode_image(path))
    assert np.all(got == np.array([255, 0, 0], dtype=np.uint8))
    assert got.shape == (6, 8, 3)
    assert any(str(path) in r.getMessage() and "first frame" in r.getMessage() for r in caplog.records)
    caplog.clear()
    frames[0].save(tmp_path / f"still.{suffix}")
    with caplog.at_level(logging.WARNING, logger="jev4.model.images"):
        decode_image(tmp_path / f"still.{suffix}")
    assert not caplog.records  # a still image: no notice


# --- limits and bad files ----------------------------------------------------


def test_bomb_is_refused_from_the_header(tmp_path, no_decoding, recwarn):
    """Over PIL's own error threshold (2 x its MAX_IMAGE_PIXELS): still jev4's message, with path and limit."""
    path = tmp_path / "bomb.png"
    png_header(path, 14000, 14000)
    with pytest.raises(EncodeError) as err:
        decode_image(path)
    assert str(err.value) == (
        f"{path}: 196,000,000 pixels is over jev4's limit of 89,478,485 pixels (jev4.model.images.ImageLimits), "
        "refused before decoding as a possible decompression bomb; downscale the image first"
    )
    assert MAX_IMAGE_PIXELS == 89_478_485 == Image.MAX_IMAGE_PIXELS


def test_image_over_jev4_limit_below_pil_error(tmp_path, no_decoding):
    """Between PIL's warning and error thresholds: jev4 refuses, and PIL's warning does not leak out."""
    path = tmp_path / "big.png"
    png_header(path, 10000, 10000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(EncodeError) as err:
            decode_image(path)
    assert str(err.value).startswith(f"{path}: 10000x10000 = 100,000,000 pixels is over jev4's limit of 89,478,485 pixels")


def test_custom_pixel_limit_and_in_memory_names(tmp_path, no_decoding):
    path = tmp_path / "small.png"
    png_header(path, 100, 60)
    limits = ImageLimits(max_image_pixels=5000)
    with pytest.raises(EncodeError, match=rf"^{path}: 100x60 = 6,000 pixels is over jev4's limit of 5,000 pixels"):
        decode_image(path, limits)
    with pytest.raises(EncodeError, match=r"^image 4 \(100x60 L\): 100x60 = 6,000 pixels is over jev4's limit of 5,000 pixels"):
        decode_image(Image.new("L", (100, 60)), limits, index=4)
    with pytest.raises(EncodeError, match=r"^in-memory image \(100x60 L\): 100x60"):
        decode_image(Image.new("L", (100, 60)), limits)
    with pytest.raises(EncodeError, match="max_image_pixels must be >= 1"):
        ImageLimits(max_image_pixels=0)


def test_aspect_ratio_over_200_is_refused(tmp_path):
    assert MAX_ASPECT_RATIO == 200
    path = tmp_path / "strip.png"
    Image.new("L", (20000, 1)).save(path)
    with pytest.raises(EncodeError) as err:
        decode_image(path)
    assert str(err.value) == (
        f"{path}: aspect ratio 20000 (20000x1 pixels) is over the limit of 200 "
        "(jev4.model.images.ImageLimits; Qwen2-VL's smart_resize refuses over 200); crop or pad the image"
    )
    with pytest.raises(EncodeError, match=r"^image 2 \(1x201 RGB\): aspect ratio 201 \(1x201 pixels\) is over the limit of 200"):
        decode_image(Image.new("RGB", (1, 201)), index=2)
    assert decode_image(Image.new("RGB", (1, 200))).size == (1, 200)  # exactly 200 is allowed, as upstream


def test_aspect_ratio_is_checked_before_decoding(tmp_path, no_decoding):
    path = tmp_path / "strip.png"
    png_header(path, 1, 201)
    with pytest.raises(EncodeError, match="aspect ratio 201"):
        decode_image(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.png"
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(EncodeError, match=rf"^{path}: not a readable image \(.*truncated"):
        decode_image(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(EncodeError, match=rf"^{tmp_path / 'absent.png'}: image file not found$"):
        decode_image(tmp_path / "absent.png")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(EncodeError, match=rf"^{tmp_path / 'junk.jpg'}: not a readable image"):
        decode_image(str(tmp_path / "junk.jpg"))


def test_fifo_is_not_a_regular_file_and_is_never_opened(tmp_path):
    """A FIFO would block open() until a writer came: refused from its stat, naming the path."""
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(EncodeError, match=rf"^{re.escape(str(fifo))}: is not a regular file \(a FIFO\); give an image file$"):
        decode_image(fifo)
    with pytest.raises(EncodeError, match=re.escape(f"{fifo}: is not a regular file")):
        load_image(str(fifo))
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(EncodeError, match=rf"^{re.escape(str(tmp_path / 'dangling.png'))}: image file not found$"):
        decode_image(tmp_path / "dangling.png")
    with pytest.raises(EncodeError, match=rf"^{re.escape(str(tmp_path))}: is a directory"):
        decode_image(tmp_path)


def test_load_image_is_decode_image(tmp_path):
    values = np.array([[0, 257, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert np.array_equal(rgb_of(load_image(tmp_path / "deep.png")), gray3([[0, 1, 255]]))
    with pytest.raises(EncodeError, match="aspect ratio 300"):
        load_image(Image.new("RGB", (300, 1)))


def test_to_rgb_of_a_decoded_file_outlives_the_file(tmp_path):
    """An RGB file is copied before its file closes: closing destroys the opened image's pixels."""
    Image.new("RGB", (3, 2), (9, 8, 7)).save(tmp_path / "plain.png")
    img = decode_image(tmp_path / "plain.png")
    assert np.all(np.asarray(img) == np.array([9, 8, 7], dtype=np.uint8))
    assert to_rgb(img) is img


def test_limit_above_pils_own_says_to_raise_pils_too(tmp_path, no_decoding):
    path = tmp_path / "bomb.png"
    png_header(path, 14000, 14000)
    expected = r"196,000,000 pixels is within jev4's limit of 300,000,000 but over PIL's .*raise PIL\.Image\.MAX_IMAGE_PIXELS"
    with pytest.raises(EncodeError, match=expected):
        decode_image(path, ImageLimits(max_image_pixels=300_000_000))
