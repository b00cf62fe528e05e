"""``jev4 bench search``: exact CPU search over a million random 2048-d vectors stored as binary, int8 or float32 codes.

What it measures, per method: single-query latency (p50 and mean over
``--latency-queries`` queries searched one by one), batch throughput (all
``--queries`` in one call), bytes per document and the memory the corpus
takes, plus the process's peak RSS. Methods: binary Hamming scan (numpy, and
faiss when installed), int8 (symmetric int8 x int8 and float query x int8),
float32 (numpy BLAS, faiss), and two-stage binary then int8 / float32
rescoring.

The data is random (Gaussian, L2-normalised) and each query is a noisy copy of
one document (the "planted" neighbour, cosine about 0.45), so that the report
can show every method still finds it; the overlap with float32's exact top-k
is also reported, but on random data the ranks past the planted one are
noise, so it is a lower bound, not a quality figure.

Memory: the binary and int8 corpora are built first and measured; int8 is
then freed before the float32 corpus (4 bytes x dim per document, 8 GiB at
1M x 2048) is built. If the float32 corpus does not fit (MemAvailable and
``--max-rss-gib``), float32 is measured on ``--fp32-fallback-docs``
documents and its times are scaled linearly to the full corpus (a full scan
is linear in N), which the results say.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jev4.quant.search import Codes, SearchResult, search, search_rescored

log = logging.getLogger(__name__)

_GEN_CHUNK = 32768  # documents generated and encoded at a time (256 MiB of float32 at 2048-d)
_NOISE = 2.0  # query = normalise(doc + noise), noise of norm ~2: cosine to its doc ~0.45


@dataclass
class MethodPoint:
    method: str
    backend: str
    docs: int  # documents scanned in the measurement
    bytes_per_doc: int
    corpus_gib: float  # what the search holds in memory (codes, plus rescoring codes for two-stage)
    p50_ms: float  # one query per call
    mean_ms: float
    batch_ms_per_query: float  # all queries in one call
    queries_per_s: float
    scaled_from_docs: int | None = None  # times measured on this many docs, scaled to ``docs``
    planted_hit_at_k: float | None = None
    overlap_at_k_vs_float32: float | None = None


def machine_info() -> dict:
    """CPU model, cores, memory and library versions, without importing torch."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": model,
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": None,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    return info


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _rss_gib() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except OSError:
        return 0.0


def _doc_chunks(n: int, dim: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """The same L2-normalised Gaussian documents on every pass (one generator per chunk, seeded by position)."""
    for start in range(0, n, _GEN_CHUNK):
        rows = min(_GEN_CHUNK, n - start)
        x = np.random.default_rng([seed, start]).standard_normal((rows, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield start, x


def _queries(n_docs: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of documents from the first generated chunk, and which documents they copy."""
    rng = np.random.default_rng([seed, 2**32 - 1])  # a stream no document chunk uses
    first = next(_doc_chunks(min(n_docs, _GEN_CHUNK), dim, seed))[1]
    targets = rng.choice(len(first), size=n_queries, replace=len(first) < n_queries)
    q = first[targets] + rng.standard_normal((n_queries, dim), dtype=np.float32) * np.float32(_NOISE / np.sqrt(dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32), targets.astype(np.int64)


def _time_method(run: Callable[[slice], SearchResult], n_queries: int, n_latency: int) -> tuple[list[float], float, SearchResult]:
    """Per-query latencies (ms, one query per call) and the batch time (s) of all queries in one call."""
    run(slice(0, 1))  # warm-up: BLAS threads, page faults of the corpus
    latencies = []
    for i in range(n_latency):
        start = time.perf_counter()
        run(slice(i, i + 1))
        latencies.append((time.perf_counter() - start) * 1e3)
    start = time.perf_counter()
    result = run(slice(0, n_queries))
    return latencies, time.perf_counter() - start, result


def _point(
    method: str, backend: str, docs: int, bytes_per_doc: int, corpus_bytes: int, latencies: list[float], batch_s: float, n_queries: int, scale: float = 1.0, scaled_from: int | None = None
) -> MethodPoint:
    return MethodPoint(
        method=method,
        backend=backend,
        docs=docs,
        bytes_per_doc=bytes_per_doc,
        corpus_gib=round(corpus_bytes / 1024**3, 3),
        p50_ms=round(statistics.median(latencies) * scale, 2),
        mean_ms=round(statistics.fmean(latencies) * scale, 2),
        batch_ms_per_query=round(batch_s * 1e3 / n_queries * scale, 2),
        queries_per_s=round(n_queries / (batch_s * scale), 2),
        scaled_from_docs=scaled_from,
    )


class _Recorder:
    """Times methods and keeps their points and top-k indices (for the overlap with float32)."""

    def __init__(self, n: int, k: int, n_queries: int, n_latency: int, targets: np.ndarray) -> None:
        self.n, self.k, self.n_queries, self.n_latency, self.targets = n, k, n_queries, n_latency, targets
        self.points: list[MethodPoint] = []
        self.tops: dict[str, np.ndarray] = {}

    def record(self, name: str, backend: str, bytes_per_doc: int, corpus_bytes: int, run: Callable[[slice], SearchResult], measured_docs: int | None = None) -> None:
        measured = measured_docs or self.n
        log.info("timing %s (%s) on %d docs ...", name, backend, measured)
        latencies, batch_s, result = _time_method(run, self.n_queries, self.n_latency)
        scaled = measured != self.n
        point = _point(name, backend, self.n, bytes_per_doc, corpus_bytes, latencies, batch_s, self.n_queries, scale=self.n / measured, scaled_from=measured if scaled else None)
        point.planted_hit_at_k = float(np.mean([t in row for t, row in zip(self.targets, result.indices)]))
        self.points.append(point)
        if not scaled:
            self.tops[f"{name}/{backend}"] = result.indices
        log.info("  p50 %.1f ms, batch %.1f ms/query, %.1f q/s", point.p50_ms, point.batch_ms_per_query, point.queries_per_s)

    def overlaps_with(self, reference: str) -> None:
        exact = self.tops[reference]
        for point in self.points:
            got = self.tops.get(f"{point.method}/{point.backend}")
            if got is not None:
                point.overlap_at_k_vs_float32 = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / self.k for a, b in zip(got, exact)]))


def run_search_bench(args: argparse.Namespace) -> int:
    """Build the corpora in phases (binary+int8, then float32), time every method, write JSON/plot/table."""
    n, dim, nq, k = args.docs, args.dim, args.queries, args.k
    info = machine_info()
    use_faiss = info["faiss"] is not None and not args.no_faiss
    backends = ("numpy", "faiss") if use_faiss else ("numpy",)
    queries, targets = _queries(n, dim, nq, args.seed)
    recorder = _Recorder(n, k, nq, min(args.latency_queries, nq), targets)
    results: dict = {
        "title": f"exact search over {n:,} random {dim}-d vectors, CPU",
        "machine": info,
        "settings": {"docs": n, "dim": dim, "queries": nq, "latency_queries": recorder.n_latency, "k": k, "rescore_multiplier": args.rescore_multiplier, "seed": args.seed, "faiss_used": use_faiss},
        "points": [],
        "rss_gib": {},
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],  # other work on the machine skews the times
    }
    # Phase 1: binary and int8 corpora (codes only; int8 is freed when the phase returns).
    binary_docs = _binary_and_int8_phase(args, queries, recorder, backends, results)

    # Phase 2: float32 corpus, the full one if it fits, else a subset with times scaled to n.
    fp32_docs = _fp32_docs(n, dim, args)
    floats = np.empty((fp32_docs, dim), dtype=np.float32)
    for start, x in _doc_chunks(fp32_docs, dim, args.seed):
        floats[start : start + len(x)] = x
    float_docs = Codes("float32", floats, dim)
    results["rss_gib"]["after float32 corpus"] = round(_rss_gib(), 2)
    results["settings"]["fp32_docs_measured"] = fp32_docs
    for backend in backends:
        recorder.record("float32", backend, 4 * dim, 4 * dim * n, lambda s, b=backend: search(queries[s], float_docs, k, backend=b), fp32_docs)
    sub_bits = binary_docs.slice(0, fp32_docs)
    for backend in backends:
        recorder.record(
            f"binary -> float32 rescore (x{args.rescore_multiplier})",
            backend,
            binary_docs.nbytes_per_vector + 4 * dim,
            binary_docs.data.nbytes + 4 * dim * n,
            lambda s, b=backend: search_rescored(queries[s], sub_bits, float_docs, k, rescore_multiplier=args.rescore_multiplier, backend=b),
            fp32_docs,
        )
    if fp32_docs == n:
        recorder.overlaps_with("float32/numpy")
    results["points"] = [asdict(p) for p in recorder.points]
    results["peak_rss_gib"] = round(_peak_rss_gib(), 2)
    results["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(results, indent=2)
    print(text)
    print()
    print(markdown_table(results))
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(text + "\n")
    if args.plot:
        plot_search(results, Path(args.plot))
    return 0


def _binary_and_int8_phase(args: argparse.Namespace, queries: np.ndarray, recorder: _Recorder, backends: tuple[str, ...], results: dict) -> Codes:
    """Encode the corpus to ubinary and int8 with jev4's codecs, time the binary/int8 methods; return the binary codes."""
    from jev4.quant.embeddings import EmbeddingCodec, calibrate

    n, dim, k = args.docs, args.dim, args.k
    int8_codec = EmbeddingCodec("int8", calibrate(next(_doc_chunks(min(n, _GEN_CHUNK), dim, args.seed))[1], "int8"))
    bin_codec = EmbeddingCodec("ubinary")
    bits = np.empty((n, -(-dim // 8)), dtype=np.uint8)
    int8 = np.empty((n, dim), dtype=np.int8)
    t0 = time.perf_counter()
    for start, x in _doc_chunks(n, dim, args.seed):
        bits[start : start + len(x)] = bin_codec.encode(x)
        int8[start : start + len(x)] = int8_codec.encode(x)
    log.info("encoded %d docs to ubinary + int8 in %.1f s", n, time.perf_counter() - t0)
    binary_docs = Codes.from_decoder("ubinary", bits, bin_codec.decode)
    int8_docs = Codes.from_decoder("int8", int8, int8_codec.decode)
    q_bits = Codes("ubinary", bin_codec.encode(queries), dim)
    q_int8 = Codes("int8", int8_codec.encode(queries), dim)
    results["rss_gib"]["after binary+int8 corpora"] = round(_rss_gib(), 2)

    for backend in backends:
        recorder.record("binary (Hamming)", backend, bits.shape[1], bits.nbytes, lambda s, b=backend: search(q_bits.slice(s.start, s.stop), binary_docs, k, backend=b))
    recorder.record("int8 x int8 (exact int32)", "numpy", dim, int8.nbytes, lambda s: search(q_int8.slice(s.start, s.stop), int8_docs, k))
    recorder.record("float query x int8", "numpy", dim, int8.nbytes, lambda s: search(queries[s], int8_docs, k))
    for backend in backends:
        recorder.record(
            f"binary -> int8 rescore (x{args.rescore_multiplier})",
            backend,
            bits.shape[1] + dim,
            bits.nbytes + int8.nbytes,
            lambda s, b=backend: search_rescored(queries[s], binary_docs, int8_docs, k, rescore_multiplier=args.rescore_multiplier, backend=b),
        )
    results["rss_gib"]["after binary+int8 methods (peak so far)"] = round(_peak_rss_gib(), 2)
    return binary_docs


def _fp32_docs(n: int, dim: int, args: argparse.Namespace) -> int:
    """All ``n`` documents when the float32 corpus fits in MemAvailable and under ``--max-rss-gib``; else the fallback."""
    if args.fp32_docs:
        return min(n, args.fp32_docs)
    need_gib = n * dim * 4 / 1024**3
    available = _mem_available_gib()
    fits = need_gib + 1.5 < available and _rss_gib() + need_gib + 1.0 < args.max_rss_gib
    if not fits:
        log.warning("float32 corpus (%.1f GiB) does not fit (MemAvailable %.1f GiB, cap %.1f GiB): measuring %d docs and scaling", need_gib, available, args.max_rss_gib, args.fp32_fallback_docs)
        return min(n, args.fp32_fallback_docs)
    return n


def markdown_table(results: dict) -> str:
    """One row per method: latency, throughput, size, memory, planted hit and overlap with float32."""
    k = results["settings"]["k"]
    rows = [
        f"| method | backend | bytes/doc | corpus GiB | p50 ms/query | mean ms/query | batch ms/query | queries/s | planted in top-{k} | overlap@{k} vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results["points"]:
        scaled = f" (scaled from {p['scaled_from_docs']:,} docs)" if p.get("scaled_from_docs") else ""
        overlap = f"{p['overlap_at_k_vs_float32']:.2f}" if p.get("overlap_at_k_vs_float32") is not None else "n/a"
        planted = f"{p['planted_hit_at_k']:.2f}" if p.get("planted_hit_at_k") is not None else "n/a"
        rows.append(
            f"| {p['method']}{scaled} | {p['backend']} | {p['bytes_per_doc']:,} | {p['corpus_gib']:.2f} | {p['p50_ms']:,.1f} | {p['mean_ms']:,.1f} | "
            f"{p['batch_ms_per_query']:,.1f} | {p['queries_per_s']:,.1f} | {planted} | {overlap} |"
        )
    return "\n".join(rows)


def plot_search(results: dict, png: Path) -> Path:
    """Two bar charts (log scale): single-query p50 latency and batch time per query, per method and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = results["points"]
    labels = [f"{p['method']} [{p['backend']}]\n{p['bytes_per_doc']:,} B/doc" for p in points]
    colors = ["tab:orange" if p["backend"] == "faiss" else "tab:blue" for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(points) + 1.6), sharey=True)
    for ax, key, title in ((axes[0], "p50_ms", "one query per call: p50 ms"), (axes[1], "batch_ms_per_query", f"{results['settings']['queries']} queries per call: ms/query")):
        values = [p[key] for p in points]
        ax.barh(range(len(points)), values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.1f}", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 1.5, max(values) * 3)  # room for the value labels
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(points)), labels, fontsize=7)
    axes[0].invert_yaxis()
    m = results["machine"]
    fig.suptitle(f"{results['title']} ({m['cpu']}, {m['cpus']} cores, numpy {m['numpy']}, faiss {m['faiss'] or 'not used'})", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
