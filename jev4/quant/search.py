"""Exact search over quantized embeddings: scoring, top-k, binary-then-rescore, and MaxSim.

Everything works straight on the packed code layouts that ``jev4.quant.embeddings``
writes (see :class:`Codes`), in chunks of documents, so that memory stays
bounded for a million 2048-d vectors and no float copy of the corpus is made.

Scores are similarities (higher is better):

* float query against any codes ("asymmetric"): the inner product of the
  float query with the *decoded* documents. Every layout decodes per
  dimension as ``x_d = shift_d + scale_d * v_d``, with ``v`` the code's value
  (the int8/uint8 code, the int4 nibble, the trit -1/0/+1, the sign -1/+1),
  ``scale = steps`` and ``shift = lower`` (+ ``128 * steps`` for int8) for the
  range codes, ``magnitude``/``center`` for calibrated ternary and binary.
  That decode is folded into the query, ``q . x = (q * scale) . v + q .
  shift``, so the codes are scored as they are, without a float copy.
* codes against codes of the same kind ("symmetric"): the exact integer inner
  product of the raw codes, accumulated without rounding (int8 x int8 as in
  sentence-transformers' uint8/int8 indexes), and for binary codes the inner
  product of the +-1 sign vectors, ``dim - 2 * hamming``, from popcounts.

Ties are broken by the lower document index, so results are deterministic.
faiss is optional (``pip install faiss-cpu``): ``backend="faiss"`` uses it for
float32 inner products and Hamming distances; numpy is always there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from jev4.errors import Jev4Error, MissingDependencyError

log = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "Codes",
    "SearchError",
    "SearchResult",
    "TokenCorpus",
    "hamming_distances",
    "maxsim",
    "scores",
    "search",
    "search_rescored",
]

Precision = Literal["float32", "float16", "int8", "uint8", "int4", "ternary", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "float16", "int8", "uint8", "int4", "ternary", "binary", "ubinary")
Backend = Literal["numpy", "faiss"]

_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int8": np.int8,
    "uint8": np.uint8,
    "int4": np.uint8,
    "ternary": np.uint8,
    "binary": np.int8,
    "ubinary": np.uint8,
}
# Values per stored element along the last axis.
_PER_ELEMENT = {"float32": 1, "float16": 1, "int8": 1, "uint8": 1, "int4": 2, "ternary": 5, "binary": 8, "ubinary": 8}
# Range codes: the raw values of the lowest and highest code (lower and upper of the grid).
_RANGE_VALUES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (0, 15)}
# A row whose every value is -1 / +1 (decoder probes): bytes of packed codes.
_PROBE_BYTES = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (0x00, 0xFF),
    "ternary": (0, 242),  # 00000 and 22222 in base 3
    "binary": (-128, 127),  # ubinary 0x00 and 0xFF, minus 128
    "ubinary": (0x00, 0xFF),
}
_PROBE_VALUES = {**_RANGE_VALUES, "ternary": (-1, 1), "binary": (-1, 1), "ubinary": (-1, 1)}
# Largest |value| of an unpacked code, for exact integer products in float32.
_MAX_ABS = {"int8": 128, "uint8": 255, "int4": 15, "ternary": 1, "binary": 1, "ubinary": 1}
# Temporaries per chunk; a chunk is sized so its scratch arrays stay near this.
_CHUNK_BYTES = 64 * 2**20
# float32 holds every integer up to 2**24 exactly.
_F32_EXACT = 2**24

_TERNARY_LUT = ((np.arange(256)[:, None] // 3 ** np.arange(4, -1, -1)[None, :]) % 3 - 1).astype(np.int8)  # row b: the 5 trits (-1, 0, 1) of byte b, most significant first
_POPCOUNT_LUT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class SearchError(Jev4Error, ValueError):
    """Bad input to a search: codes that do not match their precision, mismatched dims, k < 1..."""


@dataclass(frozen=True)
class Codes:
    """A matrix of ``N`` encoded vectors of ``dim`` dimensions in one of the codec layouts.

    Layouts (the contract with ``jev4.quant.embeddings``):

    * float32 / float16: ``[N, dim]`` floats.
    * int8: ``[N, dim]`` int8, decode ``lower + (c + 128) * steps``; uint8: ``lower + c * steps``.
    * int4: ``[N, ceil(dim/2)]`` uint8, two 4-bit codes per byte, the first dim in
      the high nibble; decode ``lower + c * steps``.
    * ternary: ``[N, ceil(dim/5)]`` uint8, five base-3 digits per byte (0, 1, 2
      mean -1, 0, +1), the first dim the most significant digit.
    * ubinary: ``np.packbits(x > 0, axis=-1)``, ``[N, ceil(dim/8)]`` uint8, big-endian bits;
      binary: the same bytes minus 128, as int8.

    ``scale`` and ``shift`` (float, ``[dim]``) give the decode ``x = shift +
    scale * v`` of a code value ``v`` (module docstring). They are needed to
    score int8, uint8 and int4 documents against float queries; without them
    ternary and binary decode to plain -1/0/+1. :meth:`affine` builds them
    from a grid's ``lower``/``upper``, :meth:`from_decoder` from a codec.
    Symmetric (codes x codes) scores use the raw values and ignore them.
    """

    precision: str
    data: np.ndarray
    dim: int
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SearchError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        data = self.data
        if not isinstance(data, np.ndarray) or data.ndim != 2:
            raise SearchError(f"{self.precision} codes: expected a 2-D array [N, width], got {getattr(data, 'shape', type(data).__name__)}")
        if data.dtype != _DTYPES[self.precision]:
            raise SearchError(f"{self.precision} codes: expected dtype {np.dtype(_DTYPES[self.precision])}, got {data.dtype}")
        if self.dim < 1:
            raise SearchError(f"{self.precision} codes: dim must be >= 1, got {self.dim}")
        width = -(-self.dim // _PER_ELEMENT[self.precision])
        if data.shape[1] != width:
            raise SearchError(f"{self.precision} codes of dim {self.dim}: expected width {width}, got {data.shape[1]}")
        for name in ("scale", "shift"):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value, dtype=np.float64)
            if value.shape != (self.dim,) or not np.isfinite(value).all():
                raise SearchError(f"{self.precision} codes: {name} must be {self.dim} finite values, got shape {value.shape}")
            object.__setattr__(self, name, value)
        if (self.scale is None) != (self.shift is None):
            raise SearchError(f"{self.precision} codes: give both scale and shift, or neither")
        if self.precision == "ternary" and data.size and int(data.max()) >= 243:
            raise SearchError(f"ternary codes: byte value {int(data.max())} at row {int(np.argmax(data.max(axis=1)))} is not 5 base-3 digits (must be < 243)")

    @classmethod
    def affine(cls, precision: str, data: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> Codes:
        """Range codes whose per-dim grid ``lower..upper`` spans all levels (255 steps for 8 bits, 15 for 4).

        A constant dimension (``upper == lower``) gets step 1, as the codec does.
        """
        if precision not in _RANGE_VALUES:
            raise SearchError(f"a lower..upper grid applies to {', '.join(_RANGE_VALUES)}, not {precision!r}")
        lo_value, hi_value = _RANGE_VALUES[precision]
        lower = np.asarray(lower, dtype=np.float64)
        steps = (np.asarray(upper, dtype=np.float64) - lower) / (hi_value - lo_value)
        steps = np.where(steps == 0, 1.0, steps)
        return cls(precision, data, int(lower.shape[0]), scale=steps, shift=lower - lo_value * steps)

    @classmethod
    def from_decoder(cls, precision: str, data: np.ndarray, decode: Callable[[np.ndarray], np.ndarray]) -> Codes:
        """Codes with ``scale``/``shift`` read off a decoder (e.g. ``EmbeddingCodec.decode``).

        The decoder is probed at two rows whose every value is the lowest and
        the highest code value (-1 and +1 for ternary and binary); the decode is
        linear per dim, so two points give ``scale`` and ``shift``. Only the
        codec's public ``decode`` is used, not how it stores its calibration.
        """
        if precision not in PRECISIONS:
            raise SearchError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        data = np.asarray(data)
        width = data.shape[-1]
        dtype = _DTYPES[precision]
        if precision not in _PROBE_BYTES:
            dim = int(np.asarray(decode(np.zeros((1, width), dtype=dtype))).shape[-1])
            return cls(precision, data, dim)
        lo_byte, hi_byte = _PROBE_BYTES[precision]
        lo_value, hi_value = _PROBE_VALUES[precision]
        low = np.asarray(decode(np.full((1, width), lo_byte, dtype=dtype)), dtype=np.float64)[0]
        high = np.asarray(decode(np.full((1, width), hi_byte, dtype=dtype)), dtype=np.float64)[0]
        scale = (high - low) / (hi_value - lo_value)
        return cls(precision, data, int(low.shape[0]), scale=scale, shift=low - lo_value * scale)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes_per_vector(self) -> int:
        return int(self.data.shape[1] * self.data.dtype.itemsize)

    def take(self, rows: np.ndarray) -> Codes:
        """The codes of ``rows`` (same precision and calibration)."""
        return Codes(self.precision, self.data[np.asarray(rows)], self.dim, self.scale, self.shift)

    def slice(self, start: int, stop: int) -> Codes:
        return Codes(self.precision, self.data[start:stop], self.dim, self.scale, self.shift)

    def values(self) -> np.ndarray:
        """The unpacked code values, ``[N, dim]``: floats, integer codes, trits (-1/0/1) or +-1 signs."""
        return _unpack(self.precision, self.data, self.dim)


@dataclass(frozen=True)
class SearchResult:
    """Top-k per query: ``indices`` [Q, k] int64 and ``scores`` [Q, k], best first, ties by lower index."""

    indices: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class TokenCorpus:
    """All documents' token codes in one matrix, with ``offsets[i]`` the first token of document ``i``.

    Build it once with :meth:`from_documents` and reuse it across MaxSim calls.
    """

    tokens: Codes
    offsets: np.ndarray

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64)
        if offsets.ndim != 1 or offsets.size == 0 or offsets[0] != 0:
            raise SearchError("token corpus: offsets must be a non-empty 1-D array starting at 0")
        lengths = np.diff(np.append(offsets, len(self.tokens)))
        if (lengths < 1).any():
            raise SearchError(f"token corpus: document {int(np.argmax(lengths < 1))} has no tokens")
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def from_documents(cls, docs: Sequence[Codes]) -> TokenCorpus:
        if not docs:
            raise SearchError("token corpus: no documents")
        first = docs[0]
        for i, doc in enumerate(docs):
            if doc.precision != first.precision or doc.dim != first.dim or not _same_calibration(doc, first):
                raise SearchError(f"token corpus: document {i} is {doc.precision}/{doc.dim}, not {first.precision}/{first.dim} with the same calibration")
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        data = np.concatenate([d.data for d in docs], axis=0)
        return cls(Codes(first.precision, data, first.dim, first.scale, first.shift), offsets)

    def __len__(self) -> int:
        return int(self.offsets.size)


# --------------------------------------------------------------------------- unpacking


def _unpack(precision: str, data: np.ndarray, dim: int) -> np.ndarray:
    """Unpack codes (any leading shape) to one value per dim; integer precisions stay integer."""
    if precision in ("float32", "float16", "int8", "uint8"):
        return data
    if precision == "int4":
        nibbles = np.stack([data >> 4, data & 0x0F], axis=-1)
        return nibbles.reshape(*data.shape[:-1], -1)[..., :dim]
    if precision == "ternary":
        return _TERNARY_LUT[data].reshape(*data.shape[:-1], -1)[..., :dim]
    packed = data if precision == "ubinary" else data.view(np.uint8) ^ np.uint8(0x80)  # binary = ubinary - 128
    bits = np.unpackbits(packed, axis=-1, count=dim)
    return (bits.view(np.int8) << 1) - 1  # 0/1 -> -1/+1


# --------------------------------------------------------------------------- popcount


def _popcount_sum(words: np.ndarray, use_lut: bool = False) -> np.ndarray:
    """Set bits per row of the last axis, int32. numpy >= 2.0 has ``bitwise_count``; older numpy uses a byte table."""
    if not use_lut and hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).sum(axis=-1, dtype=np.int32)
    as_bytes = words.view(np.uint8)
    return _POPCOUNT_LUT[as_bytes].sum(axis=-1, dtype=np.int32)


def _as_words(packed: np.ndarray) -> np.ndarray:
    """View packed bits as the widest unsigned words that tile a row (fewer, faster popcounts)."""
    packed = np.ascontiguousarray(packed).view(np.uint8)
    for dtype in (np.uint64, np.uint32, np.uint16):
        if packed.shape[-1] % np.dtype(dtype).itemsize == 0:
            return packed.view(dtype)
    return packed


def _hamming_block(q: np.ndarray, d: np.ndarray, use_lut: bool = False) -> np.ndarray:
    """Hamming distances [Q, n] between packed words q [Q, W] and d [n, W].

    One or two queries: XOR all words at once and sum the popcounts per row.
    More queries: one word column at a time over a [Q, n] tile that stays in
    cache, accumulating popcounts (about 3x faster at 100 queries than the
    [Q, n, W] temporary, measured on a 2-core EPYC).
    """
    if use_lut or not hasattr(np, "bitwise_count") or q.shape[0] <= 2:
        return _popcount_sum(q[:, None, :] ^ d[None, :, :], use_lut=use_lut)
    columns = np.ascontiguousarray(d.T)  # [W, n]
    acc_dtype = np.uint16 if q.shape[1] * q.itemsize * 8 < 2**16 else np.int32
    acc = np.zeros((q.shape[0], d.shape[0]), dtype=acc_dtype)
    xor = np.empty((q.shape[0], d.shape[0]), dtype=q.dtype)
    count = np.empty((q.shape[0], d.shape[0]), dtype=np.uint8)
    for w in range(q.shape[1]):
        np.bitwise_xor(q[:, w, None], columns[w][None, :], out=xor)
        np.bitwise_count(xor, out=count)
        np.add(acc, count, out=acc)
    return acc.astype(np.int32)


def _hamming_chunk_rows(n_queries: int) -> int:
    """Documents per Hamming chunk: large for one query, a cache-sized [Q, n] tile for many."""
    return 8192 if n_queries <= 2 else min(16384, max(1024, 2**22 // (8 * n_queries)))


def hamming_distances(queries: np.ndarray, docs: np.ndarray, *, chunk_size: int | None = None, use_lut: bool = False) -> np.ndarray:
    """Hamming distances [Q, N] between packed-bit rows (ubinary uint8 or binary int8, same width)."""
    q = _as_words(queries)
    d = _as_words(docs)
    if q.shape[-1] != d.shape[-1]:
        raise SearchError(f"hamming: query rows are {queries.shape[-1]} bytes, documents {docs.shape[-1]}")
    out = np.empty((q.shape[0], d.shape[0]), dtype=np.int32)
    chunk = chunk_size or _hamming_chunk_rows(q.shape[0])
    for start in range(0, d.shape[0], chunk):
        block = d[start : start + chunk]
        out[:, start : start + block.shape[0]] = _hamming_block(q, block, use_lut=use_lut)
    return out


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Scorer:
    """A prepared query side: how to score one chunk of documents of a given precision."""

    mode: Literal["float", "affine", "exact", "hamming"]
    weights: np.ndarray  # [Q, dim] float32 (float/affine), [Q, dim] float32 integer values (exact), [Q, words] packed (hamming)
    bias: np.ndarray | None = None  # [Q] float64, added to affine scores
    blocks: tuple[tuple[int, int], ...] = ()  # dim ranges of the exact float32 products (exact mode)
    dim: int = 0

    @property
    def n_queries(self) -> int:
        return int(self.weights.shape[0])

    def per_doc_scratch_bytes(self, docs: Codes) -> int:
        q = self.n_queries
        if self.mode == "hamming":
            return 16 * q
        return docs.dim * 4 + 4 * docs.dim * (docs.precision not in ("float32", "float16")) + 16 * q

    def chunk_rows(self, docs: Codes) -> int:
        if self.mode == "hamming":
            return _hamming_chunk_rows(self.n_queries)
        return _chunk_rows(self.per_doc_scratch_bytes(docs))

    def score(self, docs: Codes) -> np.ndarray:
        """Scores [Q, n] of this query side against a chunk of documents."""
        if self.mode == "hamming":
            return self.dim - 2 * _hamming_block(self.weights, _as_words(docs.data))
        values = _unpack(docs.precision, docs.data, docs.dim)
        if self.mode == "float":
            return self.weights @ values.astype(np.float32, copy=False).T
        if self.mode == "affine":
            return (self.weights @ values.astype(np.float32).T + self.bias[:, None]).astype(np.float32)
        values = values.astype(np.float32)
        if len(self.blocks) == 1:
            return (self.weights @ values.T).astype(np.int32)
        total = np.zeros((self.n_queries, values.shape[0]), dtype=np.int32)
        for start, stop in self.blocks:  # each block's partial sums are integers below 2**24: exact in float32
            total += (self.weights[:, start:stop] @ values[:, start:stop].T).astype(np.int32)
        return total


def _prepare(queries: np.ndarray | Codes, docs: Codes) -> _Scorer:
    """Turn queries (float [Q, dim], or codes like the documents) into a scorer for ``docs``."""
    if isinstance(queries, Codes):
        return _prepare_codes(queries, docs)
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != docs.dim:
        raise SearchError(f"queries of shape {np.shape(queries)} do not match {docs.precision} documents of dim {docs.dim}")
    if not np.issubdtype(q.dtype, np.floating):
        raise SearchError(f"float queries expected (or Codes for symmetric scoring), got dtype {q.dtype}; wrap integer codes in Codes")
    if not np.isfinite(q).all():
        raise SearchError("queries contain NaN or infinite values")
    if docs.scale is None and docs.precision in _RANGE_VALUES:
        raise SearchError(f"{docs.precision} documents need scale/shift (their calibration: Codes.affine or Codes.from_decoder) to score float queries")
    if docs.scale is not None:
        q64 = q.astype(np.float64)
        return _Scorer("affine", (q64 * docs.scale).astype(np.float32), bias=q64 @ docs.shift, dim=docs.dim)
    return _Scorer("float", q.astype(np.float32), dim=docs.dim)


def _prepare_codes(queries: Codes, docs: Codes) -> _Scorer:
    bits = {"binary", "ubinary"}
    same = queries.precision == docs.precision or {queries.precision, docs.precision} <= bits
    if not same or queries.dim != docs.dim:
        raise SearchError(f"cannot score {queries.precision}/{queries.dim} query codes against {docs.precision}/{docs.dim} documents")
    if docs.precision in bits:
        return _Scorer("hamming", _as_words(_bits_like(queries, docs)), dim=docs.dim)
    if docs.precision in ("float32", "float16"):
        return _Scorer("float", queries.data.astype(np.float32), dim=docs.dim)
    weights = queries.values().astype(np.float32)
    return _Scorer("exact", weights, blocks=_exact_blocks(weights, _MAX_ABS[docs.precision]), dim=docs.dim)


def _exact_blocks(weights: np.ndarray, max_doc_value: int) -> tuple[tuple[int, int], ...]:
    """Dim ranges over which float32 products of integer codes are exact, as few as possible.

    Any partial sum over a range is at most ``max_doc_value * sum |q_d|`` in
    magnitude; float32 holds every integer up to 2**24, so a range whose bound
    stays within it is computed without rounding in any summation order.
    Typical int8 queries fit in one range (one matrix product); all -128
    codes at 2048 dims need two.
    """
    bound = np.abs(weights).max(axis=0).astype(np.int64) * max_doc_value if len(weights) else np.zeros(weights.shape[1], np.int64)
    blocks, start, total = [], 0, 0
    for d, b in enumerate(bound.tolist()):
        if total + b > _F32_EXACT and d > start:
            blocks.append((start, d))
            start, total = d, 0
        total += b
    blocks.append((start, len(bound)))
    return tuple(blocks)


def _bits_like(queries: Codes, docs: Codes) -> np.ndarray:
    """Query bytes in the documents' byte convention: binary is ubinary with the top bit flipped (minus 128)."""
    data = queries.data.view(np.uint8)
    return data ^ np.uint8(0x80) if queries.precision != docs.precision else data


def _chunk_rows(per_row_bytes: int, budget: int = _CHUNK_BYTES) -> int:
    return max(256, budget // max(1, per_row_bytes))


def _iter_chunks(scorer: _Scorer, docs: Codes, chunk_size: int | None) -> Iterator[tuple[int, np.ndarray]]:
    chunk = chunk_size or scorer.chunk_rows(docs)
    if chunk < 1:
        raise SearchError(f"chunk_size must be >= 1, got {chunk}")
    for start in range(0, len(docs), chunk):
        yield start, scorer.score(docs.slice(start, start + chunk))


def scores(queries: np.ndarray | Codes, docs: Codes, *, chunk_size: int | None = None) -> np.ndarray:
    """All scores [Q, N]; float queries are scored against decoded documents, Codes queries symmetrically."""
    scorer = _prepare(queries, docs)
    out = np.empty((scorer.n_queries, len(docs)), dtype=_score_dtype(scorer))
    for start, block in _iter_chunks(scorer, docs, chunk_size):
        out[:, start : start + block.shape[1]] = block
    return out


def _score_dtype(scorer: _Scorer) -> np.dtype:
    return np.dtype(np.int32) if scorer.mode in ("exact", "hamming") else np.dtype(np.float32)


# --------------------------------------------------------------------------- top-k


def _select_topk(values: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of each row, best first; equal scores go to the lower id.

    Precondition (kept by the callers): within a row, entries with equal score
    appear in increasing id order. Then the ``need`` lowest ids among the
    entries tied with the k-th best value are the first ``need`` of them.
    """
    n = values.shape[1]
    if k < n:
        kth = np.partition(values, n - k, axis=1)[:, n - k : n - k + 1]
        above = values > kth
        tied = values == kth
        need = k - above.sum(axis=1, keepdims=True)
        keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
        rows = np.nonzero(keep)
        values = values[rows].reshape(-1, k)
        ids = ids[rows].reshape(-1, k)
    order = np.lexsort((ids, -values.astype(np.float64)), axis=1)
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1)


def search(
    queries: np.ndarray | Codes,
    docs: Codes,
    k: int,
    *,
    chunk_size: int | None = None,
    backend: Backend = "numpy",
) -> SearchResult:
    """Exact top-``k`` documents per query, scanning the corpus in chunks.

    Memory is the current chunk's scores plus the running top-k. ``k`` larger
    than the corpus returns every document (``min(k, N)`` columns).
    """
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    k = min(k, len(docs))
    if backend == "faiss":
        return _search_faiss(queries, docs, k)
    if backend != "numpy":
        raise SearchError(f"unknown backend {backend!r}; expected numpy or faiss")
    scorer = _prepare(queries, docs)
    best_ids = np.empty((scorer.n_queries, 0), dtype=np.int64)
    best = np.empty((scorer.n_queries, 0), dtype=_score_dtype(scorer))
    for start, block in _iter_chunks(scorer, docs, chunk_size):
        if block.dtype.kind == "f" and np.isnan(block).any():
            raise SearchError(f"{docs.precision} documents {start}..{start + block.shape[1] - 1}: a score is NaN (non-finite document values)")
        ids = np.broadcast_to(np.arange(start, start + block.shape[1], dtype=np.int64), block.shape)
        best_ids, best = _select_topk(np.concatenate([best, block], axis=1), np.concatenate([best_ids, ids], axis=1), k)
    return SearchResult(best_ids, best)


def _search_faiss(queries: np.ndarray | Codes, docs: Codes, k: int) -> SearchResult:
    """float32 inner product (``faiss.knn``) or Hamming (``faiss.knn_hamming``); ties at the k-th place may differ from numpy."""
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError("backend='faiss' needs faiss: pip install faiss-cpu") from exc
    if docs.precision in ("binary", "ubinary") and isinstance(queries, Codes):
        _prepare_codes(queries, docs)  # checks kinds and dims
        q = np.ascontiguousarray(_bits_like(queries, docs))
        distances, ids = faiss.knn_hamming(q, np.ascontiguousarray(docs.data.view(np.uint8)), k)
        values = (docs.dim - 2 * distances).astype(np.int32)
    elif docs.precision == "float32" and not isinstance(queries, Codes):
        scorer = _prepare(queries, docs)
        values, ids = faiss.knn(np.ascontiguousarray(scorer.weights), np.ascontiguousarray(docs.data), k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        raise SearchError(f"backend='faiss' searches float32 documents with float queries or binary codes with binary codes, not {docs.precision}")
    order = np.lexsort((ids, -values.astype(np.float64)), axis=1)
    return SearchResult(np.take_along_axis(ids, order, axis=1).astype(np.int64), np.take_along_axis(values, order, axis=1))


def search_rescored(
    queries: np.ndarray,
    candidates: Codes,
    rescore_docs: Codes | np.ndarray,
    k: int,
    *,
    rescore_multiplier: int = 4,
    candidate_queries: Codes | None = None,
    rescore_queries: Codes | None = None,
    chunk_size: int | None = None,
    backend: Backend = "numpy",
) -> SearchResult:
    """Two-stage search: ``rescore_multiplier * k`` candidates from compact codes, re-ranked with richer ones.

    The usual pairing is binary candidates (Hamming, 32x smaller than
    float32) rescored with int8 codes or float32 vectors of the same
    documents, as in sentence-transformers' rescoring flow. Stage one uses
    ``candidate_queries`` (default: the float queries' sign bits for binary
    candidates, the float queries otherwise); stage two scores the float
    queries against the decoded ``rescore_docs`` (or ``rescore_queries``
    codes symmetrically). The candidate pool is never smaller than ``k``, so
    ``min(k, N)`` results always come back.
    """
    if k < 1 or rescore_multiplier < 1:
        raise SearchError(f"k and rescore_multiplier must be >= 1, got k={k}, rescore_multiplier={rescore_multiplier}")
    if not isinstance(rescore_docs, Codes):
        rescore_docs = Codes("float32", np.asarray(rescore_docs, dtype=np.float32), int(np.shape(rescore_docs)[1]))
    if len(rescore_docs) != len(candidates):
        raise SearchError(f"rescore documents ({len(rescore_docs)}) and candidate codes ({len(candidates)}) must describe the same corpus")
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if candidate_queries is None:
        if candidates.precision in ("binary", "ubinary"):
            if q.shape[-1] != candidates.dim:
                raise SearchError(f"queries of dim {q.shape[-1]} do not match binary candidates of dim {candidates.dim}")
            center = 0.0 if candidates.shift is None else candidates.shift  # the bit threshold (the codec's centre)
            packed = np.packbits(q > center, axis=-1)
            candidate_queries = Codes(candidates.precision, packed if candidates.precision == "ubinary" else (packed ^ 0x80).view(np.int8), candidates.dim)
        else:
            candidate_queries = q
    k = min(k, len(candidates))
    pool = min(len(candidates), k * rescore_multiplier)
    first = search(candidate_queries, candidates, pool, chunk_size=chunk_size, backend=backend)
    second = rescore_queries if rescore_queries is not None else q
    rows = []
    for i, pool_ids in enumerate(first.indices):  # one small product per query over its own candidates
        pool_docs = rescore_docs.take(pool_ids)
        rows.append(_prepare(_row(second, i), pool_docs).score(pool_docs)[0])
    rescored = np.stack(rows)
    # Candidates sorted by id first, so that ties keep the lower document index.
    by_id = np.argsort(first.indices, axis=1, kind="stable")
    ids = np.take_along_axis(first.indices, by_id, axis=1)
    values = np.take_along_axis(rescored, by_id, axis=1)
    top_ids, top_values = _select_topk(values, ids, k)
    return SearchResult(top_ids, top_values)


def _row(queries: np.ndarray | Codes, i: int) -> np.ndarray | Codes:
    if isinstance(queries, Codes):
        return queries.slice(i, i + 1)
    return queries[i : i + 1]


# --------------------------------------------------------------------------- MaxSim


def maxsim(
    queries: Sequence[np.ndarray] | Sequence[Codes],
    docs: Sequence[Codes] | TokenCorpus,
    *,
    token_budget: int | None = None,
) -> np.ndarray:
    """Late-interaction scores [n_queries, n_docs]: per query token, the best doc token's score, summed.

    All documents' tokens are scored in one matrix product per group of
    documents; ``np.maximum.reduceat`` over document offsets takes each
    document's best token and ``np.add.reduceat`` over query offsets sums
    each query's tokens, so there is no Python loop over documents (only over
    groups of about ``token_budget`` document tokens, which bound memory).
    Queries are float token matrices [Tq, dim] (scored against decoded doc
    tokens) or Codes of the documents' kind (scored symmetrically).
    """
    corpus = docs if isinstance(docs, TokenCorpus) else TokenCorpus.from_documents(list(docs))
    if not queries:
        raise SearchError("maxsim: no queries")
    lengths = np.array([len(q) for q in queries], dtype=np.int64)
    if (lengths < 1).any():
        raise SearchError(f"maxsim: query {int(np.argmax(lengths < 1))} has no tokens")
    q_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if isinstance(queries[0], Codes):
        first = queries[0]
        query_tokens: np.ndarray | Codes = Codes(first.precision, np.concatenate([q.data for q in queries]), first.dim, first.scale, first.shift)
    else:
        query_tokens = np.concatenate([np.asarray(q) for q in queries], axis=0)
    scorer = _prepare(query_tokens, corpus.tokens)
    n_tokens = len(corpus.tokens)
    budget = token_budget or max(1024, _CHUNK_BYTES // (8 * scorer.n_queries + scorer.per_doc_scratch_bytes(corpus.tokens)))
    float_scores = _score_dtype(scorer).kind == "f"
    out = np.empty((len(queries), len(corpus)), dtype=np.float32 if float_scores else np.int64)
    ends = np.append(corpus.offsets[1:], n_tokens)
    doc = 0
    while doc < len(corpus):
        # As many whole documents as fit in the budget (at least one).
        last = max(doc + 1, int(np.searchsorted(ends, corpus.offsets[doc] + budget, side="right")))
        lo, hi = int(corpus.offsets[doc]), int(ends[last - 1])
        token_scores = scorer.score(corpus.tokens.slice(lo, hi))  # [Tq_total, hi - lo]
        best = np.maximum.reduceat(token_scores, corpus.offsets[doc:last] - lo, axis=1)
        out[:, doc:last] = np.add.reduceat(best, q_offsets, axis=0, dtype=np.float64 if float_scores else np.int64)
        doc = last
    return out


def _same_calibration(a: Codes, b: Codes) -> bool:
    if a.scale is None or b.scale is None:
        return a.scale is None and b.scale is None
    return bool(np.array_equal(a.scale, b.scale) and np.array_equal(a.shift, b.shift))
