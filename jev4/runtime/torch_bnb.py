"""bitsandbytes weight quantization of the merged network: LLM.int8() or NF4.

Why offer it beside FP8: it runs on GPUs without FP8 tensor cores (A100,
T4...) and on CPU, and it shrinks the weights (int8: half of bf16; NF4: a
quarter). It is a memory saver, not a speed path: bitsandbytes dequantizes
(NF4) or splits out outlier columns (int8) inside every call.

* ``int8``: ``bnb.nn.Linear8bitLt`` (LLM.int8(): per-row absmax int8
  weights; activation columns with a value above ``int8_threshold`` run in
  16-bit, the rest in int8).
* ``nf4``: ``bnb.nn.Linear4bit(quant_type="nf4")``: 4-bit NormalFloat
  weights in blocks of ``nf4_blocksize``, dequantized to the network's dtype
  for the matmul.

Layers are chosen exactly as for FP8 (``jev4.runtime.layer_select``: the
language model's layers; not embeddings, norms, the projector, the vision
tower). bitsandbytes quantizes a weight when its parameter moves from CPU to
a device, so each layer's weight is copied to CPU, wrapped, and moved to
the network's device. Measured on the tiny model (CPU, fp32), mean
single-vector cosine to the reference: see tests/runtime/test_bnb.py.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from jev4.errors import MissingDependencyError
from jev4.runtime.layer_select import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, LayerSelection, replace_module, select_linears
from jev4.runtime.torch_fp8 import QuantizationError

log = logging.getLogger(__name__)

__all__ = ["BNB_SCHEMES", "BnbSettings", "import_bitsandbytes", "quantize_model_bnb"]

BNB_SCHEMES = ("int8", "nf4")


@dataclass(frozen=True)
class BnbSettings:
    """How ``quantize_model_bnb`` quantizes; ``to_json`` for reports."""

    scheme: str = "int8"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    int8_threshold: float = 6.0  # LLM.int8() outlier threshold (bitsandbytes' and transformers' default)
    nf4_blocksize: int = 64
    nf4_double_quant: bool = False  # quantize the NF4 block scales too (saves ~0.4 bit/weight)
    version: int = 1

    def __post_init__(self) -> None:
        if self.scheme not in BNB_SCHEMES:
            raise QuantizationError(f"unknown bitsandbytes scheme {self.scheme!r}; choose one of {BNB_SCHEMES}")
        if self.int8_threshold < 0:
            raise QuantizationError(f"int8_threshold must be >= 0, got {self.int8_threshold}")
        if self.nf4_blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QuantizationError(f"nf4_blocksize must be a power of two in 32..4096, got {self.nf4_blocksize}")

    def to_json(self) -> dict:
        return {**asdict(self), "scheme": f"bnb-{self.scheme}", "include": list(self.include), "exclude": list(self.exclude)}


def import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise MissingDependencyError("bitsandbytes is not installed: pip install bitsandbytes (or pip install 'jev4[bnb]')") from None
    return bitsandbytes


# Layers are built on the meta device (no throw-away init of a random weight), then given the real weights.
def _int8_layer(bnb, linear: nn.Linear, settings: BnbSettings, device: torch.device) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=settings.int8_threshold, device="meta"
    )
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu", copy=True), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu", copy=True), requires_grad=False)
    return layer.to(device)  # CPU -> device quantizes the weight (also for device "cpu")


def _nf4_layer(bnb, linear: nn.Linear, settings: BnbSettings, device: torch.device) -> nn.Module:
    dtype = linear.weight.dtype
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        compress_statistics=settings.nf4_double_quant,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().to("cpu", copy=True),
        requires_grad=False,
        blocksize=settings.nf4_blocksize,
        compress_statistics=settings.nf4_double_quant,
        quant_type="nf4",
        module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu", copy=True), requires_grad=False)
    return layer.to(device)


def quantize_model_bnb(network: nn.Module, settings: BnbSettings = BnbSettings()) -> LayerSelection:
    """Replace the selected ``nn.Linear`` layers by bitsandbytes layers, in place, on each layer's device."""
    bnb = import_bitsandbytes()
    chosen, excluded = select_linears(network, settings.include, settings.exclude)
    if not chosen:
        raise QuantizationError(f"no nn.Linear layer matches include={settings.include} outside exclude={settings.exclude}")
    build = _int8_layer if settings.scheme == "int8" else _nf4_layer
    with torch.no_grad():
        for name in chosen:
            linear = network.get_submodule(name)
            replace_module(network, name, build(bnb, linear, settings, linear.weight.device))
    log.info("bitsandbytes %s: %d Linear layers replaced, %d excluded by pattern", settings.scheme, len(chosen), len(excluded))
    return LayerSelection(tuple(chosen), tuple(excluded), {})
