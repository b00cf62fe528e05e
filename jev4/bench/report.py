"""Turning saved benchmark results into markdown tables and plots for docs/.

Running and reporting are separate steps: results are measured once (maybe
on a lent GPU machine) and saved as JSON; reports are made from the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path


def encode_table(results: dict) -> str:
    """A markdown table of an encode benchmark (one row per mode x batch x seq)."""
    rows = [
        "| mode | batch | seq | tokens/s | docs/s | p50 ms | p99 ms | peak GPU GiB | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results["points"]:
        mfu = f"{100 * p['mfu']:.1f}%" if p.get("mfu") is not None else "n/a"
        rows.append(
            f"| {p['mode']} | {p['batch']} | {p['seq']} | {p['tokens_per_s']:,.0f} | {p['docs_per_s']:,.1f} | "
            f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['peak_mem_gib']:.1f} | {mfu} |"
        )
    return "\n".join(rows)


def plot_encode(results: dict, png: Path) -> Path:
    """Tokens/s against batch size, one line per mode and sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    keys = sorted({(p["mode"], p["seq"]) for p in results["points"]})
    for mode, seq in keys:
        pts = sorted((p["batch"], p["tokens_per_s"]) for p in results["points"] if p["mode"] == mode and p["seq"] == seq)
        dashed = mode in ("unmerged",) or mode.startswith("ort")
        ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", linestyle="--" if dashed else "-", label=f"{mode}, seq {seq}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{results.get('title', 'torch reference')}, {results.get('dtype', '')}, {results.get('device', '')}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
