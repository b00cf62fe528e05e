"""jina-clip-v2's threshold sets and verdict: ranges and messages, file overrides, and every check evaluate_clip makes.

Mutation testing (docs/testing.md) found that nothing in the fast tests of
``jev4/validate/thresholds.py`` stood on its jina-clip-v2 half: the range
checks of ``ClipThresholds`` could be dropped, ``load_clip_thresholds`` could
take v4's defaults as the base of a file override, and ``evaluate_clip`` could
lose its bounds, the one-query floor or its check names, all unnoticed. The
expectations here are literal numbers, worked out by hand.
"""

import dataclasses
import json
import math
import re

import pytest

from jev4.validate.clip_retrieval import CosineParity
from jev4.validate.results import MetricCheck, RetrievalResult
from jev4.validate.thresholds import CLIP_DEFAULTS, DEFAULTS, ClipThresholds, ThresholdError, evaluate_clip, load_clip_thresholds

KNOWN_KEYS = "cosine_mean, cosine_min, ndcg_drop_max, recall_drop_max"


def exactly(message: str) -> str:
    """A ``pytest.raises(match=)`` pattern for the whole message, literally."""
    return f"^{re.escape(message)}$"


# --------------------------------------------------------------------------- ClipThresholds


def test_defaults_per_precision_are_the_measured_ones():
    assert ClipThresholds() == ClipThresholds(0.99999, 0.999999, 0.005, 0.005)
    assert dict(CLIP_DEFAULTS) == {
        "fp32": ClipThresholds(cosine_min=0.99999, cosine_mean=0.999999, ndcg_drop_max=0.005, recall_drop_max=0.005),
        "fp16": ClipThresholds(cosine_min=0.999, cosine_mean=0.9999, ndcg_drop_max=0.005, recall_drop_max=0.005),
        "w-int8": ClipThresholds(cosine_min=0.97, cosine_mean=0.99, ndcg_drop_max=0.02, recall_drop_max=0.02),
    }
    with pytest.raises(TypeError):
        CLIP_DEFAULTS["fp32"] = ClipThresholds()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CLIP_DEFAULTS["fp32"].cosine_min = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("name", ["cosine_min", "cosine_mean"])
def test_cosines_accept_both_ends_of_minus_one_to_one_and_nothing_outside(name):
    for edge in (-1.0, 1.0, -0.5, 0.0):
        assert getattr(ClipThresholds(**{name: edge}), name) == edge
    for outside, shown in ((-1.0000001, "-1.0000001"), (1.0000001, "1.0000001"), (2, "2.0"), (-3, "-3.0"), (math.nan, "nan")):
        with pytest.raises(ThresholdError, match=exactly(f"threshold {name}: must be in [-1, 1], got {shown}")):
            ClipThresholds(**{name: outside})


@pytest.mark.parametrize("name", ["ndcg_drop_max", "recall_drop_max"])
def test_a_drop_of_zero_or_more_is_allowed_and_a_negative_or_nan_one_is_not(name):
    for allowed in (0.0, 0.5, 1.0, 1.5, 3):  # a drop is not a cosine: no upper end
        assert getattr(ClipThresholds(**{name: allowed}), name) == allowed
    for bad, shown in ((-0.001, "-0.001"), (-1, "-1.0"), (-2.0, "-2.0"), (math.nan, "nan"), (-math.inf, "-inf")):
        with pytest.raises(ThresholdError, match=exactly(f"threshold {name}: a drop must be >= 0, got {shown}")):
            ClipThresholds(**{name: bad})


@pytest.mark.parametrize("name", ["cosine_min", "cosine_mean", "ndcg_drop_max", "recall_drop_max"])
def test_every_field_must_be_a_real_number(name):
    for bad, shown in ((True, "True"), (False, "False"), ("0.5", "'0.5'"), (None, "None"), ([0.5], "[0.5]")):
        with pytest.raises(ThresholdError, match=exactly(f"threshold {name}: must be a number, got {shown}")):
            ClipThresholds(**{name: bad})


def test_integers_are_stored_as_floats():
    t = ClipThresholds(cosine_min=1, cosine_mean=0, ndcg_drop_max=0, recall_drop_max=2)
    assert [(type(v), v) for v in dataclasses.astuple(t)] == [(float, 1.0), (float, 0.0), (float, 0.0), (float, 2.0)]
    assert json.dumps(t.to_json()) == '{"cosine_min": 1.0, "cosine_mean": 0.0, "ndcg_drop_max": 0.0, "recall_drop_max": 2.0}'


def test_the_first_bad_field_in_declaration_order_is_reported():
    with pytest.raises(ThresholdError, match=exactly("threshold cosine_min: must be in [-1, 1], got 5.0")):
        ClipThresholds(cosine_min=5, cosine_mean=5, ndcg_drop_max=-1, recall_drop_max=-1)
    with pytest.raises(ThresholdError, match=exactly("threshold recall_drop_max: a drop must be >= 0, got -1.0")):
        ClipThresholds(cosine_min=0.5, recall_drop_max=-1)


def test_to_json_and_from_json():
    t = ClipThresholds(cosine_min=0.9, cosine_mean=0.95, ndcg_drop_max=0.03, recall_drop_max=0.04)
    assert t.to_json() == {"cosine_min": 0.9, "cosine_mean": 0.95, "ndcg_drop_max": 0.03, "recall_drop_max": 0.04}
    assert list(t.to_json()) == ["cosine_min", "cosine_mean", "ndcg_drop_max", "recall_drop_max"]
    assert ClipThresholds.from_json(json.loads(json.dumps(t.to_json()))) == t
    # keys left out keep the base's values, or the fp32 defaults without a base
    assert ClipThresholds.from_json({"cosine_min": 0.5}) == ClipThresholds(0.5, 0.999999, 0.005, 0.005)
    assert ClipThresholds.from_json({}, base=t) == t
    assert ClipThresholds.from_json({"ndcg_drop_max": 0.1}, base=CLIP_DEFAULTS["w-int8"]) == ClipThresholds(0.97, 0.99, 0.1, 0.02)
    # a value from a file goes through the same checks
    with pytest.raises(ThresholdError, match=exactly("threshold cosine_mean: must be in [-1, 1], got 1.5")):
        ClipThresholds.from_json({"cosine_mean": 1.5}, base=t)
    # v4's keys are not clip keys
    with pytest.raises(ThresholdError, match=exactly(f"unknown threshold key(s) 'single_cosine_min', 'sts_drop_max'; known: {KNOWN_KEYS}")):
        ClipThresholds.from_json({"sts_drop_max": 0.1, "single_cosine_min": 0.9, "cosine_min": 0.9})
    with pytest.raises(ThresholdError, match=exactly("thresholds must be a JSON object, got list")):
        ClipThresholds.from_json([0.9])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- load_clip_thresholds


def test_load_without_a_file_gives_clip_defaults_not_v4_ones():
    assert load_clip_thresholds("fp32") == ClipThresholds(0.99999, 0.999999, 0.005, 0.005)
    fp16 = load_clip_thresholds("fp16", None)
    assert type(fp16) is ClipThresholds and fp16 == ClipThresholds(0.999, 0.9999, 0.005, 0.005)
    assert load_clip_thresholds("w-int8") == ClipThresholds(0.97, 0.99, 0.02, 0.02)


def test_load_names_the_clip_precisions_when_one_is_unknown():
    assert "bf16" in DEFAULTS  # a v4 precision is still unknown to jina-clip-v2
    for unknown in ("bf16", "emb-int8", "fp64"):
        with pytest.raises(ThresholdError, match=exactly(f"unknown precision {unknown!r}; known: fp32, fp16, w-int8")):
            load_clip_thresholds(unknown)
    with pytest.raises(ThresholdError, match=exactly("unknown precision 'bf16'; known: fp32, fp16, w-int8")):
        load_clip_thresholds("bf16", "/nonexistent/thresholds.json")  # the precision is checked before the file is read


def test_flat_keys_override_the_clip_defaults_of_the_precision(tmp_path):
    path = tmp_path / "flat.json"
    path.write_text(json.dumps({"ndcg_drop_max": 0.01, "cosine_min": 0.95}))
    # fp16 has other defaults in v4's set (cosine_mean there would be single_cosine_mean): the base must be clip's
    fp16 = load_clip_thresholds("fp16", path)
    assert type(fp16) is ClipThresholds and fp16 == ClipThresholds(0.95, 0.9999, 0.01, 0.005)
    assert load_clip_thresholds("w-int8", str(path)) == ClipThresholds(0.95, 0.99, 0.01, 0.02)
    assert load_clip_thresholds("fp32", path) == ClipThresholds(0.95, 0.999999, 0.01, 0.005)


def test_per_precision_objects_override_each_precision_from_its_own_clip_defaults(tmp_path):
    path = tmp_path / "keyed.json"
    path.write_text(json.dumps({"w-int8": {"cosine_min": 0.9}, "fp16": {"recall_drop_max": 0.03}}))
    w_int8 = load_clip_thresholds("w-int8", path)
    assert type(w_int8) is ClipThresholds and w_int8 == ClipThresholds(0.9, 0.99, 0.02, 0.02)
    fp16 = load_clip_thresholds("fp16", path)
    assert type(fp16) is ClipThresholds and fp16 == ClipThresholds(0.999, 0.9999, 0.005, 0.03)
    assert load_clip_thresholds("fp32", path) == ClipThresholds(0.99999, 0.999999, 0.005, 0.005)  # not in the file: defaults


def test_a_per_precision_object_for_a_v4_only_precision_is_refused(tmp_path):
    path = tmp_path / "v4.json"
    path.write_text(json.dumps({"fp32": {}, "bf16": {"ndcg_drop_max": 0.01}}))
    with pytest.raises(ThresholdError, match=exactly(f"{path}: bf16: unknown precision 'bf16'; known: fp32, fp16, w-int8")):
        load_clip_thresholds("fp32", path)


def test_file_errors_name_the_file_the_entry_and_the_key(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"cosine_minn": 0.9}))
    with pytest.raises(ThresholdError, match=exactly(f"{path}: unknown threshold key(s) 'cosine_minn'; known: {KNOWN_KEYS}")):
        load_clip_thresholds("fp16", path)
    path.write_text(json.dumps({"fp16": {}, "w-int8": {"single_cosine_min": 0.9}}))  # a typo fails even for another precision
    with pytest.raises(ThresholdError, match=exactly(f"{path}: w-int8: unknown threshold key(s) 'single_cosine_min'; known: {KNOWN_KEYS}")):
        load_clip_thresholds("fp16", path)
    path.write_text(json.dumps({"fp16": {"cosine_min": 1.5}}))
    with pytest.raises(ThresholdError, match=exactly(f"{path}: fp16: threshold cosine_min: must be in [-1, 1], got 1.5")):
        load_clip_thresholds("fp32", path)
    path.write_text(json.dumps({"recall_drop_max": -1}))
    with pytest.raises(ThresholdError, match=exactly(f"{path}: threshold recall_drop_max: a drop must be >= 0, got -1.0")):
        load_clip_thresholds("w-int8", path)
    path.write_text(json.dumps({"cosine_min": 0.9, "fp16": {}}))
    with pytest.raises(ThresholdError, match=exactly(f"{path}: mixes flat keys (cosine_min) with per-precision objects (fp16); use one form")):
        load_clip_thresholds("fp16", path)
    with pytest.raises(ThresholdError, match=exactly(f"{tmp_path / 'missing.json'}: thresholds file not found")):
        load_clip_thresholds("fp32", tmp_path / "missing.json")


# --------------------------------------------------------------------------- evaluate_clip


def parity(inputs: str, dim: int, min_cosine, mean_cosine) -> CosineParity:
    return CosineParity(inputs=inputs, dim=dim, rows=16, min_cosine=min_cosine, mean_cosine=mean_cosine, max_abs=1e-3)


def retrieval(direction: str, dim: int, reference: dict, artifact: dict, queries: int) -> RetrievalResult:
    dataset = "multilingual-names" if direction == "text->text" else "pydoc-pages"
    return RetrievalResult(f"{dataset} ({direction})", "single", dim, reference, artifact, queries)


# ndcg_drop_max and recall_drop_max differ, so a check bounded by the other one shows
T = ClipThresholds(cosine_min=0.75, cosine_mean=0.875, ndcg_drop_max=0.03125, recall_drop_max=0.046875)


def test_evaluate_clip_makes_one_named_check_per_number_with_its_bound():
    checks = evaluate_clip(
        [parity("pages", 32, 0.8, 0.9), parity("multilingual-names queries", 8, 0.5, 0.625)],
        [
            # 1000 queries: a step of 0.001, finer than both thresholds, which bound the drops
            retrieval("text->text", 32, {"ndcg@10": 0.75, "recall@10": 0.875, "recall@100": 1.0}, {"ndcg@10": 0.5, "recall@10": 0.8125, "recall@100": 0.0}, 1000),
            retrieval("image->image", 16, {"ndcg@10": 0.5, "recall@10": 0.5}, {"ndcg@10": 0.625, "recall@10": 0.5}, 1000),
        ],
        T,
    )
    assert checks == [
        MetricCheck("parity: pages min cosine (dim 32)", 0.8, minimum=0.75),
        MetricCheck("parity: pages mean cosine (dim 32)", 0.9, minimum=0.875),
        MetricCheck("parity: multilingual-names queries min cosine (dim 8)", 0.5, minimum=0.75),
        MetricCheck("parity: multilingual-names queries mean cosine (dim 8)", 0.625, minimum=0.875),
        MetricCheck("retrieval multilingual-names (text->text) single dim 32: nDCG@10 drop", 0.25, maximum=0.03125),
        MetricCheck("retrieval multilingual-names (text->text) single dim 32: Recall@10 drop", 0.0625, maximum=0.046875),
        MetricCheck("retrieval pydoc-pages (image->image) single dim 16: nDCG@10 drop", -0.125, maximum=0.03125),
        MetricCheck("retrieval pydoc-pages (image->image) single dim 16: Recall@10 drop", 0.0, maximum=0.046875),
    ]
    assert [c.passed for c in checks] == [True, True, False, False, False, False, True, True]
    assert all(type(c.value) is float for c in checks)


def test_evaluate_clip_of_nothing_is_no_checks():
    assert evaluate_clip([], [], T) == []
    assert [c.name for c in evaluate_clip([parity("crops", 8, 1.0, 1.0)], [], T)] == ["parity: crops min cosine (dim 8)", "parity: crops mean cosine (dim 8)"]


def test_cosines_pass_at_their_bound_and_fail_just_below():
    at = evaluate_clip([parity("pages", 8, 0.75, 0.875)], [], T)
    assert [c.passed for c in at] == [True, True]
    below = evaluate_clip([parity("pages", 8, 0.7499999, 0.8749999)], [], T)
    assert [c.passed for c in below] == [False, False]
    only_mean = evaluate_clip([parity("pages", 8, 0.75, 0.8749999)], [], T)
    assert [c.passed for c in only_mean] == [True, False]  # the mean has its own, tighter bound
    # the same numbers under the w-int8 defaults (0.97 / 0.99) and fp32's (0.99999 / 0.999999)
    assert [c.passed for c in evaluate_clip([parity("pages", 8, 0.98, 0.995)], [], CLIP_DEFAULTS["w-int8"])] == [True, True]
    assert [c.passed for c in evaluate_clip([parity("pages", 8, 0.98, 0.995)], [], CLIP_DEFAULTS["fp32"])] == [False, False]
    assert [(c.minimum, c.maximum) for c in evaluate_clip([parity("pages", 8, 1.0, 1.0)], [], CLIP_DEFAULTS["fp16"])] == [(0.999, None), (0.9999, None)]


def test_drops_pass_at_their_bound_and_fail_just_above():
    ref = {"ndcg@10": 0.75, "recall@10": 0.75}
    at = evaluate_clip([], [retrieval("text->text", 8, ref, {"ndcg@10": 0.71875, "recall@10": 0.703125}, 1000)], T)
    assert [(c.value, c.passed) for c in at] == [(0.03125, True), (0.046875, True)]
    above = evaluate_clip([], [retrieval("text->text", 8, ref, {"ndcg@10": 0.71874, "recall@10": 0.70312}, 1000)], T)
    assert [c.passed for c in above] == [False, False]


def test_drop_bound_is_never_finer_than_one_query():
    """16 pages: a mean over 16 queries moves in steps of 0.0625, so one page slipping passes and two fail."""
    ref = {"ndcg@10": 0.75, "recall@10": 1.0}
    one = evaluate_clip([], [retrieval("text->image", 32, ref, {"ndcg@10": 0.6875, "recall@10": 0.9375}, 16)], T)
    assert [c.maximum for c in one] == [pytest.approx(0.062500001, rel=0, abs=1e-15)] * 2
    assert [(c.value, c.passed) for c in one] == [(0.0625, True), (0.0625, True)]
    two = evaluate_clip([], [retrieval("text->image", 32, ref, {"ndcg@10": 0.625, "recall@10": 0.875}, 16)], T)
    assert [(c.value, c.passed) for c in two] == [(0.125, False), (0.125, False)]
    # 200 text queries: the floor 0.005000001 is above fp32's 0.005, so it bounds both drops
    floor = evaluate_clip([], [retrieval("text->text", 32, ref, ref, 200)], CLIP_DEFAULTS["fp32"])
    assert [c.maximum for c in floor] == [pytest.approx(0.005000001, rel=0, abs=1e-15)] * 2
    # many queries, or none counted: the threshold alone
    fine = evaluate_clip([], [retrieval("text->text", 32, ref, ref, 1_000_000)], T)
    assert [c.maximum for c in fine] == [0.03125, 0.046875]
    uncounted = evaluate_clip([], [retrieval("text->text", 32, ref, ref, 0)], T)
    assert [c.maximum for c in uncounted] == [0.03125, 0.046875]


def test_missing_or_nan_numbers_fail_their_checks():
    checks = evaluate_clip(
        [parity("pages", 8, math.nan, 1.0), parity("crops", 8, 1.0, None)],
        [
            retrieval("text->text", 8, {"ndcg@10": 0.5, "recall@10": 0.5}, {"ndcg@10": math.nan}, 1),  # NaN nDCG, no Recall@10
            retrieval("image->image", 8, {"recall@10": 0.5}, {"ndcg@10": 0.5, "recall@10": "n/a"}, 1),  # no reference nDCG, a non-number
        ],
        ClipThresholds(cosine_min=-1, cosine_mean=-1, ndcg_drop_max=1, recall_drop_max=1),  # the loosest bounds: only a NaN can fail
    )
    assert [(c.name, math.isnan(c.value), c.passed) for c in checks] == [
        ("parity: pages min cosine (dim 8)", True, False),
        ("parity: pages mean cosine (dim 8)", False, True),
        ("parity: crops min cosine (dim 8)", False, True),
        ("parity: crops mean cosine (dim 8)", True, False),
        ("retrieval multilingual-names (text->text) single dim 8: nDCG@10 drop", True, False),
        ("retrieval multilingual-names (text->text) single dim 8: Recall@10 drop", True, False),
        ("retrieval pydoc-pages (image->image) single dim 8: nDCG@10 drop", True, False),
        ("retrieval pydoc-pages (image->image) single dim 8: Recall@10 drop", True, False),
    ]


def test_recall_at_10_is_judged_not_recall_at_100():
    ref = {"ndcg@10": 0.5, "recall@1": 0.5, "recall@10": 0.75, "recall@100": 1.0}
    art = {"ndcg@10": 0.5, "recall@1": 0.0, "recall@10": 0.75, "recall@100": 0.0}
    checks = evaluate_clip([], [retrieval("text->text", 8, ref, art, 1000)], T)
    assert [(c.name.split(": ")[-1], c.value, c.passed) for c in checks] == [("nDCG@10 drop", 0.0, True), ("Recall@10 drop", 0.0, True)]
