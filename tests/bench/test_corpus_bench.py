"""jev4 bench corpus on a tiny corpus: the synthetic corpus, the projection's arithmetic, and one real run (in-process and Ray 1 worker)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jev4.bench import corpus as bench
from jev4.bench.corpus import GPU_REFERENCE, CorpusBenchSettings, project, run_corpus_bench, write_synthetic_corpus
from jev4.errors import SettingsError

REPO = Path(__file__).resolve().parents[2]


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_synthetic_corpus_is_deterministic_unique_and_cycles_the_pool(tmp_path):
    first = write_synthetic_corpus(tmp_path / "a.jsonl", 3010)
    second = write_synthetic_corpus(tmp_path / "b.jsonl", 3010)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes() and first["sha256"] == second["sha256"]
    records = _records(tmp_path / "a.jsonl")
    pool = first["distinct_texts_cycled"]
    assert len(records) == 3010 == first["docs"] and pool == 3000
    assert len({r["id"] for r in records}) == 3010 and len({r["text"] for r in records}) == 3010  # unique ids, and texts (their "# doc N" line)
    body = [r["text"].split("\n", 1)[1] for r in records]
    assert body[pool:] == body[:10]  # the pool, cycled in the same seeded order
    lengths = [len(b) for b in body[:pool]]
    assert min(lengths) < 200 and max(lengths) > 5000  # varied lengths, as a real code corpus
    other = write_synthetic_corpus(tmp_path / "c.jsonl", 20, seed=1)
    assert other["sha256"] != write_synthetic_corpus(tmp_path / "d.jsonl", 20)["sha256"]


def test_projection_is_the_rounds_formula_and_monotone():
    rows = project(100.0, 1000, 0.5, 30.0, gpus=(1, 2, 4, 64), corpus_docs=(10_500, 1_000_000))
    shard_s = 1000 / 100.0 + 0.5
    for row in rows:
        n = row["gpus"]
        assert row["steady_docs_per_s"] == pytest.approx(n * 1000 / shard_s)
        assert row["efficiency"] == pytest.approx(10 / 10.5)
        assert row["hours_10500"] == pytest.approx((30 + math.ceil(11 / n) * shard_s) / 3600)  # 11 shards, the last one short
        assert row["docs_per_s_1000000"] == pytest.approx(1_000_000 / (30 + math.ceil(1000 / n) * shard_s))
    hours = [r["hours_1000000"] for r in rows]
    assert hours == sorted(hours, reverse=True) and len(set(hours)) == len(hours)
    assert project(100.0, 1000, -2.0, 0.0, gpus=(1,))[0]["efficiency"] == 1.0  # a negative measured overhead counts as none


def test_gpu_reference_is_the_figure_in_docs_results():
    e2e = json.loads((REPO / "docs/results/fast-path-h100.json").read_text())
    assert GPU_REFERENCE["docs_per_s"] == e2e["e2e"]["fp8_path"]["docs_per_s"] and GPU_REFERENCE["device"] == e2e["device"]


def test_settings_are_checked(tmp_path):
    with pytest.raises(SettingsError, match="must include 'in-process'"):
        CorpusBenchSettings(workdir=str(tmp_path), out="o.json", modes=("ray-1",))
    with pytest.raises(SettingsError, match="cannot be shared evenly by 2 workers"):
        CorpusBenchSettings(workdir=str(tmp_path), out="o.json", threads=3, memory_docs=())
    with pytest.raises(SettingsError, match=r"unknown mode\(s\) \['ray-8'\]"):
        CorpusBenchSettings(workdir=str(tmp_path), out="o.json", modes=("in-process", "ray-8"))


def test_tiny_run_measures_in_process_and_ray_and_they_agree(tmp_path):
    pytest.importorskip("ray", reason="the Ray mode needs ray[data]: pip install 'jev4[ray]'")
    pytest.importorskip("ray.data")
    out = tmp_path / "corpus.json"
    settings = CorpusBenchSettings(workdir=str(tmp_path / "work"), out=str(out), docs=300, modes=("in-process", "ray-1"), shard_size=50, batch_size=16,
                                   max_length=32, memory_docs=(100, 300), memory_ray=False, progress=False)  # fmt: skip
    summary = run_corpus_bench(settings)
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    rows = {r["mode"]: r for r in summary["modes"]}
    assert list(rows) == ["in-process", "ray-1"]
    for row in rows.values():
        assert row["docs"] == 300 and row["shards"] == 6
        assert row["docs_per_s"] == pytest.approx(300 / row["seconds"]) and row["s_per_shard"] == pytest.approx(row["seconds"] / 6)
        assert row["seconds"] == pytest.approx(row["ray_init_s"] + row["encode_s"])
        assert 0 < row["first_shard_s"] < row["encode_s"] and row["steady_s_per_shard"] > 0
        assert 0.05 < row["peak_rss_driver_gib"] < 4
    assert rows["in-process"]["peak_rss_workers_gib"] == [] and rows["in-process"]["overhead_per_shard_s"] is None
    ray1 = rows["ray-1"]
    assert ray1["ray_init_s"] > 0 and ray1["threads_per_worker"] == 2 and ray1["startup_overhead_s"] is not None
    assert ray1["niceness"] == rows["in-process"]["niceness"]  # Ray's workers at the driver's priority, not Ray's default nice 15
    assert len(ray1["peak_rss_workers_gib"]) == 1 and 0.05 < ray1["peak_rss_workers_gib"][0] < 4  # the one ShardEncoder actor was seen
    assert ray1["overhead_per_shard_s"] == pytest.approx(ray1["steady_s_per_shard"] - rows["in-process"]["steady_s_per_shard"])
    assert summary["identical_outputs"] == {"ray-1": True} and summary["all_identical"] is True
    memory = summary["memory"]
    assert [r["docs"] for r in memory["runs"]] == [100, 300] and memory["ray_2_workers"] is None
    growth = (memory["runs"][1]["peak_rss_driver_gib"] - memory["runs"][0]["peak_rss_driver_gib"]) * bench.GIB / 200
    assert memory["rss_growth_bytes_per_doc"] == pytest.approx(growth)
    projection = summary["projection"]
    assert projection["overhead_per_shard_s"] == max(0.0, ray1["overhead_per_shard_s"]) and projection["shard_size"] == 10_000
    assert projection["rows"] == project(GPU_REFERENCE["docs_per_s"], 10_000, ray1["overhead_per_shard_s"], projection["startup_s"])
    assert "| ray-1 | 1 | 2 | 300 |" in bench.table(summary)
    with pytest.raises(Exception, match="exists"):
        run_corpus_bench(settings)  # the report is not replaced without force
