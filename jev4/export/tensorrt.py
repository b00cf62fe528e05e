"""``jev4 build-engine``: TensorRT engines (``language.plan``, ``vision.plan``) for a jev4 ONNX artifact.

An engine is tied to the TensorRT version and the GPU model that built it, so
engines are built on the host that will run them, after export, and the
manifest records what they were built with (``contents.tensorrt``). The
runtime (``jev4.runtime.tensorrt_backend``) refuses engines built elsewhere.

What is asked of TensorRT is computed by pure functions, testable without
TensorRT or a GPU:

- :func:`axis_ranges` / :func:`profile_shapes`: one optimization profile per
  graph, min/opt/max for every input, from the graph's ``GraphSpec`` (its
  named dynamic axes) and the ``--batch`` / ``--seq`` / ``--image-tokens``
  ranges;
- :func:`inspect_onnx`: Q/DQ nodes, their quantized types and the graph's
  float type, read from the ONNX protobuf without its (external) weights;
- :func:`resolve_typing`: strongly or weakly typed, and which builder flags.
  TensorRT deprecated weak typing (the FP16/BF16/INT8/FP8 builder flags) in
  10.12 and removed it in 11.0: the graph's own types decide. jev4 therefore
  builds strongly typed whenever the graph already carries the requested
  precision (an fp16 export, or Q/DQ nodes), and uses precision flags only
  to lower an fp32 graph on a TensorRT that still has them.

Plans are written next to the ONNX files; the artifact (hard links to the
unchanged files, new plans, new manifest) is published atomically, so a
failed build leaves the artifact as it was.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jev4.atomic import atomic_output_dir, claim_output
from jev4.errors import EngineMismatchError, Jev4Error, ManifestError, MissingDependencyError, OutputExistsError, TensorRTError
from jev4.export.graphs import GraphSpec, TensorSpec
from jev4.export.manifest import MANIFEST_NAME, Manifest, verify_manifest, write_manifest

log = logging.getLogger(__name__)

__all__ = [
    "EngineSettings",
    "EngineHost",
    "GraphInfo",
    "GraphPlan",
    "AxisRange",
    "parse_range",
    "inspect_onnx",
    "axis_ranges",
    "profile_shapes",
    "resolve_typing",
    "plan_graph",
    "build_engine",
    "build_engines",
    "build_or_hint",
    "engine_hint",
    "check_engine_host",
    "check_precision_supported",
    "import_tensorrt",
]

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
DEFAULT_PRECISION = "auto"
DEFAULT_BATCH = (1, 8, 32)
DEFAULT_SEQ = (1, 512, 8192)
# Merged image tokens per vision-engine call (the runtime packs images into calls of at most this many).
DEFAULT_IMAGE_TOKENS = (1, 768, 4096)
DEFAULT_OPTIMIZATION_LEVEL = 3
ENGINE_FILES = {"language": "language.plan", "vision": "vision.plan"}

# ONNX ops that make a graph explicitly quantized (standard Q/DQ and the TensorRT-domain ops ModelOpt emits).
QDQ_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "TRT_FP8QuantizeLinear",
        "TRT_FP8DequantizeLinear",
        "TRT_INT4QuantizeLinear",
        "TRT_INT4DequantizeLinear",
        "TRT_FP4DynamicQuantize",
    }
)
# Smallest compute capability that runs each precision in TensorRT (FP8 tensor cores: Ada/Hopper).
MIN_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9), "int8": (6, 1)}
# Which flag a dynamic axis comes from, for error messages.
AXIS_FLAGS = {
    "batch": "--batch",
    "seq": "--seq",
    "image_tokens": "--batch/--seq",
    "merged_tokens": "--image-tokens",
    "patches": "--image-tokens",
    "segments_plus_1": "--batch",
    "windows_plus_1": "--image-tokens",
}

INSTALL_HINT = (
    "install TensorRT on a CUDA host: pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com "
    "(tensorrt-cu13 for CUDA 13), or run inside NVIDIA's TensorRT container (nvcr.io/nvidia/tensorrt:<yy.mm>-py3)"
)


def import_tensorrt():
    """The ``tensorrt`` module, or a ``MissingDependencyError`` that says how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT engines need the tensorrt package: {INSTALL_HINT}") from exc
    return tensorrt


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class AxisRange:
    """min <= opt <= max of one dynamic axis in an optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.opt, self.max)):
            raise TensorRTError(f"axis range {self.as_tuple()}: min, opt and max must be integers")
        if self.min < 0 or not self.min <= self.opt <= self.max:
            raise TensorRTError(f"axis range {self.as_tuple()}: need 0 <= min <= opt <= max")

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)

    def scaled(self, factor: int) -> AxisRange:
        return AxisRange(self.min * factor, self.opt * factor, self.max * factor)


def parse_range(text: str | tuple[int, ...] | list[int], flag: str) -> tuple[int, int, int]:
    """``"1,8,32"`` (or a 3-tuple) -> (1, 8, 32): positive ints with min <= opt <= max; errors name ``flag``."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise TensorRTError(f"{flag} {text!r}: expected three integers min,opt,max (e.g. {flag} 1,8,32)") from None
    else:
        values = tuple(text)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TensorRTError(f"{flag} {values!r}: expected three integers min,opt,max")
    if len(values) != 3:
        raise TensorRTError(f"{flag} {text!r}: expected three values min,opt,max, got {len(values)}")
    low, opt, high = values
    if low < 1:
        raise TensorRTError(f"{flag} {text!r}: values must be positive, got min {low}")
    if not low <= opt <= high:
        raise TensorRTError(f"{flag} {text!r}: need min <= opt <= max, got {low},{opt},{high}")
    return (low, opt, high)


@dataclass(frozen=True)
class EngineSettings:
    """Options of ``jev4 build-engine``; recorded verbatim in the manifest.

    Ranges are (min, opt, max) tuples, or ``"min,opt,max"`` strings as the
    CLI passes them. ``precision="auto"`` builds each graph in the types it was exported in
    (fp8/int8 when it holds Q/DQ nodes). ``strongly_typed=None`` decides per
    graph (:func:`resolve_typing`). ``workspace_gib=None`` leaves TensorRT's
    default (the whole device memory) for tactic scratch space.
    """

    precision: str = DEFAULT_PRECISION
    batch: tuple[int, int, int] = DEFAULT_BATCH
    seq: tuple[int, int, int] = DEFAULT_SEQ
    image_tokens: tuple[int, int, int] = DEFAULT_IMAGE_TOKENS
    workspace_gib: float | None = None
    strongly_typed: bool | None = None
    timing_cache: str | None = None
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL

    def __post_init__(self) -> None:
        if self.precision not in ("auto", *PRECISIONS):
            raise TensorRTError(f"--precision {self.precision!r}: choose one of {['auto', *PRECISIONS]}")
        object.__setattr__(self, "batch", parse_range(self.batch, "--batch"))
        object.__setattr__(self, "seq", parse_range(self.seq, "--seq"))
        object.__setattr__(self, "image_tokens", parse_range(self.image_tokens, "--image-tokens"))
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise TensorRTError(f"--workspace-gib {self.workspace_gib}: must be positive")
        if not (isinstance(self.optimization_level, int) and 0 <= self.optimization_level <= 5):
            raise TensorRTError(f"--optimization-level {self.optimization_level!r}: TensorRT takes 0..5")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gib is None else int(self.workspace_gib * (1 << 30))


# ----------------------------------------------------------------------------------------------
# Reading the ONNX graph (no weights)

_FLOAT_NAMES = {1: "fp32", 10: "fp16", 16: "bf16"}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


def _quant_name(data_type: int) -> str | None:
    import onnx

    tp = onnx.TensorProto
    names = {
        tp.INT8: "int8",
        tp.UINT8: "int8",
        getattr(tp, "INT4", -1): "int4",
        getattr(tp, "UINT4", -1): "int4",
        getattr(tp, "FLOAT8E4M3FN", -1): "fp8",
        getattr(tp, "FLOAT8E4M3FNUZ", -1): "fp8",
        getattr(tp, "FLOAT8E5M2", -1): "fp8",
        getattr(tp, "FLOAT8E5M2FNUZ", -1): "fp8",
        getattr(tp, "FLOAT4E2M1", -1): "fp4",
    }
    return names.get(data_type)


@dataclass(frozen=True)
class GraphInfo:
    """What the builder needs to know about an ONNX graph, read without its weights."""

    path: str
    qdq_nodes: int
    quant_types: tuple[str, ...]  # e.g. ("fp8",): the quantized types the Q/DQ nodes produce or consume
    float_dtype: str  # fp32 | fp16 | bf16: the type most weight elements are stored in
    inputs: tuple[TensorSpec, ...] = field(default=())

    @property
    def has_qdq(self) -> bool:
        return self.qdq_nodes > 0


def _all_nodes(model) -> list:
    """Nodes of the main graph, of subgraphs (If/Loop bodies) and of local functions."""
    import onnx

    found = []
    stack = [model.graph.node, *(f.node for f in model.functions)]
    while stack:
        for node in stack.pop():
            found.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(g.node for g in attr.graphs)
    return found


def inspect_onnx(path: str | Path) -> GraphInfo:
    """Q/DQ nodes, quantized types and float type of ``path``; external weight files are never read."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise TensorRTError(f"{path}: ONNX graph not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise TensorRTError(f"{path}: not a readable ONNX model ({exc})") from exc
    nodes = _all_nodes(model)
    types: dict[str, int] = {t.name: t.data_type for t in model.graph.initializer}
    for node in nodes:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attr.t.data_type
    qdq = [n for n in nodes if n.op_type in QDQ_OPS]
    quant: set[str] = set()
    for node in qdq:
        if node.op_type.startswith("TRT_FP8"):
            quant.add("fp8")
        elif node.op_type.startswith("TRT_INT4"):
            quant.add("int4")
        elif node.op_type.startswith("TRT_FP4"):
            quant.add("fp4")
        names = [node.input[2]] if node.op_type == "QuantizeLinear" and len(node.input) > 2 else []
        if node.op_type == "DequantizeLinear":
            names = [node.input[0], *(node.input[2:3])]
        for name in names:
            kind = _quant_name(types.get(name, -1))
            if kind:
                quant.add(kind)
        for attr in node.attribute:
            if attr.name == "output_dtype" and _quant_name(attr.i):
                quant.add(_quant_name(attr.i))
        if node.op_type == "QuantizeLinear" and len(node.input) < 3 and not any(a.name == "output_dtype" for a in node.attribute):
            quant.add("int8")  # ONNX's default quantized type (uint8)
    counts: dict[str, int] = {}
    for tensor in model.graph.initializer:
        name = _FLOAT_NAMES.get(tensor.data_type)
        if name:
            elements = 1
            for dim in tensor.dims:
                elements *= int(dim)
            counts[name] = counts.get(name, 0) + elements
    if counts:
        float_dtype = max(counts, key=counts.get)
    else:
        io_types = [_FLOAT_NAMES.get(v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]
        float_dtype = next((t for t in io_types if t), "fp32")
    initializers = set(types)
    inputs = tuple(
        TensorSpec(
            v.name,
            onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{v.name}_{i}") for i, d in enumerate(v.type.tensor_type.shape.dim)),
        )
        for v in model.graph.input
        if v.name not in initializers
    )
    return GraphInfo(str(path), len(qdq), tuple(sorted(quant)), float_dtype, inputs)


# ----------------------------------------------------------------------------------------------
# Profiles, typing and flags (pure)


def axis_ranges(settings: EngineSettings, merge_unit: int = 4, window_tokens: int = 16) -> dict[str, AxisRange]:
    """The min/opt/max of every named dynamic axis of jev4's graphs.

    ``merge_unit`` (spatial_merge_size**2) patches make one merged image
    token; ``window_tokens`` merged tokens make one attention window of the
    vision tower. A vision call holds at most ``batch.max`` images, and never
    more windows than merged tokens (empty windows are dropped by the
    preprocessing), hence the bounds below.
    """
    batch = AxisRange(*settings.batch)
    seq = AxisRange(*settings.seq)
    tokens = AxisRange(*settings.image_tokens)
    windows_opt = min(max(2, tokens.opt // max(window_tokens, 1) + 2), tokens.max + 1)
    return {
        "batch": batch,
        "seq": seq,
        # Image token embeddings fed to the language graph: none for text, at most one per token.
        "image_tokens": AxisRange(0, 0, batch.max * seq.max),
        "merged_tokens": tokens,
        "patches": tokens.scaled(merge_unit),
        "segments_plus_1": AxisRange(2, 2, batch.max + 1),
        "windows_plus_1": AxisRange(2, max(2, windows_opt), tokens.max + 1),
    }


ProfileShapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def profile_shapes(spec: GraphSpec, ranges: Mapping[str, AxisRange]) -> dict[str, ProfileShapes]:
    """(min, opt, max) shape of every input of ``spec``; a dynamic axis without a range is an error."""
    shapes: dict[str, ProfileShapes] = {}
    for tensor in spec.inputs:
        low, opt, high = [], [], []
        for axis in tensor.shape:
            if isinstance(axis, int):
                low.append(axis), opt.append(axis), high.append(axis)
                continue
            if axis not in ranges:
                raise TensorRTError(f"{spec.file}: input {tensor.name!r} has dynamic axis {axis!r} with no profile range (known: {sorted(ranges)})")
            rng = ranges[axis]
            low.append(rng.min), opt.append(rng.opt), high.append(rng.max)
        shapes[tensor.name] = (tuple(low), tuple(opt), tuple(high))
    return shapes


def resolve_precision(precision: str, info: GraphInfo) -> str:
    """``auto`` -> the graph's own precision: its quantized type if it holds Q/DQ nodes, else its float type."""
    if precision != "auto":
        return precision
    for kind in ("fp8", "int8"):
        if kind in info.quant_types:
            return kind
    return info.float_dtype


WEAK_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "fp8": ("FP8", "FP16"), "int8": ("INT8", "FP16")}


def resolve_typing(precision: str, info: GraphInfo, strongly_typed: bool | None, weak_typing: bool) -> tuple[bool, tuple[str, ...]]:
    """(strongly typed?, builder flag names) for building ``info``'s graph in ``precision``.

    - The graph already holds the precision (Q/DQ nodes of that type, or
      weights stored in it): strongly typed, no precision flags; TensorRT
      runs exactly the types in the graph (fp32 islands and norms included).
    - Otherwise (an fp32 graph lowered to fp16/bf16): weakly typed with a
      precision flag, which needs a TensorRT that still has them (< 11).
    ``strongly_typed`` True/False forces the mode where that is coherent.
    """
    where = Path(info.path).name
    if precision not in PRECISIONS:
        raise TensorRTError(f"{where}: unknown precision {precision!r}; choose one of {PRECISIONS}")
    quantized = precision in ("fp8", "int8")
    if quantized and precision not in info.quant_types:
        found = f"Q/DQ nodes of {list(info.quant_types)}" if info.quant_types else "no Q/DQ nodes"
        raise TensorRTError(
            f"{where}: precision {precision} needs a graph quantized to {precision} (QuantizeLinear/DequantizeLinear), "
            f"but it holds {found}; export it with jev4-export --{precision}"
        )
    native = quantized or precision == info.float_dtype
    strong = native if strongly_typed is None else strongly_typed
    if strong and not native:
        raise TensorRTError(
            f"{where}: a strongly typed build runs the graph in its own types ({info.float_dtype}), not {precision}; "
            f"export in {precision} (jev4-export --dtype {precision}) or build weakly typed (--no-strongly-typed)"
        )
    if strong:
        return True, ()
    if not weak_typing:
        raise TensorRTError(
            f"{where}: this TensorRT builds strongly typed networks only (precision flags were removed in TensorRT 11), "
            f"so the graph's types ({info.float_dtype}) decide; export in {precision} (jev4-export --dtype {precision}) "
            f"or build with --precision {info.float_dtype}"
        )
    return False, WEAK_FLAGS[precision]


@dataclass(frozen=True)
class GraphPlan:
    """Everything one engine build asks of TensorRT."""

    graph: str
    onnx: str
    precision: str
    strongly_typed: bool
    flags: tuple[str, ...]
    profile: dict[str, ProfileShapes]

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "flags": list(self.flags),
            "profile": {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for name, s in self.profile.items()},
        }


def plan_graph(
    spec: GraphSpec,
    info: GraphInfo,
    settings: EngineSettings,
    weak_typing: bool,
    merge_unit: int = 4,
    window_tokens: int = 16,
    precision: str | None = None,
) -> GraphPlan:
    """The build plan of one graph: resolved precision, typing, flags and profile shapes."""
    resolved = resolve_precision(precision or settings.precision, info)
    strong, flags = resolve_typing(resolved, info, settings.strongly_typed, weak_typing)
    if not strong and resolved in ("fp16", "bf16") and spec.name == "vision":
        log.warning(
            "%s: weakly typed %s build of an %s vision graph; Qwen2.5-VL's last vision MLP and merger overflow fp16. "
            "Export the vision graph in fp16 (it keeps those layers in fp32) for a strongly typed build",
            spec.file, resolved, info.float_dtype,
        )
    shapes = profile_shapes(spec, axis_ranges(settings, merge_unit, window_tokens))
    return GraphPlan(spec.name, spec.file, resolved, strong, flags, shapes)


# ----------------------------------------------------------------------------------------------
# Hosts


@dataclass(frozen=True)
class EngineHost:
    """The TensorRT version and GPU an engine is built with or run on."""

    tensorrt: str
    gpu: str
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt} on {self.gpu} ({self.sm})"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.tensorrt, "gpu": self.gpu, "compute_capability": list(self.capability), "sm": self.sm}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineHost:
        try:
            return cls(str(data["version"]), str(data["gpu"]), (int(data["compute_capability"][0]), int(data["compute_capability"][1])))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ManifestError(f"the manifest's tensorrt record lacks version/gpu/compute_capability ({exc})") from exc


def current_host(trt: Any, device: int | str = 0) -> EngineHost:
    """This process's TensorRT version and CUDA device; needs a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError(f"TensorRT engines are built and run on a CUDA GPU; torch sees none here. {INSTALL_HINT}")
    index = torch.device(device).index if isinstance(device, str) else device
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return EngineHost(str(trt.__version__), torch.cuda.get_device_name(index), (int(major), int(minor)))


def check_engine_host(built: EngineHost, running: EngineHost, artifact: str | Path) -> None:
    """Refuse an engine built with another TensorRT version, or for another GPU model or compute capability."""
    if built == running:
        return
    raise EngineMismatchError(
        f"{artifact}: engine built with {built.describe()}; this host has {running.describe()}: "
        f"rebuild with `jev4 build-engine {shlex.quote(str(artifact))} --force`"
    )


def check_precision_supported(precision: str, capability: tuple[int, int], gpu: str = "this GPU") -> None:
    need = MIN_CAPABILITY.get(precision)
    if need and tuple(capability) < need:
        raise TensorRTError(
            f"precision {precision} needs compute capability >= {need[0]}.{need[1]}; {gpu} is {capability[0]}.{capability[1]}"
        )


def weak_typing_available(trt: Any) -> bool:
    """TensorRT < 11 still has the FP16/BF16/INT8/FP8 builder flags (deprecated since 10.12)."""
    return hasattr(trt.BuilderFlag, "FP16")


# ----------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class EngineBuild:
    plan: GraphPlan
    path: str
    seconds: float
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "file": Path(self.path).name, "build_seconds": round(self.seconds, 1), "bytes": self.bytes}


def _parser_errors(parser: Any) -> list[str]:
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


def _write_bytes(path: Path, data: Any) -> None:
    """Write ``data`` (bytes or a buffer such as TensorRT's IHostMemory) via a temp file and rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        handle.write(memoryview(data))
    os.replace(tmp, path)


def _timing_cache(trt: Any, config: Any, path: Path | None) -> None:
    if path is None:
        return
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log.warning("%s: timing cache does not match this TensorRT/GPU; starting a fresh one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    log.info("timing cache %s (%d bytes loaded)", path, len(data))


def build_engine(
    onnx_path: str | Path,
    settings: EngineSettings,
    out_path: str | Path,
    spec: GraphSpec | None = None,
    precision: str | None = None,
    merge_unit: int = 4,
    window_tokens: int = 16,
) -> EngineBuild:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write a serialized engine to ``out_path``.

    ``spec`` names the inputs and their dynamic axes (default: read from the
    ONNX inputs, whose symbolic dims must then be jev4's axis names).
    ``precision`` overrides ``settings.precision`` for this graph.
    """
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    info = inspect_onnx(onnx_path)
    if spec is None:
        spec = GraphSpec(name=onnx_path.stem, file=onnx_path.name, inputs=info.inputs, outputs=())
    plan = plan_graph(spec, info, settings, weak_typing_available(trt), merge_unit, window_tokens, precision)
    return _build_planned(trt, onnx_path, plan, settings, Path(out_path))


def _network_flags(trt: Any, strongly_typed: bool) -> int:
    """STRONGLY_TYPED as a bit flag (TensorRT 11 keeps the name but is always strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if strongly_typed and flag is not None else 0


def _build_planned(trt: Any, onnx_path: Path, plan: GraphPlan, settings: EngineSettings, out_path: Path) -> EngineBuild:
    """The TensorRT calls, in the documented order: network, parser, config, profile, timing cache, build."""
    log.info("building %s: %s, %s typed, flags %s", out_path.name, plan.precision, "strongly" if plan.strongly_typed else "weakly", list(plan.flags))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so that the parser finds external weight files next to the graph.
    parsed = parser.parse_from_file(str(onnx_path))
    if not parsed or parser.num_errors:
        errors = _parser_errors(parser) or ["(no error recorded; does the file hold a valid ONNX model?)"]
        raise TensorRTError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errors))
    network_inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if network_inputs != sorted(plan.profile):
        raise TensorRTError(f"{onnx_path}: the network's inputs {network_inputs} differ from the graph spec's {sorted(plan.profile)}")

    config = builder.create_builder_config()
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in plan.profile.items():
        profile.set_shape(name, low, opt, high)
    if config.add_optimization_profile(profile) < 0:
        raise TensorRTError(f"{onnx_path}: TensorRT rejected the optimization profile {plan.to_json()['profile']}")
    cache_path = Path(settings.timing_cache) if settings.timing_cache else None
    _timing_cache(trt, config, cache_path)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT built no engine (see TensorRT's log above for the failing layer)")
    _write_bytes(out_path, serialized)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_bytes(cache_path, config.get_timing_cache().serialize())
    size = out_path.stat().st_size
    log.info("wrote %s (%.1f MB) in %.1f s", out_path, size / 1e6, seconds)
    return EngineBuild(plan, str(out_path), seconds, size)


def spec_from_json(data: Mapping[str, Any]) -> GraphSpec:
    """A ``GraphSpec`` from its manifest form (``GraphSpec.to_json``)."""
    return GraphSpec(
        name=data["name"],
        file=data["file"],
        inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
        outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
    )


def vision_geometry(root: Path) -> tuple[int, int]:
    """(patches per merged token, merged tokens per attention window) from the artifact's config.json."""
    import json

    path = root / "config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    vision = raw.get("vision_config") or {}
    merge = int(vision.get("spatial_merge_size", 2))
    side = int(vision.get("window_size", 112)) // int(vision.get("patch_size", 14)) // merge
    return merge * merge, max(side, 1) ** 2


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _onnx_manifest(root: Path) -> dict[str, Any]:
    manifest = verify_manifest(root)
    if manifest.get("kind") != "onnx":
        raise ManifestError(f"{root}: is a {manifest.get('kind')!r} artifact; TensorRT engines are built from ONNX artifacts (jev4-export --format onnx)")
    graphs = manifest.get("contents", {}).get("graphs") or {}
    if "language" not in graphs:
        raise ManifestError(f"{root}: the manifest lists no language graph")
    unknown = sorted(set(graphs) - set(ENGINE_FILES))
    if unknown:
        raise ManifestError(f"{root}: graphs {unknown} have no engine file name (known: {sorted(ENGINE_FILES)})")
    return manifest


def build_engines(artifact: str | Path, settings: EngineSettings, out: str | Path | None = None, force: bool = False) -> Path:
    """Build an engine for every graph of an ONNX artifact; write ``out`` (or update ``artifact`` in place with ``force``).

    The unchanged files are hard-linked (copied across file systems) into the
    new directory, which replaces the target only when every engine built.
    """
    root = Path(artifact)
    target = Path(out) if out is not None else root
    if out is None and not force:
        raise OutputExistsError(f"{root}: pass --out DIR for a new artifact, or --force to add the engines to {root} in place")
    if out is not None and target.resolve() == root.resolve() and not force:
        raise OutputExistsError(f"{target}: is the source artifact; pass --force to update it in place")
    in_place = target.resolve() == root.resolve()
    with claim_output(target, force=force or out is None, sources=() if in_place else (root,)):
        return _build_engines(root, target, settings, force or out is None)


def _build_engines(root: Path, target: Path, settings: EngineSettings, force: bool) -> Path:
    manifest = _onnx_manifest(root)
    trt = import_tensorrt()
    host = current_host(trt)
    merge_unit, window_tokens = vision_geometry(root)
    specs = {name: spec_from_json(data) for name, data in manifest["contents"]["graphs"].items()}
    infos = {name: inspect_onnx(root / spec.file) for name, spec in specs.items()}
    weak = weak_typing_available(trt)
    # Plan every graph before building any (a bad setting fails in seconds, not after a first long build).
    precisions = _graph_precisions(settings.precision, infos, root)
    plans = {name: plan_graph(specs[name], infos[name], settings, weak, merge_unit, window_tokens, precisions[name]) for name in specs}
    for plan in plans.values():
        check_precision_supported(plan.precision, host.capability, host.gpu)

    skip = {MANIFEST_NAME, *ENGINE_FILES.values()}
    started = time.perf_counter()
    with atomic_output_dir(target, force=force) as tmp:
        for rel in manifest["files"]:
            if rel not in skip:
                _link_or_copy(root / rel, tmp / rel)
        builds = {}
        for name, spec in specs.items():
            builds[name] = _build_planned(trt, root / spec.file, plans[name], settings, tmp / ENGINE_FILES[name])
        record = {
            **host.to_json(),
            "precision": builds["language"].plan.precision,
            "settings": settings.to_json(),
            "engines": {name: build.to_json() for name, build in builds.items()},
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        contents = {**manifest["contents"], "tensorrt": record}
        write_manifest(
            tmp,
            Manifest(
                kind=manifest["kind"],
                source=manifest["source"],
                settings=manifest["settings"],
                contents=contents,
                versions={**manifest.get("versions", {}), "tensorrt": host.tensorrt},
            ),
        )
    log.info("engines for %s built with %s in %.0f s", target, host.describe(), time.perf_counter() - started)
    return target


def _graph_precisions(precision: str, infos: Mapping[str, GraphInfo], root: Path) -> dict[str, str]:
    """fp8/int8 apply to the graphs that hold Q/DQ nodes; the others (e.g. the vision tower) keep their own types.

    An artifact where no graph is quantized cannot be built in fp8/int8.
    """
    if precision not in ("fp8", "int8"):
        return {name: precision for name in infos}
    if not any(precision in info.quant_types for info in infos.values()):
        found = {name: list(info.quant_types) for name, info in infos.items()}
        raise TensorRTError(f"{root}: --precision {precision} needs a graph quantized to {precision} (Q/DQ nodes); found {found}: export with jev4-export --{precision}")
    chosen = {}
    for name, info in infos.items():
        chosen[name] = precision if info.has_qdq else "auto"
        if not info.has_qdq:
            log.info("%s has no Q/DQ nodes: built in its own types (%s)", Path(info.path).name, info.float_dtype)
    return chosen


# ----------------------------------------------------------------------------------------------
# After export: build here, or say how to build elsewhere


def engine_hint(artifact: str | Path, precision: str, reason: str) -> str:
    """The message printed when engines cannot be built here: why, the exact command, how to install TensorRT."""
    batch, seq = ",".join(map(str, DEFAULT_BATCH)), ",".join(map(str, DEFAULT_SEQ))
    command = f"jev4 build-engine {shlex.quote(str(artifact))} --precision {precision} --batch {batch} --seq {seq} --force"
    return (
        f"TensorRT engines were not built: {reason}. The ONNX artifact {artifact} is complete; "
        f"on the GPU host that will serve it, run: {command} "
        f"(to {INSTALL_HINT}). Engines only run on the TensorRT version and GPU model that built them."
    )


def build_or_hint(artifact_dir: Path, precision: str) -> str | None:
    """Build engines in place (default profiles) when TensorRT and a CUDA GPU are here; else return (and log) how to.

    Called at the end of ``jev4-export --fp8/--int8``: the export has
    already succeeded, so a failed build is reported, not raised.
    """
    try:
        trt = import_tensorrt()
        current_host(trt)
    except (MissingDependencyError, TensorRTError) as exc:
        reason = "the tensorrt package is not installed" if isinstance(exc, MissingDependencyError) else "no CUDA GPU is visible"
        message = engine_hint(artifact_dir, precision, reason)
        log.warning("%s", message)
        return message
    try:
        build_engines(artifact_dir, EngineSettings(precision=precision), out=None, force=True)
    except Exception as exc:  # noqa: BLE001 - the export succeeded; any build failure becomes the hint
        detail = str(exc) if isinstance(exc, Jev4Error) else f"{type(exc).__name__}: {exc}"
        message = engine_hint(artifact_dir, precision, f"the build failed ({detail})")
        log.warning("%s", message, exc_info=not isinstance(exc, Jev4Error))
        return message
    return None
