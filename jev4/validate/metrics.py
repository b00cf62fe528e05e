"""Retrieval and agreement metrics: numpy arrays in, floats (or per-query arrays) out.

Every function here is pure and vectorised over documents (and over queries
where the data allows). Scores are "higher is better".

Ranking (shared by every top-k metric)
    Documents are ranked per query by descending score with a *stable* sort,
    so equal scores are broken by the lower document index first; NaN scores
    rank after every number. A ranking is therefore a deterministic function
    of the score matrix, whatever numpy's sort implementation.

Relevance judgements (``qrels``)
    ``qrels[q]`` maps a document index (column of ``scores``) to a graded
    relevance. Only entries with relevance > 0 count as relevant (as in
    pytrec_eval / BEIR); a query with no such entry is *unjudged*: the
    per-query functions give it ``nan`` and :func:`retrieval_metrics` leaves
    it out of the means.

With ``rank`` counted from 1 and ``rel(d)`` the graded relevance of ``d``:

    DCG@k    = sum_{rank <= k} rel(doc at rank) / log2(rank + 1)
    nDCG@k   = DCG@k / IDCG@k, IDCG@k = DCG@k of the query's qrels sorted by relevance
    Recall@k = |relevant docs in the top k| / |relevant docs|
    MRR@k    = 1 / rank of the first relevant doc if that rank <= k, else 0

(gain = rel, the pytrec_eval ``ndcg_cut`` convention BEIR reports.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "cosine_rows",
    "max_abs",
    "maxsim_scores",
    "mrr_at_k",
    "ndcg_at_k",
    "pearson",
    "rank_documents",
    "ranking_metrics",
    "recall_at_k",
    "retrieval_metrics",
    "spearman",
    "sqnr_db",
    "topk_overlap",
]

# Largest similarity block maxsim_scores materialises at once (elements of the work dtype).
MAXSIM_BLOCK_ELEMENTS = 1 << 24
# Most query tokens scored against one document block at once.
MAXSIM_QUERY_TOKENS = 4096


# --------------------------------------------------------------------------- ranking


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [queries, documents], got shape {scores.shape}")
    return scores


def rank_documents(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Document indices per query, best first: [Q, min(k, D)] (all D when ``k`` is None).

    Descending score, stable: ties go to the lower document index; NaN ranks last.
    """
    scores = _check_scores(scores)
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # Negating turns "descending" into numpy's ascending order; NaN stays NaN and sorts last.
    # A stable sort keeps equal scores in index order.
    order = np.argsort(-scores.astype(np.float64, copy=False), axis=1, kind="stable")
    return order if k is None else order[:, :k]


def _flat_qrels(qrels: Sequence[dict[int, float]], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The relevant (relevance > 0) judgements as parallel arrays (query, doc, rel), sorted by query then doc."""
    n_queries, n_docs = shape
    if len(qrels) != n_queries:
        raise ValueError(f"{len(qrels)} qrels for {n_queries} queries")
    # Flattening the per-query dicts is the one unavoidable loop over queries.
    sizes = np.fromiter((len(q) for q in qrels), dtype=np.int64, count=n_queries)
    total = int(sizes.sum())
    q_idx = np.repeat(np.arange(n_queries, dtype=np.int64), sizes)
    d_idx = np.fromiter((d for q in qrels for d in q.keys()), dtype=np.int64, count=total)
    rel = np.fromiter((r for q in qrels for r in q.values()), dtype=np.float64, count=total)
    if total and (d_idx.min() < 0 or d_idx.max() >= n_docs):
        bad = int(d_idx[(d_idx < 0) | (d_idx >= n_docs)][0])
        raise ValueError(f"qrels refer to document {bad}, but scores have {n_docs} documents")
    keep = rel > 0
    q_idx, d_idx, rel = q_idx[keep], d_idx[keep], rel[keep]
    order = np.lexsort((d_idx, q_idx))
    return q_idx[order], d_idx[order], rel[order]


def _gains_at_k(top: np.ndarray, flat: tuple[np.ndarray, np.ndarray, np.ndarray], n_docs: int) -> np.ndarray:
    """Relevance of each ranked document: [Q, k] (0 where not relevant)."""
    q_idx, d_idx, rel = flat
    if len(q_idx) == 0:
        return np.zeros(top.shape)
    keys = q_idx * n_docs + d_idx  # sorted and unique: one key per (query, doc)
    wanted = np.arange(top.shape[0], dtype=np.int64)[:, None] * n_docs + top
    pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[pos] == wanted, rel[pos], 0.0)


def _relevant_counts(flat: tuple[np.ndarray, np.ndarray, np.ndarray], n_queries: int) -> np.ndarray:
    return np.bincount(flat[0], minlength=n_queries)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))  # rank 1..k -> 1/log2(rank+1)


def _ideal_dcg(flat: tuple[np.ndarray, np.ndarray, np.ndarray], n_queries: int, k: int) -> np.ndarray:
    """IDCG@k per query: the query's relevances sorted descending, discounted."""
    q_idx, _, rel = flat
    order = np.lexsort((-rel, q_idx))  # by query, then relevance descending
    q_sorted, rel_sorted = q_idx[order], rel[order]
    starts = np.searchsorted(q_sorted, np.arange(n_queries))
    position = np.arange(len(q_sorted)) - starts[q_sorted]  # 0-based rank within its query
    keep = position < k
    ideal = np.zeros((n_queries, k))
    ideal[q_sorted[keep], position[keep]] = rel_sorted[keep]
    return ideal @ _discounts(k)


def _per_query(scores: np.ndarray, qrels: Sequence[dict[int, float]], k: int):
    scores = _check_scores(scores)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = _flat_qrels(qrels, scores.shape)
    top = rank_documents(scores, k)
    gains = _gains_at_k(top, flat, scores.shape[1])
    counts = _relevant_counts(flat, scores.shape[0])
    return flat, gains, counts


def _ndcg(flat, gains: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    dcg = gains @ _discounts(gains.shape[1])
    idcg = _ideal_dcg(flat, len(counts), k)
    out = np.full(len(counts), np.nan)
    judged = counts > 0
    out[judged] = dcg[judged] / idcg[judged]
    return out


def _recall(gains: np.ndarray, counts: np.ndarray) -> np.ndarray:
    found = (gains > 0).sum(axis=1)
    out = np.full(len(counts), np.nan)
    judged = counts > 0
    out[judged] = found[judged] / counts[judged]
    return out


def _mrr(gains: np.ndarray, counts: np.ndarray) -> np.ndarray:
    relevant = gains > 0
    first = relevant.argmax(axis=1)  # 0-based rank of the first relevant doc (0 when there is none)
    out = np.where(relevant.any(axis=1), 1.0 / (first + 1), 0.0)
    return np.where(counts > 0, out, np.nan)


def ndcg_at_k(scores: np.ndarray, qrels: Sequence[dict[int, float]], k: int) -> np.ndarray:
    """nDCG@k per query ([Q], nan for queries without a relevant document); see the module docstring."""
    flat, gains, counts = _per_query(scores, qrels, k)
    return _ndcg(flat, gains, counts, k)


def recall_at_k(scores: np.ndarray, qrels: Sequence[dict[int, float]], k: int) -> np.ndarray:
    """Recall@k per query: fraction of the query's relevant documents ranked in the top k ([Q], nan if none)."""
    _, gains, counts = _per_query(scores, qrels, k)
    return _recall(gains, counts)


def mrr_at_k(scores: np.ndarray, qrels: Sequence[dict[int, float]], k: int) -> np.ndarray:
    """MRR@k per query: 1/rank of the first relevant document if within the top k, else 0 ([Q], nan if none)."""
    _, gains, counts = _per_query(scores, qrels, k)
    return _mrr(gains, counts)


def _mean_judged(values: np.ndarray) -> float:
    judged = ~np.isnan(values)
    return float(values[judged].mean()) if judged.any() else float("nan")


def retrieval_metrics(scores: np.ndarray, qrels: Sequence[dict[int, float]], ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """Means over the queries with at least one relevant document.

    Keys: ``ndcg@k`` and ``mrr@k`` for the smallest k, ``recall@k`` for every
    k, e.g. ``{"ndcg@10", "recall@10", "recall@100", "mrr@10"}``. A k larger
    than the number of documents ranks every document. If no query is judged,
    every value is nan.
    """
    ks = _check_ks(ks)
    scores = _check_scores(scores)
    return ranking_metrics(rank_documents(scores, ks[-1]), qrels, scores.shape[1], ks)  # one ranking serves every k


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    return ks


def ranking_metrics(top: np.ndarray, qrels: Sequence[dict[int, float]], n_docs: int, ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """:func:`retrieval_metrics` from a ranking already made: ``top`` [Q, >= min(max(ks), n_docs)] document indices, best first.

    For corpora too big for a [Q, D] score matrix: the ranking is kept as a
    running top-k over document chunks (``jev4.validate.streaming``), and the
    metrics are the same functions of it.
    """
    ks = _check_ks(ks)
    top = np.asarray(top, dtype=np.int64)
    if top.ndim != 2 or top.shape[1] < min(ks[-1], n_docs):
        raise ValueError(f"ranking of shape {top.shape} is too short for k={ks[-1]} over {n_docs} documents")
    flat = _flat_qrels(qrels, (top.shape[0], n_docs))
    gains = _gains_at_k(top[:, : ks[-1]], flat, n_docs)
    counts = _relevant_counts(flat, top.shape[0])
    small = ks[0]
    out = {f"ndcg@{small}": _mean_judged(_ndcg(flat, gains[:, :small], counts, small))}
    for k in ks:
        out[f"recall@{k}"] = _mean_judged(_recall(gains[:, :k], counts))
    out[f"mrr@{small}"] = _mean_judged(_mrr(gains[:, :small], counts))
    return out


def topk_overlap(reference_scores: np.ndarray, test_scores: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k(reference) ∩ top-k(test)| / k (k capped at the number of documents).

    Top-k sets use the module's stable ranking, so tied scores do not make the overlap random.
    """
    reference_scores, test_scores = _check_scores(reference_scores), _check_scores(test_scores)
    if reference_scores.shape != test_scores.shape:
        raise ValueError(f"score shapes differ: {reference_scores.shape} vs {test_scores.shape}")
    n_queries, n_docs = reference_scores.shape
    if n_queries == 0 or n_docs == 0:
        return float("nan")
    k = min(k, n_docs)
    in_ref = np.zeros((n_queries, n_docs), dtype=bool)
    in_test = np.zeros((n_queries, n_docs), dtype=bool)
    np.put_along_axis(in_ref, rank_documents(reference_scores, k), True, axis=1)
    np.put_along_axis(in_test, rank_documents(test_scores, k), True, axis=1)
    return float(((in_ref & in_test).sum(axis=1) / k).mean())


# --------------------------------------------------------------------------- late interaction


def _stack_tokens(name: str, items: Sequence[np.ndarray]) -> list[np.ndarray]:
    arrays = [np.asarray(x) for x in items]
    for i, x in enumerate(arrays):
        if x.ndim != 2:
            raise ValueError(f"{name} {i}: expected [tokens, dim], got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} {i} has no tokens")
    return arrays


def maxsim_scores(queries: Sequence[np.ndarray], docs: Sequence[np.ndarray], batch_docs: int = 256) -> np.ndarray:
    """Late-interaction (ColBERT MaxSim) scores: [Q, D], float64.

    score(q, d) = sum_{i in q's tokens} max_{j in d's tokens} <q_i, d_j>

    Documents are sorted by token count and packed, up to ``batch_docs`` at a
    time (fewer when a block would exceed ``MAXSIM_BLOCK_ELEMENTS``), into a
    zero-padded [B, Tmax, P] block with a mask; padded positions get -inf
    before the max, so they never win (even against all-negative dot
    products). All query tokens of a query chunk are scored against a block
    with one matrix product, and the per-token maxima are summed per query
    with ``np.add.reduceat``. Products run in the inputs' float dtype (at
    least float32); the sums are float64. Empty queries or documents raise
    ``ValueError``.
    """
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    q_arrays = _stack_tokens("query", queries)
    d_arrays = _stack_tokens("document", docs)
    n_q, n_d = len(q_arrays), len(d_arrays)
    out = np.zeros((n_q, n_d), dtype=np.float64)
    if n_q == 0 or n_d == 0:
        return out
    dims = {x.shape[1] for x in q_arrays} | {x.shape[1] for x in d_arrays}
    if len(dims) != 1:
        raise ValueError(f"token dims differ: {sorted(dims)}")
    (dim,) = dims
    work = np.result_type(*{x.dtype for x in q_arrays + d_arrays}, np.float32)
    if not np.issubdtype(work, np.floating):
        work = np.float64

    # Query side: chunks of whole queries, tokens concatenated (no padding needed there).
    q_lengths = np.array([len(x) for x in q_arrays])
    q_cum = np.cumsum(q_lengths)
    q_chunks: list[tuple[int, int]] = []
    start = 0
    while start < n_q:  # one step per chunk of queries, not per query
        before = int(q_cum[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(q_cum, before + MAXSIM_QUERY_TOKENS, side="right")))
        q_chunks.append((start, stop))
        start = stop
    q_tokens = [np.concatenate(q_arrays[a:b]).astype(work, copy=False) for a, b in q_chunks]
    q_offsets = [np.concatenate(([0], np.cumsum(q_lengths[a:b])[:-1])) for a, b in q_chunks]

    # Document side: length-sorted blocks, so each block's padding is small.
    d_lengths = np.array([len(x) for x in d_arrays])
    order = np.argsort(d_lengths, kind="stable")
    max_chunk_tokens = max(len(t) for t in q_tokens)
    position = 0
    while position < n_d:
        t_max = int(d_lengths[order[min(position + batch_docs, n_d) - 1]])
        fit = max(1, MAXSIM_BLOCK_ELEMENTS // max(1, max_chunk_tokens * t_max))
        members = order[position : position + min(batch_docs, fit)]
        position += len(members)
        t_max = int(d_lengths[members].max())
        block = np.zeros((len(members), t_max, dim), dtype=work)
        valid = np.arange(t_max)[None, :] < d_lengths[members][:, None]  # [B, Tmax]
        block[valid] = np.concatenate([d_arrays[i] for i in members]).astype(work, copy=False)
        pad = np.where(valid, 0.0, -np.inf).astype(work)  # added after the product: padding never wins
        flat_block = block.reshape(-1, dim).T  # [P, B*Tmax]
        for (a, b), tokens, offsets in zip(q_chunks, q_tokens, q_offsets):
            sims = (tokens @ flat_block).reshape(len(tokens), len(members), t_max) + pad[None]
            best = sims.max(axis=2).astype(np.float64)  # [tokens, B]
            out[a:b, members] = np.add.reduceat(best, offsets, axis=0)
    return out


# --------------------------------------------------------------------------- agreement


def _pair(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{what}: lengths differ ({a.size} vs {b.size})")
    return a, b


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the mean of the ranks they span (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    new_group = np.concatenate(([True], sorted_x[1:] != sorted_x[:-1]))
    group = np.cumsum(new_group) - 1  # group id per sorted position
    starts = np.flatnonzero(new_group)
    ends = np.concatenate((starts[1:], [len(x)]))  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = mean_rank[group]
    return ranks


def pearson(a, b) -> float:
    """Pearson correlation of two equally long vectors (flattened), float64; nan if either is constant or n < 2.

    r = sum((a - mean a)(b - mean b)) / sqrt(sum((a - mean a)^2) * sum((b - mean b)^2))
    """
    a, b = _pair(a, b, "pearson")
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    denom = np.sqrt((da @ da) * (db @ db))
    if denom == 0 or not np.isfinite(denom):
        return float("nan")
    return float(np.clip((da @ db) / denom, -1.0, 1.0))


def spearman(a, b) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties share their mean rank); nan as in :func:`pearson`."""
    a, b = _pair(a, b, "spearman")
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    return pearson(_average_ranks(a), _average_ranks(b))


def cosine_rows(a, b) -> np.ndarray:
    """Cosine similarity along the last axis, float64: shape ``a.shape[:-1]``.

    cos = <a, b> / (|a| |b|); a zero row gives 1.0 against an identical (zero)
    row and 0.0 against anything else.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine_rows: shapes differ ({a.shape} vs {b.shape})")
    dot = (a * b).sum(axis=-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / norms
    zero = norms == 0
    if np.any(zero):
        cos = np.where(zero, np.where((a == b).all(axis=-1), 1.0, 0.0), cos)
    return cos


def max_abs(a, b) -> float:
    """max |a - b| over all elements (float64); 0.0 for empty inputs."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"max_abs: shapes differ ({a.shape} vs {b.shape})")
    return float(np.abs(a - b).max()) if a.size else 0.0


def sqnr_db(reference, test) -> float:
    """Signal-to-quantisation-noise ratio in dB: 10 log10(||ref||^2 / ||ref - test||^2); inf when equal."""
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"sqnr_db: shapes differ ({reference.shape} vs {test.shape})")
    noise = float(np.sum((reference - test) ** 2))
    if noise == 0:
        return float("inf")
    signal = float(np.sum(reference**2))
    if signal == 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))
