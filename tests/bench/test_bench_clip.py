"""jev4 bench clip on the tiny jina-clip-v2: counts from the file, every format exported and measured in children, parity, failures recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from jev4.bench import clip
from jev4.bench.clip import ClipBenchSettings, ClipFormat, run_clip_bench, run_step
from jev4.errors import SettingsError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run with every real format plus one the exporter refuses (--dtype bf16 is v4-only)."""
    root = tmp_path_factory.mktemp("clip-bench")
    (root / "work").mkdir()
    (root / "work" / "theirs.txt").write_text("not the bench's")  # --workdir may be shared: this must survive the clean-up
    patch = pytest.MonkeyPatch()
    patch.setitem(clip.FORMATS, "broken", ClipFormat("broken", ("--dtype", "bf16")))
    try:
        settings = ClipBenchSettings(
            out=str(root / "out"), size="tiny", workdir=str(root / "work"),
            formats=("torch-fp32", "onnx-fp32", "broken", "onnx-fp16", "onnx-int8"), text_shapes=((2, 16),), image_batch=2, repeats=1,
        )  # fmt: skip
        summary = run_clip_bench(settings)
    finally:
        patch.undo()
    return root, summary


def test_parameter_counts_are_the_checkpoints_own_tensor_sizes(tiny_run, tmp_path):
    from jev4.families.jina_clip_v2.tiny import write_tiny_checkpoint

    _, summary = tiny_run
    source = write_tiny_checkpoint(tmp_path / "tiny", seed=0)  # the run's source is gone (no --keep); the same writer and seed
    assert clip.count_parameters(source) == {k: v for k, v in summary["parameters"].items() if k not in ("published", "matches_published")}
    tensors = load_file(str(source / "model.safetensors"))  # independent of count_parameters' header read
    sizes = {key: value.numel() for key, value in tensors.items()}
    p = summary["parameters"]
    assert p["vision"] == sum(n for k, n in sizes.items() if k.startswith("vision_model."))
    assert p["text"] == sum(n for k, n in sizes.items() if k.startswith("text_model."))
    assert p["lora"] == sum(n for k, n in sizes.items() if "lora_" in k) > 0
    assert p["text_merged"] == p["text"] - p["lora"] and p["other"] == sizes["logit_scale"] == 1
    assert p["total"] == sum(sizes.values()) and p["dtypes"] == ["BF16"]
    assert p["matches_published"] is None  # only the full size is compared with the published figures


def test_every_format_is_exported_measured_and_compared(tiny_run):
    _, summary = tiny_run
    rows = {row["name"]: row for row in summary["formats"]}
    assert list(rows) == ["torch-fp32", "onnx-fp32", "broken", "onnx-fp16", "onnx-int8"] and summary["complete"] is True
    for name in ("torch-fp32", "onnx-fp32", "onnx-fp16", "onnx-int8"):
        row = rows[name]
        assert row["error"] == "" and row["artifact_bytes"] > 0 and row["run_peak_rss_gib"] > 0.05
        assert row["text"]["2x16"]["tokens"] == 32 and row["text"]["2x16"]["tokens_per_s"] > 0  # exactly batch x length tokens
        assert row["image"]["2x512px"]["images_per_s"] > 0
        # CPU clocks tick coarsely in some containers (CI measured 1.12 for one tens-of-ms call), so the bound is loose
        assert 0 < row["image"]["2x512px"]["cpu_share"] <= 1.5 and len(row["text"]["2x16"]["cpu_seconds"]) == 1  # repeats=1
        if name != "torch-fp32":
            assert row["export_s"] > 0 and row["export_peak_rss_gib"] > 0.1 and set(row["export_self_check"]) == {"text_min_cosine", "vision_min_cosine"}
            assert set(row["cosine_vs_torch_fp32"]) == {"text-2x16", "image-2x512px"}
    bars = {"onnx-fp32": 1 - 1e-6, "onnx-fp16": 0.999, "onnx-int8": 0.99}
    for name, bar in bars.items():
        for cos in rows[name]["cosine_vs_torch_fp32"].values():
            assert bar <= cos["min"] <= cos["mean"] <= 1 + 1e-9
    assert rows["onnx-int8"]["cosine_vs_torch_fp32"]["text-2x16"]["min"] < 1 - 1e-7  # int8 weights differ measurably
    assert rows["broken"]["error"].startswith("export (") and "failed (exit 2" in rows["broken"]["error"] and rows["broken"]["text"] == {}


def test_results_files_and_clean_up(tiny_run):
    root, summary = tiny_run
    out = root / "out"
    saved = json.loads((out / "clip.json").read_text())
    assert saved["formats"] == summary["formats"] and saved["settings"]["size"] == "tiny"
    md = (out / "clip.md").read_text()
    assert "| onnx-int8 |" in md and "1 (baseline)" in md and "broken (export (" in md
    assert (out / "clip.png").stat().st_size > 10_000
    assert "--dtype bf16" in (out / "export-broken.log").read_text()  # the failed step's own output is kept beside the results
    assert sorted(p.name for p in (root / "work").iterdir()) == ["theirs.txt"]  # without --keep only what the run wrote is removed
    assert not list(root.glob(".out.tmp-*"))  # every republish of OUT was whole


def test_step_timeout_kills_and_is_recorded(tmp_path):
    step = run_step([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.5, log_path=tmp_path / "slow.log")
    assert step.timed_out and step.returncode == -9 and step.seconds < 10
    assert step.failure("measuring").startswith("measuring passed its time limit")


def test_settings_are_checked(tmp_path):
    with pytest.raises(SettingsError, match="must include the baseline torch-fp32"):
        ClipBenchSettings(out=str(tmp_path / "o"), formats=("onnx-fp32",))
    with pytest.raises(SettingsError, match=r"unknown format\(s\) \['onnx-int4'\]"):
        ClipBenchSettings(out=str(tmp_path / "o"), formats=("torch-fp32", "onnx-int4"))
    with pytest.raises(SettingsError, match="--size 'huge'"):
        ClipBenchSettings(out=str(tmp_path / "o"), size="huge")
    assert ClipBenchSettings(out=str(tmp_path / "o") + "/").work == Path(str(tmp_path / "o") + "-work")


def test_full_size_config_is_upstreams_shape():
    from jev4.bench.clip_worker import full_size_config
    from jev4.families.jina_clip_v2.checkpoint import expected_layout
    from jev4.families.jina_clip_v2.config import parse_config

    raw = full_size_config()
    assert set(raw["text_config"]["hf_model_config_kwargs"]) == {"lora_adaptations", "lora_rank", "lora_alpha", "lora_dropout_p", "task_instructions"}
    layout = expected_layout(parse_config(raw))
    sizes = {prefix: sum(int(np.prod(s)) for k, s in layout.items() if k.startswith(prefix)) for prefix in ("vision_model.", "text_model.")}
    assert sizes == {"vision_model.": 304_382_912, "text_model.": 560_895_564}  # the published 304.38M and 561M

