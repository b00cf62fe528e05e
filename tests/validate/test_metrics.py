"""jev4.validate.metrics: hand-computed values on small cases, plus brute-force cross-checks."""

import math

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
    recall_at_k,
    retrieval_metrics,
    spearman,
    sqnr_db,
    topk_overlap,
)

# One query, five documents. Ranking by score: d1 (0.9), d3 (0.7), d2 (0.5), d4 (0.3), d0 (0.1).
GRADED_SCORES = np.array([[0.1, 0.9, 0.5, 0.7, 0.3]])
GRADED_QRELS = [{0: 3.0, 2: 1.0, 3: 2.0}]


def test_ndcg_graded_by_hand():
    # top 3 = d1 (rel 0), d3 (rel 2), d2 (rel 1)
    # DCG@3  = 0/log2(2) + 2/log2(3) + 1/log2(4) = 1.2618595 + 0.5 = 1.7618595
    # IDCG@3 = 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.2618595 + 0.5 = 4.7618595
    # nDCG@3 = 1.7618595 / 4.7618595 = 0.3699940
    expected = (2 / math.log2(3) + 1 / 2) / (3 + 2 / math.log2(3) + 1 / 2)
    assert expected == pytest.approx(0.3699940, abs=1e-7)
    assert ndcg_at_k(GRADED_SCORES, GRADED_QRELS, 3) == pytest.approx([expected])
    # nDCG@1: top 1 = d1 (rel 0) -> 0
    assert ndcg_at_k(GRADED_SCORES, GRADED_QRELS, 1) == pytest.approx([0.0])
    # nDCG@5: DCG adds d4 (0) and d0 (3 / log2(6) = 1.1605584); IDCG@5 = IDCG@3 (only 3 relevant docs)
    expected5 = (2 / math.log2(3) + 1 / 2 + 3 / math.log2(6)) / (3 + 2 / math.log2(3) + 1 / 2)
    assert ndcg_at_k(GRADED_SCORES, GRADED_QRELS, 5) == pytest.approx([expected5])
    assert expected5 == pytest.approx(0.6137136, abs=1e-7)  # 2.9224179 / 4.7618595


def test_recall_and_mrr_known_ranks():
    # relevant d0, d2, d3 sit at ranks 5, 3, 2
    assert recall_at_k(GRADED_SCORES, GRADED_QRELS, 1) == pytest.approx([0.0])  # none in top 1
    assert recall_at_k(GRADED_SCORES, GRADED_QRELS, 2) == pytest.approx([1 / 3])  # d3
    assert recall_at_k(GRADED_SCORES, GRADED_QRELS, 3) == pytest.approx([2 / 3])  # d3, d2
    assert recall_at_k(GRADED_SCORES, GRADED_QRELS, 10) == pytest.approx([1.0])  # k > D ranks everything
    assert mrr_at_k(GRADED_SCORES, GRADED_QRELS, 1) == pytest.approx([0.0])  # first relevant at rank 2 > 1
    assert mrr_at_k(GRADED_SCORES, GRADED_QRELS, 2) == pytest.approx([0.5])  # 1/2


def test_zero_relevance_is_not_relevant():
    # d1 is judged with relevance 0: it does not count (pytrec_eval / BEIR convention)
    qrels = [{1: 0.0, 3: 1.0}]
    assert recall_at_k(GRADED_SCORES, qrels, 1) == pytest.approx([0.0])
    assert mrr_at_k(GRADED_SCORES, qrels, 10) == pytest.approx([0.5])  # d3 at rank 2


def test_query_without_relevant_docs_is_excluded():
    scores = np.array([[0.9, 0.1, 0.2], [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    qrels = [{0: 1.0}, {}, {1: 0.0, 0: 1.0}]  # q1 has no relevant doc; q2 has d0 (rank 3; d1 has rel 0)
    assert np.isnan(ndcg_at_k(scores, qrels, 10)[1])
    assert np.isnan(recall_at_k(scores, qrels, 10)[1])
    assert np.isnan(mrr_at_k(scores, qrels, 10)[1])
    out = retrieval_metrics(scores, qrels, ks=(1, 3))
    assert list(out) == ["ndcg@1", "recall@1", "recall@3", "mrr@1"]
    # q0: d0 at rank 1 -> ndcg@1 = recall@1 = mrr@1 = 1; q2: d0 at rank 3 -> 0 at k=1, recall@3 = 1
    # means over q0 and q2 only (q1 excluded): (1 + 0) / 2
    assert out["ndcg@1"] == pytest.approx(0.5)
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["mrr@1"] == pytest.approx(0.5)
    assert all(math.isnan(v) for v in retrieval_metrics(scores, [{}, {}, {}]).values())


def test_retrieval_metrics_default_keys():
    scores = np.array([[0.2, 0.8, 0.5]])
    out = retrieval_metrics(scores, [{2: 1.0}])
    assert list(out) == ["ndcg@10", "recall@10", "recall@100", "mrr@10"]
    # d2 at rank 2: ndcg = (1/log2(3)) / 1 = 0.6309298, recall = 1, mrr = 1/2
    assert out["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert out["recall@10"] == out["recall@100"] == pytest.approx(1.0)
    assert out["mrr@10"] == pytest.approx(0.5)


def test_ties_broken_by_lower_index():
    scores = np.array([[0.5, 0.5, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]])
    assert rank_documents(scores).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    qrels = [{2: 1.0}, {3: 1.0}]
    # q0: d2 ranks 3rd behind the equal-scored d0, d1 -> mrr 1/3; q1: d3 ranks last (4th) -> 1/4
    assert mrr_at_k(scores, qrels, 10) == pytest.approx([1 / 3, 1 / 4])
    assert recall_at_k(scores, qrels, 2) == pytest.approx([0.0, 0.0])
    # the same scores, the same answer, every time (and the same with columns of -0.0 and 0.0)
    assert rank_documents(np.array([[0.0, -0.0, 0.0]])).tolist() == [[0, 1, 2]]


def test_nan_scores_rank_last():
    assert rank_documents(np.array([[np.nan, 0.1, 0.3]])).tolist() == [[2, 1, 0]]


def test_bad_qrels_raise():
    with pytest.raises(ValueError, match="document 7"):
        ndcg_at_k(np.zeros((1, 3)), [{7: 1.0}], 10)
    with pytest.raises(ValueError, match="qrels"):
        ndcg_at_k(np.zeros((2, 3)), [{0: 1.0}], 10)


def _brute_force(scores, qrels, k):
    out = []
    for q, judged in enumerate(qrels):
        rel = {d: r for d, r in judged.items() if r > 0}
        ranking = sorted(range(scores.shape[1]), key=lambda d: (-scores[q, d], d))[:k]
        if not rel:
            out.append((math.nan,) * 3)
            continue
        dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking))
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(rel.values(), reverse=True)[:k]))
        mrr = next((1 / (i + 1) for i, d in enumerate(ranking) if d in rel), 0.0)
        out.append((dcg / idcg, sum(d in rel for d in ranking) / len(rel), mrr))
    return np.array(out).reshape(-1, 3)


def test_against_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_q, n_d, k = int(rng.integers(1, 6)), int(rng.integers(1, 25)), int(rng.integers(1, 30))
        scores = rng.integers(0, 4, size=(n_q, n_d)).astype(float)  # many ties
        qrels = [{int(d): float(rng.integers(0, 4)) for d in rng.choice(n_d, size=int(rng.integers(0, n_d + 1)), replace=False)} for _ in range(n_q)]
        got = np.stack([ndcg_at_k(scores, qrels, k), recall_at_k(scores, qrels, k), mrr_at_k(scores, qrels, k)], axis=1)
        np.testing.assert_allclose(got, _brute_force(scores, qrels, k), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- MaxSim


def test_maxsim_by_hand():
    queries = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0]])]
    docs = [
        np.array([[1.0, 0.0]]),
        np.array([[0.0, 2.0], [1.0, 1.0]]),
        np.array([[-1.0, 0.0], [0.0, -1.0], [0.5, 0.5]]),
    ]
    # q0 tokens (1,0), (0,1):
    #   d0: max{1} + max{0}             = 1 + 0     = 1
    #   d1: max{0, 1} + max{2, 1}       = 1 + 2     = 3
    #   d2: max{-1, 0, .5} + max{0, -1, .5} = .5 + .5 = 1
    # q1 token (1,1):
    #   d0: max{1} = 1;  d1: max{2, 2} = 2;  d2: max{-1, -1, 1} = 1
    expected = [[1.0, 3.0, 1.0], [1.0, 2.0, 1.0]]
    for batch_docs in (1, 2, 256):
        got = maxsim_scores(queries, docs, batch_docs=batch_docs)
        assert got.dtype == np.float64
        assert got == pytest.approx(np.array(expected))


def test_maxsim_padding_never_wins():
    # Every dot product is negative, and the documents have different lengths, so a zero-padded
    # token (dot product 0) would win if it were not masked.
    queries = [np.array([[1.0, 0.0], [1.0, 0.0]])]
    docs = [np.array([[-1.0, 0.0]]), np.array([[-2.0, 0.0], [-3.0, 0.0], [-1.5, 0.0]])]
    # q . d0 = -1 per query token -> -2;  q . d1: max{-2, -3, -1.5} = -1.5 per token -> -3
    assert maxsim_scores(queries, docs, batch_docs=2) == pytest.approx(np.array([[-2.0, -3.0]]))


def test_maxsim_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(1)
    queries = [rng.normal(size=(int(rng.integers(1, 9)), 8)).astype(np.float32) for _ in range(7)]
    docs = [rng.normal(size=(int(rng.integers(1, 30)), 8)).astype(np.float32) for _ in range(23)]
    expected = np.array([[(q.astype(np.float64) @ d.T.astype(np.float64)).max(axis=1).sum() for d in docs] for q in queries])
    np.testing.assert_allclose(maxsim_scores(queries, docs), expected, rtol=1e-5, atol=1e-5)
    # tiny limits force many query chunks and one-document blocks: same answer
    monkeypatch.setattr(metrics, "MAXSIM_QUERY_TOKENS", 5)
    monkeypatch.setattr(metrics, "MAXSIM_BLOCK_ELEMENTS", 50)
    np.testing.assert_allclose(maxsim_scores(queries, docs, batch_docs=3), expected, rtol=1e-5, atol=1e-5)


def test_maxsim_rejects_bad_input():
    with pytest.raises(ValueError, match="no tokens"):
        maxsim_scores([np.ones((1, 2))], [np.ones((0, 2))])
    with pytest.raises(ValueError, match="dims differ"):
        maxsim_scores([np.ones((1, 2))], [np.ones((1, 3))])
    assert maxsim_scores([], [np.ones((1, 2))]).shape == (0, 1)
    # the exact messages: which side, which item, which dims (queries that disagree among themselves count too)
    with pytest.raises(ValueError, match=r"^query 1 has no tokens$"):
        maxsim_scores([np.ones((1, 2)), np.ones((0, 2))], [np.ones((1, 2))])
    with pytest.raises(ValueError, match=r"^document 0 has no tokens$"):
        maxsim_scores([np.ones((1, 2))], [np.ones((0, 2))])
    with pytest.raises(ValueError, match=r"^token dims differ: \[2, 3\]$"):
        maxsim_scores([np.ones((1, 2)), np.ones((1, 3))], [np.ones((1, 2))])
    with pytest.raises(ValueError, match=r"^batch_docs must be >= 1, got 0$"):
        maxsim_scores([np.ones((1, 2))], [np.ones((1, 2))], batch_docs=0)


# --------------------------------------------------------------------------- agreement


def test_spearman_with_ties_by_hand():
    a, b = [1, 2, 2, 3], [1, 3, 2, 4]
    # average ranks: a -> [1, 2.5, 2.5, 4], b -> [1, 3, 2, 4]; both have mean 2.5
    # deviations: a -> [-1.5, 0, 0, 1.5], b -> [-1.5, .5, -.5, 1.5]
    # sum(da*db) = 2.25 + 2.25 = 4.5; sum(da^2) = 4.5; sum(db^2) = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9) = 0.9486833
    assert spearman(a, b) == pytest.approx(math.sqrt(0.9))
    assert spearman(a, b) == pytest.approx(0.9486833, abs=1e-7)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant input


def test_spearman_matches_scipy_if_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, b = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)


def test_pearson_by_hand():
    # a = [1, 2, 3] (mean 2), b = [2, 4, 7] (mean 13/3)
    # da = [-1, 0, 1], db = [-7/3, -1/3, 8/3]; sum(da*db) = 7/3 + 8/3 = 5
    # sum(da^2) = 2, sum(db^2) = (49 + 1 + 64) / 9 = 114/9; r = 5 / sqrt(228/9) = 15 / sqrt(228) = 0.9933993
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933993, abs=1e-7)
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_cosine_rows_max_abs_sqnr():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]], dtype=np.float32)
    b = np.array([[0.0, 1.0], [2.0, 2.0], [4.0, 3.0]], dtype=np.float32)
    # orthogonal -> 0; parallel -> 1; (3*4 + 4*3) / (5*5) = 24/25 = 0.96
    got = cosine_rows(a, b)
    assert got.dtype == np.float64
    assert got.tolist() == pytest.approx([0.0, 1.0, 0.96])
    assert cosine_rows(np.zeros((1, 2)), np.zeros((1, 2))).tolist() == [1.0]
    assert cosine_rows(np.zeros((1, 2)), np.ones((1, 2))).tolist() == [0.0]
    assert max_abs([1.0, 2.0, 3.0], [1.0, 2.5, 2.0]) == pytest.approx(1.0)  # |3 - 2|
    # ||ref||^2 = 9 + 16 = 25, ||ref - test||^2 = 0.5^2 = 0.25 -> 10 log10(100) = 20 dB
    assert sqnr_db([3.0, 4.0], [3.0, 4.5]) == pytest.approx(20.0)
    assert sqnr_db([3.0, 4.0], [3.0, 4.0]) == math.inf


def test_topk_overlap_by_hand():
    ref = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    test = np.array([[1.0, 3.0, 4.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    # q0: top2(ref) = {d0, d1}, top2(test) = {d2, d1} -> 1/2; q1: identical -> 1; mean = 0.75
    assert topk_overlap(ref, test, k=2) == pytest.approx(0.75)
    assert topk_overlap(ref, test, k=10) == pytest.approx(1.0)  # k capped at 4 documents: every doc
    # ties: all-equal scores pick d0, d1 on both sides
    assert topk_overlap(np.zeros((1, 4)), np.array([[0.0, 0.0, -1.0, -1.0]]), k=2) == pytest.approx(1.0)
