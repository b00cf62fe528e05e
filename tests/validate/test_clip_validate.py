"""``jev4 validate`` on jina-clip-v2 artifacts of the tiny checkpoint, through ``jev4.cli.main.main``: verdicts, reports, exit codes.

Each precision is exported once per module (fp32, fp16, w-int8 ONNX, and
the fp32 Jina-signature model.onnx) and
validated against the torch fp32 reference: PASS, with report.json / .md /
.html and plots. A FAIL comes from a real difference: a w-int8 artifact
judged by the fp32 bounds, and an fp32 artifact whose vision weights were
altered after export (manifest re-sealed, so only the numbers tell).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from jev4.cli.export import main as export_main
from jev4.cli.main import main
from jev4.export.manifest import MANIFEST_NAME, sha256_file
from jev4.families.jina_clip_v2.tiny import write_tiny_checkpoint
from jev4.validate.thresholds import CLIP_DEFAULTS

GROUPS = ("multilingual-names queries", "multilingual-names documents", "pydoc-pages queries", "pydoc-pages pages", "pydoc-pages crops")
DIRECTIONS = ("multilingual-names (text->text)", "pydoc-pages (text->image)", "pydoc-pages crops (image->image)")
DIMS = (32, 16, 8)  # the tiny checkpoint's hidden size and Matryoshka dims
EXPORT_FLAGS = {"fp32": [], "fp16": ["--dtype", "fp16"], "w-int8": ["--weights", "int8"], "jina-signature": ["--jina-onnx-signature"]}
PRECISION = {"fp32": "fp32", "fp16": "fp16", "w-int8": "w-int8", "jina-signature": "fp32"}  # what each manifest says
QUERIES = ["--max-queries", "64"]  # fewer multilingual-names queries than the default 200: the file stays fast


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def artifacts(clip_dir, tmp_path_factory) -> dict[str, Path]:
    """One ONNX artifact per precision, exported through jev4-export (each self-checked before publishing)."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, flags in EXPORT_FLAGS.items():
        out[name] = root / name
        assert export_main(["--model", str(clip_dir), "--out", str(out[name]), "--no-progress", *flags]) == 0
    return out


def _validate(clip_dir: Path, artifact: Path, out: Path, *flags: str) -> int:
    return main(["--no-progress", "validate", "--reference", str(clip_dir), "--artifact", str(artifact), "--out", str(out), *QUERIES, *flags])


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(EXPORT_FLAGS))
def test_each_precision_passes_with_its_own_thresholds(clip_dir, artifacts, tmp_path, capsys, name):
    out = tmp_path / "report"
    precision = PRECISION[name]
    assert _validate(clip_dir, artifacts[name], out) == 0
    assert "verdict: PASS (48/48 checks passed)" in capsys.readouterr().out
    report = _report(out)
    assert report["passed"] is True and report["failures"] == []
    assert report["family"] == "jina-clip-v2" and report["precision"] == precision
    assert report["thresholds"] == CLIP_DEFAULTS[precision].to_json()
    # every group at every dim, every direction at every dim, each checked twice
    assert {(p["inputs"], p["dim"]) for p in report["parity"]} == {(g, d) for g in GROUPS for d in DIMS}
    assert {(r["dataset"], r["dim"]) for r in report["retrieval"]} == {(s, d) for s in DIRECTIONS for d in DIMS}
    assert len(report["checks"]) == 2 * len(GROUPS) * len(DIMS) + 2 * len(DIRECTIONS) * len(DIMS)
    assert len(report["checksums"]["multilingual-names"]) == 64  # of the subset it ran on (the full set is checked at build: EXPECTED_SHA256)
    # measured on this checkpoint (docs/jina-clip-v2.md "Validate"): far inside each set's bounds
    worst = min(p["min_cosine"] for p in report["parity"])
    assert worst > {"fp32": 1 - 1e-9, "fp16": 1 - 1e-5, "w-int8": 0.998}[precision]
    if precision == "fp32":
        assert all(v == 0 for r in report["retrieval"] for v in r["delta"].values())
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# jev4 validate (jina-clip-v2): PASS (all 48 checks passed)")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 2 and "<h2>Parity per input group</h2>" in html
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]


def test_int8_judged_by_fp32_bounds_fails(clip_dir, artifacts, tmp_path, capsys):
    out = tmp_path / "report"
    assert _validate(clip_dir, artifacts["w-int8"], out, "--precision", "fp32") == 1
    printed = capsys.readouterr().out
    assert "verdict: FAIL" in printed and "failed: parity: pydoc-pages pages min cosine (dim 8)" in printed
    report = _report(out)
    assert report["passed"] is False and report["precision"] == "fp32"
    failed = {c["name"] for c in report["checks"] if not (c["value"] >= c["minimum"] if c["minimum"] is not None else c["value"] <= c["maximum"])}
    assert failed and all(name.startswith("parity: ") for name in failed)  # cosines ~0.9995 < 0.99999; retrieval moves inside one query
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# jev4 validate (jina-clip-v2): FAIL")


def _scale_vision_weight(artifact: Path, factor: float) -> str:
    """Scale the largest float initializer of vision.onnx in place and re-seal the manifest; returns its name."""
    graph_path = artifact / "vision.onnx"
    model = onnx.load(str(graph_path))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(factor), target.name))
    for stale in (graph_path, artifact / "vision.onnx.data"):
        stale.unlink()
    onnx.save_model(model, str(graph_path), save_as_external_data=True, all_tensors_to_one_file=True, location="vision.onnx.data")
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    for rel in ("vision.onnx", "vision.onnx.data"):
        manifest["files"][rel] = {"sha256": sha256_file(artifact / rel), "bytes": (artifact / rel).stat().st_size}
    (artifact / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return target.name


def test_altered_vision_weights_fail_on_images_only(clip_dir, artifacts, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(artifacts["fp32"], altered)
    _scale_vision_weight(altered, 1.5)
    out = tmp_path / "report"
    assert _validate(clip_dir, altered, out) == 1
    report = _report(out)
    assert report["failures"]
    image_side = ("pydoc-pages pages", "pydoc-pages crops", "(text->image)", "(image->image)")
    assert all(any(tag in failure for tag in image_side) for failure in report["failures"]), report["failures"]
    parity = {(p["inputs"], p["dim"]): p for p in report["parity"]}
    for (inputs, _), p in parity.items():
        if inputs in ("pydoc-pages pages", "pydoc-pages crops"):
            assert p["min_cosine"] < CLIP_DEFAULTS["fp32"].cosine_min, inputs
        else:  # the text graph is untouched
            assert p["min_cosine"] > 1 - 1e-9, inputs


def test_thresholds_file_overrides_the_defaults(clip_dir, artifacts, tmp_path):
    bounds = tmp_path / "bounds.json"
    bounds.write_text(json.dumps({"fp32": {"cosine_min": 1.0}}))
    out = tmp_path / "report"
    assert _validate(clip_dir, artifacts["fp32"], out, "--thresholds", str(bounds)) == 1  # 1 - 1e-13 < 1.0
    assert _report(out)["thresholds"]["cosine_min"] == 1.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adapter", "retrieval"], "--adapter retrieval: "),
        (["--dataset", "stdlib-code"], "--dataset: not for jina-clip-v2"),
        (["--no-probes", "--codecs", "int8"], "--no-probes, --codecs: not for jina-clip-v2"),
        (["--backend", "torch"], "--backend torch: not for jina-clip-v2"),
        (["--precision", "bf16"], "unknown precision 'bf16'; known: fp32, fp16, w-int8"),
        (["--thresholds", "/no/such/file.json"], "thresholds file not found"),
        (["--max-queries", "0"], "--max-queries must be a positive integer, got 0"),
        (["--threads", "0"], "threads must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(clip_dir, artifacts, tmp_path, caplog, flags, message):
    out = tmp_path / "report"
    with caplog.at_level(logging.ERROR):
        assert _validate(clip_dir, artifacts["fp32"], out, *flags) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert not out.exists()


def test_adapter_message_says_why(clip_dir, artifacts, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert _validate(clip_dir, artifacts["fp32"], tmp_path / "r", "--adapter", "code") == 2
    assert f"--adapter code: {clip_dir} is jina-clip-v2, which has no task adapters" in caplog.text


def test_v4_artifact_against_clip_reference_is_refused(clip_dir, tmp_path, caplog):
    v4_like = tmp_path / "v4"
    v4_like.mkdir()
    (v4_like / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with caplog.at_level(logging.ERROR):
        assert _validate(clip_dir, v4_like, tmp_path / "r") == 2
    assert "is jina-embeddings-v4, but the reference" in caplog.text


def test_v4_still_requires_adapter(tmp_path, caplog):
    v4_like = tmp_path / "v4"
    v4_like.mkdir()
    (v4_like / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with caplog.at_level(logging.ERROR):
        assert main(["validate", "--reference", str(v4_like), "--artifact", str(v4_like), "--out", str(tmp_path / "r")]) == 2
    assert "--adapter is required for jina-embeddings-v4" in caplog.text
