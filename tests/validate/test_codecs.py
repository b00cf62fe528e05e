"""Codec retention measurements: planted retrieval data where the answer is known."""

import math

import numpy as np
import pytest

from jev4.errors import EmbeddingQuantError
from jev4.validate.codecs import _scores_from_topk, check_codec, multi_vector_codecs, single_vector_codecs
from jev4.validate.metrics import retrieval_metrics
from jev4.validate.results import CodecResult
from jev4.validate.thresholds import DEFAULTS, codec_checks, codec_thresholds


def planted(n_docs=300, dim=128, noise=0.6, seed=0):
    """Each query is its document plus noise: float32 search finds most, coarser codecs fewer."""
    rng = np.random.default_rng(seed)
    docs = rng.normal(size=(n_docs, dim)).astype(np.float32)
    queries = docs + noise * rng.normal(size=docs.shape).astype(np.float32)
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return norm(queries), norm(docs), [{i: 1.0} for i in range(n_docs)]


def test_retention_orders_codecs_by_bits():
    q, d, qrels = planted(dim=32, noise=0.8)
    results = {r.codec: r for r in single_vector_codecs("planted", q, d, qrels, ["float16", "int8", "int4", "binary", "binary+rescore"], [32])}
    keep = {name: r.retention["ndcg@10"] for name, r in results.items()}
    assert keep["float16"] == pytest.approx(1.0, abs=1e-3)
    assert keep["int8"] > 0.98
    assert keep["binary"] < 0.9 < keep["int4"] <= keep["int8"] + 0.01
    assert keep["binary"] < keep["binary+rescore"] <= 1.0 + 1e-6
    assert results["float16"].float_metrics == results["binary"].float_metrics  # one float32 baseline per dim
    assert {name: r.bytes_per_doc for name, r in results.items()} == {"float16": 64, "int8": 32, "int4": 16, "binary": 4, "binary+rescore": 4}
    assert all(r.search_ms_per_query > 0 and r.queries == 300 for r in results.values())


def test_matryoshka_dims_are_truncated_and_renormalised():
    q, d, qrels = planted(dim=64)
    results = single_vector_codecs("planted", q, d, qrels, ["int8"], [64, 32, 16])
    assert [r.dim for r in results] == [64, 32, 16]
    sub = d[:, :16] / np.linalg.norm(d[:, :16], axis=1, keepdims=True)
    subq = q[:, :16] / np.linalg.norm(q[:, :16], axis=1, keepdims=True)
    assert results[-1].float_metrics == retrieval_metrics(subq @ sub.T, qrels)
    assert results[-1].bytes_per_doc == 16


def test_two_stage_with_full_pool_equals_exact_rescoring():
    q, d, qrels = planted(n_docs=50)
    rescored = single_vector_codecs("p", q, d, qrels, ["binary+int8", "int8"], [128], rescore_multiplier=100)
    # every document is a candidate, so binary+int8 ranks exactly as int8 (float query vs int8 documents)
    assert rescored[0].metrics == pytest.approx(rescored[1].metrics)


def test_scores_from_topk_keeps_the_order():
    dense = _scores_from_topk(np.array([[3, 0, 2]]), np.array([[0.1, 0.5, 0.9]]), 5)
    assert list(np.argsort(-dense[0], kind="stable")[:3]) == [3, 0, 2]
    assert math.isinf(dense[0, 1]) and math.isinf(dense[0, 4])


def test_multivector_codecs_skip_rescoring():
    rng = np.random.default_rng(1)
    docs = [rng.normal(size=(rng.integers(2, 6), 16)).astype(np.float32) for _ in range(30)]
    docs = [t / np.linalg.norm(t, axis=1, keepdims=True) for t in docs]
    queries = [t[:2] + 0.1 * rng.normal(size=t[:2].shape).astype(np.float32) for t in docs]
    results = multi_vector_codecs("m", queries, docs, [{i: 1.0} for i in range(30)], ["int8", "binary", "binary+rescore"])
    assert [r.codec for r in results] == ["int8", "binary"]
    assert results[0].retention["ndcg@10"] > 0.95


def test_codec_names_are_checked():
    assert check_codec("binary+rescore") == "binary+rescore"
    with pytest.raises(EmbeddingQuantError, match="binary candidates only"):
        check_codec("int8+rescore")
    with pytest.raises(EmbeddingQuantError):
        check_codec("int3")


def test_codec_checks_judge_only_the_named_codecs():
    base = {"ndcg@10": 0.60, "recall@100": 0.90}
    lossy = CodecResult("d", "binary", "single", 2048, {"ndcg@10": 0.50, "recall@100": 0.88}, base, 256, 0.1, queries=1000)
    fine = CodecResult("d", "int8", "single", 2048, {"ndcg@10": 0.595, "recall@100": 0.90}, base, 2048, 0.1, queries=1000)
    checks = codec_checks([lossy, fine], {"binary": codec_thresholds("binary"), "int8": codec_thresholds("int8")})
    failed = [c.name for c in checks if not c.passed]
    assert failed == ["codec binary d single dim 2048: nDCG@10 drop vs float32"]
    assert codec_thresholds("binary+rescore") == DEFAULTS["emb-binary"]
    assert codec_checks([lossy], {}) == []
