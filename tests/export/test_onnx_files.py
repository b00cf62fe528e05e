"""Big-graph file handling: graphs moved and re-pointed without loading their weights, and streamed saves."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from jev4.errors import Jev4Error
from jev4.export.onnx_files import adopt_external_data, move_graph, save_graph


def _matmul_graph(path, weights: dict[str, np.ndarray]):
    """y = ((x @ w0) @ w1) ... with the weights in external data beside ``path``; returns the expected product."""
    nodes, previous = [], "x"
    for index, name in enumerate(weights):
        out = "y" if index == len(weights) - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [previous, name], [out], name=f"mm{index}"))
        previous = out
    inits = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return {"w0": rng.standard_normal((16, 16)).astype(np.float32), "w1": rng.standard_normal((16, 16)).astype(np.float32)}


def test_move_graph_renames_the_data_file_and_keeps_the_values(tmp_path, weights):
    src_dir, dst_dir = tmp_path / "builder", tmp_path / "out"
    src_dir.mkdir()
    dst_dir.mkdir()
    source = src_dir / "model.onnx"
    _matmul_graph(source, weights)
    data_inode = (src_dir / "model.onnx.data").stat().st_ino
    (dst_dir / "language.onnx.data").write_bytes(b"stale weights of an earlier graph")
    x = np.ones((1, 16), np.float32)
    move_graph(source, dst_dir / "language.onnx")
    assert not source.exists() and not (src_dir / "model.onnx.data").exists()
    assert (dst_dir / "language.onnx.data").stat().st_ino == data_inode  # renamed, not copied
    locations = {e.value for t in onnx.load(str(dst_dir / "language.onnx"), load_external_data=False).graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"language.onnx.data"}
    np.testing.assert_allclose(_run(dst_dir / "language.onnx", x), x @ weights["w0"] @ weights["w1"], rtol=1e-5)


def test_adopt_external_data_refuses_two_data_files_and_a_missing_one(tmp_path, weights):
    path = tmp_path / "g.onnx"
    _matmul_graph(path, weights)
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[1].external_data[0].value = "other.data"
    with pytest.raises(Jev4Error, match="span 2 data files"):
        adopt_external_data(model, tmp_path, tmp_path / "moved.onnx")
    model = onnx.load(str(path), load_external_data=False)
    (tmp_path / "g.onnx.data").unlink()
    with pytest.raises(Jev4Error, match="external data file is missing"):
        adopt_external_data(model, tmp_path, tmp_path / "moved.onnx")


def test_save_graph_streams_external_and_new_tensors_into_one_file(tmp_path, weights):
    path = tmp_path / "g.onnx"
    _matmul_graph(path, weights)
    model = onnx.load(str(path), load_external_data=False)
    replaced = (weights["w1"] * 2).astype(np.float32)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(replaced, "w1"))  # a new in-memory tensor beside a streamed one
    save_graph(model, path, tmp_path)
    x = np.full((1, 16), 0.5, np.float32)
    np.testing.assert_allclose(_run(path, x), x @ weights["w0"] @ replaced, rtol=1e-5)
    saved = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in saved.graph.initializer)
    assert not (tmp_path / "g.onnx.data.partial").exists()
