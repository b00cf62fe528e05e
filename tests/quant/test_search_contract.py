"""Contract of jev4.quant.search as a user sees it: error messages, stored values, result dtypes, chunk edges.

Complements test_search.py: every rejection is checked for *what* it names
(the wrong value, the document or query index, the expected layout), results
are compared with plain references written here (float64 products of
decoded vectors, Python popcounts, Python MaxSim over token lists, a sorted
brute-force top-k with ties to the lower index), and the returned dtypes are
checked because callers store and compare them (int32 for exact code
scores, float32 for float scores, int64 for integer MaxSim). Inputs are
sized so that chunk boundaries, a last partial chunk, k >= N and the
float32-exactness limit of integer products all matter.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from jev4.errors import MissingDependencyError
from jev4.quant.search import PRECISIONS, Codes, SearchError, TokenCorpus, hamming_distances, maxsim, scores, search, search_rescored

# ---------------------------------------------------------------- plain references


def py_popcount_xor(a: np.ndarray, b: np.ndarray) -> int:
    return sum(bin((int(x) ^ int(y)) & 0xFF).count("1") for x, y in zip(a.view(np.uint8).tolist(), b.view(np.uint8).tolist()))


def brute_topk(score_matrix: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    ids, vals = [], []
    for row in np.asarray(score_matrix).tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        ids.append(order)
        vals.append([row[j] for j in order])
    return ids, vals


def signs(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, 1, -1)


def ubinary(x: np.ndarray) -> Codes:
    return Codes("ubinary", np.packbits(x > 0, axis=-1), x.shape[1])


def int8_codes(levels: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> Codes:
    """int8 codes of grid levels 0..255 (code = level - 128) on the grid lower..upper."""
    return Codes.affine("int8", (levels - 128).astype(np.int8), lower, upper)


# ---------------------------------------------------------------- Codes validation and stored values


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(SearchError) as err:
        Codes("float8", np.zeros((1, 4), np.float32), 4)
    assert str(err.value) == "unknown precision 'float8'; expected one of float32, float16, int8, uint8, int4, ternary, binary, ubinary"
    with pytest.raises(SearchError) as err:
        Codes.from_decoder("int2", np.zeros((1, 4), np.uint8), lambda c: c)
    assert str(err.value) == "unknown precision 'int2'; expected one of " + ", ".join(PRECISIONS)


def test_non_2d_data_is_named_by_shape_or_type():
    """A 1-D array reports its shape, a list its type (a list has no .shape), both as SearchError."""
    with pytest.raises(SearchError) as err:
        Codes("float32", np.zeros(3, np.float32), 3)
    assert str(err.value) == "float32 codes: expected a 2-D array [N, width], got (3,)"
    with pytest.raises(SearchError) as err:
        Codes("float32", [[1.0, 2.0]], 2)
    assert str(err.value) == "float32 codes: expected a 2-D array [N, width], got list"


def test_dim_width_and_dtype_messages():
    with pytest.raises(SearchError, match=r"^int8 codes: dim must be >= 1, got 0$"):
        Codes("int8", np.zeros((1, 0), np.int8), 0)
    with pytest.raises(SearchError, match=r"^int8 codes: expected dtype int8, got uint8$"):
        Codes("int8", np.zeros((1, 4), np.uint8), 4)
    with pytest.raises(SearchError, match=r"^int4 codes of dim 5: expected width 3, got 2$"):
        Codes("int4", np.zeros((1, 2), np.uint8), 5)


def test_scale_and_shift_are_checked_and_stored_as_float64():
    data = np.zeros((2, 3), np.int8)
    codes = Codes("int8", data, 3, scale=[1, 2, 3], shift=np.array([0.5, 0, -1], np.float32))
    assert isinstance(codes.scale, np.ndarray) and codes.scale.dtype == np.float64 and codes.shift.dtype == np.float64
    np.testing.assert_array_equal(codes.scale, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(codes.shift, [0.5, 0.0, -1.0])
    # wrong length (finite values) and non-finite values (right length) are both rejected, each naming its field
    with pytest.raises(SearchError, match=r"^int8 codes: scale must be 3 finite values, got shape \(4,\)$"):
        Codes("int8", data, 3, scale=np.ones(4), shift=np.zeros(3))
    with pytest.raises(SearchError, match=r"^int8 codes: shift must be 3 finite values, got shape \(3,\)$"):
        Codes("int8", data, 3, scale=np.ones(3), shift=[0.0, np.inf, 0.0])
    # a bad shift is reported as such even when scale is missing
    with pytest.raises(SearchError, match=r"^int8 codes: shift must be 3 finite values, got shape \(5,\)$"):
        Codes("int8", data, 3, shift=np.zeros(5))
    with pytest.raises(SearchError, match=r"^int8 codes: give both scale and shift, or neither$"):
        Codes("int8", data, 3, scale=np.ones(3))


def test_ternary_bytes_must_be_below_243_and_the_bad_row_is_named():
    ok = Codes("ternary", np.array([[242], [0]], np.uint8), 5)  # 22222 in base 3 is the largest valid byte
    np.testing.assert_array_equal(ok.values(), [[1, 1, 1, 1, 1], [-1, -1, -1, -1, -1]])
    data = np.array([[10], [100], [250], [7]], np.uint8)
    with pytest.raises(SearchError) as err:
        Codes("ternary", data, 5)
    assert str(err.value) == "ternary codes: byte value 250 at row 2 is not 5 base-3 digits (must be < 243)"
    with pytest.raises(SearchError, match="byte value 243 at row 0"):
        Codes("ternary", np.array([[243]], np.uint8), 5)


def test_affine_rejects_non_range_precisions_by_name():
    with pytest.raises(SearchError) as err:
        Codes.affine("ternary", np.zeros((1, 1), np.uint8), np.zeros(5), np.ones(5))
    assert str(err.value) == "a lower..upper grid applies to int8, uint8, int4, not 'ternary'"


def test_affine_stores_steps_and_gives_constant_dims_step_one():
    """scale = (upper - lower) / levels per dim; a constant dim (upper == lower) gets step 1, as the codec does."""
    lower, upper = np.array([0.0, 2.0, -1.0]), np.array([255.0, 2.0, 1.0])
    codes = Codes.affine("uint8", np.array([[0, 7, 255]], np.uint8), lower, upper)
    np.testing.assert_array_equal(codes.scale, [1.0, 1.0, 2 / 255])
    np.testing.assert_array_equal(codes.shift, lower)
    i8 = Codes.affine("int8", np.array([[-128, 5, 127]], np.int8), lower, upper)
    np.testing.assert_allclose(i8.shift, lower + 128 * i8.scale)
    # decoded constant dim is exactly its value whatever the code
    np.testing.assert_allclose(scores(np.array([[0.0, 1.0, 0.0]]), codes), [[2.0 + 7.0]])


def test_from_decoder_probes_one_row_of_lowest_and_one_of_highest_codes():
    """The docstring's probe: two single rows, every byte the lowest / highest code; scale and shift come from them."""
    calls = []
    lower, steps = np.array([-1.0, 0.0, 3.0]), np.array([0.5, 0.25, 0.0625])

    def decode(c: np.ndarray) -> np.ndarray:
        calls.append(c.copy())
        return lower + (c.astype(np.float64) + 128) * steps

    codes = Codes.from_decoder("int8", np.zeros((4, 3), np.int8), decode)
    assert [c.shape for c in calls] == [(1, 3), (1, 3)]
    assert {int(calls[0].min()), int(calls[0].max()), int(calls[1].min()), int(calls[1].max())} == {-128, 127}
    np.testing.assert_allclose(codes.scale, steps)
    np.testing.assert_allclose(codes.shift, lower + 128 * steps)
    shapes = []
    f = Codes.from_decoder("float16", np.zeros((2, 6), np.float16), lambda c: (shapes.append(c.shape), c.astype(np.float32))[1])
    assert f.dim == 6 and f.scale is None and shapes == [(1, 6)]


# ---------------------------------------------------------------- TokenCorpus


def _tokens(n: int, dim: int = 4) -> Codes:
    return Codes("float32", np.arange(n * dim, dtype=np.float32).reshape(n, dim), dim)


def test_token_corpus_offsets_are_stored_as_int64_arrays():
    corpus = TokenCorpus(_tokens(5), [0, 2])
    assert isinstance(corpus.offsets, np.ndarray) and corpus.offsets.dtype == np.int64
    assert TokenCorpus(_tokens(5), np.array([0, 3], np.int32)).offsets.dtype == np.int64
    single = TokenCorpus(_tokens(3), [0])
    assert len(single) == 1
    # list offsets still work in MaxSim (the stored array is used)
    got = maxsim([np.ones((1, 4), np.float32)], corpus)
    np.testing.assert_allclose(got, [[np.arange(20).reshape(5, 4)[:2].sum(1).max(), np.arange(20).reshape(5, 4)[2:].sum(1).max()]])


@pytest.mark.parametrize("offsets", [[1, 3], [[0, 2]], []])
def test_token_corpus_offsets_must_be_1d_from_zero(offsets):
    with pytest.raises(SearchError) as err:
        TokenCorpus(_tokens(5), offsets)
    assert str(err.value) == "token corpus: offsets must be a non-empty 1-D array starting at 0"


def test_token_corpus_names_the_first_empty_document():
    with pytest.raises(SearchError) as err:
        TokenCorpus(_tokens(5), [0, 1, 3, 3])  # lengths 1, 2, 0, 2
    assert str(err.value) == "token corpus: document 2 has no tokens"


def test_from_documents_rejects_no_documents_and_mismatches():
    with pytest.raises(SearchError) as err:
        TokenCorpus.from_documents([])
    assert str(err.value) == "token corpus: no documents"
    a = _tokens(2)
    with pytest.raises(SearchError) as err:
        TokenCorpus.from_documents([a, Codes("float16", np.zeros((1, 4), np.float16), 4)])
    assert str(err.value) == "token corpus: document 1 is float16/4, not float32/4 with the same calibration"
    with pytest.raises(SearchError, match=r"^token corpus: document 2 is float32/5, not float32/4 with the same calibration$"):
        TokenCorpus.from_documents([a, a, _tokens(1, 5)])


def test_from_documents_rejects_different_calibrations():
    data = np.zeros((2, 3), np.int8)
    base = Codes("int8", data, 3, scale=np.ones(3), shift=np.zeros(3))
    other_shift = Codes("int8", data, 3, scale=np.ones(3), shift=np.full(3, 0.5))
    other_scale = Codes("int8", data, 3, scale=np.full(3, 2.0), shift=np.zeros(3))
    for doc in (other_shift, other_scale):
        with pytest.raises(SearchError, match="document 1 is int8/3, not int8/3 with the same calibration"):
            TokenCorpus.from_documents([base, doc])
    tern = Codes("ternary", np.zeros((1, 1), np.uint8), 5)
    tern_cal = Codes("ternary", np.zeros((1, 1), np.uint8), 5, scale=np.ones(5), shift=np.zeros(5))
    with pytest.raises(SearchError, match="document 1 is ternary/5"):
        TokenCorpus.from_documents([tern, tern_cal])
    with pytest.raises(SearchError, match="document 1 is ternary/5"):
        TokenCorpus.from_documents([tern_cal, tern])


def test_from_documents_of_one_document_keeps_its_codes():
    doc = Codes("int8", np.arange(6, dtype=np.int8).reshape(2, 3), 3, scale=np.ones(3), shift=np.zeros(3))
    corpus = TokenCorpus.from_documents([doc])
    assert len(corpus) == 1 and corpus.offsets.tolist() == [0]
    np.testing.assert_array_equal(corpus.tokens.data, doc.data)
    np.testing.assert_array_equal(corpus.tokens.shift, doc.shift)


# ---------------------------------------------------------------- Hamming


def test_hamming_width_mismatch_names_both_widths():
    q, d = np.zeros((2, 3), np.uint8), np.zeros((5, 4), np.uint8)
    with pytest.raises(SearchError) as err:
        hamming_distances(q, d)
    assert str(err.value) == "hamming: query rows are 3 bytes, documents 4"


@pytest.mark.parametrize("n_queries", [1, 3])
def test_hamming_distances_are_int32_and_exact_across_chunks(n_queries):
    rng = np.random.default_rng(7)
    q = rng.integers(0, 256, size=(n_queries, 13), dtype=np.uint8)
    d = rng.integers(0, 256, size=(10, 13), dtype=np.uint8)
    d[0] = ~q[0]  # the largest distance, 104 bits
    got = hamming_distances(q, d, chunk_size=3)
    assert got.dtype == np.int32
    want = [[py_popcount_xor(a, b) for b in d] for a in q]
    np.testing.assert_array_equal(got, want)
    assert got[0, 0] == 104


def test_hamming_distance_of_65536_bits_does_not_wrap():
    """65,536 differing bits (a complemented 8 KiB row) exceed a 16-bit counter: the distance must still be 65536."""
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, size=(3, 8192), dtype=np.uint8)
    d = np.stack([~q[0], q[1], ~q[2]])
    d[2, 0] ^= 1  # one bit back: 65535
    got = hamming_distances(q, d)
    np.testing.assert_array_equal(np.diag(got), [65536, 0, 65535])
    assert got.dtype == np.int32


def test_binary_search_of_a_complement_scores_minus_dim():
    """One query, a corpus holding its complement: sign inner product -dim, ranked last, int32 scores."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 64))
    docs = np.concatenate([-x, rng.standard_normal((5, 64)), x])
    for n_queries in (1, 3):
        qx = np.concatenate([x] * n_queries)
        res = search(ubinary(qx), ubinary(docs), 7, chunk_size=4)
        assert res.scores.dtype == np.int32 and res.indices.dtype == np.int64
        want_ids, want_vals = brute_topk(signs(qx) @ signs(docs).T, 7)
        assert res.indices.tolist() == want_ids and res.scores.tolist() == want_vals
        assert res.indices[0, 0] == 6 and res.indices[0, -1] == 0 and res.scores[0, -1] == -64
    s = scores(ubinary(x), ubinary(docs))
    assert s.dtype == np.int32 and s[0, 0] == -64


def test_binary_search_with_many_queries_equals_reference():
    """100 queries take the word-by-word Hamming path and its cache-sized chunks."""
    rng = np.random.default_rng(5)
    qx, dx = rng.standard_normal((100, 24)), rng.standard_normal((9, 24))
    res = search(ubinary(qx), ubinary(dx), 3)
    want_ids, want_vals = brute_topk(signs(qx) @ signs(dx).T, 3)
    assert res.indices.tolist() == want_ids and res.scores.tolist() == want_vals


# ---------------------------------------------------------------- scores / search


def test_float_query_checks_name_the_problem():
    docs = Codes("float32", np.zeros((4, 5), np.float32), 5)
    with pytest.raises(SearchError) as err:
        scores(np.zeros((3, 4)), docs)
    assert str(err.value) == "queries of shape (3, 4) do not match float32 documents of dim 5"
    with pytest.raises(SearchError) as err:
        scores(np.zeros((2, 5), np.int64), docs)
    assert str(err.value) == "float queries expected (or Codes for symmetric scoring), got dtype int64; wrap integer codes in Codes"
    with pytest.raises(SearchError, match=r"^queries contain NaN or infinite values$"):
        scores(np.full((1, 5), np.nan), docs)
    with pytest.raises(SearchError, match=r"^chunk_size must be >= 1, got -1$"):
        scores(np.zeros((1, 5)), docs, chunk_size=-1)
    with pytest.raises(SearchError, match=r"^chunk_size must be >= 1, got -2$"):
        search(np.zeros((1, 5)), docs, 2, chunk_size=-2)
    with pytest.raises(SearchError) as err:
        search(np.zeros((1, 5)), docs, 2, backend="torch")
    assert str(err.value) == "unknown backend 'torch'; expected numpy or faiss"


def test_nan_document_is_located_by_its_chunk():
    data = np.ones((8, 3), np.float32)
    data[4, 1] = np.nan
    docs = Codes("float32", data, 3)
    with pytest.raises(SearchError) as err:
        search(np.ones((1, 3)), docs, 2, chunk_size=3)
    assert str(err.value) == "float32 documents 3..5: a score is NaN (non-finite document values)"


@pytest.mark.parametrize("q_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_float_search_equals_float64_reference_with_float32_scores(precision, q_dtype):
    rng = np.random.default_rng(2)
    dx = rng.standard_normal((11, 6)).astype(precision)
    dx[7] = dx[2]  # a tie: the lower index first
    q = rng.standard_normal((3, 6)).astype(q_dtype)
    docs = Codes(precision, dx, 6)
    want = q.astype(np.float64) @ dx.astype(np.float64).T
    for k in (1, 4, 11, 20):
        res = search(q, docs, k, chunk_size=4)
        assert res.scores.dtype == np.float32 and res.indices.shape == (3, min(k, 11))
        want_ids, want_vals = brute_topk(want, k)
        assert res.indices.tolist() == want_ids
        np.testing.assert_allclose(res.scores, want_vals, rtol=1e-5, atol=1e-5)
    # a single 1-D query is the same as a one-row batch, and a list works too
    one = search(q[0], docs, 4, chunk_size=4)
    assert one.indices.tolist() == search(q[:1], docs, 4).indices.tolist()
    assert search(q[0].tolist(), docs, 4).indices.tolist() == one.indices.tolist()


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_float_codes_queries_score_symmetrically(precision):
    """Codes of float32/float16 as queries: the plain float product, float32 scores."""
    rng = np.random.default_rng(4)
    qx, dx = rng.standard_normal((2, 5)).astype(precision), rng.standard_normal((7, 5)).astype(precision)
    res = search(Codes(precision, qx, 5), Codes(precision, dx, 5), 7, chunk_size=3)
    want = qx.astype(np.float64) @ dx.astype(np.float64).T
    want_ids, want_vals = brute_topk(want, 7)
    assert res.scores.dtype == np.float32 and res.indices.tolist() == want_ids
    np.testing.assert_allclose(res.scores, want_vals, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores(Codes(precision, qx, 5), Codes(precision, dx, 5)), want, rtol=1e-5, atol=1e-5)


def test_int8_search_float_and_code_queries_return_documented_dtypes():
    rng = np.random.default_rng(6)
    levels = rng.integers(0, 256, size=(10, 7))
    lower, upper = np.full(7, -1.0), np.full(7, 1.0)
    docs = int8_codes(levels, lower, upper)
    decoded = lower + levels * (upper - lower) / 255
    q = rng.standard_normal((2, 7)).astype(np.float32)
    res = search(q, docs, 10, chunk_size=3)
    want_ids, want_vals = brute_topk(q.astype(np.float64) @ decoded.T, 10)
    assert res.scores.dtype == np.float32 and res.indices.tolist() == want_ids
    np.testing.assert_allclose(res.scores, want_vals, rtol=1e-5, atol=1e-5)
    qc = int8_codes(rng.integers(0, 256, size=(2, 7)), lower, upper)
    res = search(qc, docs, 4, chunk_size=3)
    exact = qc.data.astype(np.int64) @ docs.data.astype(np.int64).T
    want_ids, want_vals = brute_topk(exact, 4)
    assert res.scores.dtype == np.int32 and res.indices.tolist() == want_ids and res.scores.tolist() == want_vals


def test_int8_search_beyond_float32_exact_range_stays_int32():
    """All -128 codes at 2048 dims need two exact float32 products; search still returns exact int32 scores."""
    data = np.full((3, 2048), -128, np.int8)
    data[1, :5] = 0
    codes = Codes("int8", data, 2048)
    res = search(codes, codes, 3)
    assert res.scores.dtype == np.int32
    assert res.indices[0].tolist() == [0, 2, 1] and res.scores[0].tolist() == [2**25, 2**25, 2**25 - 5 * 16384]


def test_uint8_block_split_keeps_odd_sums_exact():
    """uint8 255 x 255 = 65025 (odd): a block of 259+ such products is an odd integer above 2**24 that float32 cannot hold.

    The exact product must split the dims before that; one 254 makes the sum odd.
    """
    dim = 300
    q = Codes("uint8", np.full((1, dim), 255, np.uint8), dim)
    d_data = np.full((2, dim), 255, np.uint8)
    d_data[0, 0] = 254
    d_data[1, ::7] = 3
    docs = Codes("uint8", d_data, dim)
    want = [sum(255 * int(v) for v in row) for row in d_data.tolist()]
    got = scores(q, docs)
    assert got.dtype == np.int32 and got[0].tolist() == want
    assert search(q, docs, 2).scores[0].tolist() == sorted(want, reverse=True)


def test_empty_query_codes_give_empty_results():
    docs = Codes("int8", np.ones((4, 3), np.int8), 3)
    res = search(Codes("int8", np.zeros((0, 3), np.int8), 3), docs, 2)
    assert res.indices.shape == (0, 2) and res.scores.shape == (0, 2)


# ---------------------------------------------------------------- faiss


def test_faiss_missing_message(monkeypatch):
    codes = Codes("float32", np.eye(3, dtype=np.float32), 3)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingDependencyError) as err:
        search(np.eye(3), codes, 2, backend="faiss")
    assert str(err.value) == "backend='faiss' needs faiss: pip install faiss-cpu"


def test_faiss_backend_results_and_rejections():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(9)
    qx, dx = rng.standard_normal((2, 16)), rng.standard_normal((12, 16))
    res = search(ubinary(qx), ubinary(dx), 5, backend="faiss")
    want = signs(qx) @ signs(dx).T
    assert res.scores.dtype == np.int32 and res.indices.dtype == np.int64
    np.testing.assert_array_equal(res.scores, -np.sort(-want, axis=1)[:, :5])
    f = search(qx.astype(np.float32), Codes("float32", dx.astype(np.float32), 16), 4, backend="faiss")
    want_ids, _ = brute_topk(qx.astype(np.float32) @ dx.astype(np.float32).T, 4)
    assert f.indices.tolist() == want_ids
    for q, docs in ((qx, ubinary(dx)), (qx, Codes.affine("uint8", np.zeros((12, 16), np.uint8), np.zeros(16), np.ones(16)))):
        with pytest.raises(SearchError) as err:
            search(q, docs, 3, backend="faiss")
        assert str(err.value) == f"backend='faiss' searches float32 documents with float queries or binary codes with binary codes, not {docs.precision}"


# ---------------------------------------------------------------- rescoring


def test_rescored_argument_checks_name_the_values():
    c = Codes("float32", np.eye(4, dtype=np.float32), 4)
    with pytest.raises(SearchError) as err:
        search_rescored(np.eye(4), c, c, 0)
    assert str(err.value) == "k and rescore_multiplier must be >= 1, got k=0, rescore_multiplier=4"
    with pytest.raises(SearchError) as err:
        search_rescored(np.eye(4), c, c, 2, rescore_multiplier=0)
    assert str(err.value) == "k and rescore_multiplier must be >= 1, got k=2, rescore_multiplier=0"
    with pytest.raises(SearchError) as err:
        search_rescored(np.ones((2, 5)), ubinary(np.ones((3, 8))), np.ones((3, 5)), 1)
    assert str(err.value) == "queries of dim 5 do not match binary candidates of dim 8"
    with pytest.raises(SearchError, match=r"^chunk_size must be >= 1, got -1$"):
        search_rescored(np.eye(4), c, c, 2, chunk_size=-1)
    with pytest.raises(SearchError, match="unknown backend 'bogus'"):
        search_rescored(np.eye(4), c, c, 2, backend="bogus")


def test_default_pool_is_four_candidates_per_result():
    """Candidates rank documents 0, 1, 2, ...; the rescoring prefers later ones. Only the first 4k are rescored."""
    cand = Codes("float32", np.arange(10, 0, -1, dtype=np.float32)[:, None], 1)
    rescore = np.array([[0.0], [1.0], [2.0], [3.0], [9.0], [8.0], [0.0], [0.0], [0.0], [0.0]])
    res = search_rescored(np.array([1.0]), cand, rescore, 1)
    assert res.indices.tolist() == [[3]] and res.scores.tolist() == [[3.0]]
    res = search_rescored(np.array([1.0]), cand, rescore, 2, rescore_multiplier=3)  # pool 0..5
    assert res.indices.tolist() == [[4, 5]] and res.scores.tolist() == [[9.0, 8.0]]
    assert res.scores.dtype == np.float32


def test_rescoring_equals_exact_scores_of_the_shortlist():
    """Stage one: top (multiplier * k) by sign bits; stage two: float64 scores of those docs, ties to the lower id."""
    rng = np.random.default_rng(12)
    dim, n, k, mult = 16, 23, 3, 2
    dx = rng.standard_normal((n, dim))
    dx[9] = dx[4]  # duplicate documents: equal rescores, lower id first
    qx = rng.standard_normal((4, dim))
    qx[0] = dx[4] + 0.01
    cand = Codes("binary", (np.packbits(dx > 0, axis=-1).astype(np.int16) - 128).astype(np.int8), dim)
    got = search_rescored(qx, cand, dx, k, rescore_multiplier=mult, chunk_size=5)
    ham_ids, _ = brute_topk(signs(qx) @ signs(dx).T, k * mult)
    for i, pool in enumerate(ham_ids):
        exact = {j: float(qx[i] @ dx[j]) for j in pool}
        order = sorted(pool, key=lambda j: (-exact[j], j))[:k]
        assert got.indices[i].tolist() == order
        np.testing.assert_allclose(got.scores[i], [exact[j] for j in order], rtol=1e-5)
    assert got.scores.dtype == np.float32
    # a 1-D query and a list of rescore rows give the same answer as the batch
    one = search_rescored(qx[0], cand, dx.tolist(), k, rescore_multiplier=mult)
    assert one.indices.tolist() == got.indices[:1].tolist()


def test_rescoring_float_candidates_and_int8_rescore_codes():
    rng = np.random.default_rng(13)
    dx = rng.standard_normal((14, 5))
    lower, upper = dx.min(axis=0), dx.max(axis=0)
    levels = np.clip(np.rint((dx - lower) / ((upper - lower) / 255)), 0, 255).astype(np.int64)
    rescore = int8_codes(levels, lower, upper)
    decoded = lower + levels * (upper - lower) / 255
    cand = Codes("float16", dx.astype(np.float16), 5)
    q = rng.standard_normal((2, 5)).astype(np.float32)
    got = search_rescored(q, cand, rescore, 14, chunk_size=4)  # k == N: everything comes back, in exact order
    want_ids, want_vals = brute_topk(q.astype(np.float64) @ decoded.T, 14)
    assert got.indices.tolist() == want_ids
    np.testing.assert_allclose(got.scores, want_vals, rtol=1e-4, atol=1e-4)


def test_rescoring_query_bits_use_strictly_greater_than_centre():
    """A query coordinate equal to the centre is a 0 bit, as the codec packs x > centre."""
    dim = 8
    q = np.zeros((1, dim))
    q[0, 0] = 1.0
    a = np.array([[1.0, -1, -1, -1, -1, -1, -1, -1]])  # bits 10000000: the query's own bits
    b = np.ones((1, dim))  # bits 11111111
    cand = ubinary(np.concatenate([b, a]))
    rescore = np.concatenate([np.full((1, dim), 5.0), np.zeros((1, dim))])  # b would win the rescoring
    res = search_rescored(q, cand, rescore, 1, rescore_multiplier=1)
    assert res.indices.tolist() == [[1]] and res.scores.tolist() == [[0.0]]


def test_rescoring_with_code_queries_for_both_stages():
    rng = np.random.default_rng(14)
    qx, dx = rng.standard_normal((3, 10)), rng.standard_normal((9, 10))
    cand, rq = ubinary(dx), ubinary(qx)
    lower, upper = np.full(10, -3.0), np.full(10, 3.0)
    dlev = rng.integers(0, 256, size=(9, 10))
    qlev = rng.integers(0, 256, size=(3, 10))
    got = search_rescored(qx, cand, int8_codes(dlev, lower, upper), 2, candidate_queries=rq, rescore_queries=int8_codes(qlev, lower, upper), rescore_multiplier=9)
    exact = (qlev - 128) @ (dlev - 128).T
    want_ids, want_vals = brute_topk(exact, 2)
    assert got.indices.tolist() == want_ids and got.scores.tolist() == want_vals


# ---------------------------------------------------------------- MaxSim


def py_maxsim(queries: list[np.ndarray], docs: list[np.ndarray]) -> list[list[float]]:
    return [[sum(max(float(np.dot(t, u)) for u in d) for t in q) for d in docs] for q in queries]


def test_maxsim_argument_checks():
    docs = [_tokens(2)]
    with pytest.raises(SearchError) as err:
        maxsim([], docs)
    assert str(err.value) == "maxsim: no queries"
    with pytest.raises(SearchError) as err:
        maxsim([np.ones((1, 4)), np.ones((2, 4)), np.zeros((0, 4)), np.ones((1, 4))], docs)
    assert str(err.value) == "maxsim: query 2 has no tokens"


@pytest.mark.parametrize("budget", [None, 1, 4, 5, 100])
def test_maxsim_float_equals_python_reference(budget):
    """Token-budget groups of whole documents (one, several, a last partial group) do not change the scores."""
    rng = np.random.default_rng(15)
    docs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 1, 4, 2, 5)]
    queries = [rng.standard_normal((n, 8)) for n in (1, 3)]  # 4 query tokens in all
    got = maxsim(queries, [Codes("float32", d, 8) for d in docs], token_budget=budget)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, py_maxsim(queries, docs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [None, 3, 64])
def test_maxsim_int8_codes_equal_python_ints(budget):
    rng = np.random.default_rng(16)
    docs = [rng.integers(-128, 128, size=(n, 8)).astype(np.int8) for n in (2, 5, 1, 3)]
    queries = [rng.integers(-128, 128, size=(n, 8)).astype(np.int8) for n in (3, 5)]  # 8 query tokens
    got = maxsim([Codes("int8", q, 8) for q in queries], [Codes("int8", d, 8) for d in docs], token_budget=budget)
    assert got.dtype == np.int64
    want = py_maxsim([q.astype(np.int64) for q in queries], [d.astype(np.int64) for d in docs])
    assert got.tolist() == [[int(v) for v in row] for row in want]
    one = maxsim([Codes("int8", queries[0], 8)], [Codes("int8", d, 8) for d in docs])
    assert one.tolist() == got[:1].tolist()


def test_maxsim_integer_sum_does_not_overflow_int32():
    """64 query tokens each scoring 2**25 (all -128 at 2048 dims) sum to 2**31: the int64 result holds it."""
    tok = Codes("int8", np.full((64, 2048), -128, np.int8), 2048)
    got = maxsim([tok], [Codes("int8", np.full((2, 2048), -128, np.int8), 2048)])
    assert got.tolist() == [[2**31]]


def test_maxsim_sums_query_tokens_in_float64():
    """Token maxima 1e8, 1, -1e8 sum to 1; a float32 running sum would lose the 1."""
    doc = Codes("float32", np.ones((1, 1), np.float32), 1)
    got = maxsim([np.array([[1e8], [1.0], [-1e8]], np.float32)], [doc])
    assert got.tolist() == [[1.0]]


def test_maxsim_binary_codes_equal_sign_products():
    rng = np.random.default_rng(17)
    docs = [rng.standard_normal((n, 16)) for n in (2, 3)]
    queries = [rng.standard_normal((n, 16)) for n in (1, 2)]
    docs[1][0] = -queries[0][0]  # the complement token: -16
    got = maxsim([ubinary(q) for q in queries], [ubinary(d) for d in docs])
    want = py_maxsim([signs(q) for q in queries], [signs(d) for d in docs])
    assert got.dtype == np.int64 and got.tolist() == [[int(v) for v in row] for row in want]


def test_docs_of_every_precision_score_as_decoded_floats():
    """A float query against each layout equals its product with the decoded documents (module docstring)."""
    rng = np.random.default_rng(18)
    dim = 13
    x = rng.standard_normal((9, dim))
    q = rng.standard_normal((2, dim))
    lower, upper = x.min(0), x.max(0)
    steps = (upper - lower) / 255
    lev = np.clip(np.rint((x - lower) / steps), 0, 255).astype(np.int64)
    cases = {
        "int8": (int8_codes(lev, lower, upper), lower + lev * steps),
        "uint8": (Codes.affine("uint8", lev.astype(np.uint8), lower, upper), lower + lev * steps),
        "binary": (Codes("binary", (np.packbits(x > 0, axis=-1).astype(np.int16) - 128).astype(np.int8), dim), signs(x)),
        "ubinary": (ubinary(x), signs(x)),
    }
    l4 = np.clip(np.rint((x - lower) / ((upper - lower) / 15)), 0, 15).astype(np.int64)
    pad = np.pad(l4, ((0, 0), (0, 1)))
    cases["int4"] = (Codes.affine("int4", (pad[:, 0::2] * 16 + pad[:, 1::2]).astype(np.uint8), lower, upper), lower + l4 * (upper - lower) / 15)
    trits = np.where(x > 0.3, 1, np.where(x < -0.3, -1, 0))
    tp = np.pad(trits + 1, ((0, 0), (0, 2)))
    cases["ternary"] = (Codes("ternary", (tp.reshape(9, 3, 5) * 3 ** np.arange(4, -1, -1)).sum(-1).astype(np.uint8), dim), trits)
    for name, (codes, decoded) in cases.items():
        want = q @ decoded.T
        got = search(q, codes, 9, chunk_size=4)
        assert got.scores.dtype == np.float32, name
        want_ids, want_vals = brute_topk(want, 9)
        np.testing.assert_allclose(got.scores, want_vals, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(maxsim([q], [codes.slice(0, 4), codes.slice(4, 9)]), [[np.sum(want[:, :4].max(1)), np.sum(want[:, 4:].max(1))]], rtol=1e-4, err_msg=name)


def test_range_codes_without_calibration_name_the_fix():
    with pytest.raises(SearchError, match=re.escape("uint8 documents need scale/shift (their calibration: Codes.affine or Codes.from_decoder) to score float queries")):
        scores(np.ones((1, 2)), Codes("uint8", np.zeros((1, 2), np.uint8), 2))
