"""parity.py in process, values pinned: fast enough to run for every mutant.

Every expected value here is computed independently of parity.py, with plain
Python loops over the vectors (``_hand_*`` below), or written out by hand.
The whole-validation tests (test_validate.py, test_verdict_sensitivity.py)
exercise parity through a real model; these pin each number, key, dim and
branch of it on small hand-made inputs.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import jev4.validate.parity as parity
from jev4.validate.parity import EncodedSet, _documents, _truncate, compare_probes, encode_probes, run_parity
from jev4.validate.probes import ProbeSet
from jev4.validate.results import ParityResult

TOL = dict(rel=1e-12, abs=1e-12)
MULTI_KEYS = ["id", "kind", "tokens", "cosine", "max_abs", "multi_cosine_min", "multi_cosine_mean"]
SINGLE_KEYS = ["id", "kind", "tokens", "cosine", "max_abs"]


# --------------------------------------------------------------------------- hand references


def _hand_norm(row, eps=1e-12) -> list[float]:
    row = [float(x) for x in row]
    n = math.sqrt(sum(x * x for x in row))
    return [x / max(n, eps) for x in row]


def _hand_dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def _hand_cos(a, b) -> float:
    return _hand_dot(a, b) / (math.sqrt(_hand_dot(a, a)) * math.sqrt(_hand_dot(b, b)))


def _hand_max_abs(a, b) -> float:
    return max(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True))


def _hand_pearson(a, b) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def _hand_ranks(x) -> list[float]:
    """Average ranks (1-based), ties share their mean rank."""
    ranks = []
    for v in x:
        below = sum(1 for w in x if w < v)
        equal = sum(1 for w in x if w == v)
        ranks.append(below + (equal + 1) / 2)
    return ranks


def _hand_spearman(a, b) -> float:
    return _hand_pearson(_hand_ranks(a), _hand_ranks(b))


def _hand_scores(queries, docs) -> list[list[float]]:
    return [[_hand_dot(q, d) for d in docs] for q in queries]


def _hand_top(row, k) -> set[int]:
    return set(sorted(range(len(row)), key=lambda j: (-row[j], j))[:k])


def _hand_overlap(ref_scores, art_scores, k) -> float:
    return sum(len(_hand_top(r, k) & _hand_top(a, k)) / k for r, a in zip(ref_scores, art_scores)) / len(ref_scores)


def _hand_maxsim(q_multi, d_multi) -> list[float]:
    """Flattened [Q, D] late-interaction scores."""
    return [sum(max(_hand_dot(qt, dt) for dt in d) for qt in q) for q in q_multi for d in d_multi]


def _hand_docs(groups, attr):
    out = []
    for kind in ("text", "image"):
        if kind in groups:
            out += list(getattr(groups[kind], attr))
    return out


def expected_parity(ref: dict, art: dict, dims_desc: list[int]) -> dict:
    """What compare_probes must return, as plain Python values (no token sampling: few tokens)."""
    keys = [str(d) for d in dims_desc]
    rows, all_cos, max_abs_by = [], {k: [] for k in keys}, {k: 0.0 for k in keys}
    tokens = []
    for kind in ref:
        r, a = ref[kind], art[kind]
        for i in range(len(r.single)):
            cos = {}
            for d, key in zip(dims_desc, keys):
                rt, at = _hand_norm(r.single[i][:d]), _hand_norm(a.single[i][:d])
                cos[key] = _hand_cos(rt, at)
                all_cos[key].append(cos[key])
                max_abs_by[key] = max(max_abs_by[key], _hand_max_abs(rt, at))
            row = {"id": f"{kind}-{i}", "kind": kind, "tokens": None, "cosine": cos, "max_abs": _hand_max_abs(r.single[i], a.single[i])}
            if a.multi:
                tc = [_hand_cos(x, y) for x, y in zip(r.multi[i], a.multi[i], strict=True)]
                tokens += tc
                row.update(tokens=len(r.multi[i]), multi_cosine_min=min(tc), multi_cosine_mean=sum(tc) / len(tc))
            rows.append(row)
    ref_scores = _hand_scores(ref["query"].single, _hand_docs(ref, "single"))
    art_scores = _hand_scores(art["query"].single, _hand_docs(art, "single"))
    k = min(10, len(ref_scores[0]))
    flat_ref = [s for row in ref_scores for s in row]
    flat_art = [s for row in art_scores for s in row]
    out = dict(
        keys=keys,
        single_cosine_min={k_: min(v) for k_, v in all_cos.items()},
        single_cosine_mean={k_: sum(v) / len(v) for k_, v in all_cos.items()},
        single_max_abs=max_abs_by,
        per_input=rows,
        single_cosines=all_cos[keys[0]],
        topk_overlap=_hand_overlap(ref_scores, art_scores, k),
        score_spearman=_hand_spearman(flat_ref, flat_art),
        ref_scores=ref_scores,
        art_scores=art_scores,
    )
    if tokens:
        out.update(
            multi_token_cosine_min=min(tokens),
            multi_token_cosine_mean=sum(tokens) / len(tokens),
            maxsim_pearson=_hand_pearson(
                _hand_maxsim(ref["query"].multi, _hand_docs(ref, "multi")), _hand_maxsim(art["query"].multi, _hand_docs(art, "multi"))
            ),
            token_cosines=tokens,
        )
    else:
        out.update(multi_token_cosine_min=None, multi_token_cosine_mean=None, maxsim_pearson=None, token_cosines=[])
    return out


def assert_matches(result: ParityResult, exp: dict, tol=TOL) -> None:
    """Every field of ``result`` equals the hand computation, keys in order, Python floats."""
    for name in ("single_cosine_min", "single_cosine_mean", "single_max_abs"):
        got = getattr(result, name)
        assert list(got) == exp["keys"], name  # descending dims, strings, no duplicates
        for key in exp["keys"]:
            assert type(got[key]) is float, (name, key)
            assert got[key] == pytest.approx(exp[name][key], **tol), (name, key)
    for name in ("multi_token_cosine_min", "multi_token_cosine_mean", "maxsim_pearson"):
        if exp[name] is None:
            assert getattr(result, name) is None, name
        else:
            assert type(getattr(result, name)) is float, name
            assert getattr(result, name) == pytest.approx(exp[name], **tol), name
    assert type(result.topk_overlap) is float
    assert result.topk_overlap == pytest.approx(exp["topk_overlap"], **tol)
    assert result.score_spearman == pytest.approx(exp["score_spearman"], **tol)
    assert len(result.single_cosines) == len(exp["single_cosines"])
    assert all(type(x) is float for x in result.single_cosines)
    assert result.single_cosines == pytest.approx(exp["single_cosines"], **tol)
    assert len(result.token_cosines) == len(exp["token_cosines"])
    assert all(type(x) is float for x in result.token_cosines)
    assert result.token_cosines == pytest.approx(exp["token_cosines"], **tol)
    assert len(result.per_input) == len(exp["per_input"])
    for got, want in zip(result.per_input, exp["per_input"], strict=True):
        assert list(got) == (MULTI_KEYS if "multi_cosine_min" in want else SINGLE_KEYS), got["id"]
        assert (got["id"], got["kind"], got["tokens"]) == (want["id"], want["kind"], want["tokens"])
        assert got["tokens"] is None or type(got["tokens"]) is int
        assert list(got["cosine"]) == exp["keys"], got["id"]
        for key in exp["keys"]:
            assert type(got["cosine"][key]) is float
            assert got["cosine"][key] == pytest.approx(want["cosine"][key], **tol), (got["id"], key)
        for name in ("max_abs", "multi_cosine_min", "multi_cosine_mean"):
            if name in want:
                assert type(got[name]) is float, (got["id"], name)
                assert got[name] == pytest.approx(want[name], **tol), (got["id"], name)


# --------------------------------------------------------------------------- inputs


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_pair(seed: int, counts: dict[str, int], hidden=8, token_dim=5, noise=0.1, multi=True, dtype=np.float64):
    """Reference and artifact EncodedSets per group: normalised singles, multi-vectors of varying token counts."""
    rng = np.random.default_rng(seed)
    ref, art = {}, {}
    for g, (kind, n) in enumerate(counts.items()):
        single = _unit(rng.standard_normal((n, hidden)))
        single_art = _unit(single + noise * rng.standard_normal((n, hidden)))
        r_multi, a_multi = [], []
        if multi:
            for i in range(n):
                t = 2 + (i + g) % 4  # 2..5 tokens, never the hidden or token dim pattern
                m = rng.standard_normal((t, token_dim))
                r_multi.append(m.astype(dtype))
                a_multi.append((m + noise * rng.standard_normal((t, token_dim))).astype(dtype))
        ref[kind] = EncodedSet(single.astype(dtype), r_multi)
        art[kind] = EncodedSet(single_art.astype(dtype), a_multi)
    return ref, art


# --------------------------------------------------------------------------- _truncate / _documents


def test_truncate_cuts_then_renormalises_each_row_in_float64():
    vectors = np.array([[3.0, 4.0, 12.0, 1.0], [1.0, 0.0, 5.0, 5.0], [0.5, -0.5, 2.0, 0.0]], dtype=np.float32)
    out = _truncate(vectors, 2)
    assert out.dtype == np.float64 and out.shape == (3, 2)
    s = math.sqrt(0.5)
    assert out == pytest.approx(np.array([[0.6, 0.8], [1.0, 0.0], [s, -s]]), rel=1e-15, abs=1e-15)
    out3 = _truncate(vectors, 3)
    assert out3.shape == (3, 3)
    assert out3 == pytest.approx(np.array([[3 / 13, 4 / 13, 12 / 13], [1 / math.sqrt(26), 0.0, 5 / math.sqrt(26)], [0.5 / math.sqrt(4.5), -0.5 / math.sqrt(4.5), 2 / math.sqrt(4.5)]]), rel=1e-15)
    full = _truncate(vectors, 4)
    for row, want in zip(full, vectors):
        assert row.tolist() == pytest.approx(_hand_norm(want), rel=1e-15)
    # float32 input is widened before normalising: a float32 normalisation is off by ~1e-8
    odd = np.array([[0.1, 0.2, 0.7]], dtype=np.float32)
    exact = [float(x) / math.sqrt(sum(float(y) ** 2 for y in odd[0])) for x in odd[0]]
    assert _truncate(odd, 3)[0].tolist() == pytest.approx(exact, rel=1e-15, abs=0)
    assert vectors[0].tolist() == [3.0, 4.0, 12.0, 1.0]  # input untouched


def test_documents_are_texts_then_images_single_and_multi():
    text_multi = [np.full((2, 3), 1.0), np.full((1, 3), 2.0)]
    image_multi = [np.full((4, 3), 3.0)]
    groups = {
        "image": EncodedSet(np.array([[9.0, 9.0]]), image_multi),
        "query": EncodedSet(np.array([[7.0, 7.0]]), [np.zeros((1, 3))]),
        "text": EncodedSet(np.array([[1.0, 2.0], [3.0, 4.0]]), text_multi),
    }
    docs = _documents(groups)
    assert docs.single.tolist() == [[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]
    assert len(docs.multi) == 3
    assert docs.multi[0] is text_multi[0] and docs.multi[1] is text_multi[1] and docs.multi[2] is image_multi[0]
    only_text = _documents({"query": groups["query"], "text": groups["text"]})
    assert only_text.single.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert len(only_text.multi) == 2 and only_text.multi[0] is text_multi[0] and only_text.multi[1] is text_multi[1]
    no_multi = _documents({"text": EncodedSet(np.array([[1.0]]), []), "image": EncodedSet(np.array([[2.0]]), [])})
    assert no_multi.single.tolist() == [[1.0], [2.0]] and no_multi.multi == []


# --------------------------------------------------------------------------- compare_probes


def test_compare_probes_hand_values():
    """A case small enough to write out: cosines 0.6 and 1/sqrt(2), max abs 0.8."""
    ref = {
        "query": EncodedSet(np.array([[1.0, 0.0]]), [np.array([[1.0, 0.0], [0.0, 1.0]])]),
        "text": EncodedSet(np.array([[0.0, 1.0]]), [np.array([[1.0, 0.0]])]),
    }
    art = {
        "query": EncodedSet(np.array([[0.6, 0.8]]), [np.array([[1.0, 0.0], [1.0, 1.0]])]),
        "text": EncodedSet(np.array([[0.0, 1.0]]), [np.array([[2.0, 0.0]])]),
    }
    result = compare_probes(ref, art, [1])
    assert list(result.single_cosine_min) == ["2", "1"]
    assert result.single_cosine_min == pytest.approx({"2": 0.6, "1": 1.0}, abs=1e-15)
    assert result.single_cosine_mean == pytest.approx({"2": 0.8, "1": 1.0}, abs=1e-15)
    assert result.single_max_abs == pytest.approx({"2": 0.8, "1": 0.0}, abs=1e-15)
    assert result.single_cosines == pytest.approx([0.6, 1.0], abs=1e-15)
    h = 1 / math.sqrt(2)
    assert result.multi_token_cosine_min == pytest.approx(h, abs=1e-15)
    assert result.multi_token_cosine_mean == pytest.approx((2 + h) / 3, abs=1e-15)
    assert result.token_cosines == pytest.approx([1.0, h, 1.0], abs=1e-15)
    assert math.isnan(result.maxsim_pearson)  # one query-document pair: no correlation
    assert result.topk_overlap == 1.0  # k = min(10, 1 document)
    assert math.isnan(result.score_spearman)
    assert result.per_input == [
        {"id": "query-0", "kind": "query", "tokens": 2, "cosine": {"2": pytest.approx(0.6), "1": 1.0}, "max_abs": pytest.approx(0.8), "multi_cosine_min": pytest.approx(h), "multi_cosine_mean": pytest.approx((1 + h) / 2)},
        {"id": "text-0", "kind": "text", "tokens": 1, "cosine": {"2": 1.0, "1": 1.0}, "max_abs": 0.0, "multi_cosine_min": 1.0, "multi_cosine_mean": 1.0},
    ]


def test_compare_probes_all_groups_matches_hand_computation():
    counts = {"query": 3, "text": 4, "image": 2}
    ref, art = make_pair(1, counts)
    result = compare_probes(ref, art, [4, 2, 4])  # duplicate dims collapse; full 8 added
    exp = expected_parity(ref, art, [8, 4, 2])
    assert_matches(result, exp)
    assert [r["id"] for r in result.per_input] == ["query-0", "query-1", "query-2", "text-0", "text-1", "text-2", "text-3", "image-0", "image-1"]
    assert [r["kind"] for r in result.per_input] == ["query"] * 3 + ["text"] * 4 + ["image"] * 2
    assert [r["tokens"] for r in result.per_input] == [len(m) for g in ref.values() for m in g.multi]
    assert len(set(r["tokens"] for r in result.per_input)) > 1
    assert len(result.token_cosines) == sum(len(m) for g in ref.values() for m in g.multi)
    # 6 documents: k = 6 ranks them all; a cut at the 3 queries would not.
    assert result.topk_overlap == 1.0
    assert _hand_overlap(exp["ref_scores"], exp["art_scores"], 3) < 1.0
    # the max abs per dim comes from a later group than the first, and from the truncated vectors
    assert all(0.0 < v < 1.0 for v in result.single_max_abs.values())
    assert result.single_max_abs["8"] != result.single_max_abs["2"]


def test_compare_probes_full_dim_already_listed_and_text_only_documents():
    ref, art = make_pair(2, {"query": 2, "text": 3}, hidden=6)
    result = compare_probes(ref, art, [6, 3])
    assert_matches(result, expected_parity(ref, art, [6, 3]))
    assert [r["id"] for r in result.per_input] == ["query-0", "query-1", "text-0", "text-1", "text-2"]


def test_compare_probes_more_than_ten_documents_uses_top_10():
    ref, art = make_pair(3, {"query": 4, "text": 9, "image": 3}, hidden=6, noise=0.6)
    result = compare_probes(ref, art, [3])
    exp = expected_parity(ref, art, [6, 3])
    assert_matches(result, exp)
    overlap = {k: _hand_overlap(exp["ref_scores"], exp["art_scores"], k) for k in (4, 9, 10, 11, 16)}
    assert result.topk_overlap == pytest.approx(overlap[10], **TOL)
    assert len(set(overlap.values())) == 5, overlap  # each other k would give another value
    assert 0.0 < result.score_spearman < 1.0 and 0.0 < result.maxsim_pearson < 1.0


def test_compare_probes_without_artifact_multivectors():
    ref, art = make_pair(4, {"query": 3, "text": 2, "image": 2})
    art = {k: EncodedSet(v.single, []) for k, v in art.items()}  # the artifact serves no multi-vectors
    result = compare_probes(ref, art, [2])
    exp = expected_parity(ref, art, [8, 2])
    assert exp["multi_token_cosine_min"] is None
    assert_matches(result, exp)
    assert result.multi_token_cosine_min is None and result.multi_token_cosine_mean is None and result.maxsim_pearson is None
    assert result.token_cosines == []
    for row in result.per_input:
        assert list(row) == SINGLE_KEYS and row["tokens"] is None
    # neither side has multi-vectors
    ref = {k: EncodedSet(v.single, []) for k, v in ref.items()}
    again = compare_probes(ref, art, [2])
    assert again == result


def test_compare_probes_float32_inputs():
    ref, art = make_pair(5, {"query": 3, "text": 3, "image": 2}, dtype=np.float32)
    result = compare_probes(ref, art, [4])
    assert_matches(result, expected_parity(ref, art, [8, 4]), tol=dict(rel=1e-6, abs=1e-6))


def _angled_tokens(angles):
    ref = np.array([[1.0, 0.0]] * len(angles))
    art = np.array([[math.cos(t), math.sin(t)] for t in angles])
    return ref, art


def test_token_cosines_sampled_evenly_when_too_many(monkeypatch):
    # 12 tokens in all (2 + 3 queries' tokens, 4 + 3 texts'), each with its own cosine
    angles = [0.05 * (j + 1) for j in range(12)]
    sizes = {"query": [2, 3], "text": [4, 3]}
    ref, art, start = {}, {}, 0
    for kind, ts in sizes.items():
        r_m, a_m = [], []
        for t in ts:
            r, a = _angled_tokens(angles[start : start + t])
            r_m.append(r)
            a_m.append(a)
            start += t
        single = _unit(np.arange(1.0, 1.0 + 2 * len(ts)).reshape(len(ts), 2))
        ref[kind] = EncodedSet(single, r_m)
        art[kind] = EncodedSet(single.copy(), a_m)
    cosines = [math.cos(t) for t in angles]
    assert len(compare_probes(ref, art, [1]).token_cosines) == 12  # 12 <= 5000: all kept
    for limit in (13, 12):  # under and exactly at the limit: all kept, once each
        monkeypatch.setattr(parity, "MAX_TOKEN_COSINES", limit)
        assert compare_probes(ref, art, [1]).token_cosines == pytest.approx(cosines, abs=1e-15)
    monkeypatch.setattr(parity, "MAX_TOKEN_COSINES", 11)
    # linspace(0, 11, 11) = 0, 1.1, 2.2, ..., 9.9, 11 -> floored: only index 10 is left out
    assert compare_probes(ref, art, [1]).token_cosines == pytest.approx([cosines[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11)], abs=1e-15)
    monkeypatch.setattr(parity, "MAX_TOKEN_COSINES", 5)
    result = compare_probes(ref, art, [1])
    # linspace(0, 11, 5) = 0, 2.75, 5.5, 8.25, 11 -> floored
    assert result.token_cosines == pytest.approx([cosines[i] for i in (0, 2, 5, 8, 11)], abs=1e-15)
    assert all(type(x) is float for x in result.token_cosines)
    # the aggregates use every token, not the sample
    assert result.multi_token_cosine_min == pytest.approx(cosines[-1], abs=1e-15)
    assert result.multi_token_cosine_mean == pytest.approx(sum(cosines) / 12, abs=1e-15)
    monkeypatch.setattr(parity, "MAX_TOKEN_COSINES", 4)
    # linspace(0, 11, 4) = 0, 3.67, 7.33, 11
    assert compare_probes(ref, art, [1]).token_cosines == pytest.approx([cosines[i] for i in (0, 3, 7, 11)], abs=1e-15)


def test_token_cosine_sample_limit_is_5000():
    n = 5001
    angles = [1e-4 * j for j in range(n)]
    r, a = _angled_tokens(angles)
    single = np.array([[1.0, 0.0], [0.0, 1.0]])
    ref = {"query": EncodedSet(single, [r[:1], r[1:2]]), "text": EncodedSet(single, [r[2:3], r[3:]])}
    art = {"query": EncodedSet(single, [a[:1], a[1:2]]), "text": EncodedSet(single, [a[2:3], a[3:]])}
    result = compare_probes(ref, art, [1])
    assert len(result.token_cosines) == 5000
    # linspace(0, 5000, 5000): every step is 5000/4999 > 1, so index j * 5000 / 4999 floored, the last one 5000
    picked = [math.cos(angles[j * 5000 // 4999]) for j in range(0, 5000, 499)] + [math.cos(angles[5000])]
    got = [result.token_cosines[j] for j in range(0, 5000, 499)] + [result.token_cosines[-1]]
    assert got == pytest.approx(picked, abs=1e-15)


def test_compare_probes_single_shape_mismatch_message():
    ref, art = make_pair(6, {"query": 2, "text": 4})
    art["text"] = EncodedSet(art["text"].single[:, :6], art["text"].multi)
    with pytest.raises(ValueError) as err:
        compare_probes(ref, art, [2])
    assert str(err.value) == "text: reference (4, 8) vs artifact (4, 6)"


def test_compare_probes_multi_shape_mismatch_message():
    ref, art = make_pair(7, {"query": 2, "text": 3})
    assert ref["text"].multi[1].shape == (4, 5)
    art["text"].multi[1] = art["text"].multi[1][:2]
    with pytest.raises(ValueError) as err:
        compare_probes(ref, art, [2])
    assert str(err.value) == "text 1: multi-vector shape (4, 5) vs (2, 5)"


def test_compare_probes_multi_count_mismatch_raises():
    ref, art = make_pair(8, {"query": 2, "text": 3})
    art["text"].multi.pop()
    with pytest.raises(ValueError, match=re.escape("zip()")):
        compare_probes(ref, art, [2])


# --------------------------------------------------------------------------- encode_probes / run_parity


class RecordingEncoder:
    """Deterministic outputs per input (and per prompt), every call recorded."""

    def __init__(self, salt: int, dims=(4, 2), images=True, multivector=True, hidden=8, token_dim=5):
        self.salt, self.hidden, self.token_dim = salt, hidden, token_dim
        self.config = SimpleNamespace(matryoshka_dims=list(dims))
        self.supports_images = images
        self.supports_multivector = multivector
        self.calls: list[tuple[str, list, dict]] = []

    def _rng(self, item, prompt, salt):
        key = item.encode() if isinstance(item, str) else item.tobytes()
        return np.random.default_rng([zlib.crc32(key), zlib.crc32(str(prompt).encode()), salt])

    def _single(self, item, prompt):
        base = self._rng(item, prompt, 0).standard_normal(self.hidden)
        noise = self._rng(item, prompt, 1 + self.salt).standard_normal(self.hidden)
        return _unit(base + 0.1 * self.salt * noise)

    def _multi(self, item, prompt):
        tokens = 2 + len(item if isinstance(item, str) else item.size[0] * "x") % 4
        base = self._rng(item, prompt, 100).standard_normal((tokens, self.token_dim))
        noise = self._rng(item, prompt, 101 + self.salt).standard_normal((tokens, self.token_dim))
        return base + 0.1 * self.salt * noise

    def _encode(self, what, items, prompt, kwargs):
        self.calls.append((what, list(items), dict(kwargs)))
        if kwargs.get("return_multivector"):
            return [torch.from_numpy(self._multi(x, prompt).astype(np.float32)) for x in items]
        return torch.from_numpy(np.stack([self._single(x, prompt) for x in items]).astype(np.float32))

    def encode_text(self, texts, **kwargs):
        return self._encode("text", texts, kwargs.get("prompt_name"), kwargs)

    def encode_image(self, images, **kwargs):
        return self._encode("image", images, "image", kwargs)


def _probes(images=2) -> ProbeSet:
    return ProbeSet(
        queries=["what is x", "y?"],
        texts=["x is a letter", "why", "a longer passage of text"],
        images=[Image.new("RGB", (4 + i, 3), (10 * i, 20, 30)) for i in range(images)],
        max_length=77,
    )


def _direct_sets(encoder: RecordingEncoder, probes: ProbeSet, multivector: bool) -> dict[str, EncodedSet]:
    """The encoder's outputs fetched directly (its own methods, not encode_probes)."""
    sets = {}
    for kind, items, prompt in (("query", probes.queries, "query"), ("text", probes.texts, "passage"), ("image", probes.images, "image")):
        if not items:
            continue
        single = np.stack([encoder._single(x, prompt) for x in items]).astype(np.float32)
        multi = [encoder._multi(x, prompt).astype(np.float32) for x in items] if multivector else []
        sets[kind] = EncodedSet(single, multi)
    return sets


def _assert_sets_equal(got: dict[str, EncodedSet], want: dict[str, EncodedSet]) -> None:
    assert list(got) == list(want)
    for kind in want:
        assert isinstance(got[kind].single, np.ndarray) and got[kind].single.dtype == np.float32
        np.testing.assert_array_equal(got[kind].single, want[kind].single)
        assert len(got[kind].multi) == len(want[kind].multi)
        for g, w in zip(got[kind].multi, want[kind].multi):
            assert isinstance(g, np.ndarray)
            np.testing.assert_array_equal(g, w)


def test_encode_probes_calls_and_outputs():
    enc, probes = RecordingEncoder(salt=0), _probes()
    groups = encode_probes(enc, probes, "retrieval", 3, False, True)
    text_kw = {"task": "retrieval", "batch_size": 3, "progress": False, "max_length": 77}
    image_kw = {"task": "retrieval", "batch_size": 3, "progress": False}
    assert enc.calls == [
        ("text", probes.queries, {"prompt_name": "query", **text_kw}),
        ("text", probes.queries, {"prompt_name": "query", "return_multivector": True, **text_kw}),
        ("text", probes.texts, {"prompt_name": "passage", **text_kw}),
        ("text", probes.texts, {"prompt_name": "passage", "return_multivector": True, **text_kw}),
        ("image", probes.images, image_kw),
        ("image", probes.images, {"return_multivector": True, **image_kw}),
    ]
    _assert_sets_equal(groups, _direct_sets(enc, probes, True))


def test_encode_probes_default_is_multivector_and_other_settings_pass_through():
    enc, probes = RecordingEncoder(salt=0), _probes(images=0)
    groups = encode_probes(enc, probes, "text-matching", 5, True)
    text_kw = {"task": "text-matching", "batch_size": 5, "progress": True, "max_length": 77}
    assert enc.calls == [
        ("text", probes.queries, {"prompt_name": "query", **text_kw}),
        ("text", probes.queries, {"prompt_name": "query", "return_multivector": True, **text_kw}),
        ("text", probes.texts, {"prompt_name": "passage", **text_kw}),
        ("text", probes.texts, {"prompt_name": "passage", "return_multivector": True, **text_kw}),
    ]
    assert list(groups) == ["query", "text"]  # no images: no image group, no image calls
    _assert_sets_equal(groups, _direct_sets(enc, probes, True))


def test_encode_probes_without_multivectors():
    enc, probes = RecordingEncoder(salt=0), _probes()
    groups = encode_probes(enc, probes, "retrieval", 2, True, multivector=False)
    assert [c[2].get("return_multivector") for c in enc.calls] == [None, None, None]
    assert [(c[0], c[2].get("prompt_name")) for c in enc.calls] == [("text", "query"), ("text", "passage"), ("image", None)]
    assert all(g.multi == [] for g in groups.values())
    _assert_sets_equal(groups, _direct_sets(enc, probes, False))


def test_run_parity_full_artifact(caplog):
    reference, artifact = RecordingEncoder(salt=0, dims=(4, 2)), RecordingEncoder(salt=1, dims=(3,))
    probes = _probes()
    with caplog.at_level(logging.INFO, logger="jev4.validate.parity"):
        result = run_parity(reference, artifact, probes, "retrieval", batch_size=4, progress=False)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("jev4.validate.parity", "parity: encoding 2 queries, 3 texts, 2 images with each encoder")]
    for enc in (reference, artifact):
        assert len(enc.calls) == 6
        assert all(c[2]["task"] == "retrieval" and c[2]["batch_size"] == 4 and c[2]["progress"] is False for c in enc.calls)
    ref_sets, art_sets = _direct_sets(reference, probes, True), _direct_sets(artifact, probes, True)
    assert result == compare_probes(ref_sets, art_sets, [4, 2])
    assert_matches(result, expected_parity(ref_sets, art_sets, [8, 4, 2]), tol=dict(rel=1e-6, abs=1e-6))
    assert [r["id"] for r in result.per_input][-2:] == ["image-0", "image-1"]


def test_run_parity_artifact_without_images_or_multivectors(caplog):
    # the reference serves both; what the artifact lacks is left out for both
    reference = RecordingEncoder(salt=0, dims=(2,), images=True, multivector=True)
    artifact = RecordingEncoder(salt=2, dims=(6, 4), images=False, multivector=False)
    probes = _probes()
    with caplog.at_level(logging.INFO, logger="jev4.validate.parity"):
        result = run_parity(reference, artifact, probes, "retrieval")
    assert [r.getMessage() for r in caplog.records] == ["parity: encoding 2 queries, 3 texts, 0 images with each encoder"]
    for enc in (reference, artifact):
        assert enc.calls == [
            ("text", probes.queries, {"prompt_name": "query", "task": "retrieval", "batch_size": 8, "progress": True, "max_length": 77}),
            ("text", probes.texts, {"prompt_name": "passage", "task": "retrieval", "batch_size": 8, "progress": True, "max_length": 77}),
        ]
    assert len(probes.images) == 2  # the caller's probe set is not changed
    no_images = ProbeSet(probes.queries, probes.texts, [], probes.max_length)
    ref_sets, art_sets = _direct_sets(reference, no_images, False), _direct_sets(artifact, no_images, False)
    assert result == compare_probes(ref_sets, art_sets, [2])
    exp = expected_parity(ref_sets, art_sets, [8, 2])
    assert_matches(result, exp, tol=dict(rel=1e-6, abs=1e-6))
    assert result.maxsim_pearson is None and result.token_cosines == []
    assert [r["id"] for r in result.per_input] == ["query-0", "query-1", "text-0", "text-1", "text-2"]
