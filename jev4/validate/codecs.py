"""Retrieval quality of quantized embeddings: each codec x Matryoshka dim against float32, with storage and search time.

The float32 embeddings of one encoder are encoded with each codec and searched
the way a serving system would search them (``jev4.quant.search``):

- float16, int8, int4 and ternary: float query against quantized documents
  (asymmetric scoring). The query stays float because it is computed per
  request and never stored.
- binary: sign-bit queries against sign-bit documents (Hamming distance).
- binary+rescore: binary candidates, ``rescore_multiplier`` x k of them,
  re-ranked by the float query against the ±1 documents. This is the flow of
  the HF embedding-quantization study, and costs no more storage than binary.
- binary+int8: binary candidates re-ranked by the float query against int8
  documents (stored beside the bits: 9 bits a dim), as sentence-transformers'
  rescoring search does with an int8 index.

Retention is the codec's metric divided by the float32 metric of the same
embeddings at the same dim, so it isolates what the codec costs. Range codecs
are calibrated per dim on the documents being searched, unless a calibration
is given (an artifact's ``output-codec.json``). Matryoshka dims are
calibrated on the truncated vectors, since re-normalisation changes their
range.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from jev4.errors import EmbeddingQuantError
from jev4.quant.embeddings import Calibration, EmbeddingCodec, bytes_per_vector, calibrate, truncate_normalize
from jev4.quant.search import Codes, maxsim, search, search_rescored
from jev4.validate.metrics import retrieval_metrics
from jev4.validate.results import CodecResult

log = logging.getLogger(__name__)

DEFAULT_CODECS = ("float16", "int8", "int4", "ternary", "binary", "binary+rescore", "binary+int8")
RESCORE = "+rescore"
INT8_RESCORE = "+int8"
NEEDS_RANGE = ("int8", "uint8", "int4", "ternary")
SEARCH_K = 100  # enough for Recall@100


def base_precision(codec: str) -> str:
    return codec.removesuffix(RESCORE).removesuffix(INT8_RESCORE)


def check_codec(name: str) -> str:
    """``name`` if it is a codec this module measures, else a clear error listing them."""
    from jev4.quant.embeddings import check_precision

    if is_two_stage(name) and base_precision(name) not in ("binary", "ubinary"):
        raise EmbeddingQuantError(f"codec {name!r}: rescoring applies to binary candidates only (binary+rescore, binary+int8)")
    check_precision(base_precision(name))
    return name


def is_two_stage(codec: str) -> bool:
    return codec.endswith((RESCORE, INT8_RESCORE))


def _codes(codec: EmbeddingCodec, x: np.ndarray) -> Codes:
    """Encode ``x`` and wrap the codes with the decode the search needs (scale/shift read off the codec)."""
    return Codes.from_decoder(codec.precision, codec.encode(x), codec.decode)


def _scores_from_topk(indices: np.ndarray, values: np.ndarray, n_docs: int) -> np.ndarray:
    """A dense [Q, N] score matrix that ranks the retrieved documents first, in their order, and the rest last."""
    dense = np.full((indices.shape[0], n_docs), -np.inf, dtype=np.float64)
    rank_scores = -np.arange(indices.shape[1], dtype=np.float64)[None, :].repeat(indices.shape[0], axis=0)
    np.put_along_axis(dense, indices, rank_scores, axis=1)
    return dense


def _timed(fn, n_queries: int):
    started = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - started) * 1000.0 / max(n_queries, 1)


def single_vector_codecs(
    dataset: str,
    queries: np.ndarray,
    documents: np.ndarray,
    qrels: Sequence[dict[int, float]],
    codecs: Sequence[str],
    dims: Sequence[int],
    calibration: Calibration | None = None,
    rescore_multiplier: int = 4,
) -> list[CodecResult]:
    """Every codec at every dim on one dataset's single vectors (already L2-normalised, full size)."""
    results = []
    k = min(SEARCH_K, len(documents))
    for dim in dims:
        q = truncate_normalize(queries, dim)
        d = truncate_normalize(documents, dim)
        float_metrics = retrieval_metrics(q @ d.T, qrels)
        for name in codecs:
            precision = base_precision(name)
            cal = None
            if precision in NEEDS_RANGE:
                cal = calibration.truncated(dim) if calibration is not None and calibration.precision == precision else calibrate(d, precision)
            codec = EmbeddingCodec(precision, cal)
            doc_codes = _codes(codec, d)
            stored = bytes_per_vector(precision, dim)
            if name.endswith(RESCORE):
                found, ms = _timed(lambda: search_rescored(q, doc_codes, doc_codes, k, rescore_multiplier=rescore_multiplier), len(q))
            elif name.endswith(INT8_RESCORE):
                int8_codes = _codes(EmbeddingCodec("int8", calibrate(d, "int8")), d)
                stored += bytes_per_vector("int8", dim)
                found, ms = _timed(lambda: search_rescored(q, doc_codes, int8_codes, k, rescore_multiplier=rescore_multiplier), len(q))
            elif precision in ("binary", "ubinary"):
                query_codes = _codes(codec, q)
                found, ms = _timed(lambda: search(query_codes, doc_codes, k), len(q))
            else:
                found, ms = _timed(lambda: search(q, doc_codes, k), len(q))
            metrics = retrieval_metrics(_scores_from_topk(found.indices, found.scores, len(d)), qrels)
            results.append(
                CodecResult(
                    dataset,
                    name,
                    "single",
                    dim,
                    metrics,
                    float_metrics,
                    stored,
                    ms,
                    queries=len(q),
                    notes={"calibration": "given" if calibration is not None and cal is not None and calibration.precision == precision else ("documents" if cal is not None else "none")},
                )
            )
    return results


def multi_vector_codecs(
    dataset: str,
    queries: Sequence[np.ndarray],
    documents: Sequence[np.ndarray],
    qrels: Sequence[dict[int, float]],
    codecs: Sequence[str],
    calibration: Calibration | None = None,
) -> list[CodecResult]:
    """MaxSim with float query tokens against quantized document tokens (rescoring does not apply)."""
    tokens = np.concatenate([np.asarray(t, dtype=np.float32) for t in documents])
    dim = int(tokens.shape[1])
    float_metrics = retrieval_metrics(maxsim([np.asarray(t, np.float32) for t in queries], [Codes("float32", np.asarray(t, np.float32), dim) for t in documents]), qrels)
    results = []
    mean_tokens = tokens.shape[0] / max(len(documents), 1)
    for name in codecs:
        if is_two_stage(name):
            continue
        precision = base_precision(name)
        cal = None
        if precision in NEEDS_RANGE:
            cal = calibration if calibration is not None and calibration.precision == precision else calibrate(tokens, precision)
        codec = EmbeddingCodec(precision, cal)
        doc_codes = [_codes(codec, np.asarray(t, np.float32)) for t in documents]
        scores, ms = _timed(lambda: maxsim([np.asarray(t, np.float32) for t in queries], doc_codes), len(queries))
        results.append(
            CodecResult(
                dataset,
                name,
                "multi",
                dim,
                retrieval_metrics(scores, qrels),
                float_metrics,
                int(round(bytes_per_vector(precision, dim) * mean_tokens)),
                ms,
                queries=len(queries),
                notes={"calibration": "given" if calibration is not None and cal is calibration else ("documents" if cal is not None else "none")},
            )
        )
    return results
