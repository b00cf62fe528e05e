"""``jev4 bench edge``: every CPU edge format of one random-weight checkpoint, in one run, as ratios against torch fp32.

Formats: torch fp32 and bf16 (the --text-only export on the torch backend),
ONNX fp32 (unfused and fused), ONNX weight-only int8 and int4, GGUF F16,
Q8_0 and Q4_0 on llama.cpp. Each is exported from the same source checkpoint
by the real CLI (``jev4-export``) in a child process (wall time, peak RSS),
then measured in a child process of its own (``jev4.bench.edge_worker``):
tokens/s at each batch x length shape, peak RSS, and the single vectors of
the measured batch, which the parent compares with torch fp32's. Children
keep each peak RSS its own, and a format that runs out of memory or fails
is recorded as such instead of ending the run.

``--size full`` is the real architecture (3.8B, random weights: speed and
memory do not depend on weight values); ``--size tiny`` is the tiny
checkpoint, for trying the harness. Retrieval quality (nDCG@10 deltas) on
random weights says nothing, so it is measured by ``jev4 validate`` on the
tiny checkpoint and reported beside (docs/edge.md).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jev4.atomic import atomic_output_dir, claim_output
from jev4.bench.process import machine_summary, measure_child, python_module
from jev4.errors import SettingsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeFormat:
    """One artifact format: how jev4-export makes it (from the source checkpoint) and how the worker loads it."""

    name: str
    export_args: tuple[str, ...]
    artifact: str  # directory name under the workdir; formats that share an export share it
    load_dtype: str = "fp32"  # torch backend only


FORMATS: dict[str, EdgeFormat] = {
    f.name: f
    for f in (
        EdgeFormat("torch-fp32", ("--text-only", "--dtype", "fp32"), "text-only-fp32"),
        EdgeFormat("torch-bf16", ("--text-only", "--dtype", "bf16"), "text-only-bf16", load_dtype="bf16"),
        EdgeFormat("onnx-fp32", ("--format", "onnx", "--text-only", "--dtype", "fp32", "--no-validate"), "onnx-fp32"),
        EdgeFormat("onnx-fused", ("--format", "onnx", "--text-only", "--dtype", "fp32", "--fused", "--no-validate"), "onnx-fused"),
        # weight-only int8/int4 on the fused graph: what an edge team would ship (the unfused int graphs are slower, docs/edge.md)
        EdgeFormat("onnx-int8", ("--format", "onnx", "--text-only", "--dtype", "fp32", "--fused", "--weights", "int8", "--no-validate"), "onnx-fused-int8"),
        EdgeFormat("onnx-int4", ("--format", "onnx", "--text-only", "--dtype", "fp32", "--fused", "--weights", "int4", "--no-validate"), "onnx-fused-int4"),
        EdgeFormat("gguf-f16", ("--format", "gguf", "--gguf-type", "f16"), "gguf-f16"),
        EdgeFormat("gguf-q8_0", ("--format", "gguf", "--gguf-type", "q8_0"), "gguf-q8_0"),
        EdgeFormat("gguf-q4_0", ("--format", "gguf", "--gguf-type", "q4_0"), "gguf-q4_0"),
    )
}
BASELINE = "torch-fp32"
SHAPES = ((1, 128), (1, 512), (8, 512))


@dataclass(frozen=True)
class EdgeBenchSettings:
    workdir: str  # source checkpoint and artifacts (tens of GB at full size)
    out: str  # results: edge.json, edge.md, edge.png
    size: str = "full"
    formats: tuple[str, ...] = tuple(FORMATS)
    shapes: tuple[tuple[int, int], ...] = SHAPES
    repeats: int = 2
    keep: bool = True  # keep artifacts for a later run
    force: bool = False

    def __post_init__(self) -> None:
        if self.size not in ("full", "tiny"):
            raise SettingsError(f"--size {self.size!r}: full or tiny")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise SettingsError(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
        if BASELINE not in self.formats:
            raise SettingsError(f"the formats must include the baseline {BASELINE} (every figure is a ratio against it)")
        if self.repeats < 1 or any(b < 1 or t < 8 for b, t in self.shapes):
            raise SettingsError(f"repeats >= 1 and shapes of batch >= 1 x length >= 8, got {self.repeats} and {self.shapes}")


@dataclass
class FormatResult:
    name: str
    export_s: float | None = None
    export_peak_rss_gib: float | None = None
    artifact_bytes: int | None = None
    run_peak_rss_gib: float | None = None
    load_s: float | None = None
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # "BxT" -> tokens/s
    single_cosine_min: float | None = None  # vs the baseline, on the largest measured batch
    single_cosine_mean: float | None = None
    error: str = ""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _source(settings: EdgeBenchSettings, work: Path) -> Path:
    """The random-weight source checkpoint, written once per workdir and size."""
    source = work / f"source-{settings.size}"
    if not (source / "config.json").is_file():
        step = measure_child(python_module("jev4.bench.write_full_size", str(source), settings.size))
        if step.returncode:
            raise RuntimeError(f"writing the {settings.size} random checkpoint failed (exit {step.returncode})")
    return source


def _export(fmt: EdgeFormat, source: Path, work: Path, result: FormatResult) -> Path | None:
    artifact = work / f"{fmt.artifact}-{source.name.removeprefix('source-')}"
    if (artifact / "jev4-manifest.json").is_file():
        log.info("%s: reusing %s", fmt.name, artifact)
    else:
        command = python_module("jev4.cli.export", "--model", str(source), "--adapter", "retrieval", "--out", str(artifact), "--force", "--no-progress", *fmt.export_args)
        step = measure_child(command)
        result.export_s, result.export_peak_rss_gib = step.seconds, step.peak_rss_gib
        if step.returncode:
            killed = ", killed: out of memory?" if step.returncode in (-9, 137) else ""
            result.error = f"export failed (exit {step.returncode}{killed}, peak RSS {step.peak_rss_gib:.1f} GiB): {' '.join(command[3:])}"
            return None
    result.artifact_bytes = _dir_bytes(artifact)
    return artifact


def _measure(fmt: EdgeFormat, artifact: Path, settings: EdgeBenchSettings, work: Path, result: FormatResult) -> np.ndarray | None:
    report = work / f"run-{fmt.name}.json"
    vectors = work / f"run-{fmt.name}.npy"
    shapes = ",".join(f"{b}x{t}" for b, t in settings.shapes)
    command = python_module("jev4.bench.edge_worker", str(artifact), "--dtype", fmt.load_dtype, "--shapes", shapes, "--repeats", str(settings.repeats),
                            "--report", str(report), "--vectors", str(vectors))  # fmt: skip
    step = measure_child(command)
    result.run_peak_rss_gib = step.peak_rss_gib
    if step.returncode:
        result.error = f"run failed (exit {step.returncode}{', killed: out of memory?' if step.returncode in (-9, 137) else ''})"
        return None
    measured = json.loads(report.read_text())
    result.load_s, result.tokens_per_s = measured["load_s"], measured["tokens_per_s"]
    return np.load(vectors)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def run_edge_bench(settings: EdgeBenchSettings) -> dict:
    """Export and measure every format; write edge.json, edge.md and edge.png to ``settings.out``."""
    work = Path(settings.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with claim_output(settings.out, settings.force, (str(work),)):
        source = _source(settings, work)
        order = [BASELINE] + [f for f in settings.formats if f != BASELINE]
        results: list[FormatResult] = []
        baseline_vectors = None
        for name in order:
            fmt, result = FORMATS[name], FormatResult(name)
            results.append(result)
            artifact = _export(fmt, source, work, result)
            vectors = None if artifact is None else _measure(fmt, artifact, settings, work, result)
            if name == BASELINE:
                baseline_vectors = vectors
            elif vectors is not None and baseline_vectors is not None:
                cos = _cosines(vectors, baseline_vectors)
                result.single_cosine_min, result.single_cosine_mean = float(cos.min()), float(cos.mean())
            if artifact is not None and not settings.keep and name != BASELINE:
                shutil.rmtree(artifact, ignore_errors=True)
            log.info("%s: %s", name, result)
            (work / "edge-partial.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")  # a long run's results so far
        summary = {"settings": asdict(settings), "machine": machine_summary(), "source_bytes": _dir_bytes(source), "formats": [asdict(r) for r in results]}
        with atomic_output_dir(settings.out, force=settings.force) as tmp:
            (tmp / "edge.json").write_text(json.dumps(summary, indent=2) + "\n")
            (tmp / "edge.md").write_text(edge_table(summary))
            plot_edge(summary, tmp / "edge.png")
    return summary


def edge_table(summary: dict) -> str:
    """Markdown: size, peak RSS, tokens/s per shape (with the ratio to torch fp32), and parity, one row per format."""
    shapes = [f"{b}x{t}" for b, t in summary["settings"]["shapes"]]
    base = next(f for f in summary["formats"] if f["name"] == BASELINE)
    header = "| format | size GB | run peak RSS GiB | " + " | ".join(f"tokens/s {s} (x fp32)" for s in shapes) + " | single-vector cosine vs fp32 (min) | export s / peak GiB |"
    rows = [header, "|---|---:|---:|" + "---:|" * len(shapes) + "---:|---:|"]
    for f in summary["formats"]:
        if f["error"]:
            export = f"{f['export_s']:.0f} / {f['export_peak_rss_gib']:.1f}" if f["export_s"] is not None else ""
            rows.append(f"| {f['name']} | {_gb(f['artifact_bytes'])} | | " + " | " * len(shapes) + f"{f['error']} | {export} |")
            continue
        speeds = []
        for s in shapes:
            value, ref = f["tokens_per_s"].get(s), base["tokens_per_s"].get(s)
            speeds.append(f"{value:.1f} ({value / ref:.2f}x)" if value and ref else "-")
        cosine = "1 (baseline)" if f["name"] == BASELINE else (f"{f['single_cosine_min']:.5f}" if f["single_cosine_min"] is not None else "-")
        export = f"{f['export_s']:.0f} / {f['export_peak_rss_gib']:.1f}" if f["export_s"] is not None else "reused"
        rows.append(f"| {f['name']} | {_gb(f['artifact_bytes'])} | {f['run_peak_rss_gib']:.1f} | " + " | ".join(speeds) + f" | {cosine} | {export} |")
    return "\n".join(rows) + "\n"


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def plot_edge(summary: dict, png: Path) -> Path:
    """Two panels: tokens/s relative to torch fp32 per shape, and artifact size; one bar group per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = [f for f in summary["formats"] if not f["error"]]
    base = next(f for f in formats if f["name"] == BASELINE)
    shapes = [f"{b}x{t}" for b, t in summary["settings"]["shapes"]]
    fig, (speed_ax, size_ax) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(shapes)
    x = np.arange(len(formats))
    for i, shape in enumerate(shapes):
        ratios = [f["tokens_per_s"].get(shape, 0) / base["tokens_per_s"][shape] for f in formats]
        speed_ax.bar(x + i * width - 0.4 + width / 2, ratios, width, label=f"batch x length {shape}")
    speed_ax.axhline(1.0, color="black", linewidth=0.8)
    speed_ax.set_xticks(x, [f["name"] for f in formats], rotation=30, ha="right")
    speed_ax.set_ylabel("tokens/s relative to torch fp32")
    speed_ax.legend(fontsize=8)
    speed_ax.grid(True, axis="y", alpha=0.3)
    size_ax.bar(x, [f["artifact_bytes"] / 1e9 for f in formats], color="#888")
    size_ax.set_xticks(x, [f["name"] for f in formats], rotation=30, ha="right")
    size_ax.set_ylabel("artifact size (GB)")
    size_ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"CPU edge formats, {summary['settings']['size']} size, {summary['machine']['cpus']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
