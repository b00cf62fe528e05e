"""Reports of a validation run: report.json (the data), report.md (a summary) and report.html (one standalone file).

jina-clip-v2 runs (``jev4.validate.clip_validate``) get the same three files
from ``write_clip_reports``, sharing the tables, banner and plots that fit.

Everything here is computed from a ``ValidationReport`` alone, so the reports
can be rebuilt from a saved report. The HTML page has no external assets and
no JavaScript: inline CSS, plots embedded as base64 PNG, every text escaped.
``render_check`` screenshots the page with headless Chromium, when there is one,
to check that it renders.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from jev4.validate.results import CodecResult, MetricCheck, ParityResult, RetrievalResult, ValidationReport
from jev4.validate.thresholds import METRIC_LABELS, retrieval_label

log = logging.getLogger(__name__)

REPORT_FILES = {"json": "report.json", "md": "report.md", "html": "report.html"}
TOP_LEVEL_ORDER = ("passed", "failures", "precision", "thresholds", "checks", "parity", "retrieval", "sts", "settings", "environment")
REFERENCE_COLOR = "#8c959f"
ARTIFACT_COLOR = "#0969da"
FAIL_COLOR = "#cf222e"
BANNER_MAX_FAILURES = 15


def write_reports(report: ValidationReport, out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``; returns their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    paths["json"].write_text(json.dumps(report_json(report), indent=2, allow_nan=False, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"].write_text(render_html(report), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- JSON


def _json_safe(obj: Any) -> Any:
    """Plain JSON values: NaN -> null, +-inf -> "Infinity"/"-Infinity", numpy scalars and arrays -> Python, paths -> str."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [_json_safe(v) for v in sorted(obj, key=str)]
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return _json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _thresholds(report: ValidationReport) -> dict[str, Any] | None:
    value = report.settings.get("thresholds") if isinstance(report.settings, dict) else None
    return value if isinstance(value, dict) else None


def report_json(report: ValidationReport) -> dict[str, Any]:
    """``report.to_json()`` with the thresholds surfaced, verdict first, in valid JSON values."""
    data = report.to_json()
    if _thresholds(report) is not None:
        data["thresholds"] = _thresholds(report)
    ordered = {key: data[key] for key in TOP_LEVEL_ORDER if key in data}
    ordered.update({key: value for key, value in data.items() if key not in ordered})
    return _json_safe(ordered)


# --------------------------------------------------------------------------- shared formatting


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if not _is_num(x):
        try:
            x = float(x)
        except (TypeError, ValueError):
            return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _fmt_cos(x: Any) -> str:
    """A cosine or correlation near 1 with enough digits to see how near: 0.99999970, 1 - 1.0e-13."""
    if _is_num(x) and 0.99 <= x < 1:
        gap = 1.0 - float(x)
        if gap < 1e-9:
            return f"1 - {gap:.1e}"
        return f"{x:.{max(6, int(math.floor(-math.log10(gap))) + 2)}f}"
    return _fmt(x, 6)


def _sci(x: Any) -> str:
    return f"{x:.2e}" if _is_num(x) and math.isfinite(x) else _fmt(x)


def _signed(x: Any, digits: int = 4) -> str:
    text = _fmt(x, digits)
    return text if text.startswith("-") or text in ("nan", "inf") or not _is_num(x) else "+" + text


def _bound(check: MetricCheck) -> str:
    if check.minimum is not None:
        return f">= {check.minimum:g}"
    if check.maximum is not None:
        return f"<= {check.maximum:g}"
    return "-"


def _check_value(check: MetricCheck) -> str:
    """Lower-bounded checks are cosines and correlations; upper-bounded ones are drops in points."""
    return _fmt_cos(check.value) if check.minimum is not None else _fmt(check.value, 4)


def _metric_keys(results: Iterable[RetrievalResult]) -> list[str]:
    seen: list[str] = []
    for r in results:
        for key in [*r.reference, *r.artifact]:
            if key not in seen:
                seen.append(key)
    known = [k for k in METRIC_LABELS if k in seen]
    return known + [k for k in seen if k not in METRIC_LABELS]


def _label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


def _group_by_dataset(results: Iterable[RetrievalResult]) -> dict[str, list[RetrievalResult]]:
    groups: dict[str, list[RetrievalResult]] = {}
    for r in results:
        groups.setdefault(r.dataset, []).append(r)
    return groups


def _dims(parity: ParityResult) -> list[str]:
    def order(key: str):
        try:
            return (0, -float(key))
        except ValueError:
            return (1, 0.0)

    return sorted({*parity.single_cosine_min, *parity.single_cosine_mean, *parity.single_max_abs}, key=order)


def _headline(report: ValidationReport) -> str:
    total, failed = len(report.checks), len(report.failures)
    if total == 0:
        return "no checks were run"
    if failed:
        return f"{failed} of {total} checks failed"
    return f"all {total} checks passed"


def _context(report: ValidationReport) -> list[tuple[str, str]]:
    s = report.settings if isinstance(report.settings, dict) else {}
    items = [("artifact", s.get("artifact")), ("reference", s.get("reference")), ("adapter", s.get("adapter")), ("precision", report.precision)]
    env = report.environment if isinstance(report.environment, dict) else {}
    if env.get("engine"):
        items.append(("engine", env["engine"]))
    elif s.get("provider"):
        items.append(("provider", s.get("provider")))
    for gap in s.get("not_measured") or ():
        items.append(("not measured", gap))
    return [(k, str(v)) for k, v in items if v not in (None, "")]


def _flatten(mapping: dict[str, Any], skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Key/value rows; nested dicts one level deep as ``outer.inner``, other containers as JSON."""
    rows = []
    for key, value in mapping.items():
        if key in skip:
            continue
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
            rows += [(f"{key}.{k}", _plain(v)) for k, v in value.items()]
        else:
            rows.append((str(key), _plain(value)))
    return rows


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple, set)):
        return json.dumps(_json_safe(value), ensure_ascii=False)
    return "null" if value is None else str(value)


def _worst_inputs(parity: ParityResult, n: int = 10) -> list[dict[str, Any]]:
    """The probe inputs furthest from the reference (lowest cosine at any dim, then lowest token cosine)."""

    def score(row: dict[str, Any]) -> float:
        values = [v for v in (row.get("cosine") or {}).values() if _is_num(v)]
        if _is_num(row.get("multi_cosine_min")):
            values.append(row["multi_cosine_min"])
        values = [float(v) for v in values if v == v]
        return min(values) if values else math.inf

    return sorted(parity.per_input, key=score)[:n]


# --------------------------------------------------------------------------- Markdown


def _md_cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: ValidationReport) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    lines = [f"# jev4 validate: {verdict} ({_headline(report)})", ""]
    for check in report.failures:
        lines.append(f"- **FAILED** {check.name} = {_check_value(check)} (needs {_bound(check)})")
    if report.failures:
        lines.append("")
    lines += [" · ".join(f"{k}: `{v}`" for k, v in _context(report)), ""]

    lines += _md_checks(report.checks)

    parity = report.parity
    lines += ["## Parity on the probe set", ""]
    if parity is None:
        lines += ["Skipped (no probes).", ""]
    else:
        lines += ["Single vectors, artifact vs reference, per Matryoshka dim:", ""]
        lines += _md_table(
            ["dim", "min cosine", "mean cosine", "max abs error"],
            [[d, _fmt_cos(parity.single_cosine_min.get(d)), _fmt_cos(parity.single_cosine_mean.get(d)), _sci(parity.single_max_abs.get(d))] for d in _dims(parity)],
        )
        lines += _md_table(
            ["multi-vector and ranking", "value"],
            [
                ["per-token min cosine", _fmt_cos(parity.multi_token_cosine_min)],
                ["per-token mean cosine", _fmt_cos(parity.multi_token_cosine_mean)],
                ["MaxSim score Pearson", _fmt_cos(parity.maxsim_pearson)],
                ["top-10 overlap", _fmt(parity.topk_overlap, 4)],
                ["query-document score Spearman", _fmt_cos(parity.score_spearman)],
            ],
        )
        worst = _worst_inputs(parity)
        if worst:
            dims = _dims(parity)
            lines += [f"Inputs furthest from the reference ({len(worst)} of {len(parity.per_input)}):", ""]
            lines += _md_table(
                ["input", "kind", "tokens", *[f"cos dim {d}" for d in dims], "token min cos"],
                [
                    [r.get("id", ""), r.get("kind", ""), r.get("tokens", ""), *[_fmt_cos((r.get("cosine") or {}).get(d)) for d in dims], _fmt_cos(r.get("multi_cosine_min"))]
                    for r in worst
                ],
            )

    lines += ["## Retrieval", ""]
    if not report.retrieval:
        lines += ["No retrieval datasets.", ""]
    lines += _md_retrieval(report.retrieval)

    if report.codecs:
        lines += ["## Output codecs", "", CODEC_NOTE, ""]
        lines += _md_table(CODEC_HEADER, _codec_rows(report.codecs))

    lines += ["## STS", ""]
    if not report.sts:
        lines += ["No STS datasets.", ""]
    else:
        lines += _md_table(
            ["dataset", "reference Spearman", "artifact Spearman", "Δ"],
            [[s.dataset, _fmt(s.reference_spearman), _fmt(s.artifact_spearman), _signed(_diff(s.artifact_spearman, s.reference_spearman))] for s in report.sts],
        )

    lines += _md_tail(report)
    return "\n".join(lines).rstrip() + "\n"


def _md_checks(checks: list[MetricCheck]) -> list[str]:
    lines = ["## Checks", ""]
    if checks:
        return lines + _md_table(["check", "value", "bound", "result"], [[c.name, _check_value(c), _bound(c), "pass" if c.passed else "**FAIL**"] for c in checks], "lrrc")
    return lines + ["No checks were run.", ""]


def _md_retrieval(results: list[RetrievalResult]) -> list[str]:
    """One table per dataset: reference, artifact and Δ of every metric, per scoring x dim."""
    lines: list[str] = []
    for dataset, group in _group_by_dataset(results).items():
        keys = _metric_keys(group)
        header = ["scoring", "dim"]
        for key in keys:
            header += [f"{_label(key)} ref", f"{_label(key)} art", "Δ"]
        rows = []
        for r in group:
            row: list[Any] = [r.scoring, r.dim if r.dim else "-"]
            delta = r.delta
            for key in keys:
                row += [_fmt(r.reference.get(key)), _fmt(r.artifact.get(key)), _signed(delta.get(key))]
            rows.append(row)
        lines += [f"### {dataset}", ""] + _md_table(header, rows)
    return lines


def _md_tail(report: Any) -> list[str]:
    """Thresholds, settings and environment (any report with ``settings``, ``environment`` and ``precision``)."""
    lines: list[str] = []
    thresholds = _thresholds(report)
    if thresholds:
        lines += [f"## Thresholds ({report.precision})", ""] + _md_table(["threshold", "value"], [[k, _plain(v)] for k, v in thresholds.items()])
    lines += ["## Settings", ""] + _md_table(["setting", "value"], [[k, f"`{v}`"] for k, v in _flatten(report.settings, skip=("thresholds",))], "ll")
    lines += ["## Environment", ""] + _md_table(["", "value"], [[k, f"`{v}`"] for k, v in _flatten(report.environment)], "ll")
    return lines


def _diff(a: Any, b: Any) -> float:
    try:
        return float(a) - float(b)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _style(ax) -> None:
    ax.grid(True, color="#d0d7de", linewidth=0.6, alpha=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _cosine_tick(err: float, _pos=None) -> str:
    """Ticks of a log axis of 1 - cosine, labelled as cosines (0.9999, 1-1e-08)."""
    if err <= 0:
        return "1"
    if err >= 1e-6:
        decimals = max(1, int(round(-math.log10(err))))
        return f"{1 - err:.{decimals}f}"
    return f"1-{err:.0e}".replace("e-0", "e-")


def plot_cosines(parity: ParityResult | None, thresholds: dict[str, Any] | None):
    """(a) Histograms of the per-input single-vector cosines and per-token multi-vector cosines, thresholds drawn."""
    if parity is None:
        return None
    t = thresholds or {}
    panels = [
        (parity.single_cosines, t.get("single_cosine_min"), f"single-vector cosine per input (full dim, n={len(parity.single_cosines)})"),
        (parity.token_cosines, t.get("multi_token_cosine_min"), f"multi-vector cosine per token (n={len(parity.token_cosines)})"),
    ]
    panels = [(values, bound, title) for values, bound, title in panels if values]
    if not panels:
        return None
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    floor = 1e-12
    fig = _figure(5.2 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (values, bound, title) in zip(axes, panels):
        cos = np.asarray([v for v in values if v == v], dtype=float)
        err = np.clip(1.0 - cos, floor, 2.0)
        bound_err = max(1.0 - float(bound), floor) if _is_num(bound) else None
        lo = min(err.min(), bound_err or err.min()) / 3
        hi = max(err.max(), bound_err or err.max()) * 3
        bins = np.logspace(math.log10(lo), math.log10(hi), 40)
        counts, _, _ = ax.hist(err, bins=bins, color=ARTIFACT_COLOR, alpha=0.85, edgecolor="white", linewidth=0.4)
        ax.set_xscale("log")
        nonzero = counts[counts > 0]
        if nonzero.size and nonzero.max() / nonzero.min() > 50:
            ax.set_yscale("log")
        if bound_err is not None:
            ax.axvline(bound_err, color=FAIL_COLOR, linewidth=1.6, linestyle="--")
            ax.axvspan(bound_err, hi, color=FAIL_COLOR, alpha=0.07, linewidth=0)
            ax.text(bound_err, 0.97, f"threshold >= {float(bound):g} ", transform=ax.get_xaxis_transform(), rotation=90, ha="right", va="top", fontsize=7.5, color=FAIL_COLOR)
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=8))
        ax.xaxis.set_major_formatter(FuncFormatter(_cosine_tick))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7.5, labelrotation=30)
        ax.set_xlabel("cosine to the reference (1 - cosine on a log scale; right = further)", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.set_title(f"{title}\nmin {_fmt_cos(float(cos.min()) if cos.size else math.nan)}", fontsize=9)
        _style(ax)
    return fig


def _single_by_dataset(results: list[RetrievalResult]) -> dict[str, list[RetrievalResult]]:
    groups = _group_by_dataset(r for r in results if r.scoring == "single" and r.dim)
    return {name: sorted(rs, key=lambda r: r.dim) for name, rs in groups.items()}


def plot_matryoshka(results: list[RetrievalResult], metric: str = "ndcg@10"):
    """(b) Quality by Matryoshka dim: reference (solid) vs artifact (dashed), one colour per dataset."""
    groups = {name: rs for name, rs in _single_by_dataset(results).items() if any(metric in r.reference for r in rs)}
    if not groups:
        return None
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    palette = ["#0969da", "#bf8700", "#1a7f37", "#8250df", "#cf222e", "#57606a", "#e16f24", "#1b7c83"]
    dims: set[int] = set()
    for i, (name, rs) in enumerate(groups.items()):
        color = palette[i % len(palette)]
        x = [r.dim for r in rs]
        dims.update(x)
        ax.plot(x, [r.reference.get(metric, math.nan) for r in rs], color=color, marker="o", linewidth=1.8, label=f"{name} reference")
        ax.plot(x, [r.artifact.get(metric, math.nan) for r in rs], color=color, marker="x", markersize=7, linewidth=1.4, linestyle="--", label=f"{name} artifact")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(dims)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(d) for d in sorted(dims)])
    ax.set_xlabel("Matryoshka dim (single-vector)", fontsize=9)
    ax.set_ylabel(_label(metric), fontsize=9)
    ax.set_title(f"{_label(metric)} by embedding dim: reference (solid) vs artifact (dashed)", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _style(ax)
    return fig


def plot_dataset_bars(results: list[RetrievalResult], metrics: tuple[str, ...] = ("ndcg@10", "recall@100")):
    """(c) Per dataset (full-size single vectors, and MaxSim if measured): reference vs artifact bars."""
    groups: list[tuple[str, RetrievalResult]] = []
    for name, rs in _group_by_dataset(results).items():
        single = [r for r in rs if r.scoring == "single"]
        if single:
            groups.append((f"{name}\nsingle {max(single, key=lambda r: r.dim or 0).dim or ''}".rstrip(), max(single, key=lambda r: r.dim or 0)))
        groups += [(f"{name}\n{r.scoring}", r) for r in rs if r.scoring != "single"]
    metrics = tuple(m for m in metrics if any(m in r.reference for _, r in groups))
    if not groups or not metrics:
        return None
    import numpy as np

    fig = _figure(min(10.5, max(6.5, 1.3 * len(groups) * len(metrics) + 1.5)), 3.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(groups))
    width = 0.38
    for ax, metric in zip(axes, metrics):
        ref = [r.reference.get(metric, math.nan) for _, r in groups]
        art = [r.artifact.get(metric, math.nan) for _, r in groups]
        bars_ref = ax.bar(x - width / 2, ref, width, color=REFERENCE_COLOR, label="reference")
        bars_art = ax.bar(x + width / 2, art, width, color=ARTIFACT_COLOR, label="artifact")
        for bars in (bars_ref, bars_art):
            ax.bar_label(bars, labels=[_fmt(b.get_height(), 3) for b in bars], fontsize=7.5, padding=2)
        ax.set_xticks(x, [label for label, _ in groups], fontsize=8.5)
        ax.set_ylim(0, 1.18)
        ax.set_title(f"{_label(metric)}: reference vs artifact", fontsize=10)
        ax.legend(fontsize=8.5, frameon=False, loc="upper center", ncols=2)
        _style(ax)
        ax.grid(False, axis="x")
    return fig


CODEC_NOTE = (
    "The artifact's embeddings through each output codec, searched as a serving system would "
    "(float query vs quantized documents; binary: Hamming; +rescore: binary candidates re-ranked). "
    "Retention = metric / the same embeddings in float32 at the same dim."
)
CODEC_HEADER = ["dataset", "codec", "scoring", "dim", "nDCG@10", "retention", "Recall@100", "retention", "bytes/doc", "ms/query"]


def _codec_rows(results: list[CodecResult]) -> list[list[Any]]:
    rows = []
    for r in results:
        keep = r.retention
        rows.append(
            [
                r.dataset,
                r.codec,
                r.scoring,
                r.dim,
                _fmt(r.metrics.get("ndcg@10")),
                _percent(keep.get("ndcg@10")),
                _fmt(r.metrics.get("recall@100")),
                _percent(keep.get("recall@100")),
                r.bytes_per_doc,
                _fmt(r.search_ms_per_query, 3),
            ]
        )
    return rows


def _percent(x: Any) -> str:
    return f"{100 * float(x):.1f}%" if _is_num(x) else "-"


def plot_codec_retention(results: list[CodecResult], metric: str = "ndcg@10"):
    """Retention per codec (one line each) across Matryoshka dims, single vectors, first dataset."""
    single = [r for r in results if r.scoring == "single"]
    if not single:
        return None
    dataset = single[0].dataset
    single = [r for r in single if r.dataset == dataset]
    codecs = list(dict.fromkeys(r.codec for r in single))
    dims = sorted({r.dim for r in single})
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    palette = ["#0969da", "#bf8700", "#1a7f37", "#8250df", "#cf222e", "#57606a", "#e16f24", "#1b7c83"]
    for i, codec in enumerate(codecs):
        rows = sorted((r for r in single if r.codec == codec), key=lambda r: r.dim)
        ax.plot([r.dim for r in rows], [100 * r.retention.get(metric, math.nan) for r in rows], marker="o", color=palette[i % len(palette)], label=f"{codec} ({rows[-1].bytes_per_doc} B)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.minorticks_off()
    ax.set_xlabel("Matryoshka dim")
    ax.set_ylabel(f"{_label(metric)} retention (%)")
    ax.set_title(f"{dataset}: {_label(metric)} retention by codec and dim", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _style(ax)
    return fig


def _plots(report: ValidationReport) -> tuple[list[tuple[str, str, str]], str | None]:
    """(title, caption, data URI) for each plot that has data; and a note if plotting was not possible."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (pip install matplotlib)."
    made = []
    specs: list[tuple[str, str, Callable[[], Any]]] = [
        (
            "parity",
            "Cosine of each artifact output to the reference's, as a histogram of 1 - cosine on a log scale: bars to the right are further from the reference; "
            "the dashed line is the threshold and the shaded region fails.",
            lambda: plot_cosines(report.parity, _thresholds(report)),
        ),
        (
            "retrieval",
            "nDCG@10 at each Matryoshka dim (single-vector scoring): the artifact's dashed line should sit on the reference's solid line.",
            lambda: plot_matryoshka(report.retrieval),
        ),
        ("retrieval", "nDCG@10 and Recall@100 per dataset at full size, reference vs artifact.", lambda: plot_dataset_bars(report.retrieval)),
        (
            "codecs",
            "nDCG@10 retention (quantized / float32 of the same embeddings) per output codec and Matryoshka dim, single vectors; "
            "the label on each line is the storage per document at full size.",
            lambda: plot_codec_retention(report.codecs),
        ),
    ]
    for section, caption, make in specs:
        try:
            fig = make()
        except Exception as e:  # a plot must never cost the report
            log.warning("plot skipped (%s): %s", caption[:40], e)
            continue
        if fig is not None:
            made.append((section, caption, _png_data_uri(fig)))
    return made, None


# --------------------------------------------------------------------------- HTML

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --zebra: #f6f8fa; --pass: #1a7f37; --fail: #cf222e; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef1f4; color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif; }
.container { max-width: 1100px; margin: 24px auto; padding: 28px 36px 36px; background: #fff; border-radius: 10px;
  box-shadow: 0 1px 3px rgba(31,35,40,.12); }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 650; }
header .context { margin: 0; color: var(--muted); font-size: 14px; }
header .context code { color: var(--fg); }
code { font: 13px/1.4 ui-monospace, SFMono-Regular, "SF Mono", Menlo, Consolas, "Liberation Mono", monospace;
  background: var(--zebra); padding: 1px 5px; border-radius: 4px; word-break: break-all; }
.verdict { margin: 20px 0 8px; padding: 18px 24px; border-radius: 8px; color: #fff; }
.verdict.pass { background: var(--pass); }
.verdict.fail { background: var(--fail); }
.verdict .big { font-size: 44px; font-weight: 800; letter-spacing: .06em; line-height: 1.1; }
.verdict .count { font-size: 17px; opacity: .95; }
.verdict ul { margin: 10px 0 0; padding-left: 20px; }
.verdict li { margin: 2px 0; }
.verdict li b { font-weight: 650; }
h2 { margin: 32px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); font-size: 20px; }
h3 { margin: 20px 0 8px; font-size: 16px; }
p.note { color: var(--muted); font-size: 13.5px; margin: 6px 0 10px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 14px; font-size: 13.5px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #fff; font-weight: 600; border-bottom: 2px solid var(--line); white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--zebra); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.group { text-align: center; border-bottom: 1px solid var(--line); }
td.sep, th.sep { border-left: 1px solid var(--line); }
tr.failed td { background: #ffebe9; }
td.bad { color: var(--fail); font-weight: 650; }
table.compact { width: auto; min-width: 520px; }
.pill { display: inline-block; min-width: 44px; text-align: center; padding: 0 8px; border-radius: 10px; font-size: 12px; font-weight: 650; }
.pill.pass { background: #dafbe1; color: var(--pass); }
.pill.fail { background: var(--fail); color: #fff; }
figure { margin: 12px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
table.kv td:first-child { white-space: nowrap; color: var(--muted); width: 1%; }
footer { margin-top: 28px; color: var(--muted); font-size: 12.5px; }
""".strip()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _td(text: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(text)}</td>' if cls else f"<td>{_e(text)}</td>"


def _html_table(header: list[tuple[str, str]], rows: list[str], cls: str = "") -> str:
    head = "".join(f'<th class="{c}">{_e(h)}</th>' if c else f"<th>{_e(h)}</th>" for h, c in header)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _figure_html(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def render_html(report: ValidationReport) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    checks_by_name = {c.name: c for c in report.checks}
    plots, plot_note = _plots(report)
    parts = _html_head(report, verdict)

    # parity
    parts.append("<h2>Parity on the probe set</h2>")
    parity = report.parity
    if parity is None:
        parts.append('<p class="note">Skipped (no probes).</p>')
    else:
        parts.append('<p class="note">Artifact vs reference on the built-in probe set (queries, texts, code, images), single vectors per Matryoshka dim.</p>')
        rows = []
        for d in _dims(parity):
            cmin = checks_by_name.get(f"parity: single-vector min cosine (dim {d})")
            cmean = checks_by_name.get(f"parity: single-vector mean cosine (dim {d})")
            rows.append(
                "<tr>"
                + _td(d, "num")
                + _td(_fmt_cos(parity.single_cosine_min.get(d)), "num bad" if cmin and not cmin.passed else "num")
                + _td(_fmt_cos(parity.single_cosine_mean.get(d)), "num bad" if cmean and not cmean.passed else "num")
                + _td(_sci(parity.single_max_abs.get(d)), "num")
                + "</tr>"
            )
        parts.append(_html_table([("dim", "num"), ("min cosine", "num"), ("mean cosine", "num"), ("max abs error", "num")], rows, "compact"))
        other = [
            ("multi-vector per-token min cosine", parity.multi_token_cosine_min, "parity: multi-vector per-token min cosine", 6),
            ("multi-vector per-token mean cosine", parity.multi_token_cosine_mean, None, 6),
            ("MaxSim score Pearson", parity.maxsim_pearson, "parity: MaxSim score Pearson", 6),
            ("top-10 overlap", parity.topk_overlap, "parity: top-10 overlap", 4),
            ("query-document score Spearman", parity.score_spearman, "parity: query-document score Spearman", 6),
        ]
        rows = []
        for label, value, check_name, digits in other:
            check = checks_by_name.get(check_name) if check_name else None
            text = _fmt_cos(value) if digits == 6 else _fmt(value, digits)
            cls = "num bad" if check and not check.passed else "num"
            rows.append("<tr>" + _td(label) + _td(text, cls) + _td(_bound(check) if check else "-", "num") + "</tr>")
        parts.append(_html_table([("multi-vector and ranking", ""), ("value", "num"), ("bound", "num")], rows, "compact"))
        parts += [_figure_html(uri, caption) for section, caption, uri in plots if section == "parity"]
        worst = _worst_inputs(parity)
        if worst:
            dims = _dims(parity)
            parts.append(f"<h3>Inputs furthest from the reference ({len(worst)} of {len(parity.per_input)})</h3>")
            rows = []
            for r in worst:
                cos = r.get("cosine") or {}
                rows.append(
                    "<tr>"
                    + _td(r.get("id", ""))
                    + _td(r.get("kind", ""))
                    + _td(r.get("tokens", ""), "num")
                    + "".join(_td(_fmt_cos(cos.get(d)), "num") for d in dims)
                    + _td(_fmt_cos(r.get("multi_cosine_min")), "num")
                    + "</tr>"
                )
            parts.append(_html_table([("input", ""), ("kind", ""), ("tokens", "num"), *[(f"cos dim {d}", "num") for d in dims], ("token min cos", "num")], rows))

    # retrieval
    parts.append("<h2>Retrieval</h2>")
    if not report.retrieval:
        parts.append('<p class="note">No retrieval datasets.</p>')
    else:
        parts.append('<p class="note">Reference and artifact on each labelled dataset; Δ = artifact - reference. A highlighted Δ is a drop beyond its threshold.</p>')
    parts += _html_retrieval(report.retrieval, checks_by_name)
    parts += [_figure_html(uri, caption) for section, caption, uri in plots if section == "retrieval"]

    if report.codecs:
        parts.append("<h2>Output codecs</h2>")
        parts.append(f'<p class="note">{_e(CODEC_NOTE)}</p>')
        rows = []
        for row, result in zip(_codec_rows(report.codecs), report.codecs):
            failed = any(not c.passed for c in report.checks if c.name.startswith(f"codec {result.codec} {result.dataset} {result.scoring} dim {result.dim}:"))
            rows.append("<tr>" + "".join(_td(cell, ("num bad" if failed and i >= 4 else "num") if i >= 3 else "") for i, cell in enumerate(row)) + "</tr>")
        parts.append(_html_table([(h, "num" if i >= 3 else "") for i, h in enumerate(CODEC_HEADER)], rows))
        parts += [_figure_html(uri, caption) for section, caption, uri in plots if section == "codecs"]

    # STS
    parts.append("<h2>STS</h2>")
    if not report.sts:
        parts.append('<p class="note">No STS datasets.</p>')
    else:
        rows = []
        for s in report.sts:
            check = checks_by_name.get(f"sts {s.dataset}: Spearman drop")
            delta = _diff(s.artifact_spearman, s.reference_spearman)
            rows.append(
                "<tr>"
                + _td(s.dataset)
                + _td(_fmt(s.reference_spearman), "num")
                + _td(_fmt(s.artifact_spearman), "num")
                + _td(_signed(delta), "num bad" if check and not check.passed else "num")
                + "</tr>"
            )
        parts.append(_html_table([("dataset", ""), ("reference Spearman", "num"), ("artifact Spearman", "num"), ("Δ", "num")], rows, "compact"))

    parts += _html_checks(report.checks)
    if plot_note:
        parts.append(f'<p class="note">{_e(plot_note)}</p>')
    parts += _html_tail(report)
    return "\n".join(parts) + "\n"


def _html_head(report: Any, verdict: str, title: str = "jev4 validate") -> list[str]:
    """The page's head, title, context line and verdict banner (any report with ``checks``, ``failures``, ``settings``)."""
    context = " · ".join(f"{_e(k)} <code>{_e(v)}</code>" for k, v in _context(report))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}: {verdict}</title>",
        f"<style>\n{CSS}\n</style></head>",
        '<body><main class="container">',
        f'<header><h1>{_e(title)}</h1><p class="context">{context}</p></header>',
    ]
    banner = [f'<section class="verdict {verdict.lower()}"><div class="big">{verdict}</div><div class="count">{_e(_headline(report))}</div>']
    if report.failures:
        shown = report.failures[:BANNER_MAX_FAILURES]
        items = "".join(f"<li><b>{_e(c.name)}</b> = {_e(_check_value(c))} (needs {_e(_bound(c))})</li>" for c in shown)
        if len(report.failures) > len(shown):
            items += f"<li>and {len(report.failures) - len(shown)} more (see All checks)</li>"
        banner.append(f"<ul>{items}</ul>")
    banner.append("</section>")
    return parts + banner


def _html_retrieval(results: list[RetrievalResult], checks_by_name: dict[str, MetricCheck]) -> list[str]:
    """One table per dataset; a Δ whose drop check failed is highlighted."""
    parts = []
    for dataset, group in _group_by_dataset(results).items():
        keys = _metric_keys(group)
        top = '<tr><th rowspan="2">scoring</th><th rowspan="2" class="num">dim</th>' + "".join(f'<th colspan="3" class="group sep">{_e(_label(k))}</th>' for k in keys) + "</tr>"
        sub = "<tr>" + "".join('<th class="num sep">ref</th><th class="num">artifact</th><th class="num">Δ</th>' for _ in keys) + "</tr>"
        rows = []
        for r in group:
            delta = r.delta
            cells = [_td(r.scoring), _td(r.dim if r.dim else "-", "num")]
            for k in keys:
                check = checks_by_name.get(f"{retrieval_label(r)}: {_label(k)} drop")
                dcls = "num bad" if check and not check.passed else "num"
                cells += [_td(_fmt(r.reference.get(k)), "num sep"), _td(_fmt(r.artifact.get(k)), "num"), _td(_signed(delta.get(k)), dcls)]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"<h3>{_e(dataset)}</h3><table><thead>{top}{sub}</thead><tbody>{''.join(rows)}</tbody></table>")
    return parts


def _html_checks(checks: list[MetricCheck]) -> list[str]:
    parts = [f"<h2>All checks ({len(checks)})</h2>"]
    if not checks:
        return parts + ['<p class="note">No checks were run.</p>']
    rows = []
    for c in checks:
        pill = '<span class="pill pass">pass</span>' if c.passed else '<span class="pill fail">FAIL</span>'
        rows.append(f'<tr class="{"" if c.passed else "failed"}">{_td(c.name)}{_td(_check_value(c), "num")}{_td(_bound(c), "num")}<td>{pill}</td></tr>')
    return parts + [_html_table([("check", ""), ("value", "num"), ("bound", "num"), ("result", "")], rows)]


def _html_tail(report: Any) -> list[str]:
    """Thresholds, settings, environment and the closing tags."""
    parts = []
    thresholds = _thresholds(report)
    if thresholds:
        parts.append(f"<h2>Thresholds ({_e(report.precision)})</h2>")
        parts.append(_html_table([("threshold", ""), ("value", "num")], ["<tr>" + _td(k) + _td(_plain(v), "num") + "</tr>" for k, v in thresholds.items()], "compact"))
    parts.append("<h2>Settings</h2>")
    settings_rows = [f"<tr>{_td(k)}<td><code>{_e(v)}</code></td></tr>" for k, v in _flatten(report.settings, skip=("thresholds",))]
    parts.append(_html_table([("setting", ""), ("value", "")], settings_rows, "kv"))
    parts.append("<h2>Environment</h2>")
    parts.append(_html_table([("item", ""), ("value", "")], [f"<tr>{_td(k)}<td><code>{_e(v)}</code></td></tr>" for k, v in _flatten(report.environment)], "kv"))
    parts.append("<footer>Written by jev4 validate. report.json in the same directory holds every number on this page.</footer>")
    parts.append("</main></body></html>")
    return parts


# --------------------------------------------------------------------------- jina-clip-v2
# A clip-v2 report (jev4.validate.clip_validate.ClipValidationReport) has no probe set, multi-vectors, codecs or
# STS: its parity is the cosine per input group x dim. Its retrieval results are v4's RetrievalResult, so the
# retrieval tables and plots above serve it unchanged; only the parity table and plot are its own.

CLIP_TITLE = "jev4 validate (jina-clip-v2)"
CLIP_TOP_LEVEL_ORDER = ("passed", "failures", "family", "precision", "thresholds", "checks", "parity", "retrieval", "checksums", "settings", "environment")
CLIP_PARITY_NOTE = (
    "Cosine between the reference's and the artifact's vector of every input, per input group and Matryoshka dim "
    "(smaller dims: the full vector truncated, then L2-normalised). Queries get the retrieval prompt, documents none."
)
CLIP_RETRIEVAL_NOTE = (
    "text->text: multilingual-names (a territory's name in one of 16 languages -> its English name); text->image: pydoc-pages "
    "(a help topic -> its rendered page); image->image: each page's top-left crop -> the page. Δ = artifact - reference; "
    "a highlighted Δ is a drop beyond its threshold (never tighter than one query's worth)."
)


def write_clip_reports(report: Any, out_dir: Path) -> dict[str, Path]:
    """report.json, report.md and report.html of a jina-clip-v2 validation into ``out_dir`` (the names v4 uses)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    paths["json"].write_text(json.dumps(clip_report_json(report), indent=2, allow_nan=False, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(render_clip_markdown(report), encoding="utf-8")
    paths["html"].write_text(render_clip_html(report), encoding="utf-8")
    return paths


def clip_report_json(report: Any) -> dict[str, Any]:
    """``report.to_json()`` verdict first, in valid JSON values."""
    data = report.to_json()
    ordered = {key: data[key] for key in CLIP_TOP_LEVEL_ORDER if key in data}
    ordered.update({key: value for key, value in data.items() if key not in ordered})
    return _json_safe(ordered)


def _clip_parity_rows(report: Any) -> list[tuple[Any, MetricCheck | None, MetricCheck | None]]:
    checks = {c.name: c for c in report.checks}
    return [(p, checks.get(f"parity: {p.inputs} min cosine (dim {p.dim})"), checks.get(f"parity: {p.inputs} mean cosine (dim {p.dim})")) for p in report.parity]


def render_clip_markdown(report: Any) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    lines = [f"# {CLIP_TITLE}: {verdict} ({_headline(report)})", ""]
    for check in report.failures:
        lines.append(f"- **FAILED** {check.name} = {_check_value(check)} (needs {_bound(check)})")
    if report.failures:
        lines.append("")
    lines += [" · ".join(f"{k}: `{v}`" for k, v in _context(report)), ""]
    lines += ["## Parity per input group", "", CLIP_PARITY_NOTE, ""]
    lines += _md_table(
        ["inputs", "dim", "rows", "min cosine", "mean cosine", "max abs error", "result"],
        [
            [p.inputs, p.dim, p.rows, _fmt_cos(p.min_cosine), _fmt_cos(p.mean_cosine), _sci(p.max_abs), "pass" if all(c is None or c.passed for c in (cmin, cmean)) else "**FAIL**"]
            for p, cmin, cmean in _clip_parity_rows(report)
        ],
        "lrrrrrc",
    )
    lines += ["## Retrieval", "", CLIP_RETRIEVAL_NOTE, ""] + _md_retrieval(report.retrieval)
    lines += _md_checks(report.checks)
    if report.checksums:
        lines += ["## Data", ""] + _md_table(["set", "sha256"], [[name, f"`{digest}`"] for name, digest in report.checksums.items()], "ll")
    lines += _md_tail(report)
    return "\n".join(lines).rstrip() + "\n"


def plot_clip_parity(parity: list[Any], cosine_min: float | None):
    """1 - min cosine per input group across Matryoshka dims (log scale), the threshold dashed: every line must stay below it."""
    if not parity:
        return None
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    floor = 1e-16
    groups: dict[str, list[Any]] = {}
    for p in parity:
        groups.setdefault(p.inputs, []).append(p)
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    palette = ["#0969da", "#bf8700", "#1a7f37", "#8250df", "#e16f24", "#57606a", "#1b7c83"]
    dims: set[int] = set()
    errors = []
    for i, (name, rows) in enumerate(groups.items()):
        rows = sorted(rows, key=lambda p: p.dim)
        err = [max(1.0 - float(p.min_cosine), floor) if p.min_cosine == p.min_cosine else math.nan for p in rows]
        errors += [e for e in err if e == e]
        dims.update(p.dim for p in rows)
        ax.plot([p.dim for p in rows], err, color=palette[i % len(palette)], marker="o", linewidth=1.6, label=name)
    if _is_num(cosine_min):
        bound = max(1.0 - float(cosine_min), floor)
        ax.axhline(bound, color=FAIL_COLOR, linewidth=1.6, linestyle="--", label=f"threshold >= {float(cosine_min):g}")
        errors.append(bound)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if errors:
        ax.set_ylim(min(errors) / 10, max(errors) * 10)
    ax.xaxis.set_major_locator(FixedLocator(sorted(dims)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(d) for d in sorted(dims)])
    ax.yaxis.set_major_formatter(FuncFormatter(_cosine_tick))
    ax.tick_params(axis="y", labelsize=7.5)
    ax.set_xlabel("Matryoshka dim", fontsize=9)
    ax.set_ylabel("min cosine to the reference\n(1 - cosine, log scale; up = further)", fontsize=8)
    ax.set_title("Worst input per group: artifact vs reference", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _style(ax)
    return fig


def _clip_plots(report: Any) -> tuple[list[tuple[str, str, str]], str | None]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (pip install matplotlib)."
    specs: list[tuple[str, str, Callable[[], Any]]] = [
        (
            "parity",
            "1 - min cosine of each input group at each Matryoshka dim, log scale: every line must stay below the dashed threshold.",
            lambda: plot_clip_parity(report.parity, (report.thresholds or {}).get("cosine_min")),
        ),
        ("retrieval", "nDCG@10 at each Matryoshka dim per direction: the artifact's dashed line should sit on the reference's solid line.", lambda: plot_matryoshka(report.retrieval)),
        ("retrieval", "nDCG@10 and Recall@10 per direction at full size, reference vs artifact.", lambda: plot_dataset_bars(report.retrieval, ("ndcg@10", "recall@10"))),
    ]
    made = []
    for section, caption, make in specs:
        try:
            fig = make()
        except Exception as e:  # a plot must never cost the report
            log.warning("plot skipped (%s): %s", caption[:40], e)
            continue
        if fig is not None:
            made.append((section, caption, _png_data_uri(fig)))
    return made, None


def render_clip_html(report: Any) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    plots, plot_note = _clip_plots(report)
    parts = _html_head(report, verdict, CLIP_TITLE)
    parts += ["<h2>Parity per input group</h2>", f'<p class="note">{_e(CLIP_PARITY_NOTE)}</p>']
    rows = []
    for p, cmin, cmean in _clip_parity_rows(report):
        rows.append(
            "<tr>"
            + _td(p.inputs)
            + _td(p.dim, "num")
            + _td(p.rows, "num")
            + _td(_fmt_cos(p.min_cosine), "num bad" if cmin and not cmin.passed else "num")
            + _td(_fmt_cos(p.mean_cosine), "num bad" if cmean and not cmean.passed else "num")
            + _td(_sci(p.max_abs), "num")
            + "</tr>"
        )
    parts.append(_html_table([("inputs", ""), ("dim", "num"), ("rows", "num"), ("min cosine", "num"), ("mean cosine", "num"), ("max abs error", "num")], rows))
    parts += [_figure_html(uri, caption) for section, caption, uri in plots if section == "parity"]
    parts += ["<h2>Retrieval</h2>", f'<p class="note">{_e(CLIP_RETRIEVAL_NOTE)}</p>']
    parts += _html_retrieval(report.retrieval, {c.name: c for c in report.checks})
    parts += [_figure_html(uri, caption) for section, caption, uri in plots if section == "retrieval"]
    parts += _html_checks(report.checks)
    if plot_note:
        parts.append(f'<p class="note">{_e(plot_note)}</p>')
    if report.checksums:
        parts.append("<h2>Data</h2>")
        parts.append(_html_table([("set", ""), ("sha256", "")], [f"<tr>{_td(name)}<td><code>{_e(digest)}</code></td></tr>" for name, digest in report.checksums.items()], "kv"))
    parts += _html_tail(report)
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- render check

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def render_check(html_path: Path, png_path: Path, timeout: float = 90.0, window: tuple[int, int] = (1200, 2400)) -> bool:
    """Screenshot ``html_path`` with headless Chromium into ``png_path``; False if there is no chromium binary.

    Also False (with a warning logged) if Chromium ran but wrote no screenshot.
    The browser gets a fresh profile and no network-facing background services.
    """
    exe = next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)
    if exe is None:
        return False
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="jev4-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png_path}",
            f"--window-size={window[0]},{window[1]}",
            html_path.as_uri(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("chromium did not finish within %.0f s", timeout)
            return False
    ok = png_path.is_file() and png_path.stat().st_size > 0
    if not ok:
        log.warning("chromium wrote no screenshot (exit %s): %s", proc.returncode, proc.stderr.strip()[-800:])
    return ok
