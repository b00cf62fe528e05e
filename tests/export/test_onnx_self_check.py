"""The ONNX export's own check (``validate_export``): a graph that computes something else is refused, and nothing is published.

The export is run for real; between writing ``language.onnx`` and the
onnxruntime check, one initializer of the written graph is changed: the
final RMSNorm scale multiplied by ``1 + 0.03 * s`` (``s`` a fixed random sign
per channel). The graph then differs from torch by a cosine of ~0.99955, a
subtle error (the fp32 bar is 0.9999) that only running the graph reveals:
``onnx.checker`` and the manifest are both happy with it.
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


def test_a_graph_that_differs_from_torch_is_refused_and_nothing_is_published(tmp_path, monkeypatch, tiny_dir):
    copy_side_files = onnx_export._copy_side_files
    seen = []

    def corrupt_then_copy(model_dir, tmp, config, settings):  # runs after the graph is written, before the check
        _scale_initializer(tmp / "language.onnx", NORM, 0.03)
        seen.append(tmp)
        copy_side_files(model_dir, tmp, config, settings)

    monkeypatch.setattr(onnx_export, "_copy_side_files", corrupt_then_copy)
    out = tmp_path / "onnx"
    with pytest.raises(ExportValidationError) as info:
        export_onnx(OnnxExportSettings(model=str(tiny_dir), adapter="retrieval", out=str(out), text_only=True), progress=False)
    assert len(seen) == 1 and isinstance(info.value, Jev4Error)  # a Jev4Error: the CLI prints one line, exit 2
    message = str(info.value)
    found = re.fullmatch(r"language\.onnx differs from torch at batch (\d+) x seq (\d+): min cosine (0\.\d{6}) < 0\.9999", message)
    assert found, message
    assert (found[1], found[2]) == ("1", "1")  # the first shape checked already fails
    assert 0.999 < float(found[3]) < 0.9999  # subtle: a tenfold looser bar would have let it through
    assert not out.exists()
    assert not seen[0].exists()  # the staging directory is gone too
    assert list(tmp_path.iterdir()) == []
