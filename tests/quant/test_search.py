"""Search over quantized embeddings, checked against slow pure-Python references on small random data.

The code layouts are built here by small reference encoders that follow the
codec contract (see jev4.quant.search.Codes), so these tests do not depend
on jev4.quant.embeddings; one test also checks against the real codec when
it is importable.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from jev4.quant.search import Codes, SearchError, TokenCorpus, _exact_blocks, _popcount_sum, hamming_distances, maxsim, scores, search, search_rescored

# ---------------------------------------------------------------- reference encoders/decoders (the contract)


def ranges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.min(axis=0), x.max(axis=0)


def encode(x: np.ndarray, precision: str, lower: np.ndarray | None = None, upper: np.ndarray | None = None) -> Codes:
    dim = x.shape[1]
    if precision in ("float32", "float16"):
        return Codes(precision, x.astype(precision), dim)
    if precision in ("int8", "uint8", "int4"):
        levels = 15 if precision == "int4" else 255
        steps = (upper - lower) / levels
        levels_x = np.clip(np.rint((x - lower) / steps), 0, levels).astype(np.int64)
        if precision == "int8":
            data = (levels_x - 128).astype(np.int8)
        elif precision == "uint8":
            data = levels_x.astype(np.uint8)
        else:
            padded = np.pad(levels_x, ((0, 0), (0, dim % 2)))
            data = (padded[:, 0::2] * 16 + padded[:, 1::2]).astype(np.uint8)
        return Codes.affine(precision, data, lower, upper)
    if precision == "ternary":
        trits = np.where(x > 0.3, 2, np.where(x < -0.3, 0, 1))
        padded = np.pad(trits, ((0, 0), (0, (-dim) % 5)), constant_values=0)
        groups = padded.reshape(len(x), -1, 5)
        data = (groups * 3 ** np.arange(4, -1, -1)).sum(axis=-1).astype(np.uint8)
        return Codes("ternary", data, dim)
    packed = np.packbits(x > 0, axis=-1)
    if precision == "binary":
        return Codes("binary", (packed.astype(np.int16) - 128).astype(np.int8), dim)
    return Codes("ubinary", packed, dim)


def decode(codes: Codes, lower: np.ndarray | None = None, upper: np.ndarray | None = None) -> np.ndarray:
    """Float64 decode written from the layout contract, element by element (range codes need the grid)."""
    n, dim = len(codes), codes.dim
    if codes.precision in ("int8", "uint8", "int4"):
        steps = (upper - lower) / (15 if codes.precision == "int4" else 255)
    out = np.zeros((n, dim))
    for i in range(n):
        row = [int(v) for v in codes.data[i]]
        for d in range(dim):
            p = codes.precision
            if p in ("float32", "float16"):
                out[i, d] = float(codes.data[i, d])
            elif p == "int8":
                out[i, d] = (row[d] + 128) * steps[d] + lower[d]
            elif p == "uint8":
                out[i, d] = row[d] * steps[d] + lower[d]
            elif p == "int4":
                byte = row[d // 2]
                out[i, d] = ((byte >> 4) if d % 2 == 0 else (byte & 15)) * steps[d] + lower[d]
            elif p == "ternary":
                out[i, d] = (row[d // 5] // 3 ** (4 - d % 5)) % 3 - 1
            else:
                byte = row[d // 8] % 256 if p == "ubinary" else (row[d // 8] + 128)
                out[i, d] = 1.0 if (byte >> (7 - d % 8)) & 1 else -1.0
    return out


def int_values(codes: Codes) -> list[list[int]]:
    """Raw code values as Python ints (int4 nibbles, trits, +-1 bits)."""
    if codes.precision in ("int8", "uint8"):
        return [[int(v) for v in row] for row in codes.data]
    if codes.precision == "int4":
        return [[(int(row[d // 2]) >> 4) if d % 2 == 0 else (int(row[d // 2]) & 15) for d in range(codes.dim)] for row in codes.data]
    return [[int(v) for v in r] for r in decode(codes)]


def py_hamming(a: np.ndarray, b: np.ndarray) -> int:
    return sum(bin((int(x) ^ int(y)) & 0xFF).count("1") for x, y in zip(a.tolist(), b.tolist()))


def brute_topk(score_matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, vals = [], []
    for row in score_matrix.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        ids.append(order)
        vals.append([row[j] for j in order])
    return np.array(ids), np.array(vals)


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("dim", [8, 100, 128, 136, 2048])
@pytest.mark.parametrize("use_lut", [False, True])
@pytest.mark.parametrize("n_queries", [1, 3])  # one query XORs whole rows; several go word by word
def test_hamming_equals_python_reference(rng, dim, use_lut, n_queries):
    q = encode(rng.standard_normal((n_queries, dim)), "ubinary")
    d = encode(rng.standard_normal((17, dim)), "ubinary")
    got = hamming_distances(q.data, d.data, chunk_size=5, use_lut=use_lut)
    want = np.array([[py_hamming(a, b) for b in d.data] for a in q.data])
    np.testing.assert_array_equal(got, want)


def test_popcount_lut_equals_bitwise_count(rng):
    words = rng.integers(0, 2**63, size=(50, 4), dtype=np.uint64)
    want = [[sum(bin(int(w)).count("1") for w in row)] for row in words]
    np.testing.assert_array_equal(_popcount_sum(words, use_lut=True)[:, None], want)
    np.testing.assert_array_equal(_popcount_sum(words)[:, None], want)


@pytest.mark.parametrize("qp,dp", [("ubinary", "ubinary"), ("binary", "binary"), ("binary", "ubinary"), ("ubinary", "binary")])
def test_binary_scores_are_sign_inner_products(rng, qp, dp):
    x, y = rng.standard_normal((4, 100)), rng.standard_normal((9, 100))
    q, d = encode(x, qp), encode(y, dp)
    got = scores(q, d)
    signs = np.where(x > 0, 1, -1) @ np.where(y > 0, 1, -1).T
    np.testing.assert_array_equal(got, signs)
    ham = np.array([[py_hamming(a, b) for b in encode(y, "ubinary").data] for a in encode(x, "ubinary").data])
    np.testing.assert_array_equal(got, 100 - 2 * ham)


@pytest.mark.parametrize("precision", ["int8", "uint8", "int4", "ternary"])
def test_symmetric_integer_scores_equal_python_ints(rng, precision):
    dim = 37
    x, y = rng.standard_normal((5, dim)), rng.standard_normal((11, dim))
    lower, upper = ranges(np.concatenate([x, y]))
    q, d = encode(x, precision, lower, upper), encode(y, precision, lower, upper)
    got = scores(q, d, chunk_size=4)
    qv, dv = int_values(q), int_values(d)
    want = [[sum(a * b for a, b in zip(qr, dr)) for dr in dv] for qr in qv]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("precision,extreme", [("int8", -128), ("uint8", 255), ("int4", 0xFF)])
def test_integer_products_exact_at_extremes(precision, extreme):
    """All-extreme 2048-d codes: the sums exceed float32's exact range (2**24), yet the result is exact."""
    dim = 2048
    width = dim // 2 if precision == "int4" else dim
    dtype = np.int8 if precision == "int8" else np.uint8
    data = np.full((2, width), extreme, dtype=dtype)
    data[1, ::3] = 1  # a row that is not all-extreme
    codes = Codes(precision, data, dim)
    got = scores(codes, codes)
    vals = int_values(codes)
    want = [[sum(a * b for a, b in zip(r, s)) for s in vals] for r in vals]
    assert want[0][0] > 2**24 or precision == "int4"
    np.testing.assert_array_equal(got, want)


def test_int8_product_exact_where_one_float32_product_rounds():
    """-127 x -127 over 2047 dims is 33,016,063: odd and above 2**24, so a single float32 product cannot hold it."""
    q = Codes("int8", np.full((1, 2048), -127, dtype=np.int8), 2048)
    d_data = np.full((2, 2048), -127, dtype=np.int8)
    d_data[0, -1] = 0
    d_data[1, ::2] = 3
    docs = Codes("int8", d_data, 2048)
    want = [[16129 * 2047, 16129 * 1024 - 381 * 1024]]
    assert int(np.float32(want[0][0])) != want[0][0]
    np.testing.assert_array_equal(scores(q, docs), want)
    assert len(_exact_blocks(q.values().astype(np.float32), 128)) == 2
    typical = np.random.default_rng(0).integers(-40, 40, size=(8, 2048)).astype(np.float32)
    assert _exact_blocks(typical, 128) == ((0, 2048),)  # one matrix product


@pytest.mark.parametrize("precision", ["float32", "float16", "int8", "uint8", "int4", "ternary", "binary", "ubinary"])
@pytest.mark.parametrize("dim", [64, 37])
def test_asymmetric_scores_equal_query_dot_decoded_docs(rng, precision, dim):
    docs = rng.standard_normal((23, dim)) * np.linspace(0.5, 2.0, dim) + np.linspace(-1, 1, dim)
    lower, upper = ranges(docs)
    codes = encode(docs, precision, lower, upper)
    q = rng.standard_normal((4, dim)).astype(np.float32)
    got = scores(q, codes, chunk_size=6)
    want = q.astype(np.float64) @ decode(codes, lower, upper).T
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("precision", ["ternary", "binary", "ubinary"])
def test_asymmetric_scores_with_centre_and_magnitude(rng, precision):
    """Calibrated ternary/binary decode to centre + value * magnitude per dim."""
    dim = 45
    docs = rng.standard_normal((19, dim))
    plain = encode(docs, precision)
    center, magnitude = rng.standard_normal(dim) * 0.1, rng.uniform(0.5, 2.0, dim)
    codes = Codes(precision, plain.data, dim, scale=magnitude, shift=center)
    q = rng.standard_normal((3, dim)).astype(np.float32)
    want = q.astype(np.float64) @ (center + decode(plain) * magnitude).T
    np.testing.assert_allclose(scores(q, codes), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("jev4.quant.embeddings") is None, reason="jev4.quant.embeddings not present")
@pytest.mark.parametrize("precision", ["int8", "uint8", "int4", "ternary", "binary", "ubinary", "float16"])
def test_asymmetric_scores_match_the_real_codec(rng, precision):
    from jev4.quant.embeddings import EmbeddingCodec, calibrate

    emb = unit(rng, 200, 64)
    codec = EmbeddingCodec(precision, None if precision == "float16" else calibrate(emb, precision), None)
    data = codec.encode(emb[:30])
    codes = Codes.from_decoder(precision, data, codec.decode)
    q = unit(rng, 3, 64)
    want = q.astype(np.float64) @ np.asarray(codec.decode(data), dtype=np.float64).T
    np.testing.assert_allclose(scores(q, codes), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("precision,dim", [("ubinary", 16), ("int8", 8), ("ternary", 7)])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_topk_equals_brute_force_sort_with_ties(rng, precision, dim, k):
    docs = rng.standard_normal((40, dim))
    docs[10:20] = docs[0]  # duplicate documents: equal scores
    lower, upper = ranges(docs)
    codes = encode(docs, precision, lower, upper)
    queries = encode(rng.standard_normal((6, dim)), precision, lower, upper)
    full = scores(queries, codes)
    assert all(len(np.unique(row)) <= len(row) - 10 for row in full)  # ties: at least the 10 duplicates
    want_ids, want_vals = brute_topk(full, k)
    for chunk in (None, 1, 3, 16):
        got = search(queries, codes, k, chunk_size=chunk)
        np.testing.assert_array_equal(got.indices, want_ids)
        np.testing.assert_array_equal(got.scores, want_vals)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_topk_float_equals_brute_force_sort(rng, k):
    """Float scores: a BLAS kernel may round a chunk's scores differently in the last bit; ranks stay."""
    codes = Codes("float32", unit(rng, 40, 24), 24)
    codes.data[10:20] = codes.data[0]
    queries = unit(rng, 6, 24)
    want_ids, want_vals = brute_topk(queries.astype(np.float64) @ codes.data.astype(np.float64).T, k)
    for chunk in (None, 1, 3, 16):
        got = search(queries, codes, k, chunk_size=chunk)
        np.testing.assert_array_equal(got.indices, want_ids)
        np.testing.assert_allclose(got.scores, want_vals, rtol=1e-6, atol=1e-7)


def test_topk_float_queries_and_all_ties(rng):
    codes = Codes("float32", np.ones((12, 4), dtype=np.float32), 4)
    got = search(np.ones((2, 4), dtype=np.float32), codes, 5, chunk_size=5)
    np.testing.assert_array_equal(got.indices, [[0, 1, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(got.scores, np.full((2, 5), 4.0))


def test_k_equal_and_above_corpus_size(rng):
    codes = encode(rng.standard_normal((9, 16)), "ubinary")
    q = encode(rng.standard_normal((2, 16)), "ubinary")
    assert search(q, codes, 9).indices.shape == (2, 9)
    assert sorted(search(q, codes, 9).indices[0].tolist()) == list(range(9))
    assert search(q, codes, 50).indices.shape == (2, 9)
    with pytest.raises(SearchError, match="k must be"):
        search(q, codes, 0)


def test_chunking_does_not_change_scores(rng):
    docs = unit(rng, 101, 96)
    lower, upper = ranges(docs)
    for precision in ("int8", "int4", "ubinary", "ternary"):
        codes = encode(docs, precision, lower, upper)
        q = unit(rng, 3, 96)
        whole = scores(q, codes, chunk_size=1000)
        for chunk in (1, 7, 50):
            np.testing.assert_allclose(scores(q, codes, chunk_size=chunk), whole, rtol=1e-6, atol=1e-6)
            q_codes = encode(q, precision, lower, upper)  # integer scores: bit-identical
            np.testing.assert_array_equal(scores(q_codes, codes, chunk_size=chunk), scores(q_codes, codes, chunk_size=1000))
            a, b = search(q, codes, 10, chunk_size=chunk), search(q, codes, 10, chunk_size=1000)
            np.testing.assert_array_equal(a.indices, b.indices)


# ---------------------------------------------------------------- two-stage


@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 6), (7, 7), (30, 10), (30, 30)])
@pytest.mark.parametrize("multiplier", [1, 2, 1000])
def test_rescoring_never_returns_fewer_than_k(rng, n, k, multiplier):
    docs = unit(rng, n, 32)
    docs[n // 2 :] = docs[0]  # many duplicates: equal scores in both stages
    lower, upper = ranges(np.concatenate([docs, unit(rng, 5, 32)]))
    result = search_rescored(unit(rng, 3, 32), encode(docs, "ubinary"), encode(docs, "int8", lower, upper), k, rescore_multiplier=multiplier)
    assert result.indices.shape == (3, k)
    for row in result.indices:
        assert len(set(row.tolist())) == k and row.min() >= 0 and row.max() < n
    assert np.all(np.diff(result.scores, axis=1) <= 0)


@pytest.mark.parametrize("rescore", ["int8", "int8-symmetric", "float32"])
def test_rescoring_with_full_pool_equals_exact_search(rng, rescore):
    docs, queries = unit(rng, 60, 48), unit(rng, 5, 48)
    lower, upper = ranges(docs)
    candidates = encode(docs, "ubinary")
    if rescore == "float32":
        exact = search(queries, Codes("float32", docs, 48), 10)
        got = search_rescored(queries, candidates, docs, 10, rescore_multiplier=6)
    elif rescore == "int8":
        int8 = encode(docs, "int8", lower, upper)
        exact = search(queries, int8, 10)
        got = search_rescored(queries, candidates, int8, 10, rescore_multiplier=6)
    else:
        int8, q8 = encode(docs, "int8", lower, upper), encode(queries, "int8", lower, upper)
        exact = search(q8, int8, 10)
        got = search_rescored(queries, candidates, int8, 10, rescore_multiplier=6, rescore_queries=q8)
    np.testing.assert_array_equal(got.indices, exact.indices)
    np.testing.assert_allclose(got.scores, exact.scores, rtol=1e-5)


def test_rescoring_changes_the_order_of_binary_candidates(rng):
    """With a small pool the result is the best rescored documents among the binary top candidates."""
    docs, queries = unit(rng, 200, 64), unit(rng, 4, 64)
    candidates = encode(docs, "ubinary")
    got = search_rescored(queries, candidates, docs, 5, rescore_multiplier=3)
    pool = search(Codes("ubinary", np.packbits(queries > 0, axis=-1), 64), candidates, 15)
    for i in range(4):
        exact_in_pool = sorted(pool.indices[i].tolist(), key=lambda j: -float(queries[i] @ docs[j]))[:5]
        assert got.indices[i].tolist() == exact_in_pool


def test_rescoring_rejects_mismatched_corpora(rng):
    docs = unit(rng, 10, 16)
    with pytest.raises(SearchError, match="same corpus"):
        search_rescored(docs[:2], encode(docs, "ubinary"), docs[:5], 3)


# ---------------------------------------------------------------- MaxSim


def ref_maxsim(query_scores: list[list[np.ndarray]]) -> np.ndarray:
    """query_scores[i][j]: [Tq_i, Td_j] token scores; sum of row maxima."""
    return np.array([[float(sum(max(row) for row in s.tolist())) for s in per_doc] for per_doc in query_scores])


@pytest.mark.parametrize("kind", ["float-int8", "float-binary", "binary-binary", "int8-int8", "float-float16"])
def test_maxsim_equals_slow_reference(rng, kind):
    dim = 128
    doc_tokens = [unit(rng, t, dim) for t in (1, 5, 17, 2, 9, 1, 30)]
    query_tokens = [unit(rng, t, dim) for t in (3, 1, 8)]
    lower, upper = ranges(np.concatenate(doc_tokens))
    qp, dp = kind.split("-")
    docs = [encode(d, dp, lower, upper) for d in doc_tokens]
    queries = query_tokens if qp == "float" else [encode(q, qp, lower, upper) for q in query_tokens]
    if qp == "float":
        pair = [[q.astype(np.float64) @ decode(d, lower, upper).T for d in docs] for q in queries]
    else:
        pair = [[np.array([[sum(a * b for a, b in zip(qr, dr)) for dr in int_values(d)] for qr in int_values(q)]) for d in docs] for q in queries]
    want = ref_maxsim(pair)
    for budget in (None, 1, 8, 10_000):
        got = maxsim(queries, docs, token_budget=budget)
        assert got.shape == (3, 7)
        if qp == "float":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(got, want)
    corpus = TokenCorpus.from_documents(docs)  # the prebuilt corpus against the independent reference, not against maxsim(queries, docs)
    if qp == "float":
        np.testing.assert_allclose(maxsim(queries, corpus), want, rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_array_equal(maxsim(queries, corpus), want)


def test_maxsim_rejects_empty_documents(rng):
    good = encode(rng.standard_normal((3, 16)), "ubinary")
    empty = Codes("ubinary", np.zeros((0, 2), dtype=np.uint8), 16)
    with pytest.raises(SearchError, match="document 1 has no tokens"):
        maxsim([rng.standard_normal((2, 16))], [good, empty])


# ---------------------------------------------------------------- input checks


def test_codes_validation_names_the_problem(rng):
    with pytest.raises(SearchError, match="expected width 13"):
        Codes("ubinary", np.zeros((2, 12), dtype=np.uint8), 100)
    with pytest.raises(SearchError, match="expected dtype int8"):
        Codes("int8", np.zeros((2, 4), dtype=np.uint8), 4)
    with pytest.raises(SearchError, match="must be < 243"):
        Codes("ternary", np.full((2, 1), 250, dtype=np.uint8), 5)
    with pytest.raises(SearchError, match="need scale/shift"):
        scores(rng.standard_normal((1, 4)), Codes("int8", np.zeros((2, 4), dtype=np.int8), 4))
    with pytest.raises(SearchError, match="do not match"):
        scores(rng.standard_normal((1, 5)), Codes("float32", np.zeros((2, 4), dtype=np.float32), 4))
    with pytest.raises(SearchError, match="cannot score int8"):
        scores(Codes("int8", np.zeros((1, 4), dtype=np.int8), 4), Codes("uint8", np.zeros((1, 4), dtype=np.uint8), 4))
    with pytest.raises(SearchError, match="NaN"):
        scores(np.full((1, 4), np.nan), Codes("float32", np.zeros((2, 4), dtype=np.float32), 4))


# ---------------------------------------------------------------- faiss (optional)


@pytest.mark.parametrize("precision", ["ubinary", "binary", "float32"])
def test_faiss_backend_gives_the_numpy_scores(rng, precision):
    pytest.importorskip("faiss")
    docs = unit(rng, 300, 64)
    codes = encode(docs, precision)
    queries = unit(rng, 4, 64)
    q = queries if precision == "float32" else encode(queries, precision)
    got, want = search(q, codes, 10, backend="faiss"), search(q, codes, 10)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
    full = scores(q, codes)
    np.testing.assert_allclose(np.take_along_axis(full, got.indices, axis=1), got.scores, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("jev4.quant.embeddings") is None, reason="jev4.quant.embeddings not present")
@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_rescoring_binarizes_queries_like_the_codec(rng, precision):
    """With a centred binary calibration the stage-one query bits are the codec's own codes of the queries."""
    from jev4.quant.embeddings import EmbeddingCodec, calibrate

    docs, queries = unit(rng, 300, 64) + 0.05, unit(rng, 4, 64) + 0.05
    codec = EmbeddingCodec(precision, calibrate(docs, precision, centered=True), None)
    candidates = Codes.from_decoder(precision, codec.encode(docs), codec.decode)
    assert np.abs(candidates.shift).max() > 0  # the centre is not 0
    given = Codes(precision, codec.encode(queries), 64)
    a = search_rescored(queries, candidates, docs, 5, rescore_multiplier=2)
    b = search_rescored(queries, candidates, docs, 5, rescore_multiplier=2, candidate_queries=given)
    np.testing.assert_array_equal(a.indices, b.indices)
    first = search(given, candidates, 10)
    for i in range(4):
        assert set(a.indices[i].tolist()) <= set(first.indices[i].tolist())


def test_faiss_backend_missing_names_the_pip_command(rng, monkeypatch):
    import sys

    from jev4.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    codes = encode(rng.standard_normal((5, 16)), "ubinary")
    with pytest.raises(MissingDependencyError, match="pip install faiss-cpu"):
        search(codes, codes, 2, backend="faiss")
    assert search(codes, codes, 2).indices.shape == (5, 2)  # numpy needs nothing


def test_bench_search_cli_on_a_small_corpus(tmp_path, capsys):
    """`jev4 bench search` end to end on 3000 x 64: every method is reported and float32 is its own reference."""
    import json

    from jev4.cli.main import main

    out = tmp_path / "bench.json"
    argv = ["bench", "search", "--docs", "3000", "--dim", "64", "--queries", "6", "--latency-queries", "2", "--k", "5", "--results", str(out), "--plot", str(tmp_path / "bench.png")]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    methods = {(p["method"], p["backend"]) for p in results["points"]}
    assert ("binary (Hamming)", "numpy") in methods and ("float32", "numpy") in methods
    assert any(m.startswith("binary -> int8") for m, _ in methods) and any(m.startswith("binary -> float32") for m, _ in methods)
    by_name = {(p["method"], p["backend"]): p for p in results["points"]}
    assert by_name[("float32", "numpy")]["overlap_at_k_vs_float32"] == 1.0
    assert by_name[("float32", "numpy")]["planted_hit_at_k"] == 1.0
    assert by_name[("binary (Hamming)", "numpy")]["bytes_per_doc"] == 8 and by_name[("float32", "numpy")]["bytes_per_doc"] == 256
    assert all(p["queries_per_s"] > 0 and p["p50_ms"] > 0 for p in results["points"])
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "| method |" in capsys.readouterr().out
