"""Fixtures of the corpus-encoding tests: the tiny ONNX artifact, the stdlib-code corpus as JSONL, one uninterrupted run."""

import pytest
from encode_helpers import CORPUS_DOCS, MAX_LENGTH, SHARD_SIZE


@pytest.fixture(scope="session")
def encode_artifact(tiny_dir, tmp_path_factory):
    """The tiny checkpoint's retrieval adapter as an fp32 ONNX artifact (what jev4-export --format onnx writes)."""
    from jev4.export.onnx import OnnxExportSettings, export_onnx

    out = tmp_path_factory.mktemp("encode-onnx") / "onnx"
    return export_onnx(OnnxExportSettings(model=str(tiny_dir), adapter="retrieval", out=str(out)), progress=False)


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory):
    """The first CORPUS_DOCS documents of the built-in stdlib-code set, as a corpus JSONL."""
    from jev4.encode import write_corpus_jsonl

    return write_corpus_jsonl(tmp_path_factory.mktemp("encode-corpus") / "stdlib-code.jsonl", max_docs=CORPUS_DOCS)


@pytest.fixture(scope="session")
def make_settings(encode_artifact, stdlib_corpus):
    """``make_settings(out, **overrides)``: the settings every test starts from."""
    from jev4.encode import CorpusEncodeSettings

    def make(out, **overrides):
        base = dict(model=str(encode_artifact), corpus=str(stdlib_corpus), out=str(out), max_length=MAX_LENGTH, shard_size=SHARD_SIZE, batch_size=16, progress=False)
        return CorpusEncodeSettings(**{**base, **overrides})

    return make


@pytest.fixture(scope="session")
def reference_run(make_settings, tmp_path_factory):
    """One uninterrupted in-process run: (OUT, ids, vectors). Every other run must give exactly this."""
    from jev4.encode import encode_corpus, load_embeddings

    out = encode_corpus(make_settings(tmp_path_factory.mktemp("encode-ref") / "emb"))
    ids, vectors = load_embeddings(out)
    return out, ids, vectors


@pytest.fixture(scope="session")
def encoder_onnx(encode_artifact):
    import jev4.runtime as rt

    return rt.load(encode_artifact)


def _start_local_cluster(ray, attempts=3):
    """ray.init on loopback; retried because Ray gives its raylet a fixed 30 s to register, which a loaded CI machine can miss."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts:
                raise


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module (starts in ~5-10 s): 2 CPUs, no dashboard, a small object store
    (only shard descriptors and results travel through it); always shut down."""
    ray = pytest.importorskip("ray", reason="the Ray runner needs ray[data]: pip install 'jev4[ray]' (make test installs it)")
    pytest.importorskip("ray.data")
    _start_local_cluster(ray)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
