"""Applying a recipe to a network: which Linears, SmoothQuant folding, 8-bit weights and scales.

:func:`build_plan` turns a float network, a :class:`~jev4.quant.recipes.QuantRecipe`
and calibrated activation ranges into a :class:`QuantPlan`: for every
quantized ``nn.Linear`` its 8-bit weight (``[out, in]``, ``torch.float8_e4m3fn``
or ``torch.int8``), the weight scale (one per output channel, or one per
tensor) and the per-tensor input scale. The ONNX writer
(:mod:`jev4.export.onnx_qdq`) stores exactly these tensors, and
:func:`fake_quantized` runs the same arithmetic in torch, so the graph can be
checked against an emulation that shares every number with it.

Arithmetic (the ONNX / TensorRT definitions, symmetric, zero point 0):

- scale = amax / qmax, qmax 448 (E4M3FN) or 127 (INT8); an all-zero
  tensor or channel gets scale 1 (any positive value quantizes it to 0),
  so every scale is finite and positive.
- FP8: ``q = cast_e4m3fn(clamp(x / scale, -448, 448))`` (round to nearest even,
  saturating, as ONNX ``QuantizeLinear`` with ``saturate=1``).
- INT8: ``q = clamp(round_half_even(x / scale), lo, 127)``; weights use the
  narrow range (lo = -127, so +-amax map to +-127), activations the full
  range of ``QuantizeLinear`` (lo = -128).
- dequantize: ``q * scale``.

SmoothQuant (:func:`smooth`, INT8 only): for a group of Linears reading the
same activation ``X`` (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``, down after ``up_proj``; the vision blocks'
``norm1``/``norm2`` likewise), ``s_j = max|X_j|^a / max_i|W_ij|^(1-a)``;
the producer's output is divided by ``s`` (a norm's weight, or a
projection's output rows) and each consumer's input columns multiplied by
``s``. In exact arithmetic the network is unchanged; activation outliers
move into the weights, which per-channel scales absorb. ``o_proj`` is not
smoothed: its producer is attention over ``v_proj``, whose grouped heads
would force one factor per shared channel (the original SmoothQuant recipe
for Llama smooths the same groups as here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from jev4.errors import Jev4Error
from jev4.quant.recipes import QuantRecipe

log = logging.getLogger(__name__)

__all__ = [
    "QuantPlan",
    "QuantizedLinear",
    "build_plan",
    "dequantize",
    "fake_quant",
    "fake_quantized",
    "quantize",
    "select_linears",
    "smooth",
]

TORCH_QTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
# (producer, consumers): "{p}" is a block prefix found in the network. Order matters only for logging.
SMOOTH_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("{p}.input_layernorm", ("{p}.self_attn.q_proj", "{p}.self_attn.k_proj", "{p}.self_attn.v_proj")),
    ("{p}.post_attention_layernorm", ("{p}.mlp.gate_proj", "{p}.mlp.up_proj")),
    ("{p}.mlp.up_proj", ("{p}.mlp.down_proj",)),
    ("{p}.norm1", ("{p}.attn.qkv",)),
    ("{p}.norm2", ("{p}.mlp.gate_proj", "{p}.mlp.up_proj")),
)
SMOOTH_MIN = 1e-5


class QuantizationError(Jev4Error):
    """A recipe cannot be applied to this network (nothing to quantize, bad statistics, a broken group)."""


# ----------------------------------------------------------------------------------------------
# Elementwise arithmetic


def _scale_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    amax = amax.float()
    return torch.where((amax > 0) & torch.isfinite(amax), amax / qmax, torch.ones_like(amax))


def _broadcast(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or scale.dim() == 0:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, precision: str, axis: int | None = None, narrow: bool = False) -> torch.Tensor:
    """``x / scale`` in the 8-bit format (see module doc); ``axis`` is the per-channel axis of ``scale``."""
    scaled = x.float() / _broadcast(scale.float(), x, axis)
    if precision == "fp8":
        return scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    if precision == "int8":
        return torch.round(scaled).clamp(-127.0 if narrow else -128.0, 127.0).to(torch.int8)
    raise QuantizationError(f"unknown precision {precision!r}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``q * scale`` in fp32."""
    return q.float() * _broadcast(scale.float(), q, axis)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """QuantizeLinear -> DequantizeLinear on an activation (per-tensor scale), in ``x``'s dtype."""
    return dequantize(quantize(x, scale, precision), scale).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Which modules


def last_vision_block(network: nn.Module) -> int | None:
    """Index of the last vision block (what ``{last}`` in a pattern means), or None without a tower."""
    try:
        blocks = network.get_submodule("model.visual.blocks")
    except AttributeError:
        return None
    return len(blocks) - 1


def select_linears(network: nn.Module, recipe: QuantRecipe) -> tuple[list[str], dict[str, str]]:
    """(names of the Linears to quantize, {excluded Linear: the pattern that excludes it})."""
    last = last_vision_block(network)
    quantized: list[str] = []
    excluded: dict[str, str] = {}
    for name, module in network.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        pattern = recipe.excluded_by(name, last)
        if pattern is None:
            quantized.append(name)
        else:
            excluded[name] = pattern
    if not quantized:
        raise QuantizationError(f"the recipe's exclusions {list(recipe.exclude)} leave no Linear layer to quantize")
    return quantized, excluded


# ----------------------------------------------------------------------------------------------
# SmoothQuant


def _block_prefixes(names: set[str], suffix: str) -> list[str]:
    return sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))


def smooth(network: nn.Module, absmax: dict[str, torch.Tensor], alpha: float, quantized: list[str]) -> dict[str, list[str]]:
    """Fold SmoothQuant factors into ``network`` (in place) and divide ``absmax`` of the consumers by them.

    Returns ``{producer: [consumers]}`` of the groups smoothed: those with at
    least one quantized consumer and calibration statistics for it. Every
    consumer of a group is rescaled (quantized or not), so the float network
    computes the same function before and after.
    """
    modules = dict(network.named_modules())
    quantized_set = set(quantized)
    done: dict[str, list[str]] = {}
    for producer_t, consumers_t in SMOOTH_GROUPS:
        suffix = consumers_t[0].removeprefix("{p}")
        for prefix in _block_prefixes(set(modules), suffix):
            producer = producer_t.format(p=prefix)
            consumers = [c.format(p=prefix) for c in consumers_t]
            if producer not in modules or any(c not in modules for c in consumers):
                continue
            if not any(c in quantized_set for c in consumers):
                continue
            stat = next((absmax[c] for c in consumers if c in absmax), None)
            if stat is None:
                continue
            s = _smoothing_factors(stat, [modules[c].weight for c in consumers], alpha)
            _divide_output(modules[producer], s, producer)
            with torch.no_grad():
                for c in consumers:
                    modules[c].weight.mul_(s.to(modules[c].weight.dtype)[None, :])
                    if c in absmax:
                        absmax[c] = absmax[c] / s
            done[producer] = consumers
    log.info("SmoothQuant (alpha %.2f): smoothed %d groups", alpha, len(done))
    return done


def _smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    act = act_absmax.float()
    s = act.clamp(min=SMOOTH_MIN).pow(alpha) / w_absmax.clamp(min=SMOOTH_MIN).pow(1.0 - alpha)
    s = torch.where((act > 0) & (w_absmax > 0), s, torch.ones_like(s)).clamp(min=SMOOTH_MIN)
    if not torch.isfinite(s).all():
        raise QuantizationError("SmoothQuant factors are not finite")
    return s


def _divide_output(module: nn.Module, s: torch.Tensor, name: str) -> None:
    """Divide what ``module`` outputs by ``s`` along its last axis: a norm's weight, or a Linear's rows (and bias)."""
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            if module.out_features != s.numel():
                raise QuantizationError(f"{name}: {module.out_features} outputs, smoothing has {s.numel()} factors")
            module.weight.div_(s.to(module.weight.dtype)[:, None])
            if module.bias is not None:
                module.bias.div_(s.to(module.bias.dtype))
            return
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
            raise QuantizationError(f"{name}: cannot fold smoothing factors into a {type(module).__name__} (needs a weight of shape {tuple(s.shape)})")
        weight.div_(s.to(weight.dtype))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized Linear: 8-bit weight ``[out, in]``, its scale(s), and the per-tensor input scale."""

    name: str
    weight: torch.Tensor
    weight_scale: torch.Tensor  # fp32: [out] per-channel, [] per-tensor
    input_scale: torch.Tensor  # fp32 scalar
    input_amax: float

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.dim() == 1

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, 0 if self.per_channel else None)


@dataclass
class QuantPlan:
    """Everything the Q/DQ writer needs, and what the manifest records."""

    recipe: QuantRecipe
    modules: dict[str, QuantizedLinear]
    excluded: dict[str, str]
    smoothed: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict:
        input_scales = [float(q.input_scale) for q in self.modules.values()]
        return {
            "recipe": self.recipe.to_json(),
            "quantized_modules": sorted(self.modules),
            "excluded_modules": dict(sorted(self.excluded.items())),
            "smoothed_groups": dict(sorted(self.smoothed.items())),
            "input_scale_range": [min(input_scales), max(input_scales)],
        }


def build_plan(
    network: nn.Module,
    recipe: QuantRecipe,
    absmax: Mapping[str, torch.Tensor],
    quantized: list[str],
    excluded: dict[str, str],
    scale_dtype: torch.dtype = torch.float32,
) -> QuantPlan:
    """Quantize the current weights of ``quantized`` Linears and derive input scales from ``absmax``.

    ``scale_dtype`` is the dtype the graph stores scales in (its float
    dtype): scales are rounded to it *before* the weights are quantized, so
    the stored 8-bit weights and the stored scales agree exactly.
    """
    modules: dict[str, QuantizedLinear] = {}

    def scale_of(amax: torch.Tensor) -> torch.Tensor:
        scale = _scale_from_amax(amax, recipe.qmax)
        return scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()

    for name in quantized:
        linear = network.get_submodule(name)
        if name not in absmax:
            raise QuantizationError(f"{name}: no calibration statistics")
        weight = linear.weight.detach().float()
        if recipe.weight_granularity == "per-channel":
            w_scale, axis = scale_of(weight.abs().amax(dim=1)), 0
        else:
            w_scale, axis = scale_of(weight.abs().amax()), None
        amax = absmax[name].float().amax()
        modules[name] = QuantizedLinear(
            name=name,
            weight=quantize(weight, w_scale, recipe.precision, axis, narrow=True),
            weight_scale=w_scale,
            input_scale=scale_of(amax),
            input_amax=float(amax),
        )
    return QuantPlan(recipe, modules, dict(excluded))


@contextmanager
def fake_quantized(network: nn.Module, plan: QuantPlan) -> Iterator[None]:
    """Within the block, every planned Linear computes ``linear(QDQ(x), DQ(W_q), b)`` (torch emulation).

    Sets ``forward`` on the Linear instances only, and removes it on exit.
    """
    patched = []
    try:
        for name, q in plan.modules.items():
            linear = network.get_submodule(name)
            if "forward" in vars(linear):
                raise RuntimeError(f"{name} is already patched")
            weight = q.dequantized_weight().to(linear.weight.dtype)
            precision = plan.recipe.precision

            def forward(x: torch.Tensor, _w=weight, _b=linear.bias, _s=q.input_scale, _p=precision) -> torch.Tensor:
                return F.linear(fake_quant(x, _s, _p), _w, _b)

            linear.forward = forward
            patched.append(linear)
        yield
    finally:
        for linear in patched:
            vars(linear).pop("forward", None)
