"""Thresholds per precision, and the verdict: every measured number checked against its bound.

A threshold set says how close an artifact must stay to the fp32 reference:
parity bounds on the probe set (cosines, MaxSim and ranking agreement) and
quality bounds on labelled data (how much nDCG@10, Recall@100 and STS
Spearman may drop, in absolute points). ``DEFAULTS`` holds one set per
precision; a JSON file can override any of them (``load_thresholds``).
jina-clip-v2 artifacts have their own sets (``CLIP_DEFAULTS``,
``load_clip_thresholds``, ``evaluate_clip``): cosine parity per input group
and retrieval drops per direction, the same file format for overrides.

Each default is justified in a comment next to it: measured figures where
jev4 or upstream has them, published retention figures otherwise. They are
starting points to tighten once real artifacts have been measured.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from jev4.errors import Jev4Error
from jev4.validate.results import CodecResult, MetricCheck, ParityResult, RetrievalResult, STSResult

if TYPE_CHECKING:
    from jev4.validate.clip_retrieval import CosineParity


class ThresholdError(Jev4Error, ValueError):
    """An unknown precision, or a thresholds file or value that is not valid."""


# Fields whose value is a correlation or cosine: must lie in [-1, 1].
_UNIT_RANGE = ("single_cosine_min", "single_cosine_mean", "multi_token_cosine_min", "maxsim_pearson_min", "score_spearman_min")
# Absolute drops (reference minus artifact) that are allowed: must be >= 0.
_DROPS = ("ndcg_drop_max", "recall_drop_max", "sts_drop_max")


@dataclass(frozen=True)
class Thresholds:
    """Bounds for one artifact; the defaults are those of an fp32 artifact (numerically the reference)."""

    single_cosine_min: float = 0.9999  # every probe input, at every Matryoshka dim
    single_cosine_mean: float = 0.99999
    multi_token_cosine_min: float = 0.999  # every token of every probe input
    maxsim_pearson_min: float = 0.999  # Pearson of query x document MaxSim scores
    topk_overlap_min: float = 0.95  # mean |top-10 ref ∩ top-10 artifact| / 10
    score_spearman_min: float = 0.999  # Spearman of single-vector query x document scores
    ndcg_drop_max: float = 0.005  # reference nDCG@10 minus artifact nDCG@10, absolute
    recall_drop_max: float = 0.005  # same for Recall@100
    sts_drop_max: float = 0.005  # same for STS Spearman

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ThresholdError(f"threshold {f.name}: must be a number, got {value!r}")
            object.__setattr__(self, f.name, float(value))
            value = float(value)
            if f.name in _UNIT_RANGE and not -1.0 <= value <= 1.0:
                raise ThresholdError(f"threshold {f.name}: must be in [-1, 1], got {value!r}")
            if f.name == "topk_overlap_min" and not 0.0 <= value <= 1.0:
                raise ThresholdError(f"threshold {f.name}: must be in [0, 1], got {value!r}")
            if f.name in _DROPS and not value >= 0.0:  # also rejects NaN
                raise ThresholdError(f"threshold {f.name}: a drop must be >= 0, got {value!r}")

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base: Thresholds | None = None) -> Thresholds:
        """A threshold set from a dict; keys left out keep ``base``'s values (the fp32 defaults if none)."""
        return _from_json(cls, data, base)


def _from_json(cls: type, data: Mapping[str, Any], base: Any) -> Any:
    """``base`` (``cls()`` if None) with ``data``'s keys replaced; an unknown key is an error listing the known ones."""
    if not isinstance(data, Mapping):
        raise ThresholdError(f"thresholds must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ThresholdError(f"unknown threshold key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return replace(base if base is not None else cls(), **dict(data))


# Defaults per precision. Parity is measured against the fp32 reference on the
# probe set; drops are absolute points of nDCG@10 / Recall@100 / STS Spearman on
# the labelled sets (e.g. 0.02 = 0.62 -> 0.60).
_DEFAULTS = {
    # fp32: the same arithmetic as the reference, up to kernel order (ORT vs torch,
    # merged vs unmerged LoRA). A merged fp32 checkpoint matches the unmerged
    # reference at min cosine 0.9999999 (README); 1e-4 leaves room for other
    # kernels (GPU, onnxruntime) and still catches a wrong adapter, prefix or
    # pooling, which land far lower.
    "fp32": Thresholds(),
    # fp16: 10 mantissa bits (rounding ~5e-4 per op). Pooling averages the error
    # away, so pooled vectors keep ~0.9999 mean; single tokens see the raw error,
    # hence 0.995 per token. Rankings barely move: Pearson/Spearman 0.998.
    "fp16": Thresholds(
        single_cosine_min=0.999,
        single_cosine_mean=0.9999,
        multi_token_cosine_min=0.995,
        maxsim_pearson_min=0.998,
        topk_overlap_min=0.9,
        score_spearman_min=0.998,
        ndcg_drop_max=0.005,
        recall_drop_max=0.005,
        sts_drop_max=0.005,
    ),
    # bf16: 7 mantissa bits, 8x coarser than fp16. Upstream-style bf16 vs fp32 on
    # the tiny model measured min cosine 0.99985 pooled and 0.9949 per token; the
    # 36-layer model accumulates more, so 0.999 pooled and 0.98 per token, and a
    # 0.01 quality drop (bf16 is how upstream itself runs the model).
    "bf16": Thresholds(
        single_cosine_min=0.999,
        single_cosine_mean=0.9995,
        multi_token_cosine_min=0.98,
        maxsim_pearson_min=0.995,
        topk_overlap_min=0.9,
        score_spearman_min=0.995,
        ndcg_drop_max=0.01,
        recall_drop_max=0.01,
        sts_drop_max=0.01,
    ),
    # fp8 (E4M3) weights and activations: 3 mantissa bits, per-tensor scales.
    # Measured on the tiny checkpoint (Q/DQ ONNX on ORT CPU, docs/quantization.md):
    # pooled mean 0.997-0.9985, min 0.994; per-token min 0.990. The 36-layer model has
    # activation outliers the random tiny one lacks, so the bounds keep room:
    # pooled ~0.99 mean with a tail to 0.97, tokens 0.95. Published fp8 LLM
    # quantization keeps 98-99+% of task quality, so up to 0.02 absolute on
    # nDCG/Recall/STS.
    "fp8": Thresholds(
        single_cosine_min=0.97,
        single_cosine_mean=0.99,
        multi_token_cosine_min=0.95,
        maxsim_pearson_min=0.98,
        topk_overlap_min=0.8,
        score_spearman_min=0.98,
        ndcg_drop_max=0.02,
        recall_drop_max=0.02,
        sts_drop_max=0.02,
    ),
    # int8 weight quantization (per-channel weights, e.g. SmoothQuant or
    # LLM.int8 style activations): the same order of error as fp8, same bounds.
    "int8": Thresholds(
        single_cosine_min=0.97,
        single_cosine_mean=0.99,
        multi_token_cosine_min=0.95,
        maxsim_pearson_min=0.98,
        topk_overlap_min=0.8,
        score_spearman_min=0.98,
        ndcg_drop_max=0.02,
        recall_drop_max=0.02,
        sts_drop_max=0.02,
    ),
    # w-int8: onnxruntime quantize_dynamic (jev4-export --weights int8): int8
    # weights per output channel, activations quantized per call with one
    # scale per tensor. Measured on the tiny checkpoint (ORT 1.32 CPU, vs fp32
    # ONNX, docs/edge.md): pooled min 0.99974 / mean 0.99988, per-token min
    # 0.9991. The 36-layer model has activation outliers (a few channels
    # 100x the rest) that a per-tensor activation scale squeezes, which the
    # random tiny model lacks: the same room as the calibrated int8 set.
    "w-int8": Thresholds(
        single_cosine_min=0.97,
        single_cosine_mean=0.99,
        multi_token_cosine_min=0.95,
        maxsim_pearson_min=0.98,
        topk_overlap_min=0.8,
        score_spearman_min=0.98,
        ndcg_drop_max=0.02,
        recall_drop_max=0.02,
        sts_drop_max=0.02,
    ),
    # w-int4: MatMulNBits 4-bit weights, blocks of 32 with zero points
    # (jev4-export --weights int4), activations float (int8 inside the kernel
    # at accuracy_level 4). Measured on the tiny checkpoint: pooled min 0.976 /
    # mean 0.988, per-token min 0.974 (random Gaussian weights are the worst
    # case for 16 levels; trained weights lose less, and published 4-bit RTN
    # of 3B LLMs keeps ~95-98% of task quality): bounds a little below what
    # was measured, and up to 0.04 nDCG/Recall/STS, as for emb-int4.
    "w-int4": Thresholds(
        single_cosine_min=0.95,
        single_cosine_mean=0.97,
        multi_token_cosine_min=0.9,
        maxsim_pearson_min=0.95,
        topk_overlap_min=0.7,
        score_spearman_min=0.95,
        ndcg_drop_max=0.04,
        recall_drop_max=0.04,
        sts_drop_max=0.04,
    ),
    # GGUF artifacts run by llama.cpp (jev4-export --format gguf, jev4.runtime.llamacpp_backend): jev4 feeds
    # token ids and pools llama.cpp's per-token states. Measured with jev4 validate on the tiny checkpoint
    # (probe set min over dims 8-64; stdlib-code, 100 queries x 300 docs), llama-cpp-python 0.3.36 on CPU.
    # gguf-f32: the reference's weights, llama.cpp's kernels (f16 KV cache, flash attention): pooled min
    # 0.99999983, per token 0.999999; the fp32 bounds hold with room.
    "gguf-f32": Thresholds(),
    # gguf-f16: F16 matrices, norms and biases F32. Tiny: pooled min 0.9999997, per token 0.9999987 (its
    # bf16 weights survive f16 nearly exactly); the 36-layer model rounds merged weights in all layers, so
    # fp16's bounds.
    "gguf-f16": Thresholds(
        single_cosine_min=0.999,
        single_cosine_mean=0.9999,
        multi_token_cosine_min=0.995,
        maxsim_pearson_min=0.998,
        topk_overlap_min=0.9,
        score_spearman_min=0.998,
        ndcg_drop_max=0.005,
        recall_drop_max=0.005,
        sts_drop_max=0.005,
    ),
    # gguf-q8_0: 8-bit blocks of 32 with an f16 scale (rounding ~0.4% of a block's max). Tiny: pooled
    # min 0.99977 (mean 0.99992), per token 0.99971, MaxSim Pearson 0.99999, score Spearman 0.9997, nDCG@10
    # drop <= 0.003. Published Q8_0 LLM perplexity is within ~0.1% of f16: fp16-like parity bounds. Quality:
    # at validate's defaults (200 queries x 1000 docs) Recall@100 at the tiny model's dim 8 dropped 0.01 (2
    # queries of a near-chance random model), so the quality room is w-int8's (0.02), the same bit width.
    "gguf-q8_0": Thresholds(
        single_cosine_min=0.999,
        single_cosine_mean=0.9995,
        multi_token_cosine_min=0.995,
        maxsim_pearson_min=0.995,
        topk_overlap_min=0.9,
        score_spearman_min=0.995,
        ndcg_drop_max=0.02,
        recall_drop_max=0.02,
        sts_drop_max=0.02,
    ),
    # gguf-q4_0: 4-bit blocks of 32 (16 levels, one scale, no zero point), token embedding Q8_0. Tiny:
    # pooled min 0.949 (at dim 8; 0.961 at 64), mean 0.982, per token 0.954, MaxSim Pearson 0.9968, top-10
    # overlap 0.975, score Spearman 0.980, nDCG@10 drop 0.004, Recall@100 drop 0.04 (4 of 100 queries, on a
    # near-chance random model). Q4_0 is llama.cpp's coarsest legacy type (published: +2-3% perplexity on
    # 7B LLMs, more on small ones), so the bounds sit just under what was measured, with 0.05 for quality.
    "gguf-q4_0": Thresholds(
        single_cosine_min=0.93,
        single_cosine_mean=0.97,
        multi_token_cosine_min=0.93,
        maxsim_pearson_min=0.98,
        topk_overlap_min=0.7,
        score_spearman_min=0.96,
        ndcg_drop_max=0.05,
        recall_drop_max=0.05,
        sts_drop_max=0.05,
    ),
    # Embedding-output codecs: the model runs in full precision and only its
    # output vectors are quantized, so parity compares decoded vectors with the
    # reference's. What matters is retrieval retention.
    # emb-int8: per-dimension scalar int8 (256 levels over a calibrated range);
    # decoded vectors keep cosine ~0.999, tokens (128 dims) a little less.
    # Published retention without rescoring is ~97-99% (sentence-transformers /
    # HF embedding-quantization study), i.e. ~0.01-0.02 nDCG@10 at 0.5-0.6.
    "emb-int8": Thresholds(
        single_cosine_min=0.99,
        single_cosine_mean=0.999,
        multi_token_cosine_min=0.98,
        maxsim_pearson_min=0.995,
        topk_overlap_min=0.85,
        score_spearman_min=0.995,
        ndcg_drop_max=0.02,
        recall_drop_max=0.02,
        sts_drop_max=0.02,
    ),
    # emb-int4: 16 levels per dimension, between int8 and binary: decoded
    # cosine ~0.99 mean with a tail to ~0.95 (tokens ~0.9); allow 0.04.
    "emb-int4": Thresholds(
        single_cosine_min=0.95,
        single_cosine_mean=0.98,
        multi_token_cosine_min=0.9,
        maxsim_pearson_min=0.98,
        topk_overlap_min=0.75,
        score_spearman_min=0.98,
        ndcg_drop_max=0.04,
        recall_drop_max=0.04,
        sts_drop_max=0.04,
    ),
    # emb-ternary: three levels per dimension (1.6 bits). Measured on
    # all-MiniLM-L6-v2 / stdlib-code (docs/embedding-quantization.md): ~97-98%
    # nDCG@10 retention at full size, ~91% at 128 dims; allow 0.05.
    "emb-ternary": Thresholds(
        single_cosine_min=0.85,
        single_cosine_mean=0.88,
        multi_token_cosine_min=0.75,
        maxsim_pearson_min=0.93,
        topk_overlap_min=0.65,
        score_spearman_min=0.93,
        ndcg_drop_max=0.05,
        recall_drop_max=0.04,
        sts_drop_max=0.05,
    ),
    # emb-binary: sign bits. The cosine of sign(x) with a Gaussian-like x is
    # sqrt(2/pi) ~ 0.80 whatever the model, so parity bounds sit below that (and
    # 128-dim tokens spread wider). Published retention without rescoring is
    # ~92.5% (HF embedding-quantization study; ~96% with rescoring), i.e. up to
    # ~0.05 nDCG@10 at 0.6; allow 0.08. Recall@100 suffers less (0.06).
    "emb-binary": Thresholds(
        single_cosine_min=0.7,
        single_cosine_mean=0.75,
        multi_token_cosine_min=0.55,
        maxsim_pearson_min=0.85,
        topk_overlap_min=0.6,
        score_spearman_min=0.85,
        ndcg_drop_max=0.08,
        recall_drop_max=0.06,
        sts_drop_max=0.08,
    ),
}
DEFAULTS: Mapping[str, Thresholds] = types.MappingProxyType(_DEFAULTS)


def _defaults_for(precision: str, defaults: Mapping[str, Any] = DEFAULTS) -> Any:
    if precision not in defaults:
        raise ThresholdError(f"unknown precision {precision!r}; known: {', '.join(defaults)}")
    return defaults[precision]


def load_thresholds(precision: str, path: Path | str | None = None) -> Thresholds:
    """The thresholds for ``precision``: its defaults, overridden by the JSON file at ``path`` if given.

    The file holds either flat keys, which apply to this precision
    (``{"ndcg_drop_max": 0.01}``), or one object per precision
    (``{"fp16": {...}, "int8": {...}}``); a precision not in the file keeps its
    defaults. Every entry is checked, so a typo fails even for another precision.
    """
    return _load(precision, path, DEFAULTS, Thresholds)


def _load(precision: str, path: Path | str | None, defaults: Mapping[str, Any], cls: type) -> Any:
    """``load_thresholds`` for any family's threshold sets (``defaults``: precision -> a ``cls`` instance)."""
    base = _defaults_for(precision, defaults)
    if path is None:
        return base
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ThresholdError(f"{path}: thresholds file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ThresholdError(f"{path}: cannot read thresholds file: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ThresholdError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ThresholdError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested and len(nested) != len(data):
        flat = sorted(set(data) - set(nested))
        raise ThresholdError(f"{path}: mixes flat keys ({', '.join(flat)}) with per-precision objects ({', '.join(nested)}); use one form")
    entries = data if nested else {precision: data}
    result = base
    for name, entry in entries.items():
        try:
            resolved = cls.from_json(entry, base=_defaults_for(name, defaults))
        except ThresholdError as e:
            where = f"{path}: {name}: " if nested else f"{path}: "
            raise ThresholdError(f"{where}{e}") from None
        if name == precision:
            result = resolved
    return result


# --------------------------------------------------------------------------- jina-clip-v2


@dataclass(frozen=True)
class ClipThresholds:
    """Bounds for a jina-clip-v2 artifact (``jev4.validate.clip_validate``); the defaults are fp32's.

    Parity: the cosine between the reference's and the artifact's vector of
    every input of every group (multilingual-names queries and documents,
    pydoc-pages queries, pages and crops) at every Matryoshka dim: the min
    and the mean per group x dim. Quality: how much nDCG@10 and Recall@10 may
    drop per direction (text->text, text->image, image->image) x dim, never
    tighter than one query's worth (``resolution``). jina-clip-v2 has no
    multi-vectors and no tasks, so v4's MaxSim, per-token and STS bounds have
    no counterpart here.
    """

    cosine_min: float = 0.99999
    cosine_mean: float = 0.999999
    ndcg_drop_max: float = 0.005
    recall_drop_max: float = 0.005

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ThresholdError(f"threshold {f.name}: must be a number, got {value!r}")
            value = float(value)
            object.__setattr__(self, f.name, value)
            if f.name.startswith("cosine") and not -1.0 <= value <= 1.0:
                raise ThresholdError(f"threshold {f.name}: must be in [-1, 1], got {value!r}")
            if f.name.endswith("_drop_max") and not value >= 0.0:  # also rejects NaN
                raise ThresholdError(f"threshold {f.name}: a drop must be >= 0, got {value!r}")

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base: ClipThresholds | None = None) -> ClipThresholds:
        """A threshold set from a dict; keys left out keep ``base``'s values (the fp32 defaults if none)."""
        return _from_json(cls, data, base)


# Per precision of a jev4 clip-v2 ONNX artifact (its manifest's contents.precision). Measured with jev4 validate
# on the tiny checkpoint (make-tiny --family jina-clip-v2, seed 0; ORT 1.32 CPU vs ClipV2Encoder fp32 on torch 2.13;
# 200 multilingual-names queries x 257 names, 16 pydoc pages and their crops; dims 32/16/8; docs/jina-clip-v2.md
# "Validate"). Drops are never bounded tighter than one query (0.005 text->text, 0.0625 with 16 pages).
_CLIP_DEFAULTS = {
    # fp32: worst min cosine over all groups and dims 1 - 2.6e-13 (pages), worst mean 1 - 1.2e-13; every
    # retrieval delta 0. 0.99999 is the bar for fp32 ONNX parity (the export's own self-check is
    # 1 - 1e-5), which leaves room for other kernels and the 24-layer towers and still catches a wrong prefix,
    # pooling or weight: the vision patch embedding scaled x1.05 in the graph lands at min 0.99998 and fails it
    # (x1.5: 0.9989; tests/validate/test_clip_validate.py scales it x1.5).
    "fp32": ClipThresholds(),
    # fp16 (LayerNorms, softmax and the text pooling kept in fp32, FP16_KEPT_FP32): tiny min 1 - 3.3e-7, mean
    # 1 - 1.4e-7; nDCG@10 moved by <= 0.006 (one near-tie among 16 pages), Recall@10 not at all. The tiny
    # towers have 2 layers, the real ones 24 at width 1024 (each adds fp16 rounding, ~5e-4 per op), so v4's
    # fp16 bounds: min 0.999 (also the export's own fp16 bar), mean 0.9999, 0.005 quality.
    "fp16": ClipThresholds(cosine_min=0.999, cosine_mean=0.9999, ndcg_drop_max=0.005, recall_drop_max=0.005),
    # w-int8 (onnxruntime quantize_dynamic: int8 weights per channel, activations per tensor per call): tiny min
    # 0.99941 (pages at dim 8), mean >= 0.99973; text->text nDCG@10 within 0.0006, Recall@10 0; with 16 pages,
    # nDCG@10 -0.022 / Recall@10 -0.0625 (text->image) and nDCG@10 -0.039 (image->image), both at dim 8: one page
    # in 16 on a near-chance random model, inside the one-query floor. The full-size towers have activation
    # outliers that a per-tensor activation scale squeezes and the random tiny ones lack: the same room as v4's
    # w-int8 set (same quantizer): min 0.97, mean 0.99, 0.02 quality. The export refuses below 0.99 on its probes.
    "w-int8": ClipThresholds(cosine_min=0.97, cosine_mean=0.99, ndcg_drop_max=0.02, recall_drop_max=0.02),
}
CLIP_DEFAULTS: Mapping[str, ClipThresholds] = types.MappingProxyType(_CLIP_DEFAULTS)


def load_clip_thresholds(precision: str, path: Path | str | None = None) -> ClipThresholds:
    """jina-clip-v2's thresholds for ``precision``, with the same file overrides as :func:`load_thresholds`."""
    return _load(precision, path, CLIP_DEFAULTS, ClipThresholds)


# --------------------------------------------------------------------------- verdict

METRIC_LABELS = {"ndcg@10": "nDCG@10", "recall@1": "Recall@1", "recall@10": "Recall@10", "recall@100": "Recall@100", "mrr@10": "MRR@10"}


def _dim_order(key: str) -> tuple[int, float, str]:
    try:
        return (0, -float(key), key)
    except ValueError:
        return (1, 0.0, key)


def _value(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _drop(reference: Mapping[str, float], artifact: Mapping[str, float], key: str) -> float:
    """reference - artifact; NaN (a failing check) if either side lacks the metric."""
    if key not in reference or key not in artifact:
        return math.nan
    return _value(reference[key]) - _value(artifact[key])


def retrieval_label(result: RetrievalResult) -> str:
    """``retrieval stdlib-code single dim 2048``: how checks and reports name one retrieval result."""
    dim = f" dim {result.dim}" if result.dim else ""
    return f"retrieval {result.dataset} {result.scoring}{dim}"


def resolution(queries: int) -> float:
    """The smallest drop a query-averaged metric can resolve: one query moving by a full point.

    Recall@100 over 100 queries moves in steps of 0.01, so a 0.005 bound would
    fail on a single query whose one relevant document slips from rank 100 to
    101, which says nothing about the artifact. A drop bound is never tighter
    than this step; use more queries (``--max-queries``) to tighten it.
    """
    return 1.0 / queries + 1e-9 if queries > 0 else 0.0  # 1e-9: 0.90 - 0.89 is 0.010000000000000009


# The threshold set that judges an output codec (jev4.quant.embeddings precision -> DEFAULTS key).
CODEC_THRESHOLDS = {
    "float16": "fp16",
    "int8": "emb-int8",
    "uint8": "emb-int8",
    "int4": "emb-int4",
    "ternary": "emb-ternary",
    "binary": "emb-binary",
    "ubinary": "emb-binary",
}


def codec_thresholds(codec: str, path: Path | str | None = None) -> Thresholds:
    """Thresholds for an output codec (``binary+rescore`` is judged as ``binary``), with the same file overrides."""
    base = codec.split("+", 1)[0]
    if base not in CODEC_THRESHOLDS:
        raise ThresholdError(f"no thresholds for output codec {codec!r}; known: {', '.join(CODEC_THRESHOLDS)}")
    return load_thresholds(CODEC_THRESHOLDS[base], path)


def codec_checks(results: list[CodecResult], judged: dict[str, Thresholds]) -> list[MetricCheck]:
    """nDCG@10 and Recall@100 lost by each judged codec against the same embeddings in float32."""
    checks = []
    for result in results:
        if result.codec not in judged:
            continue
        t = judged[result.codec]
        floor = resolution(result.queries)
        label = f"codec {result.codec} {result.dataset} {result.scoring} dim {result.dim}"
        for key, bound in (("ndcg@10", t.ndcg_drop_max), ("recall@100", t.recall_drop_max)):
            drop = _drop(result.float_metrics, result.metrics, key)
            checks.append(MetricCheck(f"{label}: {METRIC_LABELS[key]} drop vs float32", drop, maximum=max(bound, floor)))
    return checks


def evaluate(
    parity: ParityResult | None,
    retrieval: list[RetrievalResult],
    sts: list[STSResult],
    thresholds: Thresholds,
) -> list[MetricCheck]:
    """One check per thresholded number, named so that a failure says what failed and where.

    Parity (if measured): min and mean single-vector cosine at every dim
    present, per-token multi-vector min cosine, MaxSim Pearson, top-10
    overlap, score Spearman. Retrieval: nDCG@10 and Recall@100 drops for every
    dataset x scoring x dim, bounded by the threshold or one query's worth
    (``resolution``), whichever is larger. STS: Spearman drop per dataset. A missing or NaN
    number fails its check.
    """
    t = thresholds
    checks: list[MetricCheck] = []
    if parity is not None:
        for dim in sorted(parity.single_cosine_min, key=_dim_order):
            checks.append(MetricCheck(f"parity: single-vector min cosine (dim {dim})", _value(parity.single_cosine_min[dim]), minimum=t.single_cosine_min))
        for dim in sorted(parity.single_cosine_mean, key=_dim_order):
            checks.append(MetricCheck(f"parity: single-vector mean cosine (dim {dim})", _value(parity.single_cosine_mean[dim]), minimum=t.single_cosine_mean))
        if parity.multi_token_cosine_min is not None:  # None: the artifact serves no multi-vectors (the report says so)
            checks += [
                MetricCheck("parity: multi-vector per-token min cosine", _value(parity.multi_token_cosine_min), minimum=t.multi_token_cosine_min),
                MetricCheck("parity: MaxSim score Pearson", _value(parity.maxsim_pearson), minimum=t.maxsim_pearson_min),
            ]
        checks += [
            MetricCheck("parity: top-10 overlap", _value(parity.topk_overlap), minimum=t.topk_overlap_min),
            MetricCheck("parity: query-document score Spearman", _value(parity.score_spearman), minimum=t.score_spearman_min),
        ]
    for result in retrieval:
        label = retrieval_label(result)
        floor = resolution(result.queries)
        checks.append(MetricCheck(f"{label}: nDCG@10 drop", _drop(result.reference, result.artifact, "ndcg@10"), maximum=max(t.ndcg_drop_max, floor)))
        checks.append(MetricCheck(f"{label}: Recall@100 drop", _drop(result.reference, result.artifact, "recall@100"), maximum=max(t.recall_drop_max, floor)))
    for item in sts:
        drop = _value(item.reference_spearman) - _value(item.artifact_spearman)
        checks.append(MetricCheck(f"sts {item.dataset}: Spearman drop", drop, maximum=t.sts_drop_max))
    return checks


def evaluate_clip(parity: list[CosineParity], retrieval: list[RetrievalResult], thresholds: ClipThresholds) -> list[MetricCheck]:
    """jina-clip-v2's checks, named so that a failure says what failed and where.

    Parity: min and mean cosine of every input group at every dim.
    Retrieval (``retrieval``: one result per direction x dim, its dataset
    named ``"<set> (<direction>)"``): nDCG@10 and Recall@10 drops, bounded by
    the threshold or one query's worth (``resolution``), whichever is larger.
    A missing or NaN number fails its check.
    """
    t = thresholds
    checks: list[MetricCheck] = []
    for p in parity:
        checks.append(MetricCheck(f"parity: {p.inputs} min cosine (dim {p.dim})", _value(p.min_cosine), minimum=t.cosine_min))
        checks.append(MetricCheck(f"parity: {p.inputs} mean cosine (dim {p.dim})", _value(p.mean_cosine), minimum=t.cosine_mean))
    for result in retrieval:
        label = retrieval_label(result)
        floor = resolution(result.queries)
        checks.append(MetricCheck(f"{label}: nDCG@10 drop", _drop(result.reference, result.artifact, "ndcg@10"), maximum=max(t.ndcg_drop_max, floor)))
        checks.append(MetricCheck(f"{label}: Recall@10 drop", _drop(result.reference, result.artifact, "recall@10"), maximum=max(t.recall_drop_max, floor)))
    return checks
