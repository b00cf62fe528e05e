"""``jev4 bench serving``: the same text-only export through every serving engine jev4 drives, timed as a client sees it.

Each engine runs from its own venv (``make serving-envs``) and is started by
``jev4.runtime.load(..., backend=...)``, exactly as tests/serving does; an
engine whose venv is missing is listed as skipped. Per engine: seconds from
start to ready, latency of one request of ``request_texts`` passages (p50,
p90 over ``requests`` requests, one at a time) and throughput over
``corpus_texts`` passages in requests of ``batch_size``. The in-process torch
backend on the same export is the baseline. On a toy model the figures show
each engine's overhead, not model speed.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jev4.runtime as rt
from jev4.atomic import atomic_output_dir, claim_output
from jev4.bench.process import machine_summary
from jev4.errors import Jev4Error
from jev4.runtime.server_process import engine_python

log = logging.getLogger(__name__)

ENGINES = ("torch", "vllm-embed", "vllm-token_embed", "triton-http", "triton-grpc", "infinity")
_ENV = {"vllm": (".venv-vllm", "JEV4_VLLM_PYTHON"), "triton": (".venv-triton", "JEV4_TRITON_PYTHON"), "infinity": (".venv-infinity", "JEV4_INFINITY_PYTHON")}


@dataclass(frozen=True)
class ServingBenchSettings:
    export: str  # a --text-only export (vLLM and infinity serve only that)
    out: str
    engines: tuple[str, ...] = ENGINES
    requests: int = 20
    request_texts: int = 8
    corpus_texts: int = 256
    batch_size: int = 32
    force: bool = False


@dataclass
class EngineResult:
    engine: str
    version: str = ""
    ready_s: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    texts_per_s: float | None = None
    skipped: str = ""


@dataclass
class ServingBenchResult:
    settings: dict
    machine: dict
    engines: list[EngineResult] = field(default_factory=list)


def _passages(count: int) -> list[str]:
    words = "the llama is a domesticated south american camelid used as a meat and pack animal by andean cultures".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(40 + i % 30)) for i in range(count)]


def _open(engine: str, export: str) -> rt.Encoder:
    name, _, variant = engine.partition("-")
    if name == "torch":
        return rt.load(export)
    env = Path(engine_python(*_ENV[name])).parents[1]
    if not (env / ".installed").is_file():
        raise FileNotFoundError(f"no complete {env} (make {name}-env builds it)")
    if name == "vllm":
        return rt.load(export, backend="vllm", vllm_pooling=variant)
    if name == "triton":
        return rt.load(export, backend="triton", triton_protocol=variant)
    return rt.load(export, backend="infinity")


def measure_engine(engine: str, settings: ServingBenchSettings) -> EngineResult:
    result = EngineResult(engine)
    started = time.perf_counter()
    try:
        encoder = _open(engine, settings.export)
    except FileNotFoundError as exc:
        result.skipped = str(exc)
        return result
    result.ready_s = time.perf_counter() - started
    try:
        result.version = encoder.engine()
        request = _passages(settings.request_texts)
        encoder.encode_text(request, task=encoder.tasks[0], prompt_name="passage", progress=False)  # warm-up
        latencies = []
        for _ in range(settings.requests):
            t0 = time.perf_counter()
            encoder.encode_text(request, task=encoder.tasks[0], prompt_name="passage", batch_size=settings.request_texts, progress=False)
            latencies.append((time.perf_counter() - t0) * 1000)
        result.latency_ms_p50 = statistics.median(latencies)
        result.latency_ms_p90 = statistics.quantiles(latencies, n=10)[-1]
        corpus = _passages(settings.corpus_texts)
        t0 = time.perf_counter()
        encoder.encode_text(corpus, task=encoder.tasks[0], prompt_name="passage", batch_size=settings.batch_size, progress=False)
        result.texts_per_s = len(corpus) / (time.perf_counter() - t0)
    finally:
        close = getattr(encoder, "close", None)
        if close is not None:
            close()
    log.info("%s: ready %.1f s, p50 %.1f ms, %.0f texts/s", engine, result.ready_s, result.latency_ms_p50, result.texts_per_s)
    return result


def markdown(result: ServingBenchResult) -> str:
    s = result.settings
    lines = [
        f"Requests of {s['request_texts']} passages, one at a time ({s['requests']} requests); throughput over {s['corpus_texts']} passages "
        f"in requests of {s['batch_size']}. Machine: {result.machine.get('cpus', '?')} CPUs, {result.machine.get('memory_gib', '?')} GiB.",
        "",
        "| engine | version | start to ready | latency p50 / p90 | texts/s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result.engines:
        if r.skipped:
            lines.append(f"| {r.engine} | skipped: {r.skipped} | | | |")
            continue
        lines.append(f"| {r.engine} | {r.version} | {r.ready_s:.1f} s | {r.latency_ms_p50:.1f} / {r.latency_ms_p90:.1f} ms | {r.texts_per_s:.0f} |")
    return "\n".join(lines) + "\n"


def run_serving_bench(settings: ServingBenchSettings, progress: bool = True) -> ServingBenchResult:
    unknown = sorted(set(settings.engines) - set(ENGINES))
    if unknown:
        raise Jev4Error(f"unknown engine(s) {unknown}; choose from {ENGINES}")
    if rt.inspect(settings.export).kind != "merged-text-only":
        raise Jev4Error(f"{settings.export}: not a --text-only export (jev4-export --text-only); vLLM and infinity-emb serve only that")
    result = ServingBenchResult(asdict(settings), machine_summary())
    with claim_output(settings.out, settings.force, (settings.export,)):
        for engine in settings.engines:
            result.engines.append(measure_engine(engine, settings))
        with atomic_output_dir(settings.out, force=settings.force) as tmp:
            (tmp / "serving.json").write_text(json.dumps(asdict(result), indent=2))
            (tmp / "serving.md").write_text(markdown(result))
    return result
