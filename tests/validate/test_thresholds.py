"""Thresholds: defaults per precision, overrides from a file, and checks named after what they measure."""

import dataclasses
import json
import math

import pytest

from jev4.errors import Jev4Error
from jev4.validate.results import ParityResult, RetrievalResult, STSResult
from jev4.validate.thresholds import DEFAULTS, ThresholdError, Thresholds, evaluate, load_thresholds

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "w-int8", "w-int4", "gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "emb-int8", "emb-int4", "emb-ternary", "emb-binary")


def parity(dim128_min: float = 0.9999999, **overrides) -> ParityResult:
    values = dict(
        single_cosine_min={"2048": 0.9999999, "512": 0.9999998, "128": dim128_min},
        single_cosine_mean={"2048": 0.99999995, "512": 0.99999990, "128": 0.9999995},
        single_max_abs={"2048": 1e-6, "512": 2e-6, "128": 4e-6},
        multi_token_cosine_min=0.99999,
        multi_token_cosine_mean=0.999999,
        maxsim_pearson=0.999999,
        topk_overlap=1.0,
        score_spearman=0.999999,
    )
    values.update(overrides)
    return ParityResult(**values)


def retrieval(artifact_ndcg: float = 0.6195) -> list[RetrievalResult]:
    ref = {"ndcg@10": 0.62, "recall@10": 0.78, "recall@100": 0.95, "mrr@10": 0.57}
    return [
        RetrievalResult("stdlib-code", "single", 2048, ref, {**ref, "ndcg@10": artifact_ndcg}),
        RetrievalResult("stdlib-code", "single", 128, ref, dict(ref)),
        RetrievalResult("stdlib-code", "multi", 2048, ref, dict(ref)),
    ]


def test_defaults_cover_every_precision_and_are_immutable():
    assert set(DEFAULTS) == set(PRECISIONS)
    assert DEFAULTS["fp32"] == Thresholds()
    with pytest.raises(TypeError):
        DEFAULTS["fp32"] = Thresholds()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS["fp32"].ndcg_drop_max = 1.0  # type: ignore[misc]
    # looser precisions never demand more than fp32
    for name, t in DEFAULTS.items():
        assert t.single_cosine_min <= DEFAULTS["fp32"].single_cosine_min, name
        assert t.ndcg_drop_max >= DEFAULTS["fp32"].ndcg_drop_max, name
        assert t.single_cosine_min <= t.single_cosine_mean, name
    assert DEFAULTS["emb-binary"].ndcg_drop_max > DEFAULTS["emb-int4"].ndcg_drop_max > DEFAULTS["emb-int8"].ndcg_drop_max


@pytest.mark.parametrize(
    "field, value",
    [
        ("single_cosine_min", 1.5),
        ("maxsim_pearson_min", -1.01),
        ("topk_overlap_min", -0.1),
        ("ndcg_drop_max", -0.001),
        ("sts_drop_max", math.nan),
        ("recall_drop_max", "0.1"),
        ("single_cosine_mean", True),
    ],
)
def test_thresholds_validate_ranges(field, value):
    with pytest.raises(ValueError, match=field):
        Thresholds(**{field: value})


def test_thresholds_json_round_trip_and_unknown_keys():
    t = Thresholds(ndcg_drop_max=0.01, single_cosine_min=1)
    assert Thresholds.from_json(json.loads(json.dumps(t.to_json()))) == t
    assert isinstance(t.single_cosine_min, float)
    with pytest.raises(ThresholdError, match="'ndcg_drop'.*'nope'"):
        Thresholds.from_json({"ndcg_drop": 0.1, "nope": 1, "sts_drop_max": 0.1})
    assert issubclass(ThresholdError, Jev4Error)


def test_load_thresholds_precedence(tmp_path):
    assert load_thresholds("bf16", None) == DEFAULTS["bf16"]
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"ndcg_drop_max": 0.03}))
    t = load_thresholds("fp16", flat)
    assert t.ndcg_drop_max == 0.03 and t.single_cosine_min == DEFAULTS["fp16"].single_cosine_min
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"int8": {"single_cosine_min": 0.9}, "fp16": {"recall_drop_max": 0.02}}))
    assert load_thresholds("int8", keyed) == dataclasses.replace(DEFAULTS["int8"], single_cosine_min=0.9)
    assert load_thresholds("fp16", keyed).recall_drop_max == 0.02
    assert load_thresholds("bf16", keyed) == DEFAULTS["bf16"]  # not in the file: defaults


def test_load_thresholds_errors_name_file_and_key(tmp_path):
    with pytest.raises(ThresholdError, match=r"unknown precision 'fp64'.*fp32.*emb-binary"):
        load_thresholds("fp64", None)
    bad_key = tmp_path / "typo.json"
    bad_key.write_text(json.dumps({"ndcg_drop_maxx": 0.01}))
    with pytest.raises(ThresholdError, match=r"typo\.json.*'ndcg_drop_maxx'"):
        load_thresholds("fp32", bad_key)
    nested_typo = tmp_path / "nested.json"
    nested_typo.write_text(json.dumps({"fp32": {}, "int8": {"recal_drop_max": 0.1}}))
    with pytest.raises(ThresholdError, match=r"nested\.json: int8: .*'recal_drop_max'"):
        load_thresholds("fp32", nested_typo)
    bad_precision = tmp_path / "prec.json"
    bad_precision.write_text(json.dumps({"fp64": {"ndcg_drop_max": 0.1}}))
    with pytest.raises(ThresholdError, match=r"prec\.json: fp64: unknown precision"):
        load_thresholds("fp32", bad_precision)
    broken = tmp_path / "broken.json"
    broken.write_text('{"ndcg_drop_max": 0.01,,}')
    with pytest.raises(ThresholdError, match=r"broken\.json: not valid JSON.*line 1"):
        load_thresholds("fp32", broken)
    out_of_range = tmp_path / "range.json"
    out_of_range.write_text(json.dumps({"single_cosine_min": 2}))
    with pytest.raises(ThresholdError, match=r"range\.json: .*single_cosine_min"):
        load_thresholds("fp32", out_of_range)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"fp16": {}, "ndcg_drop_max": 0.1}))
    with pytest.raises(ThresholdError, match=r"mixed\.json: mixes flat keys \(ndcg_drop_max\)"):
        load_thresholds("fp16", mixed)
    with pytest.raises(ThresholdError, match=r"missing\.json: thresholds file not found"):
        load_thresholds("fp32", tmp_path / "missing.json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ThresholdError, match=r"list\.json: must hold a JSON object"):
        load_thresholds("fp32", listed)


def test_evaluate_passes_a_faithful_artifact():
    checks = evaluate(parity(), retrieval(), [STSResult("sts", 0.81, 0.81)], DEFAULTS["fp32"])
    assert all(c.passed for c in checks), [c.describe() for c in checks if not c.passed]
    names = [c.name for c in checks]
    assert names[:3] == [f"parity: single-vector min cosine (dim {d})" for d in (2048, 512, 128)]
    assert {
        "parity: multi-vector per-token min cosine",
        "parity: MaxSim score Pearson",
        "parity: top-10 overlap",
        "parity: query-document score Spearman",
        "retrieval stdlib-code single dim 2048: nDCG@10 drop",
        "retrieval stdlib-code single dim 128: Recall@100 drop",
        "retrieval stdlib-code multi dim 2048: nDCG@10 drop",
        "sts sts: Spearman drop",
    } <= set(names)
    assert len(checks) == 2 * 3 + 4 + 2 * 3 + 1


def test_evaluate_names_what_failed():
    checks = evaluate(parity(dim128_min=0.98, topk_overlap=0.7), retrieval(artifact_ndcg=0.55), [STSResult("sts", 0.81, 0.70)], DEFAULTS["fp32"])
    failed = {c.name: c for c in checks if not c.passed}
    assert set(failed) == {
        "parity: single-vector min cosine (dim 128)",
        "parity: top-10 overlap",
        "retrieval stdlib-code single dim 2048: nDCG@10 drop",
        "sts sts: Spearman drop",
    }
    drop = failed["retrieval stdlib-code single dim 2048: nDCG@10 drop"]
    assert drop.value == pytest.approx(0.07) and drop.maximum == 0.005
    assert "needs <= 0.005" in drop.describe()
    # the same numbers are within the much looser bounds of binary embedding codes
    loose = {c.name for c in evaluate(parity(dim128_min=0.98, topk_overlap=0.7), retrieval(0.55), [], DEFAULTS["emb-binary"]) if not c.passed}
    assert loose == set()


def test_evaluate_skips_missing_parts_and_fails_missing_numbers():
    assert evaluate(None, [], [], DEFAULTS["fp32"]) == []
    ref = {"ndcg@10": 0.5, "recall@100": 0.9}
    checks = evaluate(None, [RetrievalResult("d", "single", 128, ref, {"ndcg@10": math.nan})], [], DEFAULTS["fp32"])
    assert [c.passed for c in checks] == [False, False]  # nan nDCG, missing recall@100
    improved = evaluate(None, [RetrievalResult("d", "single", 128, ref, {"ndcg@10": 0.6, "recall@100": 0.95})], [], DEFAULTS["fp32"])
    assert all(c.passed for c in improved) and improved[0].value == pytest.approx(-0.1)


def test_drop_bound_never_finer_than_one_query():
    """With 100 queries Recall@100 moves in 0.01 steps: one query's slip passes, two fail."""
    ref = {"ndcg@10": 0.5, "recall@100": 0.9}
    one = RetrievalResult("d", "single", 128, ref, {"ndcg@10": 0.5, "recall@100": 0.89}, queries=100)
    two = RetrievalResult("d", "single", 128, ref, {"ndcg@10": 0.5, "recall@100": 0.88}, queries=100)
    many = RetrievalResult("d", "single", 128, ref, {"ndcg@10": 0.5, "recall@100": 0.89}, queries=10_000)
    by_name = lambda checks: {c.name.split(": ")[-1]: c for c in checks}  # noqa: E731
    assert by_name(evaluate(None, [one], [], DEFAULTS["fp32"]))["Recall@100 drop"].passed
    assert not by_name(evaluate(None, [two], [], DEFAULTS["fp32"]))["Recall@100 drop"].passed
    check = by_name(evaluate(None, [many], [], DEFAULTS["fp32"]))["Recall@100 drop"]
    assert check.maximum == DEFAULTS["fp32"].recall_drop_max and not check.passed
