"""``jev4 bench corpus``: ``jev4 encode --corpus`` in-process against Ray with 1 and 2 workers, and its memory on a large corpus.

What it answers (issue 16): what Ray costs per shard and at start-up on
this machine, how much memory the driver and each worker hold, whether the
three modes write the same vectors, whether memory stays flat from 20k to
200k documents, and what N GPUs would do from the measured single-GPU
throughput.

Every mode encodes the same synthetic corpus with the same artifact in a
fresh process of its own (``multiprocessing`` spawn), so its peak RSS is its
own: the driver's is ``ru_maxrss`` of that process; each Ray worker's is the
kernel's high-water mark (``VmHWM`` in ``/proc/PID/status``, Linux only) of
every descendant process whose title names ``ShardEncoder``, read by a
driver thread every ``SAMPLE_S`` (the last read before the worker exits; the
high-water mark keeps peaks between reads). Ray's other processes (raylet,
GCS, idle workers) are summed by current RSS at each read and their peak
sum recorded apart.

Timing: ``ray.init`` and ``encode_corpus`` are timed apart; each shard's
publish time is its file's mtime, so the first-shard latency (model load,
actor start-up) and the steady time per shard after it are separated
without hooks in the encoder.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jev4.errors import SettingsError

log = logging.getLogger(__name__)

MODES = {"in-process": 0, "ray-1": 1, "ray-2": 2}  # mode -> Ray workers (0: no Ray)
BASELINE = "in-process"
SAMPLE_S = 0.25
WORKER_TITLE = "ShardEncoder"
# Ray starts its workers at nice 15 (its raylet setting worker_niceness) and the in-process encoder runs at the
# caller's priority: on a machine shared with other work that alone would slow the Ray modes, so the bench
# starts them at nice 0 (an environment variable that the raylet reads); each worker's niceness is recorded.
RAY_NICENESS_ENV = {"RAY_worker_niceness": "0"}
GIB = 1024**3
# The single-GPU figure the projection starts from: docs/benchmarks.md, "End to end on a mixed-length corpus",
# FP8 path (docs/results/fast-path-h100.json, e2e.fp8_path.docs_per_s); a test checks that the two agree.
GPU_REFERENCE = {
    "docs_per_s": 129.57045553442038,
    "device": "NVIDIA H100 80GB HBM3",
    "workload": "1000 shuffled stdlib-code documents, max length 2048, FP8 path, batch 32, length-sorted",
    "source": "docs/results/fast-path-h100.json e2e.fp8_path",
}
GPU_COUNTS = (1, 2, 4, 8, 16, 64)
PROJECTED_DOCS = (1_000_000, 10_000_000)


@dataclass(frozen=True)
class CorpusBenchSettings:
    """``model`` None: the tiny checkpoint's retrieval adapter as an fp32 ONNX artifact, built once in ``workdir``.

    ``threads`` is the machine's share for the encoders in every mode: the
    in-process engine gets all of them, each of W Ray workers ``threads / W``
    (and the local Ray cluster ``threads`` CPUs), so no mode uses more cores
    than another. ``memory_docs``: corpus sizes of the in-process memory
    check (empty: skipped); ``memory_ray`` adds Ray with 2 workers on the
    largest of them.
    """

    workdir: str
    out: str  # the JSON report
    model: str | None = None
    docs: int = 60_000
    modes: tuple[str, ...] = tuple(MODES)
    shard_size: int = 2_000
    batch_size: int = 32
    max_length: int = 128
    threads: int = 2
    memory_docs: tuple[int, ...] = (20_000, 200_000)
    memory_max_length: int = 32
    memory_ray: bool = True
    gpu_shard_size: int = 10_000  # the projection's shard size: jev4 encode's default
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("docs", "shard_size", "batch_size", "max_length", "threads", "memory_max_length", "gpu_shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise SettingsError(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
        if BASELINE not in self.modes:
            raise SettingsError(f"the modes must include {BASELINE!r}: overheads and output equality are measured against it")
        for mode in self.modes:
            if MODES[mode] and self.threads % MODES[mode]:
                raise SettingsError(f"{mode}: threads={self.threads} cannot be shared evenly by {MODES[mode]} workers")
        if any(n < 1 for n in self.memory_docs):
            raise SettingsError(f"memory_docs must be >= 1 each, got {self.memory_docs}")
        if self.memory_ray and self.memory_docs and self.threads % 2:
            raise SettingsError(f"memory_ray runs 2 workers: threads={self.threads} must be even")


# --- the synthetic corpus -------------------------------------------------------------------------------------------


def write_synthetic_corpus(path: str | Path, docs: int, seed: int = 0) -> dict[str, Any]:
    """JSONL of ``docs`` records, streamed: the stdlib-code documents in a seeded order, cycled, each under a unique id.

    Real code of varied length (a one-line function to hundreds of lines),
    so batches, padding and truncation behave as on a real corpus; a first
    line ``# doc N`` makes every text unique too. The same ``docs`` and
    ``seed`` write the same bytes on the same Python (the set comes from the
    installed standard library). Returns what the report records of it.
    """
    import hashlib

    import numpy as np

    pool = _pool()
    order = np.random.default_rng(seed).permutation(len(pool))
    digest = hashlib.sha256()
    chars = 0
    path = Path(path)
    with path.open("w", encoding="utf-8") as fh:
        for index in range(docs):
            text = f"# doc {index}\n{pool[order[index % len(pool)]]}"
            line = json.dumps({"id": f"doc-{index:09d}", "text": text}, ensure_ascii=False) + "\n"
            fh.write(line)
            digest.update(line.encode("utf-8"))
            chars += len(text)
    return {"path": str(path), "docs": docs, "seed": seed, "distinct_texts_cycled": len(pool), "mean_chars": chars / max(docs, 1),
            "bytes": path.stat().st_size, "sha256": digest.hexdigest()}  # fmt: skip


@functools.cache
def _pool() -> list[str]:
    """The stdlib-code documents, parsed once per process (a few seconds: it walks the standard library)."""
    from jev4.datasets import BUILTIN

    return list(BUILTIN["stdlib-code"]().documents)


def _corpus(work: Path, docs: int) -> dict[str, Any]:
    """The corpus of ``docs`` records in ``work``, written once (its description kept beside it)."""
    path = work / f"corpus-{docs}.jsonl"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    log.info("writing a synthetic corpus of %d documents to %s", docs, path)
    described = write_synthetic_corpus(path, docs)
    meta.write_text(json.dumps(described, indent=2) + "\n")
    return described


def _artifact(settings: CorpusBenchSettings, work: Path) -> str:
    """The artifact every mode loads: the given one, or the tiny fp32 ONNX artifact built in ``work`` once."""
    if settings.model is not None:
        return settings.model
    onnx = work / "tiny-onnx"
    if not (onnx / "jev4-manifest.json").is_file():
        from jev4.export.onnx import OnnxExportSettings, export_onnx
        from jev4.model.tiny import write_tiny_checkpoint

        log.info("building the tiny ONNX artifact in %s", onnx)
        tiny = write_tiny_checkpoint(work / "tiny", seed=0, force=True)
        export_onnx(OnnxExportSettings(model=str(tiny), adapter="retrieval", out=str(onnx), force=True), progress=False)
    return str(onnx)


# --- one mode, in a process of its own ------------------------------------------------------------------------------


def _hwm_bytes(pid: int) -> int:
    """The kernel's peak resident set of ``pid`` (VmHWM), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _RaySampler(threading.Thread):
    """Reads the memory of this process's descendants (the local Ray cluster) until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.workers: dict[int, int] = {}  # pid -> last VmHWM read
        self.niceness: set[int] = set()
        self.others_peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop_event.is_set():
            others = 0
            for child in me.children(recursive=True):
                try:
                    title = " ".join(child.cmdline())
                    if WORKER_TITLE in title:
                        self.workers[child.pid] = max(self.workers.get(child.pid, 0), _hwm_bytes(child.pid))
                        self.niceness.add(child.nice())
                    else:
                        others += child.memory_info().rss
                except psutil.Error:
                    continue
            self.others_peak = max(self.others_peak, others)
            self._stop_event.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _start_ray(threads: int) -> None:
    """A local cluster on loopback with ``threads`` CPUs; retried, as Ray gives its raylet a fixed 30 s to register."""
    import ray

    os.environ.update(RAY_NICENESS_ENV)
    for attempt in range(1, 4):
        try:
            ray.init(num_cpus=threads, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            if attempt == 3:
                raise
            log.warning("ray.init failed (attempt %d of 3); trying again", attempt)


def _publish_times(out: Path) -> list[float]:
    """Each shard file's publish time (its mtime: a shard is written aside and renamed whole), in order."""
    return sorted(p.stat().st_mtime for p in out.glob("part-*.parquet"))


def measure_mode(spec: dict[str, Any]) -> dict[str, Any]:
    """Encode ``spec["corpus"]`` into ``spec["out"]`` in this process, as ``spec["mode"]`` asks, and measure it."""
    from jev4.encode import CorpusEncodeSettings, encode_corpus

    workers = MODES[spec["mode"]]
    threads = spec["threads"]
    extra = {} if not workers else {"ray": "auto", "workers": workers, "cpus_per_worker": threads / workers}
    settings = CorpusEncodeSettings(model=spec["model"], corpus=spec["corpus"], out=spec["out"], max_length=spec["max_length"],
                                    shard_size=spec["shard_size"], batch_size=spec["batch_size"], threads=threads // max(workers, 1),
                                    force=True, progress=spec["progress"], **extra)  # fmt: skip
    load_before = os.getloadavg()[0]
    sampler = None
    ray_init_s = shutdown_s = 0.0
    if workers:
        import ray

        sampler = _RaySampler()
        sampler.start()
        start = time.perf_counter()
        _start_ray(threads)
        ray_init_s = time.perf_counter() - start
    try:
        started_at = time.time()
        start = time.perf_counter()
        out = encode_corpus(settings)
        encode_s = time.perf_counter() - start
    finally:
        if workers:
            start = time.perf_counter()
            sampler.stop()  # before shutdown: the workers' last reads are taken while they are alive
            ray.shutdown()
            shutdown_s = time.perf_counter() - start
    published = _publish_times(out)
    shards = len(published)
    seconds = ray_init_s + encode_s
    steady = (published[-1] - published[0]) / (shards - 1) if shards > 1 else None
    return {
        "mode": spec["mode"],
        "workers": workers,
        "threads_per_worker": threads // max(workers, 1),
        "docs": spec["docs"],
        "shards": shards,
        "seconds": seconds,
        "ray_init_s": ray_init_s,
        "encode_s": encode_s,
        "ray_shutdown_s": shutdown_s,
        "docs_per_s": spec["docs"] / seconds,
        "s_per_shard": seconds / shards,
        "first_shard_s": published[0] - started_at,
        "steady_s_per_shard": steady,
        "peak_rss_driver_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "peak_rss_workers_gib": sorted(v / GIB for v in sampler.workers.values()) if sampler else [],
        "peak_rss_other_ray_gib": sampler.others_peak / GIB if sampler else None,
        "niceness": sorted(sampler.niceness) if sampler else [os.nice(0)],  # of the encoding processes
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "out": str(out),
    }


def _child(spec: dict[str, Any], report: str) -> None:
    """The spawned process: logs like the parent, measures, writes the figures to ``report``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(report).write_text(json.dumps(measure_mode(spec)))


def run_mode_in_child(spec: dict[str, Any], report: Path) -> dict[str, Any]:
    """``measure_mode`` in a fresh interpreter (spawn), so the peak RSS is the mode's alone."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_child, args=(spec, str(report)), name=f"bench-{spec['mode']}")
    report.unlink(missing_ok=True)
    process.start()
    process.join()
    if process.exitcode != 0 or not report.is_file():
        raise RuntimeError(f"{spec['mode']} on {spec['docs']} docs failed (exit {process.exitcode}); see its log above")
    return json.loads(report.read_text())


# --- comparing, deriving, projecting --------------------------------------------------------------------------------


def same_outputs(a: str | Path, b: str | Path) -> bool:
    """Whether two OUTs hold the same ids and bit-identical vectors, read one shard at a time."""
    import itertools

    import numpy as np

    from jev4.encode import read_embeddings

    for left, right in itertools.zip_longest(read_embeddings(a), read_embeddings(b)):
        if left is None or right is None or left[0] != right[0] or not np.array_equal(left[1], right[1]):
            return False
    return True


def add_overheads(rows: list[dict[str, Any]]) -> None:
    """Per Ray mode, against the in-process row on the same corpus.

    ``overhead_per_shard_s``: worker-seconds a shard costs beyond in-process
    (steady time per shard x workers - in-process steady time per shard).
    With 1 worker (same threads) that is Ray's own cost per shard; with 2
    workers of half the threads it also holds the difference between one
    engine on 2 threads and two engines on 1 thread each.
    ``startup_overhead_s``: ``ray.init`` plus the first shard's extra latency
    (actor start, model load in the actor).
    """
    base = next(r for r in rows if r["mode"] == BASELINE)
    for row in rows:
        if row["mode"] == BASELINE or row["steady_s_per_shard"] is None or base["steady_s_per_shard"] is None:
            row["overhead_per_shard_s"] = row["startup_overhead_s"] = None
            continue
        row["overhead_per_shard_s"] = row["steady_s_per_shard"] * row["workers"] - base["steady_s_per_shard"]
        row["startup_overhead_s"] = row["ray_init_s"] + row["first_shard_s"] - base["first_shard_s"]


def project(gpu_docs_per_s: float, shard_size: int, overhead_per_shard_s: float, startup_s: float,
            gpus: Sequence[int] = GPU_COUNTS, corpus_docs: Sequence[int] = PROJECTED_DOCS) -> list[dict[str, Any]]:  # fmt: skip
    """N GPUs, one actor each, on independent shards: the model behind the projection table.

    A shard takes ``t = shard_size / gpu_docs_per_s + overhead`` on one GPU
    (``overhead`` >= 0: Ray's cost per shard, measured); the actors work in
    rounds of N shards, so a corpus of D docs in S = ceil(D / shard_size)
    shards takes ``startup + ceil(S / N) * t`` (the last round may be
    partly idle). Steady docs/s = N x shard_size / t.
    """
    overhead = max(0.0, overhead_per_shard_s)
    shard_s = shard_size / gpu_docs_per_s + overhead
    rows = []
    for n in gpus:
        row: dict[str, Any] = {"gpus": n, "steady_docs_per_s": n * shard_size / shard_s, "efficiency": (shard_size / gpu_docs_per_s) / shard_s}
        for docs in corpus_docs:
            shards = math.ceil(docs / shard_size)
            seconds = startup_s + math.ceil(shards / n) * shard_s
            row[f"hours_{docs}"] = seconds / 3600
            row[f"docs_per_s_{docs}"] = docs / seconds
        rows.append(row)
    return rows


def _projection(settings: CorpusBenchSettings, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The projection from the Ray-1 row (Ray's cost with the engine's threads unchanged), None without it."""
    ray1 = next((r for r in rows if r["mode"] == "ray-1" and r["overhead_per_shard_s"] is not None), None)
    if ray1 is None:
        return None
    measured_shard = ray1["steady_s_per_shard"]
    overhead = ray1["overhead_per_shard_s"]
    startup = ray1["startup_overhead_s"]
    return {
        "gpu_reference": GPU_REFERENCE,
        "shard_size": settings.gpu_shard_size,
        "gpu_shard_s": settings.gpu_shard_size / GPU_REFERENCE["docs_per_s"],
        "overhead_per_shard_s": max(0.0, overhead),
        "overhead_measured_at_shard_size": settings.shard_size,
        "overhead_fraction_of_measured_shard": overhead / measured_shard if measured_shard else None,
        "startup_s": max(0.0, startup),
        "rows": project(GPU_REFERENCE["docs_per_s"], settings.gpu_shard_size, overhead, max(0.0, startup)),
        "assumptions": [
            "one GPU per Ray actor, each at the single-GPU end-to-end figure (docs/s of the FP8 path on H100, mixed-length code, max length 2048)",
            "shards are independent: throughput scales linearly with actors apart from the last, partly idle round (ceil(shards / N))",
            "Ray's cost per shard is the CPU figure measured here with 1 worker (fixed per task: scheduling, the result row), added to each GPU shard",
            "start-up (ray.init, actor start, model load) is paid once per job, in parallel on all actors; a 3.8B model load on a GPU node "
            "takes longer than the tiny artifact's, which this does not measure",
            "reading the corpus and writing Parquet keep up on a shared file system (10k x 2048 float32 = 80 MB per shard per "
            f"{settings.gpu_shard_size / GPU_REFERENCE['docs_per_s']:.0f} s per GPU) and the driver's corpus scan is done before; no cross-node bottleneck",
            "no failures: a lost actor costs its shard again",
        ],
    }


# --- the run --------------------------------------------------------------------------------------------------------


def _spec(settings: CorpusBenchSettings, model: str, corpus: dict[str, Any], mode: str, out: Path, max_length: int) -> dict[str, Any]:
    return {"mode": mode, "model": model, "corpus": corpus["path"], "docs": corpus["docs"], "out": str(out), "max_length": max_length,
            "shard_size": settings.shard_size, "batch_size": settings.batch_size, "threads": settings.threads, "progress": settings.progress}  # fmt: skip


def _memory_check(settings: CorpusBenchSettings, model: str, work: Path) -> dict[str, Any] | None:
    """In-process encodes of growing corpora (and Ray 2 workers on the largest): peak RSS must not grow with the corpus."""
    if not settings.memory_docs:
        return None
    runs = []
    sizes = sorted(settings.memory_docs)
    for docs in sizes:
        corpus = _corpus(work, docs)
        log.info("memory check: in-process, %d documents, max length %d", docs, settings.memory_max_length)
        runs.append(run_mode_in_child(_spec(settings, model, corpus, BASELINE, work / f"emb-memory-{docs}", settings.memory_max_length), work / "report.json"))
    first, last = runs[0], runs[-1]
    check: dict[str, Any] = {"max_length": settings.memory_max_length, "runs": runs, "ray_2_workers": None}
    if len(runs) > 1:
        check["rss_growth_bytes_per_doc"] = (last["peak_rss_driver_gib"] - first["peak_rss_driver_gib"]) * GIB / (last["docs"] - first["docs"])
        check["rss_ratio_largest_to_smallest"] = last["peak_rss_driver_gib"] / first["peak_rss_driver_gib"]
    if settings.memory_ray:
        corpus = _corpus(work, sizes[-1])
        log.info("memory check: Ray with 2 workers, %d documents", sizes[-1])
        ray_run = run_mode_in_child(_spec(settings, model, corpus, "ray-2", work / f"emb-memory-{sizes[-1]}-ray-2", settings.memory_max_length), work / "report.json")
        ray_run["identical_to_in_process"] = same_outputs(ray_run["out"], last["out"])
        check["ray_2_workers"] = ray_run
    return check


def run_corpus_bench(settings: CorpusBenchSettings) -> dict[str, Any]:
    """Run every mode and the memory check; write the JSON report to ``settings.out`` and return it."""
    import jev4
    from jev4.atomic import atomic_output_file, claim_output
    from jev4.bench.process import machine_summary

    work = Path(settings.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    with claim_output(settings.out, settings.force, (str(work),), kind="file"):  # refused now, not after the long run
        model = _artifact(settings, work)
        corpus = _corpus(work, settings.docs)
        rows = []
        for mode in settings.modes:
            log.info("mode %s: %d documents, max length %d, shard size %d, %d thread(s) in all", mode, settings.docs, settings.max_length, settings.shard_size, settings.threads)
            rows.append(run_mode_in_child(_spec(settings, model, corpus, mode, work / f"emb-{mode}", settings.max_length), work / "report.json"))
            log.info("mode %s: %.1f s, %.0f docs/s", mode, rows[-1]["seconds"], rows[-1]["docs_per_s"])
        add_overheads(rows)
        base = next(r for r in rows if r["mode"] == BASELINE)
        identical = {r["mode"]: same_outputs(r["out"], base["out"]) for r in rows if r["mode"] != BASELINE}
        summary = {
            "title": "jev4 encode --corpus: in-process vs Ray (1 and 2 workers), memory on a large corpus, projection to N GPUs",
            "jev4_version": jev4.__version__,
            "machine": {**machine_summary(), **_versions()},
            "settings": asdict(settings),
            "artifact": model,
            "corpus": corpus,
            "modes": rows,
            "identical_outputs": identical,
            "all_identical": all(identical.values()),
            "memory": _memory_check(settings, model, work),
            "projection": _projection(settings, rows),
            "notes": [
                "seconds = ray.init + encode_corpus (the corpus scan, the model load, every shard, the final check); Ray shutdown apart",
                "steady_s_per_shard: (last shard's publish time - first's) / (shards - 1), publish time = the shard file's mtime",
                "peak RSS driver: ru_maxrss of the mode's own process (a fresh spawned interpreter)",
                f"peak RSS per worker: VmHWM of each Ray worker process whose title names {WORKER_TITLE}, read every {SAMPLE_S} s by a driver thread",
                "peak RSS other Ray: the largest sum of current RSS of the driver's other descendants (raylet, GCS, idle workers) at one read",
                f"Ray workers started with {RAY_NICENESS_ENV} (Ray's default is nice 15); niceness: what the encoding processes ran at",
                "loadavg_1min: the machine's 1-minute load before and after the mode (other work on the machine shows here)",
            ],
        }
        with atomic_output_file(settings.out, force=settings.force) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for name in ("ray", "onnxruntime", "pyarrow"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


# --- command line ---------------------------------------------------------------------------------------------------


def table(summary: dict[str, Any]) -> str:
    """Markdown: one row per mode (the docs table), then the memory check and the projection."""
    rows = ["| mode | workers | threads per worker | docs | seconds | docs/s | s/shard | overhead per shard s | start-up overhead s | peak RSS driver GiB | peak RSS per worker GiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in summary["modes"]:
        overhead = "-" if r["overhead_per_shard_s"] is None else f"{r['overhead_per_shard_s']:+.3f}"
        startup = "-" if r["startup_overhead_s"] is None else f"{r['startup_overhead_s']:.1f}"
        workers = ", ".join(f"{v:.2f}" for v in r["peak_rss_workers_gib"]) or "-"
        rows.append(f"| {r['mode']} | {r['workers']} | {r['threads_per_worker']} | {r['docs']:,} | {r['seconds']:.1f} | {r['docs_per_s']:.0f} | "
                    f"{r['s_per_shard']:.2f} | {overhead} | {startup} | {r['peak_rss_driver_gib']:.2f} | {workers} |")  # fmt: skip
    memory = summary.get("memory")
    if memory:
        rows += ["", "| memory check | docs | seconds | docs/s | peak RSS driver GiB | peak RSS per worker GiB |", "|---|---:|---:|---:|---:|---|"]
        for r in [*memory["runs"], *([memory["ray_2_workers"]] if memory["ray_2_workers"] else [])]:
            workers = ", ".join(f"{v:.2f}" for v in r["peak_rss_workers_gib"]) or "-"
            rows.append(f"| {r['mode']} | {r['docs']:,} | {r['seconds']:.1f} | {r['docs_per_s']:.0f} | {r['peak_rss_driver_gib']:.3f} | {workers} |")
    projection = summary.get("projection")
    if projection:
        docs = PROJECTED_DOCS
        rows += ["", "| GPUs | steady docs/s | efficiency | " + " | ".join(f"hours for {d:,} docs" for d in docs) + " |", "|---:|---:|---:|" + "---:|" * len(docs)]
        for r in projection["rows"]:
            rows.append(f"| {r['gpus']} | {r['steady_docs_per_s']:,.0f} | {r['efficiency']:.4f} | " + " | ".join(f"{r[f'hours_{d}']:.2f}" for d in docs) + " |")
    return "\n".join(rows) + "\n"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jev4 bench corpus`` (and of ``python -m jev4.bench.corpus``)."""
    defaults = CorpusBenchSettings(workdir="", out="")
    parser.add_argument("--model", default=None, help="artifact to encode with (default: the tiny fp32 ONNX artifact, built in --workdir)")
    parser.add_argument("--workdir", default=".bench/corpus", help="corpora, artifact and embeddings, kept for a later run")
    parser.add_argument("--out", default="corpus-bench.json", help="the JSON report")
    parser.add_argument("--docs", type=int, default=defaults.docs, help="documents of the mode comparison")
    parser.add_argument("--modes", default=",".join(defaults.modes), help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="engine threads in all, shared by the Ray workers")
    parser.add_argument("--memory-docs", default=",".join(map(str, defaults.memory_docs)), help="corpus sizes of the memory check ('' skips it)")
    parser.add_argument("--memory-max-length", type=int, default=defaults.memory_max_length)
    parser.add_argument("--no-memory-ray", action="store_true", help="skip Ray with 2 workers on the largest memory corpus")
    parser.add_argument("--force", action="store_true", help="replace --out")


def run(args: argparse.Namespace) -> int:
    """Run the bench from parsed ``add_arguments`` options; prints the tables."""
    settings = CorpusBenchSettings(
        workdir=args.workdir,
        out=args.out,
        model=args.model,
        docs=args.docs,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads=args.threads,
        memory_docs=_ints(args.memory_docs),
        memory_max_length=args.memory_max_length,
        memory_ray=not args.no_memory_ray,
        force=args.force,
        progress=not args.no_progress,
    )
    summary = run_corpus_bench(settings)
    print(table(summary))
    print(f"outputs identical across modes: {summary['all_identical']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jev4.bench.corpus", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true")  # jev4's own parser has it already
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
