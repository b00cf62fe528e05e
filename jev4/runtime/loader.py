"""``load(path, backend=...)``: read what a directory is and return the encoder that runs it.

- a checkpoint directory (upstream, or a jev4 merge): the torch backend;
- a jev4 ONNX artifact (manifest kind ``onnx``): the onnxruntime backend, on
  the ``provider`` asked for (cpu, cuda, tensorrt).
An artifact's files are checked against its manifest checksums before use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jev4.errors import Jev4Error, ManifestError
from jev4.export.manifest import MANIFEST_NAME, read_manifest, verify_manifest
from jev4.model.config import load_config
from jev4.model.encoder import Encoder, TorchEncoder
from jev4.model.preprocess import Preprocessor

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")


def load(
    path: str | Path,
    backend: str = "auto",
    provider: str = "cpu",
    device: str = "cpu",
    dtype: str = "fp32",
    verify: bool = True,
) -> Encoder:
    """The encoder for ``path``; ``backend`` picks the engine (``auto``: what the directory holds)."""
    if backend not in BACKENDS:
        raise Jev4Error(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    root = Path(path)
    manifest = read_manifest(root) if (root / MANIFEST_NAME).is_file() else None
    kind = manifest["kind"] if manifest else "checkpoint"
    if backend == "auto":
        backend = "onnxruntime" if kind == "onnx" else "torch"
    if manifest is not None and verify:
        verify_manifest(root)
    if backend == "torch":
        if kind == "onnx":
            raise ManifestError(f"{root}: is an ONNX artifact; load it with backend='onnxruntime' (or point torch at a checkpoint)")
        return TorchEncoder.from_pretrained(path, dtype=dtype, device=device)
    if kind != "onnx":
        raise ManifestError(f"{root}: is a {kind}, not an ONNX artifact; export one with jev4-export --format onnx")
    from jev4.runtime.onnxruntime_backend import OnnxRuntimeEncoder

    config = load_config(root)
    return OnnxRuntimeEncoder(root, manifest, config, Preprocessor.from_dir(root, config), provider=provider)
