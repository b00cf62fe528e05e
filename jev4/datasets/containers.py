"""What every data set is: queries, documents and relevance judgements (retrieval), or scored pairs (STS).

Shared by validation (``jev4 validate``), calibration (``jev4.quant``) and
training (``jev4 qat``), which is why it lives below all three.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from jev4.errors import Jev4Error


class DatasetError(Jev4Error):
    """A dataset is missing, malformed or inconsistent; the message names the file (and line)."""


@dataclass(frozen=True)
class RetrievalDataset:
    """Queries, documents and graded relevance judgements.

    ``qrels[q]`` maps a document index (into ``documents``) to a relevance > 0.
    ``documents`` holds texts (``doc_kind == "text"``) or PIL images (``"image"``).
    ``task`` is the jina task adapter the set is meant for.
    """

    name: str
    queries: list[str]
    documents: list
    doc_kind: str
    qrels: list[dict[int, float]]
    task: str = "retrieval"
    description: str = ""

    def __post_init__(self):
        if self.doc_kind not in ("text", "image"):
            raise DatasetError(f"{self.name}: doc_kind must be 'text' or 'image', got {self.doc_kind!r}")
        if len(self.qrels) != len(self.queries):
            raise DatasetError(f"{self.name}: {len(self.qrels)} qrels for {len(self.queries)} queries")
        for q, judged in enumerate(self.qrels):
            for d in judged:
                if not 0 <= d < len(self.documents):
                    raise DatasetError(f"{self.name}: query {q} judges document {d}, but there are {len(self.documents)} documents")

    def subset(self, max_queries: int | None, max_docs: int | None) -> RetrievalDataset:
        """A smaller set: at most ``max_queries`` queries, about ``max_docs`` documents.

        Queries are taken evenly spread over the set (indices ``floor(i * n / m)``),
        not the first m, so a subset covers the whole set. Every document
        relevant to a kept query is kept (so the document count can exceed
        ``max_docs`` only if the relevant documents alone do); the rest, up to
        ``max_docs``, are distractors taken evenly spread from the other
        documents. Documents keep their original relative order. ``None``
        means no limit. Deterministic: no randomness is involved.
        """
        for label, value in (("max_queries", max_queries), ("max_docs", max_docs)):
            if value is not None and value < 1:
                raise DatasetError(f"{self.name}: {label} must be >= 1, got {value}")
        n_q, n_d = len(self.queries), len(self.documents)
        if (max_queries is None or max_queries >= n_q) and (max_docs is None or max_docs >= n_d):
            return self
        keep_q = _spread(n_q, max_queries)
        relevant = sorted({d for q in keep_q for d in self.qrels[q]})
        keep_d = np.asarray(relevant, dtype=np.int64)
        room = (n_d if max_docs is None else max_docs) - len(relevant)
        if room > 0:
            others = np.setdiff1d(np.arange(n_d), keep_d, assume_unique=True)
            keep_d = np.union1d(keep_d, others[_spread(len(others), room)])
        new_index = {int(d): i for i, d in enumerate(keep_d)}
        return replace(
            self,
            queries=[self.queries[q] for q in keep_q],
            documents=[self.documents[d] for d in keep_d],
            qrels=[{new_index[d]: r for d, r in self.qrels[q].items()} for q in keep_q],
        )

    def checksum(self) -> str:
        """sha256 (hex) over a canonical serialisation of queries, documents and qrels.

        Queries and qrels are JSON (qrels as sorted ``[doc, float(rel)]`` pairs);
        each document follows as a tagged, length-prefixed record: UTF-8 for
        texts; for images, the mode, the size and the raw decoded pixel bytes
        (``Image.tobytes()``; not a PNG encoding, whose bytes depend on the
        zlib build, not on the pixels).
        """
        h = hashlib.sha256()
        head = {
            "doc_kind": self.doc_kind,
            "queries": self.queries,
            "qrels": [sorted([int(d), float(r)] for d, r in q.items()) for q in self.qrels],
        }
        _update(h, b"H", json.dumps(head, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode())
        for doc in self.documents:
            if isinstance(doc, Image.Image):
                _update(h, b"I", json.dumps([doc.mode, list(doc.size)]).encode())
                _update(h, b"P", doc.tobytes())
            else:
                _update(h, b"T", str(doc).encode("utf-8"))
        return h.hexdigest()


def _update(h, tag: bytes, payload: bytes) -> None:
    h.update(tag + len(payload).to_bytes(8, "little") + payload)


def _spread(n: int, m: int | None) -> np.ndarray:
    """m indices evenly spread over range(n) (all of them when m is None or >= n): floor(i * n / m)."""
    if m is None or m >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(m, dtype=np.int64) * n) // m


@dataclass(frozen=True)
class STSDataset:
    """Sentence pairs with gold similarity scores (for Spearman against cosine similarity)."""

    name: str
    pairs: list[tuple[str, str]]
    gold: list[float]
