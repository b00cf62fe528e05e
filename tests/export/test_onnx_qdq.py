"""FP8 / INT8 Q/DQ ONNX export: node layout per Linear, stored types and scales, onnxruntime parity, CLI, validate."""

import dataclasses
import importlib.util
import json
import logging

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import jev4.runtime as rt
from jev4.cli.export import main as export_main
from jev4.cli.main import main as jev4_main
from jev4.export.manifest import read_manifest
from jev4.export.onnx import OnnxExportSettings
from jev4.export.onnx_qdq import QuantExportError, QuantSettings, export_quantized_onnx, insert_qdq, qdq_layout
from jev4.quant.recipes import QuantRecipe, make_recipe
from jev4.quant.weights import QuantPlan, fake_quant

PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANTIZED = {f"model.language_model.layers.{i}.{p}" for i in range(2) for p in PER_LAYER}
LANGUAGE_LINEARS = QUANTIZED | {"multi_vector_projector"}
TEXTS = [
    "What is the capital of France?",
    "def add(a, b):\n    return a + b",
    "Mean pooling averages token embeddings under the attention mask.",
    "x",
    "Wie funktioniert die Quantisierung von Gewichten?",
    "import os\nprint(os.getcwd())",
]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def fp8_cli(tmp_path_factory, tiny_dir):
    """``jev4-export --fp8`` on the tiny checkpoint (retrieval, text + vision), as a user runs it."""
    out = tmp_path_factory.mktemp("qdq") / "fp8"
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        code = export_main(["--model", str(tiny_dir), "--adapter", "retrieval", "--fp8", "--calib-size", "16", "--out", str(out), "--no-progress"])
    finally:
        logging.getLogger().removeHandler(records)
    assert code == 0
    return out, records.messages


@pytest.fixture(scope="module")
def int8_vision(tmp_path_factory, tiny_dir):
    """INT8 with the vision tower quantized too (``--quant-exclude '!model.visual.*'``)."""
    out = tmp_path_factory.mktemp("qdq") / "int8"
    return export_quantized_onnx(
        OnnxExportSettings(model=str(tiny_dir), adapter="retrieval", out=str(out), opset=19),
        QuantSettings(make_recipe("int8", exclude=["!model.visual.*"]), calib_size=16),
        progress=False,
    )


def _node_counts(path):
    model = onnx.load(str(path), load_external_data=False)
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts, model


def _check_layout(path, precision, per_channel):
    layout = qdq_layout(path, "language", LANGUAGE_LINEARS)
    assert set(layout) == LANGUAGE_LINEARS  # every Linear's MatMul is found by module name
    stored = "FLOAT8E4M3FN" if precision == "fp8" else "INT8"
    for name in QUANTIZED:
        entry = layout[name]
        assert entry.activation_chain == ("DequantizeLinear", "QuantizeLinear"), name
        assert entry.weight_chain == ("DequantizeLinear",), name
        assert entry.weight_type == stored, name
        assert np.isfinite(entry.weight_scale).all() and (entry.weight_scale > 0).all(), name
        assert entry.input_scale.shape == () and np.isfinite(entry.input_scale) and entry.input_scale > 0, name
        if per_channel:
            assert entry.weight_axis == 1 and entry.weight_scale.ndim == 1  # output channels of the [in, out] MatMul weight
        else:
            assert entry.weight_axis is None and entry.weight_scale.shape == ()
    projector = layout["multi_vector_projector"]  # excluded: a float MatMul, no Q/DQ on either input
    assert (projector.activation_chain, projector.weight_chain, projector.weight_type) == ((), (), "FLOAT")
    # q/k/v share one activation Q/DQ, gate/up another: 4 activation pairs per layer, one weight DQ per Linear
    counts, model = _node_counts(path)
    assert counts["QuantizeLinear"] == 2 * 4 and counts["DequantizeLinear"] == 2 * 4 + len(QUANTIZED)
    # nothing else is quantized: attention's activation x activation matmuls read plain float tensors
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name not in {e.node for e in layout.values()}:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input), node.name
    # zero points are explicit zeros of the quantized type
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert TensorProto.DataType.Name(zp.data_type) == stored
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19


def test_fp8_graph_layout(fp8_cli):
    out, _ = fp8_cli
    _check_layout(out / "language.onnx", "fp8", per_channel=False)
    # big tensors live in external data, as in the float export; the rewrite left no dead bytes in the file
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(out / "language.onnx"), load_external_data=False)
    external = {t.name: ExternalDataInfo(t) for t in model.graph.initializer if uses_external_data(t)}
    assert {e.location for e in external.values()} == {"language.onnx.data"}
    assert sum(e.length for e in external.values()) == (out / "language.onnx.data").stat().st_size
    assert "model.language_model.layers.0.mlp.down_proj.weight_quantized" in external  # 128 x 64 fp8 bytes
    counts, _ = _node_counts(out / "vision.onnx")  # the vision tower is excluded by default
    assert "QuantizeLinear" not in counts and "DequantizeLinear" not in counts


def test_int8_graph_layout_with_the_vision_tower(int8_vision):
    _check_layout(int8_vision / "language.onnx", "int8", per_channel=True)
    manifest = read_manifest(int8_vision)["contents"]["quantization"]
    vision = {n for n in manifest["quantized_modules"] if n.startswith("model.visual.")}
    layout = qdq_layout(int8_vision / "vision.onnx", "vision", vision | set(manifest["excluded_modules"]))
    assert vision == {f"model.visual.blocks.{b}.{p}" for b in range(4) for p in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} - {
        "model.visual.blocks.3.mlp.down_proj"
    }
    for name in vision:
        assert layout[name].activation_chain == ("DequantizeLinear", "QuantizeLinear") and layout[name].weight_type == "INT8", name
    # the fp16-overflowing layers stay float even with the tower quantized
    for name in ["model.visual.blocks.3.mlp.down_proj", *(n for n in layout if n.startswith("model.visual.merger"))]:
        assert (layout[name].activation_chain, layout[name].weight_type) == ((), "FLOAT"), name
    assert any(n.startswith("model.visual.merger") for n in layout)
    # SmoothQuant groups in both towers: 3 per language layer, and norm1/norm2/up->down per vision block (not the excluded last down)
    assert len(manifest["smoothed_groups"]) == 2 * 3 + 4 * 3 - 1
    assert read_manifest(int8_vision)["contents"]["validation"]["vision_min_cosine_vs_emulation"] > 0.999


def test_manifest_records_precision_and_recipe(fp8_cli, int8_vision):
    manifest = read_manifest(fp8_cli[0])
    contents = manifest["contents"]
    assert manifest["kind"] == "onnx" and contents["precision"] == "fp8" and contents["float_dtype"] == "float32"
    quant = contents["quantization"]
    assert QuantRecipe.from_json(quant["recipe"]) == make_recipe("fp8")
    assert set(quant["quantized_modules"]) == QUANTIZED
    assert quant["excluded_modules"]["multi_vector_projector"] == "multi_vector_projector"
    assert quant["excluded_modules"]["model.visual.blocks.0.attn.qkv"] == "model.visual.*"
    assert quant["calibration"]["samples"] == 16 and quant["calibration"]["images"] == 2
    assert quant["qdq_graphs"] == {"language": 14}
    assert contents["validation"]["language_min_cosine_vs_emulation"] > 0.999
    assert manifest["settings"]["quantization"]["calib_size"] == 16
    int8 = read_manifest(int8_vision)["contents"]
    assert int8["precision"] == "int8" and int8["quantization"]["qdq_graphs"] == {"language": 14, "vision": 19}
    from jev4.validate.runner import artifact_precision

    assert artifact_precision(fp8_cli[0]) == "fp8" and artifact_precision(int8_vision) == "int8"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here: the export builds engines instead")
def test_cli_without_tensorrt_ends_with_the_build_command(fp8_cli):
    out, messages = fp8_cli
    hint = next(m for m in messages if "TensorRT engines were not built" in m)
    assert f"jev4 build-engine {out}" in hint and "--precision fp8" in hint


def _cosines(reference, artifact, task, images=()):
    single = [(reference.encode_text(TEXTS, task=task) * artifact.encode_text(TEXTS, task=task)).sum(-1)]
    multi = [torch.cat([(a * b).sum(-1) for a, b in zip(reference.encode_text(TEXTS, task=task, return_multivector=True), artifact.encode_text(TEXTS, task=task, return_multivector=True))])]
    if images:
        single.append((reference.encode_image(images, task=task) * artifact.encode_image(images, task=task)).sum(-1))
        multi.append(torch.cat([(a * b).sum(-1) for a, b in zip(reference.encode_image(images, task=task, return_multivector=True), artifact.encode_image(images, task=task, return_multivector=True))]))
    return torch.cat(single), torch.cat(multi)


def _assert_parity(single, multi):
    assert single.mean() >= 0.99 and single.min() >= 0.97, single
    assert multi.mean() >= 0.99 and multi.min() >= 0.95, (multi.mean(), multi.min())


def test_fp8_runtime_parity_text_and_images(fp8_cli, encoder, images):
    """The artifact loads unchanged in jev4.runtime (onnxruntime, CPU) and stays close to the fp32 unmerged reference."""
    artifact = rt.load(fp8_cli[0])
    assert type(artifact).__name__ == "OnnxRuntimeEncoder"
    single, multi = _cosines(encoder, artifact, "retrieval", images)
    _assert_parity(single, multi)
    assert single.min() < 0.99999  # really quantized (an fp32 export reaches 1 - 1e-7)


def test_int8_runtime_parity_text_and_images(int8_vision, encoder, images):
    _assert_parity(*_cosines(encoder, rt.load(int8_vision), "retrieval", images))


# Every adapter in at least one precision, each precision on two adapters (the full 3 x 2 matrix is measured in docs/quantization.md).
@pytest.mark.parametrize("precision, task", [("fp8", "text-matching"), ("int8", "code")])
def test_runtime_parity_other_adapters(precision, task, tiny_dir, tmp_path, encoder):
    out = export_quantized_onnx(
        OnnxExportSettings(model=str(tiny_dir), adapter=task, out=str(tmp_path / "a"), text_only=True, opset=19, validate=False),
        QuantSettings(make_recipe(precision), calib_size=16),
        progress=False,
    )
    _assert_parity(*_cosines(encoder, rt.load(out), task))


def test_validate_passes_with_fp8_thresholds(fp8_cli, tiny_dir, tmp_path):
    report = tmp_path / "report"
    argv = ["validate", "--reference", str(tiny_dir), "--adapter", "retrieval", "--artifact", str(fp8_cli[0]), "--out", str(report)]
    assert jev4_main([*argv, "--max-queries", "10", "--max-docs", "40", "--max-length", "64"]) == 0
    data = json.loads((report / "report.json").read_text())
    assert data["passed"] and data["precision"] == "fp8"
    assert data["thresholds"]["single_cosine_mean"] == 0.99


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fp8", "--format", "hf"], "writes an ONNX artifact"),
        (["--quant-exclude", "*.o_proj"], "apply to --fp8 or --int8"),
        (["--int8", "--opset", "18"], "opset 19"),
        (["--fp8", "--dtype", "bf16"], "fp32 or fp16"),
        (["--fp8", "--quant-exclude", "!*.q_proj"], "not an exclusion to remove"),
        (["--int8", "--calib-data", "/nonexistent/calib.txt"], "calibration file not found"),
    ],
)
def test_cli_bad_quantization_flags_exit_2(tiny_dir, tmp_path, caplog, extra, message):
    out = tmp_path / "out"
    assert export_main(["--model", str(tiny_dir), "--adapter", "retrieval", "--out", str(out), "--no-progress", *extra]) == 2
    assert message in caplog.text
    assert not out.exists()


def test_cli_fp8_and_int8_are_exclusive(tiny_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        export_main(["--model", str(tiny_dir), "--adapter", "retrieval", "--fp8", "--int8", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------------------------
# insert_qdq on small hand-made graphs: the three weight layouts, and what it refuses


def _plan(precision, weight, per_channel, input_scale=0.02):
    recipe = make_recipe(precision, "per-channel" if per_channel else "per-tensor", smoothquant_alpha=None)
    from jev4.quant.weights import build_plan

    net = torch.nn.Module()
    net.add_module("down", torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        net.down.weight.copy_(torch.from_numpy(weight))
    amax = torch.full((weight.shape[1],), input_scale * recipe.qmax)
    plan = build_plan(net, recipe, {"down": amax}, ["down"], {})
    name = "model.language_model.layers.0.mlp.down_proj"
    return QuantPlan(recipe, {name: dataclasses.replace(plan.modules["down"], name=name)}, {}), name


def _graph(weight, layout, opset=19, metadata=True):
    """x [2, 8] @ W, with W stored as [in, out] (MatMul), [out, in] + Transpose, or Gemm transB=1."""
    out_f, in_f = weight.shape
    nodes, inits = [], []
    if layout == "matmul":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), "val_7"))
        nodes.append(helper.make_node("MatMul", ["x", "val_7"], ["y"], name="node_linear"))
    elif layout == "transpose":
        inits.append(numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["x", "wt"], ["y"], name="node_linear"))
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("Gemm", ["x", "w"], ["y"], name="node_linear", transB=1))
    if metadata:
        scopes = "['', 'language_model', 'language_model.layers.0', 'language_model.layers.0.mlp', 'language_model.layers.0.mlp.down_proj', 'linear']"
        helper.set_metadata_props(nodes[-1], {"pkg.torch.onnx.name_scopes": scopes, "pkg.torch.onnx.fx_node": "%linear : call_function[target=torch.ops.aten.linear.default]"})
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, in_f])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, out_f])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("layout", ["matmul", "transpose", "gemm"])
@pytest.mark.parametrize("precision, per_channel", [("fp8", False), ("fp8", True), ("int8", True)])
def test_insert_qdq_runs_exactly_the_emulated_arithmetic(layout, precision, per_channel):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 8)).astype(np.float32)
    weight[2] *= 20.0
    plan, name = _plan(precision, weight, per_channel)
    model = _graph(weight, layout)
    assert insert_qdq(model, plan, {"language_model": "model.language_model"}, {name: weight}, "float32", "test") == [name]
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: i for i in model.graph.initializer}
    stored = inits[f"{name}.weight_quantized"]
    assert TensorProto.DataType.Name(stored.data_type) == ("FLOAT8E4M3FN" if precision == "fp8" else "INT8")
    assert "val_7" not in inits and "w" not in inits  # the float weight is gone
    x = (rng.standard_normal((2, 8)) * 0.5).astype(np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    q = plan.modules[name]
    expected = fake_quant(torch.from_numpy(x), q.input_scale, precision) @ q.dequantized_weight().T
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_insert_qdq_refuses_what_it_cannot_trust():
    weight = np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32)
    plan, name = _plan("fp8", weight, False)
    prefixes = {"language_model": "model.language_model"}
    with pytest.raises(QuantExportError, match="is not model.language_model.layers.0.mlp.down_proj.weight"):
        insert_qdq(_graph(weight, "matmul"), plan, prefixes, {name: weight * 1.01}, "float32", "test")
    with pytest.raises(QuantExportError, match="recorded no module names"):
        insert_qdq(_graph(weight, "matmul", metadata=False), plan, prefixes, {name: weight}, "float32", "test")
    with pytest.raises(QuantExportError, match="opset"):
        insert_qdq(_graph(weight, "matmul", opset=18), plan, prefixes, {name: weight}, "float32", "test")


def test_fp8_weights_are_stored_as_e4m3fn_bytes():
    weight = np.linspace(-3, 3, 48, dtype=np.float32).reshape(6, 8)
    plan, name = _plan("fp8", weight, False)
    model = _graph(weight, "matmul")
    insert_qdq(model, plan, {"language_model": "model.language_model"}, {name: weight}, "float32", "test")
    stored = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == f"{name}.weight_quantized"))
    assert stored.dtype == ml_dtypes.float8_e4m3fn and stored.shape == (8, 6)
    assert np.abs(stored.astype(np.float32)).max() == 448.0  # amax maps to E4M3's largest finite value
