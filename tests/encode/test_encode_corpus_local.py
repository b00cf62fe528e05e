"""``jev4 encode --corpus`` in-process: values, Parquet schema, sidecar, refusals, and a killed job resumed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from encode_helpers import MAX_LENGTH, SHARD_SIZE, shard_stats  # noqa: E402

from jev4.cli.main import main as jev4_main  # noqa: E402
from jev4.encode import encode_corpus, load_embeddings, open_embeddings, read_embeddings  # noqa: E402
from jev4.encode.output import SIDECAR_NAME  # noqa: E402
from jev4.errors import Jev4Error, MissingDependencyError, OutputExistsError, SettingsError  # noqa: E402


def _texts(corpus):
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


def test_each_shard_holds_what_encode_text_gives_for_its_records(reference_run, stdlib_corpus, encoder_onnx):
    out, ids, vectors = reference_run
    texts = _texts(stdlib_corpus)
    assert ids == [f"stdlib-code-{i}" for i in range(len(texts))]
    assert vectors.shape == (len(texts), 64) and vectors.dtype == np.float32
    for start in range(0, len(texts), SHARD_SIZE):  # a shard is one encode_text call: sorted by length inside, returned in order
        expected = encoder_onnx.encode_text(texts[start : start + SHARD_SIZE], task="retrieval", prompt_name="passage", max_length=MAX_LENGTH, batch_size=16)
        np.testing.assert_array_equal(vectors[start : start + SHARD_SIZE], expected.numpy())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_schema_and_sidecar(reference_run, encode_artifact, stdlib_corpus):
    out, ids, _ = reference_run
    files = sorted(p.name for p in out.iterdir())
    assert files == [SIDECAR_NAME] + [f"part-00000-{s:012d}-{min(s + SHARD_SIZE, len(ids)):012d}.parquet" for s in range(0, len(ids), SHARD_SIZE)]
    schema = pq.read_schema(out / files[1])
    assert schema.names == ["id", "embedding"]
    assert schema.field("id").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)  # fixed_size_list<float32>[64]
    info = open_embeddings(out)
    side = info.sidecar
    assert side["complete"] is True and side["format"] == "jev4-embeddings"
    assert side["artifact"]["identity"]["manifest"] == json.loads((encode_artifact / "jev4-manifest.json").read_text())
    assert side["settings"] == {"task": "retrieval", "prompt": "passage", "truncate_dim": None, "multivector": False, "output_precision": None, "max_length": MAX_LENGTH, "shard_size": SHARD_SIZE, "dtype": "fp32"}
    assert side["corpus"]["records"] == len(ids) and len(side["corpus"]["checksum"]) == 64
    assert [s["name"] for s in side["shards"]] == files[1:]
    assert side["output"] == {"id_column": "id", "embedding_column": "embedding", "precision": "float32", "multivector": False, "dtype": "float32", "width": 64, "arrow_type": "fixed_size_list<element: float>[64]"}
    assert [len(shard_ids) for shard_ids, _ in read_embeddings(out)] == [SHARD_SIZE] * (len(ids) // SHARD_SIZE)


def test_binary_codes_and_multivectors(make_settings, tmp_path, stdlib_corpus, encoder_onnx):
    texts = _texts(stdlib_corpus)[:SHARD_SIZE]
    out = encode_corpus(make_settings(tmp_path / "bin", output_precision="binary"))
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.int8(), 8)  # 64 dims packed 8 per byte, as jev4.quant's binary
    ids, codes = load_embeddings(out)
    expected = encoder_onnx.encode_text(texts, task="retrieval", prompt_name="passage", max_length=MAX_LENGTH, batch_size=16, output_precision="binary")
    np.testing.assert_array_equal(codes[:SHARD_SIZE], expected)
    assert open_embeddings(out).output["precision"] == "binary"

    out = encode_corpus(make_settings(tmp_path / "multi", multivector=True, shard_size=100))
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.list_(pa.float32(), 32))  # one [32] vector per token, variable count
    ids, multi = load_embeddings(out)
    expected = encoder_onnx.encode_text(_texts(stdlib_corpus)[:100], task="retrieval", prompt_name="passage", max_length=MAX_LENGTH, batch_size=16, return_multivector=True)
    assert len(multi) == len(ids) == 400
    for got, want in zip(multi[:100], expected):
        np.testing.assert_array_equal(got, want.numpy())
    assert len({len(m) for m in multi}) > 1


def test_another_job_into_the_same_out_is_refused_and_force_starts_over(reference_run, make_settings, tmp_path, stdlib_corpus):
    out = tmp_path / "emb"
    shutil.copytree(reference_run[0], out)
    before = shard_stats(out)
    assert encode_corpus(make_settings(out)) == out  # same job, complete: nothing to do
    assert shard_stats(out) == before
    with pytest.raises(OutputExistsError, match=r"holds embeddings of another job \(prompt 'passage' there, 'query' now\).*--force"):
        encode_corpus(make_settings(out, prompt="query"))
    with pytest.raises(OutputExistsError, match="shard_size 50 there, 40 now"):
        encode_corpus(make_settings(out, shard_size=40))
    changed = tmp_path / "changed.jsonl"
    changed.write_text(stdlib_corpus.read_text() + json.dumps({"id": "new", "text": "one more"}) + "\n")
    with pytest.raises(OutputExistsError, match="the corpus differs"):
        encode_corpus(make_settings(out, corpus=str(changed)))
    assert shard_stats(out) == before
    encode_corpus(make_settings(out, prompt="query", force=True))
    assert shard_stats(out).keys() == before.keys()
    for (_, old), (_, new) in zip(read_embeddings(reference_run[0]), read_embeddings(out), strict=True):  # every shard written again, as queries
        assert not np.allclose(old, new, atol=1e-3)  # (not by inode: a filesystem may hand a freed inode to the next file)
    assert open_embeddings(out).settings["prompt"] == "query"


def test_out_that_is_not_an_embeddings_directory_is_refused(make_settings, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="is not a jev4 embeddings directory"):
            encode_corpus(make_settings(out, force=force))
    assert (out / "notes.txt").read_text() == "keep me"


def _cli(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "jev4.cli.main", "--no-progress", "encode", *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_killed_job_resumes_and_writes_nothing_twice(reference_run, encode_artifact, stdlib_corpus, tmp_path):
    out = tmp_path / "emb"
    args = ["--model", str(encode_artifact), "--corpus", str(stdlib_corpus), "--out", str(out), "--max-length", str(MAX_LENGTH), "--shard-size", str(SHARD_SIZE), "--batch-size", "16"]
    killed = _cli(args, {"JEV4_ENCODE_FAULT": "exit-after:3"})  # os._exit after the 3rd shard: no cleanup runs, as with kill -9
    assert killed.returncode == 137, killed.stderr
    first = shard_stats(out)
    assert len(first) == 3
    with pytest.raises(Jev4Error, match="has not finished"):
        open_embeddings(out)
    (out / ".part-00000-000000000150-000000000200.parquet.tmp-99999-abcd").write_bytes(b"half a shard")  # what a kill mid-write leaves
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "3 done already, 5 to encode" in resumed.stderr
    second = shard_stats(out)
    assert {k: second[k] for k in first} == first  # the 3 shards of the killed run are untouched
    assert len(second) == 8 and not list(out.glob(".*tmp-*"))
    ids, vectors = load_embeddings(out)
    assert ids == reference_run[1] and len(set(ids)) == len(ids)
    np.testing.assert_array_equal(vectors, reference_run[2])
    runs = open_embeddings(out).sidecar["runs"]
    assert [(r["finished"] is None, r["shards_written"]) for r in runs] == [(True, 0), (False, 5)]


def test_cli_bad_corpus_and_flags_are_one_line(encode_artifact, tmp_path, caplog):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"\n')
    common = ["--no-progress", "encode", "--model", str(encode_artifact), "--out", str(tmp_path / "emb")]

    def one_error():
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        caplog.clear()
        assert len(errors) == 1 and "\n" not in errors[0], errors
        return errors[0]

    assert jev4_main([*common, "--corpus", str(corpus)]) == 2
    assert one_error().startswith(f"{corpus} line 2: not valid JSON")
    assert not (tmp_path / "emb").exists()
    assert jev4_main([*common, "--ray"]) == 2
    assert "--ray apply with --corpus only" in one_error()
    assert jev4_main([*common, "--corpus", str(corpus), "--text", "hi"]) == 2
    assert "not both" in one_error()
    assert jev4_main([*common, "--corpus", str(corpus), "--workers", "2"]) == 2
    assert "--workers and --gpus-per-worker apply with --ray only" in one_error()


def test_settings_are_checked_before_any_work(make_settings, tmp_path):
    with pytest.raises(SettingsError, match="truncate_dim applies to single vectors"):
        make_settings(tmp_path / "x", multivector=True, truncate_dim=32)
    with pytest.raises(SettingsError, match="apply to a Ray run only"):
        make_settings(tmp_path / "x", workers=2)
    from jev4.errors import EmbeddingQuantError, TaskError

    with pytest.raises(TaskError, match="unknown task 'code'"):
        encode_corpus(make_settings(tmp_path / "x", task="code"))
    with pytest.raises(EmbeddingQuantError, match="needs a calibration"):  # int8 needs the artifact's calibrated codec
        encode_corpus(make_settings(tmp_path / "x", output_precision="int8"))
    assert not (tmp_path / "x").exists()


def test_without_pyarrow_or_ray_the_error_gives_the_pip_command(make_settings, tmp_path, monkeypatch):
    import jev4.encode  # noqa: F401  (the package itself imports neither)

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'jev4\[ray\]'"):
        encode_corpus(make_settings(tmp_path / "x", ray="auto"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MissingDependencyError, match="pip install pyarrow"):
        encode_corpus(make_settings(tmp_path / "x"))


def test_core_import_needs_neither_ray_nor_pyarrow():
    code = "import sys; sys.modules['ray'] = None; sys.modules['pyarrow'] = None; import jev4.encode, jev4.cli.main; jev4.cli.main.build_parser(); from jev4.encode import CorpusEncodeSettings"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
