"""``jev4 bench ort``: onnxruntime (CUDA EP) vs the torch reference at full size, in one run.

Builds the full-size network with random weights in memory, exports the
text-only language graph in the chosen dtype (fp16 by default) exactly as
``jev4-export --format onnx --text-only`` does, then times the same batch x
sequence points on onnxruntime (inputs and outputs bound on the device with
IOBinding, so no host copies are timed) and on torch (bf16, merged network).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from jev4.bench.encode import EncodePoint, _peak_tflops, text_flops_per_token
from jev4.bench.process import machine_summary

log = logging.getLogger(__name__)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _point(mode: str, batch: int, seq: int, times: list[float], mem_gib: float, flops_per_token: float, peak: float | None) -> EncodePoint:
    p50 = statistics.median(times)
    tps = batch * seq / p50
    return EncodePoint(mode, batch, seq, tps, batch / p50, p50 * 1e3, _percentile(times, 0.99) * 1e3, mem_gib, tps * flops_per_token / (peak * 1e12) if peak else None)


def run_ort_bench(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from jev4.export.onnx import export_language_graph
    from jev4.model.config import parse_config
    from jev4.model.pooling import multi_vector, single_vector
    from jev4.model.preprocess import text_position_ids
    from jev4.model.synthetic import full_size_config, random_network
    from jev4.model.tiny import FULL_SIZE
    from jev4.runtime.providers import check_session_providers, provider_list

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when onnxruntime-gpu is installed beside them
    spec = FULL_SIZE
    config = parse_config(full_size_config(spec))
    batches = [int(x) for x in args.batches.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    kv_dim = spec.hidden_size // spec.heads * spec.kv_heads
    device = torch.device("cuda")
    peak = _peak_tflops(device)
    points: list[EncodePoint] = []
    timings: dict[str, float] = {}

    started = time.perf_counter()
    network = random_network(spec, dtype=args.dtype, device="cpu")
    del network.model.visual
    timings["build_random_network_s"] = time.perf_counter() - started
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jev4-ort-"))
    work.mkdir(parents=True, exist_ok=True)
    log.info("random network built in %.1f s; exporting to %s", timings["build_random_network_s"], work)
    started = time.perf_counter()
    export_language_graph(network, config, work, opset=18, with_images=False)
    timings["export_s"] = time.perf_counter() - started
    timings["onnx_bytes"] = sum(p.stat().st_size for p in work.iterdir() if p.is_file())
    log.info("exported in %.1f s (%.2f GB)", timings["export_s"], timings["onnx_bytes"] / 1e9)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    started = time.perf_counter()
    session = ort.InferenceSession(str(work / "language.onnx"), sess_options=options, providers=provider_list("cuda"))
    check_session_providers(session, "cuda", "language.onnx")
    timings["session_create_s"] = time.perf_counter() - started

    net_torch = network.to(device=device, dtype=torch.bfloat16).eval()
    rng = np.random.default_rng(0)
    for batch in batches:
        for seq in seqs:
            flops = text_flops_per_token(spec.hidden_size, spec.layers, spec.intermediate_size, kv_dim, seq, spec.multi_vector_dim)
            ids = rng.integers(0, 150000, size=(batch, seq)).astype(np.int64)
            mask = np.ones((batch, seq), dtype=np.int64)
            pos = np.ascontiguousarray(np.broadcast_to(np.arange(seq, dtype=np.int64), (3, batch, seq)))
            binding = session.io_binding()
            for name, value in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos), ("pooling_mask", mask)):
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            for name in ("single_vector", "multi_vector"):
                binding.bind_output(name, "cuda", 0)
            try:
                times = []
                for i in range(args.warmup + args.iters):
                    t0 = time.perf_counter()
                    session.run_with_iobinding(binding)
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                mem = torch.cuda.mem_get_info()
                used = (mem[1] - mem[0]) / 1024**3
                points.append(_point(f"ort-cuda-{args.dtype}", batch, seq, times, used, flops, peak))
            except Exception as exc:  # an out-of-memory point is reported, not fatal
                log.warning("ort b=%d s=%d failed: %s", batch, seq, exc)

            t_ids, t_mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            t_pos = text_position_ids(t_mask)
            times = []
            torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode():
                for i in range(args.warmup + args.iters):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = net_torch(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos)
                    single_vector(out.hidden, t_mask)
                    multi_vector(out.projected, t_mask)
                    end.record()
                    end.synchronize()
                    if i >= args.warmup:
                        times.append(start.elapsed_time(end) / 1e3)
            points.append(_point("torch-bf16", batch, seq, times, torch.cuda.max_memory_allocated(device) / 1024**3, flops, peak))
            log.info("b=%d s=%d: %s", batch, seq, [f"{p.mode} {p.tokens_per_s:,.0f} tok/s" for p in points[-2:]])

    result = {
        "machine": machine_summary(),
        "device": torch.cuda.get_device_name(device),
        "onnxruntime": ort.__version__,
        "dtype": args.dtype,
        "timings": timings,
        "points": [asdict(p) for p in points],
        "note": "ort peak_mem_gib is device memory in use (cudaMemGetInfo) with torch's weights also resident; torch's is max_memory_allocated",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.results:
        Path(args.results).write_text(text + "\n")
    return 0
