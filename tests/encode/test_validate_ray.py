"""``jev4 validate --ray``: the corpus path gives the in-memory path's numbers, resumes its encodes, and refuses what it cannot do."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("ray", reason="validate --ray needs ray[data]: pip install 'jev4[ray]' (make test installs it)")

from encode_helpers import shard_stats  # noqa: E402

from jev4.errors import SettingsError  # noqa: E402
from jev4.validate.runner import ValidateSettings, validate  # noqa: E402

COMMON = dict(adapter="retrieval", datasets=("stdlib-code",), max_queries=30, max_docs=120, max_length=48, batch_size=16, probes=False, codecs=("int8", "binary"), progress=False)


@pytest.fixture(scope="module")
def in_memory(tiny_dir, encode_artifact, tmp_path_factory):
    """The usual validation (both models in this process), the numbers --ray must reproduce."""
    return validate(ValidateSettings(reference=str(tiny_dir), artifact=str(encode_artifact), out=str(tmp_path_factory.mktemp("val") / "report"), **COMMON))


def _numbers(report):
    retrieval = {(r.dataset, r.scoring, r.dim): (r.reference, r.artifact) for r in report.retrieval}
    codecs = {(c.codec, c.scoring, c.dim): (c.metrics, c.float_metrics, c.bytes_per_doc, c.notes["calibration"]) for c in report.codecs}
    return retrieval, codecs


def _close(a, b):
    """Equal up to float rounding: each shard is encoded as its own length-sorted batch, so padding differs."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-9
    return a == b


def test_ray_gives_the_in_memory_numbers_and_resumes_its_encodes(ray_cluster, in_memory, tiny_dir, encode_artifact, tmp_path):
    embeddings = tmp_path / "emb"
    settings = dict(reference=str(tiny_dir), artifact=str(encode_artifact), out=str(tmp_path / "report"), ray="auto", workers=2, shard_size=25, embeddings=str(embeddings), **COMMON)
    report = validate(ValidateSettings(**settings))
    retrieval, codecs = _numbers(report)
    expected_retrieval, expected_codecs = _numbers(in_memory)
    assert retrieval.keys() == expected_retrieval.keys() and ("stdlib-code", "multi", 64) in retrieval  # single at every dim, and MaxSim
    assert _close(retrieval, expected_retrieval)
    assert _close(codecs, expected_codecs) and len(codecs) == 2 * (len(retrieval) - 1) + 2  # 2 codecs at every single-vector dim, and on tokens
    assert report.passed == in_memory.passed and [c.name for c in report.checks] == [c.name for c in in_memory.checks]
    assert report.settings["not_measured"] == ["images: --ray encodes text corpora"]
    assert "Ray workers" in report.environment["engine"]

    (folder,) = embeddings.iterdir()  # one dataset
    encodes = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*"))
    assert encodes == [f"{role}/{corpus}-{kind}" for role in ("artifact", "reference") for corpus in ("documents", "queries") for kind in ("multi", "single")]
    sidecar = json.loads((folder / "artifact" / "documents-single" / "jev4-embeddings.json").read_text())
    assert sidecar["complete"] and sidecar["corpus"]["records"] == 120 and len(sidecar["shards"]) == 5  # 120 documents in shards of 25
    assert sidecar["runs"][-1]["runner"] == "ray"
    before = {name: shard_stats(folder / name) for name in encodes}

    again = validate(ValidateSettings(**{**settings, "force": True}))  # a re-run with the same --embeddings encodes nothing
    assert {name: shard_stats(folder / name) for name in encodes} == before
    assert _numbers(again) == (retrieval, codecs)


def test_scratch_encodes_are_removed(ray_cluster, tiny_dir, encode_artifact, tmp_path):
    out = tmp_path / "report"
    settings = {**COMMON, "max_docs": 40, "max_queries": 10, "codecs": (), "multivector": False}
    report = validate(ValidateSettings(reference=str(tiny_dir), artifact=str(encode_artifact), out=str(out), ray="auto", workers=1, **settings))
    assert {r.scoring for r in report.retrieval} == {"single"} and report.retrieval[0].dim == 64
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no scratch beside it either


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(workers=2), r"--workers apply with --ray only"),
        (dict(embeddings="e", gpus_per_worker=1.0), r"--embeddings, --gpus-per-worker apply with --ray only"),
        (dict(ray="auto", codecs=("binary+rescore",)), r"--codecs binary\+rescore: two-stage codecs .* without --ray"),
        (dict(ray="auto", backend="onnxruntime"), r"--backend onnxruntime: with --ray the workers run the artifact on what it is"),
        (dict(ray="auto", embeddings="r/emb"), r"--embeddings r/emb: inside the report dir r"),
        (dict(ray="auto", shard_size=0), r"--shard-size must be a positive integer, got 0"),
    ],
)
def test_settings_that_ray_cannot_honour_are_refused(overrides, message):
    with pytest.raises(SettingsError, match=message):
        ValidateSettings(reference="ref", adapter="retrieval", artifact="art", out="r", **overrides)


def test_cli_refuses_ray_options_without_ray_and_reads_max_docs_all():
    from jev4.cli.main import build_parser

    args = build_parser().parse_args(["validate", "--reference", "r", "--adapter", "retrieval", "--artifact", "a", "--out", "o", "--max-docs", "all", "--ray"])
    assert (args.max_docs, args.ray) == (None, "auto")
    done = subprocess.run(
        [sys.executable, "-m", "jev4.cli.main", "validate", "--reference", "r", "--adapter", "retrieval", "--artifact", "a", "--out", "o", "--workers", "2"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "--workers apply with --ray only" in done.stderr


def test_dataset_corpus_files_are_streamed_kept_when_unchanged_and_bad_text_is_named(tmp_path):
    from jev4.datasets.containers import DatasetError
    from jev4.validate.corpus_retrieval import _write_corpus

    path = _write_corpus(tmp_path / "documents.jsonl", ["a", "b\n", "é"])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"id": "0", "text": "a"}, {"id": "1", "text": "b\n"}, {"id": "2", "text": "é"}]
    inode = path.stat().st_ino
    assert _write_corpus(path, ["a", "b\n", "é"]).stat().st_ino == inode  # the same records: the file is kept (a resumed encode checks it)
    _write_corpus(path, ["a", "c"])
    assert path.read_text().count("\n") == 2
    with pytest.raises(DatasetError, match=r"documents #1: holds a lone surrogate at position 1"):
        _write_corpus(path, ["ok", "x\ud800"])
    assert path.read_text().count("\n") == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["documents.jsonl"]  # nothing half-written left
