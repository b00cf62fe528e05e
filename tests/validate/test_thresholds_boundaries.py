"""The threshold set's edges and messages: the closed ranges' end points, drops of exactly 0, the one-query resolution.

Mutation testing (docs/testing.md) found that no test stood on these edges:
``-1.0 <= v`` could become ``-1.0 < v``, a drop of 0 could be refused, and the
error messages could lose their content, all unnoticed.
"""

import json

import pytest

from jev4.validate.results import RetrievalResult
from jev4.validate.thresholds import DEFAULTS, ThresholdError, Thresholds, load_thresholds, resolution, retrieval_label

UNIT_RANGE = ("single_cosine_min", "single_cosine_mean", "multi_token_cosine_min", "maxsim_pearson_min", "score_spearman_min")
DROPS = ("ndcg_drop_max", "recall_drop_max", "sts_drop_max")


@pytest.mark.parametrize("name", UNIT_RANGE)
def test_correlation_and_cosine_bounds_accept_both_ends_of_minus_one_to_one(name):
    for edge in (-1.0, 1.0):
        assert getattr(Thresholds(**{name: edge}), name) == edge
    for outside in (-1.0000001, 1.0000001):
        with pytest.raises(ThresholdError, match=rf"^threshold {name}: must be in \[-1, 1\], got {outside!r}$"):
            Thresholds(**{name: outside})


def test_topk_overlap_accepts_zero_and_one_only_inside():
    assert Thresholds(topk_overlap_min=0.0).topk_overlap_min == 0.0
    assert Thresholds(topk_overlap_min=1.0).topk_overlap_min == 1.0
    for outside in (-0.01, 1.01, 1.5):
        with pytest.raises(ThresholdError, match=rf"^threshold topk_overlap_min: must be in \[0, 1\], got {outside!r}$"):
            Thresholds(topk_overlap_min=outside)


@pytest.mark.parametrize("name", DROPS)
def test_a_drop_of_zero_is_allowed_and_a_negative_or_nan_one_is_not(name):
    assert getattr(Thresholds(**{name: 0.0}), name) == 0.0  # "no drop at all" is a valid demand
    for bad in (-0.001, float("nan")):
        with pytest.raises(ThresholdError, match=rf"^threshold {name}: a drop must be >= 0, got "):
            Thresholds(**{name: bad})


def test_from_json_messages_name_what_is_wrong():
    with pytest.raises(ThresholdError, match=r"^thresholds must be a JSON object, got list$"):
        Thresholds.from_json([1, 2])
    known = ", ".join(sorted(Thresholds().to_json()))
    with pytest.raises(ThresholdError, match=rf"^unknown threshold key\(s\) 'a', 'b'; known: {known}$"):
        Thresholds.from_json({"b": 1, "a": 2})
    with pytest.raises(ThresholdError, match=rf"^unknown precision 'fp5'; known: {', '.join(DEFAULTS)}$"):
        load_thresholds("fp5")


def test_load_thresholds_messages_name_the_file_and_entry(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("[1]")
    with pytest.raises(ThresholdError, match=rf"^{path}: must hold a JSON object, got list$"):
        load_thresholds("fp32", path)
    path.write_text(json.dumps({"zz": 0.1, "ndcg_drop_max": 0.1, "fp16": {}, "bf16": {}}))
    with pytest.raises(ThresholdError, match=rf"^{path}: mixes flat keys \(ndcg_drop_max, zz\) with per-precision objects \(fp16, bf16\); use one form$"):
        load_thresholds("fp32", path)
    path.write_text(json.dumps({"ndcg_drop_max": -1}))
    with pytest.raises(ThresholdError, match=rf"^{path}: threshold ndcg_drop_max: a drop must be >= 0, got -1.0$"):  # flat: no precision in the path
        load_thresholds("fp32", path)
    path.write_text(json.dumps({"fp16": {"ndcg_drop_max": -1}}))
    with pytest.raises(ThresholdError, match=rf"^{path}: fp16: threshold ndcg_drop_max"):
        load_thresholds("fp32", path)
    path.write_bytes("{\"ndcg_drop_max\": 0.01, \"note\": \"é\"}".encode("latin-1"))
    with pytest.raises(ThresholdError, match=rf"^{path}: cannot read thresholds file: 'utf-8' codec can't decode"):
        load_thresholds("fp32", path)


def test_resolution_of_one_query_and_of_none():
    assert resolution(1) == pytest.approx(1.0 + 1e-9, abs=1e-15)  # a single query moves a mean by a whole point
    assert resolution(100) == pytest.approx(0.01 + 1e-9, abs=1e-15)
    assert resolution(0) == 0.0


def test_retrieval_label_names_the_dim_only_when_there_is_one():
    result = RetrievalResult(dataset="d", scoring="multi", dim=0, reference={}, artifact={}, queries=1)
    assert retrieval_label(result) == "retrieval d multi"
    assert retrieval_label(RetrievalResult(dataset="d", scoring="single", dim=128, reference={}, artifact={}, queries=1)) == "retrieval d single dim 128"


def _parity(**changes):
    from jev4.validate.results import ParityResult

    good = dict(
        single_cosine_min={"2048": 1.0, "128": 1.0, "full": 1.0},
        single_cosine_mean={"128": 1.0, "2048": 1.0},
        single_max_abs={},
        multi_token_cosine_min=1.0,
        multi_token_cosine_mean=1.0,
        maxsim_pearson=1.0,
        topk_overlap=1.0,
        score_spearman=1.0,
    )
    return ParityResult(**{**good, **changes})


@pytest.mark.parametrize(
    ("field", "value", "failing"),
    [
        ("single_cosine_min", {"2048": 0.99989, "128": 1.0, "full": 1.0}, "parity: single-vector min cosine (dim 2048)"),
        ("single_cosine_mean", {"128": 0.999989, "2048": 1.0}, "parity: single-vector mean cosine (dim 128)"),
        ("multi_token_cosine_min", 0.9989, "parity: multi-vector per-token min cosine"),
        ("maxsim_pearson", 0.9989, "parity: MaxSim score Pearson"),
        ("topk_overlap", 0.94, "parity: top-10 overlap"),
        ("score_spearman", 0.9989, "parity: query-document score Spearman"),
    ],
)
def test_each_parity_check_fails_just_below_its_fp32_bound(field, value, failing):
    from jev4.validate.thresholds import evaluate

    checks = evaluate(_parity(**{field: value}), [], [], DEFAULTS["fp32"])
    assert [c.name for c in checks if not c.passed] == [failing]
    assert all(c.passed for c in evaluate(_parity(), [], [], DEFAULTS["fp32"]))


def test_parity_checks_come_in_dim_order_largest_first_then_named_dims():
    from jev4.validate.thresholds import evaluate

    names = [c.name for c in evaluate(_parity(), [], [], DEFAULTS["fp32"])]
    assert names[:5] == [
        "parity: single-vector min cosine (dim 2048)",
        "parity: single-vector min cosine (dim 128)",
        "parity: single-vector min cosine (dim full)",
        "parity: single-vector mean cosine (dim 2048)",
        "parity: single-vector mean cosine (dim 128)",
    ]


def test_codec_thresholds_take_the_file_override_and_name_unknown_codecs(tmp_path):
    from jev4.validate.thresholds import CODEC_THRESHOLDS, codec_thresholds

    base = CODEC_THRESHOLDS["binary"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({base: {"ndcg_drop_max": 0.123}}))
    assert codec_thresholds("binary+rescore", path).ndcg_drop_max == 0.123  # judged as binary, with the file applied
    assert codec_thresholds("binary").ndcg_drop_max == DEFAULTS[base].ndcg_drop_max
    with pytest.raises(ThresholdError, match=rf"^no thresholds for output codec 'float64'; known: {', '.join(CODEC_THRESHOLDS)}$"):
        codec_thresholds("float64")


def test_codec_checks_skip_unjudged_codecs_wherever_they_come():
    from jev4.validate.results import CodecResult
    from jev4.validate.thresholds import codec_checks

    def result(codec, ndcg):
        return CodecResult("d", codec, "single", 64, {"ndcg@10": ndcg, "recall@100": 1.0}, {"ndcg@10": 1.0, "recall@100": 1.0}, 8, 0.1, queries=1000)

    judged = {"int8": DEFAULTS["fp32"]}
    checks = codec_checks([result("binary", 0.5), result("int8", 0.9), result("float16", 1.0)], judged)  # an unjudged codec first
    assert [(c.name, c.passed) for c in checks] == [
        ("codec int8 d single dim 64: nDCG@10 drop vs float32", False),
        ("codec int8 d single dim 64: Recall@100 drop vs float32", True),
    ]
