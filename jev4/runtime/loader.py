"""``load(path, backend=...)``: read what a directory is and return the encoder that runs it.

- a checkpoint directory (upstream, or a jev4 merge): the torch backend;
- a jev4 ONNX artifact (manifest kind ``onnx``): the onnxruntime backend, on
  the ``provider`` asked for (cpu, cuda, tensorrt);
- an ONNX artifact with engines from ``jev4 build-engine``, with
  ``backend="tensorrt"``: the TensorRT backend (``device``: a CUDA device).
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

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def load(
    path: str | Path,
    backend: str = "auto",
    provider: str = "cpu",
    device: str = "cpu",
    dtype: str = "fp32",
    verify: bool = True,
    quantization: str | None = None,
    task: str | None = None,
) -> Encoder:
    """The encoder for ``path``; ``backend`` picks the engine (``auto``: what the directory holds).

    ``quantization`` (torch only: ``fp8``, ``bnb-int8``, ``bnb-nf4``) merges ``task``'s adapter and
    quantizes the language model's Linear layers (``jev4.runtime.torch_quantized``).
    """
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
        if quantization is not None:
            from jev4.runtime.torch_quantized import load_quantized

            return _with_output_codec(load_quantized(path, quantization, task=task, dtype=dtype, device=device), root)
        return _with_output_codec(TorchEncoder.from_pretrained(path, dtype=dtype, device=device), root)
    if quantization is not None:
        raise Jev4Error(f"quantization={quantization!r} is for the torch backend; an ONNX artifact carries its own precision")
    if kind != "onnx":
        raise ManifestError(f"{root}: is a {kind}, not an ONNX artifact; export one with jev4-export --format onnx")
    config = load_config(root)
    if backend == "tensorrt":
        from jev4.runtime.tensorrt_backend import TensorRTEncoder

        trt_device = device if str(device).startswith("cuda") else "cuda"
        return _with_output_codec(TensorRTEncoder.open(root, manifest, config, Preprocessor.from_dir(root, config), device=trt_device), root)
    from jev4.runtime.onnxruntime_backend import OnnxRuntimeEncoder

    return _with_output_codec(OnnxRuntimeEncoder(root, manifest, config, Preprocessor.from_dir(root, config), provider=provider), root)


def _with_output_codec(encoder: Encoder, root: Path) -> Encoder:
    """Attach the artifact's output codec (``output-codec.json``), or a calibration-free one for binary/float16 outputs."""
    from jev4.quant.output_codec import OutputCodec

    encoder.output_codec = OutputCodec.read(root) or OutputCodec.uncalibrated()
    return encoder
