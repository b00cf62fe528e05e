"""jev4 bench edge on the tiny checkpoint: the harness (exports, child runs, ratios, parity, failures recorded, report files)."""

from __future__ import annotations

import json

import pytest

from jev4.bench import edge
from jev4.bench.edge import EdgeBenchSettings, EdgeFormat, run_edge_bench
from jev4.errors import SettingsError


def test_tiny_run_measures_each_format_against_torch_fp32(tmp_path, monkeypatch):
    broken = EdgeFormat("broken", ("--dtype", "fp64"), "broken")  # jev4-export refuses it: recorded, the run goes on
    monkeypatch.setitem(edge.FORMATS, "broken", broken)
    settings = EdgeBenchSettings(workdir=str(tmp_path / "work"), out=str(tmp_path / "out"), size="tiny", formats=("torch-fp32", "broken", "torch-bf16"), shapes=((1, 16), (2, 32)), repeats=1)
    summary = run_edge_bench(settings)
    rows = {row["name"]: row for row in summary["formats"]}
    assert list(rows) == ["torch-fp32", "broken", "torch-bf16"]
    assert rows["broken"]["error"].startswith("export failed (exit 2, peak RSS ") and rows["broken"]["tokens_per_s"] == {}
    for name in ("torch-fp32", "torch-bf16"):
        assert set(rows[name]["tokens_per_s"]) == {"1x16", "2x32"} and min(rows[name]["tokens_per_s"].values()) > 0
        assert rows[name]["artifact_bytes"] > 0 and rows[name]["run_peak_rss_gib"] > 0
    assert rows["torch-bf16"]["artifact_bytes"] < rows["torch-fp32"]["artifact_bytes"]  # bf16 weights: about half
    assert 0.999 <= rows["torch-bf16"]["single_cosine_min"] < 1.0  # bf16 differs a little from fp32, and is measured
    saved = json.loads((tmp_path / "out" / "edge.json").read_text())
    assert saved["formats"][2]["single_cosine_min"] == rows["torch-bf16"]["single_cosine_min"]
    table = (tmp_path / "out" / "edge.md").read_text()
    assert "| torch-fp32 |" in table and "(1.00x)" in table and "export failed" in table
    assert (tmp_path / "out" / "edge.png").stat().st_size > 10_000


def test_settings_are_checked(tmp_path):
    with pytest.raises(SettingsError, match="must include the baseline torch-fp32"):
        EdgeBenchSettings(workdir=str(tmp_path), out=str(tmp_path / "o"), formats=("gguf-q8_0",))
    with pytest.raises(SettingsError, match=r"unknown format\(s\) \['gguf-q2_k'\]"):
        EdgeBenchSettings(workdir=str(tmp_path), out=str(tmp_path / "o"), formats=("torch-fp32", "gguf-q2_k"))
    with pytest.raises(SettingsError, match="--size 'huge'"):
        EdgeBenchSettings(workdir=str(tmp_path), out=str(tmp_path / "o"), size="huge")
