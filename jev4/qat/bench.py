"""``jev4 bench qat``: training speed and memory of ``jev4 qat`` (steps/s, pairs/s, tokens/s, peak memory).

It runs the trainer's own step (``train_step``: forward of queries and
documents, the quantized InfoNCE, backward into the task's LoRA, AdamW) on
built-in stdlib-code pairs for a few batch sizes, with the settings a real
run would use on a GPU (bf16 backbone, fp32 LoRA, gradient checkpointing).
Weight values do not change speed or memory, so the full-size random-weight
checkpoint (``python -m jev4.bench.write_full_size DIR``) measures what the
real model would. Evaluation and checkpointing are not timed: they run every
``--eval-every`` steps and cost one inference pass over the held-out split.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jev4.bench.process import machine_summary
from jev4.qat.data import load_split
from jev4.qat.trainer import QATSettings, batch_indices, prepare, train_step

log = logging.getLogger(__name__)


@dataclass
class QATPoint:
    batch: int
    steps_per_s: float | None
    pairs_per_s: float | None
    tokens_per_s: float | None  # query + document tokens (no padding) per second
    step_ms: float | None
    peak_mem_gib: float | None  # CUDA: max allocated; CPU: peak RSS of the process
    error: str | None = None


def _tokens(state, settings: QATSettings, rows) -> int:
    from jev4.model.preprocess import text_prefix

    pre = state.encoder.preprocessor
    total = 0
    for prompt, items in (("query", [p.query for p in rows]), ("passage", [p.positive for p in rows] + [p.negative for p in rows if p.negative])):
        texts = [text_prefix(settings.adapter, prompt) + it.value for it in items if not it.is_image]
        if texts:
            total += int(pre.text_inputs(texts, settings.max_length).attention_mask.sum())
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(settings: QATSettings, steps: int, warmup: int) -> QATPoint:
    """Time ``steps`` training steps after ``warmup`` untimed ones, on a fresh model."""
    device = torch.device(settings.device)
    split = load_split(settings.data, min(settings.held_out, 8), settings.seed, settings.data_size)
    state = prepare(settings)
    batches = [[split.train[i] for i in batch_indices(s, settings.batch_size, len(split.train), settings.seed)] for s in range(warmup + steps)]
    for s in range(warmup):
        train_step(state, settings, batches[s], s)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = sum(_tokens(state, settings, rows) for rows in batches[warmup:])
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        train_step(state, settings, batches[s], s)
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1024**3
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    return QATPoint(settings.batch_size, steps / seconds, steps * settings.batch_size / seconds, tokens / seconds, 1e3 * seconds / steps, peak)


def run_qat_bench(args: argparse.Namespace) -> int:
    """The CLI entry: one point per batch size; a CUDA out-of-memory is recorded, not fatal."""
    base = QATSettings(
        model=args.model,
        adapter=args.adapter,
        precision=None if args.precision == "float" else args.precision,
        data=args.data,
        out="(not written)",
        quantize=args.quantize,
        scaling=args.scaling,
        multivector_weight=args.multivector_weight,
        max_length=args.max_length,
        data_size=args.data_size,
        device=args.device,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        held_out=8,
        progress=False,
    )
    points = []
    for batch in (int(b) for b in args.batches.split(",")):
        settings = QATSettings(**{**asdict(base), "batch_size": batch})
        try:
            point = measure(settings, args.steps, args.warmup)
        except torch.OutOfMemoryError as exc:
            point = QATPoint(batch, None, None, None, None, None, error=f"out of memory: {str(exc).splitlines()[0]}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        points.append(point)
        if point.error:
            print(f"batch {batch:4d}: {point.error}")
        else:
            print(f"batch {batch:4d}: {point.steps_per_s:7.2f} steps/s  {point.pairs_per_s:8.1f} pairs/s  {point.tokens_per_s:10.0f} tokens/s  peak {point.peak_mem_gib:6.2f} GiB")
    info = machine_summary()
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    report = {"settings": {k: v for k, v in vars(args).items() if k != "handler"}, "machine": info, "points": [asdict(p) for p in points]}
    if args.results:
        Path(args.results).write_text(json.dumps(report, indent=1) + "\n")
        log.info("wrote %s", args.results)
    return 0 if any(p.error is None for p in points) else 1
