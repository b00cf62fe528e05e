"""Issue 17's acceptance figures from one ``jev4 bench fast-path`` run: speed ratios, batch-1 latency, FP8 nDCG@10 delta.

Kept apart from the timing code so that the targets are computed (and
tested) from the results JSON alone, whether or not a target is met, with
the reason written next to each figure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["FP8_SPEEDUP_TARGET", "LATENCY_TARGET_MS", "Targets", "fp8_ndcg_rows", "target_report"]

FP8_SPEEDUP_TARGET = 1.6  # FP8 tokens/s over eager bf16 at 32 x 512
SPEEDUP_POINT = (32, 512)
LATENCY_TARGET_MS = 10.0  # batch 1 x 128, bf16, p50
LATENCY_POINT = (1, 128)
REFERENCE_MODE = "torch-bf16"
FP8_MODES = ("torch-fp8", "torch-fp8-torchao")
BF16_MODES = ("torch-bf16", "torch-bf16-bucketed")


@dataclass(frozen=True)
class Targets:
    fp8_speedup: float = FP8_SPEEDUP_TARGET
    latency_ms: float = LATENCY_TARGET_MS


def _point(points: list[dict], mode: str, where: tuple[int, int]) -> dict | None:
    return next((p for p in points if p["mode"] == mode and (p["batch"], p["seq"]) == where), None)


def target_report(points: list[dict], ndcg: list[dict], targets: Targets = Targets()) -> dict:
    """Every target with its measured value, whether it is met, or why it could not be computed."""
    out: dict[str, list[dict]] = {"fp8_speedup_32x512": [], "bf16_latency_1x128": [], "fp8_ndcg10_delta": []}
    ref = _point(points, REFERENCE_MODE, SPEEDUP_POINT)
    for mode in FP8_MODES:
        got = _point(points, mode, SPEEDUP_POINT)
        row = {"mode": mode, "target": targets.fp8_speedup}
        if got is None or ref is None:
            row["missing"] = f"no {'torch-bf16' if ref is None else mode} point at {SPEEDUP_POINT[0]}x{SPEEDUP_POINT[1]} in this run"
        else:
            ratio = got["tokens_per_s"] / ref["tokens_per_s"]
            row.update(ratio=ratio, tokens_per_s=got["tokens_per_s"], reference_tokens_per_s=ref["tokens_per_s"], met=ratio >= targets.fp8_speedup)
        out["fp8_speedup_32x512"].append(row)
    for mode in BF16_MODES:
        got = _point(points, mode, LATENCY_POINT)
        row = {"mode": mode, "target_ms": targets.latency_ms}
        if got is None:
            row["missing"] = f"no {mode} point at {LATENCY_POINT[0]}x{LATENCY_POINT[1]} in this run"
        else:
            row.update(p50_ms=got["p50_ms"], met=got["p50_ms"] <= targets.latency_ms)
        out["bf16_latency_1x128"].append(row)
    for row in ndcg:
        out["fp8_ndcg10_delta"].append({**row, "met": row.get("delta") is not None and abs(row["delta"]) <= row["threshold"]})
    return out


def fp8_ndcg_rows(modes: tuple[str, ...], datasets: tuple[str, ...], device: str, max_queries: int, max_docs: int, skip: dict[str, str]) -> list[dict]:
    """nDCG@10 of each FP8 mode vs the fp32 reference on the tiny checkpoint, per built-in set.

    The tiny checkpoint because nDCG on random full-size weights means
    nothing; the threshold is the one tests/runtime/test_torch_fp8.py holds
    the FP8 path to: at most two queries' worth of rank changes (2 / queries).
    ``skip`` maps a mode to why it cannot run here (recorded, not run).
    """
    import tempfile
    from pathlib import Path

    import jev4.runtime as rt
    from jev4.datasets import resolve_dataset
    from jev4.model.tiny import write_tiny_checkpoint
    from jev4.runtime.torch_compiled import CompileSettings
    from jev4.validate.retrieval import run_retrieval

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="jev4-fast-path-ndcg-") as tmp:
        tiny = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        reference = rt.load(tiny, backend="torch", dtype="fp32")
        dtype = "bf16" if device.startswith("cuda") else "fp32"
        for mode in (m for m in modes if m in FP8_MODES):
            if mode in skip:
                rows += [{"mode": mode, "dataset": name, "delta": None, "threshold": None, "skipped": skip[mode]} for name in datasets]
                continue
            if mode == "torch-fp8":
                candidate = rt.load(tiny, backend="torch", quantization="fp8", task="code", dtype=dtype, device=device)
            else:  # every retrieval batch (32 x <= 128 tokens) in one bucket: one compile
                one_bucket = CompileSettings(batch_buckets=(32,), length_buckets=(128,), scope="layers")
                candidate = rt.load(tiny, backend="torch", quantization="fp8-torchao", task="code", dtype=dtype, device=device, compile=one_bucket)
            for name in datasets:
                data = resolve_dataset(name, max_queries=max_queries, max_docs=max_docs)
                results = run_retrieval(reference, candidate, data, "code", multivector=False, batch_size=32, max_length=128, progress=False)
                full = next(r for r in results if r.scoring == "single" and r.dim == reference.config.hidden_size)
                rows.append(
                    {
                        "mode": mode,
                        "dataset": name,
                        "queries": full.queries,
                        "reference": full.reference["ndcg@10"],
                        "fp8": full.artifact["ndcg@10"],
                        "delta": full.delta["ndcg@10"],
                        "threshold": 2 / full.queries,
                    }
                )
                log.info("nDCG@10 %s %s: %+.4f (threshold %.4f)", mode, name, rows[-1]["delta"], rows[-1]["threshold"])
    return rows
