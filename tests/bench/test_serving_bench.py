"""jev4 bench serving: what it measures and how it reports an engine it cannot start (the engines themselves are in tests/serving)."""

from __future__ import annotations

import json

import pytest

from jev4.bench.serving import ServingBenchSettings, run_serving_bench
from jev4.errors import Jev4Error
from jev4.export.merge import MergeSettings, merge_checkpoint


@pytest.fixture(scope="module")
def export(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-serving") / "text-only"
    return merge_checkpoint(MergeSettings(model=str(tiny_dir), adapter="retrieval", out=str(out), dtype="fp32", text_only=True), progress=False)


def test_torch_is_measured_and_a_missing_engine_is_named(export, tmp_path, monkeypatch):
    monkeypatch.setenv("JEV4_VLLM_PYTHON", str(tmp_path / "nowhere" / "bin" / "python"))
    out = tmp_path / "bench"
    result = run_serving_bench(ServingBenchSettings(export=str(export), out=str(out), engines=("torch", "vllm-embed"), requests=3, corpus_texts=16, batch_size=8))
    torch_row, vllm_row = result.engines
    assert torch_row.engine == "torch" and torch_row.version == "jev4 in-process (TextOnlyEncoder)"
    assert 0 < torch_row.latency_ms_p50 <= torch_row.latency_ms_p90 and torch_row.texts_per_s > 0 and torch_row.ready_s > 0
    assert vllm_row.skipped == f"no complete {tmp_path / 'nowhere'} (make vllm-env builds it)" and vllm_row.texts_per_s is None
    saved = json.loads((out / "serving.json").read_text())
    assert saved["engines"][0]["texts_per_s"] == torch_row.texts_per_s
    assert "| vllm-embed | skipped: no complete" in (out / "serving.md").read_text()


def test_refusals(export, tiny_dir, tmp_path):
    with pytest.raises(Jev4Error, match=r"unknown engine\(s\) \['sglang'\]"):
        run_serving_bench(ServingBenchSettings(export=str(export), out=str(tmp_path / "a"), engines=("sglang",)))
    with pytest.raises(Jev4Error, match="not a --text-only export"):
        run_serving_bench(ServingBenchSettings(export=str(tiny_dir), out=str(tmp_path / "b"), engines=("torch",)))
