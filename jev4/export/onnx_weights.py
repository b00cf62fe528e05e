"""``jev4-export --format onnx --weights int4|int8``: weight-only quantization of ``language.onnx`` for CPUs.

Both precisions use onnxruntime's own quantizers on the finished float graph
(jev4's unfused export or the ``--fused`` graph alike), so what runs is what
onnxruntime's CPU kernels were written for:

- ``int4``: ``MatMulNBitsQuantizer`` replaces each weight MatMul with the
  ``com.microsoft.MatMulNBits`` contrib op: 4-bit weights in blocks of
  ``block_size`` along K, one fp32 scale (and a 4-bit zero point when
  asymmetric) per block. ``accuracy_level`` 4 lets the CPU kernel quantize
  the activations to int8 per block and run int8 dot products (AVX-512 VNNI /
  AVX2), the fast path on CPUs; level 1 keeps fp32 activations (slower, a
  little closer to float). Measured on the tiny checkpoint (docs/edge.md):
  level 4 and level 1 differ by less than the 4-bit weight error itself.
- ``int8``: ``quantize_dynamic``: int8 weights (per output channel) and
  activations quantized per call (``DynamicQuantizeLinear`` -> ``MatMulInteger``,
  fused by onnxruntime into ``DynamicQuantizeMatMul``). Only MatMuls with a
  constant weight are touched (``MatMulConstBOnly``), so attention's
  activation x activation products stay float. ``reduce_range`` is on
  (7-bit weights, -64..64): onnxruntime's u8s8 kernels on x86 CPUs without
  VNNI (AVX2 only) add pairs of u8 x s8 products in 16 bits with saturation
  (``vpmaddubsw``), which full 8-bit weights can overflow. Measured on an
  AMD EPYC with AVX2 and no VNNI (docs/edge.md): the tiny jina-clip-v2 vision
  graph fell to cosine 0.9657 at batch 1 with 8-bit weights, 0.9988 with
  7-bit. An artifact cannot know which CPU will run it, so the safe range is
  the default; ``reduce_range=False`` is for fleets known to have VNNI.

What stays float, and why: the token embedding gather (a lookup, no compute
to gain, and the full model's largest single tensor is read a row at a time),
RMSNorms, rotary tables, attention itself, pooling and the multi-vector
projector (2048 -> 128: 0.01% of the weights, and its error lands directly
on every multi-vector token; measured in ``docs/edge.md``). The projector
is found by the module path the exporter records on every node
(``pkg.torch.onnx.name_scopes``), so a renamed node cannot slip through.

External data: both quantizers load the float graph with its weights into
memory (the full-size model: 3.09B parameters, 12.4 GB in fp32) and write
the quantized one with ``use_external_data_format``; jev4 then renames that
graph and its data file into place without loading them again
(:func:`jev4.export.onnx_files.move_graph`). Nothing else may hold the
network while this runs: on a 24 GiB machine the float graph and a float
network do not fit together.
"""

from __future__ import annotations

import ast
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jev4.errors import Jev4Error, SettingsError
from jev4.export.onnx_files import move_graph

log = logging.getLogger(__name__)

__all__ = ["WEIGHT_PRECISIONS", "WeightQuantError", "WeightQuantSettings", "precision_name", "projector_nodes", "quantize_weights"]

WEIGHT_PRECISIONS = ("int4", "int8")
SETTINGS_VERSION = 2  # 2: int8 records reduce_range (on by default)
_BLOCK_SIZES = (16, 32, 64, 128, 256)
_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# Ops that only onnxruntime registers, in the default domain (the fused graph has them); onnx.checker refuses them.
_ORT_ONLY_DEFAULT_DOMAIN = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
DEFAULT_KEEP_FLOAT = ("projector",)  # module paths (graph scope names) whose MatMuls stay float


class WeightQuantError(Jev4Error):
    """Weight quantization of an ONNX graph failed or found nothing to quantize."""


@dataclass(frozen=True)
class WeightQuantSettings:
    """One weight-only recipe; recorded in the manifest (``contents.weights``).

    ``block_size`` 32 (int4): one scale per 32 weights along K, the block of
    llama.cpp's Q4_0 and onnxruntime-genai's default for CPU int4; 128 halves
    the scale overhead but lets one outlier spoil 4x as many weights.
    ``symmetric`` False (int4): a zero point per block follows skewed blocks
    better; measured on the tiny checkpoint in docs/edge.md.
    """

    precision: str
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = False
    per_channel: bool = True
    reduce_range: bool = True
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    version: int = field(default=SETTINGS_VERSION)

    def __post_init__(self) -> None:
        if self.precision not in WEIGHT_PRECISIONS:
            raise SettingsError(f"--weights {self.precision!r} is not supported; choose one of {', '.join(WEIGHT_PRECISIONS)}")
        if self.block_size not in _BLOCK_SIZES:
            raise SettingsError(f"int4 block size {self.block_size} is not supported; choose one of {_BLOCK_SIZES}")
        if self.accuracy_level not in _ACCURACY_LEVELS:
            raise SettingsError(f"int4 accuracy level {self.accuracy_level} is not supported; choose one of {_ACCURACY_LEVELS}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))

    def to_json(self) -> dict:
        data = asdict(self)
        data["keep_float"] = list(self.keep_float)
        if self.precision == "int8":  # the int4-only knobs would only mislead
            for key in ("block_size", "accuracy_level", "symmetric"):
                data.pop(key)
        else:
            data.pop("per_channel")
            data.pop("reduce_range")
        return data


def precision_name(weights: str | None, float_dtype: str = "float32") -> str:
    """The precision an artifact is judged by (``jev4.validate.thresholds``): ``w-int4``, ``w-int8``, or the float dtype's."""
    if weights is None:
        return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[float_dtype]
    return f"w-{weights}"


def _scopes(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
    return []


def projector_nodes(model, keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT) -> list[str]:
    """Names of the MatMul/Gemm nodes that belong to a module in ``keep_float`` (by the exporter's scope metadata)."""
    found = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and any(scope in keep_float for scope in _scopes(node)):
            found.append(node.name)
    return found


def _weight_matmuls(model) -> list[str]:
    """MatMul nodes whose second input is an initializer: the ones a weight-only quantizer can touch."""
    inits = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in inits]


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(node.op_type for node in model.graph.node))


def quantize_weights(path: Path, settings: WeightQuantSettings) -> dict:
    """Quantize the weight MatMuls of the graph at ``path`` in place (external data kept); returns what was done.

    The summary (op counts, nodes kept in float, seconds) goes into the manifest.
    """
    import onnx

    path = Path(path)
    started = time.perf_counter()
    model = onnx.load(str(path), load_external_data=False)  # the structure only: each quantizer loads the weights itself
    for node in model.graph.node:  # the quantizers need node names to exclude by; the exporters always set them
        if not node.name:
            raise WeightQuantError(f"{path.name}: a {node.op_type} node has no name; cannot exclude nodes by name")
    kept = projector_nodes(model, settings.keep_float)
    candidates = [name for name in _weight_matmuls(model) if name not in kept]
    if not candidates:
        raise WeightQuantError(f"{path.name}: no MatMul with a constant weight to quantize")
    tmp = path.with_name(path.name + ".quantized")
    tmp_data = tmp.with_name(tmp.name + ".data")
    has_gemm = any(node.op_type == "Gemm" for node in model.graph.node)
    del model
    try:
        if settings.precision == "int4":
            _int4(path, kept, settings, tmp)
        else:
            _int8(path, kept, settings, tmp, has_gemm)
        # The quantizers name the data file after the file they write: rename both into place (no reload of the weights).
        move_graph(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
    counts = _op_counts(path)
    if not set(counts) & _ORT_ONLY_DEFAULT_DOMAIN:  # see jev4.export.onnx_fused.graft: the checker refuses those
        onnx.checker.check_model(str(path))
    quantized_op = "MatMulNBits" if settings.precision == "int4" else "MatMulInteger"
    done = counts.get(quantized_op, 0)
    if done != len(candidates):
        raise WeightQuantError(f"{path.name}: {settings.precision} quantized {done} of {len(candidates)} weight MatMuls")
    seconds = time.perf_counter() - started
    log.info("%s: %d weight MatMuls -> %s %s, %d kept float (%s), %.1f s", path.name, done, settings.precision, quantized_op, len(kept), ", ".join(settings.keep_float), seconds)
    return {"quantized_matmuls": done, "quantized_op": quantized_op, "kept_float_nodes": kept, "seconds": round(seconds, 1)}


def _int4(path: Path, kept: list[str], settings: WeightQuantSettings, out: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path), load_external_data=True)

    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        nodes_to_exclude=kept,
        op_types_to_quantize=("MatMul",),  # not Gather: the embedding lookup stays float
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)


@contextmanager
def _no_second_copy(has_gemm: bool) -> Iterator[None]:
    """Keep ``quantize_dynamic`` at one copy of the float graph (onnxruntime 1.32).

    In dynamic mode ``ONNXQuantizer.__init__`` always re-runs shape inference
    through ``save_and_reload_model_with_shape_infer`` (a deepcopy, a save and
    a reload) "to update value_infos" after turning Gemm into MatMul: three
    copies of the float graph at its peak, 7.2 GB for a 2.5 GB graph, 37 GB
    for the full-size 12.4 GB one. The graph was shape-inferred when loaded,
    so for a graph without Gemm (nothing replaced, value_infos unchanged) that
    reload is the identity and is skipped here, for the duration of the call
    only. A graph with Gemm keeps onnxruntime's path untouched.
    """
    import onnxruntime.quantization.onnx_quantizer as onnx_quantizer

    if has_gemm or not hasattr(onnx_quantizer, "save_and_reload_model_with_shape_infer"):
        yield
        return
    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    onnx_quantizer.save_and_reload_model_with_shape_infer = lambda model: model
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original


def _int8(path: Path, kept: list[str], settings: WeightQuantSettings, out: Path, has_gemm: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _no_second_copy(has_gemm):
        quantize_dynamic(
            str(path),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=kept,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
