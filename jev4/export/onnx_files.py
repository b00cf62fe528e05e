"""ONNX graphs bigger than memory: write and move them without loading their weights.

A full-size language graph is 12.4 GB of fp32 weights in one external data
file. Loading it (``onnx.load(..., load_external_data=True)``) costs that
much RAM again, which on a 24 GiB machine is the difference between an
export that finishes and one the OOM killer ends. So a graph is edited as a
proto without its weights, and its data file is either streamed tensor by
tensor (:func:`save_graph`) or, when nothing in it changed, renamed
(:func:`move_graph`, :func:`adopt_external_data`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from jev4.errors import Jev4Error

log = logging.getLogger(__name__)

__all__ = ["EXTERNAL_MIN_BYTES", "adopt_external_data", "move_graph", "save_graph"]

EXTERNAL_MIN_BYTES = 1024  # tensors this big or bigger go to the external data file


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _external_tensors(model) -> list:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [tensor for tensor in _get_all_tensors(model) if uses_external_data(tensor)]


def save_graph(model, path: Path, source_dir: Path, check: bool = True) -> None:
    """Write ``model`` to ``path`` with its tensors of >= 1 KiB in ``<path>.data``, one tensor at a time.

    Tensors still stored externally (in the data file the graph was loaded
    from, under ``source_dir``) are copied byte for byte; new tensors (the
    quantized weights) are written from memory. The data file is written
    beside the old one and replaces it at the end, so memory stays at one
    tensor, whatever the model's size. ``check`` runs ``onnx.checker`` (off
    for graphs with onnxruntime-only ops in the default domain, which the
    checker refuses though onnxruntime runs them).
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    data = path.with_name(path.name + ".data")
    partial = path.with_name(path.name + ".data.partial")
    sources: dict[str, object] = {}
    try:
        with partial.open("wb") as out:
            for tensor in model.graph.initializer:
                if uses_external_data(tensor):
                    info = ExternalDataInfo(tensor)
                    if info.location not in sources:
                        sources[info.location] = (source_dir / info.location).open("rb")
                    handle = sources[info.location]
                    handle.seek(info.offset or 0)
                    blob = handle.read(info.length) if info.length else handle.read()
                elif len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                    blob = tensor.raw_data
                else:
                    continue
                offset = out.tell()
                out.write(blob)
                _set_external(tensor, data.name, offset, len(blob))
    finally:
        for handle in sources.values():
            handle.close()
    partial.replace(data)
    onnx.save_model(model, str(path))
    if check:
        onnx.checker.check_model(str(path))


def adopt_external_data(model, source_dir: Path, path: Path) -> None:
    """Point ``model``'s external tensors at ``<path>.data``, renaming the one data file they live in under ``source_dir``.

    For a graph whose weights did not change (only nodes were edited), so the
    offsets in the data file stay valid: a rename, not a 12 GB copy. A model
    whose tensors span several data files is streamed into one instead.
    Tensors held inline stay inline. The caller saves the proto.
    """
    tensors = _external_tensors(model)
    locations = {entry.value for tensor in tensors for entry in tensor.external_data if entry.key == "location"}
    data = path.with_name(path.name + ".data")
    if not locations:
        return
    if len(locations) > 1:
        raise Jev4Error(f"{source_dir}: the graph's weights span {len(locations)} data files ({', '.join(sorted(locations))}); expected one")
    (location,) = locations
    source = source_dir / location
    if not source.is_file():
        raise Jev4Error(f"{source}: the graph's external data file is missing")
    source.replace(data)
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data.name


def move_graph(source: Path, path: Path) -> None:
    """Move the graph at ``source`` (and its one external data file) to ``path``, replacing what is there, without loading its weights."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    adopt_external_data(model, source.parent, path)
    onnx.save_model(model, str(path))
    if source != path:
        source.unlink()
