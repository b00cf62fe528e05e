"""Real FP8 (E4M3) GEMMs in torch: ``FP8Linear`` and ``quantize_model_fp8``.

Why: on Ada/Hopper GPUs an FP8 tensor-core GEMM has twice the bf16 peak
(H100 SXM: 1979 vs 989 dense TFLOP/s) and the weights take half the memory.
``torch._scaled_mm`` runs that GEMM directly, so no TensorRT is needed.

Scheme (weight-and-activation FP8, no calibration):

* ``granularity="row"`` (default): weights get one scale per output channel
  (row of ``W``), computed once from the merged weights; activations get one
  scale per token (row of ``x``), computed on the fly from that token's
  max |x|. Outliers in one token or one channel then cost only that row's
  precision. ``_scaled_mm`` takes ``scale_a`` [M, 1] and ``scale_b`` [1, N],
  both float32 and contiguous ("row-wise scaling").
* ``granularity="tensor"``: one scale for the whole weight and one, dynamic,
  for the whole activation matrix (float32 scalars): the older recipe, kept
  for comparison and for GPUs/builds without row-wise kernels.

Values are scaled so that the row (or tensor) max maps to 448, the largest
E4M3 value, clamped, and cast. The product is accumulated in fp32 inside
the GEMM and written in the network's dtype (bf16 on GPU: torch's row-wise
kernels on compute capability < 9.0 only write bf16); the bias is added in
the GEMM epilogue. ``use_fast_accum`` (default on, as torchao's inference
recipes) lets Hopper accumulate in its faster, less precise FP8 mode.

Shapes: the CUDA kernels need ``in_features`` and ``out_features`` to be
multiples of 16 (the token count M is free). Layers that are not are left in
their original dtype and listed in ``LayerSelection.skipped``; no padding is
done. Every layer of jina-embeddings-v4's language model qualifies (2048,
256, 11008 are multiples of 16).

Accuracy: relative error (Frobenius) of one FP8 linear against fp32 on
Gaussian data is about 3.5-4% (E4M3 has a 3-bit mantissa: rounding error up
to 2^-4 relative, on both operands); tests bound it at 6%. Across the
network, the tiny model's mean single-vector cosine to the fp32 reference is
0.998 for every task (tests/runtime/test_torch_fp8.py; bar 0.99).

Speed: in eager mode each call quantizes its input with a few elementwise
passes (max |x|, multiply, clamp, cast), and q/k/v (and gate/up) each
quantized the same input. On an H100 that made the eager FP8 network slower
than bf16 (70k vs 77k tokens/s at 32 x 512, docs/benchmarks.md). Two
remedies, both on by default: layers that read the same input tensor share
one quantization of it (``share_input_quantization``: q/k/v once instead of
three times, gate/up once instead of twice), and on CUDA the quantizer is
``torch.compile``d on its own (``fused_quantizer``: one fused kernel for the
row max, scale and cast instead of five launches; compiling that small
function takes seconds, unlike compiling the whole model, which is
``load_quantized(..., compile=True)`` / bench mode ``torch-fp8-compile``).

On CPU torch runs ``_scaled_mm`` too (slowly): tests use it. On CUDA,
``check_fp8_device`` refuses GPUs below compute capability 8.9 with the GPU's
name and capability in the message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from jev4.errors import Jev4Error, ProviderError
from jev4.runtime.layer_select import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, LayerSelection, replace_module, select_linears

log = logging.getLogger(__name__)

__all__ = [
    "FP8_MAX",
    "GRANULARITIES",
    "MIN_FP8_CAPABILITY",
    "FP8Linear",
    "FP8Settings",
    "GPUCapabilityError",
    "QuantizationError",
    "check_fp8_device",
    "quantize_model_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
GRANULARITIES = ("row", "tensor")
MIN_FP8_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores
_ALIGN = 16  # _scaled_mm on CUDA: K and N multiples of 16
_EPS = 1e-12  # floor of a max |x|, so an all-zero row gets a finite scale


class QuantizationError(Jev4Error):
    """A quantization setting is invalid or cannot be applied to this network."""


class GPUCapabilityError(ProviderError):
    """The GPU asked for cannot run the requested scheme (e.g. FP8 below compute capability 8.9)."""


@dataclass(frozen=True)
class FP8Settings:
    """How ``quantize_model_fp8`` quantizes; serialisable (``to_json``) for manifests and reports."""

    granularity: str = "row"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    use_fast_accum: bool = True
    share_input_quantization: bool = True  # q/k/v (gate/up) quantize their common input once
    fused_quantizer: bool = True  # CUDA: torch.compile the activation quantizer into one kernel
    fused_min_tokens: int = 2048  # below this many tokens the eager quantizer is faster (compiled-call overhead)
    version: int = 2

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise QuantizationError(f"unknown FP8 granularity {self.granularity!r}; choose one of {GRANULARITIES}")
        for field_name in ("include", "exclude"):
            value = getattr(self, field_name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise QuantizationError(f"FP8Settings.{field_name} must be a tuple of glob patterns, got {value!r}")

    def to_json(self) -> dict:
        return {"scheme": "fp8-e4m3", **asdict(self), "include": list(self.include), "exclude": list(self.exclude)}


def _scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(multiplier to FP8 range, float32 dequantisation scale), consistent with each other."""
    inv = FP8_MAX / amax.float().clamp(min=_EPS)
    return inv, inv.reciprocal()


def _to_fp8(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    return (x * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(weight: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` [N, K] -> (E4M3 [N, K] row-major, float32 scale [1, N] (row) or scalar (tensor)); done in fp32."""
    w = weight.detach().float()
    if granularity == "row":
        inv, scale = _scales(w.abs().amax(dim=1, keepdim=True))  # [N, 1]
        return _to_fp8(w, inv).contiguous(), scale.reshape(1, -1).contiguous()
    inv, scale = _scales(w.abs().amax())
    return _to_fp8(w, inv).contiguous(), scale


def quantize_activation(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] -> (E4M3 [M, K] row-major, float32 scale [M, 1] (row) or scalar (tensor)).

    The multiply happens in ``x``'s dtype (no fp32 copy of a large
    activation); the multiplier is first rounded to that dtype and the scale
    handed to the GEMM is its exact reciprocal, so quantise and dequantise agree.
    """
    # max |x| in one pass (no |x| temporary); multiply, clamp in place, cast: three more passes in eager
    # mode, which torch.compile fuses into one kernel.
    if granularity == "row":
        amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)
    else:
        amax = torch.linalg.vector_norm(x, ord=float("inf"))
    inv = (FP8_MAX / amax.float().clamp(min=_EPS)).to(x.dtype)
    scaled = (x * inv).clamp_(-FP8_MAX, FP8_MAX)
    return scaled.to(FP8_DTYPE).contiguous(), inv.float().reciprocal().contiguous()


class InputQuantizer:
    """Quantizes a layer's input; layers given the same instance share one quantization of the same tensor.

    Sharing: q_proj, k_proj and v_proj are called one after the other on the
    same ``hidden_states`` object, so the second and third calls find it
    (same object, same in-place version counter outside inference mode) and reuse its FP8 copy. The
    cache holds one entry and is bypassed under ``torch.compile`` tracing
    (the compiler fuses and deduplicates by itself).
    """

    def __init__(self, granularity: str, fused: Callable | None = None, share: bool = True, fused_min_tokens: int = 2048) -> None:
        self.granularity = granularity
        self.share = share
        self._fused = fused
        self.fused_min_tokens = fused_min_tokens
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hits = 0

    def _quantize(self, flat: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
        # The compiled kernel pays ~0.2 ms of guard and launch overhead per call: a loss for a few tokens
        # (measured: batch 1 x 128 took 80 ms compiled vs 46 ms eager on an H100), a gain for many.
        if self._fused is not None and flat.shape[0] >= self.fused_min_tokens:
            return self._fused(flat, granularity)
        return quantize_activation(flat, granularity)

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        if not self.share or torch.compiler.is_compiling():
            return self._quantize(flat, self.granularity)
        # Inference-mode tensors keep no version counter; there the key is the object alone, which is
        # safe for what shares a quantizer: sibling layers called by one parent on its unchanged input.
        key = (x, None if x.is_inference() else x._version, dtype)
        if self._key is not None and self._key[0] is x and self._key[1:] == key[1:]:
            self.hits += 1
            return self._value
        self._key, self._value = None, None  # drop the old entry before computing the new one
        value = self._quantize(flat, self.granularity)
        self._key, self._value = key, value
        return value

    def clear(self) -> None:
        """Forget the cached input (it holds a reference to the last activation)."""
        self._key = self._value = None


class FP8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in E4M3 and ``x`` quantized per call; one ``torch._scaled_mm``.

    Buffers, not parameters: the layer is inference-only.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
        granularity: str,
        use_fast_accum: bool,
        quantizer: InputQuantizer | None = None,
    ):
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise QuantizationError(f"FP8Linear needs a 2-D {FP8_DTYPE} weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.granularity = granularity
        self.use_fast_accum = use_fast_accum
        self.out_dtype = out_dtype
        self.quantizer = quantizer or InputQuantizer(granularity, share=False)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", bias.detach().to(out_dtype) if bias is not None else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "row", use_fast_accum: bool = True, quantizer: InputQuantizer | None = None) -> FP8Linear:
        weight, scale = quantize_weight(linear.weight, granularity)
        return cls(weight, scale, linear.bias, linear.weight.dtype, granularity, use_fast_accum, quantizer)

    def dequantized_weight(self) -> torch.Tensor:
        """``W`` as the GEMM sees it, in fp32 (for tests and error analysis)."""
        scale = self.weight_scale.reshape(-1, 1) if self.granularity == "row" else self.weight_scale
        return self.weight.float() * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"FP8Linear expects {self.in_features} input features, got {x.shape[-1]}")
        lead = x.shape[:-1]
        xq, x_scale = self.quantizer(x, self.out_dtype)
        out = torch._scaled_mm(
            xq,
            self.weight.t(),  # [K, N] column-major, as the kernels want
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
            use_fast_accum=self.use_fast_accum,
        )
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, granularity={self.granularity}"


def check_fp8_device(device: torch.device | str) -> None:
    """Refuse devices that cannot run FP8 GEMMs, naming the GPU and its compute capability.

    CPU is allowed (torch emulates it, slowly: for tests). CUDA needs compute
    capability >= 8.9 (Ada, Hopper, Blackwell); an A100 (8.0) has no FP8
    tensor cores.
    """
    device = torch.device(device)
    if device.type == "cpu":
        log.info("FP8 GEMMs on CPU: correct but slow (for tests, not speed)")
        return
    if device.type != "cuda":
        raise GPUCapabilityError(f"FP8 GEMMs run on CUDA GPUs (compute capability >= 8.9) or on CPU; got device {str(device)!r}")
    if not torch.cuda.is_available():
        raise ProviderError(f"device {str(device)!r} was asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability < MIN_FP8_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        raise GPUCapabilityError(
            f"FP8 needs a GPU of compute capability >= {MIN_FP8_CAPABILITY[0]}.{MIN_FP8_CAPABILITY[1]} (Ada, Hopper or newer); "
            f"cuda:{index} is {name} with compute capability {capability[0]}.{capability[1]}. "
            "Use the bf16 reference or quantization='bnb-int8' on this GPU."
        )


def quantize_model_fp8(network: nn.Module, settings: FP8Settings = FP8Settings()) -> LayerSelection:
    """Replace the selected ``nn.Linear`` layers of ``network`` by ``FP8Linear``, in place.

    Call it on merged weights (no LoRA wrappers: they are not plain Linear
    and would be left alone). Layers whose in/out features are not multiples
    of 16 are kept as they are and reported in ``skipped``.
    """
    chosen, excluded = select_linears(network, settings.include, settings.exclude)
    if not chosen:
        raise QuantizationError(f"no nn.Linear layer matches include={settings.include} outside exclude={settings.exclude}")
    check_fp8_device(network.get_submodule(chosen[0]).weight.device)
    device = network.get_submodule(chosen[0]).weight.device
    fused = settings.fused_quantizer and device.type == "cuda"  # CPU: inductor would need a C++ toolchain
    # One quantizer for the whole network, so one cached input at a time: q's input is reused by k and v,
    # gate's by up, and each new input (o, gate, down, the next layer's q) replaces the entry; the entry is
    # dropped when the network's forward returns. (One cache per block would keep every layer's input alive.)
    quantizer = InputQuantizer(
        settings.granularity,
        torch.compile(quantize_activation, dynamic=True) if fused else None,
        settings.share_input_quantization,
        settings.fused_min_tokens,
    )
    replaced, skipped = [], {}
    with torch.no_grad():
        for name in chosen:
            linear = network.get_submodule(name)
            if linear.in_features % _ALIGN or linear.out_features % _ALIGN:
                skipped[name] = f"shape {linear.out_features}x{linear.in_features} is not a multiple of {_ALIGN}: kept in {linear.weight.dtype}"
                continue
            replace_module(network, name, FP8Linear.from_linear(linear, settings.granularity, settings.use_fast_accum, quantizer))
            replaced.append(name)
    network.register_forward_hook(lambda *_: quantizer.clear())
    for name, reason in skipped.items():
        log.warning("FP8: %s %s", name, reason)
    log.info("FP8 (%s): %d Linear layers replaced, %d excluded by pattern, %d skipped", settings.granularity, len(replaced), len(excluded), len(skipped))
    return LayerSelection(tuple(replaced), tuple(excluded), skipped)
