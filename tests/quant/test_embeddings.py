"""Embedding codecs: layouts against slow references, error bounds, calibration files, Matryoshka, ST, torch twin."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jev4.errors import EmbeddingQuantError, Jev4Error
from jev4.quant.embeddings import (
    CALIBRATED_PRECISIONS,
    PRECISIONS,
    Calibration,
    EmbeddingCodec,
    RollingRange,
    batch_range,
    bytes_per_vector,
    calibrate,
    calibration_tensors,
    fake_quantize,
    pack_bits,
    pack_int4,
    pack_ternary,
    ste,
    truncate_normalize,
    unpack_bits,
    unpack_int4,
    unpack_ternary,
)

CALIBRATABLE = ("int8", "uint8", "int4", "ternary", "binary", "ubinary")
LEVELS = {"int8": 256, "uint8": 256, "int4": 16}


def _embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors with per-dim offsets and scales (like real embeddings: anisotropic, not centred)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)) * rng.uniform(0.3, 2.0, dim) + rng.normal(0, 0.5, dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _codec(precision: str, x: np.ndarray, **kw) -> EmbeddingCodec:
    cal = calibrate(x, precision, **kw) if precision in CALIBRATED_PRECISIONS else None
    return EmbeddingCodec(precision, cal)


# --------------------------------------------------------------------------- slow pure-Python reference


def _ref_value(v: np.float32, d: int, precision: str, cal: Calibration | None) -> int:
    """One dim's integer code: grid index, ternary sign, or bit; float32 scalar arithmetic, one value at a time."""
    if precision in LEVELS:
        lo, hi = np.float32(cal.lower[d]), np.float32(cal.upper[d])
        step = (hi - lo) / np.float32(LEVELS[precision] - 1)
        if step == 0:
            step = np.float32(1)
        return min(max(round(float((v - lo) / step)), 0), LEVELS[precision] - 1)
    if precision == "ternary":
        diff = v - np.float32(cal.center[d])
        return 0 if abs(diff) <= np.float32(cal.threshold[d]) else (1 if diff > 0 else -1)
    center = np.float32(0) if cal is None else np.float32(cal.center[d])
    return int(v > center)


def _ref_encode(x: np.ndarray, precision: str, cal: Calibration | None) -> np.ndarray:
    out = []
    for row in x:
        vals = [_ref_value(np.float32(v), d, precision, cal) for d, v in enumerate(row)]
        if precision == "uint8":
            out.append(vals)
        elif precision == "int8":
            out.append([q - 128 for q in vals])
        elif precision == "int4":
            vals = vals + [0] * (len(vals) % 2)
            out.append([vals[i] * 16 + vals[i + 1] for i in range(0, len(vals), 2)])
        elif precision == "ternary":
            trits = [s + 1 for s in vals] + [1] * (-len(vals) % 5)
            out.append([sum(trits[i + k] * 3 ** (4 - k) for k in range(5)) for i in range(0, len(trits), 5)])
        else:
            bits = vals + [0] * (-len(vals) % 8)
            packed = [sum(bits[i + k] << (7 - k) for k in range(8)) for i in range(0, len(bits), 8)]
            out.append(packed if precision == "ubinary" else [b - 128 for b in packed])
    dtype = np.int8 if precision in ("int8", "binary") else np.uint8
    return np.array(out, dtype=dtype).reshape(len(x), -1)


@pytest.mark.parametrize("dim", [1, 2, 5, 7, 8, 9, 13, 16])
@pytest.mark.parametrize("precision", CALIBRATABLE)
def test_codes_equal_slow_reference(precision, dim):
    x = _embeddings(300, dim, seed=dim)
    cal = calibrate(x, precision)
    probe = np.concatenate([x[:5], 1.5 * x[5:7], [cal.lower if cal.lower is not None else cal.center]]).astype(np.float32)
    codes = EmbeddingCodec(precision, cal).encode(probe)
    np.testing.assert_array_equal(codes, _ref_encode(probe, precision, cal))
    if precision in ("binary", "ubinary"):  # and without a calibration: sign at 0
        np.testing.assert_array_equal(EmbeddingCodec(precision).encode(probe), _ref_encode(probe, precision, None))


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17])
def test_packing_round_trips_exactly(dim):
    rng = np.random.default_rng(dim)
    nibbles = rng.integers(0, 16, (4, dim), dtype=np.uint8)
    signs = rng.integers(-1, 2, (4, dim)).astype(np.int8)
    bits = rng.random((4, dim)) > 0.5
    assert pack_int4(nibbles).shape == (4, -(-dim // 2))
    assert pack_ternary(signs).shape == (4, -(-dim // 5))
    assert pack_bits(bits).shape == (4, -(-dim // 8))
    np.testing.assert_array_equal(unpack_int4(pack_int4(nibbles), dim), nibbles)
    np.testing.assert_array_equal(unpack_ternary(pack_ternary(signs), dim), signs)
    np.testing.assert_array_equal(unpack_bits(pack_bits(bits), dim), bits)
    # Padding is neutral: a zero nibble, the trit of 0, a zero bit.
    if dim % 2:
        assert (pack_int4(nibbles)[:, -1] & 0x0F == 0).all()
    if dim % 5:
        assert (unpack_ternary(pack_ternary(signs), 5 * -(-dim // 5))[:, dim:] == 0).all()


def test_int4_high_nibble_first_and_ternary_first_trit_most_significant():
    assert pack_int4(np.array([[0xA, 0x3, 0x7]], np.uint8)).tolist() == [[0xA3, 0x70]]
    # signs (+1, -1, 0, 0, +1) -> trits (2, 0, 1, 1, 2) -> 2*81 + 0 + 9 + 3 + 2
    assert pack_ternary(np.array([[1, -1, 0, 0, 1]], np.int8)).tolist() == [[176]]


# --------------------------------------------------------------------------- round-trip error bounds


@pytest.mark.parametrize("precision", ["int8", "uint8", "int4"])
def test_range_codecs_error_at_most_half_a_step(precision):
    x = _embeddings(2000, 64)
    codec = _codec(precision, x)
    cal = codec.calibration
    steps = (cal.upper - cal.lower) / np.float32(LEVELS[precision] - 1)
    err = np.abs(codec.decode(codec.encode(x)) - x)
    assert (err <= steps / 2 * (1 + 1e-5) + 1e-7).all()
    assert err.max() > steps.min() / 4  # the bound is tight, not vacuous
    # Out of range: values clip to the calibrated ends.
    far = np.concatenate([cal.upper[None] + 1.0, cal.lower[None] - 1.0]).astype(np.float32)
    np.testing.assert_allclose(codec.decode(codec.encode(far)), np.stack([cal.upper, cal.lower]), atol=1e-6)


def test_constant_dimension_does_not_divide_by_zero():
    x = _embeddings(200, 8)
    x[:, 3] = 0.25
    codec = _codec("int8", x)
    np.testing.assert_array_equal(codec.decode(codec.encode(x))[:, 3], np.full(200, 0.25, np.float32))


def test_float16_relative_error():
    x = _embeddings(500, 256)
    codec = EmbeddingCodec("float16")
    codes = codec.encode(x)
    assert codes.dtype == np.float16
    err = np.abs(codec.decode(codes) - x)
    assert (err <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)).all()
    np.testing.assert_array_equal(EmbeddingCodec("float32").decode(EmbeddingCodec("float32").encode(x)), x)


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_binary_signs_exact(precision):
    x = _embeddings(500, 100)
    x[0, :10] = 0.0  # exactly 0 is a 0 bit (x > 0), as sentence-transformers
    plain = EmbeddingCodec(precision)
    np.testing.assert_array_equal(plain.decode(plain.encode(x), dim=100), np.where(x > 0, 1.0, -1.0))
    cal = calibrate(x, precision)
    centred = EmbeddingCodec(precision, cal)
    got = centred.decode(centred.encode(x))
    np.testing.assert_array_equal(got, cal.center + np.where(x > cal.center, 1.0, -1.0).astype(np.float32) * cal.magnitude)
    # A median centre splits every dim in half.
    np.testing.assert_allclose((x > cal.center).mean(axis=0), 0.5, atol=0.01)
    assert np.abs(got - x).mean() < np.abs(plain.decode(plain.encode(x), dim=100) - x).mean()


def test_ternary_pattern_and_calibration():
    x = _embeddings(3000, 48)
    cal = calibrate(x, "ternary")
    codec = EmbeddingCodec("ternary", cal)
    got = codec.decode(codec.encode(x))
    diff = x - cal.center
    signs = np.where(np.abs(diff) <= cal.threshold, 0, np.sign(diff))
    np.testing.assert_array_equal(got, cal.center + signs.astype(np.float32) * cal.magnitude)
    np.testing.assert_array_equal(np.sign(got - cal.center), signs)
    # About a third of the calibration sample is zero in every dim.
    np.testing.assert_allclose((signs == 0).mean(axis=0), 1 / 3, atol=2 / 3000)
    for d in range(48):  # magnitude: mean |x - center| of the non-zero part
        a = np.abs(diff[:, d])
        np.testing.assert_allclose(cal.magnitude[d], a[a > cal.threshold[d]].mean(), rtol=1e-6)
    # Dequantised ternary beats binary sign codes on squared error.
    binary = _codec("binary", x)
    assert ((got - x) ** 2).mean() < ((binary.decode(binary.encode(x)) - x) ** 2).mean()


def test_percentile_calibration_clips_outliers():
    x = _embeddings(5000, 16)
    x[0] = 5.0
    mm, pc = calibrate(x, "int8"), calibrate(x, "int8", method="percentile", percentile=99.0)
    np.testing.assert_array_equal(mm.upper, np.full(16, 5.0, np.float32))
    np.testing.assert_allclose(pc.upper, np.percentile(x, 99.0, axis=0), rtol=1e-6)
    np.testing.assert_allclose(pc.lower, np.percentile(x, 1.0, axis=0), rtol=1e-6)
    assert pc.method == "percentile" and pc.percentile == 99.0
    err = lambda cal: np.abs(EmbeddingCodec("int8", cal).decode(EmbeddingCodec("int8", cal).encode(x[1:])) - x[1:]).mean()
    assert err(pc) < err(mm) / 2


def test_bytes_per_vector_and_code_shapes():
    expected_2048 = {"float32": 8192, "float16": 4096, "int8": 2048, "uint8": 2048, "int4": 1024, "ternary": 410, "binary": 256, "ubinary": 256}
    assert {p: bytes_per_vector(p, 2048) for p in PRECISIONS} == expected_2048
    assert {p: bytes_per_vector(p, 128) for p in PRECISIONS} == {
        "float32": 512, "float16": 256, "int8": 128, "uint8": 128, "int4": 64, "ternary": 26, "binary": 16, "ubinary": 16,
    }
    x = _embeddings(300, 2048)
    for p in PRECISIONS:
        codec = _codec(p, x)
        codes = codec.encode(x[:7])
        assert codes.nbytes == 7 * codec.bytes_per_vector(2048) == 7 * expected_2048[p]
        assert codec.decode(codes).shape == (7, 2048)
        np.testing.assert_array_equal(codec.encode(x[3]), codes[3])  # one vector in, one code out


# --------------------------------------------------------------------------- calibration files


@pytest.mark.parametrize("method", ["minmax", "percentile"])
@pytest.mark.parametrize("precision", CALIBRATABLE)
def test_calibration_save_load_gives_identical_codes(tmp_path, precision, method):
    x = _embeddings(1000, 40)
    cal = calibrate(x, precision, method=method, percentile=99.5)
    path = cal.save(tmp_path / "sub" / "cal.json")
    data = json.loads(path.read_text())  # plain JSON, no pickle
    assert data["precision"] == precision and data["dim"] == 40 and data["method"] == method
    loaded = Calibration.load(path)
    assert loaded == cal
    for name in ("lower", "upper", "center", "threshold", "magnitude"):
        a, b = getattr(cal, name), getattr(loaded, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert b.dtype == np.float32
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # bit for bit
    probe = np.concatenate([x, 1.3 * x[:50]])
    np.testing.assert_array_equal(EmbeddingCodec(precision, loaded).encode(probe), EmbeddingCodec(precision, cal).encode(probe))
    np.testing.assert_array_equal(
        EmbeddingCodec(precision, loaded).decode(EmbeddingCodec(precision, cal).encode(probe)),
        EmbeddingCodec(precision, cal).decode(EmbeddingCodec(precision, cal).encode(probe)),
    )


def test_calibration_arrays_are_read_only():
    cal = calibrate(_embeddings(100, 8), "int8")
    with pytest.raises(ValueError):
        cal.lower[0] = 1.0


# --------------------------------------------------------------------------- Matryoshka


@pytest.mark.parametrize("precision", PRECISIONS)
def test_matryoshka_truncation_composes_with_every_codec(precision):
    x = _embeddings(500, 512, seed=1)
    full = calibrate(x, precision) if precision in CALIBRATED_PRECISIONS + ("binary", "ubinary") else None
    for d in (128, 256):
        codec = EmbeddingCodec(precision, full, truncate_dim=d)
        manual = x[:, :d] / np.linalg.norm(x[:, :d], axis=1, keepdims=True)
        np.testing.assert_allclose(np.linalg.norm(truncate_normalize(x, d), axis=1), 1.0, rtol=1e-6)
        sliced = EmbeddingCodec(precision, full.truncated(d) if full is not None else None)
        codes = codec.encode(x)
        np.testing.assert_array_equal(codes, sliced.encode(manual))
        assert codes.nbytes == len(x) * codec.bytes_per_vector() == len(x) * bytes_per_vector(precision, d)
        decoded = codec.decode(codes)
        assert decoded.shape == (len(x), d)
        np.testing.assert_array_equal(decoded, sliced.decode(codes))
        if full is not None:  # a calibration taken on the truncated vectors has d dims and fits too
            own = calibrate(x, precision, truncate_dim=d)
            assert own.dim == d and own == calibrate(manual, precision)
            np.testing.assert_array_equal(EmbeddingCodec(precision, own, truncate_dim=d).encode(x), EmbeddingCodec(precision, own).encode(manual))


# --------------------------------------------------------------------------- multi-vectors


@pytest.mark.parametrize("precision", PRECISIONS)
def test_multi_vector_helpers(precision):
    docs = [_embeddings(n, 128, seed=n) for n in (5, 0, 17, 1)]
    codec = _codec(precision, np.concatenate(docs + [_embeddings(300, 128)]))
    codes = codec.encode_multi(docs)
    assert [len(c) for c in codes] == [5, 0, 17, 1]
    for doc, code in zip(docs, codes):
        if len(doc):
            np.testing.assert_array_equal(code, codec.encode(doc))
    decoded = codec.decode_multi(codes)
    assert [d.shape for d in decoded] == [(n, 128) for n in (5, 0, 17, 1)]
    for doc, code, dec in zip(docs, codes, decoded):
        if len(doc):
            np.testing.assert_array_equal(dec, codec.decode(code))
    assert codec.encode_multi([]) == [] and codes[1].shape[0] == 0 and decoded[1].dtype == decoded[0].dtype


# --------------------------------------------------------------------------- sentence-transformers


def _st_quantize():
    pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.util.quantization import quantize_embeddings
    except ImportError:  # older layout
        from sentence_transformers.quantization import quantize_embeddings
    return quantize_embeddings


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_int8_matches_sentence_transformers_given_the_same_ranges(precision):
    quantize_embeddings = _st_quantize()
    x = _embeddings(1000, 64)
    cal = calibrate(x, precision)
    ranges = np.vstack([cal.lower, cal.upper])
    steps = (cal.upper - cal.lower) / np.float32(255)
    # Away from the rounding boundary (fraction in [0.1, 0.4] of a step) floor and round agree...
    rng = np.random.default_rng(2)
    k = rng.integers(0, 255, (500, 64))
    probe = (cal.lower + (k + rng.uniform(0.1, 0.4, (500, 64))) * steps).astype(np.float32)
    probe = np.concatenate([probe, x[:1] + 1.0, x[:1] - 1.0])  # and they clip the same way
    ours = EmbeddingCodec(precision, cal).encode(probe)
    np.testing.assert_array_equal(ours, quantize_embeddings(probe, precision, ranges=ranges))
    # ...elsewhere sentence-transformers floors and jev4 rounds: its code is ours or ours - 1.
    theirs = quantize_embeddings(x, precision, ranges=ranges)
    diff = EmbeddingCodec(precision, cal).encode(x).astype(int) - theirs.astype(int)
    assert set(np.unique(diff)) == {0, 1}


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_binary_matches_sentence_transformers(precision):
    quantize_embeddings = _st_quantize()
    x = _embeddings(400, 100)
    x[:3, :20] = 0.0
    codec = EmbeddingCodec(precision)
    np.testing.assert_array_equal(codec.encode(x), quantize_embeddings(x, precision))
    docs = [x[:7], x[7:30]]
    for ours, theirs in zip(codec.encode_multi(docs), quantize_embeddings(docs, precision)):
        np.testing.assert_array_equal(ours, theirs)


# --------------------------------------------------------------------------- torch twin


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fake_quantize_equals_numpy_decode_encode(precision):
    x = _embeddings(2000, 96, seed=3)
    cal = calibrate(x, precision) if precision in CALIBRATED_PRECISIONS + ("binary", "ubinary") else None
    extra = [1.7 * x[:200], -x[:200]]
    if cal is not None:  # exactly on the grid ends, the centre and the ternary threshold
        for name in ("lower", "upper", "center"):
            if getattr(cal, name) is not None:
                extra.append(getattr(cal, name)[None])
        if cal.threshold is not None:
            extra += [(cal.center + cal.threshold)[None], (cal.center - cal.threshold)[None]]
    probe = np.concatenate([x] + extra).astype(np.float32)
    codecs = [EmbeddingCodec(precision, cal)] + ([EmbeddingCodec(precision)] if precision in ("binary", "ubinary") else [])
    for codec in codecs:
        kwargs = calibration_tensors(codec.calibration) if codec.calibration is not None else {}
        want = torch.from_numpy(codec.decode(codec.encode(probe), dim=96))
        got = fake_quantize(torch.from_numpy(probe), precision, **kwargs)
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
        # And with the straight-through estimator: same forward, identity gradient.
        xt = torch.from_numpy(probe).requires_grad_(True)
        y = ste(xt, precision, **kwargs)
        assert torch.equal(y.detach(), want)
        y.sum().backward()
        assert torch.equal(xt.grad, torch.ones_like(xt))


def test_clipped_ste_passes_gradient_only_inside_the_codec_range():
    x = torch.tensor([[-3.0, -0.5, 0.2, 0.9, 2.5]])
    center, magnitude = torch.zeros(5), torch.ones(5)
    for precision, kwargs in (("binary", {"center": center, "magnitude": magnitude}),
                              ("ternary", {"center": center, "threshold": torch.full((5,), 0.3), "magnitude": magnitude})):
        xt = x.clone().requires_grad_(True)
        y = ste(xt, precision, gradient="clipped", **kwargs)
        assert torch.equal(y.detach(), fake_quantize(x, precision, **kwargs))  # forward unchanged by clipping
        (y * torch.arange(1.0, 6.0)).sum().backward()
        assert xt.grad.tolist() == [[0.0, 2.0, 3.0, 4.0, 0.0]]  # |x - center| > magnitude: no gradient
    lower, upper = torch.full((5,), -1.0), torch.full((5,), 1.0)
    xt = x.clone().requires_grad_(True)
    ste(xt, "int4", lower, upper, gradient="clipped").sum().backward()
    assert xt.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]
    with pytest.raises(EmbeddingQuantError, match="center and magnitude"):
        ste(x, "binary", gradient="clipped")
    with pytest.raises(EmbeddingQuantError, match="sign codecs"):
        ste(x, "int4", lower, upper, gradient="tanh")
    with pytest.raises(EmbeddingQuantError, match="choose one of"):
        ste(x, "binary", gradient="soft", center=center, magnitude=magnitude)


def test_tanh_ste_peaks_at_each_decision_boundary():
    x = torch.tensor([[0.0, 0.5, 1.0, 2.0, -1.0]])
    center, magnitude = torch.zeros(5), torch.ones(5)
    xt = x.clone().requires_grad_(True)
    y = ste(xt, "binary", gradient="tanh", center=center, magnitude=magnitude)
    assert torch.equal(y.detach(), fake_quantize(x, "binary", center=center, magnitude=magnitude))
    y.sum().backward()
    expected = 1 - torch.tanh(x.abs()) ** 2  # binary's boundary is the centre
    torch.testing.assert_close(xt.grad, expected)
    assert xt.grad[0, 0] == 1.0 and xt.grad[0, 2] == xt.grad[0, 4]
    xt.grad = None
    ste(xt, "ternary", gradient="tanh", center=center, threshold=torch.full((5,), 0.5), magnitude=magnitude).sum().backward()
    torch.testing.assert_close(xt.grad, 1 - torch.tanh(x.abs() - 0.5) ** 2)  # ternary's boundaries: centre +/- threshold
    assert xt.grad[0, 1] == 1.0


def test_fake_quantize_shares_range_calibration_and_keeps_dtype():
    x = _embeddings(500, 32)
    cal = calibrate(x, "int8")
    codec = EmbeddingCodec("int4", cal)  # one range calibration serves int8, uint8 and int4
    got = fake_quantize(torch.from_numpy(x), "int4", **calibration_tensors(cal))
    assert torch.equal(got, torch.from_numpy(codec.decode(codec.encode(x))))
    assert fake_quantize(torch.from_numpy(x).to(torch.bfloat16), "int4", **calibration_tensors(cal)).dtype == torch.bfloat16
    sliced = calibration_tensors(cal, dim=16)
    assert sliced["lower"].shape == (16,)
    q16 = fake_quantize(torch.from_numpy(truncate_normalize(x, 16)), "int8", **sliced)
    assert torch.equal(q16, torch.from_numpy(EmbeddingCodec("int8", cal, truncate_dim=16).decode(EmbeddingCodec("int8", cal, truncate_dim=16).encode(x))))


def test_batch_range_and_rolling_range():
    rng = np.random.default_rng(4)
    b1 = torch.from_numpy(rng.standard_normal((4, 6, 8)).astype(np.float32))
    b2 = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32) * 2)
    lo, hi = batch_range(b1)
    assert torch.equal(lo, b1.reshape(-1, 8).amin(0)) and torch.equal(hi, b1.reshape(-1, 8).amax(0))
    plo, phi = batch_range(b1, percentile=90.0)
    np.testing.assert_allclose(phi.numpy(), np.percentile(b1.reshape(-1, 8).numpy(), 90.0, axis=0), rtol=1e-5)
    np.testing.assert_allclose(plo.numpy(), np.percentile(b1.reshape(-1, 8).numpy(), 10.0, axis=0), rtol=1e-5)

    rolling = RollingRange(8, momentum=0.9)
    rolling.update(b1)
    assert torch.equal(rolling.lower, lo) and torch.equal(rolling.upper, hi)
    rolling.update(b2)
    torch.testing.assert_close(rolling.lower, 0.9 * lo + 0.1 * b2.amin(0))
    torch.testing.assert_close(rolling.upper, 0.9 * hi + 0.1 * b2.amax(0))
    state = json.loads(json.dumps(rolling.to_json()))
    again = RollingRange.from_json(state)
    assert again.count == 2 and torch.equal(again.lower, rolling.lower) and torch.equal(again.upper, rolling.upper)
    cal = rolling.to_calibration("int8")
    assert cal.method == "rolling" and cal.dim == 8
    np.testing.assert_array_equal(cal.lower, rolling.lower.numpy())
    # QAT with a rolling range and PTQ with its calibration agree exactly.
    probe = b2.numpy()
    codec = EmbeddingCodec("int8", cal)
    assert torch.equal(fake_quantize(b2, "int8", rolling.lower, rolling.upper), torch.from_numpy(codec.decode(codec.encode(probe))))
    with pytest.raises(EmbeddingQuantError, match="dims"):
        rolling.update(torch.zeros(3, 7))


# --------------------------------------------------------------------------- errors


def test_errors_are_clear_jev4_errors(tmp_path):
    x = _embeddings(200, 16)
    assert issubclass(EmbeddingQuantError, Jev4Error)
    with pytest.raises(EmbeddingQuantError, match="unknown embedding precision 'int3'.*int8.*ternary.*ubinary"):
        EmbeddingCodec("int3")
    with pytest.raises(EmbeddingQuantError, match="unknown embedding precision"):
        calibrate(x, "fp8")
    with pytest.raises(EmbeddingQuantError, match="unknown embedding precision"):
        fake_quantize(torch.zeros(2, 2), "int2")
    for p in CALIBRATED_PRECISIONS:
        with pytest.raises(EmbeddingQuantError, match=f"{p}.*needs a calibration"):
            EmbeddingCodec(p)
    with pytest.raises(EmbeddingQuantError, match="needs lower, upper"):
        fake_quantize(torch.zeros(2, 2), "int8")
    with pytest.raises(EmbeddingQuantError, match="20 dims but the int8 calibration has 16"):
        EmbeddingCodec("int8", calibrate(x, "int8")).encode(_embeddings(3, 20))
    with pytest.raises(EmbeddingQuantError, match="does not fit"):
        EmbeddingCodec("ternary", calibrate(x, "int8"))
    with pytest.raises(EmbeddingQuantError, match="takes no calibration"):
        EmbeddingCodec("float16", calibrate(x, "int8"))
    with pytest.raises(EmbeddingQuantError, match="truncate_dim=32 exceeds"):
        EmbeddingCodec("int8", calibrate(x, "int8"), truncate_dim=32)
    with pytest.raises(EmbeddingQuantError, match="truncate_dim=32 is not in 1..16"):
        EmbeddingCodec("binary", truncate_dim=32).encode(x)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(EmbeddingQuantError, match=r"non-finite.*rows \[3\]"):
        EmbeddingCodec("float16").encode(bad)
    bad[3, 2] = np.inf
    with pytest.raises(EmbeddingQuantError, match="non-finite"):
        calibrate(bad, "int8")
    with pytest.raises(EmbeddingQuantError, match="from 1 embedding"):
        calibrate(x[:1], "int8")
    with pytest.raises(EmbeddingQuantError, match="must be float"):
        EmbeddingCodec("binary").encode(x.astype(np.int8))
    int8 = EmbeddingCodec("int8", calibrate(x, "int8"))
    with pytest.raises(EmbeddingQuantError, match="must be int8"):
        int8.decode(np.zeros((2, 16), np.uint8))
    with pytest.raises(EmbeddingQuantError, match="8 columns; 16-d vectors take 16"):
        int8.decode(np.zeros((2, 8), np.int8))
    with pytest.raises(EmbeddingQuantError, match="valid bytes are 0..242"):
        EmbeddingCodec("ternary", calibrate(x, "ternary")).decode(np.full((1, 4), 250, np.uint8))
    with pytest.raises(EmbeddingQuantError, match="not found"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EmbeddingQuantError, match="bad.json: cannot read"):
        Calibration.load(tmp_path / "bad.json")
    data = calibrate(x, "int8").to_json()
    data["lower"] = data["lower"][:3]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(EmbeddingQuantError, match=r"short.json: calibration lower: expected shape \(16,\)"):
        Calibration.load(tmp_path / "short.json")
