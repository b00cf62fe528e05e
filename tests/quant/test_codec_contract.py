"""The output codec's contract with its callers: calibration statistics, calibration files, refusals, codec edges.

Why: the round-trip tests in test_embeddings.py feed well-formed float32
matrices and check codes. Callers also pass lists, float64, torch tensors,
single vectors and bad values; they read the calibration file the codec wrote
(a documented artifact) and they act on the error messages. Each test here
checks what a caller sees (values, dtypes, shapes, the exact message) against
a plain numpy computation of the documented definition.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from jev4.errors import EmbeddingQuantError
from jev4.quant.embeddings import Calibration, EmbeddingCodec, calibrate, truncate_normalize

LOGGER = "jev4.quant.embeddings"


def _error(call) -> str:
    """The message of the EmbeddingQuantError that ``call()`` raises (any other exception fails the test)."""
    with pytest.raises(EmbeddingQuantError) as info:
        call()
    return str(info.value)


def _sample(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors with per-dim offsets and scales (anisotropic and not centred, like real embeddings)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)) * rng.uniform(0.3, 2.0, dim) + rng.normal(0, 0.5, dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _range_cal(lower, upper, precision: str = "int8", **kw) -> Calibration:
    return Calibration(precision, kw.pop("method", "minmax"), len(lower), lower=lower, upper=upper, **kw)


def _ternary_cal(dim: int = 3, **kw) -> Calibration:
    return Calibration("ternary", "minmax", dim, center=np.zeros(dim), threshold=np.full(dim, 0.1), magnitude=np.full(dim, 0.5), **kw)


# --------------------------------------------------------------------------- Calibration: construction


def test_calibration_arrays_refuse_non_finite_values_naming_the_field_and_dims():
    """A NaN in a calibration would silently poison every code of that dim; the message says which array and dims."""
    assert _error(lambda: _range_cal([0.0, np.nan, 0.0], [1.0, 1.0, 1.0])) == "calibration lower: has non-finite values (dims [1]...)"
    assert _error(lambda: _range_cal([0.0] * 3, [1.0, 1.0, np.inf])) == "calibration upper: has non-finite values (dims [2]...)"
    many = np.full(8, np.nan)
    assert _error(lambda: _range_cal(many, np.ones(8))) == "calibration lower: has non-finite values (dims [0, 1, 2, 3, 4]...)"


def test_calibration_refuses_unknown_precision_method_and_bad_dims():
    """A calibration file edited by hand or built in code is checked field by field; the message names the bad value."""
    assert _error(lambda: Calibration("float16", "minmax", 3)) == "precision 'float16' takes no calibration"
    assert _error(lambda: _range_cal([0.0], [1.0], method="kmeans")) == "unknown calibration method 'kmeans'; known: minmax, percentile, rolling"
    for dim in (0, -2, True, 2.0, "2"):
        assert _error(lambda: Calibration("int8", "minmax", dim, lower=[0.0, 0.0], upper=[1.0, 1.0])) == (
            f"calibration dim must be a positive integer, got {dim!r}"
        )
    assert _error(lambda: Calibration("int8", "minmax", 0, lower=[], upper=[])) == "calibration dim must be a positive integer, got 0"


def test_calibration_stores_plain_python_numbers():
    """numpy scalars given as dim/percentile/zero_fraction become int/float, so the calibration serialises to JSON."""
    cal = Calibration("int8", "percentile", np.int64(3), np.float32(99.5), lower=[0, 0, 0], upper=[1, 1, 1])
    assert type(cal.dim) is int and cal.dim == 3
    assert type(cal.percentile) is float and cal.percentile == 99.5
    assert type(Calibration("int8", "percentile", 2, 99, lower=[0, 0], upper=[1, 1]).percentile) is float
    tern = _ternary_cal(zero_fraction=np.float32(0.25))
    assert type(tern.zero_fraction) is float and tern.zero_fraction == 0.25
    assert _ternary_cal(zero_fraction=0.4).zero_fraction == 0.4
    for c in (cal, tern):
        assert Calibration.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_calibration_percentile_must_be_in_50_to_100_and_only_with_method_percentile():
    """(50, 100]: the (100-p, p) percentiles must be an ordered pair; p=50 collapses them, p=100 is min/max."""
    for p in (50.5, 99, 100):
        assert _range_cal([0.0], [1.0], method="percentile", percentile=p).percentile == float(p)
    for p in (None, 50, 50.0, 100.5, 101, 0):
        assert _error(lambda: _range_cal([0.0], [1.0], method="percentile", percentile=p)) == f"percentile must be in (50, 100], got {p!r}"
    assert _error(lambda: _range_cal([0.0], [1.0], percentile=99.0)) == (
        "percentile=99.0 given with method 'minmax'; it applies to method 'percentile' only"
    )


def test_calibration_array_set_must_match_the_precision():
    """Each precision family carries its own arrays; a missing or foreign array is named with the ones expected."""
    assert _error(lambda: Calibration("int8", "minmax", 2, lower=[0, 0])) == "int8 calibration needs lower, upper; upper is missing"
    assert _error(lambda: Calibration("ternary", "minmax", 1, center=[0], magnitude=[1])) == (
        "ternary calibration needs center, threshold, magnitude; threshold is missing"
    )
    assert _error(lambda: _range_cal([0, 0], [1, 1], center=[0, 0])) == "int8 calibration takes lower, upper, not center"
    assert _error(lambda: Calibration("binary", "minmax", 1, center=[0], magnitude=[1], lower=[0])) == (
        "binary calibration takes center, magnitude, not lower"
    )


def test_upper_below_lower_names_the_dims():
    """Equal ends are a constant dim (allowed); only upper < lower is refused, and those dims are listed (first five)."""
    assert _error(lambda: _range_cal([0.0, 0.5, 1.0, 0.0], [1.0, 0.5, 0.0, 1.0])) == "calibration upper < lower at dims [2]"
    assert _error(lambda: _range_cal(np.ones(7), np.zeros(7))) == "calibration upper < lower at dims [0, 1, 2, 3, 4]"
    assert _range_cal([0.5, 0.5], [0.5, 0.5]).upper.tolist() == [0.5, 0.5]


def test_negative_threshold_or_magnitude_names_the_dims():
    """A negative magnitude would flip signs on decode; zero is allowed (a constant dim decodes to its centre)."""
    base = {"center": np.zeros(3), "threshold": np.full(3, 0.1), "magnitude": np.full(3, 0.5)}
    bad = {**base, "magnitude": [0.0, -1.0, 0.5]}
    assert _error(lambda: Calibration("ternary", "minmax", 3, **bad)) == "calibration magnitude must be >= 0; negative at dims [1]"
    bad = {**base, "threshold": [-0.1, 0.0, 0.5]}
    assert _error(lambda: Calibration("ternary", "minmax", 3, **bad)) == "calibration threshold must be >= 0; negative at dims [0]"
    assert _error(lambda: Calibration("binary", "minmax", 7, center=np.zeros(7), magnitude=-np.ones(7))) == (
        "calibration magnitude must be >= 0; negative at dims [0, 1, 2, 3, 4]"
    )


def test_truncated_keeps_every_field_but_the_dim():
    """A Matryoshka codec slices the calibration; its method, percentile and zero_fraction stay those of the whole."""
    pc = calibrate(_sample(300, 8), "int8", method="percentile", percentile=99.5)
    four = pc.truncated(4)
    assert (four.dim, four.method, four.percentile) == (4, "percentile", 99.5)
    np.testing.assert_array_equal(four.lower, pc.lower[:4])
    np.testing.assert_array_equal(four.upper, pc.upper[:4])
    tern = calibrate(_sample(300, 8), "ternary", zero_fraction=0.25).truncated(3)
    assert tern.zero_fraction == 0.25 and tern.dim == 3
    np.testing.assert_array_equal(tern.threshold, calibrate(_sample(300, 8), "ternary", zero_fraction=0.25).threshold[:3])
    assert pc.truncated(8) is pc
    for dim in (0, 9):
        assert _error(lambda: pc.truncated(dim)) == f"cannot slice a 8-d calibration to {dim} dims"


# --------------------------------------------------------------------------- calibration files


def test_from_json_refusals_say_what_is_wrong():
    data = _range_cal([0.0, 0.0], [1.0, 1.0]).to_json()
    assert _error(lambda: Calibration.from_json([1, 2])) == "a calibration must be a JSON object, got list"
    assert _error(lambda: Calibration.from_json({**data, "format": "other"})) == (
        "not a jev4 embedding calibration (format 'other', expected 'jev4-embedding-calibration')"
    )
    assert _error(lambda: Calibration.from_json({**data, "version": 2})) == "calibration version 2 is not supported (expected 1)"
    assert _error(lambda: Calibration.from_json({**data, "zeta": 1, "alpha": 2})) == "unknown calibration key(s) 'alpha', 'zeta'"
    assert _error(lambda: Calibration.from_json({k: v for k, v in data.items() if k != "dim"})) == "calibration lacks dim"
    assert _error(lambda: Calibration.from_json({k: v for k, v in data.items() if k not in ("method", "dim")})) == (
        "calibration lacks method, dim"
    )
    assert _error(lambda: Calibration.from_json({**data, "method": "percentile", "percentile": "high"})) == (
        "bad calibration: could not convert string to float: 'high'"
    )


def test_saved_file_layout():
    """The calibration file is a documented artifact: these keys, these values, float32 numbers written exactly."""
    cal = calibrate(_sample(300, 3), "ternary", method="percentile", percentile=99.0, zero_fraction=0.25)
    data = cal.to_json()
    assert list(data) == ["format", "version", "precision", "method", "percentile", "dim", "zero_fraction", "center", "threshold", "magnitude"]
    assert data["format"] == "jev4-embedding-calibration" and data["version"] == 1
    assert (data["precision"], data["method"], data["percentile"], data["dim"], data["zero_fraction"]) == ("ternary", "percentile", 99.0, 3, 0.25)
    for name in ("center", "threshold", "magnitude"):
        assert all(type(v) is float for v in data[name])
        assert np.array(data[name], np.float32).tolist() == data[name] == getattr(cal, name).tolist()
    assert list(_range_cal([0.0], [1.0]).to_json())[-2:] == ["lower", "upper"]


def test_save_creates_missing_folders_and_overwrites(tmp_path):
    """Saving into a new nested folder works, and saving again replaces the file (a re-calibration)."""
    first = _range_cal([0.0, 0.0], [1.0, 1.0])
    path = first.save(tmp_path / "a" / "b" / "cal.json")
    assert path == tmp_path / "a" / "b" / "cal.json" and Calibration.load(path) == first
    second = _range_cal([-1.0, 0.0], [1.0, 2.0])
    second.save(path)
    assert Calibration.load(path) == second
    third = _ternary_cal()
    third.save(tmp_path / "flat.json")  # the folder exists already
    loaded = Calibration.load(tmp_path / "flat.json")
    assert loaded == third and loaded.zero_fraction is None
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["cal.json"]


def test_save_writes_a_hidden_temporary_next_to_the_file_and_renames_it(tmp_path, monkeypatch):
    """Atomic: a reader sees the old file or the new one, never half a file; a crash leaves only a hidden temporary."""
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        assert not (tmp_path / "cal.json").exists() or Calibration.load(tmp_path / "cal.json") == old
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    old = _range_cal([0.0], [1.0])
    monkeypatch.setattr(os, "replace", spy)
    old.save(tmp_path / "cal.json")
    new = _range_cal([0.0], [2.0])
    new.save(tmp_path / "cal.json")
    assert len(renames) == 2
    for src, dst in renames:
        assert dst == os.fspath(tmp_path / "cal.json")
        assert os.path.dirname(src) == os.fspath(tmp_path)  # same folder: the rename is atomic
        assert os.path.basename(src).startswith(".cal.json.tmp-")
    assert Calibration.load(tmp_path / "cal.json") == new


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    old = _range_cal([0.0], [1.0])
    old.save(tmp_path / "cal.json")

    def full(src, dst):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left on device"):
        _range_cal([0.0], [2.0]).save(tmp_path / "cal.json")
    assert [p.name for p in tmp_path.iterdir()] == ["cal.json"]
    assert Calibration.load(tmp_path / "cal.json") == old


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_file_has_the_usual_mode(tmp_path, umask, mode):
    """Not mkstemp's private 0600: the file gets 0666 minus the umask, like any file the user writes."""
    previous = os.umask(umask)
    try:
        path = _range_cal([0.0], [1.0]).save(tmp_path / "cal.json")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_save_logs_what_was_written_where(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = _range_cal([0.0] * 4, [1.0] * 4, precision="int4").save(tmp_path / "cal.json")
    assert caplog.messages == [f"wrote int4 calibration (4 dims) to {path}"]


def test_bad_calibration_files_name_the_file_and_the_problem(tmp_path):
    good = _range_cal([0.0, 0.0], [1.0, 1.0])
    text = json.dumps(good.to_json())
    files = {
        "v2.json": json.dumps({**good.to_json(), "version": 2}),
        "nodim.json": json.dumps({k: v for k, v in good.to_json().items() if k != "dim"}),
        "list.json": "[1, 2]",
        "upper.json": json.dumps({**good.to_json(), "upper": [1.0, 1.0, 1.0]}),
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    assert _error(lambda: Calibration.load(tmp_path / "v2.json")) == f"{tmp_path / 'v2.json'}: calibration version 2 is not supported (expected 1)"
    assert _error(lambda: Calibration.load(tmp_path / "nodim.json")) == f"{tmp_path / 'nodim.json'}: calibration lacks dim"
    assert _error(lambda: Calibration.load(tmp_path / "list.json")) == f"{tmp_path / 'list.json'}: a calibration must be a JSON object, got list"
    assert _error(lambda: Calibration.load(tmp_path / "upper.json")) == (
        f"{tmp_path / 'upper.json'}: calibration upper: expected shape (2,), got (3,)"
    )
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])  # a copy interrupted half way
    assert _error(lambda: Calibration.load(tmp_path / "cut.json")).startswith(f"{tmp_path / 'cut.json'}: cannot read calibration: ")
    (tmp_path / "latin1.json").write_bytes(text.replace('"int8"', '"int8\xe9"').encode("latin-1"))
    assert _error(lambda: Calibration.load(tmp_path / "latin1.json")).startswith(f"{tmp_path / 'latin1.json'}: cannot read calibration: ")
    assert _error(lambda: Calibration.load(tmp_path / "none.json")) == f"{tmp_path / 'none.json'}: calibration file not found"


# --------------------------------------------------------------------------- input checks


def test_non_finite_rows_are_listed_first_five_then_an_ellipsis():
    """The message names the input (embeddings, calibration embeddings, multi-vector i) and its bad rows."""
    codec = EmbeddingCodec("float32")
    cases = (([3], "[3]"), ([0, 1, 2, 3, 4], "[0, 1, 2, 3, 4]"), ([0, 1, 2, 3, 4, 5], "[0, 1, 2, 3, 4]..."), (list(range(8)), "[0, 1, 2, 3, 4]..."))
    for rows, listed in cases:
        x = _sample(10, 4)
        x[rows, 1] = np.nan
        assert _error(lambda: codec.encode(x)) == f"embeddings has non-finite values (NaN or inf) in rows {listed}"
    x = _sample(10, 4)
    x[7, 0] = -np.inf
    assert _error(lambda: calibrate(x, "int8")) == "calibration embeddings has non-finite values (NaN or inf) in rows [7]"
    assert _error(lambda: codec.encode_multi([x[:2], x])) == "multi-vector 1 has non-finite values (NaN or inf) in rows [7]"


def test_input_shape_and_dtype_refusals_name_the_input():
    codec = EmbeddingCodec("float32")
    assert _error(lambda: codec.encode(np.zeros((2, 3, 4), np.float32))) == "embeddings must be [N, D] (or one [D] vector), got shape (2, 3, 4)"
    assert _error(lambda: codec.encode(np.zeros((2, 4), np.uint8))) == "embeddings must be float embeddings, got dtype uint8"
    assert _error(lambda: calibrate(np.zeros((4, 2, 2)), "int8")) == "calibration embeddings must be [N, D] (or one [D] vector), got shape (4, 2, 2)"
    assert _error(lambda: codec.encode_multi([np.zeros((2, 4)), np.zeros(4, np.int8)])) == "multi-vector 1 must be float embeddings, got dtype int8"


def test_torch_tensors_are_accepted_as_embeddings():
    """Model outputs are torch tensors (bfloat16, requiring grad); they encode as their float32 values."""
    x = _sample(300, 16)
    t = torch.from_numpy(x).requires_grad_(True).to(torch.bfloat16)
    as_numpy = t.detach().float().numpy()
    cal = calibrate(x, "int8")
    np.testing.assert_array_equal(EmbeddingCodec("int8", cal).encode(t), EmbeddingCodec("int8", cal).encode(as_numpy))
    np.testing.assert_array_equal(EmbeddingCodec("float32").encode(t[0]), as_numpy[0])
    assert calibrate(t, "int8") == calibrate(as_numpy, "int8")


def test_truncate_normalize_returns_float32_unit_rows_for_any_leading_dims():
    rng = np.random.default_rng(5)
    x64 = rng.standard_normal((3, 2, 8))
    out = truncate_normalize(x64, 5)
    assert out.dtype == np.float32 and out.shape == (3, 2, 5)
    np.testing.assert_allclose(out, x64[..., :5] / np.linalg.norm(x64[..., :5], axis=-1, keepdims=True), rtol=1e-6)
    one = truncate_normalize([3.0, 4.0, 12.0], 2)
    assert one.dtype == np.float32 and one.tolist() == [np.float32(0.6), np.float32(0.8)]
    assert truncate_normalize(x64[0].tolist(), 8).dtype == np.float32


# --------------------------------------------------------------------------- calibrate


def test_calibrate_refusals():
    x = _sample(200, 8)
    assert _error(lambda: calibrate(x, "float16")) == "precision 'float16' needs no calibration"
    assert _error(lambda: calibrate(x, "int8", method="rolling")) == "unknown calibration method 'rolling'; known: minmax, percentile"
    for p in (50, 50.0, 100.5, 120, 0):
        assert _error(lambda: calibrate(x, "int8", method="percentile", percentile=p)) == f"percentile must be in (50, 100], got {p!r}"
    for zf in (1.0, 1.5, -0.1):
        assert _error(lambda: calibrate(x, "ternary", zero_fraction=zf)) == f"zero_fraction must be in [0, 1), got {zf!r}"
    assert _error(lambda: calibrate(x[0], "int8")) == (
        "cannot calibrate int8 from 1 embedding(s); give a representative sample (hundreds or more)"
    )
    for td in (0, 9):
        assert _error(lambda: calibrate(x, "int8", truncate_dim=td)) == f"truncate_dim={td} is not in 1..8 (the embeddings' dim)"


def test_range_calibration_minmax_and_percentiles():
    """minmax: the per-dim min and max; percentile p: the (100-p, p) percentiles, 99.9 by default; p=100 is min/max."""
    x = _sample(500, 8)
    x[0] = 3.0
    mm = calibrate(x, "uint8")
    assert (mm.method, mm.percentile) == ("minmax", None)
    np.testing.assert_array_equal(mm.lower, x.min(axis=0))
    np.testing.assert_array_equal(mm.upper, x.max(axis=0))
    assert calibrate(x, "uint8", percentile=10) == mm  # the percentile applies to method 'percentile' only
    default = calibrate(x, "uint8", method="percentile")
    assert default.percentile == 99.9
    np.testing.assert_allclose(default.upper, np.percentile(x.astype(np.float64), 99.9, axis=0), rtol=1e-6)
    np.testing.assert_allclose(default.lower, np.percentile(x.astype(np.float64), 0.1, axis=0), rtol=1e-6)
    full = calibrate(x, "uint8", method="percentile", percentile=100)
    assert full.percentile == 100.0
    np.testing.assert_array_equal(full.lower, mm.lower)
    np.testing.assert_array_equal(full.upper, mm.upper)
    narrow = calibrate(x, "uint8", method="percentile", percentile=50.5)
    np.testing.assert_allclose(narrow.upper, np.percentile(x.astype(np.float64), 50.5, axis=0), rtol=1e-6)
    np.testing.assert_allclose(narrow.lower, np.percentile(x.astype(np.float64), 49.5, axis=0), rtol=1e-6)


def test_calibrate_accepts_lists_float16_float64_and_ints_as_their_float32_values():
    x = _sample(120, 6)
    ref = calibrate(x, "int8")
    assert calibrate(x.tolist(), "int8") == ref
    assert calibrate(x.astype(np.float64), "int8") == ref
    half = x.astype(np.float16)
    assert calibrate(half, "int8") == calibrate(half.astype(np.float32), "int8")
    ints = np.arange(24, dtype=np.int16).reshape(4, 6)
    cal = calibrate(ints, "int8")
    assert cal.lower.tolist() == list(range(6)) and cal.upper.tolist() == list(range(18, 24))
    for c in (ref, cal, calibrate(x.astype(np.float64), "ternary")):
        for name in ("lower", "upper", "center", "threshold", "magnitude"):
            assert getattr(c, name) is None or getattr(c, name).dtype == np.float32


def test_small_samples_warn_with_the_count(caplog):
    """Under 100 embeddings the ranges are noisy: say so, with the precision and the number of embeddings."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    calibrate(_sample(99, 200), "ternary")
    assert caplog.messages == ["calibrating ternary from only 99 embeddings; ranges are more stable from hundreds or more"]
    caplog.clear()
    calibrate(_sample(100, 4), "int8")  # 100 is enough, whatever the dim
    assert caplog.messages == []


def _binary_reference(x: np.ndarray, center: np.ndarray, pct: float | None = None) -> np.ndarray:
    """Mean |x - center| per dim (clipped at its p percentile per dim), accumulated exactly, as float32."""
    dist = np.abs(x - center)
    if pct is not None:
        dist = np.minimum(dist, np.percentile(dist, pct, axis=0).astype(np.float32))
    return dist.astype(np.float64).mean(axis=0).astype(np.float32)


def test_binary_calibration_centre_and_magnitude():
    """centered: the per-dim median; centered=False: 0 (sentence-transformers' sign). magnitude: mean |x - center|."""
    x = _sample(2000, 16)
    x *= np.float32(10.0) ** np.arange(-2, 2, 0.25, dtype=np.float32)  # dims of very different scales
    cal = calibrate(x, "binary")
    np.testing.assert_array_equal(cal.center, np.median(x, axis=0).astype(np.float32))
    np.testing.assert_array_equal(cal.magnitude, _binary_reference(x, cal.center))
    plain = calibrate(x, "ubinary", centered=False)
    assert plain.center.dtype == np.float32 and plain.center.tolist() == [0.0] * 16
    np.testing.assert_array_equal(plain.magnitude, _binary_reference(x, np.zeros(16, np.float32)))
    x[:20] *= 50  # outliers: the percentile method clips |x - center| per dim
    pc = calibrate(x, "binary", method="percentile", percentile=90.0)
    np.testing.assert_array_equal(pc.center, np.median(x, axis=0).astype(np.float32))
    np.testing.assert_allclose(pc.magnitude, _binary_reference(x, pc.center, 90.0), rtol=1e-6)
    assert (pc.magnitude < calibrate(x, "binary").magnitude * 0.9).all()


def _ternary_reference(x: np.ndarray, zero_fraction: float, pct: float | None = None):
    """The module docstring's definitions, in float32 as the encoder compares: median, quantile, mean beyond it."""
    center = np.median(x, axis=0).astype(np.float32)
    dist = np.abs(x - center)
    threshold = np.quantile(dist, zero_fraction, axis=0).astype(np.float32)
    clipped = dist if pct is None else np.minimum(dist, np.percentile(dist, pct, axis=0).astype(np.float32))
    magnitude = []
    for d in range(x.shape[1]):
        beyond = clipped[dist[:, d] > threshold[d], d].astype(np.float64)
        magnitude.append(beyond.mean() if beyond.size else threshold[d])
    return center, threshold, np.array(magnitude, np.float32)


@pytest.mark.parametrize(("zero_fraction", "method"), [(0.25, "minmax"), (0.0, "minmax"), (1.0 / 3.0, "percentile"), (0.5, "minmax")])
def test_ternary_calibration_follows_its_definition(zero_fraction, method):
    """The magnitude is the mean over the samples the codec encodes as non-zero, with |x - center| in float32 as it encodes.

    301 rows put the 0.25 and 0.5 quantiles exactly on a sample: a tie at the threshold, which encodes as 0.
    """
    for n in (301, 400):
        x = _sample(n, 12, seed=n)
        x[:5] *= 4
        cal = calibrate(x, "ternary", method=method, percentile=95.0, zero_fraction=zero_fraction)
        center, threshold, magnitude = _ternary_reference(x, zero_fraction, 95.0 if method == "percentile" else None)
        assert cal.zero_fraction == zero_fraction and type(cal.zero_fraction) is float
        np.testing.assert_array_equal(cal.center, center)
        np.testing.assert_array_equal(cal.threshold, threshold)
        np.testing.assert_array_equal(cal.magnitude, magnitude)
        # zero_fraction is the share of the sample that encodes as 0 (to within the samples tied at the quantile)
        zeros = (np.abs(x - cal.center) <= cal.threshold).mean(axis=0)
        assert (zeros >= zero_fraction).all() and (zeros <= zero_fraction + 2.5 / n).all()
    assert calibrate(_sample(200, 4), "ternary").zero_fraction == 1.0 / 3.0


def test_ternary_centre_is_the_median_whatever_centered_says():
    """``centered`` is a binary option; ternary always splits around the median."""
    x = _sample(300, 8)
    assert calibrate(x, "ternary", centered=False) == calibrate(x, "ternary")
    np.testing.assert_array_equal(calibrate(x, "ternary", centered=False).center, np.median(x, axis=0).astype(np.float32))


def test_ternary_degenerate_dims():
    """Where no sample lies beyond the threshold the magnitude is the threshold; one sample beyond sets it alone."""
    n = 301
    x = np.zeros((n, 4), np.float32)
    x[:, 0] = _sample(n, 1, seed=9)[:, 0] * np.linspace(0.5, 1.5, n, dtype=np.float32)
    x[:, 1] = 0.25  # constant: centre 0.25, threshold 0, magnitude 0
    x[:150, 2], x[150:300, 2] = -0.5, 0.5  # |x - 0| is 0.5 for all but one: nothing beyond the threshold 0.5
    x[:150, 3], x[150:299, 3], x[299, 3] = -0.5, 0.5, 1.5  # exactly one beyond the threshold
    cal = calibrate(x, "ternary")
    assert cal.center[1:].tolist() == [0.25, 0.0, 0.0]
    assert cal.threshold[1:].tolist() == [0.0, 0.5, 0.5]
    assert cal.magnitude[1:].tolist() == [0.0, 0.5, 1.5]
    codec = EmbeddingCodec("ternary", cal)
    decoded = codec.decode(codec.encode(x))
    assert decoded[:, 1].tolist() == [0.25] * n
    assert decoded[299, 3] == 1.5 and set(decoded[:299, 3].tolist()) == {0.0}


# --------------------------------------------------------------------------- codec


def test_codec_truncate_dim_must_be_a_positive_integer():
    for td in (0, -3, True, 8.0, "8"):
        assert _error(lambda: EmbeddingCodec("binary", truncate_dim=td)) == f"truncate_dim must be a positive integer, got {td!r}"
    codec = EmbeddingCodec("binary", truncate_dim=np.int64(8))
    assert type(codec.truncate_dim) is int and type(codec.output_dim()) is int and codec.output_dim() == 8


def test_truncate_dim_one_and_the_full_dim():
    """The ends of 1..D: one dim (each row normalises to +/-1) and all dims (plain normalisation)."""
    x = _sample(200, 16) * np.float32(3.0)
    one = EmbeddingCodec("binary", truncate_dim=1)
    assert one.output_dim() == 1
    np.testing.assert_array_equal(one.decode(one.encode(x)), np.where(x[:, :1] > 0, 1.0, -1.0))
    np.testing.assert_allclose(EmbeddingCodec("float32", truncate_dim=1).encode(x)[:, 0], np.sign(x[:, 0]))
    full = EmbeddingCodec("float32", truncate_dim=16).encode(x)
    np.testing.assert_allclose(full, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
    assert calibrate(x, "int8", truncate_dim=1).dim == 1
    assert calibrate(x, "int8", truncate_dim=16) == calibrate(truncate_normalize(x, 16), "int8")
    assert _error(lambda: EmbeddingCodec("float32", truncate_dim=17).encode(x)) == "truncate_dim=17 is not in 1..16 (the embeddings' dim)"


def test_constant_dimension_uses_a_grid_step_of_one():
    """Documented: steps is 1 where lower == upper, so values off a constant dim land on lower + k, clipped at lower."""
    x = _sample(200, 4)
    x[:, 2] = 0.25
    cal = calibrate(x, "uint8")
    probe = np.repeat(x[:1], 3, axis=0)
    probe[:, 2] = [1.25, 3.25, -0.75]
    for precision, offset in (("uint8", 0), ("int8", -128)):
        codec = EmbeddingCodec(precision, cal)
        codes = codec.encode(probe)
        assert (codes[:, 2].astype(int) - offset).tolist() == [1, 3, 0]
        assert codec.decode(codes)[:, 2].tolist() == [1.25, 3.25, 0.25]


def test_codec_refusals_name_the_problem():
    cal = calibrate(_sample(200, 8), "int8")
    assert _error(lambda: EmbeddingCodec("int8", cal.to_json())) == "calibration must be a Calibration, got dict"
    assert _error(lambda: EmbeddingCodec("binary").output_dim()) == (
        "binary codec: the vector dim is unknown (no truncate_dim, no calibration); pass dim"
    )
    assert _error(lambda: EmbeddingCodec("ubinary").bytes_per_vector()).startswith("ubinary codec: the vector dim is unknown")


def test_output_dim_truncate_dim_then_dim_then_calibration():
    cal = calibrate(_sample(200, 16), "int8")
    assert EmbeddingCodec("int8", cal, truncate_dim=8).output_dim() == 8
    assert EmbeddingCodec("int8", cal, truncate_dim=8).output_dim(16) == 8
    assert EmbeddingCodec("int8", cal).output_dim() == 16
    assert EmbeddingCodec("binary").output_dim(100) == 100
    assert EmbeddingCodec("int4", cal, truncate_dim=7).bytes_per_vector() == 4


def test_float16_range_ends_at_65504():
    """The float16 maximum itself encodes exactly; beyond it the values would become inf, so they are refused."""
    codec = EmbeddingCodec("float16")
    edge = np.array([[65504.0, -65504.0, 1.0]], np.float32)
    codes = codec.encode(edge)
    assert codes.dtype == np.float16 and codes.tolist() == [[65504.0, -65504.0, 1.0]]
    assert _error(lambda: codec.encode(np.array([[70000.0, 0.0]], np.float32))) == (
        "embeddings exceed the float16 range (max |x| 7e+04 > 65504.0)"
    )
    assert _error(lambda: codec.encode([0.0, -1e6])) == "embeddings exceed the float16 range (max |x| 1e+06 > 65504.0)"


@pytest.mark.parametrize("precision", ["float32", "float16", "int8", "int4", "ternary", "binary"])
def test_decode_one_code_gives_one_float32_vector(precision):
    x = _sample(300, 12)
    cal = calibrate(x, precision) if precision not in ("float32", "float16") else None
    codec = EmbeddingCodec(precision, cal)
    codes = codec.encode(x[:4].tolist())  # a list in, the same codes as the array
    np.testing.assert_array_equal(codes, codec.encode(x[:4]))
    many = codec.decode(codes, dim=12)
    assert many.dtype == np.float32 and many.shape == (4, 12)
    for i in range(4):
        one = codec.decode(codes[i], dim=12)
        assert one.dtype == np.float32 and one.shape == (12,)
        np.testing.assert_array_equal(one, many[i])
    assert _error(lambda: codec.decode(codes[None])) == f"codes must be [N, W] (or one [W] code), got shape {codes[None].shape}"


def test_decode_dim_must_agree_with_truncate_dim():
    codec = EmbeddingCodec("binary", truncate_dim=12)
    codes = codec.encode(_sample(5, 16))
    assert codec.decode(codes, dim=12).shape == (5, 12)
    assert _error(lambda: codec.decode(codes, dim=16)) == "dim=16 given to a codec with truncate_dim=12"


def test_multi_vectors_equal_per_document_codes_and_keep_the_dim():
    """A dim that is not a multiple of 8 survives the binary round trip when decode_multi is given it."""
    docs = [_sample(n, 100, seed=n) for n in (3, 1, 6)]
    codec = EmbeddingCodec("binary")
    codes = codec.encode_multi(docs)
    assert [c.shape for c in codes] == [(3, 13), (1, 13), (6, 13)]
    for doc, code in zip(docs, codes):
        np.testing.assert_array_equal(code, codec.encode(doc))
    decoded = codec.decode_multi(codes, dim=100)
    assert [d.shape for d in decoded] == [(3, 100), (1, 100), (6, 100)]
    for doc, dec in zip(docs, decoded):
        np.testing.assert_array_equal(dec, np.where(doc > 0, 1.0, -1.0))
    f32 = EmbeddingCodec("float32")
    assert [c.tolist() for c in f32.decode_multi(f32.encode_multi(docs))] == [d.tolist() for d in docs]
    assert _error(lambda: codec.decode_multi([codes[0], codes[1][0]])) == "multi-vector codes must be 2-D; items [1] are not"
    assert _error(lambda: codec.decode_multi([codes[0][0]] * 7)) == "multi-vector codes must be 2-D; items [0, 1, 2, 3, 4] are not"
