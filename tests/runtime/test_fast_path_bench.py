"""``jev4 bench fast-path`` in its CPU smoke mode (tiny model): every part runs and writes sane results.

The real figures come from a GPU host (scripts/gpu-check.sh bench); here the
point is that the code paths (torch bf16, fp16 onnxruntime, torch FP8, the
end-to-end corpus comparison, the reports) run and produce consistent JSON.
"""

import json

import pytest

from jev4.bench.gpu_fast_path import FastPathSettings, peak_tflops
from jev4.cli.main import main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "fast-path"
    pytest.importorskip("onnxruntime")
    code = main(
        [
            "bench", "fast-path", "--device", "cpu", "--tiny",
            "--batches", "1,2", "--seqs", "16", "--warmup", "0", "--iters", "2",
            "--corpus-docs", "10", "--corpus-max-length", "64", "--corpus-batch", "4",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    return out, json.loads((out / "fast-path.json").read_text())


def test_writes_json_markdown_and_plot(smoke):
    out, results = smoke
    assert {"machine", "device", "peak_tflops", "settings", "points", "failures", "e2e", "timings"} <= set(results)
    assert (out / "fast-path.png").stat().st_size > 1000
    md = (out / "fast-path.md").read_text()
    assert "| torch-fp8 | 2 | 16 |" in md and "End to end: 10 mixed-length documents" in md


def test_grid_has_every_mode_and_point(smoke):
    _, results = smoke
    assert results["failures"] == []
    got = {(p["mode"], p["batch"], p["seq"]) for p in results["points"]}
    assert got == {(m, b, 16) for m in ("torch-bf16", "ort-fp16", "torch-fp8") for b in (1, 2)}
    for p in results["points"]:
        assert p["tokens_per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0
        assert p["docs_per_s"] == pytest.approx(p["tokens_per_s"] / p["seq"])
        assert p["mfu"] is None  # no datasheet peak for a CPU
    assert results["timings"]["onnx_bytes"] > 0


def test_end_to_end_comparison(smoke):
    _, results = smoke
    e2e = results["e2e"]
    up, fast = e2e["upstream_style"], e2e["fp8_path"]
    assert e2e["docs"] == 10 and e2e["real_tokens"] > 10
    assert up["batch_size"] == 8 and not up["length_sorted"] and up["lora"] == "unmerged fp32"
    assert fast["length_sorted"] and fast["fp8_layers"] > 0
    assert e2e["speedup_docs_per_s"] == pytest.approx(fast["docs_per_s"] / up["docs_per_s"])
    # Length-sorted batches of 4 never pad more than input-order batches of 8 (sorted contiguous groups are optimal).
    assert fast["token_positions"] <= up["token_positions"]
    assert 0 <= fast["padding_fraction"] < 1 and 0 <= up["padding_fraction"] < 1
    # Same base weights and the same merged LoRA: the FP8 path computes the same embeddings, up to FP8 error.
    assert e2e["fp8_vs_upstream_cosine_mean"] >= 0.99


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", (989.0, 1979.0)),
        ("NVIDIA H100 PCIe", (756.0, 1513.0)),
        ("NVIDIA H200", (989.0, 1979.0)),
        ("NVIDIA L40S", (362.0, 733.0)),
        ("NVIDIA L4", (121.0, 242.0)),
        ("NVIDIA A100-SXM4-80GB", (312.0, None)),
        ("Tesla T4", (None, None)),
    ],
)
def test_peak_by_gpu_name(name, expected):
    assert peak_tflops(name) == expected


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown mode"):
        FastPathSettings(modes=("torch-int4",))
    with pytest.raises(ValueError, match="iters"):
        FastPathSettings(iters=0)
    with pytest.raises(ValueError, match="--tiny"):
        FastPathSettings(device="cpu")
    assert main(["bench", "fast-path", "--device", "cpu", "--out", "unused"]) == 2  # one clear line, exit code 2


def test_export_only_then_reuse(tmp_path, caplog):
    """A graph exported ahead (--export-only) is reused by the timing run; another spec's graph is not."""
    import logging

    pytest.importorskip("onnxruntime")
    from jev4.bench.gpu_fast_path import export_fp16_graph
    from jev4.model.config import parse_config
    from jev4.model.synthetic import full_size_config
    from jev4.model.tiny import TinySpec

    work = tmp_path / "graph"
    assert main(["bench", "fast-path", "--device", "cpu", "--tiny", "--export-only", "--workdir", str(work)]) == 0
    graph = work / "language.onnx"
    stamp = graph.stat().st_mtime_ns
    spec = TinySpec()
    with caplog.at_level(logging.INFO, logger="jev4.bench.gpu_fast_path"):
        timings = export_fp16_graph(spec, parse_config(full_size_config(spec)), work)
    assert timings["ort_export_reused"] == 1.0 and timings["onnx_bytes"] > 0
    assert graph.stat().st_mtime_ns == stamp and "reusing" in caplog.text
    (work / "export-spec.json").write_text("{}")  # a different spec: exported again
    timings = export_fp16_graph(spec, parse_config(full_size_config(spec)), work)
    assert timings["ort_export_reused"] == 0.0 and graph.stat().st_mtime_ns != stamp
    assert main(["bench", "fast-path", "--device", "cpu", "--tiny", "--export-only", "--out", "x"]) == 2  # no --workdir
