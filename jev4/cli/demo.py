"""``jev4 demo``: the whole path on the built-in tiny checkpoint, ending with a verdict.

Writes the tiny checkpoint, merges the retrieval adapter and compares the
merged checkpoint with the reference (unmerged LoRA) on a few texts and an
image; then exports the ONNX artifact and runs ``jev4 validate`` on it
(probe-set parity and retrieval on the built-in code-search set). Exit code 1
if anything is below its bar.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("jev4.demo")

DEMO_TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "def mean_pool(hidden, mask): return (hidden * mask).sum(1) / mask.sum(1)",
    "Die Hauptstadt von Deutschland ist Berlin.",
    "日本の首都は東京です。",
]
PARITY_BAR = 0.99999


@dataclass
class ParityRow:
    name: str
    min_cosine: float

    @property
    def ok(self) -> bool:
        return self.min_cosine >= PARITY_BAR


def demo_image(width: int = 160, height: int = 120) -> Image.Image:
    """A deterministic picture (gradients and a square), so the demo needs no files."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = [250, 30, 30]
    return Image.fromarray(rgb.astype(np.uint8))


def min_cosine(a: torch.Tensor | list[torch.Tensor], b: torch.Tensor | list[torch.Tensor]) -> float:
    """Smallest cosine between matching rows (vectors or per-token multi-vectors)."""
    if isinstance(a, list):
        return min(min_cosine(x, y) for x, y in zip(a, b, strict=True))
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def parity_rows(reference, candidate, task: str) -> list[ParityRow]:
    image = [demo_image()]
    rows = []
    for prompt in ("query", "passage"):
        rows.append(ParityRow(f"text {prompt} single", min_cosine(candidate.encode_text(DEMO_TEXTS, task=task, prompt_name=prompt), reference.encode_text(DEMO_TEXTS, task=task, prompt_name=prompt))))
    rows.append(ParityRow("text multi-vector", min_cosine(candidate.encode_text(DEMO_TEXTS, task=task, return_multivector=True), reference.encode_text(DEMO_TEXTS, task=task, return_multivector=True))))
    rows.append(ParityRow("image single", min_cosine(candidate.encode_image(image, task=task), reference.encode_image(image, task=task))))
    rows.append(ParityRow("image multi-vector", min_cosine(candidate.encode_image(image, task=task, return_multivector=True), reference.encode_image(image, task=task, return_multivector=True))))
    return rows


def run_demo(args: argparse.Namespace) -> int:
    from jev4.export.merge import MergeSettings, merge_checkpoint
    from jev4.model.encoder import TorchEncoder
    from jev4.model.tiny import write_tiny_checkpoint

    work = Path(args.workdir)
    tiny = write_tiny_checkpoint(work / "tiny", seed=args.seed, force=True)
    merged = merge_checkpoint(
        MergeSettings(model=str(tiny), adapter=args.adapter, out=str(work / f"merged-{args.adapter}"), dtype="fp32", force=True)
    )
    reference = TorchEncoder.from_pretrained(tiny, dtype="fp32")
    candidate = TorchEncoder.from_pretrained(merged, dtype="fp32")
    rows = parity_rows(reference, candidate, args.adapter)
    print(f"\nmerged ({merged}) vs reference with unmerged {args.adapter!r} LoRA, fp32:")
    print(f"  {'output':<24}{'min cosine':>14}{'1 - cos':>12}  ok (>= {PARITY_BAR})")
    for row in rows:
        print(f"  {row.name:<24}{row.min_cosine:>14.9f}{1 - row.min_cosine:>12.1e}  {'yes' if row.ok else 'NO'}")
    merge_ok = all(row.ok for row in rows)
    print(f"\nmerge parity: {'PASS' if merge_ok else 'FAIL'}")

    from jev4.export.onnx import OnnxExportSettings, export_onnx
    from jev4.validate.runner import ValidateSettings, validate

    artifact = export_onnx(OnnxExportSettings(model=str(tiny), adapter=args.adapter, out=str(work / f"onnx-{args.adapter}"), force=True))
    report_dir = work / "report"
    report = validate(
        ValidateSettings(
            reference=str(tiny),
            adapter=args.adapter,
            artifact=str(artifact),
            out=str(report_dir),
            datasets=("stdlib-code",),
            max_queries=100,
            max_docs=400,
            batch_size=16,
            force=True,
        )
    )
    print(f"\njev4 validate {artifact} (ONNX, onnxruntime CPU) vs the reference:")
    print(f"verdict: {'PASS' if report.passed else 'FAIL'} ({len(report.checks) - len(report.failures)}/{len(report.checks)} checks passed)")
    for check in report.failures:
        print(f"  failed: {check.describe()}")
    print(f"report: {report_dir / 'report.html'}")
    return 0 if merge_ok and report.passed else 1
