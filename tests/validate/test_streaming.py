"""Streamed ranking (RunningTopK) and metrics from a ranking equal the in-memory ones on the same scores."""

import numpy as np
import pytest

from jev4.validate.metrics import rank_documents, ranking_metrics, retrieval_metrics
from jev4.validate.streaming import RunningTopK


def _scores(rng, q=6, d=400):
    scores = rng.standard_normal((q, d)).round(1)  # rounded: many exact ties, which must break to the lower index
    scores[0, 5] = np.nan
    scores[1, :50] = np.nan
    return scores


@pytest.mark.parametrize("chunks", [1, 3, 17])
@pytest.mark.parametrize("shuffled", [False, True])
def test_running_topk_is_rank_documents(chunks, shuffled):
    rng = np.random.default_rng(chunks)
    scores = _scores(rng)
    order = rng.permutation(scores.shape[1]) if shuffled else np.arange(scores.shape[1])
    topk = RunningTopK(scores.shape[0], 25)
    for part in np.array_split(order, chunks):
        topk.update(scores[:, part], part)
    assert topk.documents == scores.shape[1]
    np.testing.assert_array_equal(topk.ranking(), rank_documents(scores, 25))


def test_fewer_documents_than_k_and_bad_shapes():
    topk = RunningTopK(2, 10)
    topk.update(np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.2]]), np.array([7, 8, 9]))
    np.testing.assert_array_equal(topk.ranking(), [[8, 9, 7], [7, 8, 9]])
    with pytest.raises(ValueError, match="do not match"):
        topk.update(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="k must be"):
        RunningTopK(2, 0)


def test_ranking_metrics_equal_retrieval_metrics():
    rng = np.random.default_rng(1)
    scores = _scores(rng)
    qrels = [{int(d): float(rng.integers(1, 3)) for d in rng.choice(400, size=4, replace=False)} for _ in range(6)]
    qrels[2] = {}  # unjudged: left out of the means
    expected = retrieval_metrics(scores, qrels, ks=(10, 100))
    topk = RunningTopK(6, 100)
    for part in np.array_split(np.arange(400), 5):
        topk.update(scores[:, part], part)
    got = ranking_metrics(topk.ranking(), qrels, 400, ks=(10, 100))
    assert got == expected and set(got) == {"ndcg@10", "recall@10", "recall@100", "mrr@10"}
    with pytest.raises(ValueError, match="too short"):
        ranking_metrics(topk.ranking()[:, :50], qrels, 400, ks=(10, 100))


def test_k_of_one_keeps_the_single_best_and_integer_scores_rank_like_floats():
    """k = 1 is allowed (only k < 1 is refused, with the value named); int32 scores (Hamming similarities) rank as floats do."""
    topk = RunningTopK(2, 1)
    topk.update(np.array([[3, 7], [5, 5]], dtype=np.int32), np.array([10, 11]))
    topk.update(np.array([[7, 1], [6, 0]], dtype=np.int32), np.array([4, 12]))
    np.testing.assert_array_equal(topk.ranking(), [[4], [4]])  # ties (7 vs 7) go to the lower document index
    assert topk.ranking().dtype == np.int64 and topk.documents == 4
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
        RunningTopK(2, 0)


def test_three_cutoffs_and_the_short_ranking_error():
    """With more than two ks every recall@k is computed at its own k (the largest k decides the ranking's length)."""
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    qrels = [{1: 1.0, 4: 1.0}, {0: 1.0}]
    ks = (1, 2, 4)
    top = rank_documents(scores, 4)
    got = ranking_metrics(top, qrels, 5, ks)
    # q0 ranks 0,1,2,3(,4): relevant 1 at rank 2, 4 at rank 5; q1 ranks 4,3,2,1,0: relevant 0 at rank 5
    assert got == pytest.approx({"ndcg@1": 0.0, "recall@1": 0.0, "recall@2": 0.25, "recall@4": 0.25, "mrr@1": 0.0})
    assert got == pytest.approx(retrieval_metrics(scores, qrels, ks))
    with pytest.raises(ValueError, match=r"^ranking of shape \(2, 3\) is too short for k=4 over 5 documents$"):
        ranking_metrics(top[:, :3], qrels, 5, ks)


def test_rank_documents_names_a_bad_k():
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
        rank_documents(np.zeros((1, 3)), 0)
