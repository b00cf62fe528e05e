"""Quantization recipes: frozen, versioned descriptions of *what* is quantized and *how*.

A recipe is data: the 8-bit format (FP8 E4M3 or INT8), the scale
granularity of weights and activations, the calibration method, optional
SmoothQuant smoothing, and which modules stay in float (by module-name
pattern). It validates itself on construction, serialises to JSON with a
version number (recorded verbatim in the artifact manifest) and is read back
with :meth:`QuantRecipe.from_json`. The code that applies a recipe lives in
:mod:`jev4.quant.weights` and :mod:`jev4.export.onnx_qdq`.

Two presets, built by :func:`make_recipe`:

- ``fp8``: FP8 E4M3 weights and activations, per-tensor activation scales
  from max calibration, per-tensor weight scales by default (the layout
  TensorRT fuses into FP8 GEMMs, and ModelOpt's ``FP8_DEFAULT_CFG``);
  ``per-channel`` weights are an option.
- ``int8``: SmoothQuant-style W8A8: per-channel symmetric INT8 weights
  (narrow range, +-127), per-tensor INT8 activations, smoothing strength
  ``alpha`` 0.5 folded into the preceding norm / projection.

Exclusions are ``fnmatch`` patterns over module names as the network names
them (``model.language_model.layers.0.mlp.down_proj``,
``model.visual.blocks.3.attn.qkv``, ``multi_vector_projector``);
``{last}`` stands for the last vision block's index. A module is kept in
float when *any* pattern matches it. ``make_recipe(..., exclude=...)``
takes the CLI's ``--quant-exclude`` values: ``PATTERN`` adds an exclusion,
``!PATTERN`` removes one of the defaults (so ``!model.visual.*`` quantizes
the vision tower while its fp16-overflowing layers stay excluded).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from jev4.errors import Jev4Error

__all__ = [
    "DEFAULT_EXCLUDE",
    "PRECISIONS",
    "RECIPE_VERSION",
    "QuantRecipe",
    "RecipeError",
    "make_recipe",
]

RECIPE_VERSION = 1
PRECISIONS = ("fp8", "int8")
GRANULARITIES = ("per-channel", "per-tensor")
CALIBRATION_METHODS = ("max",)
# Largest magnitude of each format: E4M3FN's finite maximum; INT8 narrow range (symmetric, no -128).
QMAX = {"fp8": 448.0, "int8": 127.0}
ONNX_TYPE = {"fp8": "FLOAT8E4M3FN", "int8": "INT8"}

# Default exclusions, each with the reason (docs/quantization.md repeats them).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    # Token embeddings: a Gather, not a matmul; nothing to gain, and it is read once per token.
    "*embed_tokens*",
    # RMSNorms (and their weights, which SmoothQuant rescales): elementwise, kept in float.
    "*norm*",
    # The 2048 -> 128 multi-vector head: its output *is* the per-token embedding, no later layer averages its error out.
    "multi_vector_projector",
    # Qwen2.5-VL's language-model head: unused by embeddings (not even built), listed so a checkpoint carrying it never quantizes it.
    "lm_head",
    # The vision tower: only ~0.67B of 3.8B parameters, and its activations reach fp16's range (see the next two).
    "model.visual.*",
    # Qwen2.5-VL-3B overflows fp16 in the last vision block's down_proj and in the merger (NVIDIA keeps both in fp32);
    # they stay excluded even when the tower is un-excluded with '!model.visual.*'.
    "model.visual.blocks.{last}.mlp.down_proj",
    "model.visual.merger*",
)


class RecipeError(Jev4Error, ValueError):
    """A quantization recipe (or a --quant-exclude pattern) that is not valid."""


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize: format, scale granularity, calibration, smoothing, exclusions.

    ``smoothquant_alpha`` (INT8 only): migrate activation outliers into the
    weights with ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; ``None`` turns
    smoothing off. ``exclude`` holds the patterns of modules kept in float.
    """

    precision: str
    weight_granularity: str
    activation_granularity: str = "per-tensor"
    calibration: str = "max"
    smoothquant_alpha: float | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RecipeError(f"unknown quantization precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.weight_granularity not in GRANULARITIES:
            raise RecipeError(f"weight granularity {self.weight_granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        if self.activation_granularity != "per-tensor":
            # Static per-channel activation scales cannot be fused by TensorRT into a GEMM; per-token needs dynamic quantization.
            raise RecipeError(f"activation granularity {self.activation_granularity!r}: only per-tensor is supported")
        if self.calibration not in CALIBRATION_METHODS:
            raise RecipeError(f"calibration {self.calibration!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        if self.smoothquant_alpha is not None:
            if self.precision != "int8":
                raise RecipeError("SmoothQuant smoothing applies to int8 recipes only")
            alpha = self.smoothquant_alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
                raise RecipeError(f"smoothquant_alpha must be a number in [0, 1], got {alpha!r}")
            object.__setattr__(self, "smoothquant_alpha", float(alpha))
        if isinstance(self.exclude, str) or not all(isinstance(p, str) and p for p in self.exclude):
            raise RecipeError(f"exclude must be a sequence of non-empty patterns, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is not supported (this jev4 writes and reads version {RECIPE_VERSION})")

    @property
    def qmax(self) -> float:
        """Largest quantized magnitude: 448 (E4M3FN) or 127 (INT8, narrow range)."""
        return QMAX[self.precision]

    @property
    def onnx_type(self) -> str:
        """The ONNX element type of quantized tensors: ``FLOAT8E4M3FN`` or ``INT8``."""
        return ONNX_TYPE[self.precision]

    def excluded_by(self, module: str, last_vision_block: int | None = None) -> str | None:
        """The first pattern that keeps ``module`` in float, or ``None`` if the module is quantized."""
        for pattern in self.exclude:
            resolved = _resolve(pattern, last_vision_block)
            if resolved is not None and fnmatch.fnmatchcase(module, resolved):
                return pattern
        return None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude"] = list(self.exclude)
        return {"kind": "jev4-quant-recipe", **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuantRecipe:
        if not isinstance(data, Mapping) or data.get("kind") != "jev4-quant-recipe":
            raise RecipeError("not a jev4 quantization recipe (expected a JSON object with kind 'jev4-quant-recipe')")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"kind"})
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in data.items() if k != "kind"}
        if "exclude" in values and isinstance(values["exclude"], list):
            values["exclude"] = tuple(values["exclude"])
        return cls(**values)


def _resolve(pattern: str, last_vision_block: int | None) -> str | None:
    """``pattern`` with ``{last}`` filled in; ``None`` when it needs a vision tower there is none of."""
    if "{last}" not in pattern:
        return pattern
    if last_vision_block is None:
        return None
    return pattern.replace("{last}", str(last_vision_block))


def make_recipe(
    precision: str,
    weight_granularity: str | None = None,
    exclude: Iterable[str] = (),
    smoothquant_alpha: float | None = 0.5,
) -> QuantRecipe:
    """The ``fp8`` or ``int8`` preset, with the CLI's overrides applied.

    ``weight_granularity`` defaults to per-tensor for fp8 and per-channel for
    int8. ``exclude`` items are ``PATTERN`` (exclude more) or ``!PATTERN``
    (drop a default exclusion, which must be one of :data:`DEFAULT_EXCLUDE`).
    ``smoothquant_alpha`` applies to int8 only (``None``: no smoothing).
    """
    if precision not in PRECISIONS:
        raise RecipeError(f"unknown quantization precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    patterns = list(DEFAULT_EXCLUDE)
    for item in exclude:
        if not isinstance(item, str) or not item.strip("!"):
            raise RecipeError(f"--quant-exclude: empty pattern {item!r}")
        if item.startswith("!"):
            target = item[1:]
            if target not in patterns:
                raise RecipeError(f"--quant-exclude {item!r}: {target!r} is not an exclusion to remove; the current ones are {patterns}")
            patterns.remove(target)
        elif item not in patterns:
            patterns.append(item)
    granularity = weight_granularity or ("per-tensor" if precision == "fp8" else "per-channel")
    return QuantRecipe(
        precision=precision,
        weight_granularity=granularity,
        smoothquant_alpha=smoothquant_alpha if precision == "int8" else None,
        exclude=tuple(patterns),
    )
