"""Retrieval quality of the reference and the artifact on labelled data.

Each encoder embeds the queries (query prompt) and documents (passage
prompt, or images) once at full size; Matryoshka dims are derived by
truncating and re-normalising, exactly what ``truncate_dim`` does, so one
encoding pass serves every dim. Multi-vector scoring uses MaxSim.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from jev4.model.encoder import Encoder
from jev4.quant.embeddings import Calibration
from jev4.validate.codecs import CodecResult, multi_vector_codecs, single_vector_codecs
from jev4.datasets import RetrievalDataset, STSDataset
from jev4.validate.metrics import maxsim_scores, retrieval_metrics, spearman
from jev4.validate.results import RetrievalResult, STSResult

log = logging.getLogger(__name__)


@dataclass
class EncodedDataset:
    queries: np.ndarray
    documents: np.ndarray
    query_multi: list[np.ndarray] | None
    document_multi: list[np.ndarray] | None


def encode_dataset(encoder: Encoder, data: RetrievalDataset, task: str, multivector: bool, batch_size: int, max_length: int, progress: bool) -> EncodedDataset:
    common = dict(task=task, batch_size=batch_size, progress=progress)

    def docs(multi: bool):
        if data.doc_kind == "image":
            return encoder.encode_image(data.documents, return_multivector=multi, **common)
        return encoder.encode_text(data.documents, prompt_name="passage", max_length=max_length, return_multivector=multi, **common)

    queries = encoder.encode_text(data.queries, prompt_name="query", max_length=max_length, **common).numpy()
    documents = docs(False).numpy()
    query_multi = document_multi = None
    if multivector:
        query_multi = [m.numpy() for m in encoder.encode_text(data.queries, prompt_name="query", max_length=max_length, return_multivector=True, **common)]
        document_multi = [m.numpy() for m in docs(True)]
    return EncodedDataset(queries, documents, query_multi, document_multi)


def _truncate(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    if dim is None:
        return vectors
    return F.normalize(torch.from_numpy(vectors[:, :dim]).float(), dim=-1).numpy()


def score_dataset(encoded: EncodedDataset, data: RetrievalDataset, dims: list[int | None]) -> dict[tuple[str, int | None], dict[str, float]]:
    """Metrics per (scoring, dim): single-vector at every dim, MaxSim at full size."""
    out = {}
    for dim in dims:
        scores = _truncate(encoded.queries, dim) @ _truncate(encoded.documents, dim).T
        out[("single", dim)] = retrieval_metrics(scores, data.qrels)
    if encoded.query_multi is not None:
        out[("multi", None)] = retrieval_metrics(maxsim_scores(encoded.query_multi, encoded.document_multi), data.qrels)
    return out


def run_retrieval(
    reference: Encoder,
    artifact: Encoder,
    data: RetrievalDataset,
    task: str,
    multivector: bool = True,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = True,
) -> list[RetrievalResult]:
    """Reference and artifact metrics per scoring x dim."""
    return run_retrieval_and_codecs(reference, artifact, data, task, multivector, batch_size, max_length, progress)[0]


def run_retrieval_and_codecs(
    reference: Encoder,
    artifact: Encoder,
    data: RetrievalDataset,
    task: str,
    multivector: bool = True,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = True,
    codecs: Sequence[str] = (),
    codec_calibrations: dict[str, Calibration | None] | None = None,
) -> tuple[list[RetrievalResult], list[CodecResult]]:
    """``run_retrieval``, plus the artifact's embeddings through each of ``codecs`` (one encoding pass serves both).

    ``codec_calibrations`` ("single"/"multi") are the artifact's stored
    calibrations; without them the codecs calibrate on the documents.
    """
    matryoshka = sorted(reference.config.matryoshka_dims, reverse=True)
    dims: list[int | None] = [None, *matryoshka]
    log.info("%s: %d queries, %d %s documents", data.name, len(data.queries), len(data.documents), data.doc_kind)
    ref = score_dataset(encode_dataset(reference, data, task, multivector, batch_size, max_length, progress), data, dims)
    encoded = encode_dataset(artifact, data, task, multivector, batch_size, max_length, progress)
    art = score_dataset(encoded, data, dims)
    full = reference.config.hidden_size
    results = [
        RetrievalResult(
            dataset=data.name, scoring=scoring, dim=dim or full, reference=ref[(scoring, dim)], artifact=art[(scoring, dim)], queries=len(data.queries)
        )
        for scoring, dim in ref
    ]
    codec_results: list[CodecResult] = []
    if codecs:
        calibrations = codec_calibrations or {}
        codec_results += single_vector_codecs(data.name, encoded.queries, encoded.documents, data.qrels, codecs, [full, *matryoshka], calibrations.get("single"))
        if encoded.query_multi is not None:
            codec_results += multi_vector_codecs(data.name, encoded.query_multi, encoded.document_multi, data.qrels, codecs, calibrations.get("multi"))
    return results, codec_results


def run_sts(reference: Encoder, artifact: Encoder, data: STSDataset, task: str = "text-matching", batch_size: int = 8) -> STSResult:
    """Spearman of cosine similarity against gold scores, for both encoders."""
    left = [a for a, _ in data.pairs]
    right = [b for _, b in data.pairs]

    def correlation(encoder: Encoder) -> float:
        a = encoder.encode_text(left, task=task, batch_size=batch_size)
        b = encoder.encode_text(right, task=task, batch_size=batch_size)
        return spearman((a * b).sum(-1).numpy(), np.asarray(data.gold, dtype=float))

    return STSResult(dataset=data.name, reference_spearman=correlation(reference), artifact_spearman=correlation(artifact))
