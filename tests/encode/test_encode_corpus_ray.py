"""``jev4 encode --corpus --ray`` on a local Ray cluster (``ray_cluster`` in conftest: 127.0.0.1, always shut down)."""

import json
import shutil

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray runner needs ray[data]: pip install 'jev4[ray]' (make test installs it)")
pytest.importorskip("ray.data")

from encode_helpers import shard_stats  # noqa: E402

from jev4.encode import encode_corpus, load_embeddings, open_embeddings  # noqa: E402
from jev4.encode.output import SIDECAR_NAME  # noqa: E402
from jev4.encode.shard_encoder import FAULT_ENV  # noqa: E402
from jev4.errors import EncodeError  # noqa: E402


def _same_as_reference(out, reference_run):
    ids, vectors = load_embeddings(out)
    assert ids == reference_run[1] and len(set(ids)) == len(ids)  # every id exactly once, in corpus order
    np.testing.assert_array_equal(vectors, reference_run[2])  # bit-identical: same shards, same code
    assert not list(out.glob(".*tmp-*"))


def test_ray_gives_the_in_process_result(ray_cluster, reference_run, make_settings, tmp_path):
    out = encode_corpus(make_settings(tmp_path / "emb", ray="auto", workers=2))
    assert ray.is_initialized()  # the runner used the test's connection and left it open
    _same_as_reference(out, reference_run)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_run[0].iterdir())
    run = open_embeddings(out).sidecar["runs"][-1]
    assert (run["runner"], run["workers"], run["shards_written"]) == ("ray", 2, 8)


def test_a_killed_actor_is_replaced_and_every_id_comes_out_once(ray_cluster, reference_run, make_settings, tmp_path, monkeypatch):
    marker = tmp_path / "actor-killed"
    monkeypatch.setenv(FAULT_ENV, f"exit-on-shard:3:{marker}")  # the actor that starts shard 3 dies (os._exit) mid-job
    out = encode_corpus(make_settings(tmp_path / "emb", ray="auto", workers=2))
    assert marker.is_file()  # the kill happened
    _same_as_reference(out, reference_run)


def test_a_failed_ray_job_resumes_and_writes_nothing_twice(ray_cluster, reference_run, make_settings, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    monkeypatch.setenv(FAULT_ENV, "raise-on-shard:5")
    with pytest.raises(EncodeError, match=r"a test error at shard part-00000-000000000250-000000000300\.parquet \(on a Ray worker\)"):
        encode_corpus(make_settings(out, ray="auto", workers=2))
    monkeypatch.delenv(FAULT_ENV)
    first = shard_stats(out)
    assert "part-00000-000000000250-000000000300.parquet" not in first and not open_embeddings(out, allow_incomplete=True).complete
    encode_corpus(make_settings(out, ray="auto", workers=2))
    second = shard_stats(out)
    assert {k: second[k] for k in first} == first  # what the failed job wrote is kept as it was
    assert len(second) == 8
    assert open_embeddings(out).sidecar["runs"][-1]["shards_written"] == 8 - len(first)
    _same_as_reference(out, reference_run)


def test_ray_finishes_a_job_that_started_in_process(ray_cluster, reference_run, make_settings, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(reference_run[0], out)
    for name in sorted(p.name for p in out.glob("part-*.parquet"))[::2]:
        (out / name).unlink()  # as if the in-process job had been killed with every other shard missing
    sidecar = json.loads((out / SIDECAR_NAME).read_text())
    (out / SIDECAR_NAME).write_text(json.dumps({**sidecar, "complete": False, "output": None}))
    kept = shard_stats(out)
    encode_corpus(make_settings(out, ray="auto", workers=2))
    after = shard_stats(out)
    assert {k: after[k] for k in kept} == kept and len(after) == 8
    _same_as_reference(out, reference_run)


@pytest.mark.parametrize(("cpus", "gpus", "threads", "expected"), [(1.0, 0.0, None, 1), (2.0, 0.0, None, 2), (0.5, 0.0, None, 1), (0.0, 1.0, None, None), (2.0, 0.0, 3, 3)])
def test_each_actor_engine_gets_its_cpu_share_of_threads(make_settings, tmp_path, cpus, gpus, threads, expected):
    from jev4.encode.ray_runner import _with_threads
    from jev4.encode.shard_encoder import EncodeJob

    settings = make_settings(tmp_path / "emb", ray="auto", cpus_per_worker=cpus, gpus_per_worker=gpus, threads=threads)
    job = EncodeJob(model="m", out="o", sources=(), task="retrieval", prompt="passage", truncate_dim=None, multivector=False, output_precision=None, max_length=8, batch_size=1, dtype="fp32", device="cpu", provider="cpu", threads=threads)
    assert _with_threads(job, settings).threads == expected  # onnxruntime would otherwise size its pool by the node's cores
