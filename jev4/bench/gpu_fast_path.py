"""``jev4 bench fast-path``: the torch FP8 fast path vs the bf16 reference vs fp16 onnxruntime, in one run.

Two parts, both on a full-size random-weight model built in memory (speed
and memory do not depend on weight values):

1. **Grid**: for each mode and each batch x sequence point (no padding, random
   token ids), tokens/s, docs/s, p50/p99 latency of forward + pooling on
   device-resident inputs, peak GPU memory, and MFU against the GPU's
   datasheet dense peak (bf16 peak for bf16/fp16 modes, FP8 peak for the FP8
   mode: attention stays bf16, so the FP8 MFU is a lower bound). Modes:

   - ``torch-bf16``: the reference network with the adapter merged, bf16, SDPA;
   - ``ort-fp16``: the text-only language graph exported in fp16 exactly as
     ``jev4-export --format onnx --text-only --dtype fp16``, on onnxruntime's
     CUDA EP with IOBinding (CPU EP in ``--tiny`` smoke mode);
   - ``torch-fp8``: ``jev4.runtime.torch_fp8``: row-wise FP8 GEMMs
     (``torch._scaled_mm``) for the language model's Linear layers;
   - ``torch-bf16-compile`` / ``torch-fp8-compile``: the same under
     ``torch.compile(dynamic=True)`` (opt-in: compiling takes minutes);
   - ``torch-bf16-bucketed``: the bf16 reference through
     ``jev4.runtime.torch_compiled`` (``torch.compile`` at static bucket
     shapes, CUDA graphs on CUDA): issue 17's compiled reference;
   - ``torch-fp8-torchao``: torchao's row-wise FP8
     (``jev4.runtime.torchao_fp8``) under the same bucketed compile (CUDA
     only: recorded under ``skipped_modes`` elsewhere).

   Bucketed modes compile each point before its clock starts; the seconds
   are reported apart (``compile_seconds``), and ``compiled_points`` limits
   them to a few points (each compile of the full model takes minutes).

2. **End to end on a mixed-length corpus** (real encode calls, tokenisation
   included): the FP8 path with length-sorted batches (``Encoder.encode_text``)
   against an upstream-style encode: batches of 8 in input order (no length
   sorting), the task LoRA applied unmerged in fp32 per layer, bf16. The
   corpus is the built-in ``stdlib-code`` documents, shuffled. The
   tokenizer is the tiny checkpoint's BPE (the real one cannot be shipped),
   which splits text into somewhat more tokens than Qwen2's; both sides use it.

The torch grid modes run first, then the end-to-end comparison, and the
``ort-fp16`` grid last: on an H100 a point too large for onnxruntime's CUDA
EP failed with an illegal memory access that left the CUDA context unusable,
which took every later mode down with it. ``ort-fp16`` points whose O(T^2)
attention scores would not fit the free device memory are skipped up front
(``ort_skip_reason``) and listed under ``failures``.

3. **Targets** (issue 17, ``jev4.bench.fast_path_targets``): FP8 tokens/s
   over eager bf16 at 32 x 512 (>= 1.6x), bf16 batch 1 x 128 p50 latency
   (<= 10 ms), and each FP8 mode's nDCG@10 delta on the built-in sets
   (``ndcg_sets``; tiny checkpoint, threshold 2 / queries), met or not.

``--device cpu --tiny`` runs everything on the toy model, so that the code
is exercised without a GPU (the numbers mean nothing). Results go to
``--out``: ``fast-path.json`` (all figures), ``fast-path.md`` (tables) and
``fast-path.png`` (tokens/s by batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from jev4.bench.encode import EncodePoint, _time, text_flops_per_token
from jev4.bench.ort import _point
from jev4.bench.process import machine_summary
from jev4.errors import Jev4Error

if TYPE_CHECKING:
    from jev4.model.tiny import TinySpec

log = logging.getLogger(__name__)

MODES = ("torch-bf16", "ort-fp16", "torch-fp8", "torch-bf16-compile", "torch-fp8-compile", "torch-bf16-bucketed", "torch-fp8-torchao")
DEFAULT_MODES = ("torch-bf16", "ort-fp16", "torch-fp8")
ROUND2_MODES = ("torch-bf16", "torch-bf16-bucketed", "torch-fp8", "torch-fp8-torchao")  # issue 17's comparison
BUCKETED_MODES = ("torch-bf16-bucketed", "torch-fp8-torchao")
GPU_ONLY_MODES = ("torch-fp8-torchao",)
# Datasheet dense peaks (TFLOP/s): (name substring, bf16, fp8). First match wins, so specific names come first.
GPU_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H100", 989.0, 1979.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0, 1979.0),
    ("H800", 989.0, 1979.0),
    ("L40S", 362.0, 733.0),
    ("L4", 121.0, 242.0),
    ("A100", 312.0, None),  # no FP8 tensor cores
)
UPSTREAM_BATCH = 8
# Device memory an ort-fp16 point takes above baseline, per byte of one layer's fp16 attention scores.
# Measured on an H100: batch 32 x seq 2048 (4.3 GB of scores) took 27 GiB.
ATTENTION_MEMORY_FACTOR = 6.5


class BenchSettingsError(Jev4Error, ValueError):
    """Bad options of ``jev4 bench fast-path``."""


@dataclass(frozen=True)
class FastPathSettings:
    """What one run measures; recorded in the JSON."""

    device: str = "cuda"
    tiny: bool = False
    modes: tuple[str, ...] = DEFAULT_MODES
    batches: tuple[int, ...] = (1, 8, 32, 128)
    seqs: tuple[int, ...] = (128, 512, 2048)
    warmup: int = 3
    iters: int = 10
    corpus_docs: int = 1000
    corpus_max_length: int = 2048
    corpus_batch: int = 32
    task: str = "retrieval"
    workdir: str | None = None
    compiled_points: tuple[tuple[int, int], ...] | None = None  # bucketed modes: these (batch, seq) only; None: the whole grid
    compile_backend: str = "inductor"  # torch.compile backend of the bucketed modes (tests on CPU: "aot_eager")
    compile_scope: str = "network"  # CompileSettings.scope: "network" (one graph) or "layers" (regional: ~36x less compile time)
    e2e_modes: tuple[str, ...] = ()  # extra end-to-end rows (length-sorted encode_text) besides the FP8 path
    e2e_length_buckets: tuple[int, ...] = (512, 2048)  # bucketed e2e rows: the corpus batch size x these lengths
    ndcg_sets: tuple[str, ...] = ()  # built-in sets for the FP8 nDCG@10 delta (tiny checkpoint); empty: not run
    ndcg_queries: int = 30
    ndcg_docs: int = 100

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes + self.e2e_modes if m not in MODES]
        if unknown:
            raise BenchSettingsError(f"unknown mode(s) {unknown}; choose from {MODES}")
        if "ort-fp16" in self.e2e_modes:
            raise BenchSettingsError("e2e_modes are torch modes; ort-fp16 has no end-to-end row")
        if self.compiled_points is not None:
            missing = [p for p in self.compiled_points if p[0] not in self.batches or p[1] not in self.seqs]
            if missing:
                raise BenchSettingsError(f"compiled points {missing} are not on the grid (batches {self.batches}, seqs {self.seqs})")
        if self.iters < 1 or self.warmup < 0 or not self.batches or not self.seqs:
            raise BenchSettingsError("need iters >= 1, warmup >= 0 and at least one batch size and sequence length")
        if torch.device(self.device).type == "cpu" and not self.tiny:
            raise BenchSettingsError("the full-size model on CPU is not a benchmark (and needs > 8 GiB); use --tiny for a CPU smoke run")


def peak_tflops(device_name: str) -> tuple[float | None, float | None]:
    """(bf16, fp8) dense datasheet peaks for a GPU name, or (None, None) when unknown."""
    for key, bf16, fp8 in GPU_PEAKS:
        if key in device_name:
            return bf16, fp8
    return None, None


def attention_score_bytes(batch: int, heads: int, seq: int, element_bytes: int = 2) -> int:
    """Bytes of one layer's attention scores, batch x heads x seq x seq (fp16 by default).

    The exported graph computes attention as MatMul-Softmax-MatMul, so the
    full score matrix is materialised: O(T^2), unlike torch's fused SDPA.
    """
    return batch * heads * seq * seq * element_bytes


def ort_skip_reason(batch: int, heads: int, seq: int, free_bytes: int | None, factor: float = ATTENTION_MEMORY_FACTOR) -> str | None:
    """Why an ort-fp16 point must not run, or None when it fits (always None when ``free_bytes`` is None: CPU).

    A point over the budget is not merely an out-of-memory error: on an H100,
    128 x 2048 asked onnxruntime for a 16 GiB buffer and the CUDA EP died with
    an illegal memory access that left the CUDA context unusable for every
    later mode. So it is skipped before it runs. ``free_bytes`` is measured
    while onnxruntime's arena holds what earlier points took, which makes the
    check conservative.
    """
    if free_bytes is None:
        return None
    scores = attention_score_bytes(batch, heads, seq)
    needed = scores * factor
    if needed <= free_bytes:
        return None
    return (
        f"skipped: O(T^2) attention scores need ~{scores / 1024**3:.1f} GiB per layer "
        f"(x{factor:g} measured overhead = {needed / 1024**3:.1f} GiB), over the budget of {free_bytes / 1024**3:.1f} GiB free"
    )


def _device_free_bytes(device: torch.device) -> int | None:
    """Free device memory (cudaMemGetInfo), or None on CPU, where nothing is skipped."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _free_quietly(device: torch.device) -> None:
    """``_free`` that only logs: after a CUDA EP crash the context may refuse every call, and the figures must still be written."""
    try:
        _free(device)
    except Exception as exc:  # a sticky CUDA error surfaces as RuntimeError or AcceleratorError
        log.warning("freeing device memory failed (CUDA context unusable?): %s", exc)


# ---------------------------------------------------------------- grid


def _torch_network(spec, mode: str, dtype: str, device: torch.device):
    """A merged random network for ``mode`` (FP8: quantized), optionally compiled."""
    from jev4.model.synthetic import random_network
    from jev4.runtime.torch_fp8 import quantize_model_fp8
    from jev4.runtime.torch_quantized import compile_language_model

    net = random_network(spec, dtype=dtype, device=str(device))
    del net.model.visual  # text benchmark: keep the vision tower out of the memory figures
    net.model.visual = None
    if mode == "torch-fp8-torchao":
        from jev4.runtime.torchao_fp8 import quantize_model_torchao_fp8

        quantize_model_torchao_fp8(net)
    elif mode.startswith("torch-fp8"):
        quantize_model_fp8(net)
    if mode.endswith("-compile"):
        compile_language_model(net)
    return net


def _forward_and_pool(net, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> None:
    """One timed step: forward, then both poolings (as an encode does on device)."""
    from jev4.model.pooling import multi_vector, single_vector

    out = net(input_ids=ids, attention_mask=mask, position_ids=pos)
    single_vector(out.hidden, mask)
    multi_vector(out.projected, mask)


def _out_of_memory(exc: BaseException, mode: str, batch: int, seq: int, device: torch.device) -> dict[str, object]:
    """The failure row of a point that ran out of GPU memory (the cache is freed for the next point)."""
    log.warning("%s b=%d s=%d: out of memory", mode, batch, seq)
    _free(device)
    return {"mode": mode, "batch": batch, "seq": seq, "error": f"out of memory: {str(exc).splitlines()[0]}"}


def _measured_point(mode: str, batch: int, seq: int, times: list[float], device: torch.device, spec: TinySpec, kv_dim: int, peak: float | None) -> EncodePoint:
    """A timed point with its peak memory and FLOPs (for MFU), logged."""
    mem = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0
    flops = text_flops_per_token(spec.hidden_size, spec.layers, spec.intermediate_size, kv_dim, seq, spec.multi_vector_dim)
    point = _point(mode, batch, seq, times, mem, flops, peak)
    _log_point(point)
    return point


def _log_point(p: EncodePoint) -> None:
    """Every figure of a point in the log, so that a run cut off before its report still leaves them."""
    log.info("point %s", json.dumps(asdict(p)))


def _torch_points(spec, mode: str, settings: FastPathSettings, dtype: str, device: torch.device, peaks: dict, failures: list) -> list[EncodePoint]:
    from jev4.model.preprocess import text_position_ids

    net = _torch_network(spec, mode, dtype, device)
    kv_dim = spec.hidden_size // spec.heads * spec.kv_heads
    peak = peaks["fp8"] if "fp8" in mode else peaks["bf16"]
    points = []
    for batch in settings.batches:
        for seq in settings.seqs:
            gen = torch.Generator().manual_seed(batch * 100_003 + seq)
            ids = torch.randint(0, 600 if settings.tiny else 150_000, (batch, seq), generator=gen).to(device)
            mask = torch.ones(batch, seq, dtype=torch.long, device=device)
            pos = text_position_ids(mask)

            try:
                times = _time(partial(_forward_and_pool, net, ids, mask, pos), device, settings.warmup, settings.iters, None, batch)
            except torch.OutOfMemoryError as exc:
                failures.append(_out_of_memory(exc, mode, batch, seq, device))
                continue
            points.append(_measured_point(mode, batch, seq, times, device, spec, kv_dim, peak))
    net = None  # free the weights before the next mode builds its own
    _free(device)
    return points


def gpu_only_skip_reason(mode: str, device: torch.device) -> str | None:
    """Why ``mode`` cannot run on ``device`` (recorded under ``skipped_modes``), or None."""
    if mode not in GPU_ONLY_MODES:
        return None
    if device.type != "cuda":
        return f"skipped: {mode} runs torchao's float8 kernels on a CUDA GPU (compute capability >= 8.9); device is {device.type}"
    try:
        import torchao  # noqa: F401
    except ImportError:
        from jev4.runtime.torchao_fp8 import TORCHAO_PIP

        return f"skipped: {mode} needs torchao ({TORCHAO_PIP}; scripts/gpu-check.sh installs it from $WHEELS)"
    return None


def _bucketed_points(
    spec, mode: str, settings: FastPathSettings, dtype: str, device: torch.device, peaks: dict, failures: list, compile_seconds: dict
) -> list[EncodePoint]:
    """A bucketed mode on its points: compile each (timed apart, into ``compile_seconds``), then time the compiled step."""
    from jev4.model.preprocess import ModelInputs, text_position_ids
    from torch._dynamo.utils import counters

    from jev4.runtime.torch_compiled import BucketedForward, CompileSettings

    wanted = settings.compiled_points or tuple((b, s) for b in settings.batches for s in settings.seqs)
    net = _torch_network(spec, mode, dtype, device)
    compile_settings = CompileSettings(
        batch_buckets=tuple(sorted({b for b, _ in wanted})),
        length_buckets=tuple(sorted({s for _, s in wanted})),
        backend=settings.compile_backend,
        scope=settings.compile_scope,
    )
    runner = BucketedForward(net, compile_settings, device, pad_token_id=0)
    kv_dim = spec.hidden_size // spec.heads * spec.kv_heads
    peak = peaks["fp8"] if "fp8" in mode else peaks["bf16"]
    seconds = compile_seconds.setdefault(mode, {})
    points = []
    for batch, seq in wanted:
        gen = torch.Generator().manual_seed(batch * 100_003 + seq)
        ids = torch.randint(0, 600 if settings.tiny else 150_000, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        inputs = ModelInputs(ids, mask, text_position_ids(mask), mask.clone())
        try:
            seconds[f"{batch}x{seq}"] = runner.warm_up([(batch, seq)])[(batch, seq)]
            # As an encode passes them (pad_to_bucket under inference mode): inference tensors, two separate masks.
            # Anything else (a normal tensor, one tensor passed twice) fails a guard and recompiles.
            with torch.inference_mode():
                on_device = ModelInputs(*(t.to(device).clone() for t in (ids, mask, inputs.position_ids, mask)))
            graphs = counters["stats"]["unique_graphs"]
            times = _time(partial(runner.run_bucket, on_device), device, settings.warmup, settings.iters, None, batch)
            if counters["stats"]["unique_graphs"] != graphs:  # the timings would include a compile: say so
                log.warning("%s b=%d s=%d: recompiled while timed", mode, batch, seq)
                failures.append({"mode": mode, "batch": batch, "seq": seq, "error": "recompiled inside the timed calls: its timings include a compile"})
        except torch.OutOfMemoryError as exc:
            failures.append(_out_of_memory(exc, mode, batch, seq, device))
            continue
        points.append(_measured_point(mode, batch, seq, times, device, spec, kv_dim, peak))
        log.info("%s %dx%d: compile %.1f s (not in the timings)", mode, batch, seq, seconds[f"{batch}x{seq}"])
    runner = net = None
    _free(device)
    return points


def _ort_points(spec, config, settings: FastPathSettings, device: torch.device, peaks: dict, failures: list, timings: dict) -> list[EncodePoint]:
    """Export the fp16 text-only graph, then time it on onnxruntime (CUDA EP, or CPU EP for --tiny on CPU)."""
    import onnxruntime as ort

    from jev4.runtime.providers import check_session_providers, provider_list

    provider = "cuda" if device.type == "cuda" else "cpu"
    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when onnxruntime-gpu is installed beside them
    work = Path(settings.workdir) if settings.workdir else Path(tempfile.mkdtemp(prefix="jev4-fast-path-ort-"))
    timings.update(export_fp16_graph(spec, config, work))
    _free(device)
    baseline = _device_used_gib(device)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    started = time.perf_counter()
    session = ort.InferenceSession(str(work / "language.onnx"), sess_options=options, providers=provider_list(provider))
    check_session_providers(session, provider, "language.onnx")
    timings["ort_session_create_s"] = time.perf_counter() - started
    kv_dim = spec.hidden_size // spec.heads * spec.kv_heads
    points = []
    rng = np.random.default_rng(0)
    for batch in settings.batches:
        for seq in settings.seqs:
            ids = rng.integers(0, 600 if settings.tiny else 150_000, size=(batch, seq)).astype(np.int64)
            try:
                if _skip_ort_point(spec, batch, seq, device, failures):
                    continue
                times = _time_ort_point(session, provider, ids, settings)
            except Exception as exc:  # onnxruntime raises its own types; a failed point is reported, not fatal
                log.warning("ort-fp16 b=%d s=%d failed: %s", batch, seq, str(exc).splitlines()[0] if str(exc) else exc)
                failures.append({"mode": "ort-fp16", "batch": batch, "seq": seq, "error": (str(exc).splitlines() or [repr(exc)])[0][:300]})
                continue
            mem = max(0.0, _device_used_gib(device) - baseline)
            flops = text_flops_per_token(spec.hidden_size, spec.layers, spec.intermediate_size, kv_dim, seq, spec.multi_vector_dim)
            points.append(_point("ort-fp16", batch, seq, times, mem, flops, peaks["bf16"]))
            _log_point(points[-1])
    del session
    _free_quietly(device)
    return points


def _skip_ort_point(spec, batch: int, seq: int, device: torch.device, failures: list) -> bool:
    """Record and skip a point whose attention scores would not fit the device (see ``ort_skip_reason``)."""
    reason = ort_skip_reason(batch, spec.heads, seq, _device_free_bytes(device))
    if reason is None:
        return False
    log.warning("ort-fp16 b=%d s=%d %s", batch, seq, reason)
    failures.append({"mode": "ort-fp16", "batch": batch, "seq": seq, "error": reason})
    return True


def _time_ort_point(session, provider: str, ids: np.ndarray, settings: FastPathSettings) -> list[float]:
    """Wall-clock seconds of each timed ``run_with_iobinding`` on one batch (inputs bound on the device once)."""
    import onnxruntime as ort

    batch, seq = ids.shape
    mask = np.ones((batch, seq), dtype=np.int64)
    pos = np.ascontiguousarray(np.broadcast_to(np.arange(seq, dtype=np.int64), (3, batch, seq)))
    binding = session.io_binding()
    for name, value in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos), ("pooling_mask", mask)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, provider, 0))
    for name in ("single_vector", "multi_vector"):
        binding.bind_output(name, provider, 0)
    times = []
    for i in range(settings.warmup + settings.iters):
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)  # returns when the outputs are ready
        if i >= settings.warmup:
            times.append(time.perf_counter() - t0)
    return times


def export_fp16_graph(spec, config, work: Path) -> dict[str, float]:
    """The fp16 text-only language graph of ``spec`` in ``work``, exported once and reused.

    The export of the full-size graph takes minutes (170 s on a 16-core
    host), so a ``--workdir`` that already holds the graph of the same spec
    (recorded in ``export-spec.json``) is reused: a run that must fit in a
    time slot can export ahead (``jev4 bench fast-path --export-only --workdir DIR``).
    Weight values do not matter to the timings, so a reused graph is as good as a fresh one.
    """
    from jev4.export.onnx import export_language_graph
    from jev4.model.synthetic import random_network

    marker = work / "export-spec.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if (work / "language.onnx").is_file() and marker.is_file() and marker.read_text() == wanted:
        log.info("reusing the fp16 graph in %s", work)
        return {"ort_export_s": 0.0, "ort_export_reused": 1.0, "onnx_bytes": _dir_bytes(work)}
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    network = random_network(spec, dtype="fp16", device="cpu")
    del network.model.visual
    network.model.visual = None
    export_language_graph(network, config, work, opset=18, with_images=False)
    del network
    marker.write_text(wanted)
    return {"ort_export_s": time.perf_counter() - started, "ort_export_reused": 0.0, "onnx_bytes": _dir_bytes(work)}


def _dir_bytes(work: Path) -> int:
    return sum(p.stat().st_size for p in work.iterdir() if p.is_file())


def _device_used_gib(device: torch.device) -> float:
    """Device memory in use by everything (cudaMemGetInfo): how onnxruntime's arena is seen from outside."""
    if device.type != "cuda":
        return 0.0
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 1024**3


# ---------------------------------------------------------------- end to end


def corpus_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` documents of the built-in stdlib-code set (function sources of very mixed length), shuffled."""
    from jev4.datasets import resolve_dataset

    docs = list(resolve_dataset("stdlib-code").documents)
    random.Random(seed).shuffle(docs)
    while len(docs) < count:
        docs += docs[: count - len(docs)]
    return docs[:count]


def encode_upstream_style(encoder, texts: list[str], task: str, batch_size: int, max_length: int) -> tuple[torch.Tensor, int]:
    """Upstream's loop: consecutive batches in input order, each padded to its longest text; no sorting.

    Returns the single vectors and the number of token positions computed (padding included).
    """
    from jev4.model.preprocess import text_prefix

    prompted = [text_prefix(task, "passage") + t for t in texts]
    out, positions = [], 0
    for start in range(0, len(prompted), batch_size):
        inputs = encoder.preprocessor.text_inputs(prompted[start : start + batch_size], max_length)
        single, _ = encoder._forward(inputs, [task] * inputs.input_ids.shape[0])
        positions += inputs.input_ids.numel()
        out.append(single.cpu())
    return torch.cat(out), positions


def _sorted_positions(encoder, texts: list[str], task: str, batch_size: int, max_length: int) -> int:
    """Token positions the length-sorted encode computes (each batch padded to its longest)."""
    from jev4.model.preprocess import text_prefix

    lengths = sorted(encoder.preprocessor.token_lengths([text_prefix(task, "passage") + t for t in texts], max_length), reverse=True)
    return sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))


def _timed(device: torch.device, fn: Callable[[], object]) -> tuple[object, float]:
    _sync(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - started


def _e2e_row(mode: str, spec, config, preprocessor, loras: dict, texts: list[str], settings: FastPathSettings, device: torch.device, dtype: str) -> dict:
    """One more end-to-end row: ``mode``'s network (merged, same base weights), length-sorted ``encode_text``.

    A bucketed mode first compiles every corpus bucket (``settings.corpus_batch``
    x ``settings.e2e_length_buckets``; seconds reported apart), so the timed
    run hits compiled graphs only; lengths past the last bucket run eagerly
    and are counted (``eager_batches``).
    """
    from jev4.export.merge import merge_into_network
    from jev4.model.encoder import TorchEncoder
    from jev4.model.synthetic import random_network
    from jev4.runtime.torch_compiled import CompileSettings, CompiledTorchEncoder

    net = random_network(spec, dtype=dtype, device=str(device))  # the same seed: the same base weights
    merge_into_network(net, {m: per_task[settings.task] for m, per_task in loras.items()})
    if mode == "torch-fp8-torchao":
        from jev4.runtime.torchao_fp8 import quantize_model_torchao_fp8

        quantize_model_torchao_fp8(net)
    elif mode.startswith("torch-fp8"):
        from jev4.runtime.torch_fp8 import quantize_model_fp8

        quantize_model_fp8(net)
    merged = dataclasses.replace(config, merged_task=settings.task)
    batch, max_length = settings.corpus_batch, settings.corpus_max_length
    row: dict = {"mode": mode, "batch_size": batch, "length_sorted": True, "lora": "merged"}
    if mode in BUCKETED_MODES:
        compile_settings = CompileSettings(
            batch_buckets=(batch,), length_buckets=settings.e2e_length_buckets, backend=settings.compile_backend, scope=settings.compile_scope
        )
        encoder = CompiledTorchEncoder(net, merged, preprocessor, device, compile_settings)
        row["compile_seconds"] = {f"{b}x{t}": sec for (b, t), sec in encoder.warm_up().items()}
    else:
        encoder = TorchEncoder(net, merged, preprocessor, None, device)
        if mode.endswith("-compile"):
            from jev4.runtime.torch_quantized import compile_language_model

            compile_language_model(net)
    encode = partial(encoder.encode_text, texts, task=settings.task, prompt_name="passage", batch_size=batch, max_length=max_length)
    encoder.encode_text(texts[:batch], task=settings.task, prompt_name="passage", batch_size=batch, max_length=max_length)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = dict(encoder.stats.calls) if mode in BUCKETED_MODES else {}
    eager_before = encoder.stats.eager_calls if mode in BUCKETED_MODES else 0
    vectors, seconds = _timed(device, encode)
    positions = _sorted_positions(encoder, texts, settings.task, batch, max_length)
    if mode in BUCKETED_MODES:  # what the compiled graphs computed, bucket padding included
        calls = {bucket: n - before.get(bucket, 0) for bucket, n in encoder.stats.calls.items()}
        row["eager_batches"] = encoder.stats.eager_calls - eager_before
        row["bucket_calls"] = {f"{b}x{t}": n for (b, t), n in calls.items() if n}
        row["bucket_token_positions"] = sum(b * t * n for (b, t), n in calls.items())
    row.update(seconds=seconds, positions=positions, peak=torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0)
    encoder = net = None
    _free(device)
    return row, vectors


def run_corpus_comparison(spec, config, settings: FastPathSettings, device: torch.device, dtype: str, skip: dict[str, str] | None = None) -> dict:
    """FP8 path (merged, quantized, length-sorted) vs upstream-style (unmerged fp32 LoRA, input order, batch 8)."""
    from jev4.export.merge import merge_into_network
    from jev4.model.adapters import AdapterSet, LoraSettings, TaskLora
    from jev4.model.encoder import TorchEncoder
    from jev4.model.network import attach_adapters, linear_shapes
    from jev4.model.preprocess import Preprocessor, load_tokenizer, text_prefix
    from jev4.model.synthetic import random_network
    from jev4.model.tiny import TASKS, TinySpec, adapted_modules, write_tokenizer
    from jev4.runtime.torch_fp8 import FP8Settings, quantize_model_fp8

    task = settings.task
    with tempfile.TemporaryDirectory(prefix="jev4-fast-path-tok-") as tmp:
        write_tokenizer(Path(tmp), TinySpec())
        tokenizer = load_tokenizer(Path(tmp))
    preprocessor = Preprocessor(config, tokenizer, None)
    texts = corpus_texts(settings.corpus_docs)
    real_tokens = sum(preprocessor.token_lengths([text_prefix(task, "passage") + t for t in texts], settings.corpus_max_length))

    gen = torch.Generator().manual_seed(1)
    base = random_network(spec, dtype=dtype, device=str(device))
    shapes = linear_shapes(base)
    loras = {
        m: {t: TaskLora(torch.randn(spec.lora_r, shapes[m][1], generator=gen) * 0.01, torch.randn(shapes[m][0], spec.lora_r, generator=gen) * 0.01, 1.0) for t in TASKS}
        for m in adapted_modules(spec.layers)
    }
    selector = attach_adapters(base, AdapterSet(Path("random"), LoraSettings(spec.lora_r, spec.lora_alpha, False), tuple(TASKS), loras))
    upstream = TorchEncoder(base, config, preprocessor, selector, device)
    encode_upstream_style(upstream, texts[:UPSTREAM_BATCH], task, UPSTREAM_BATCH, settings.corpus_max_length)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    (up_vectors, up_positions), up_seconds = _timed(device, partial(encode_upstream_style, upstream, texts, task, UPSTREAM_BATCH, settings.corpus_max_length))
    up_peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0
    upstream = selector = base = None  # free before the FP8 network is built
    _free(device)

    net = random_network(spec, dtype=dtype, device=str(device))  # the same seed: the same base weights
    merge_into_network(net, {m: per_task[task] for m, per_task in loras.items()})
    selection = quantize_model_fp8(net, FP8Settings())
    fast = TorchEncoder(net, dataclasses.replace(config, merged_task=task), preprocessor, None, device)
    batch = settings.corpus_batch
    fast.encode_text(texts[:batch], task=task, prompt_name="passage", batch_size=batch, max_length=settings.corpus_max_length)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fast_vectors, fast_seconds = _timed(
        device, partial(fast.encode_text, texts, task=task, prompt_name="passage", batch_size=batch, max_length=settings.corpus_max_length)
    )
    fast_peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0
    fast_positions = _sorted_positions(fast, texts, task, batch, settings.corpus_max_length)
    cosine = torch.nn.functional.cosine_similarity(fast_vectors.double(), up_vectors.double(), dim=-1)
    fast = net = None
    _free(device)
    extra = []
    for mode in settings.e2e_modes:
        if mode in (skip or {}):
            extra.append({"mode": mode, "skipped": skip[mode]})
            continue
        row, vectors = _e2e_row(mode, spec, config, preprocessor, loras, texts, settings, device, dtype)
        row["cosine_to_upstream_mean"] = torch.nn.functional.cosine_similarity(vectors.double(), up_vectors.double(), dim=-1).mean().item()
        extra.append(row)

    def side(seconds: float, positions: int, peak: float, **extra) -> dict:
        return {
            "seconds": seconds,
            "docs_per_s": len(texts) / seconds,
            "tokens_per_s": real_tokens / seconds,
            "token_positions": positions,
            "padding_fraction": 1 - real_tokens / positions,
            "peak_mem_gib": peak,
            **extra,
        }

    upstream_side = side(up_seconds, up_positions, up_peak, batch_size=UPSTREAM_BATCH, length_sorted=False, lora="unmerged fp32", dtype=dtype)
    fast_side = side(fast_seconds, fast_positions, fast_peak, batch_size=batch, length_sorted=True, lora="merged", dtype=f"fp8 GEMMs, {dtype} rest", fp8_layers=len(selection.chosen))
    return {
        "corpus": "stdlib-code documents (shuffled, seed 0), passage prompt",
        "docs": len(texts),
        "real_tokens": real_tokens,
        "max_length": settings.corpus_max_length,
        "task": task,
        "upstream_style": upstream_side,
        "fp8_path": fast_side,
        "speedup_docs_per_s": fast_side["docs_per_s"] / upstream_side["docs_per_s"],
        "fp8_vs_upstream_cosine_mean": cosine.mean().item(),
        "fp8_vs_upstream_cosine_min": cosine.min().item(),
        "rows": [row if "skipped" in row else _e2e_side(row, len(texts), real_tokens, up_seconds, dtype) for row in extra],
    }


def _e2e_side(row: dict, docs: int, real_tokens: int, upstream_seconds: float, dtype: str) -> dict:
    """An extra end-to-end row in the same terms as the FP8 path's side, plus its speed-up over upstream-style."""
    extra = {k: v for k, v in row.items() if k not in ("seconds", "positions", "peak")}
    return {
        **extra,
        "seconds": row["seconds"],
        "docs_per_s": docs / row["seconds"],
        "tokens_per_s": real_tokens / row["seconds"],
        "token_positions": row["positions"],
        "padding_fraction": 1 - real_tokens / row["positions"],
        "peak_mem_gib": row["peak"],
        "dtype": dtype if "fp8" not in row["mode"] else f"fp8 GEMMs, {dtype} rest",
        "speedup_docs_per_s_vs_upstream": upstream_seconds / row["seconds"],
    }


# ---------------------------------------------------------------- report


def _failure_where(failure: dict) -> str:
    """``BxT`` of a failed point, or "all points" when a whole mode failed."""
    return "all points" if failure["batch"] is None else f"{failure['batch']}x{failure['seq']}"


def markdown(results: dict) -> str:
    from jev4.bench.report import encode_table

    peaks = results["peak_tflops"]
    lines = [
        f"# Fast path: {results['device']}",
        "",
        f"Model: {results['model']}, random weights. Peaks for MFU: bf16 {peaks['bf16']} TFLOP/s, fp8 {peaks['fp8']} TFLOP/s (datasheet, dense).",
        "",
        encode_table(results),
    ]
    if results.get("failures"):
        lines += ["", "Points that did not run:", ""] + [f"- {f['mode']} {_failure_where(f)}: {f['error']}" for f in results["failures"]]
    e2e = results.get("e2e")
    if e2e:
        up, fast = e2e["upstream_style"], e2e["fp8_path"]
        lines += [
            "",
            f"## End to end: {e2e['docs']} mixed-length documents ({e2e['real_tokens']:,} tokens, max {e2e['max_length']})",
            "",
            "| encode | batch | sorted | LoRA | seconds | docs/s | tokens/s | padding | peak GPU GiB |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, s in (("upstream-style", up), ("FP8 path", fast)):
            lines.append(
                f"| {name} | {s['batch_size']} | {'yes' if s['length_sorted'] else 'no'} | {s['lora']} | {s['seconds']:.2f} | "
                f"{s['docs_per_s']:,.1f} | {s['tokens_per_s']:,.0f} | {100 * s['padding_fraction']:.0f}% | {s['peak_mem_gib']:.1f} |"
            )
        lines += [
            "",
            f"FP8 path / upstream-style: **{e2e['speedup_docs_per_s']:.2f}x** docs/s. Cosine FP8 vs upstream-style (same random weights): "
            f"mean {e2e['fp8_vs_upstream_cosine_mean']:.4f}, min {e2e['fp8_vs_upstream_cosine_min']:.4f}.",
        ]
        lines += _e2e_rows_markdown(e2e.get("rows", []))
    lines += _round2_markdown(results)
    return "\n".join(lines) + "\n"


def _e2e_rows_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "| mode (length-sorted, merged) | batch | seconds | docs/s | tokens/s | vs upstream-style | compile s (apart) | eager batches |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['mode']} | | | | | | | {r['skipped']} |")
            continue
        compiled = sum(r.get("compile_seconds", {}).values())
        lines.append(
            f"| {r['mode']} | {r['batch_size']} | {r['seconds']:.2f} | {r['docs_per_s']:,.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['speedup_docs_per_s_vs_upstream']:.2f}x | {compiled:.1f} | {r.get('eager_batches', 0)} |"
        )
    return lines


def _round2_markdown(results: dict) -> list[str]:
    """Compile seconds, skipped modes, and issue 17's targets (met or not)."""
    lines: list[str] = []
    for mode, per_point in (results.get("compile_seconds") or {}).items():
        lines += ["", f"Compile seconds, {mode} (not in the timings): " + ", ".join(f"{k} {v:.1f}" for k, v in per_point.items())]
    for skipped in results.get("skipped_modes") or []:
        lines += ["", f"- {skipped['mode']}: {skipped['reason']}"]
    targets = results.get("targets")
    if not targets:
        return lines
    lines += ["", "## Targets (issue 17)", ""]
    for row in targets["fp8_speedup_32x512"]:
        got = row.get("missing") or f"{row['ratio']:.2f}x ({row['tokens_per_s']:,.0f} vs {row['reference_tokens_per_s']:,.0f} tokens/s): {'met' if row['met'] else 'not met'}"
        lines.append(f"- {row['mode']} / torch-bf16 at 32x512, target >= {row['target']}x: {got}")
    for row in targets["bf16_latency_1x128"]:
        got = row.get("missing") or f"p50 {row['p50_ms']:.1f} ms: {'met' if row['met'] else 'not met'}"
        lines.append(f"- {row['mode']} latency at 1x128, target <= {row['target_ms']} ms: {got}")
    for row in targets["fp8_ndcg10_delta"]:
        got = row.get("skipped") or f"{row['delta']:+.4f} (threshold {row['threshold']:.4f}): {'met' if row['met'] else 'not met'}"
        lines.append(f"- {row['mode']} nDCG@10 delta on {row['dataset']}: {got}")
    return lines


def _ort_mode(spec, config, settings: FastPathSettings, device: torch.device, peaks: dict, failures: list, timings: dict) -> list[EncodePoint]:
    """The ort-fp16 grid; an export or session failure becomes one ``failures`` entry, so the torch figures are still written."""
    try:
        return _ort_points(spec, config, settings, device, peaks, failures, timings)
    except Exception as exc:  # onnxruntime, the exporter and a broken CUDA context all raise their own types
        log.warning("ort-fp16 mode failed: %s", exc)
        failures.append({"mode": "ort-fp16", "batch": None, "seq": None, "error": (str(exc).splitlines() or [repr(exc)])[0][:300]})
        return []


def _sync_quietly(device: torch.device) -> None:
    """``_sync`` that only logs, so that a CUDA context broken by an onnxruntime crash does not lose the results."""
    try:
        _sync(device)
    except Exception as exc:  # a sticky CUDA error surfaces as RuntimeError or AcceleratorError
        log.warning("device synchronise failed (CUDA context unusable?): %s", exc)


def run_fast_path(settings: FastPathSettings, out: Path, force: bool = False) -> dict:
    """Measure everything ``settings`` asks for and write fast-path.json/.md/.png into ``out``."""
    from jev4.atomic import atomic_output_dir, check_output_path
    from jev4.bench.fast_path_targets import target_report
    from jev4.bench.report import plot_encode
    from jev4.model.config import parse_config
    from jev4.model.synthetic import full_size_config
    from jev4.model.tiny import FULL_SIZE, TinySpec

    check_output_path(out, force)
    device = torch.device(settings.device)
    if any("fp8" in m for m in settings.modes) or settings.corpus_docs:
        from jev4.runtime.torch_fp8 import check_fp8_device

        check_fp8_device(device)
    spec = TinySpec() if settings.tiny else FULL_SIZE
    config = parse_config(full_size_config(spec))  # the network random_network builds for ``spec``
    dtype = "bf16"
    name = _device_name(device)
    bf16_peak, fp8_peak = peak_tflops(name) if device.type == "cuda" else (None, None)
    peaks = {"bf16": bf16_peak, "fp8": fp8_peak}
    points: list[EncodePoint] = []
    failures: list[dict] = []
    timings: dict[str, float] = {}
    compile_seconds: dict[str, dict[str, float]] = {}
    skip = {m: r for m in dict.fromkeys(settings.modes + settings.e2e_modes) if (r := gpu_only_skip_reason(m, device))}
    for mode, reason in skip.items():
        log.warning("%s", reason)
    for mode in (m for m in settings.modes if m != "ort-fp16" and m not in skip):
        started = time.perf_counter()
        if mode in BUCKETED_MODES:
            points += _bucketed_points(spec, mode, settings, dtype, device, peaks, failures, compile_seconds)
        else:
            points += _torch_points(spec, mode, settings, dtype, device, peaks, failures)
        timings[f"{mode}_s"] = time.perf_counter() - started
    e2e = None
    if settings.corpus_docs:
        started = time.perf_counter()
        e2e = run_corpus_comparison(spec, config, settings, device, dtype, skip)
        timings["e2e_s"] = time.perf_counter() - started
    ndcg: list[dict] = []
    if settings.ndcg_sets:
        from jev4.bench.fast_path_targets import fp8_ndcg_rows

        started = time.perf_counter()
        ndcg = fp8_ndcg_rows(settings.modes, settings.ndcg_sets, str(device), settings.ndcg_queries, settings.ndcg_docs, skip)
        timings["ndcg_s"] = time.perf_counter() - started
    if "ort-fp16" in settings.modes:  # last: a CUDA EP crash can leave the CUDA context unusable for whatever follows
        started = time.perf_counter()
        points += _ort_mode(spec, config, settings, device, peaks, failures, timings)
        timings["ort-fp16_s"] = time.perf_counter() - started
    results = {
        "title": "fast path",
        "machine": machine_summary(),
        "device": name,
        "dtype": dtype,
        "model": "tiny (toy sizes)" if settings.tiny else "full size (3.8B, jina-embeddings-v4 shapes)",
        "peak_tflops": peaks,
        "settings": asdict(settings),
        "points": [asdict(p) for p in points],
        "failures": failures,
        "e2e": e2e,
        "timings": timings,
        "compile_seconds": compile_seconds,
        "skipped_modes": [{"mode": m, "reason": r} for m, r in skip.items()],
        "ndcg": ndcg,
        "targets": target_report([asdict(p) for p in points], ndcg),
        "notes": [
            "timing: forward + pooling on device-resident inputs; CUDA events (torch), wall clock around run_with_iobinding (onnxruntime)",
            "peak_mem_gib: torch max_memory_allocated; onnxruntime: device memory in use above the pre-session baseline (cudaMemGetInfo); 0 on CPU",
            "MFU: tokens/s x (2 x matmul params + causal attention FLOPs) per token / datasheet dense peak; the FP8 mode is measured against the FP8 peak",
            "grid networks are text-only (vision tower dropped), so their memory is ~1.3 GiB (bf16) below `jev4 bench encode`'s; the e2e networks keep it",
            "bucketed modes: each point is one bucket, compiled before its clock starts; compile_seconds holds those compiles (first call, plus the CUDA-graph recording call on CUDA)",
            "ndcg: the tiny checkpoint (toy weights: full-size random weights make nDCG meaningless), task code, single vectors at full dim, fp32 reference; threshold 2 / queries",
        ],
    }
    _sync_quietly(device)
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "fast-path.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "fast-path.md").write_text(markdown(results))
        if points:
            plot_encode(results, tmp / "fast-path.png")
    return results


def round2_settings(device: str = "cuda", tiny: bool = False, scope: str = "layers", **overrides) -> FastPathSettings:
    """Issue 17's one-run comparison, sized for ~10 minutes of an H100/H200 (scripts/gpu-check.sh round2).

    Eager bf16, bucketed compiled bf16 (CUDA graphs), jev4's FP8 and torchao's
    compiled FP8 on the grid without batch 128 (measured in round 1, and its
    128 x 2048 points alone take ~45 s a mode); the compiled modes only at the
    two target points (each compile is paid per bucket); the end-to-end rows
    for eager bf16 and torchao FP8 on 1000 mixed-length documents (buckets
    32 x 512 and 32 x 2048); the FP8 nDCG@10 delta on both built-in sets.
    ``scope="layers"`` (regional compilation) because a whole-network compile
    of 36 layers per bucket may not fit the slot; the fusions issue 17 is
    after (RMSNorm, SiLU x up and the attention output into the FP8 casts)
    all happen inside a decoder layer, so regional compilation keeps them.
    """
    base = dict(
        device=device,
        tiny=tiny,
        modes=ROUND2_MODES,
        batches=(1, 8, 32),
        seqs=(128, 512, 2048),
        compiled_points=((1, 128), (32, 512)),
        compile_scope=scope,
        e2e_modes=("torch-bf16", "torch-fp8-torchao"),
        e2e_length_buckets=(512, 2048),
        ndcg_sets=("stdlib-code", "pydoc-pages"),
    )
    return FastPathSettings(**{**base, **overrides})


def parse_points(text: str) -> tuple[tuple[int, int], ...]:
    """``"1x128,32x512"`` -> ((1, 128), (32, 512))."""
    try:
        return tuple((int(b), int(t)) for b, t in (item.strip().split("x") for item in text.split(",") if item.strip()))
    except ValueError:
        raise BenchSettingsError(f"points must look like 1x128,32x512 (batch x seq), got {text!r}") from None


def _round2_args(args: argparse.Namespace) -> dict:
    """Issue 17's options, from the flags jev4/cli/main.py defines (absent flags keep FastPathSettings' defaults)."""
    out: dict = {}
    if getattr(args, "compiled_points", None):
        out["compiled_points"] = parse_points(args.compiled_points)
    if getattr(args, "compile_backend", None):
        out["compile_backend"] = args.compile_backend
    if getattr(args, "compile_scope", None):
        out["compile_scope"] = args.compile_scope
    if getattr(args, "e2e_modes", None):
        out["e2e_modes"] = tuple(m.strip() for m in args.e2e_modes.split(",") if m.strip())
    if getattr(args, "e2e_length_buckets", None):
        out["e2e_length_buckets"] = tuple(int(x) for x in args.e2e_length_buckets.split(","))
    if getattr(args, "ndcg_sets", None):
        out["ndcg_sets"] = tuple(x.strip() for x in args.ndcg_sets.split(",") if x.strip())
    return out


def run_fast_path_bench(args: argparse.Namespace) -> int:
    """CLI entry of ``jev4 bench fast-path``."""
    settings = FastPathSettings(
        device=args.device,
        tiny=args.tiny,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        batches=tuple(int(x) for x in args.batches.split(",")),
        seqs=tuple(int(x) for x in args.seqs.split(",")),
        warmup=args.warmup,
        iters=args.iters,
        corpus_docs=args.corpus_docs,
        corpus_max_length=args.corpus_max_length,
        corpus_batch=args.corpus_batch,
        task=args.task,
        workdir=args.workdir,
        **_round2_args(args),
    )
    if args.export_only:
        if not args.workdir:
            raise BenchSettingsError("--export-only writes the graph into --workdir; give one")
        from jev4.model.config import parse_config
        from jev4.model.synthetic import full_size_config
        from jev4.model.tiny import FULL_SIZE, TinySpec

        spec = TinySpec() if settings.tiny else FULL_SIZE
        timings = export_fp16_graph(spec, parse_config(full_size_config(spec)), Path(args.workdir))
        print(f"fp16 graph in {args.workdir}: {timings['onnx_bytes'] / 1e9:.2f} GB, export {timings['ort_export_s']:.0f} s")
        return 0
    results = run_fast_path(settings, Path(args.out), force=args.force)
    print(markdown(results))
    print(f"results: {args.out}/fast-path.json")
    return 0
