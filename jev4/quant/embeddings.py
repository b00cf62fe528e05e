"""Embedding-output codecs: float vectors to compact codes and back, plus a torch twin for QAT.

jina-embeddings-v4 emits L2-normalised 2048-d single vectors (Matryoshka
prefixes 128..1024 are trained too) and 128-d vectors per token. Stored as
float32 they cost 8 KiB per document; these codecs shrink them. Everything is
numpy, vectorised over rows; the same precision names as sentence-transformers'
``quantize_embeddings`` are used where the two overlap.

Precisions and their code layouts (a fixed contract: ``jev4.quant.search``
scores these bytes directly). ``N`` rows, ``D`` dims, bytes per 2048-d vector:

============  =============================  ========  ============
precision     codes                          bits/dim  bytes @2048
============  =============================  ========  ============
``float32``   float32 [N, D]                 32        8192
``float16``   float16 [N, D]                 16        4096
``int8``      int8 [N, D]                    8         2048
``uint8``     uint8 [N, D]                   8         2048
``int4``      uint8 [N, ceil(D/2)]           4         1024
``ternary``   uint8 [N, ceil(D/5)]           1.6       410
``binary``    int8 [N, ceil(D/8)]            1         256
``ubinary``   uint8 [N, ceil(D/8)]           1         256
============  =============================  ========  ============

Why these layouts:

- ``int8`` / ``uint8``: one affine grid per dimension, 256 levels from
  ``lower[d]`` to ``upper[d]``: ``steps = (upper - lower) / 255`` (1 where a
  dimension is constant), ``q = clip(round((x - lower) / steps), 0, 255)``;
  uint8 stores ``q``, int8 stores ``q - 128`` (so signed-int8 dot-product
  kernels apply). Dequantised value: ``lower + q * steps``. Values outside the
  calibrated range clip to its ends. sentence-transformers uses the same grid
  and the same ``q - 128`` offset but ``floor`` instead of ``round``: its code
  is ours or ours minus one, and its dequantised value is biased low by half a
  step on average. jev4 rounds so that the dequantised error is at most
  ``steps / 2`` and unbiased.
- ``int4``: the same grid with 16 levels (``steps = (upper - lower) / 15``),
  two dims per byte, the first dim of each pair in the HIGH nibble (the same
  big-endian order as ``np.packbits``); an odd ``D`` pads a zero low nibble.
- ``ternary``: each dim becomes -1, 0 or +1 around a per-dim ``center``:
  0 where ``|x - center| <= threshold``, else the sign. Five trits fit a
  byte (3^5 = 243 <= 256): trit ``t = sign + 1`` in {0, 1, 2}, byte
  ``= sum t_k * 3^(4-k)`` with the first dim the most significant trit;
  bytes 243..255 are invalid. A partial last byte is padded with zero
  values (trit 1), so padding contributes nothing to a dot product.
  Dequantised value: ``center + sign * magnitude``. 8/5 = 1.6 bits per dim.
- ``ubinary``: ``np.packbits(x > center, axis=-1)`` (numpy's big-endian bit
  order; ``center`` is 0 without a calibration, which is exactly
  sentence-transformers' sign quantisation). ``binary`` is the same bytes
  minus 128, as int8 (sentence-transformers' convention). Without a
  calibration a code decodes to +1/-1; with one, to
  ``center +/- magnitude``.

Calibration. ``int8``, ``uint8``, ``int4`` and ``ternary`` need per-dim
statistics computed once from a sample of embeddings (``calibrate``), never
from the batch being encoded, so that queries and documents share one grid.
``method="minmax"`` takes the sample's min and max; ``method="percentile"``
takes the ``100 - p`` and ``p`` percentiles (outliers clip). For ternary:
``center`` is the per-dim median; ``threshold`` the ``zero_fraction``
quantile of ``|x - center|`` (default 1/3, so about a third of the values
are zero: an even split of -1/0/+1 gives each trit the most entropy; the
MSE-optimal threshold of a Gaussian, about 0.61 sigma, zeroes 46%. Measured
on random isotropic 2048-d unit vectors the mean cosine to the original is
0.891 at 1/3 and 0.900 at 0.46, so tune ``zero_fraction`` on real data);
``magnitude`` the mean ``|x - center|`` of the non-zero part (the value that
minimises the squared error for that threshold), with ``|x - center|``
clipped at its ``p`` percentile under ``method="percentile"``. For binary the
calibration is optional: a per-dim median ``center`` (each bit then splits
the data in half; ``centered=False`` keeps 0) and ``magnitude`` = mean
``|x - center|``. ``int8``, ``uint8`` and ``int4`` can share one range
calibration; ``binary`` and ``ubinary`` share one too.

A calibration is stored as a small JSON file (``Calibration.save``): the
precision, method, percentile, dim and each per-dim array as a list of
numbers. Every number is a float32 value written as the shortest decimal
that reads back as the same double, so it reloads bit for bit and the codes
are identical after a reload. No pickle.

Matryoshka: ``EmbeddingCodec(truncate_dim=d)`` keeps the first ``d`` dims and
re-normalises (as upstream's ``truncate_dim`` does) BEFORE quantising. A
calibration is per dim, so one computed on wider vectors applies to the first
``d`` dims (it is sliced). Note that re-normalising scales a truncated vector
up, so ranges taken on 2048-d vectors are too narrow for it and clip more:
for best accuracy calibrate on the truncated vectors
(``calibrate(sample, precision, truncate_dim=d)``).

Multi-vectors: ``encode_multi`` / ``decode_multi`` take a list of
``[tokens_i, 128]`` arrays, encode them as one concatenated array (one
vectorised pass) and split the codes back per document.

QAT twin: ``fake_quantize`` computes, in torch, the dequantised value with
the same float32 operations in the same order as ``decode(encode(x))``, so
that quantisation-aware training sees bit-for-bit what post-training
quantisation will produce. ``ste`` wraps it in a straight-through estimator.
``batch_range`` and ``RollingRange`` give the per-batch and moving-average
ranges for ``--scaling batch`` / ``--scaling rolling``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from jev4.errors import EmbeddingQuantError

if TYPE_CHECKING:
    import torch

__all__ = [
    "PRECISIONS",
    "STE_GRADIENTS",
    "BITS_PER_DIM",
    "CALIBRATED_PRECISIONS",
    "Calibration",
    "EmbeddingCodec",
    "RollingRange",
    "batch_range",
    "bytes_per_vector",
    "calibrate",
    "calibration_tensors",
    "check_precision",
    "code_width",
    "fake_quantize",
    "pack_bits",
    "pack_int4",
    "pack_ternary",
    "ste",
    "ste_gradient_scale",
    "truncate_normalize",
    "unpack_bits",
    "unpack_int4",
    "unpack_ternary",
]

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("float32", "float16", "int8", "uint8", "int4", "ternary", "binary", "ubinary")
BITS_PER_DIM: Mapping[str, float] = {
    "float32": 32.0,
    "float16": 16.0,
    "int8": 8.0,
    "uint8": 8.0,
    "int4": 4.0,
    "ternary": 8.0 / 5.0,
    "binary": 1.0,
    "ubinary": 1.0,
}
# Grid levels of the affine (lower/upper) precisions.
_LEVELS: Mapping[str, int] = {"int8": 256, "uint8": 256, "int4": 16}
_RANGE = tuple(_LEVELS)
_BINARY = ("binary", "ubinary")
# Precisions that cannot encode without a calibration.
CALIBRATED_PRECISIONS: tuple[str, ...] = _RANGE + ("ternary",)
# Which arrays a calibration of each family carries.
_ARRAYS: Mapping[str, tuple[str, ...]] = {
    **{p: ("lower", "upper") for p in _RANGE},
    "ternary": ("center", "threshold", "magnitude"),
    **{p: ("center", "magnitude") for p in _BINARY},
}
_ALL_ARRAYS = ("lower", "upper", "center", "threshold", "magnitude")
_METHODS = ("minmax", "percentile", "rolling")  # "rolling": ranges from a RollingRange (QAT)
_TRITS = 5  # trits per byte: 3**5 = 243 <= 256
_TRIT_WEIGHTS = np.array([81, 27, 9, 3, 1], dtype=np.uint16)
_FORMAT = "jev4-embedding-calibration"
_VERSION = 1
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize, which upstream uses
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is known; otherwise raise naming the known ones."""
    if precision not in PRECISIONS:
        raise EmbeddingQuantError(f"unknown embedding precision {precision!r}; known: {', '.join(PRECISIONS)}")
    return precision


def _family(precision: str) -> str:
    """Precisions that share a calibration: int8/uint8/int4 (ranges), binary/ubinary, ternary."""
    return "range" if precision in _RANGE else "binary" if precision in _BINARY else precision


# --------------------------------------------------------------------------- packing


def code_width(precision: str, dim: int) -> int:
    """Columns of the code array for ``dim`` dims (elements of the code dtype, bytes for packed codes)."""
    check_precision(precision)
    if precision == "int4":
        return -(-dim // 2)
    if precision == "ternary":
        return -(-dim // _TRITS)
    if precision in _BINARY:
        return -(-dim // 8)
    return dim


def bytes_per_vector(precision: str, dim: int) -> int:
    """Bytes one ``dim``-d vector takes in ``precision``."""
    itemsize = {"float32": 4, "float16": 2}.get(check_precision(precision), 1)
    return code_width(precision, dim) * itemsize


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit values (uint8 0..15, [N, D]) two per byte, the first dim in the high nibble."""
    q = np.asarray(q, dtype=np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of ``pack_int4``: uint8 [N, ceil(dim/2)] -> uint8 0..15 [N, dim]."""
    packed = np.asarray(packed, dtype=np.uint8)
    both = np.stack([packed >> 4, packed & 0x0F], axis=-1)
    return both.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))[..., :dim]


def pack_ternary(signs: np.ndarray) -> np.ndarray:
    """Pack values in {-1, 0, +1} ([N, D]) five per byte, base 3, the first dim most significant.

    Padding is the trit of 0 (1), so a partial last byte decodes to zeros.
    """
    trits = (np.asarray(signs, dtype=np.int8) + 1).astype(np.uint8)
    pad = (-trits.shape[-1]) % _TRITS
    if pad:
        trits = np.concatenate([trits, np.ones(trits.shape[:-1] + (pad,), np.uint8)], axis=-1)
    groups = trits.reshape(trits.shape[:-1] + (-1, _TRITS))
    return (groups.astype(np.uint16) @ _TRIT_WEIGHTS).astype(np.uint8)


def _trit_table() -> np.ndarray:
    """[243, 5] int8: the five signs that each valid byte holds."""
    digits = (np.arange(243)[:, None] // _TRIT_WEIGHTS.astype(np.int64)[None, :]) % 3
    return (digits - 1).astype(np.int8)


def unpack_ternary(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of ``pack_ternary``: uint8 [N, ceil(dim/5)] -> int8 signs [N, dim]."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size and int(packed.max()) >= 243:
        raise EmbeddingQuantError(f"ternary codes hold byte {int(packed.max())}; valid bytes are 0..242 (5 trits each)")
    signs = _trit_table()[packed]
    return signs.reshape(packed.shape[:-1] + (_TRITS * packed.shape[-1],))[..., :dim]


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack booleans ([N, D]) eight per byte, big-endian (``np.packbits``), zero padded."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=-1)


def unpack_bits(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of ``pack_bits``: uint8 [N, ceil(dim/8)] -> bool [N, dim]."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=dim).astype(bool)


# --------------------------------------------------------------------------- calibration


def _as_array(name: str, value: Any, dim: int) -> np.ndarray:
    arr = np.array(value, dtype=np.float32)  # a private copy
    if arr.shape != (dim,):
        raise EmbeddingQuantError(f"calibration {name}: expected shape ({dim},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise EmbeddingQuantError(f"calibration {name}: has non-finite values (dims {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}...)")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Calibration:
    """Per-dim statistics, computed once from a sample, that a codec needs to encode and decode.

    Range precisions (int8, uint8, int4) carry ``lower``/``upper``; ternary
    ``center``/``threshold``/``magnitude``; binary/ubinary ``center``/``magnitude``.
    Arrays are float32 [dim], read-only; the others are None.
    """

    precision: str
    method: str
    dim: int
    percentile: float | None = None
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    center: np.ndarray | None = None
    threshold: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    zero_fraction: float | None = None  # ternary: the zero share the threshold was chosen for

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.precision not in _ARRAYS:
            raise EmbeddingQuantError(f"precision {self.precision!r} takes no calibration")
        if self.method not in _METHODS:
            raise EmbeddingQuantError(f"unknown calibration method {self.method!r}; known: {', '.join(_METHODS)}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
            raise EmbeddingQuantError(f"calibration dim must be a positive integer, got {self.dim!r}")
        object.__setattr__(self, "dim", int(self.dim))
        if self.method == "percentile":
            if self.percentile is None or not 50.0 < float(self.percentile) <= 100.0:
                raise EmbeddingQuantError(f"percentile must be in (50, 100], got {self.percentile!r}")
            object.__setattr__(self, "percentile", float(self.percentile))
        elif self.percentile is not None:
            raise EmbeddingQuantError(f"percentile={self.percentile!r} given with method {self.method!r}; it applies to method 'percentile' only")
        wanted = _ARRAYS[self.precision]
        for name in _ALL_ARRAYS:
            value = getattr(self, name)
            if name in wanted:
                if value is None:
                    raise EmbeddingQuantError(f"{self.precision} calibration needs {', '.join(wanted)}; {name} is missing")
                object.__setattr__(self, name, _as_array(name, value, self.dim))
            elif value is not None:
                raise EmbeddingQuantError(f"{self.precision} calibration takes {', '.join(wanted)}, not {name}")
        if self.precision in _RANGE and (self.upper < self.lower).any():
            bad = np.flatnonzero(self.upper < self.lower)
            raise EmbeddingQuantError(f"calibration upper < lower at dims {bad[:5].tolist()}")
        for name in ("threshold", "magnitude"):
            value = getattr(self, name)
            if value is not None and (value < 0).any():
                raise EmbeddingQuantError(f"calibration {name} must be >= 0; negative at dims {np.flatnonzero(value < 0)[:5].tolist()}")
        if self.zero_fraction is not None:
            object.__setattr__(self, "zero_fraction", float(self.zero_fraction))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Calibration):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]  # arrays: not hashable

    def truncated(self, dim: int) -> Calibration:
        """The calibration of the first ``dim`` dims (for Matryoshka-truncated vectors)."""
        if not 1 <= dim <= self.dim:
            raise EmbeddingQuantError(f"cannot slice a {self.dim}-d calibration to {dim} dims")
        if dim == self.dim:
            return self
        arrays = {name: getattr(self, name)[:dim] for name in _ARRAYS[self.precision]}
        return Calibration(self.precision, self.method, dim, self.percentile, zero_fraction=self.zero_fraction, **arrays)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; float32 values written as Python floats (exact), so it reloads bit for bit."""
        out: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "precision": self.precision,
            "method": self.method,
            "percentile": self.percentile,
            "dim": self.dim,
            "zero_fraction": self.zero_fraction,
        }
        for name in _ARRAYS[self.precision]:
            out[name] = getattr(self, name).astype(np.float64).tolist()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of ``to_json``; rejects other formats, newer versions and unknown keys."""
        if not isinstance(data, Mapping):
            raise EmbeddingQuantError(f"a calibration must be a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise EmbeddingQuantError(f"not a jev4 embedding calibration (format {data.get('format')!r}, expected {_FORMAT!r})")
        if data.get("version") != _VERSION:
            raise EmbeddingQuantError(f"calibration version {data.get('version')!r} is not supported (expected {_VERSION})")
        known = {"format", "version", "precision", "method", "percentile", "dim", "zero_fraction", *_ALL_ARRAYS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EmbeddingQuantError(f"unknown calibration key(s) {', '.join(map(repr, unknown))}")
        missing = [k for k in ("precision", "method", "dim") if k not in data]
        if missing:
            raise EmbeddingQuantError(f"calibration lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            if isinstance(e, EmbeddingQuantError):
                raise
            raise EmbeddingQuantError(f"bad calibration: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write the calibration as JSON, atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f)
                f.write("\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give the usual mode
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("wrote %s calibration (%d dims) to %s", self.precision, self.dim, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EmbeddingQuantError(f"{path}: calibration file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EmbeddingQuantError(f"{path}: cannot read calibration: {e}") from None
        try:
            return cls.from_json(data)
        except EmbeddingQuantError as e:
            raise EmbeddingQuantError(f"{path}: {e}") from None


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=-1)).tolist() if x.ndim == 2 else []
        raise EmbeddingQuantError(f"{what} has non-finite values (NaN or inf) in rows {rows[:5]}{'...' if len(rows) > 5 else ''}")


def truncate_normalize(x: np.ndarray, dim: int) -> np.ndarray:
    """Keep the first ``dim`` dims and L2-normalise each row (upstream's Matryoshka truncation)."""
    x = np.asarray(x, dtype=np.float32)[..., :dim]
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.float32(_NORM_EPS))


def _as_matrix(x: Any, what: str) -> tuple[np.ndarray, bool]:
    """float32 [N, D] (a 1-D vector becomes one row; the flag says to squeeze it back)."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.dtype in (np.int8, np.uint8):
        raise EmbeddingQuantError(f"{what} must be float embeddings, got dtype {x.dtype}")
    squeeze = x.ndim == 1
    if squeeze:
        x = x[None, :]
    if x.ndim != 2:
        raise EmbeddingQuantError(f"{what} must be [N, D] (or one [D] vector), got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    _check_finite(x, what)
    return x, squeeze


def calibrate(
    embeddings: np.ndarray,
    precision: str,
    method: str = "minmax",
    percentile: float = 99.9,
    *,
    zero_fraction: float = 1.0 / 3.0,
    centered: bool = True,
    truncate_dim: int | None = None,
) -> Calibration:
    """Per-dim statistics of a sample of embeddings [N, D] for ``precision`` (see the module docstring).

    ``method`` is ``minmax`` or ``percentile`` (``percentile`` p clips the
    range to the (100-p, p) percentiles, and ternary/binary magnitudes to the p
    percentile of ``|x - center|``). ``zero_fraction`` (ternary) is the share
    of the sample that encodes as 0. ``centered`` (binary) uses the per-dim
    median as the bit threshold instead of 0. ``truncate_dim`` calibrates on
    the truncated, re-normalised vectors a Matryoshka codec will see.
    """
    check_precision(precision)
    if precision not in _ARRAYS:
        raise EmbeddingQuantError(f"precision {precision!r} needs no calibration")
    if method not in ("minmax", "percentile"):
        raise EmbeddingQuantError(f"unknown calibration method {method!r}; known: minmax, percentile")
    x, _ = _as_matrix(embeddings, "calibration embeddings")
    if x.shape[0] < 2:
        raise EmbeddingQuantError(f"cannot calibrate {precision} from {x.shape[0]} embedding(s); give a representative sample (hundreds or more)")
    if x.shape[0] < 100:
        log.warning("calibrating %s from only %d embeddings; ranges are more stable from hundreds or more", precision, x.shape[0])
    if truncate_dim is not None:
        _check_truncate_dim(truncate_dim, x.shape[1])
        x = truncate_normalize(x, truncate_dim)
    if method == "percentile" and not 50.0 < percentile <= 100.0:
        raise EmbeddingQuantError(f"percentile must be in (50, 100], got {percentile!r}")
    pct = float(percentile) if method == "percentile" else None
    common = {"precision": precision, "method": method, "dim": x.shape[1], "percentile": pct}
    if precision in _RANGE:
        if pct is None:
            lower, upper = x.min(axis=0), x.max(axis=0)
        else:
            lower, upper = np.percentile(x, [100.0 - pct, pct], axis=0)
        return Calibration(**common, lower=lower, upper=upper)
    if precision in _BINARY or precision == "ternary":
        center = np.median(x, axis=0).astype(np.float32) if (centered or precision == "ternary") else np.zeros(x.shape[1], np.float32)
        dist = np.abs(x - center)  # float32, as the encoder computes it
        clipped = dist if pct is None else np.minimum(dist, np.percentile(dist, pct, axis=0).astype(np.float32))
        if precision in _BINARY:
            return Calibration(**common, center=center, magnitude=clipped.mean(axis=0, dtype=np.float64))
        if not 0.0 <= zero_fraction < 1.0:
            raise EmbeddingQuantError(f"zero_fraction must be in [0, 1), got {zero_fraction!r}")
        threshold = np.quantile(dist, zero_fraction, axis=0).astype(np.float32)
        nonzero = dist > threshold
        count = nonzero.sum(axis=0)
        total = np.where(nonzero, clipped, 0).sum(axis=0, dtype=np.float64)
        magnitude = np.where(count > 0, total / np.maximum(count, 1), threshold)
        return Calibration(**common, center=center, threshold=threshold, magnitude=magnitude, zero_fraction=zero_fraction)
    raise AssertionError(precision)  # pragma: no cover


def _check_truncate_dim(truncate_dim: int, dim: int) -> None:
    if not 1 <= truncate_dim <= dim:
        raise EmbeddingQuantError(f"truncate_dim={truncate_dim} is not in 1..{dim} (the embeddings' dim)")


# --------------------------------------------------------------------------- codec


def _steps(lower: np.ndarray, upper: np.ndarray, levels: int) -> np.ndarray:
    """Grid step per dim; 1 where a dim is constant (no division by zero, as sentence-transformers)."""
    steps = (upper - lower) / np.float32(levels - 1)
    return np.where(steps == 0, np.float32(1), steps).astype(np.float32)


@dataclass(frozen=True)
class EmbeddingCodec:
    """Encode float embeddings into ``precision`` codes and decode them back to float32.

    ``calibration`` is required for int8, uint8, int4 and ternary, optional for
    binary/ubinary, refused for float32/float16. ``truncate_dim`` keeps the
    first dims and re-normalises before quantising (Matryoshka).
    """

    precision: str
    calibration: Calibration | None = None
    truncate_dim: int | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.truncate_dim is not None:
            if isinstance(self.truncate_dim, bool) or not isinstance(self.truncate_dim, (int, np.integer)) or self.truncate_dim < 1:
                raise EmbeddingQuantError(f"truncate_dim must be a positive integer, got {self.truncate_dim!r}")
            object.__setattr__(self, "truncate_dim", int(self.truncate_dim))
        cal = self.calibration
        if cal is None:
            if self.precision in CALIBRATED_PRECISIONS:
                raise EmbeddingQuantError(
                    f"precision {self.precision!r} needs a calibration: calibrate(sample, {self.precision!r}) on representative embeddings"
                )
            return
        if not isinstance(cal, Calibration):
            raise EmbeddingQuantError(f"calibration must be a Calibration, got {type(cal).__name__}")
        if self.precision not in _ARRAYS:
            raise EmbeddingQuantError(f"precision {self.precision!r} takes no calibration")
        if _family(cal.precision) != _family(self.precision):
            raise EmbeddingQuantError(f"a {cal.precision} calibration does not fit precision {self.precision!r}")
        if self.truncate_dim is not None and cal.dim < self.truncate_dim:
            raise EmbeddingQuantError(f"truncate_dim={self.truncate_dim} exceeds the calibration's {cal.dim} dims")

    @property
    def bits_per_dim(self) -> float:
        return BITS_PER_DIM[self.precision]

    def output_dim(self, dim: int | None = None) -> int:
        """Dims of a decoded vector: ``truncate_dim``, else ``dim``, else the calibration's."""
        if self.truncate_dim is not None:
            return self.truncate_dim
        if dim is not None:
            return int(dim)
        if self.calibration is not None:
            return self.calibration.dim
        raise EmbeddingQuantError(f"{self.precision} codec: the vector dim is unknown (no truncate_dim, no calibration); pass dim")

    def bytes_per_vector(self, dim: int | None = None) -> int:
        """Bytes one encoded vector takes (``dim``: the input dim when the codec does not fix it)."""
        return bytes_per_vector(self.precision, self.output_dim(dim))

    def _calibration_for(self, dim: int) -> Calibration | None:
        cal = self.calibration
        if cal is None:
            return None
        if self.truncate_dim is None and cal.dim != dim:
            raise EmbeddingQuantError(f"embeddings have {dim} dims but the {cal.precision} calibration has {cal.dim}")
        return cal.truncated(dim)

    def prepare(self, x: Any) -> tuple[np.ndarray, bool]:
        """Validated float32 [N, d] input after Matryoshka truncation (and whether it was one vector)."""
        x, squeeze = _as_matrix(x, "embeddings")
        if self.truncate_dim is not None:
            _check_truncate_dim(self.truncate_dim, x.shape[1])
            x = truncate_normalize(x, self.truncate_dim)
        return x, squeeze

    def encode(self, x: Any) -> np.ndarray:
        """Codes of embeddings [N, D] (or one [D] vector); layouts in the module docstring."""
        x, squeeze = self.prepare(x)
        codes = self._encode(x, self._calibration_for(x.shape[1]))
        return codes[0] if squeeze else codes

    def _encode(self, x: np.ndarray, cal: Calibration | None) -> np.ndarray:
        p = self.precision
        if p == "float32":
            return x.copy()
        if p == "float16":
            if x.size and float(np.abs(x).max()) > _FLOAT16_MAX:
                raise EmbeddingQuantError(f"embeddings exceed the float16 range (max |x| {float(np.abs(x).max()):.4g} > {_FLOAT16_MAX})")
            return x.astype(np.float16)
        if p in _RANGE:
            steps = _steps(cal.lower, cal.upper, _LEVELS[p])
            q = np.clip(np.rint((x - cal.lower) / steps), 0, _LEVELS[p] - 1).astype(np.uint8)
            if p == "int8":
                return (q.astype(np.int16) - 128).astype(np.int8)
            return q if p == "uint8" else pack_int4(q)
        if p == "ternary":
            diff = x - cal.center
            signs = np.where(np.abs(diff) <= cal.threshold, 0, np.sign(diff)).astype(np.int8)
            return pack_ternary(signs)
        bits = pack_bits(x > (cal.center if cal is not None else np.float32(0)))
        return bits if p == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)

    def decode(self, codes: np.ndarray, dim: int | None = None) -> np.ndarray:
        """Dequantised float32 [N, d] of codes [N, W] (or one [W] code).

        ``dim`` is needed only when neither ``truncate_dim`` nor the
        calibration fixes it and the codes are packed (binary without a
        calibration defaults to 8 dims per byte, int4 to 2, ternary to 5).
        """
        codes = np.asarray(codes)
        squeeze = codes.ndim == 1
        if squeeze:
            codes = codes[None, :]
        if codes.ndim != 2:
            raise EmbeddingQuantError(f"codes must be [N, W] (or one [W] code), got shape {codes.shape}")
        expected_dtype = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "binary": np.int8}.get(self.precision, np.uint8)
        if codes.dtype != expected_dtype:
            raise EmbeddingQuantError(f"{self.precision} codes must be {np.dtype(expected_dtype).name}, got {codes.dtype}")
        width = codes.shape[1]
        if dim is not None and self.truncate_dim is not None and dim != self.truncate_dim:
            raise EmbeddingQuantError(f"dim={dim} given to a codec with truncate_dim={self.truncate_dim}")
        if dim is None and self.truncate_dim is None and self.calibration is None:
            per = {"int4": 2, "ternary": _TRITS, "binary": 8, "ubinary": 8}.get(self.precision, 1)
            dim = width * per
        d = self.output_dim(dim)
        if code_width(self.precision, d) != width:
            raise EmbeddingQuantError(
                f"{self.precision} codes have {width} columns; {d}-d vectors take {code_width(self.precision, d)}"
            )
        out = self._decode(codes, d, self._calibration_for(d))
        return out[0] if squeeze else out

    def _decode(self, codes: np.ndarray, d: int, cal: Calibration | None) -> np.ndarray:
        p = self.precision
        if p in ("float32", "float16"):
            return codes.astype(np.float32)
        if p in _RANGE:
            if p == "int4":
                q = unpack_int4(codes, d).astype(np.float32)
            else:
                q = codes.astype(np.float32) + (np.float32(128) if p == "int8" else np.float32(0))
            return cal.lower + q * _steps(cal.lower, cal.upper, _LEVELS[p])
        if p == "ternary":
            return cal.center + unpack_ternary(codes, d).astype(np.float32) * cal.magnitude
        ubytes = (codes.astype(np.int16) + 128).astype(np.uint8) if p == "binary" else codes
        signs = np.where(unpack_bits(ubytes, d), np.float32(1), np.float32(-1))
        return signs if cal is None else cal.center + signs * cal.magnitude

    def encode_multi(self, items: Sequence[Any]) -> list[np.ndarray]:
        """Codes of each multi-vector matrix [tokens_i, D], in one vectorised pass over all tokens."""
        mats = [_as_matrix(m, f"multi-vector {i}")[0] for i, m in enumerate(items)]
        if not mats:
            return []
        codes = self.encode(np.concatenate(mats, axis=0))
        return np.split(codes, np.cumsum([len(m) for m in mats])[:-1])

    def decode_multi(self, items: Sequence[np.ndarray], dim: int | None = None) -> list[np.ndarray]:
        """Inverse of ``encode_multi``: float32 [tokens_i, d] per document."""
        mats = [np.asarray(m) for m in items]
        if not mats:
            return []
        bad = [i for i, m in enumerate(mats) if m.ndim != 2]
        if bad:
            raise EmbeddingQuantError(f"multi-vector codes must be 2-D; items {bad[:5]} are not")
        out = self.decode(np.concatenate(mats, axis=0), dim=dim)
        return np.split(out, np.cumsum([len(m) for m in mats])[:-1])


# --------------------------------------------------------------------------- torch twin (QAT)


def calibration_tensors(cal: Calibration, device: Any = None, dim: int | None = None) -> dict[str, torch.Tensor]:
    """The calibration's arrays as float32 tensors, keyword arguments for ``fake_quantize``/``ste``.

    ``dim`` slices to the first dims (a Matryoshka-truncated vector).
    """
    import torch

    if dim is not None:
        cal = cal.truncated(dim)
    return {name: torch.tensor(getattr(cal, name), dtype=torch.float32, device=device) for name in _ARRAYS[cal.precision]}


def _need(precision: str, **tensors: torch.Tensor | None) -> None:
    missing = [k for k, v in tensors.items() if v is None]
    if missing:
        raise EmbeddingQuantError(f"fake_quantize {precision}: needs {', '.join(missing)} (see calibration_tensors)")


def fake_quantize(
    x: torch.Tensor,
    precision: str,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    *,
    center: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantised ``x`` [..., D]: bit for bit ``EmbeddingCodec.decode(encode(x))`` for float32 ``x``.

    Computed in float32 with the same operations in the same order as the
    numpy codec; returned in ``x``'s dtype. Not differentiable (rounding);
    use ``ste`` in training. Truncation is the caller's (slice and normalise
    first; slice the calibration with ``calibration_tensors(cal, dim=d)``).
    """
    import torch

    check_precision(precision)
    x32 = x.to(torch.float32)
    if precision == "float32":
        return x
    if precision == "float16":
        out = x32.to(torch.float16).to(torch.float32)
    elif precision in _RANGE:
        _need(precision, lower=lower, upper=upper)
        lower, upper = lower.to(x32), upper.to(x32)
        steps = (upper - lower) / torch.full_like(lower, _LEVELS[precision] - 1)
        steps = torch.where(steps == 0, torch.ones_like(steps), steps)
        q = torch.clamp(torch.round((x32 - lower) / steps), 0, _LEVELS[precision] - 1)
        out = lower + q * steps
    elif precision == "ternary":
        _need(precision, center=center, threshold=threshold, magnitude=magnitude)
        center, threshold, magnitude = center.to(x32), threshold.to(x32), magnitude.to(x32)
        diff = x32 - center
        signs = torch.where(diff.abs() <= threshold, torch.zeros_like(diff), torch.sign(diff))
        out = center + signs * magnitude
    else:
        bits = x32 > (center.to(x32) if center is not None else torch.zeros((), dtype=torch.float32, device=x32.device))
        signs = torch.where(bits, torch.ones_like(x32), -torch.ones_like(x32))
        out = signs if magnitude is None else signs * magnitude.to(x32)
        if center is not None:
            out = center.to(x32) + out
    return out.to(x.dtype)


@functools.cache
def _ste_function() -> type:
    """The autograd function, built once on first use (torch is imported lazily)."""
    import torch

    class _StraightThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:  # noqa: ARG004
            ctx.scale = scale  # computed without grad, not part of the graph
            return quantized

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            if ctx.scale is not None:
                grad = grad * ctx.scale.to(grad.dtype)
            return grad, None, None

    return _StraightThrough


STE_GRADIENTS = ("identity", "clipped", "tanh")


def ste_gradient_scale(
    x: torch.Tensor,
    precision: str,
    gradient: str,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    *,
    center: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The factor the straight-through estimator multiplies the gradient by, per element (None: 1 everywhere).

    - ``identity``: the plain STE.
    - ``clipped``: 1 inside the codec's output range, 0 beyond it: the
      derivative of ``clamp(x, lowest, highest)``, where lowest/highest are the
      extreme decoded values (``lower``/``upper`` for int8/int4,
      ``center -/+ magnitude`` for binary and ternary). A value past the
      outermost code cannot change its code by moving further. For the sign
      codecs this is the hardtanh STE of binarized networks.
    - ``tanh`` (binary, ternary): the derivative of a tanh step at each
      decision boundary, ``1 - tanh((|x - center| - t) / magnitude)^2`` with
      ``t`` = 0 (binary) or the ternary threshold: 1 at the boundary, 0.42 one
      magnitude away, 0.07 two away. The gradient goes where a value can flip
      its code, and fades where it cannot (ApproxSign-style surrogates).
    """
    import torch

    if gradient not in STE_GRADIENTS:
        raise EmbeddingQuantError(f"STE gradient {gradient!r}: choose one of {', '.join(STE_GRADIENTS)}")
    if gradient == "identity" or precision in ("float32", "float16"):
        return None
    if precision in _RANGE:
        if gradient == "tanh":
            raise EmbeddingQuantError(f"the tanh STE is for the sign codecs (binary, ternary), not {precision}")
        _need(precision, lower=lower, upper=upper)
        return ((x >= lower.to(x)) & (x <= upper.to(x))).to(x.dtype)
    if center is None or magnitude is None:
        raise EmbeddingQuantError(f"the {gradient} STE for {precision} needs the calibrated center and magnitude")
    dist = (x - center.to(x)).abs()
    magnitude = magnitude.to(x).clamp(min=torch.finfo(x.dtype).tiny)
    if gradient == "clipped":
        return (dist <= magnitude).to(x.dtype)
    boundary = threshold.to(x) if precision == "ternary" and threshold is not None else torch.zeros_like(magnitude)
    return 1.0 - torch.tanh((dist - boundary) / magnitude) ** 2


def ste(x: torch.Tensor, precision: str, *args: Any, gradient: str = "identity", **kwargs: Any) -> torch.Tensor:
    """Straight-through estimator: forward = ``fake_quantize(x, ...)``, gradient w.r.t. ``x`` = identity.

    The gradient is that of ``x + (fake_quantize(x) - x).detach()``; a custom
    autograd function is used instead of that expression so that the forward
    value is exactly ``fake_quantize(x)`` (the expression can be off by an ulp),
    keeping QAT and post-training quantisation bit-identical. ``gradient``
    ``clipped`` or ``tanh`` scale the passed gradient (``ste_gradient_scale``).
    """
    import torch

    with torch.no_grad():
        quantized = fake_quantize(x.detach(), precision, *args, **kwargs)
        scale = ste_gradient_scale(x.detach(), precision, gradient, *args, **kwargs)
    return _ste_function().apply(x, quantized, scale)


def batch_range(x: torch.Tensor, percentile: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dim (lower, upper) of a batch [..., D] in float32: min/max, or the (100-p, p) percentiles."""
    import torch

    flat = x.detach().to(torch.float32).reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        raise EmbeddingQuantError("cannot take the range of an empty batch")
    if not torch.isfinite(flat).all():
        raise EmbeddingQuantError("batch has non-finite values (NaN or inf)")
    if percentile is None:
        return flat.amin(dim=0), flat.amax(dim=0)
    if not 50.0 < percentile <= 100.0:
        raise EmbeddingQuantError(f"percentile must be in (50, 100], got {percentile!r}")
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=torch.float32, device=flat.device)
    lower, upper = torch.quantile(flat, q, dim=0)
    return lower, upper


class RollingRange:
    """Exponential moving average of per-dim min/max over training batches (QAT ``--scaling rolling``).

    ``update`` folds in one batch: ``range = momentum * range + (1 - momentum) * batch_range``
    (the first batch sets it). The state is tensors on the first batch's device.
    """

    def __init__(self, dim: int, momentum: float = 0.99, percentile: float | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise EmbeddingQuantError(f"momentum must be in [0, 1), got {momentum!r}")
        if dim < 1:
            raise EmbeddingQuantError(f"dim must be positive, got {dim!r}")
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.percentile = percentile
        self.count = 0
        self.lower: torch.Tensor | None = None
        self.upper: torch.Tensor | None = None

    def update(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in a batch [..., dim]; return the updated (lower, upper)."""
        if batch.shape[-1] != self.dim:
            raise EmbeddingQuantError(f"batch has {batch.shape[-1]} dims, the rolling range {self.dim}")
        lower, upper = batch_range(batch, self.percentile)
        if self.lower is None or self.upper is None:
            self.lower, self.upper = lower.clone(), upper.clone()
        else:
            m = self.momentum
            self.lower = self.lower.to(lower.device) * m + lower * (1.0 - m)
            self.upper = self.upper.to(upper.device) * m + upper * (1.0 - m)
        self.count += 1
        return self.lower, self.upper

    def to_json(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "momentum": self.momentum,
            "percentile": self.percentile,
            "count": self.count,
            "lower": None if self.lower is None else self.lower.detach().cpu().double().tolist(),
            "upper": None if self.upper is None else self.upper.detach().cpu().double().tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], device: Any = None) -> RollingRange:
        import torch

        try:
            state = cls(int(data["dim"]), float(data["momentum"]), data.get("percentile"))
            state.count = int(data["count"])
            if data["lower"] is not None:
                state.lower = torch.tensor(data["lower"], dtype=torch.float32, device=device)
                state.upper = torch.tensor(data["upper"], dtype=torch.float32, device=device)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, EmbeddingQuantError):
                raise
            raise EmbeddingQuantError(f"bad rolling-range state: {e!r}") from None
        if state.lower is not None and (state.lower.shape != (state.dim,) or state.upper.shape != (state.dim,)):
            raise EmbeddingQuantError(f"rolling-range state: lower/upper must have {state.dim} values")
        return state

    def to_calibration(self, precision: str = "int8") -> Calibration:
        """The current ranges as a (method ``rolling``) calibration for int8, uint8 or int4."""
        if precision not in _RANGE:
            raise EmbeddingQuantError(f"a rolling range calibrates {', '.join(_RANGE)}, not {precision!r}")
        if self.lower is None or self.upper is None:
            raise EmbeddingQuantError("the rolling range has seen no batch yet")
        lower = self.lower.detach().cpu().numpy().astype(np.float32)
        upper = np.maximum(self.upper.detach().cpu().numpy().astype(np.float32), lower)
        return Calibration(precision, "rolling", self.dim, lower=lower, upper=upper)
