"""CPU edge ONNX: the fused graph (onnxruntime-genai builder), weight-only int4 / int8, parity, validate, bad input."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch

import jev4.runtime as rt
from jev4.cli.export import main as export_main
from jev4.cli.main import main as jev4_main
from jev4.errors import MissingDependencyError, SettingsError
from jev4.export.onnx import OnnxExportSettings
from jev4.export.onnx_edge import EdgeSettings, export_edge_onnx
from jev4.export.onnx_weights import WeightQuantError, WeightQuantSettings, quantize_weights
from jev4.validate.thresholds import DEFAULTS

LAYERS = 2  # the tiny checkpoint
# fp32 fused graph (GroupQueryAttention, fused norms) on onnxruntime's CPU provider vs the fp32 torch reference:
# measured 1 - cos <= 1.2e-13 per vector and per token. 1e-9 keeps room for other CPUs and still fails a 1%
# LoRA-scale error (1 - cos ~5e-5). This file's tests run on CPU only.
FUSED_FP32_GAP = 1e-9
needs_builder = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai is not installed (pip install 'jev4[edge]')")
TEXTS = [
    "x",
    "What is the capital of France?",
    "def add(a, b):\n    return a + b",
    "Mean pooling averages token embeddings under the attention mask, so right padding must not leak into it. " * 6,
    "Wie funktioniert die Quantisierung von Gewichten?",
    "import os\nprint(os.getcwd())",
    "stocks fell sharply " * 20,
]


def _ops(path):
    counts = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _manifest(art):
    return json.loads((art / "jev4-manifest.json").read_text())


def _cosines(reference, artifact, batch_size):
    """(single-vector cosines, per-token multi-vector cosines) over TEXTS, passages, padded batches of mixed lengths."""
    kw = dict(task="retrieval", prompt_name="passage", max_length=256)
    ref, got = reference.encode_text(TEXTS, **kw), artifact.encode_text(TEXTS, batch_size=batch_size, **kw)
    ref_m = reference.encode_text(TEXTS, return_multivector=True, **kw)
    got_m = artifact.encode_text(TEXTS, return_multivector=True, batch_size=batch_size, **kw)
    assert got.shape == ref.shape
    assert [g.shape for g in got_m] == [r.shape for r in ref_m]
    single = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
    tokens = torch.cat([torch.nn.functional.cosine_similarity(g.double(), r.double(), dim=-1) for g, r in zip(got_m, ref_m)])
    return single, tokens


@pytest.fixture(scope="module")
def fused(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("edge") / "fused"
    return export_edge_onnx(OnnxExportSettings(model=str(tiny_dir), adapter="retrieval", out=str(out), text_only=True), EdgeSettings(fused=True), progress=False)


@pytest.fixture(scope="module")
def fused_int4(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("edge") / "fused-int4"
    settings = OnnxExportSettings(model=str(tiny_dir), adapter="retrieval", out=str(out), text_only=True)
    return export_edge_onnx(settings, EdgeSettings(fused=True, weights=WeightQuantSettings("int4")), progress=False)


@pytest.fixture(scope="module")
def int8_cli(tmp_path_factory, tiny_dir):
    """``jev4-export --weights int8`` on jev4's own (unfused) text-only graph, as a user runs it."""
    out = tmp_path_factory.mktemp("edge") / "int8"
    argv = ["--model", str(tiny_dir), "--adapter", "retrieval", "--format", "onnx", "--text-only", "--weights", "int8", "--out", str(out), "--no-progress"]
    assert export_main(argv) == 0
    return out


# ---- the fused graph -------------------------------------------------------------------------------


@needs_builder
def test_fused_graph_has_fused_attention_and_norms(fused):
    ops = _ops(fused / "language.onnx")
    assert ops["GroupQueryAttention"] == LAYERS
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS  # (residual + norm) before attention of layer 1.. and before each MLP
    assert ops["SimplifiedLayerNormalization"] == 1  # the first layer's input norm (no residual yet)
    assert "Softmax" not in ops and "Pow" not in ops and "ReduceMean" not in ops  # no unfused attention or RMSNorm left
    assert "Sin" not in ops and "Cos" not in ops  # rotary inside GroupQueryAttention (cos/sin caches)
    gqa = next(n for n in onnx.load(str(fused / "language.onnx"), load_external_data=False).graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: a.i for a in gqa.attribute if a.type == onnx.AttributeProto.INT}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2 and attrs["do_rotary"] == 1
    assert gqa.input[3] == gqa.input[4] == ""  # no KV cache
    assert gqa.input[9]  # positions from jev4's position_ids
    manifest = _manifest(fused)
    contents = manifest["contents"]
    assert contents["precision"] == "fp32" and contents["opset"] == 22
    assert contents["fused"]["fused_ops"] == {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1}
    assert contents["fused"]["producer"].startswith("onnxruntime-genai ")
    assert [t["name"] for t in contents["graphs"]["language"]["inputs"]] == ["input_ids", "attention_mask", "position_ids", "pooling_mask"]
    assert manifest["settings"]["edge"] == {"fused": True, "weights": None}
    assert contents["validation"]["language_min_cosine"] >= 1 - 1e-6  # the export's own check, fp32 dot products: resolves ~1e-7
    assert rt.load(fused).engine().endswith("(cpu; fp32, fused attention)")
    assert not any(name.startswith(".edge-work") for name in manifest["files"])  # the builder's scratch is gone


@needs_builder
@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_fused_parity_padded_batches(fused, encoder, batch_size):
    single, tokens = _cosines(encoder, rt.load(fused), batch_size)
    assert 1 - single.min().item() <= FUSED_FP32_GAP, 1 - single.min().item()
    assert 1 - tokens.min().item() <= FUSED_FP32_GAP, 1 - tokens.min().item()


@needs_builder
def test_fused_every_matryoshka_dim_and_query_prompt(fused, encoder):
    art = rt.load(fused)
    for dim in encoder.config.matryoshka_dims:
        got = art.encode_text(TEXTS, task="retrieval", prompt_name="query", truncate_dim=dim, batch_size=4)
        ref = encoder.encode_text(TEXTS, task="retrieval", prompt_name="query", truncate_dim=dim)
        gap = 1 - torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1).min().item()
        assert gap <= FUSED_FP32_GAP, (dim, gap)


# ---- weight-only int4 / int8 -----------------------------------------------------------------------


@needs_builder
def test_int4_graph_and_manifest(fused_int4):
    ops = _ops(fused_int4 / "language.onnx")
    assert ops["MatMulNBits"] == 5 * LAYERS  # qkv (fused by the builder), o, gate, up, down
    assert ops["MatMul"] == 1  # the projector, kept float
    assert ops["GroupQueryAttention"] == LAYERS and "Softmax" not in ops
    contents = _manifest(fused_int4)["contents"]
    assert contents["precision"] == "w-int4"
    assert rt.load(fused_int4).engine().endswith("(cpu; w-int4, fused attention)")
    weights = contents["weights"]
    assert (weights["precision"], weights["block_size"], weights["accuracy_level"], weights["symmetric"]) == ("int4", 32, 4, False)
    assert weights["quantized_op"] == "MatMulNBits" and weights["quantized_matmuls"] == 10
    assert len(weights["kept_float_nodes"]) == 1 and weights["keep_float"] == ["projector"]
    node = next(n for n in onnx.load(str(fused_int4 / "language.onnx"), load_external_data=False).graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4


@needs_builder
def test_int4_parity_within_its_thresholds(fused_int4, encoder):
    t = DEFAULTS["w-int4"]
    single, tokens = _cosines(encoder, rt.load(fused_int4), 3)
    assert single.min() >= t.single_cosine_min and single.mean() >= t.single_cosine_mean
    assert tokens.min() >= t.multi_token_cosine_min
    assert single.min() < 0.999  # really 4-bit: a float graph lands at 0.9999999


def test_int8_graph_and_parity(int8_cli, encoder):
    ops = _ops(int8_cli / "language.onnx")
    assert ops["MatMulInteger"] == 7 * LAYERS  # q, k, v, o, gate, up, down per layer
    assert ops["DynamicQuantizeLinear"] >= LAYERS
    assert ops["Softmax"] == LAYERS  # jev4's own graph: attention unfused, untouched by the quantizer
    contents = _manifest(int8_cli)["contents"]
    assert contents["precision"] == "w-int8" and contents["weights"]["per_channel"] is True and contents["weights"]["reduce_range"] is True
    assert contents["weights"]["quantized_op"] == "MatMulInteger" and len(contents["weights"]["kept_float_nodes"]) == 1
    t = DEFAULTS["w-int8"]
    single, tokens = _cosines(encoder, rt.load(int8_cli), 4)
    assert single.min() >= max(t.single_cosine_min, 0.999)  # measured 0.9997 on this checkpoint
    assert tokens.min() >= max(t.multi_token_cosine_min, 0.995)
    assert single.min() < 0.9999999


def test_int8_weights_are_stored_as_int8(int8_cli):
    model = onnx.load(str(int8_cli / "language.onnx"))
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) == 7 * LAYERS
    assert (int8_cli / "language.onnx.data").is_file()  # external data kept
    # 7-bit weights (reduce_range): u8s8 kernels without VNNI saturate on full 8-bit ones
    for init in int8:
        codes = onnx.numpy_helper.to_array(init, base_dir=str(int8_cli))
        assert np.abs(codes.astype(np.int16)).max() == 64, init.name  # symmetric 7-bit: -64..64 (8-bit would reach 127)


# ---- jev4 validate on each artifact ----------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param("fused", marks=needs_builder), pytest.param("fused_int4", marks=needs_builder), "int8_cli"])
def test_validate_passes(name, request, tiny_dir, tmp_path):
    art = request.getfixturevalue(name)
    report = tmp_path / "report"
    argv = ["validate", "--reference", str(tiny_dir), "--adapter", "retrieval", "--artifact", str(art), "--out", str(report)]
    assert jev4_main([*argv, "--max-queries", "10", "--max-docs", "40", "--max-length", "64", "--no-progress"]) == 0
    data = json.loads((report / "report.json").read_text())
    assert data["passed"], [c for c in data["checks"] if not c.get("passed", True)]
    assert data["precision"] == _manifest(art)["contents"]["precision"]


# ---- bad input -------------------------------------------------------------------------------------


def test_cli_unknown_weights_value_exits_2(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        export_main(["--model", str(tiny_dir), "--adapter", "retrieval", "--weights", "int3", "--out", str(out)])
    assert exc.value.code == 2
    assert "--weights: invalid choice: 'int3'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "int4", "--dtype", "fp16"], "--weights int4 writes an fp32 graph"),
        (["--weights", "int8", "--dtype", "bf16"], "drop --dtype bf16"),
        (["--fused"], "add --text-only"),
        (["--fused", "--text-only", "--opset", "19"], "--opset does not apply to --fused"),
        (["--weights", "int4", "--fp8"], "cannot be combined with --fp8"),
        (["--weights", "int8", "--format", "hf"], "writes an ONNX artifact"),
    ],
)
def test_cli_bad_edge_flags_exit_2(tiny_dir, tmp_path, caplog, extra, message):
    out = tmp_path / "out"
    assert export_main(["--model", str(tiny_dir), "--adapter", "retrieval", "--out", str(out), "--no-progress", *extra]) == 2
    assert message in caplog.text
    assert not out.exists()


@pytest.mark.parametrize("kwargs, message", [({"precision": "int2"}, "int2"), ({"precision": "int4", "block_size": 48}, "block size 48"), ({"precision": "int4", "accuracy_level": 7}, "accuracy level 7")])
def test_weight_settings_refuse_bad_values(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        WeightQuantSettings(**kwargs)


def test_missing_builder_is_named(tiny_dir, tmp_path, monkeypatch):
    import jev4.export.onnx_fused as fused_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(fused_mod.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))
    settings = OnnxExportSettings(model=str(tiny_dir), adapter="retrieval", out=str(tmp_path / "o"), text_only=True)
    with pytest.raises(MissingDependencyError, match=r"pip install 'jev4\[edge\]'"):
        export_edge_onnx(settings, EdgeSettings(fused=True), progress=False)
    assert not (tmp_path / "o").exists()


def test_graph_without_weight_matmuls_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"], name="mm")],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])],
    )
    path = tmp_path / "language.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(WeightQuantError, match="no MatMul with a constant weight"):
        quantize_weights(path, WeightQuantSettings("int8"))


@needs_builder
def test_builder_failure_is_one_line(tmp_path):
    from jev4.export.onnx_fused import FusedExportError, run_builder

    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    (tmp_path / "work").mkdir()
    with pytest.raises(FusedExportError, match=r"failed \(exit \d+\) on .*not-a-checkpoint"):
        run_builder(empty, tmp_path / "built", tmp_path / "work")
    assert not (tmp_path / "built" / "model.onnx").exists()


@needs_builder
def test_fused_graph_needs_less_attention_memory(fused, int8_cli, monkeypatch):
    """The runtime's memory guard knows the fused graph keeps one score buffer, not jev4's MatMul-Softmax-MatMul's five."""
    from jev4.errors import EncodeError
    from jev4.runtime import onnxruntime_backend

    # 1 x 512 tokens, 4 heads: unfused needs ~25 MB (6 x 4 x 512^2 x 4 B), fused ~6 MB.
    monkeypatch.setattr(onnxruntime_backend, "available_memory", lambda: 12 * 2**20)
    text = ["word " * 600]
    got = rt.load(fused).encode_text(text, task="retrieval", max_length=512)
    assert got.shape == (1, 64) and torch.isfinite(got).all()
    with pytest.raises(EncodeError, match=r"a batch of 1 x 512 tokens needs about"):
        rt.load(int8_cli).encode_text(text, task="retrieval", max_length=512)


def test_int8_without_the_second_copy_equals_onnxruntimes_own_result(tmp_path):
    """quantize_weights skips onnxruntime's value_info reload (3 copies of the float graph at full size); the graph it writes is the one onnxruntime's unaltered path writes."""
    import onnxruntime as ort
    import onnxruntime.quantization.onnx_quantizer as onnx_quantizer
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((64, 64)).astype(np.float32) * 0.1 for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"], name=f"mm{i}") for i in range(3)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])], [helper.make_tensor_value_info("h2", TensorProto.FLOAT, ["b", 64])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )  # fmt: skip
    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    for name in ("ours", "theirs"):
        (tmp_path / name).mkdir()
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / name / "language.onnx"), save_as_external_data=True, location="language.onnx.data", size_threshold=0)
    quantize_weights(tmp_path / "ours" / "language.onnx", WeightQuantSettings("int8", reduce_range=False))
    assert onnx_quantizer.save_and_reload_model_with_shape_infer is original  # restored after the call
    quantize_dynamic(
        str(tmp_path / "theirs" / "language.onnx"), str(tmp_path / "theirs" / "q.onnx"), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
        op_types_to_quantize=["MatMul"], use_external_data_format=True, extra_options={"MatMulConstBOnly": True},
    )  # fmt: skip
    ours = onnx.load(str(tmp_path / "ours" / "language.onnx"))
    theirs = onnx.load(str(tmp_path / "theirs" / "q.onnx"))
    assert [n.op_type for n in ours.graph.node] == [n.op_type for n in theirs.graph.node] and _ops(tmp_path / "ours" / "language.onnx")["MatMulInteger"] == 3
    ours_inits = {i.name: numpy_helper.to_array(i) for i in ours.graph.initializer}
    theirs_inits = {i.name: numpy_helper.to_array(i) for i in theirs.graph.initializer}
    assert ours_inits.keys() == theirs_inits.keys()
    for name, value in ours_inits.items():
        np.testing.assert_array_equal(value, theirs_inits[name])
    x = rng.standard_normal((2, 64)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(tmp_path / "ours" / "language.onnx"), run(tmp_path / "theirs" / "q.onnx"))
