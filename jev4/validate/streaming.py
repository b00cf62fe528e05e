"""Retrieval metrics over corpora too big for a [queries, documents] score matrix.

``jev4 validate --ray`` encodes a corpus into Parquet shards (``jev4.encode``);
a million documents x 2048 dims is 8 GB of float32, and the score matrix of
1,000 queries over them another 8 GB. So the ranking is built shard by shard:
:class:`RunningTopK` keeps, per query, the best ``k`` (score, document index)
pairs seen so far, with the same order as
:func:`jev4.validate.metrics.rank_documents` (descending score, ties to the
lower index, NaN last). The metrics are then
:func:`jev4.validate.metrics.ranking_metrics` of that ranking, so a streamed
validation gives the numbers the in-memory one gives on the same vectors.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RunningTopK"]


class RunningTopK:
    """Per-query top-``k`` document indices over score chunks fed in any order of document ranges."""

    def __init__(self, n_queries: int, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.scores = np.empty((n_queries, 0), dtype=np.float64)
        self.indices = np.empty((n_queries, 0), dtype=np.int64)
        self.documents = 0

    def update(self, scores: np.ndarray, doc_indices: np.ndarray) -> None:
        """Merge ``scores`` [Q, c] of the documents ``doc_indices`` [c] (global indices) into the running top-k."""
        scores = np.asarray(scores, dtype=np.float64)
        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != self.scores.shape[0] or scores.shape[1] != len(doc_indices):
            raise ValueError(f"scores {scores.shape} do not match {self.scores.shape[0]} queries x {len(doc_indices)} documents")
        self.documents += len(doc_indices)
        merged_scores = np.concatenate([self.scores, scores], axis=1)
        merged_indices = np.concatenate([self.indices, np.broadcast_to(doc_indices, scores.shape)], axis=1)
        # Sort keys, last one primary: NaN last, then descending score, then ascending index (rank_documents' order).
        order = np.lexsort((merged_indices, -np.nan_to_num(merged_scores, nan=0.0), np.isnan(merged_scores)), axis=1)[:, : self.k]
        self.scores = np.take_along_axis(merged_scores, order, axis=1)
        self.indices = np.take_along_axis(merged_indices, order, axis=1)

    def ranking(self) -> np.ndarray:
        """[Q, min(k, documents seen)] document indices, best first."""
        return self.indices.copy()
