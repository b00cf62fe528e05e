"""jev4 validate end to end on the tiny checkpoint: faithful artifacts pass, damaged ones fail by name."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import jev4.runtime as rt
from jev4.cli.main import main as jev4_main
from jev4.export.manifest import MANIFEST_NAME, Manifest, read_manifest, write_manifest
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.model.encoder import TorchEncoder
from jev4.validate.parity import run_parity
from jev4.validate.probes import default_probes
from jev4.validate.runner import ValidateSettings, validate

SMALL = dict(max_queries=40, max_docs=120, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("val")
    return {
        task: merge_checkpoint(MergeSettings(model=str(tiny_dir), adapter=task, out=str(root / task), dtype="fp32"), progress=False)
        for task in ("retrieval", "code")
    }


def _restamp(path):
    """Rewrite the manifest after a deliberate edit, so the damage is not caught by checksums but by validation."""
    old = read_manifest(path)
    (path / MANIFEST_NAME).unlink()
    write_manifest(path, Manifest(kind=old["kind"], source=old["source"], settings=old["settings"], contents=old.get("contents", {})))


def test_faithful_artifact_passes(tmp_path, tiny_dir, merged):
    report = validate(ValidateSettings(reference=str(tiny_dir), adapter="code", artifact=str(merged["code"]), out=str(tmp_path / "r"), **SMALL))
    assert report.passed, [c.describe() for c in report.failures]
    assert report.precision == "fp32"
    assert report.parity.single_cosine_min["64"] > 0.99999
    assert {r.scoring for r in report.retrieval} == {"single", "multi"}
    assert {r.dim for r in report.retrieval if r.scoring == "single"} == {8, 16, 32, 64}
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "r" / name).is_file()
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["passed"] is True and data["settings"]["adapter"] == "code"


def test_perturbed_weight_fails(tmp_path, tiny_dir, merged):
    art = shutil.copytree(merged["retrieval"], tmp_path / "art")
    shard = next(art.glob("model*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))
    tensors[name] = tensors[name] + 0.05 * torch.randn_like(tensors[name])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _restamp(art)
    report = validate(ValidateSettings(reference=str(tiny_dir), adapter="retrieval", artifact=str(art), out=str(tmp_path / "r"), **SMALL))
    assert not report.passed
    assert any("single-vector min cosine" in c.name for c in report.failures)


def test_wrong_adapter_fails(tmp_path, tiny_dir, merged):
    """An artifact built with the code adapter but labelled retrieval."""
    art = shutil.copytree(merged["code"], tmp_path / "art")
    config = json.loads((art / "config.json").read_text())
    config["jev4_merged_task"] = "retrieval"
    (art / "config.json").write_text(json.dumps(config))
    _restamp(art)
    report = validate(ValidateSettings(reference=str(tiny_dir), adapter="retrieval", artifact=str(art), out=str(tmp_path / "r"), **SMALL))
    assert not report.passed
    names = " ".join(c.name for c in report.failures)
    assert "single-vector min cosine" in names and "multi-vector" in names


class _WrongPrefix(TorchEncoder):
    """An encoder that gets the prompt wrong (passage prefix for queries): a classic deployment bug."""

    def encode_text(self, texts, task="retrieval", prompt_name=None, **kwargs):
        flipped = "passage" if prompt_name in (None, "query") else "query"
        return super().encode_text(texts, task=task, prompt_name=flipped, **kwargs)


def test_wrong_prefix_fails_parity(tiny_dir, merged):
    from jev4.validate.thresholds import DEFAULTS, evaluate

    reference = rt.load(tiny_dir, backend="torch")
    good = TorchEncoder.from_pretrained(merged["retrieval"])
    bad = _WrongPrefix.from_pretrained(merged["retrieval"])
    probes = default_probes(128)
    ok = evaluate(run_parity(reference, good, probes, "retrieval", progress=False), [], [], DEFAULTS["fp32"])
    assert all(c.passed for c in ok)
    failed = [c for c in evaluate(run_parity(reference, bad, probes, "retrieval", progress=False), [], [], DEFAULTS["fp32"]) if not c.passed]
    assert any("single-vector min cosine" in c.name for c in failed)


def test_cli_exit_codes(tmp_path, tiny_dir, merged, capsys):
    common = ["--reference", str(tiny_dir), "--max-queries", "20", "--max-docs", "60", "--no-multivector"]
    assert jev4_main(["validate", *common, "--adapter", "code", "--artifact", str(merged["code"]), "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and str(tmp_path / "ok" / "report.html") in out
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"single_cosine_min": 1.0}))  # fp32 merged vs unmerged is 1 - 1e-13, not 1
    assert jev4_main(["validate", *common, "--adapter", "code", "--artifact", str(merged["code"]), "--thresholds", str(thresholds), "--out", str(tmp_path / "strict")]) == 1
    assert "failed: parity: single-vector min cosine" in capsys.readouterr().out
    assert jev4_main(["validate", *common, "--adapter", "code", "--artifact", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 2
    assert jev4_main(["validate", *common, "--adapter", "code", "--artifact", str(merged["code"]), "--dataset", "no-such-set", "--out", str(tmp_path / "bad2")]) == 2


def test_output_codec_is_measured_and_judged(tmp_path, tiny_dir):
    """An artifact exported with --output-precision: its codec is judged by the emb-* thresholds; a codec that loses too much fails by name."""
    from jev4.quant.output_codec import OutputCodecSettings, encode_calibration

    reference = TorchEncoder.from_pretrained(tiny_dir)
    codec = encode_calibration(reference, "retrieval", OutputCodecSettings("int8", calib_size=32), progress=False)
    art = merge_checkpoint(MergeSettings(model=str(tiny_dir), adapter="retrieval", out=str(tmp_path / "art"), dtype="fp32"), progress=False, output_codec=codec)
    settings = dict(reference=str(tiny_dir), adapter="retrieval", artifact=str(art), probes=False, **SMALL)
    report = validate(ValidateSettings(out=str(tmp_path / "r"), codecs=("int8", "binary+rescore"), **settings))
    assert {r.codec for r in report.codecs} == {"int8", "binary+rescore"}
    judged = [c for c in report.checks if c.name.startswith("codec ")]
    assert judged and all(c.name.startswith("codec int8 ") for c in judged)  # only the artifact's own codec is judged
    assert all(c.maximum >= 0.02 for c in judged)  # emb-int8 bounds, not fp32's
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {c["codec"] for c in data["codecs"]} == {"int8", "binary+rescore"} and "retention" in data["codecs"][0]
    assert "Output codecs" in (tmp_path / "r" / "report.md").read_text()
