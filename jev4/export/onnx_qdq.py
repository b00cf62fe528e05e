"""``jev4-export --fp8 / --int8``: the ONNX graphs with QuantizeLinear / DequantizeLinear, as TensorRT expects.

Flow (:func:`export_quantized_onnx`): merge the adapter in fp32 ->
calibrate (:mod:`jev4.quant.calibration`) -> SmoothQuant folding for int8
(:func:`jev4.quant.weights.smooth`) -> 8-bit weights and scales
(:func:`jev4.quant.weights.build_plan`) -> export the float graphs exactly as
``--format onnx`` does (opset >= 19) -> rewrite each graph's quantized
MatMuls (:func:`insert_qdq`) -> check the result on onnxruntime (CPU)
against a torch emulation of the same arithmetic -> manifest.

Layout per quantized Linear (TensorRT's explicit quantization; the same
pattern ModelOpt's ONNX export ends with after its ``qdq_to_dq`` pass)::

    x (float) -> QuantizeLinear(s_x, zp) -> DequantizeLinear(s_x, zp) --\\
                                                                        MatMul -> (+ bias) -> ...
    W_q [in, out] FLOAT8E4M3FN | INT8 -> DequantizeLinear(s_w, zp) ----/

- weights are stored quantized (1 byte each) and dequantized by a DQ node
  (TensorRT needs a DQ between pre-quantized weights and the GEMM); per-
  channel scales are on the output-channel axis (``axis=1`` of the MatMul's
  ``[in, out]`` weight), per-tensor scales are scalars;
- activations get a Q/DQ pair with a per-tensor scalar scale right before
  the MatMul; Linears that read the same tensor with the same scale (q/k/v,
  gate/up) share one pair;
- zero points are explicit zeros of the quantized type (FLOAT8E4M3FN or
  INT8: that type decides QuantizeLinear's output type);
- nothing is inserted anywhere else: excluded Linears (the projector, the
  vision tower by default), attention's activation x activation MatMuls,
  norms, embeddings and pooling stay as exported.

Finding the MatMul of a Linear: the dynamo exporter folds each weight's
transpose into a new initializer (``val_103``) but records the module path of
every node (``pkg.torch.onnx.name_scopes`` metadata). A MatMul whose node
comes from ``aten.linear`` inside ``language_model.layers.0.self_attn.q_proj``
belongs to that Linear; its weight initializer is then checked to equal
the network's weight (transposed), so a wrong mapping cannot go unnoticed.

Big graphs: a rewritten graph keeps its tensors of 1 KiB or more in
external data (``language.onnx.data``, like the float export), and the
rewrite streams them one tensor at a time (:func:`save_graph`), so it never
holds the whole graph in memory.
"""

from __future__ import annotations

import ast
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from jev4.atomic import atomic_output_dir, claim_output
from jev4.errors import Jev4Error, SettingsError
from jev4.export.manifest import Manifest, write_manifest
from jev4.export.onnx import NUMPY_FLOAT, ExportValidationError, LanguageGraph, OnnxExportSettings, _copy_side_files, export_language_graph, require_onnx, validation_feeds
from jev4.export.onnx_files import save_graph
from jev4.quant.calibration import DEFAULT_CALIB_SIZE, DEFAULT_MAX_LENGTH, calibration_items, collect_input_absmax, make_forward_loop
from jev4.quant.recipes import QuantRecipe
from jev4.quant.weights import QuantPlan, build_plan, fake_quantized, select_linears, smooth

log = logging.getLogger(__name__)

__all__ = [
    "GRAPH_PREFIXES",
    "LinearLayout",
    "QuantExportError",
    "QuantSettings",
    "export_quantized_onnx",
    "insert_qdq",
    "qdq_layout",
]

MIN_OPSET = 19  # FP8 QuantizeLinear / DequantizeLinear (and fp16 scales) need opset 19
# Graph module path -> network module path, per graph (LanguageGraph / VisionGraph attribute names).
GRAPH_PREFIXES: dict[str, dict[str, str]] = {
    "language": {"language_model": "model.language_model", "projector": "multi_vector_projector"},
    "vision": {"visual": "model.visual"},
}
_SCALE_TORCH = {"float32": torch.float32, "float16": torch.float16}


class QuantExportError(Jev4Error):
    """A quantized export that cannot be written as asked (bad settings, a Linear missing from the graph)."""


@dataclass(frozen=True)
class QuantSettings:
    """The quantization half of ``jev4-export --fp8/--int8``; recorded in the manifest."""

    recipe: QuantRecipe
    calib_data: str | None = None
    calib_size: int = DEFAULT_CALIB_SIZE
    calib_batch_size: int = 8
    calib_max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        for name in ("calib_size", "calib_batch_size", "calib_max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

    def sources(self) -> tuple[str | None, ...]:
        return (self.calib_data,)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "recipe"}, "recipe": self.recipe.to_json()}


# ----------------------------------------------------------------------------------------------
# Reading the graph


def _network_name(scope: str, prefixes: Mapping[str, str]) -> str | None:
    head, _, rest = scope.partition(".")
    if head not in prefixes:
        return None
    return prefixes[head] + ("." + rest if rest else "")


def linear_module_of(node, prefixes: Mapping[str, str], linears: set[str]) -> str | None:
    """The network Linear a MatMul/Gemm node computes, from the exporter's metadata (None: not a Linear)."""
    meta = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" not in meta:
        return None
    if "aten.linear" not in meta.get("pkg.torch.onnx.fx_node", "aten.linear"):
        return None
    scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
    for scope in reversed(scopes[:-1]):
        name = _network_name(scope, prefixes)
        if name in linears:
            return name
    return None


def _has_name_scopes(model) -> bool:
    return any(p.key == "pkg.torch.onnx.name_scopes" for n in model.graph.node for p in n.metadata_props)


# ----------------------------------------------------------------------------------------------
# Writing Q/DQ


def _np_quantized(q: torch.Tensor) -> np.ndarray:
    import ml_dtypes

    if q.dtype == torch.float8_e4m3fn:
        return q.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return q.contiguous().numpy()


def _zero_like(precision: str, shape: tuple[int, ...]) -> np.ndarray:
    import ml_dtypes

    return np.zeros(shape, dtype=ml_dtypes.float8_e4m3fn if precision == "fp8" else np.int8)


@dataclass
class _Weight:
    init: str  # the initializer holding the float weight
    transposed_by_node: bool  # a Transpose node sits between it and the MatMul
    axis_out: int  # output-channel axis of the initializer


def _weight_source(node, producers: dict, initializers: dict) -> _Weight:
    name = node.input[1]
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
    if name in initializers:
        return _Weight(name, False, 0 if trans_b else 1)
    producer = producers.get(name)
    if producer is not None and producer.op_type == "Transpose" and producer.input[0] in initializers:
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0])
        if perm == [1, 0] and not trans_b:
            return _Weight(producer.input[0], True, 0)
    raise QuantExportError(f"{node.name}: its weight {name!r} is not an initializer (or a transposed one); cannot quantize it")


def insert_qdq(
    model,
    plan: QuantPlan,
    prefixes: Mapping[str, str],
    float_weights: Mapping[str, np.ndarray],
    float_dtype: str,
    graph_name: str,
    base_dir: Path | None = None,
) -> list[str]:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place) so the planned Linears run through Q/DQ.

    ``float_weights`` holds each planned Linear's float weight ``[out, in]``
    as the graph was exported with (checked equal to the graph's
    initializer, read from external data under ``base_dir`` if it lives
    there). The weight initializer is either the MatMul's ``[in, out]`` B, a
    ``[out, in]`` tensor behind a Transpose, or a Gemm's B with ``transB``.
    Only Linears found in this graph are rewritten; their names are returned.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    if not _has_name_scopes(model):
        raise QuantExportError(f"{graph_name}.onnx: the exporter recorded no module names (pkg.torch.onnx.name_scopes); torch >= 2.6 is needed")
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < MIN_OPSET:
        raise QuantExportError(f"{graph_name}.onnx: opset < {MIN_OPSET}; FP8/INT8 Q/DQ needs opset {MIN_OPSET} or later")
    initializers = {init.name: init for init in graph.initializer}
    nodes = list(graph.node)
    producer_index = {out: i for i, node in enumerate(nodes) for out in node.output}
    producers = {out: nodes[i] for out, i in producer_index.items()}
    all_linears = set(plan.modules) | set(plan.excluded)
    targets: dict[str, int] = {}  # module -> index of its MatMul/Gemm in the node list
    for index, node in enumerate(nodes):
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        module = linear_module_of(node, prefixes, all_linears)
        if module is None or module not in plan.modules:
            continue
        if module in targets:
            raise QuantExportError(f"{graph_name}.onnx: {module} maps to two matmuls ({nodes[targets[module]].name}, {node.name})")
        targets[module] = index
    precision = plan.recipe.precision
    scale_np = np.dtype(float_dtype)
    new_inits = []
    shared_activation: dict[tuple[str, bytes], str] = {}
    before: dict[int, list] = {}  # node index -> new nodes to insert right before that node
    used_weight_inits: set[str] = set()
    for module, index in targets.items():
        node = nodes[index]
        q = plan.modules[module]
        weight = _weight_source(node, producers, initializers)
        graph_w = numpy_helper.to_array(initializers[weight.init], base_dir=str(base_dir or ""))
        expected = float_weights[module] if weight.axis_out == 0 else float_weights[module].T
        if graph_w.shape != expected.shape or not np.array_equal(graph_w, expected.astype(graph_w.dtype)):
            raise QuantExportError(
                f"{graph_name}.onnx: the weight of {node.name} ({weight.init}, shape {graph_w.shape}) is not {module}.weight; "
                "the exporter's module names do not match the network"
            )
        used_weight_inits.add(weight.init)
        # Weight: quantized initializer -> DequantizeLinear (-> the Transpose that was there) -> MatMul.
        wq = _np_quantized(q.weight if weight.axis_out == 0 else q.weight.T)
        w_scale = q.weight_scale.numpy().astype(scale_np)
        new_inits += [
            numpy_helper.from_array(np.ascontiguousarray(wq), f"{module}.weight_quantized"),
            numpy_helper.from_array(w_scale, f"{module}.weight_scale"),
            numpy_helper.from_array(_zero_like(precision, w_scale.shape), f"{module}.weight_zero_point"),
        ]
        dq_attrs = {"axis": weight.axis_out} if q.per_channel else {}
        # The weight's DQ goes right before the node that reads it: the MatMul, or the Transpose feeding it.
        weight_reader = producer_index[node.input[1]] if weight.transposed_by_node else index
        before.setdefault(weight_reader, []).append(
            helper.make_node(
                "DequantizeLinear",
                [f"{module}.weight_quantized", f"{module}.weight_scale", f"{module}.weight_zero_point"],
                [f"{module}.weight_dequantized"],
                name=f"{module}/weight_quantizer/DequantizeLinear",
                **dq_attrs,
            )
        )
        if weight.transposed_by_node:
            nodes[weight_reader].input[0] = f"{module}.weight_dequantized"
        else:
            node.input[1] = f"{module}.weight_dequantized"
        # Activation: QuantizeLinear -> DequantizeLinear, shared by Linears reading the same tensor at the same scale.
        x_scale = np.asarray(q.input_scale.numpy(), dtype=scale_np)
        key = (node.input[0], x_scale.tobytes())
        if key not in shared_activation:
            new_inits += [
                numpy_helper.from_array(x_scale, f"{module}.input_scale"),
                numpy_helper.from_array(_zero_like(precision, ()), f"{module}.input_zero_point"),
            ]
            args = [f"{module}.input_scale", f"{module}.input_zero_point"]
            before.setdefault(index, []).extend(
                [
                    helper.make_node("QuantizeLinear", [node.input[0], *args], [f"{module}.input_quantized"], name=f"{module}/input_quantizer/QuantizeLinear"),
                    helper.make_node("DequantizeLinear", [f"{module}.input_quantized", *args], [f"{module}.input_dequantized"], name=f"{module}/input_quantizer/DequantizeLinear"),
                ]
            )
            shared_activation[key] = f"{module}.input_dequantized"
        node.input[0] = shared_activation[key]
    # Rebuild the node list in topological order: every new node right before the node that reads it.
    ordered = []
    for index, node in enumerate(nodes):
        ordered.extend(before.get(index, []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    # Drop the float weights that no node reads any more.
    still_read = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name not in used_weight_inits or init.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    return sorted(targets)


def rewrite_graph(path: Path, plan: QuantPlan, graph_name: str, float_weights: Mapping[str, np.ndarray], float_dtype: str) -> list[str]:
    """Insert the Q/DQ nodes into the graph at ``path`` in place; returns the Linears rewritten.

    External data is never loaded as a whole: the weights to check are read
    one by one and everything else is streamed by :func:`save_graph`.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    done = insert_qdq(model, plan, GRAPH_PREFIXES[graph_name], float_weights, float_dtype, graph_name, base_dir=path.parent)
    save_graph(model, path, path.parent)
    return done


# ----------------------------------------------------------------------------------------------
# Inspecting a written graph


@dataclass(frozen=True)
class LinearLayout:
    """How one Linear's MatMul is fed in a graph: what precedes its activation and weight inputs."""

    module: str
    node: str
    activation_chain: tuple[str, ...]  # op types walking up from the MatMul's input 0, e.g. ("DequantizeLinear", "QuantizeLinear")
    weight_chain: tuple[str, ...]  # e.g. ("DequantizeLinear",), or () for a float initializer
    weight_type: str  # ONNX element type of the stored weight
    weight_axis: int | None
    weight_scale: np.ndarray | None = field(default=None, compare=False)
    input_scale: np.ndarray | None = field(default=None, compare=False)


def qdq_layout(path: str | Path, graph_name: str, linears: set[str]) -> dict[str, LinearLayout]:
    """``{Linear name: LinearLayout}`` for every Linear of ``linears`` found in the graph at ``path``."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    base = str(path.parent)
    producers = {out: node for node in graph.node for out in node.output}

    def walk(name: str, ops: tuple[str, ...]) -> tuple[list, str]:
        """The nodes of types ``ops`` above tensor ``name`` (nearest first), and the tensor they start from."""
        nodes = []
        while name in producers and producers[name].op_type in ops:
            nodes.append(producers[name])
            name = producers[name].input[0]
        return nodes, name

    found: dict[str, LinearLayout] = {}
    for node in graph.node:
        module = linear_module_of(node, GRAPH_PREFIXES[graph_name], linears) if node.op_type in ("MatMul", "Gemm") else None
        if module is None:
            continue
        act_nodes, _ = walk(node.input[0], ("QuantizeLinear", "DequantizeLinear"))
        w_nodes, w_source = walk(node.input[1], ("DequantizeLinear", "Transpose"))
        w_dq = next((n for n in w_nodes if n.op_type == "DequantizeLinear"), None)
        w_scale = numpy_helper.to_array(inits[w_dq.input[1]], base_dir=base) if w_dq is not None else None
        found[module] = LinearLayout(
            module=module,
            node=node.name,
            activation_chain=tuple(n.op_type for n in act_nodes),
            weight_chain=tuple(n.op_type for n in w_nodes if n.op_type != "Transpose"),
            weight_type=onnx.TensorProto.DataType.Name(inits[w_source].data_type) if w_source in inits else "none",
            weight_axis=next((a.i for a in w_dq.attribute if a.name == "axis"), None) if w_scale is not None and w_scale.ndim else None,
            weight_scale=w_scale,
            input_scale=numpy_helper.to_array(inits[act_nodes[0].input[1]], base_dir=base) if act_nodes else None,
        )
    return found


# ----------------------------------------------------------------------------------------------
# The export


def _float_weights(network: torch.nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    """Each Linear's weight ``[out, in]`` as numpy, in the dtype the graph is exported with (views, no copies)."""
    return {name: network.get_submodule(name).weight.detach().numpy() for name in names}


def export_quantized_onnx(settings: OnnxExportSettings, quant: QuantSettings, progress: bool = True, output_codec=None) -> Path:
    """Merge, calibrate, quantize and export ``settings.adapter`` to ``settings.out`` (atomically).

    ``output_codec`` (a :class:`jev4.quant.output_codec.OutputCodec`) is stored
    with the artifact as ``export_onnx`` stores it.
    """
    with claim_output(settings.out, settings.force, settings.sources() + quant.sources()):
        return _export_quantized_onnx(settings, quant, progress, output_codec)


def _export_quantized_onnx(settings: OnnxExportSettings, quant: QuantSettings, progress: bool, output_codec) -> Path:
    from jev4.export.merge import MergeSettings, merge_into_network, plan_merge
    from jev4.model.network import build_network, dtype_name, load_base_weights, parse_dtype
    from jev4.model.preprocess import Preprocessor

    require_onnx()
    dtype = parse_dtype(settings.dtype)
    if dtype not in (torch.float32, torch.float16):
        raise QuantExportError(f"--{quant.recipe.precision} exports fp32 or fp16 graphs (the dtype of everything not quantized), not {settings.dtype}")
    if settings.opset < MIN_OPSET:
        raise QuantExportError(f"--{quant.recipe.precision} needs ONNX opset {MIN_OPSET} or later (FP8/INT8 QuantizeLinear); got --opset {settings.opset}")
    float_dtype = NUMPY_FLOAT[dtype]
    plan_m = plan_merge(
        MergeSettings(model=settings.model, adapter=settings.adapter, out=settings.out, adapter_dir=settings.adapter_dir, force=settings.force)
    )
    started = time.perf_counter()
    # Calibration and quantization see the fp32 merged network; the graph is exported in settings.dtype.
    network = build_network(plan_m.config, torch.float32)
    load_base_weights(network, plan_m.files, progress=progress)
    merge_into_network(network, plan_m.loras)
    if settings.text_only:
        del network.model.visual
    recipe = quant.recipe
    quantized, excluded = select_linears(network, recipe)
    calib = calibration_items(quant.calib_data, quant.calib_size, with_images=not settings.text_only)
    preprocessor = Preprocessor.from_dir(plan_m.model_dir, plan_m.config)
    loop = make_forward_loop(preprocessor, calib.items, settings.adapter, quant.calib_batch_size, quant.calib_max_length, progress)
    t0 = time.perf_counter()
    absmax = collect_input_absmax(network, quantized, loop)
    calib_seconds = time.perf_counter() - t0
    smoothed = smooth(network, absmax, recipe.smoothquant_alpha, quantized) if recipe.smoothquant_alpha is not None else {}
    plan = build_plan(network, recipe, absmax, quantized, excluded, scale_dtype=_SCALE_TORCH[float_dtype])
    plan.smoothed = smoothed
    log.info("%s: %d Linears quantized, %d kept in float; calibrated on %d samples in %.1f s", recipe.precision, len(quantized), len(excluded), len(calib.items), calib_seconds)
    export_net = network if dtype == torch.float32 else network.to(dtype)
    float_weights = _float_weights(export_net, quantized)
    graphs: dict[str, dict] = {}
    rewritten: dict[str, list[str]] = {}
    with atomic_output_dir(settings.out, force=settings.force) as tmp:
        language = export_language_graph(export_net, plan_m.config, tmp, settings.opset, with_images=not settings.text_only)
        graphs["language"] = language.to_json()
        rewritten["language"] = rewrite_graph(tmp / language.file, plan, "language", float_weights, float_dtype)
        if not settings.text_only:
            from jev4.export.onnx_vision import export_vision_graph, vision_graph_spec

            export_vision_graph(export_net.model.visual, tmp / "vision.onnx", opset=settings.opset, dtype=dtype)
            graphs["vision"] = vision_graph_spec(plan_m.config).to_json()
            if any(name.startswith("model.visual.") for name in plan.modules):
                rewritten["vision"] = rewrite_graph(tmp / "vision.onnx", plan, "vision", float_weights, float_dtype)
        missing = sorted(set(plan.modules) - {m for names in rewritten.values() for m in names})
        if missing:
            raise QuantExportError(f"{len(missing)} quantized Linear(s) not found in the exported graphs, e.g. {missing[:3]}")
        _copy_side_files(plan_m.model_dir, tmp, plan_m.config, settings)
        validation = validate_quantized(export_net, plan_m.config, tmp, graphs, plan, vision="vision" in rewritten) if settings.validate else {}
        extra = {"output_codec": output_codec.describe()} if output_codec is not None else {}
        if output_codec is not None:
            output_codec.write(tmp)
        write_manifest(
            tmp,
            Manifest(
                kind="onnx",
                source=str(plan_m.model_dir),
                settings={**asdict(settings), "source_dtype": dtype_name(plan_m.source_dtype), "quantization": quant.to_json()},
                contents={
                    "task": settings.adapter,
                    "precision": recipe.precision,
                    "float_dtype": float_dtype,
                    "opset": settings.opset,
                    "graphs": graphs,
                    "quantization": {
                        **plan.summary(),
                        "calibration": {**calib.describe(), "seconds": round(calib_seconds, 1), "max_length": quant.calib_max_length},
                        "qdq_graphs": {name: len(mods) for name, mods in rewritten.items()},
                    },
                    "export_seconds": round(time.perf_counter() - started, 1),
                    "validation": validation,
                    **extra,
                },
            ),
        )
    return Path(settings.out)


def _exact_session(path: Path):
    """An onnxruntime CPU session that computes exactly what the graph says.

    onnxruntime's CPU provider fuses INT8 Q/DQ + MatMul into u8s8 integer
    kernels that saturate int16 partial sums on CPUs without VNNI (its
    quantization docs); ``session.disable_quant_qdq`` keeps the Q/DQ nodes as
    written, which is what the export check compares.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def validate_quantized(network: torch.nn.Module, config, root: Path, graphs: dict[str, dict], plan: QuantPlan, vision: bool = False) -> dict[str, float]:
    """Run the graphs on CPU against the torch emulation of the same Q/DQ arithmetic.

    ``language.onnx`` at several shapes, and ``vision.onnx`` on three images
    when its Linears were quantized too (``vision``). The emulation shares
    every quantized weight and scale with the graph, so agreement checks the
    Q/DQ placement and types, independent of how much quantization itself
    moves the output (reported as ``*_vs_float``).
    """
    result = _validate_language(network, config, root, graphs, plan)
    if vision:
        result.update(_validate_vision(network, root, plan))
    return result


def _validate_vision(network: torch.nn.Module, root: Path, plan: QuantPlan) -> dict[str, float]:
    from jev4.export.onnx_vision import DEFAULT_FP32_MODULES, INPUT_NAMES, VisionGraph, _example_inputs

    visual = network.model.visual
    islands = DEFAULT_FP32_MODULES if visual.patch_embed.proj.weight.dtype != torch.float32 else ()
    graph = VisionGraph(visual, islands).eval()
    args = _example_inputs(visual)
    (got,) = _exact_session(root / "vision.onnx").run(None, {name: a.numpy() for name, a in zip(INPUT_NAMES, args)})
    with torch.inference_mode(), fake_quantized(network, plan):
        emulated = graph(*args)
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got).double(), emulated.double(), dim=-1).min().item()
    if cos < 0.999 or not np.isfinite(got).all():
        raise ExportValidationError(f"vision.onnx ({plan.recipe.precision}) differs from the torch emulation of its Q/DQ: min token cosine {cos:.6f} < 0.999")
    log.info("vision.onnx (%s) validated on CPU: min token cosine %.6f vs emulation", plan.recipe.precision, cos)
    return {"vision_min_cosine_vs_emulation": cos}


def _validate_language(network: torch.nn.Module, config, root: Path, graphs: dict[str, dict], plan: QuantPlan) -> dict[str, float]:
    float_dtype = NUMPY_FLOAT[network.multi_vector_projector.weight.dtype]
    with_images = any(t["name"] == "image_embeds" for t in graphs["language"]["inputs"])
    graph = LanguageGraph(network, config.special_tokens.image_token_id, with_images).eval()
    session = _exact_session(root / "language.onnx")
    worst_emulated, worst_float = 1.0, 1.0
    for batch, seq, feed in validation_feeds(config.hidden_size, with_images, float_dtype):
        got_single, got_multi = session.run(None, feed)
        args = [torch.from_numpy(feed[k]) for k in feed]
        with torch.inference_mode():
            float_single, _ = graph(*args)
            with fake_quantized(network, plan):
                emu_single, _ = graph(*args)
        got = torch.from_numpy(got_single).double()
        cos_emulated = (got * emu_single.double()).sum(-1).min().item()
        cos_float = (got * float_single.double()).sum(-1).min().item()
        worst_emulated, worst_float = min(worst_emulated, cos_emulated), min(worst_float, cos_float)
        if cos_emulated < 0.999 or not np.isfinite(got_multi).all():
            raise ExportValidationError(
                f"language.onnx ({plan.recipe.precision}) differs from the torch emulation of its Q/DQ at batch {batch} x seq {seq}: "
                f"min cosine {cos_emulated:.6f} < 0.999"
            )
    log.info("language.onnx (%s) validated on CPU: min cosine %.6f vs emulation, %.6f vs float", plan.recipe.precision, worst_emulated, worst_float)
    return {"language_min_cosine_vs_emulation": worst_emulated, "language_min_cosine_vs_float": worst_float}
