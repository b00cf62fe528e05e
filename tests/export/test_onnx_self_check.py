"""The ONNX export's own check (``validate_export``): a graph that computes something else is refused, and nothing is published.

The export is run for real; between writing ``language.onnx`` and the
onnxruntime check, one initializer of the written graph is changed: the
final RMSNorm scale multiplied by ``1 + 0.03 * s`` (``s`` a fixed random sign
per channel). The graph then differs from torch by a cosine of ~0.99955, a
subtle error (the fp32 bar is 1 - 1e-5) that only running the graph reveals:
``onnx.checker`` and the manifest are both happy with it. A second case
changes only the multi-vector projector's bias, which the single vectors
never see: the per-token check must refuse it.
"""

import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import jev4.export.onnx as onnx_export
from jev4.errors import Jev4Error
from jev4.export.onnx import ExportValidationError, OnnxExportSettings, export_onnx

NORM = "language_model.norm.weight"
PROJECTOR_BIAS = "projector.bias"  # multi_vector_projector, as the language graph names it


def _scale_initializer(path, name, eps):
    """Multiply one inline initializer of ``path`` by ``1 + eps * sign`` in place (external data untouched)."""
    model = onnx.load(str(path), load_external_data=False)
    (init,) = [i for i in model.graph.initializer if i.name == name]
    assert init.data_location == onnx.TensorProto.DEFAULT  # stored inline, so rewriting the .onnx is enough
    value = numpy_helper.to_array(init)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=value.shape).astype(value.dtype)
    init.CopyFrom(numpy_helper.from_array(value * (1 + eps * signs), name))
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # still a valid model: only running it tells


def _export_corrupted(tmp_path, monkeypatch, tiny_dir, name, eps):
    """Run the export with initializer ``name`` of the written graph scaled by ``1 + eps * sign``; returns the error and the staging dir."""
    copy_side_files = onnx_export._copy_side_files
    seen = []

    def corrupt_then_copy(model_dir, tmp, config, settings):  # runs after the graph is written, before the check
        _scale_initializer(tmp / "language.onnx", name, eps)
        seen.append(tmp)
        copy_side_files(model_dir, tmp, config, settings)

    monkeypatch.setattr(onnx_export, "_copy_side_files", corrupt_then_copy)
    out = tmp_path / "onnx"
    with pytest.raises(ExportValidationError) as info:
        export_onnx(OnnxExportSettings(model=str(tiny_dir), adapter="retrieval", out=str(out), text_only=True), progress=False)
    assert len(seen) == 1 and isinstance(info.value, Jev4Error)  # a Jev4Error: the CLI prints one line, exit 2
    assert not out.exists()
    assert not seen[0].exists()  # the staging directory is gone too
    assert list(tmp_path.iterdir()) == []
    return str(info.value)


def test_a_graph_that_differs_from_torch_is_refused_and_nothing_is_published(tmp_path, monkeypatch, tiny_dir):
    message = _export_corrupted(tmp_path, monkeypatch, tiny_dir, NORM, 0.03)
    found = re.fullmatch(r"language\.onnx differs from torch at batch (\d+) x seq (\d+): single-vector min cosine (0\.\d{9}) < 0\.99999", message)
    assert found, message
    assert (found[1], found[2]) == ("1", "1")  # the first shape checked already fails
    assert 0.999 < float(found[3]) < 0.9999  # subtle: a tenfold looser bar would still have refused it, and 0.999 would not


def test_a_multi_vector_projector_that_differs_is_refused(tmp_path, monkeypatch, tiny_dir):
    message = _export_corrupted(tmp_path, monkeypatch, tiny_dir, PROJECTOR_BIAS, 0.5)  # the single vectors never see it
    assert re.fullmatch(r"language\.onnx differs from torch at batch 1 x seq 1: multi-vector per-token min cosine 0\.\d{9} < 0\.9999", message), message
