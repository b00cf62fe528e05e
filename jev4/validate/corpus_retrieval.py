"""``jev4 validate --ray``: retrieval measured from corpus encodes, scored shard by shard.

The in-memory path (``jev4.validate.retrieval``) holds every document vector
of both encoders and a [queries, documents] score matrix: 8 GB per encoder
and as much again for the scores at a million 2048-d documents, and one
process does all the encoding. Here each dataset goes through the corpus
encoder instead (``jev4.encode``), on a Ray cluster:

1. The dataset's documents and queries are written as corpus JSONL (ids are
   their indices) under the embeddings directory.
2. ``encode_corpus`` encodes them with the reference (torch, fp32, unmerged
   adapters, as the in-memory path loads it) and with the artifact:
   documents with the passage prompt, queries with the query prompt, single
   vectors and (unless off) multi-vectors. Each is its own resumable job, so
   a killed validation re-run with the same ``--embeddings`` encodes only
   the shards that are missing.
3. The document shards are read back one at a time. Per Matryoshka dim a
   :class:`RunningTopK` keeps each query's best documents by ``q . d``; for
   multi-vectors another keeps the best by MaxSim. Queries are few and held
   whole. The metrics are ``ranking_metrics`` of those rankings, the same
   numbers the in-memory path gives on the same vectors (tested).
4. Output codecs (the artifact's vectors): calibrated on a sample of the
   first document vectors read from the Parquet shards, unless the artifact
   stores its calibration; each shard is encoded and scored as a serving
   system would score it (``jev4.quant.search``), and merged by
   ``RunningTopK``. Two-stage codecs (``binary+rescore``, ``binary+int8``)
   re-rank the global binary candidates with their float vectors, a second
   pass over the corpus that is not built: they are refused with ``--ray``.

Image datasets are refused: a corpus is text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jev4.datasets import RetrievalDataset
from jev4.datasets.containers import DatasetError
from jev4.errors import SettingsError
from jev4.quant.embeddings import Calibration, EmbeddingCodec, bytes_per_vector, calibrate, truncate_normalize
from jev4.quant.search import Codes, maxsim, scores
from jev4.validate.codecs import NEEDS_RANGE, SEARCH_K, base_precision, is_two_stage
from jev4.validate.metrics import maxsim_scores, ranking_metrics
from jev4.validate.results import CodecResult, RetrievalResult
from jev4.validate.streaming import RunningTopK

log = logging.getLogger(__name__)

CALIBRATION_SAMPLE = 100_000  # document vectors read for a codec's range (the in-memory path uses all documents)
CALIBRATION_TOKENS = 500_000  # document tokens read for a multi-vector codec's range
ROLES = ("reference", "artifact")


@dataclass(frozen=True)
class CorpusValidation:
    """How the corpora are encoded: where, on which cluster, with what."""

    reference: str
    artifact: str
    task: str
    embeddings: Path  # the corpora and their encodes, one folder per dataset
    ray: str = "auto"
    workers: int | None = None
    gpus_per_worker: float = 0.0
    provider: str = "cpu"  # the artifact's onnxruntime provider
    threads: int | None = None
    max_length: int = 512
    batch_size: int = 8
    shard_size: int | None = None
    multivector: bool = True
    calibration_sample: int = CALIBRATION_SAMPLE
    calibration_tokens: int = CALIBRATION_TOKENS
    progress: bool = True

    @property
    def device(self) -> str:
        """Torch models run on the GPU a worker reserves, else on the CPU."""
        return "cuda" if self.gpus_per_worker else "cpu"


def check_codecs_for_corpus(codecs: Sequence[str]) -> None:
    two_stage = [c for c in codecs if is_two_stage(c)]
    if two_stage:
        raise SettingsError(
            f"--codecs {','.join(two_stage)}: two-stage codecs re-rank the global binary candidates by their float vectors, "
            "which --ray does not do; measure them without --ray (on a --max-docs subset), or leave them out"
        )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "dataset"


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.digest()


def _write_corpus(path: Path, texts: Sequence[str]) -> Path:
    """``texts`` as corpus JSONL with ids ``"0"``, ``"1"``..., streamed (no second copy of the corpus in memory).

    A file that already holds exactly these records is kept as it is: a
    resumed encode checks the corpus by its checksum, and by its path.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for i, text in enumerate(texts):
                try:
                    text.encode()
                except UnicodeEncodeError as exc:
                    raise DatasetError(f"{path.stem} #{i}: holds a lone surrogate at position {exc.start}, which a corpus (UTF-8) cannot store") from None
                line = (json.dumps({"id": str(i), "text": text}, ensure_ascii=False) + "\n").encode()
                digest.update(line)
                f.write(line)
        if path.is_file() and _file_digest(path) == digest.digest():
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class EncodedCorpus:
    """The encodes of one dataset by one model: OUT dirs of ``jev4 encode --corpus``."""

    queries: Path
    documents: Path
    query_multi: Path | None
    document_multi: Path | None


def encode_dataset_on_ray(run: CorpusValidation, data: RetrievalDataset, folder: Path) -> dict[str, EncodedCorpus]:
    """Both models' encodes of ``data`` (resumed where a previous run with the same folder stopped)."""
    from jev4.encode import CorpusEncodeSettings, encode_corpus

    if data.doc_kind != "text":
        raise SettingsError(f"--dataset {data.name}: its documents are {data.doc_kind}s; --ray encodes text corpora only")
    documents = _write_corpus(folder / "documents.jsonl", data.documents)
    queries = _write_corpus(folder / "queries.jsonl", data.queries)
    encoded = {}
    for role, model in (("reference", run.reference), ("artifact", run.artifact)):
        extra = {"provider": run.provider, "threads": run.threads} if role == "artifact" else {}

        def encode(corpus: Path, prompt: str, multivector: bool) -> Path:
            name = f"{corpus.stem}-{'multi' if multivector else 'single'}"
            log.info("%s: %s encodes %s on Ray", data.name, role, name)
            settings = CorpusEncodeSettings(
                model=model,
                corpus=str(corpus),
                out=str(folder / role / name),
                task=run.task,
                prompt=prompt,
                multivector=multivector,
                max_length=run.max_length,
                shard_size=run.shard_size,
                batch_size=run.batch_size,
                device=run.device,
                ray=run.ray,
                workers=run.workers,
                gpus_per_worker=run.gpus_per_worker,
                progress=run.progress,
                **extra,
            )
            return encode_corpus(settings)

        encoded[role] = EncodedCorpus(
            queries=encode(queries, "query", False),
            documents=encode(documents, "passage", False),
            query_multi=encode(queries, "query", True) if run.multivector else None,
            document_multi=encode(documents, "passage", True) if run.multivector else None,
        )
    return encoded


def _shards(out: Path) -> Iterator[tuple[np.ndarray, object]]:
    """(global document indices, vectors) per shard; the ids are the indices ``_write_corpus`` gave."""
    from jev4.encode import read_embeddings

    for ids, vectors in read_embeddings(out):
        yield np.asarray(ids, dtype=np.int64), vectors


def _load(out: Path) -> object:
    from jev4.encode import load_embeddings

    return load_embeddings(out)[1]


@dataclass
class _CodecStream:
    """One codec at one dim, fed shard by shard."""

    name: str
    scoring: str
    dim: int
    codec: EmbeddingCodec
    calibration: str
    top: RunningTopK
    seconds: float = 0.0


def _codec(name: str, dim: int, given: Calibration | None, sample: np.ndarray) -> tuple[EmbeddingCodec, str]:
    precision = base_precision(name)
    if precision not in NEEDS_RANGE:
        return EmbeddingCodec(precision, None), "none"
    if given is not None and given.precision == precision:
        return EmbeddingCodec(precision, given.truncated(dim)), "given"
    return EmbeddingCodec(precision, calibrate(sample, precision)), "documents"


def _single_sample(out: Path, limit: int) -> np.ndarray:
    """The first ``limit`` document vectors (the range sample of the codecs)."""
    parts, held = [], 0
    for _, vectors in _shards(out):
        parts.append(vectors[: limit - held])
        held += len(parts[-1])
        if held >= limit:
            break
    return np.concatenate(parts)


def _token_sample(out: Path, limit: int) -> np.ndarray:
    parts, held = [], 0
    for _, documents in _shards(out):
        for tokens in documents:
            parts.append(tokens[: limit - held])
            held += len(parts[-1])
            if held >= limit:
                return np.concatenate(parts)
    return np.concatenate(parts)


def score_single(queries: np.ndarray, documents: Path, dims: Sequence[int], n_docs: int, codec_streams: Sequence[_CodecStream] = ()) -> dict[int, RunningTopK]:
    """A running top-k per dim of ``q . d`` over the document shards (and each codec stream, fed the same shards)."""
    k = min(SEARCH_K, n_docs)
    tops = {dim: RunningTopK(len(queries), k) for dim in dims}
    truncated = {dim: truncate_normalize(queries, dim) for dim in dims}
    # The query side of each codec, once: float queries, or sign codes for the symmetric binary search.
    stream_queries = [
        Codes.from_decoder(s.codec.precision, s.codec.encode(truncated[s.dim]), s.codec.decode) if s.codec.precision in ("binary", "ubinary") else truncated[s.dim]
        for s in codec_streams
    ]
    for indices, vectors in _shards(documents):
        for dim in dims:
            docs = truncate_normalize(vectors, dim)
            tops[dim].update(truncated[dim] @ docs.T, indices)
            for stream, q in ((s, q) for s, q in zip(codec_streams, stream_queries) if s.dim == dim):
                codes = Codes.from_decoder(stream.codec.precision, stream.codec.encode(docs), stream.codec.decode)
                started = time.perf_counter()
                stream.top.update(scores(q, codes), indices)
                stream.seconds += time.perf_counter() - started
    return tops


def score_multi(queries: list[np.ndarray], documents: Path, n_docs: int, codec_streams: Sequence[_CodecStream] = ()) -> tuple[RunningTopK, int]:
    """A running top-k of MaxSim over the document shards; also the number of document tokens."""
    top = RunningTopK(len(queries), min(SEARCH_K, n_docs))
    tokens = 0
    for indices, docs in _shards(documents):
        top.update(maxsim_scores(queries, docs), indices)
        tokens += sum(len(d) for d in docs)
        for stream in codec_streams:
            codes = [Codes.from_decoder(stream.codec.precision, stream.codec.encode(np.asarray(d, np.float32)), stream.codec.decode) for d in docs]
            started = time.perf_counter()
            stream.top.update(maxsim(queries, codes), indices)
            stream.seconds += time.perf_counter() - started
    return top, tokens


def run_corpus_retrieval(
    run: CorpusValidation,
    data: RetrievalDataset,
    dims: Sequence[int],
    folder: Path,
    codecs: Sequence[str] = (),
    calibrations: dict[str, Calibration | None] | None = None,
) -> tuple[list[RetrievalResult], list[CodecResult]]:
    """What ``run_retrieval_and_codecs`` measures, from corpus encodes on Ray: metrics per scoring x dim, and the codecs' results.

    ``dims`` are the full size first, then the Matryoshka dims.
    """
    check_codecs_for_corpus(codecs)
    encoded = encode_dataset_on_ray(run, data, folder)
    n_docs, full = len(data.documents), dims[0]
    metrics: dict[str, dict[tuple[str, int], dict[str, float]]] = {}
    codec_results: list[CodecResult] = []
    calibrations = calibrations or {}
    for role in ROLES:
        enc = encoded[role]
        queries = _load(enc.queries)
        streams: list[_CodecStream] = []
        if role == "artifact" and codecs:
            sample = _single_sample(enc.documents, run.calibration_sample)
            for dim in dims:
                for name in codecs:
                    codec, how = _codec(name, dim, calibrations.get("single"), truncate_normalize(sample, dim))
                    streams.append(_CodecStream(name, "single", dim, codec, how, RunningTopK(len(queries), min(SEARCH_K, n_docs))))
        log.info("%s: scoring the %s's %d documents, shard by shard", data.name, role, n_docs)
        tops = score_single(queries, enc.documents, dims, n_docs, streams)
        found = {("single", dim): ranking_metrics(tops[dim].ranking(), data.qrels, n_docs) for dim in dims}
        codec_results += [_codec_result(data, s, found[("single", s.dim)], bytes_per_vector(s.codec.precision, s.dim), len(queries)) for s in streams]
        if enc.query_multi is not None:
            query_multi = [np.asarray(q, np.float32) for q in _load(enc.query_multi)]
            multi_streams: list[_CodecStream] = []
            if role == "artifact" and codecs:
                sample = _token_sample(enc.document_multi, run.calibration_tokens)
                for name in codecs:
                    codec, how = _codec(name, sample.shape[1], calibrations.get("multi"), sample)
                    multi_streams.append(_CodecStream(name, "multi", int(sample.shape[1]), codec, how, RunningTopK(len(query_multi), min(SEARCH_K, n_docs))))
            top, tokens = score_multi(query_multi, enc.document_multi, n_docs, multi_streams)
            found[("multi", full)] = ranking_metrics(top.ranking(), data.qrels, n_docs)
            mean_tokens = tokens / max(n_docs, 1)
            codec_results += [_codec_result(data, s, found[("multi", full)], int(round(bytes_per_vector(s.codec.precision, s.dim) * mean_tokens)), len(query_multi)) for s in multi_streams]
        metrics[role] = found
    results = [
        RetrievalResult(dataset=data.name, scoring=scoring, dim=dim, reference=metrics["reference"][(scoring, dim)], artifact=metrics["artifact"][(scoring, dim)], queries=len(data.queries))
        for scoring, dim in metrics["reference"]
    ]
    return results, codec_results


def _codec_result(data: RetrievalDataset, stream: _CodecStream, float_metrics: dict[str, float], stored: int, n_queries: int) -> CodecResult:
    return CodecResult(
        data.name,
        stream.name,
        stream.scoring,
        stream.dim,
        ranking_metrics(stream.top.ranking(), data.qrels, stream.top.documents),
        float_metrics,
        stored,
        stream.seconds * 1000.0 / max(n_queries, 1),
        queries=n_queries,
        notes={"calibration": stream.calibration, "scored": "shard by shard (--ray)"},
    )


def dataset_folder(embeddings: Path, data: RetrievalDataset) -> Path:
    """One folder per dataset and subset: a changed subset gets new encodes, an unchanged one resumes."""
    return Path(embeddings) / f"{_safe_name(data.name)}-{data.checksum()[:12]}"
