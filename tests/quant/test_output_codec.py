"""The artifact's output codec: calibrated at export, stored with checksums, used by the runtime at query time."""

import json

import numpy as np
import pytest

import jev4.runtime as rt
from jev4.cli.export import main as export_main
from jev4.errors import EmbeddingQuantError, EncodeError
from jev4.export.manifest import read_manifest, verify_manifest
from jev4.quant.embeddings import EmbeddingCodec
from jev4.quant.output_codec import OUTPUT_CODEC_NAME, OutputCodec, OutputCodecSettings, calibrate_output_codec

TEXTS = ["def add(a, b): return a + b", "sort a list in place", "Wer hat die Relativitätstheorie entwickelt?"]


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("codec") / "merged-int8"
    argv = ["--model", str(tiny_dir), "--adapter", "retrieval", "--out", str(out), "--dtype", "fp32", "--no-progress"]
    assert export_main(argv + ["--output-precision", "int8", "--output-calib-size", "64"]) == 0
    return out


def test_export_records_codec_in_manifest(int8_artifact):
    manifest = verify_manifest(int8_artifact)
    assert OUTPUT_CODEC_NAME in manifest["files"]
    described = read_manifest(int8_artifact)["contents"]["output_codec"]
    assert described["precision"] == "int8" and described["settings"]["documents"] == 64
    codec = OutputCodec.read(int8_artifact)
    assert codec.single.dim == 64 and codec.multi.dim == 32  # tiny: hidden 64, projector 32
    assert np.all(codec.single.upper > codec.single.lower)


def test_runtime_returns_codes_on_the_stored_grid(int8_artifact):
    encoder = rt.load(int8_artifact)
    floats = encoder.encode_text(TEXTS, prompt_name="passage").numpy()
    codes = encoder.encode_text(TEXTS, prompt_name="passage", output_precision="int8")
    stored = OutputCodec.read(int8_artifact)
    assert codes.dtype == np.int8 and codes.shape == (3, 64)
    np.testing.assert_array_equal(codes, EmbeddingCodec("int8", stored.single).encode(floats))
    # The same floats on a grid calibrated elsewhere give other codes: the stored grid is what is used.
    other = calibrate_output_codec(np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32), None, OutputCodecSettings("int8"))
    assert not np.array_equal(codes, EmbeddingCodec("int8", other.single).encode(floats))


def test_runtime_codes_with_matryoshka_and_multivector(int8_artifact):
    encoder = rt.load(int8_artifact)
    small = encoder.encode_text(TEXTS, truncate_dim=16, output_precision="int8")
    assert small.shape == (3, 16)
    floats16 = encoder.encode_text(TEXTS, truncate_dim=16).numpy()
    stored = OutputCodec.read(int8_artifact)
    np.testing.assert_array_equal(small, EmbeddingCodec("int8", stored.single, truncate_dim=16).encode(floats16))
    multi = encoder.encode_text(TEXTS, return_multivector=True, output_precision="int4")  # int4 shares int8's range
    floats_multi = encoder.encode_text(TEXTS, return_multivector=True)
    assert [m.shape for m in multi] == [(f.shape[0], 16) for f in floats_multi]
    bits = encoder.encode_text(TEXTS, output_precision="ubinary")
    np.testing.assert_array_equal(bits, np.packbits(encoder.encode_text(TEXTS).numpy() > 0, axis=-1))


def test_precision_without_its_calibration_is_refused(int8_artifact, tiny_dir):
    encoder = rt.load(int8_artifact)
    with pytest.raises(EmbeddingQuantError, match="ternary.*int8.*--output-precision ternary"):
        encoder.encode_text(TEXTS, output_precision="ternary")
    plain = rt.load(tiny_dir)  # no codec: binary needs no calibration, int8 does
    assert plain.encode_text(TEXTS, output_precision="binary").dtype == np.int8
    with pytest.raises(EmbeddingQuantError, match="needs a calibration"):
        plain.encode_text(TEXTS, output_precision="int8")


def test_encoder_without_codec_says_how_to_get_one(encoder):
    with pytest.raises(EncodeError, match="jev4.runtime.load"):
        encoder.encode_text(TEXTS, output_precision="binary")


def test_codec_file_round_trips_and_rejects_garbage(int8_artifact, tmp_path):
    codec = OutputCodec.read(int8_artifact)
    codec.write(tmp_path)
    again = OutputCodec.read(tmp_path)
    assert again.single == codec.single and again.multi == codec.multi and again.settings == codec.settings
    (tmp_path / OUTPUT_CODEC_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EmbeddingQuantError, match="not a jev4 output codec"):
        OutputCodec.read(tmp_path)


def test_settings_are_checked():
    with pytest.raises(EmbeddingQuantError, match="unknown|precision"):
        OutputCodecSettings("int3")
    with pytest.raises(EmbeddingQuantError, match="float32"):
        OutputCodecSettings("float32")
    with pytest.raises(EmbeddingQuantError, match="calib-size"):
        OutputCodecSettings("int8", calib_size=1)


def test_calib_data_problems_name_the_file_before_any_model_loads(tmp_path):
    import os
    import re

    from jev4.quant.output_codec import calibration_documents

    binary = tmp_path / "calib.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    cases = [
        (binary, f"--output-calib-data {binary}: not a UTF-8 text file (invalid start byte at byte 0); give one document per line"),
        (tmp_path / "empty.txt", f"--output-calib-data {tmp_path / 'empty.txt'}: is empty; give a text file with one document per line, at least 2"),
        (tmp_path / "blank.txt", f"--output-calib-data {tmp_path / 'blank.txt'}: holds only blank lines"),
        (tmp_path / "one.txt", f"--output-calib-data {tmp_path / 'one.txt'}: needs at least 2 non-empty lines, found 1"),
        (tmp_path / "nope.txt", f"--output-calib-data {tmp_path / 'nope.txt'}: calibration file not found"),
        (tmp_path, f"--output-calib-data {tmp_path}: is a directory; give a text file, one document per line"),
        (tmp_path / "fifo", f"--output-calib-data {tmp_path / 'fifo'}: is not a regular file"),
    ]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "one.txt").write_text("only one document\n")
    os.mkfifo(tmp_path / "fifo")
    for path, message in cases:
        with pytest.raises(EmbeddingQuantError, match="^" + re.escape(message)):
            OutputCodecSettings("int8", calib_data=str(path))
    good = tmp_path / "good.txt"
    good.write_text("doc one\n\ndoc two\ndoc three\n")
    settings = OutputCodecSettings("int8", calib_data=str(good), calib_size=2)
    assert calibration_documents(settings) == ["doc one", "doc two"]
    binary_later = tmp_path / "later.txt"
    binary_later.write_text("a\nb\n")
    settings = OutputCodecSettings("binary", calib_data=str(binary_later))
    binary_later.write_bytes(b"\xff\xfe")  # changed after the settings were checked
    with pytest.raises(EmbeddingQuantError, match=re.escape(f"{binary_later}: not a UTF-8 text file")):
        calibration_documents(settings)


def _reference_int8(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """int8 codes by the documented formula, written out here (no jev4 codec): round onto 256 levels, minus 128."""
    steps = (upper.astype(np.float64) - lower) / 255
    steps[steps == 0] = 1
    return (np.clip(np.rint((x.astype(np.float64) - lower) / steps), 0, 255) - 128).astype(np.int8)


def _check_multi_codes(codes, floats, stored, precision):
    """Each document's codes equal the codec applied to that document's float rows, one row at a time."""
    assert len(codes) == len(floats)
    row_codec = EmbeddingCodec(precision, stored.multi if precision in ("int8", "int4") else None)
    for doc, (got, want) in enumerate(zip(codes, floats)):
        want = want.numpy()
        assert got.shape == (want.shape[0], row_codec.bytes_per_vector(want.shape[1])), doc
        for row in range(want.shape[0]):
            np.testing.assert_array_equal(got[row], row_codec.encode(want[row]), err_msg=f"document {doc}, token {row}")
    if precision == "int8":  # and the values themselves, by the formula, for the whole output
        lower, upper = stored.multi.lower, stored.multi.upper
        for got, want in zip(codes, floats):
            # float64 and float32 rounding can differ only on an exact .5 tie; allow one level there, nowhere else
            diff = np.abs(got.astype(np.int16) - _reference_int8(want.numpy(), lower, upper))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    if precision == "ubinary":
        for got, want in zip(codes, floats):
            np.testing.assert_array_equal(got, np.packbits(want.numpy() > 0, axis=-1))


@pytest.mark.parametrize("precision", ["int8", "int4", "ubinary"])
def test_runtime_multivector_codes_are_the_codec_row_by_row(int8_artifact, precision):
    encoder = rt.load(int8_artifact)
    floats = encoder.encode_text(TEXTS, return_multivector=True, prompt_name="passage")
    codes = encoder.encode_text(TEXTS, return_multivector=True, prompt_name="passage", output_precision=precision)
    assert len({f.shape[0] for f in floats}) > 1  # documents of different token counts
    _check_multi_codes(codes, floats, OutputCodec.read(int8_artifact), precision)


def test_runtime_int8_multivector_codes_decode_near_the_floats(int8_artifact):
    """Dequantised codes sit within half a grid step of each in-range float (a check that does not re-encode)."""
    encoder = rt.load(int8_artifact)
    stored = OutputCodec.read(int8_artifact)
    floats = np.concatenate([f.numpy() for f in encoder.encode_text(TEXTS, return_multivector=True)])
    codes = np.concatenate(encoder.encode_text(TEXTS, return_multivector=True, output_precision="int8"))
    decoded = EmbeddingCodec("int8", stored.multi).decode(codes)
    step = (stored.multi.upper - stored.multi.lower) / 255
    inside = (floats >= stored.multi.lower) & (floats <= stored.multi.upper)
    assert inside.mean() > 0.5
    assert np.all(np.abs(decoded - floats)[inside] <= (step / 2 + 1e-6)[np.nonzero(inside)[1]])


def test_runtime_image_codes(int8_artifact, images):
    encoder = rt.load(int8_artifact)
    stored = OutputCodec.read(int8_artifact)
    floats = encoder.encode_image(images).numpy()
    codes = encoder.encode_image(images, output_precision="int8")
    assert codes.dtype == np.int8 and codes.shape == (len(images), 64)
    np.testing.assert_array_equal(codes, _reference_int8(floats, stored.single.lower, stored.single.upper))
    small = encoder.encode_image(images, truncate_dim=16, output_precision="int8")
    np.testing.assert_array_equal(small, EmbeddingCodec("int8", stored.single, truncate_dim=16).encode(encoder.encode_image(images, truncate_dim=16).numpy()))
    bits = encoder.encode_image(images, output_precision="binary")
    np.testing.assert_array_equal(bits, (np.packbits(floats > 0, axis=-1).astype(np.int16) - 128).astype(np.int8))
    multi_floats = encoder.encode_image(images, return_multivector=True)
    for precision in ("int8", "ubinary"):
        multi = encoder.encode_image(images, return_multivector=True, output_precision=precision)
        _check_multi_codes(multi, multi_floats, stored, precision)
