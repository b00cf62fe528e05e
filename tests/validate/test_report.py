"""Reports of jev4 validate, built from hand-made results: the verdict comes first, every format says what failed."""

import base64
import json
import math
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from jev4.validate.report import render_check, write_reports
from jev4.validate.results import ParityResult, RetrievalResult, STSResult, ValidationReport
from jev4.validate.thresholds import DEFAULTS, evaluate

DIMS = (2048, 1024, 512, 256, 128)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NDCG_FAIL = "retrieval stdlib-code single dim 2048: nDCG@10 drop"
COSINE_FAIL = "parity: single-vector min cosine (dim 128)"


def make_parity(bad_dim128: bool, seed: int = 0) -> ParityResult:
    """fp32-like parity (1 - 1e-7 errors); ``bad_dim128`` puts one input at cosine 0.97 when cut to 128 dims."""
    rng = np.random.default_rng(seed)
    kinds = ["query"] * 12 + ["text"] * 16 + ["image"] * 5
    per_input, cos_by_dim = [], {str(d): [] for d in DIMS}
    for i, kind in enumerate(kinds):
        cos = {str(d): float(1 - rng.lognormal(np.log(3e-7 * 2048 / d), 0.6)) for d in DIMS}
        if bad_dim128 and i == 20:
            cos["128"] = 0.97
        for d, v in cos.items():
            cos_by_dim[d].append(v)
        token_min = float(1 - rng.lognormal(np.log(5e-6), 0.5))
        row = {"id": f"{kind}-{i}", "kind": kind, "tokens": int(rng.integers(3, 512)), "cosine": cos, "max_abs": 1e-6}
        per_input.append({**row, "multi_cosine_min": token_min, "multi_cosine_mean": 0.999999})
    tokens = (1 - rng.lognormal(np.log(2e-6), 0.8, size=2000)).tolist()
    return ParityResult(
        single_cosine_min={d: min(v) for d, v in cos_by_dim.items()},
        single_cosine_mean={d: float(np.mean(v)) for d, v in cos_by_dim.items()},
        single_max_abs={d: 2e-6 * 2048 / int(d) for d in cos_by_dim},
        multi_token_cosine_min=min(tokens),
        multi_token_cosine_mean=float(np.mean(tokens)),
        maxsim_pearson=0.9999991,
        topk_overlap=1.0,
        score_spearman=0.9999987,
        per_input=per_input,
        single_cosines=cos_by_dim["2048"],
        token_cosines=tokens,
    )


def make_retrieval(ndcg_drop: float) -> list[RetrievalResult]:
    out = []
    for dataset, base in (("stdlib-code", 0.62), ("pydoc-pages", 0.48)):
        for dim in DIMS:
            shrink = 0.03 * np.log2(2048 / dim)
            ref = {"ndcg@10": base - shrink, "recall@10": base + 0.15 - shrink, "recall@100": 0.93 - shrink / 2, "mrr@10": base - 0.05 - shrink}
            art = {k: v - 0.0004 for k, v in ref.items()}
            if dataset == "stdlib-code" and dim == 2048:
                art["ndcg@10"] = ref["ndcg@10"] - ndcg_drop
            out.append(RetrievalResult(dataset, "single", dim, ref, art))
        ref = {"ndcg@10": base + 0.03, "recall@10": base + 0.17, "recall@100": 0.95, "mrr@10": base - 0.02}
        out.append(RetrievalResult(dataset, "multi", 2048, ref, {k: v - 0.0002 for k, v in ref.items()}))
    return out


def make_report(failing: bool) -> ValidationReport:
    parity = make_parity(bad_dim128=failing)
    retrieval = make_retrieval(ndcg_drop=0.09 if failing else 0.001)
    sts = [STSResult("sts-sample", 0.8123, 0.8119)]
    thresholds = DEFAULTS["fp32"]
    settings = {
        "reference": "jinaai/jina-embeddings-v4",
        "adapter": "retrieval",
        "artifact": "out/onnx-fp32 <&\"'>",  # escaped in HTML
        "out": "val",
        "datasets": ["stdlib-code", "pydoc-pages"],
        "provider": "cpu",
        "max_queries": 200,
        "thresholds": thresholds.to_json(),
        "datasets_checksums": {"stdlib-code": "ab12cd", "pydoc-pages": "ef34aa"},
    }
    environment = {"versions": {"jev4": "0.1.0", "torch": "2.13.0+cpu", "onnxruntime": "1.22.0"}, "platform": "Linux-x86_64", "cpus": 2}
    checks = evaluate(parity, retrieval, sts, thresholds)
    return ValidationReport(settings, environment, "fp32", parity, retrieval, sts, checks)


@pytest.fixture(scope="module")
def failing_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("failing")
    return make_report(failing=True), write_reports(make_report(failing=True), out)


def test_evaluate_names_the_failures():
    good, bad = make_report(False), make_report(True)
    assert good.passed, [c.describe() for c in good.failures]
    names = [c.name for c in bad.failures]
    assert set(names) == {COSINE_FAIL, "parity: single-vector mean cosine (dim 128)", NDCG_FAIL}, names
    assert all(f"parity: single-vector min cosine (dim {d})" in [c.name for c in bad.checks] for d in DIMS)
    ndcg = next(c for c in bad.checks if c.name == NDCG_FAIL)
    assert ndcg.value == pytest.approx(0.09) and ndcg.maximum == DEFAULTS["fp32"].ndcg_drop_max


def test_report_json_round_trips(failing_reports):
    report, paths = failing_reports
    assert set(paths) == {"json", "md", "html"} and all(p.is_file() for p in paths.values())
    data = json.loads(paths["json"].read_text())
    assert list(data)[:3] == ["passed", "failures", "precision"]
    assert data["passed"] is False
    assert any(NDCG_FAIL in f for f in data["failures"]) and any(COSINE_FAIL in f for f in data["failures"])
    assert data["thresholds"]["ndcg_drop_max"] == 0.005
    assert data["retrieval"][0]["delta"]["ndcg@10"] == pytest.approx(-0.09)
    assert len(data["checks"]) == len(report.checks)


def test_report_json_non_finite_values_are_valid_json(tmp_path):
    report = make_report(False)
    report.parity.maxsim_pearson = float("nan")
    report.parity.single_max_abs["2048"] = float("inf")
    report.checks = evaluate(report.parity, report.retrieval, report.sts, DEFAULTS["fp32"])
    text = write_reports(report, tmp_path)["json"].read_text()
    assert "NaN" not in text and "Infinity," not in text.replace('"Infinity",', "")
    data = json.loads(text)
    assert data["parity"]["maxsim_pearson"] is None and data["parity"]["single_max_abs"]["2048"] == "Infinity"
    assert data["passed"] is False and any("MaxSim score Pearson" in f for f in data["failures"])


def test_report_md_verdict_first(failing_reports):
    _, paths = failing_reports
    lines = paths["md"].read_text().splitlines()
    head = "\n".join(lines[:5])
    assert "FAIL" in lines[0]
    assert COSINE_FAIL in head and NDCG_FAIL in head and "0.97" in head
    text = "\n".join(lines)
    for section in ("## Checks", "## Parity", "## Retrieval", "### stdlib-code", "## STS", "## Settings", "## Environment"):
        assert section in text


def test_report_md_passing(tmp_path):
    md = write_reports(make_report(False), tmp_path)["md"].read_text()
    assert md.splitlines()[0].startswith("# jev4 validate: PASS") and "FAILED" not in md


def test_report_html_standalone(failing_reports):
    _, paths = failing_reports
    assert sorted(p.name for p in paths["html"].parent.iterdir()) == ["report.html", "report.json", "report.md"]
    page = paths["html"].read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert 'class="verdict fail"' in page and ">FAIL<" in page
    assert COSINE_FAIL in page and NDCG_FAIL in page
    assert "out/onnx-fp32 &lt;&amp;&quot;&#x27;&gt;" in page and "<&\"'>" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 3
    assert all(base64.b64decode(img).startswith(PNG_SIGNATURE) for img in images)


def test_report_html_without_data_skips_plots(tmp_path):
    report = ValidationReport({"adapter": "retrieval"}, {}, "fp16", None, [], [], [])
    page = write_reports(report, tmp_path)["html"].read_text()
    assert "data:image/png" not in page and "no checks were run" in page
    assert json.loads((tmp_path / "report.json").read_text())["parity"] is None


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None, reason="no chromium binary on PATH")
def test_render_check_screenshots_the_page(failing_reports, tmp_path):
    _, paths = failing_reports
    png = tmp_path / "shot.png"
    assert render_check(paths["html"], png)
    assert png.read_bytes().startswith(PNG_SIGNATURE) and png.stat().st_size > 10_000
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    fail_red = (np.abs(pixels - [0xCF, 0x22, 0x2E]).sum(axis=1) < 12).sum()
    assert fail_red > 20_000, "the red FAIL banner was not painted"
    assert (pixels.sum(axis=1) < 200).sum() > 2_000, "no dark text was painted"


def test_render_check_without_chromium(failing_reports, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert render_check(failing_reports[1]["html"], tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_checks_have_finite_bounds():
    for check in make_report(True).checks:
        bound = check.minimum if check.minimum is not None else check.maximum
        assert bound is not None and math.isfinite(bound)
