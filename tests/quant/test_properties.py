"""Property-based tests (hypothesis) of the embedding codecs, the search scores and Matryoshka truncation.

Each property is checked against a plain definition written here (Python
integers, per-element loops), never against the code under test: packing
round trips for any shape, decoded values within half a grid step, int8 and
int4 scores equal to the float product of the decoded documents, Hamming
distance equal to the popcount of XOR, truncation equal to slice-then-normalise.
"""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install -e '.[dev]')")

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from jev4.quant.embeddings import (  # noqa: E402
    EmbeddingCodec,
    calibrate,
    pack_bits,
    pack_int4,
    pack_ternary,
    truncate_normalize,
    unpack_bits,
    unpack_int4,
    unpack_ternary,
)
from jev4.quant.search import Codes, hamming_distances, scores  # noqa: E402

PROFILE = settings(max_examples=60, deadline=None, derandomize=True)  # deterministic in CI: the same examples every run

shapes = st.tuples(st.integers(1, 6), st.integers(1, 70))
# Packing takes any number of leading dims ([D], [N, D], [B, N, D], ...): the last one is packed.
nd_shapes = st.tuples(st.lists(st.integers(1, 3), max_size=2), st.integers(1, 70)).map(lambda t: (*t[0], t[1]))
floats = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=32)


def _matrix(shape):
    return hnp.arrays(np.float32, shape, elements=floats)


@st.composite
def matrices(draw, min_rows=1):
    rows, dim = draw(shapes)
    return draw(_matrix((max(rows, min_rows), dim)))


@PROFILE
@given(shape=nd_shapes, data=st.data())
def test_int4_pack_round_trips_and_puts_the_first_dim_in_the_high_nibble(shape, data):
    q = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 15)))
    packed = pack_int4(q)
    assert packed.shape == (*shape[:-1], (shape[-1] + 1) // 2) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed, shape[-1]), q)
    for row in np.ndindex(shape[:-1]):
        for c in range(shape[-1]):
            byte = int(packed[row][c // 2])
            assert (byte >> 4 if c % 2 == 0 else byte & 0xF) == q[row][c]
        if shape[-1] % 2:
            assert int(packed[row][-1]) & 0xF == 0  # an odd dim is padded with a zero nibble


@PROFILE
@given(shape=nd_shapes, data=st.data())
def test_ternary_pack_round_trips_in_base_3(shape, data):
    signs = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(-1, 1)))
    packed = pack_ternary(signs)
    assert packed.shape == (*shape[:-1], -(-shape[-1] // 5)) and packed.dtype == np.uint8 and int(packed.max()) < 243
    np.testing.assert_array_equal(unpack_ternary(packed, shape[-1]), signs)
    for row in np.ndindex(shape[:-1]):
        padded = [int(t) + 1 for t in signs[row]] + [1] * ((-shape[-1]) % 5)  # padding is the trit of 0
        for g in range(packed.shape[-1]):
            assert int(packed[row][g]) == sum(t * 3 ** (4 - i) for i, t in enumerate(padded[5 * g : 5 * g + 5]))


@PROFILE
@given(shape=nd_shapes, data=st.data())
def test_bit_pack_round_trips(shape, data):
    bits = data.draw(hnp.arrays(np.bool_, shape))
    packed = pack_bits(bits)
    assert packed.shape == (*shape[:-1], -(-shape[-1] // 8)) and packed.dtype == np.uint8
    unpacked = unpack_bits(packed, shape[-1])
    assert unpacked.dtype == np.bool_
    np.testing.assert_array_equal(unpacked, bits)
    for row in np.ndindex(shape[:-1]):
        for c in range(shape[-1]):
            assert (int(packed[row][c // 8]) >> (7 - c % 8)) & 1 == int(bits[row][c])  # big-endian within a byte


@PROFILE
@given(x=matrices(min_rows=2), precision=st.sampled_from(["int8", "uint8", "int4"]))
def test_range_codes_decode_within_half_a_step(x, precision):
    codec = EmbeddingCodec(precision, calibrate(x, precision))  # min-max on x itself: every value is inside the grid
    decoded = codec.decode(codec.encode(x))
    levels = {"int8": 256, "uint8": 256, "int4": 16}[precision]
    step = (x.max(axis=0) - x.min(axis=0)) / (levels - 1)
    tolerance = np.where(step == 0, 0, step / 2) + 1e-5 * (1 + np.abs(x).max())
    assert np.all(np.abs(decoded - x) <= tolerance)


@PROFILE
@given(x=matrices(), center=floats)
def test_binary_codes_keep_the_sign_against_the_center(x, center):
    for precision in ("binary", "ubinary"):
        codes = EmbeddingCodec(precision).encode(x - np.float32(center))
        bits = unpack_bits((codes.astype(np.int16) + 128).astype(np.uint8) if precision == "binary" else codes, x.shape[1])
        np.testing.assert_array_equal(bits, (x - np.float32(center)) > 0)


@PROFILE
@given(q=matrices(), data=st.data(), precision=st.sampled_from(["int8", "uint8", "int4"]))
@example(q=np.full((1, 3), 1.9113615, np.float32), data=None, precision="int8")  # all-zero documents (see below)
def test_float_query_scores_equal_the_product_with_the_decoded_documents(q, data, precision):
    docs = np.zeros((2, q.shape[1]), np.float32) if data is None else data.draw(_matrix((data.draw(st.integers(2, 9)), q.shape[1])))
    codec = EmbeddingCodec(precision, calibrate(docs, precision))
    codes = Codes.from_decoder(precision, codec.encode(docs), codec.decode)
    decoded = codec.decode(codec.encode(docs)).astype(np.float64)
    expected = q.astype(np.float64) @ decoded.T
    got = scores(q, codes)
    # The search folds the decode into the query (q . x = (q * scale) . v + q . shift, in float32), so its rounding
    # scales with the folded terms, not with the decoded values: all-zero documents decode to 0 exactly, yet
    # score as (q * 1) . (-128) + q . 128 in int8 (found by hypothesis on a clean clone).
    top_code = {"int8": 128, "uint8": 255, "int4": 15}[precision]
    folded = np.abs(q).astype(np.float64) @ (np.abs(codes.scale) * top_code + np.abs(codes.shift)).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * (1 + float(folded.max())))


@PROFILE
@given(shape=shapes, data=st.data())
def test_hamming_is_the_popcount_of_xor(shape, data):
    rows, width = shape
    a = data.draw(hnp.arrays(np.uint8, (rows, width)))
    b = data.draw(hnp.arrays(np.uint8, (data.draw(st.integers(1, 5)), width)))
    expected = np.array([[sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(ra, rb)) for rb in b] for ra in a])
    for use_lut in (False, True):
        np.testing.assert_array_equal(hamming_distances(a, b, use_lut=use_lut), expected)
    np.testing.assert_array_equal(hamming_distances((a.astype(np.int16) - 128).astype(np.int8), (b.astype(np.int16) - 128).astype(np.int8)), expected)


@PROFILE
@given(x=matrices(), data=st.data())
def test_matryoshka_truncation_is_slice_then_normalise(x, data):
    dim = data.draw(st.integers(1, x.shape[1]))
    smaller = data.draw(st.integers(1, dim))
    got = truncate_normalize(x, dim)
    assert got.shape == (x.shape[0], dim)
    for row, out in zip(x.astype(np.float64), got):
        norm = np.sqrt(sum(v * v for v in row[:dim]))
        if norm > 1e-6:
            np.testing.assert_allclose(out, row[:dim] / norm, rtol=1e-5, atol=1e-6)
            assert abs(np.linalg.norm(out) - 1) < 1e-5
        else:
            assert np.all(np.isfinite(out))  # a zero prefix does not divide by zero
    head, whole = np.linalg.norm(x[:, :smaller].astype(np.float64), axis=1), np.linalg.norm(x[:, :dim].astype(np.float64), axis=1)
    nonzero = (head > 1e-3) & (head > 1e-3 * whole)  # both prefixes well above the normaliser's epsilon (a tiny one is scaled, not normalised)
    np.testing.assert_allclose(truncate_normalize(got, smaller)[nonzero], truncate_normalize(x, smaller)[nonzero], rtol=1e-4, atol=1e-5)
