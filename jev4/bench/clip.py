"""``jev4 bench clip``: jina-clip-v2 at full size with random weights: parameter counts, ONNX export cost, CPU speed.

Why it is built this way:

- **Random weights, real shape.** The real weights cannot be downloaded here
  (and CC-BY-NC-4.0 forbids shipping them); speed and memory do not depend
  on weight values. The source checkpoint is written in upstream's exact
  layout (``checkpoint.expected_layout``, bf16 like upstream) by
  ``jev4.bench.clip_worker write``, so the parameter counts are read from
  the file that is exported, not from a table.
- **Every step in a child process** (``run_step``): the export by the real
  CLI (``python -m jev4.cli.export``), each measurement by
  ``jev4.bench.clip_worker measure``. Its ``wait4`` rusage gives a peak RSS
  that is that step's alone, and a step that fails, is killed for memory or
  passes its time limit is recorded in the results instead of ending the run.
- **Partial results stay.** After every step OUT is republished whole
  (``jev4.atomic``: written aside, renamed into place) with what is known so
  far and ``complete: false``, so a run stopped after an hour still leaves
  its figures, and OUT is never half-written.
- **Parity on the measured batch.** Each format's warm-up vectors (full
  1024 dims, normalised) are compared with torch fp32's on the same inputs;
  the export's own self-check cosines (random probes) are copied from its
  manifest beside them.

``--size tiny`` runs the same harness on the tiny checkpoint (tests).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jev4.atomic import atomic_output_dir, claim_output
from jev4.bench.process import machine_summary, python_module
from jev4.errors import SettingsError

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "ClipBenchSettings", "ClipFormat", "count_parameters", "plot_clip", "run_clip_bench", "run_step", "table"]

# Published sizes (shared/CLIP_V2.md; Jina's model card): vision 304.38M, text 561M including the LoRA.
PUBLISHED = {"vision_millions": 304.38, "text_millions": 561}


@dataclass(frozen=True)
class ClipFormat:
    """One measured format: the jev4-export flags that make it from the source (None: the source checkpoint itself, on torch)."""

    name: str
    export_args: tuple[str, ...] | None


FORMATS: dict[str, ClipFormat] = {
    f.name: f
    for f in (
        ClipFormat("torch-fp32", None),
        ClipFormat("onnx-fp32", ()),
        ClipFormat("onnx-fp16", ("--dtype", "fp16")),
        ClipFormat("onnx-int8", ("--weights", "int8")),  # fp32 graph, onnxruntime dynamic int8 weights (for CPU)
    )
}
BASELINE = "torch-fp32"


@dataclass(frozen=True)
class ClipBenchSettings:
    """What ``jev4 bench clip`` runs; recorded verbatim in clip.json."""

    out: str  # clip.json, clip.md, clip.png
    size: str = "full"
    workdir: str | None = None  # source checkpoint and artifacts (~9 GB at full size); default OUT + "-work"
    keep: bool = False  # keep what the run wrote there (a later run with the same workdir reuses the checkpoint); else removed
    formats: tuple[str, ...] = tuple(FORMATS)
    text_shapes: tuple[tuple[int, int], ...] = ((8, 512), (1, 128))
    image_batch: int = 4
    repeats: int = 2
    step_timeout_s: float = 3600.0
    force: bool = False

    def __post_init__(self) -> None:
        if self.size not in ("full", "tiny"):
            raise SettingsError(f"--size {self.size!r}: full or tiny")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise SettingsError(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
        if BASELINE not in self.formats:
            raise SettingsError(f"the formats must include the baseline {BASELINE} (the cosines are against it)")
        if self.repeats < 1 or self.image_batch < 1 or any(b < 1 or t < 8 for b, t in self.text_shapes):
            raise SettingsError(f"repeats >= 1, image batch >= 1 and text shapes of batch >= 1 x length >= 8, got {self.repeats}, {self.image_batch}, {self.text_shapes}")
        if self.step_timeout_s <= 0:
            raise SettingsError(f"--step-timeout {self.step_timeout_s}: must be > 0 seconds")

    @property
    def work(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(f"{self.out.rstrip('/')}-work")


@dataclass(frozen=True)
class StepMeasure:
    """One child process: wall time, its own peak RSS, exit status (negative: killed by that signal)."""

    seconds: float
    peak_rss_gib: float
    returncode: int
    timed_out: bool = False

    def failure(self, what: str) -> str:
        """One line for the results: why the step failed."""
        if self.timed_out:
            return f"{what} passed its time limit after {self.seconds:.0f} s and was killed"
        oom = ", killed: out of memory?" if self.returncode in (-9, 137) else ""
        return f"{what} failed (exit {self.returncode}{oom}, peak RSS {self.peak_rss_gib:.1f} GiB)"


def run_step(command: list[str], timeout_s: float, log_path: Path | None = None) -> StepMeasure:
    """Run ``command``; kill it after ``timeout_s``; read its own rusage (``wait4``), so earlier children don't count.

    The output goes to ``log_path`` (kept beside the results for a failed
    step) or is inherited. The child is killed if the parent is interrupted.
    """
    started = time.perf_counter()
    handle = open(log_path, "wb") if log_path else None
    try:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT if handle else None)
        timed_out = False
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - started > timeout_s and not timed_out:
                    log.warning("%s: past %.0f s, killing it", " ".join(command[2:4]), timeout_s)
                    proc.kill()
                    timed_out = True
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            os.waitpid(proc.pid, 0)
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        return StepMeasure(time.perf_counter() - started, usage.ru_maxrss / 1024**2, proc.returncode, timed_out)
    finally:
        if handle:
            handle.close()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def count_parameters(checkpoint: str | Path) -> dict:
    """Elements per tower, read from ``model.safetensors``'s header (no tensor is loaded).

    ``text`` includes the LoRA factors (the published 561M does); ``lora``
    is those factors alone; ``text_merged`` is what the text tower has once
    the LoRA is merged (jev4 merges at load).
    """
    from safetensors import safe_open

    from jev4.families.jina_clip_v2.checkpoint import SAFETENSORS_NAME, TEXT_PREFIX, VISION_PREFIX

    counts = {"vision": 0, "text": 0, "lora": 0, "other": 0}
    with safe_open(str(Path(checkpoint) / SAFETENSORS_NAME), framework="pt") as handle:
        dtypes = set()
        for key in handle.keys():
            piece = handle.get_slice(key)
            dtypes.add(piece.get_dtype())
            n = int(np.prod(piece.get_shape(), dtype=np.int64))
            if key.startswith(VISION_PREFIX):
                counts["vision"] += n
            elif key.startswith(TEXT_PREFIX):
                counts["text"] += n
                counts["lora"] += n if ".lora_" in key else 0
            else:
                counts["other"] += n  # logit_scale
    counts["text_merged"] = counts["text"] - counts["lora"]
    counts["total"] = counts["vision"] + counts["text"] + counts["other"]
    return {**counts, "dtypes": sorted(dtypes)}


def _published_check(counts: dict) -> dict:
    """Whether the counts round to the published figures (vision to 0.01M, text to 1M)."""
    return {
        "vision": round(counts["vision"] / 1e6, 2) == PUBLISHED["vision_millions"],
        "text_with_lora": round(counts["text"] / 1e6) == PUBLISHED["text_millions"],
    }


@dataclass
class FormatResult:
    name: str
    export_s: float | None = None
    export_peak_rss_gib: float | None = None
    export_self_check: dict = field(default_factory=dict)  # the manifest's validation cosines (random probes)
    artifact_bytes: int | None = None
    run_s: float | None = None
    run_peak_rss_gib: float | None = None
    load_s: float | None = None
    engine: str = ""
    text: dict = field(default_factory=dict)  # "BxT" -> tokens, seconds, tokens_per_s
    image: dict = field(default_factory=dict)  # "Nx512px" -> seconds, images_per_s
    cosine_vs_torch_fp32: dict = field(default_factory=dict)  # vectors name -> {"min", "mean"}
    error: str = ""


def _cosines(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"min": float(cos.min()), "mean": float(cos.mean())}


class _Run:
    """One benchmark run: the settings, the results so far, and republishing OUT after every step."""

    def __init__(self, settings: ClipBenchSettings):
        self.settings = settings
        self.work = settings.work
        self.logs = self.work / "logs"
        self.results: list[FormatResult] = []
        self.created: list[Path] = []  # what this run wrote under the workdir, removed at the end unless --keep
        self.work_created = False
        self.summary: dict = {
            "settings": asdict(settings), "machine": machine_summary(), "date": time.strftime("%Y-%m-%d"), "complete": False,
            "source": {}, "parameters": {}, "formats": [],
        }  # fmt: skip

    def publish(self) -> None:
        """OUT, whole, with what is known now (``complete`` says whether the run got to the end)."""
        with atomic_output_dir(self.settings.out, force=True) as tmp:
            (tmp / "clip.json").write_text(json.dumps(self.summary, indent=2) + "\n")
            (tmp / "clip.md").write_text(table(self.summary))
            try:
                plot_clip(self.summary, tmp / "clip.png")
            except Exception as exc:  # noqa: BLE001 - a plot problem must not lose the figures
                log.warning("no plot: %s", exc)
            for step_log in sorted(self.logs.glob("*.log")) if self.logs.is_dir() else ():
                shutil.copy2(step_log, tmp / step_log.name)

    def source(self) -> Path | None:
        """The random-weight checkpoint (reused when a kept one is there), its bytes and parameter counts."""
        size = self.settings.size
        source = self.work / f"source-{size}"
        info = self.summary["source"]
        if (source / "config.json").is_file() and (source / "model.safetensors").is_file():
            log.info("reusing the source checkpoint %s", source)
            info["reused"] = True
        else:
            self.created.append(source)
            step = run_step(python_module("jev4.bench.clip_worker", "write", str(source), "--size", size), self.settings.step_timeout_s, self.logs / "write-source.log")
            info.update(write_s=step.seconds, write_peak_rss_gib=step.peak_rss_gib)
            if step.returncode:
                info["error"] = step.failure("writing the source checkpoint")
                return None
        info["path"], info["bytes"] = str(source), _dir_bytes(source)
        counts = count_parameters(source)
        self.summary["parameters"] = {**counts, "published": PUBLISHED, "matches_published": _published_check(counts) if size == "full" else None}
        log.info("parameters: %s", self.summary["parameters"])
        return source

    def export(self, fmt: ClipFormat, source: Path, result: FormatResult) -> Path | None:
        """``jev4-export`` in a child process (the artifact's own self-check included, as a user runs it)."""
        if fmt.export_args is None:
            result.artifact_bytes = _dir_bytes(source)
            return source
        artifact = self.work / f"{fmt.name}-{self.settings.size}"
        self.created.append(artifact)
        command = python_module("jev4.cli.export", "--model", str(source), "--out", str(artifact), "--force", "--no-progress", *fmt.export_args)
        step = run_step(command, self.settings.step_timeout_s, self.logs / f"export-{fmt.name}.log")
        result.export_s, result.export_peak_rss_gib = step.seconds, step.peak_rss_gib
        if step.returncode:
            result.error = step.failure(f"export ({' '.join(command[3:])})")
            return None
        result.artifact_bytes = _dir_bytes(artifact)
        manifest = json.loads((artifact / "jev4-manifest.json").read_text())
        result.export_self_check = manifest.get("contents", {}).get("validation", {})
        return artifact

    def measure(self, fmt: ClipFormat, artifact: Path, result: FormatResult) -> dict[str, np.ndarray] | None:
        """The worker in a child process; its report and warm-up vectors."""
        report, vectors = self.work / f"run-{fmt.name}.json", self.work / f"run-{fmt.name}.npz"
        self.created += [report, vectors]
        shapes = ",".join(f"{b}x{t}" for b, t in self.settings.text_shapes)
        command = python_module("jev4.bench.clip_worker", "measure", str(artifact), "--text-shapes", shapes, "--image-batch", str(self.settings.image_batch),
                                "--repeats", str(self.settings.repeats), "--report", str(report), "--vectors", str(vectors))  # fmt: skip
        step = run_step(command, self.settings.step_timeout_s, self.logs / f"run-{fmt.name}.log")
        result.run_s, result.run_peak_rss_gib = step.seconds, step.peak_rss_gib
        if step.returncode:
            result.error = step.failure("measuring")
            return None
        measured = json.loads(report.read_text())
        result.load_s, result.engine, result.text, result.image = measured["load_s"], measured["engine"], measured["text"], measured["image"]
        with np.load(vectors) as data:
            return {name: data[name] for name in data.files}

    def run(self) -> dict:
        self.work_created = not self.work.exists()
        self.work.mkdir(parents=True, exist_ok=True)
        if not self.logs.exists():
            self.created.append(self.logs)
        self.logs.mkdir(exist_ok=True)
        source = self.source()
        self._snapshot()
        baseline: dict[str, np.ndarray] | None = None
        for name in [BASELINE] + [f for f in self.settings.formats if f != BASELINE]:
            fmt, result = FORMATS[name], FormatResult(name)
            self.results.append(result)
            if source is None:
                result.error = "no source checkpoint"
                continue
            artifact = self.export(fmt, source, result)
            self._snapshot()
            vectors = None if artifact is None else self.measure(fmt, artifact, result)
            if name == BASELINE:
                baseline = vectors
            elif vectors is not None and baseline is not None:
                result.cosine_vs_torch_fp32 = {key: _cosines(vectors[key], baseline[key]) for key in vectors if key in baseline}
            if artifact is not None and artifact != source and not self.settings.keep:
                shutil.rmtree(artifact, ignore_errors=True)
            log.info("%s: %s", name, result)
            self._snapshot()
        self.summary["complete"] = True
        self._snapshot()
        if not self.settings.keep:
            self._clean()
        return self.summary

    def _clean(self) -> None:
        """Remove what this run wrote to the workdir (never anything else: --workdir may be a shared directory)."""
        for path in self.created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if self.work_created:
            try:
                self.work.rmdir()
            except OSError:
                log.info("kept %s: it holds files this run did not write", self.work)

    def _snapshot(self) -> None:
        self.summary["formats"] = [asdict(r) for r in self.results]
        self.publish()


def run_clip_bench(settings: ClipBenchSettings) -> dict:
    """Write the source, count, export and measure each format; OUT holds clip.json/.md/.png (republished after every step)."""
    with claim_output(settings.out, settings.force, (str(settings.work),)):
        return _Run(settings).run()


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict) -> str:
    """Markdown: parameter counts, then one row per format (export cost, size, speed, cosine vs torch fp32).

    The last column is the lowest CPU share of the format's timed calls
    (CPU seconds / (wall seconds x cores)): below 1, other work took cores
    during the measurement and the speeds are lower bounds.
    """
    lines = []
    p = summary.get("parameters") or {}
    if p:
        lines.append(
            f"Parameters (from model.safetensors): vision {p['vision']:,} ({p['vision'] / 1e6:.2f}M), text {p['text']:,} "
            f"({p['text'] / 1e6:.1f}M) including LoRA {p['lora']:,} (merged text tower {p['text_merged']:,}), other {p['other']}; "
            f"total {p['total']:,}. Published: vision {PUBLISHED['vision_millions']}M, text {PUBLISHED['text_millions']}M; matches: {p.get('matches_published')}.\n"
        )
    formats = summary.get("formats") or []
    shapes = [f"{b}x{t}" for b, t in summary["settings"]["text_shapes"]]
    image = f"{summary['settings']['image_batch']}x512px"
    header = (
        "| format | export s | export peak RSS GiB | size GB | run peak RSS GiB | load s | "
        + " | ".join(f"text tokens/s {s}" for s in shapes)
        + f" | images/s {image} | "
        + " | ".join(f"cosine text {s} (min)" for s in shapes)
        + " | cosine image (min) | CPU share (min) |"
    )
    lines += [header, "|---|" + "---:|" * (6 + 2 * len(shapes) + 2)]
    for f in formats:
        cos = f.get("cosine_vs_torch_fp32") or {}
        base = f["name"] == BASELINE
        cells = [
            f["name"], "(source)" if base else _fmt(f["export_s"], ".0f"), "" if base else _fmt(f["export_peak_rss_gib"], ".1f"),
            _fmt(None if f["artifact_bytes"] is None else f["artifact_bytes"] / 1e9, ".2f"), _fmt(f["run_peak_rss_gib"], ".1f"), _fmt(f["load_s"], ".1f"),
        ]  # fmt: skip
        cells += [_fmt((f["text"].get(s) or {}).get("tokens_per_s"), ".1f") for s in shapes]
        cells.append(_fmt((f["image"].get(image) or {}).get("images_per_s"), ".3f"))
        cells += ["1 (baseline)" if base else _fmt((cos.get(f"text-{s}") or {}).get("min"), ".6f") for s in shapes]
        cells.append("1 (baseline)" if base else _fmt((cos.get(f"image-{image}") or {}).get("min"), ".6f"))
        shares = [m["cpu_share"] for m in (*f["text"].values(), *f["image"].values()) if "cpu_share" in m]
        cells.append(_fmt(min(shares) if shares else None, ".2f"))
        if f.get("error"):
            cells[0] += f" ({f['error']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_clip(summary: dict, png: Path) -> Path | None:
    """Three panels: text tokens/s per shape, images/s, and export time / peak RSS; one bar per format."""
    formats = [f for f in summary.get("formats") or [] if f.get("text") or f.get("image") or f.get("export_s")]
    if not formats:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [f"{b}x{t}" for b, t in summary["settings"]["text_shapes"]]
    image = f"{summary['settings']['image_batch']}x512px"
    names = [f["name"] for f in formats]
    x = np.arange(len(formats))
    fig, (text_ax, image_ax, export_ax) = plt.subplots(1, 3, figsize=(14, 4.2))
    width = 0.8 / len(shapes)
    for i, shape in enumerate(shapes):
        values = [(f["text"].get(shape) or {}).get("tokens_per_s", 0) for f in formats]
        text_ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"batch x tokens {shape}")
    text_ax.set_ylabel("text tokens/s")
    text_ax.legend(fontsize=8)
    image_ax.bar(x, [(f["image"].get(image) or {}).get("images_per_s", 0) for f in formats], color="#c77")
    image_ax.set_ylabel(f"images/s (batch {summary['settings']['image_batch']}, 512 x 512)")
    exported = [f for f in formats if f.get("export_s")]
    ex = np.arange(len(exported))
    export_ax.bar(ex - 0.2, [f["export_s"] for f in exported], 0.4, label="export wall s", color="#777")
    rss_ax = export_ax.twinx()
    rss_ax.bar(ex + 0.2, [f["export_peak_rss_gib"] for f in exported], 0.4, label="export peak RSS GiB", color="#7a7")
    export_ax.set_ylabel("export wall time (s)")
    rss_ax.set_ylabel("export peak RSS (GiB)")
    export_ax.set_xticks(ex, [f["name"] for f in exported], rotation=30, ha="right")
    export_ax.legend(loc="upper left", fontsize=8)
    rss_ax.legend(loc="upper right", fontsize=8)
    for ax in (text_ax, image_ax):
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.grid(True, axis="y", alpha=0.3)
    machine = summary.get("machine", {})
    fig.suptitle(f"jina-clip-v2, {summary['settings']['size']} size, random weights, CPU ({machine.get('cpus')} CPUs, {machine.get('memory_gib')} GiB)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
