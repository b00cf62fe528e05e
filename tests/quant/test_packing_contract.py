"""The packers' contract beyond round trips of well-typed arrays: what callers pass in, what dtype comes out, where codes end.

Why: the property tests feed arrays of the packer's own dtype. Callers pass
Python lists, int64 or float arrays; a packer that forgets to coerce them
returns int64 codes (twice the size on disk, and a different bit layout once
shifted), and a decoder that forgets returns float64 or int64 signs.
"""

from __future__ import annotations

import numpy as np
import pytest

from jev4.errors import EmbeddingQuantError
from jev4.quant.embeddings import (
    PRECISIONS,
    EmbeddingCodec,
    calibrate,
    check_precision,
    pack_bits,
    pack_int4,
    pack_ternary,
    unpack_bits,
    unpack_int4,
    unpack_ternary,
)


def test_int4_from_lists_and_wide_ints():
    for q in ([[1, 15, 7]], np.array([[1, 15, 7]], dtype=np.int64)):
        packed = pack_int4(q)
        assert packed.dtype == np.uint8 and packed.tolist() == [[0x1F, 0x70]]
    out = unpack_int4([[0x1F, 0x70]], 3)
    assert out.dtype == np.uint8 and out.tolist() == [[1, 15, 7]]
    assert unpack_int4(np.array([[0x1F, 0x70]], dtype=np.int64), 3).dtype == np.uint8


def test_ternary_from_lists_and_wide_ints():
    for signs in ([[-1, 0, 1, 1, -1, 0]], np.array([[-1, 0, 1, 1, -1, 0]], dtype=np.int64)):
        packed = pack_ternary(signs)
        assert packed.dtype == np.uint8 and packed.tolist() == [[0 * 81 + 1 * 27 + 2 * 9 + 2 * 3 + 0, 1 * 81 + 1 * 27 + 1 * 9 + 1 * 3 + 1]]
    out = unpack_ternary([[51, 121]], 6)
    assert out.dtype == np.int8 and out.tolist() == [[-1, 0, 1, 1, -1, 0]]


def test_ternary_bytes_end_at_242():
    assert unpack_ternary(np.array([[242]], np.uint8), 5).tolist() == [[1, 1, 1, 1, 1]]
    for byte in (243, 255):
        with pytest.raises(EmbeddingQuantError) as info:
            unpack_ternary(np.array([[0, byte]], np.uint8), 10)
        assert str(info.value) == f"ternary codes hold byte {byte}; valid bytes are 0..242 (5 trits each)"
    assert unpack_ternary(np.zeros((2, 0), np.uint8), 0).shape == (2, 0)  # empty codes: nothing to check


def test_bits_from_numbers_and_lists():
    assert pack_bits(np.array([[0.5, 0.0, -2.0]])).tolist() == [[0b10100000]]  # any non-zero is a 1
    assert pack_bits([[True, False, True]]).tolist() == [[0b10100000]]
    out = unpack_bits([[0b10100000]], 3)
    assert out.dtype == np.bool_ and out.tolist() == [[True, False, True]]


def test_unknown_precision_names_the_known_ones():
    with pytest.raises(EmbeddingQuantError) as info:
        check_precision("int3")
    assert str(info.value) == f"unknown embedding precision 'int3'; known: {', '.join(PRECISIONS)}"


@pytest.mark.parametrize(
    ("calibrated", "used", "fits"),
    [
        ("int8", "uint8", True),
        ("int8", "int4", True),
        ("binary", "ubinary", True),
        ("ubinary", "binary", True),
        ("ternary", "binary", False),
        ("binary", "ternary", False),
        ("int8", "binary", False),
        ("ternary", "int8", False),
    ],
)
def test_which_calibrations_fit_which_precisions(calibrated, used, fits):
    """Calibrations are shared within a family: ranges (int8/uint8/int4), signs (binary/ubinary), ternary."""
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    cal = calibrate(x, calibrated)
    if fits:
        assert EmbeddingCodec(used, calibration=cal).encode(x).shape[0] == 64
    else:
        with pytest.raises(EmbeddingQuantError) as info:
            EmbeddingCodec(used, calibration=cal)
        assert str(info.value) == f"a {calibrated} calibration does not fit precision {used!r}"


def test_negative_ternary_codes_are_refused_not_read_from_the_end_of_the_table():
    """Signed codes (a caller's int8 or int64 array) are read as the bytes they are; -1 must not index row 242."""
    for codes, byte in ((np.array([[-1]]), 255), (np.array([[-13]], dtype=np.int8), 243)):
        with pytest.raises(EmbeddingQuantError, match=f"hold byte {byte};"):
            unpack_ternary(codes, 5)
