"""``jev4 bench fast-path`` in its CPU smoke mode (tiny model): every part runs and writes sane results.

The real figures come from a GPU host (scripts/gpu-check.sh bench); here the
point is that the code paths (torch bf16, fp16 onnxruntime, torch FP8, the
end-to-end corpus comparison, the reports) run and produce consistent JSON.
"""

import json

import pytest

import torch

from jev4.bench import gpu_fast_path
from jev4.bench.gpu_fast_path import FastPathSettings, attention_score_bytes, markdown, ort_skip_reason, peak_tflops
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


def test_torch_modes_and_e2e_run_before_ort(smoke):
    """ort-fp16 runs last, so an onnxruntime crash that breaks the CUDA context cannot take the torch figures with it."""
    _, results = smoke
    modes = [p["mode"] for p in results["points"]]
    first_ort = modes.index("ort-fp16")
    assert all(m == "ort-fp16" for m in modes[first_ort:]) and "torch-fp8" in modes[:first_ort]
    order = [k for k in results["timings"] if k.endswith("_s") and k.split("_s")[0] in ("torch-bf16", "torch-fp8", "e2e", "ort-fp16")]
    assert order == ["torch-bf16_s", "torch-fp8_s", "e2e_s", "ort-fp16_s"]


GIB = 1024**3


def test_attention_score_bytes():
    # full size: 16 heads; 32 x 2048 is the measured point (4.3 GB of scores), 128 x 2048 the 16 GiB buffer that crashed
    assert attention_score_bytes(32, 16, 2048) == 4_294_967_296
    assert attention_score_bytes(128, 16, 2048) == 16 * GIB
    assert attention_score_bytes(1, 1, 10, element_bytes=4) == 400


@pytest.mark.parametrize(
    "batch, seq, free_gib, skipped",
    [
        (32, 2048, 70, False),  # 4 GiB x 6.5 = 26 GiB: fits an H100 with the model loaded
        (128, 2048, 70, True),  # 16 GiB x 6.5 = 104 GiB
        (128, 512, 70, False),  # 1 GiB x 6.5
        (32, 2048, 20, True),  # 26 GiB over 20 GiB free
        (128, 2048, None, False),  # CPU (--tiny): never skipped
    ],
)
def test_ort_skip_reason(batch, seq, free_gib, skipped):
    reason = ort_skip_reason(batch, 16, seq, None if free_gib is None else free_gib * GIB)
    assert (reason is not None) == skipped
    if skipped:
        assert reason.startswith("skipped: O(T^2) attention scores need ~")
        assert f"{attention_score_bytes(batch, 16, seq) / GIB:.1f} GiB per layer" in reason and f"{free_gib:.1f} GiB free" in reason


def test_ort_skip_reason_factor_boundary():
    scores = attention_score_bytes(8, 16, 1024)
    assert ort_skip_reason(8, 16, 1024, int(scores * 6.5)) is None
    assert ort_skip_reason(8, 16, 1024, int(scores * 6.5) - 1) is not None
    assert ort_skip_reason(8, 16, 1024, scores, factor=1.0) is None


def test_skipped_ort_point_is_recorded(monkeypatch):
    """On a GPU the free memory decides; the skip lands in ``failures`` with its reason and the report lists it."""
    from jev4.model.tiny import FULL_SIZE

    monkeypatch.setattr(gpu_fast_path, "_device_free_bytes", lambda device: 40 * GIB)
    failures = []
    assert gpu_fast_path._skip_ort_point(FULL_SIZE, 128, 2048, torch.device("cuda"), failures)
    assert not gpu_fast_path._skip_ort_point(FULL_SIZE, 8, 2048, torch.device("cuda"), failures)
    assert failures == [{"mode": "ort-fp16", "batch": 128, "seq": 2048, "error": ort_skip_reason(128, 16, 2048, 40 * GIB)}]
    results = {"device": "x", "model": "m", "peak_tflops": {"bf16": None, "fp8": None}, "points": [], "failures": failures}
    failures.append({"mode": "ort-fp16", "batch": None, "seq": None, "error": "export failed"})
    md = markdown(results)
    assert "- ort-fp16 128x2048: skipped: O(T^2) attention scores need ~16.0 GiB per layer" in md
    assert "- ort-fp16 all points: export failed" in md


def test_ort_mode_failure_keeps_the_other_figures(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(gpu_fast_path, "_ort_points", broken)
    failures = []
    assert gpu_fast_path._ort_mode(None, None, None, torch.device("cpu"), {}, failures, {}) == []
    assert failures == [{"mode": "ort-fp16", "batch": None, "seq": None, "error": "CUDA error: an illegal memory access was encountered"}]


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
