"""``jev4 bench encode``: throughput, latency and memory of the torch reference at full size.

The network is the real architecture with random weights built in memory
(performance does not depend on weight values). Two modes: ``unmerged`` is
upstream's way (bf16 base, fp32 task LoRA applied per sample) and
``merged`` is the same network with the adapter folded in (no LoRA layers).
Timing covers the forward pass plus pooling on ready device tensors;
tokenisation is not included. CUDA events time each call.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jev4.bench.process import machine_summary
from jev4.model.pooling import multi_vector, single_vector
from jev4.model.preprocess import text_position_ids

log = logging.getLogger(__name__)

# Datasheet dense bf16 peak (TFLOP/s) for MFU; leads, not measurements.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass
class EncodePoint:
    mode: str
    batch: int
    seq: int
    tokens_per_s: float
    docs_per_s: float
    p50_ms: float
    p99_ms: float
    peak_mem_gib: float
    mfu: float | None


def text_flops_per_token(hidden: int, layers: int, inter: int, kv_dim: int, seq: int, proj: int) -> float:
    """Forward FLOPs per token: 2 x matmul params + causal attention (QK^T and PV, half the square)."""
    per_layer = 2 * (hidden * hidden * 2 + hidden * kv_dim * 2 + 3 * hidden * inter)
    attention = 2 * 2 * hidden * seq / 2
    return layers * (per_layer + attention) + 2 * hidden * proj


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run_encode_bench(args: argparse.Namespace) -> int:
    from jev4.model.adapters import AdapterSet, LoraSettings, TaskLora
    from jev4.model.network import attach_adapters, linear_shapes
    from jev4.model.synthetic import random_network
    from jev4.model.tiny import FULL_SIZE, TASKS, adapted_modules

    device = torch.device(args.device)
    spec = FULL_SIZE
    points: list[EncodePoint] = []
    batches = [int(x) for x in args.batches.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    kv_dim = spec.hidden_size // spec.heads * spec.kv_heads
    peak = _peak_tflops(device)
    for mode in args.modes.split(","):
        net = random_network(spec, dtype=args.dtype, device=str(device))
        if mode == "unmerged":
            gen = torch.Generator().manual_seed(1)
            shapes = linear_shapes(net)
            modules = {
                m: {t: TaskLora(torch.randn(spec.lora_r, shapes[m][1], generator=gen) * 0.01, torch.randn(shapes[m][0], spec.lora_r, generator=gen) * 0.01, 1.0) for t in TASKS}
                for m in adapted_modules(spec.layers)
            }
            selector = attach_adapters(net, AdapterSet(Path("random"), LoraSettings(spec.lora_r, spec.lora_alpha, False), tuple(TASKS), modules))
        elif mode != "merged":
            raise SystemExit(f"unknown mode {mode!r}: use unmerged and/or merged")
        for batch in batches:
            for seq in seqs:
                ids = torch.randint(0, 150000, (batch, seq), device=device)
                mask = torch.ones(batch, seq, dtype=torch.long, device=device)
                pos = text_position_ids(mask)

                def step() -> None:
                    out = net(input_ids=ids, attention_mask=mask, position_ids=pos)
                    single_vector(out.hidden, mask)
                    multi_vector(out.projected, mask)

                try:
                    times = _time(step, device, args.warmup, args.iters, mode == "unmerged" and selector, batch)
                except torch.OutOfMemoryError:
                    log.warning("%s b=%d s=%d: out of memory", mode, batch, seq)
                    torch.cuda.empty_cache()
                    continue
                p50 = statistics.median(times)
                p99 = sorted(times)[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
                tps = batch * seq / p50
                flops = text_flops_per_token(spec.hidden_size, spec.layers, spec.intermediate_size, kv_dim, seq, spec.multi_vector_dim)
                mem = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0
                point = EncodePoint(mode, batch, seq, tps, batch / p50, p50 * 1e3, p99 * 1e3, mem, tps * flops / (peak * 1e12) if peak else None)
                points.append(point)
                log.info("%s", point)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"machine": machine_summary(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype, "points": [asdict(p) for p in points]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.results:
        Path(args.results).write_text(text + "\n")
    return 0


def _time(step, device: torch.device, warmup: int, iters: int, selector, batch: int) -> list[float]:
    from contextlib import nullcontext

    ctx = selector.select(["retrieval"] * batch, device) if selector else nullcontext()
    times = []
    with torch.inference_mode(), ctx:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup + iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                step()
                elapsed = time.perf_counter() - t0
            if i >= warmup:
                times.append(elapsed)
    return times
