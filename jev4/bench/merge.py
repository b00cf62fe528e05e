"""``jev4 bench merge``: time and peak memory of exports (merge, ONNX) of a full-size (3.8B, bf16) random checkpoint.

Each step runs in its own child process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from jev4.bench.process import machine_summary, measure_child, python_module

log = logging.getLogger(__name__)


EXPORTS = {
    "merge": (
        ("merge retrieval (bf16 out)", "merged", []),
        ("merge retrieval --text-only (bf16 out)", "merged-text", ["--text-only"]),
    ),
    "onnx": (("onnx export retrieval --text-only --dtype fp16", "onnx-text-fp16", ["--format", "onnx", "--text-only", "--dtype", "fp16", "--no-validate"]),),
}


def _reusable_source(source: Path) -> bool:
    """Whether an earlier run's checkpoint can be reused; one written before the writer added a tokenizer is rewritten."""
    from jev4.model.preprocess import missing_tokenizer_files

    if not (source / "config.json").is_file():
        return False
    missing = missing_tokenizer_files(source)
    if missing:
        log.info("%s has no tokenizer files (%s): writing it again", source, ", ".join(missing))
    return not missing


def run_merge_bench(args: argparse.Namespace) -> int:
    """Write the full-size source once, then time each export of ``args.exports`` in a child process."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "full-size-bf16"
    results: dict = {"machine": machine_summary(), "steps": {}}
    if not _reusable_source(source):
        step = measure_child(python_module("jev4.bench.write_full_size", str(source)))
        results["steps"]["write random full-size checkpoint"] = step.__dict__
        if step.returncode:
            return step.returncode
    results["source_bytes"] = sum(p.stat().st_size for p in source.rglob("*.safetensors"))
    for label, name, extra in EXPORTS[args.exports]:
        out = work / name
        cmd = python_module("jev4.cli.export", "--model", str(source), "--adapter", "retrieval", "--out", str(out), "--force", "--no-progress", *extra)
        step = measure_child(cmd)
        step_dict = step.__dict__ | {"out_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0}
        results["steps"][label] = step_dict
        log.info("%s: %.1f s, peak RSS %.2f GiB", label, step.seconds, step.peak_rss_gib)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        if step.returncode:
            return step.returncode
    text = json.dumps(results, indent=2)
    print(text)
    if args.results:
        Path(args.results).write_text(text + "\n")
    return 0
