"""``jev4 bench fast-path`` with issue 17's modes, in its CPU tiny mode: what the GPU script will run, checked here first.

The bucketed mode compiles with ``aot_eager`` (inductor takes minutes per
bucket on this machine; tests/runtime/test_torch_compiled.py covers it
under ``slow``); torchao's FP8 mode is GPU-only and must come out as
skipped with its reason, in the grid, the end-to-end rows and the nDCG rows.
"""

import json

import pytest

from jev4.bench.fast_path_targets import target_report
from jev4.bench.gpu_fast_path import ROUND2_MODES, BenchSettingsError, FastPathSettings, markdown, parse_points, run_fast_path

POINTS = ((1, 128), (32, 512))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "round2"
    settings = FastPathSettings(
        device="cpu", tiny=True, modes=ROUND2_MODES, batches=(1, 32), seqs=(128, 512), warmup=1, iters=2,
        compiled_points=POINTS, compile_backend="aot_eager",
        corpus_docs=12, corpus_max_length=64, corpus_batch=4,
        e2e_modes=("torch-bf16", "torch-bf16-bucketed", "torch-fp8-torchao"), e2e_length_buckets=(32, 64),
        ndcg_sets=("stdlib-code",), ndcg_queries=10, ndcg_docs=40,
    )  # fmt: skip
    run_fast_path(settings, out)
    return out, json.loads((out / "fast-path.json").read_text())


def test_grid_points_and_compile_seconds(run):
    out, results = run
    got = {(p["mode"], p["batch"], p["seq"]) for p in results["points"]}
    eager = {(m, b, s) for m in ("torch-bf16", "torch-fp8") for b in (1, 32) for s in (128, 512)}
    assert got == eager | {("torch-bf16-bucketed", b, s) for b, s in POINTS}
    assert results["failures"] == []
    assert set(results["compile_seconds"]) == {"torch-bf16-bucketed"}
    assert set(results["compile_seconds"]["torch-bf16-bucketed"]) == {"1x128", "32x512"}
    assert all(s > 0 for s in results["compile_seconds"]["torch-bf16-bucketed"].values())
    for p in results["points"]:
        assert p["tokens_per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0
    assert (out / "fast-path.png").stat().st_size > 1000


def test_gpu_only_mode_is_skipped_with_reason(run):
    _, results = run
    assert results["skipped_modes"] == [
        {"mode": "torch-fp8-torchao", "reason": "skipped: torch-fp8-torchao runs torchao's float8 kernels on a CUDA GPU (compute capability >= 8.9); device is cpu"}
    ]
    assert not any(p["mode"] == "torch-fp8-torchao" for p in results["points"])
    md = (run[0] / "fast-path.md").read_text()
    assert "- torch-fp8-torchao: skipped: torch-fp8-torchao runs torchao's float8 kernels on a CUDA GPU" in md


def test_targets_are_computed_from_the_points(run):
    _, results = run
    points = {(p["mode"], p["batch"], p["seq"]): p for p in results["points"]}
    speed = {r["mode"]: r for r in results["targets"]["fp8_speedup_32x512"]}
    ref = points[("torch-bf16", 32, 512)]["tokens_per_s"]
    assert speed["torch-fp8"]["ratio"] == pytest.approx(points[("torch-fp8", 32, 512)]["tokens_per_s"] / ref)
    assert speed["torch-fp8"]["met"] == (speed["torch-fp8"]["ratio"] >= 1.6) and speed["torch-fp8"]["target"] == 1.6
    assert speed["torch-fp8-torchao"]["missing"] == "no torch-fp8-torchao point at 32x512 in this run"
    latency = {r["mode"]: r for r in results["targets"]["bf16_latency_1x128"]}
    for mode in ("torch-bf16", "torch-bf16-bucketed"):
        assert latency[mode]["p50_ms"] == points[(mode, 1, 128)]["p50_ms"]
        assert latency[mode]["met"] == (latency[mode]["p50_ms"] <= 10.0)
    md = (run[0] / "fast-path.md").read_text()
    assert "## Targets (issue 17)" in md and "- torch-fp8 / torch-bf16 at 32x512, target >= 1.6x: " in md


def test_ndcg_rows(run):
    _, results = run
    rows = {r["mode"]: r for r in results["ndcg"]}
    fp8 = rows["torch-fp8"]
    assert fp8["dataset"] == "stdlib-code" and fp8["queries"] == 10 and fp8["threshold"] == pytest.approx(0.2)
    assert fp8["delta"] == pytest.approx(fp8["fp8"] - fp8["reference"]) and 0 <= fp8["reference"] <= 1
    assert rows["torch-fp8-torchao"]["delta"] is None and rows["torch-fp8-torchao"]["skipped"].startswith("skipped: ")
    target = {r["mode"]: r for r in results["targets"]["fp8_ndcg10_delta"]}
    assert target["torch-fp8"]["met"] == (abs(fp8["delta"]) <= 0.2) and target["torch-fp8-torchao"]["met"] is False


def test_end_to_end_rows(run):
    _, results = run
    e2e = results["e2e"]
    rows = {r["mode"]: r for r in e2e["rows"]}
    assert rows["torch-fp8-torchao"] == {"mode": "torch-fp8-torchao", "skipped": results["skipped_modes"][0]["reason"]}
    bucketed, eager = rows["torch-bf16-bucketed"], rows["torch-bf16"]
    assert set(bucketed["compile_seconds"]) == {"4x32", "4x64"} and "compile_seconds" not in eager
    assert bucketed["eager_batches"] == 0  # corpus_max_length 64 fits the last bucket
    assert sum(bucketed["bucket_calls"].values()) == 3  # 12 docs in batches of 4
    assert bucketed["bucket_token_positions"] >= bucketed["token_positions"] == eager["token_positions"]
    # Same merged weights, same sorted batches: the compiled rows reproduce the eager one.
    assert bucketed["cosine_to_upstream_mean"] == pytest.approx(eager["cosine_to_upstream_mean"], abs=1e-6)
    for r in (bucketed, eager):
        assert r["docs_per_s"] == pytest.approx(12 / r["seconds"]) and r["speedup_docs_per_s_vs_upstream"] > 0
    assert "| torch-bf16-bucketed | 4 |" in markdown(results)


def test_target_report_without_points():
    report = target_report([], [])
    assert [r["missing"] for r in report["fp8_speedup_32x512"]] == ["no torch-bf16 point at 32x512 in this run"] * 2
    fast = [{"mode": "torch-bf16", "batch": 1, "seq": 128, "p50_ms": 9.5}, {"mode": "torch-bf16-bucketed", "batch": 1, "seq": 128, "p50_ms": 12.0}]
    latency = target_report(fast, [])["bf16_latency_1x128"]
    assert [(r["mode"], r["met"]) for r in latency] == [("torch-bf16", True), ("torch-bf16-bucketed", False)]


def test_settings_and_points_parsing():
    assert parse_points("1x128, 32x512") == POINTS
    with pytest.raises(BenchSettingsError, match="1x128,32x512"):
        parse_points("1-128")
    with pytest.raises(BenchSettingsError, match=r"compiled points \[\(8, 128\)\] are not on the grid"):
        FastPathSettings(compiled_points=((8, 128),), batches=(1, 32))
    with pytest.raises(BenchSettingsError, match="e2e_modes are torch modes"):
        FastPathSettings(e2e_modes=("ort-fp16",))


def test_round2_preset():
    """What scripts/gpu-check.sh round2 runs on the GPU: the four modes, the target points compiled, e2e and nDCG rows."""
    from jev4.bench.gpu_fast_path import round2_settings

    s = round2_settings()
    assert s.device == "cuda" and not s.tiny and s.modes == ROUND2_MODES
    assert s.compiled_points == POINTS and s.compile_scope == "layers" and s.compile_backend == "inductor"
    assert s.e2e_modes == ("torch-bf16", "torch-fp8-torchao") and s.corpus_docs == 1000
    assert s.ndcg_sets == ("stdlib-code", "pydoc-pages")
    assert round2_settings(scope="network").compile_scope == "network"
    with pytest.raises(BenchSettingsError, match="--tiny"):
        round2_settings(device="cpu")
