"""jev4.validate.metrics and .streaming: the edges a user meets that the hand-computed cases leave open.

Exact error messages (they name the shapes, the bad value, which function), nan/inf on degenerate
input without RuntimeWarnings, inputs of other dtypes (int8, float16, float32, lists, uint64, an
empty shard) and MaxSim with its query chunks and document blocks forced small.
"""

import math
import warnings

import numpy as np
import pytest

from jev4.validate import metrics
from jev4.validate.metrics import (
    cosine_rows,
    max_abs,
    maxsim_scores,
    mrr_at_k,
    ndcg_at_k,
    pearson,
    rank_documents,
    ranking_metrics,
    recall_at_k,
    retrieval_metrics,
    spearman,
    sqnr_db,
    topk_overlap,
)
from jev4.validate.streaming import RunningTopK

# --------------------------------------------------------------------------- error messages


def test_error_messages_name_the_shapes_and_values():
    """Each ValueError says what was wrong and with which numbers, so a failing validation run is diagnosable from its log."""
    with pytest.raises(ValueError, match=r"^scores must be \[queries, documents\], got shape \(3,\)$"):
        rank_documents(np.zeros(3))
    for per_query in (ndcg_at_k, recall_at_k, mrr_at_k):
        with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
            per_query(np.zeros((1, 3)), [{0: 1.0}], 0)
    with pytest.raises(ValueError, match=r"^score shapes differ: \(1, 3\) vs \(1, 4\)$"):
        topk_overlap(np.zeros((1, 3)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"^query 0: expected \[tokens, dim\], got shape \(2,\)$"):
        maxsim_scores([np.ones(2)], [np.ones((1, 2))])
    with pytest.raises(ValueError, match=r"^document 1: expected \[tokens, dim\], got shape \(1, 2, 2\)$"):
        maxsim_scores([np.ones((1, 2))], [np.ones((1, 2)), np.ones((1, 2, 2))])
    with pytest.raises(ValueError, match=r"^pearson: lengths differ \(2 vs 3\)$"):
        pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"^spearman: lengths differ \(3 vs 2\)$"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"^cosine_rows: shapes differ \(\(2, 2\) vs \(2, 3\)\)$"):
        cosine_rows(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"^max_abs: shapes differ \(\(2,\) vs \(3,\)\)$"):
        max_abs([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"^sqnr_db: shapes differ \(\(2,\) vs \(1, 2\)\)$"):
        sqnr_db([1.0, 2.0], [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"^scores \(3, 2\) do not match 2 queries x 2 documents$"):
        RunningTopK(2, 5).update(np.zeros((3, 2)), [0, 1])


def test_qrels_document_out_of_range_is_named():
    """A qrels index outside [0, n_docs) is refused, and the message names the first bad index, not a valid one next to it."""
    scores = np.zeros((2, 3))
    # index == n_docs is one past the end: it would otherwise alias document 0 of the next query
    with pytest.raises(ValueError, match=r"^qrels refer to document 3, but scores have 3 documents$"):
        ndcg_at_k(scores, [{3: 1.0}, {}], 2)
    with pytest.raises(ValueError, match=r"^qrels refer to document -1, but scores have 3 documents$"):
        recall_at_k(scores, [{-1: 1.0}, {}], 2)
    # valid documents 0 and 1 come first in the flattened qrels: the message still names 5
    with pytest.raises(ValueError, match=r"^qrels refer to document 5, but scores have 3 documents$"):
        mrr_at_k(scores, [{0: 1.0, 1: 2.0}, {5: 1.0}], 2)
    with pytest.raises(ValueError, match=r"^2 qrels for 1 queries$"):
        ranking_metrics(np.zeros((1, 3), dtype=np.int64), [{}, {}], 3, ks=(1,))


def test_ks_must_be_positive_and_one_k_is_enough():
    """ks are deduplicated and sorted; any k < 1 (wherever it sits) or no k at all is refused; a single k works."""
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    qrels = [{2: 1.0, 3: 1.0}]  # relevant at ranks 3 and 4
    with pytest.raises(ValueError, match=r"^ks must be positive, got \[0, 10\]$"):
        retrieval_metrics(scores, qrels, ks=(10, 0))
    with pytest.raises(ValueError, match=r"^ks must be positive, got \[-1, 2\]$"):
        ranking_metrics(rank_documents(scores), qrels, 5, ks=(2, -1))
    with pytest.raises(ValueError, match=r"^ks must be positive, got \[\]$"):
        retrieval_metrics(scores, qrels, ks=())
    # one k: ndcg, recall and mrr at that k
    out = retrieval_metrics(scores, qrels, ks=(3,))
    assert list(out) == ["ndcg@3", "recall@3", "mrr@3"]
    assert out["recall@3"] == pytest.approx(0.5)
    assert out["mrr@3"] == pytest.approx(1 / 3)
    # three ks, the largest finds more than the middle one: recall@4 sees ranks 3 and 4
    out = ranking_metrics(rank_documents(scores, 4), qrels, 5, ks=(4, 1, 2, 4))
    assert list(out) == ["ndcg@1", "recall@1", "recall@2", "recall@4", "mrr@1"]
    assert (out["recall@1"], out["recall@2"], out["recall@4"]) == (0.0, 0.0, 1.0)


# --------------------------------------------------------------------------- nan without warnings


def test_unjudged_queries_give_nan_without_runtime_warnings():
    """Unjudged queries are nan per query and left out of the means; nothing divides 0 by 0 on the way (no RuntimeWarning)."""
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]])
    qrels = [{0: 1.0}, {1: 0.0}]  # q1 is judged, but with relevance 0 only: unjudged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ndcg = ndcg_at_k(scores, qrels, 2)
        recall = recall_at_k(scores, qrels, 2)
        mrr = mrr_at_k(scores, qrels, 2)
        out = retrieval_metrics(scores, qrels, ks=(2,))
        none_judged = retrieval_metrics(scores, [{}, {2: 0.0}], ks=(1, 2))
    assert ndcg[0] == recall[0] == mrr[0] == 1.0
    assert math.isnan(ndcg[1]) and math.isnan(recall[1]) and math.isnan(mrr[1])
    assert out == {"ndcg@2": 1.0, "recall@2": 1.0, "mrr@2": 1.0}
    assert list(none_judged) == ["ndcg@1", "recall@1", "recall@2", "mrr@1"]
    assert all(math.isnan(v) for v in none_judged.values())


def test_topk_overlap_degenerate_shapes():
    """No queries or no documents: nan (nothing to compare), quietly; one document: always the same top-1, overlap 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(topk_overlap(np.zeros((0, 3)), np.zeros((0, 3))))
        assert math.isnan(topk_overlap(np.zeros((2, 0)), np.zeros((2, 0))))
    assert topk_overlap(np.array([[0.3], [0.1]]), np.array([[-5.0], [2.0]])) == 1.0
    assert topk_overlap(np.array([[0.3]]), np.array([[0.4]]), k=3) == 1.0


def test_topk_overlap_default_k_is_10():
    """The default is top-10: ref ranks 0..19 in order; test swaps d0 (1st) and d10 (11th), so the top-10s share 9 of 10 (top-11s would be equal)."""
    ref = -np.arange(20.0)[None, :]
    test = ref.copy()
    test[0, [0, 10]] = test[0, [10, 0]]
    assert topk_overlap(ref, test) == pytest.approx(0.9)
    assert topk_overlap(ref, test, k=11) == pytest.approx(1.0)


def test_pearson_edges():
    """nan for n < 2 and constant input (quietly); exactly +-1 for two points; never outside [-1, 1]; nan when sums overflow."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson([], []))
        assert math.isnan(pearson([1.0], [2.0]))
        assert math.isnan(pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
        assert math.isnan(pearson([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
        # two points are always perfectly (anti-)correlated; here the denominator is exactly 1
        assert pearson([0.0, 1.0], [0.0, 2.0]) == 1.0
        assert pearson([1.0, 2.0], [2.0, 1.0]) == -1.0
    # squares of 1e200 overflow to inf (numpy warns of that): the answer is unknown (nan), not a silent 0
    with np.errstate(over="ignore"):
        assert math.isnan(pearson([0.0, 1e200], [0.0, 1.0]))
    # b = 3a + 0.5 is perfectly linear, but rounding makes the raw ratio 1.0000000000000002: clipped
    a = np.array([0.1, -0.8, -0.4])
    b = a * 3 + 0.5
    assert pearson(a, b) == 1.0
    assert pearson(a, -b) == -1.0
    assert pearson(b, a) == 1.0


def test_pearson_and_spearman_of_float16_and_integer_input():
    """Inputs are converted to float64 first: float16 sums of squares (80,000) would overflow float16 to inf."""
    x16 = np.array([0.0, 200.0, 400.0], dtype=np.float16)
    y16 = np.array([0.0, 100.0, 400.0], dtype=np.float16)
    assert pearson(x16, x16) == 1.0
    assert pearson(x16, y16) == pytest.approx(pearson(x16.astype(np.float64), y16.astype(np.float64)), abs=1e-15)
    # dx = (-200, 0, 200), dy = (-500/3, -200/3, 700/3): dx.dy = dx.dx = 80000, dy.dy = 260000/3 -> r = sqrt(12/13)
    assert pearson(x16.astype(np.float64), y16) == pytest.approx(math.sqrt(12 / 13), abs=1e-12)
    assert spearman(np.array([3, 1, 2], dtype=np.int8), [30, 10, 20]) == 1.0


def test_spearman_nan_in_either_input_is_nan():
    """A NaN anywhere makes the rank correlation undefined: nan, whichever side it is on."""
    assert math.isnan(spearman([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [3.0, np.nan, 1.0]))
    assert math.isnan(spearman([np.nan, 2.0], [np.nan, 1.0]))


def test_average_ranks_match_scipy_rankdata():
    """Spearman's ranks are scipy's 'average' ranks (1..n, ties share the mean of the ranks they span).

    Spearman itself is unchanged by scaling or shifting all ranks, so the ranks are checked directly.
    """
    stats = pytest.importorskip("scipy.stats")
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 0.5, 1.0])
    # sorted: 0.5 (rank 1), 1, 1 (ranks 2, 3 -> 2.5), 2 (4), 3, 3, 3 (5, 6, 7 -> 6)
    assert metrics._average_ranks(x).tolist() == [6.0, 2.5, 6.0, 4.0, 6.0, 1.0, 2.5]
    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 40):
        x = rng.integers(0, 4, n).astype(float)
        np.testing.assert_array_equal(metrics._average_ranks(x), stats.rankdata(x, method="average"))


# --------------------------------------------------------------------------- cosine, max_abs, sqnr


def test_cosine_rows_zero_rows_without_warnings():
    """A zero row is 1.0 against an equal zero row, 0.0 otherwise, row by row, and computing it warns of nothing."""
    a = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0], [4.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cosine_rows(a, b)
    assert got.dtype == np.float64
    assert got.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.96])
    # the non-zero rows keep their cosine when some other row is zero
    assert cosine_rows([[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [2.0, 2.0]]).tolist() == pytest.approx([1.0, 1.0])


def test_cosine_rows_1d_and_3d():
    """Cosine is along the last axis whatever the rank: a 1-D pair gives a scalar, [2, 2, 3] gives [2, 2]."""
    assert float(cosine_rows([3.0, 4.0], [4.0, 3.0])) == pytest.approx(0.96)
    assert np.shape(cosine_rows([3.0, 4.0], [4.0, 3.0])) == ()
    assert float(cosine_rows([0.0, 0.0], [0.0, 0.0])) == 1.0
    assert float(cosine_rows([0.0, 0.0], [0.0, 1.0])) == 0.0
    a = np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]]])
    b = np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0], [2.0, 4.0, 4.0]]])
    got = cosine_rows(a, b)
    assert got.shape == (2, 2)
    assert got.ravel().tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0])


def test_cosine_rows_of_float16_and_int8():
    """Low-precision inputs are scored in float64: float16 300^2 + 300^2 would overflow float16, int8 100*100 would wrap."""
    a16 = np.array([[300.0, 300.0], [300.0, -300.0]], dtype=np.float16)
    got = cosine_rows(a16, a16)
    assert got.dtype == np.float64
    assert got.tolist() == [1.0, 1.0]
    assert cosine_rows(a16, a16.astype(np.float64)).tolist() == [1.0, 1.0]
    assert cosine_rows(a16.astype(np.float64), a16).tolist() == [1.0, 1.0]
    a8 = np.array([[100, 100]], dtype=np.int8)
    assert cosine_rows(a8, a8).tolist() == [1.0]


def test_max_abs_empty_and_sqnr_edges():
    """max_abs of empty inputs is 0.0; sqnr_db is +inf when equal, -inf when the reference is all zeros, finite otherwise."""
    assert max_abs([], []) == 0.0
    assert max_abs(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0
    a8 = np.array([100, -100], dtype=np.int8)
    assert max_abs(a8, -a8.astype(np.float64)) == 200.0
    assert sqnr_db([0.0, 0.0], [1.0, 0.0]) == -math.inf
    assert sqnr_db([0.0, 0.0], [0.0, 0.0]) == math.inf
    # ||ref||^2 = 1 exactly, noise 0.25: 10 log10(4)
    assert sqnr_db([1.0, 0.0], [0.5, 0.0]) == pytest.approx(10 * math.log10(4.0))


def test_sqnr_db_of_float16_and_int8_reference():
    """The reference's energy is summed in float64: float16 300^2 overflows float16, int8 100^2 wraps."""
    ref16 = np.array([300.0, 400.0], dtype=np.float16)
    # signal 90000 + 160000 = 250000, noise 1
    assert sqnr_db(ref16, np.array([300.0, 401.0])) == pytest.approx(10 * math.log10(250000.0))
    ref8 = np.array([100, 100], dtype=np.int8)
    # signal 20000, noise 1
    assert sqnr_db(ref8, np.array([100.0, 99.0])) == pytest.approx(10 * math.log10(20000.0))


# --------------------------------------------------------------------------- MaxSim


def _maxsim_reference(queries, docs):
    """ColBERT MaxSim the obvious way: per (query, document), per query token, the best dot product, summed (float64)."""
    out = np.zeros((len(queries), len(docs)))
    for i, q in enumerate(queries):
        for j, d in enumerate(docs):
            q64, d64 = np.asarray(q, dtype=np.float64), np.asarray(d, dtype=np.float64)
            out[i, j] = sum(max(float(t @ u) for u in d64) for t in q64)
    return out


@pytest.mark.parametrize("dtype", [np.int8, np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    "query_tokens, block_elements, batch_docs",
    [
        (1, 8, 64),  # one query per chunk, one-document blocks (fit < batch_docs)
        (5, 60, 256),  # several queries per chunk, blocks limited by the element budget, not by batch_docs
        (7, 1 << 24, 2),  # blocks of two documents of different lengths
        (4096, 40, 256),  # all queries in one chunk, whose 16 tokens leave room for one document per block
        (4096, 1 << 24, 256),  # the defaults: one chunk, one block
    ],
)
def test_maxsim_matches_reference_under_chunking(monkeypatch, dtype, query_tokens, block_elements, batch_docs):
    """Chunks of queries and length-sorted blocks of documents are only a memory plan: the scores are MaxSim's, float64.

    Small integers make every dtype's products exact, so the comparison is exact; int8 and float16
    (below the float32 working dtype) included.
    """
    monkeypatch.setattr(metrics, "MAXSIM_QUERY_TOKENS", query_tokens)
    monkeypatch.setattr(metrics, "MAXSIM_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(7)
    queries = [rng.integers(-3, 4, size=(int(n), 3)).astype(dtype) for n in (3, 1, 4, 2, 6)]
    docs = [rng.integers(-3, 4, size=(int(n), 3)).astype(dtype) for n in (5, 1, 3, 3, 8, 2, 1, 4)]
    docs.append(-np.ones((2, 3), dtype=dtype) * 2)  # all-negative products against non-negative query tokens
    for n_q in (1, 2, 3, len(queries)):  # every number of queries: the last chunk lands at different places
        got = maxsim_scores(queries[:n_q], docs, batch_docs=batch_docs)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, _maxsim_reference(queries[:n_q], docs))


def test_maxsim_works_in_the_inputs_precision_at_least_float32():
    """Products run in the inputs' float dtype, at least float32 (documented): float64 stays exact, float16 is widened, float32 stays float32.

    q = (1, 1), d = (1e8, 1): the exact score is 100000001, which float32 (spacing 8 at 1e8) rounds to 1e8;
    q = (1, 1), d = (2048, 1): 2049 is exact in float32, float16 (spacing 2 at 2048) would round it to 2048.
    """
    q, d = np.array([[1.0, 1.0]]), np.array([[1e8, 1.0]])
    assert maxsim_scores([q], [d])[0, 0] == 100000001.0
    assert maxsim_scores([q.astype(np.float32)], [d.astype(np.float32)])[0, 0] == 100000000.0
    q16, d16 = np.array([[1.0, 1.0]], dtype=np.float16), np.array([[2048.0, 1.0]], dtype=np.float16)
    got = maxsim_scores([q16], [d16])
    assert got.dtype == np.float64 and got[0, 0] == 2049.0
    # a float64 side makes the whole product float64
    assert maxsim_scores([q.astype(np.float32)], [d])[0, 0] == 100000001.0


# --------------------------------------------------------------------------- RunningTopK


def test_running_topk_lists_nan_ties_and_fewer_docs_than_k():
    """Lists work like arrays; several updates merge; NaN ranks last; ties go to the lower index; k > documents seen ranks them all."""
    topk = RunningTopK(2, 5)
    topk.update([[0.5, float("nan")], [1.0, 1.0]], [3, 0])
    topk.update([[0.5, 0.9], [1.0, float("nan")]], [1, 7])
    got = topk.ranking()
    assert got.dtype == np.int64
    assert got.tolist() == [[7, 1, 3, 0], [0, 1, 3, 7]]
    assert topk.documents == 4
    # the same order as rank_documents over the four documents seen (columns d0, d1, d3, d7)
    seen = np.array([0, 1, 3, 7])
    np.testing.assert_array_equal(seen[rank_documents(np.array([[np.nan, 0.5, 0.5, 0.9], [1.0, 1.0, 1.0, np.nan]]))], got)


def test_running_topk_empty_shard_and_uint64_indices():
    """An empty shard (no documents, indices []) changes nothing; uint64 document ids come back as int64 indices."""
    topk = RunningTopK(2, 3)
    topk.update(np.empty((2, 0)), [])
    assert topk.ranking().shape == (2, 0) and topk.ranking().dtype == np.int64
    topk.update(np.array([[0.1, 0.3, 0.2], [0.3, 0.2, 0.1]], dtype=np.float32), np.array([4, 5, 6], dtype=np.uint64))
    topk.update(np.empty((2, 0)), [])
    got = topk.ranking()
    assert got.dtype == np.int64
    assert got.tolist() == [[5, 6, 4], [4, 5, 6]]
    assert topk.documents == 3
