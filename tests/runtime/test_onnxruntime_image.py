"""Images end to end through ONNX (vision graph -> language graph) vs the torch reference."""

import numpy as np
import pytest
import torch
from PIL import Image

import jev4.runtime as rt

SIZES = [(60, 90), (112, 112), (200, 300), (280, 280)]  # grids 4x6 .. 20x20 patches, several attention windows


def _images():
    rng = np.random.RandomState(7)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in SIZES]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("task", ["retrieval", "text-matching", "code"])
def test_image_parity_single_and_multi(onnx_artifacts, runtime_reference, task, provider, fp32_bound):
    enc = rt.load(onnx_artifacts[task], provider=provider)
    images = _images()
    ref = runtime_reference.encode_image(images, task=task)
    for batch_size in (1, 4):
        got = enc.encode_image(images, task=task, batch_size=batch_size)
        fp32_bound.check(got, ref, f"{task} images, batch {batch_size}")
    got_multi = enc.encode_image(images, task=task, return_multivector=True, batch_size=2)
    ref_multi = runtime_reference.encode_image(images, task=task, return_multivector=True)
    fp32_bound.check(got_multi, ref_multi, f"{task} image tokens")


def test_image_matryoshka_and_max_pixels(onnx_artifacts, runtime_reference, cpu_fp32_bound):
    enc = rt.load(onnx_artifacts["retrieval"])
    images = _images()[2:]
    for dim in runtime_reference.config.matryoshka_dims:
        got = enc.encode_image(images, truncate_dim=dim)
        assert got.shape == (2, dim)
        cpu_fp32_bound.check(got, runtime_reference.encode_image(images, truncate_dim=dim), f"images dim {dim}")
    small = enc.encode_image(images, max_pixels=56 * 56 * 2)
    cpu_fp32_bound.check(small, runtime_reference.encode_image(images, max_pixels=56 * 56 * 2), "images, max_pixels")


def test_text_only_artifact_refuses_images(tmp_path, runtime_source):
    from jev4.errors import EncodeError
    from jev4.export.onnx import OnnxExportSettings, export_onnx

    out = export_onnx(OnnxExportSettings(model=str(runtime_source), adapter="code", out=str(tmp_path / "t"), text_only=True), progress=False)
    with pytest.raises(EncodeError, match="text-only"):
        rt.load(out).encode_image(_images()[:1], task="code")


def test_fp16_export_with_vision(tmp_path, runtime_source, runtime_reference, provider):
    """fp16 graphs (vision with its fp32 islands) on onnxruntime CPU: single vectors within 0.999."""
    from jev4.export.onnx import OnnxExportSettings, export_onnx
    from jev4.export.onnx_vision import fp32_islands

    out = export_onnx(OnnxExportSettings(model=str(runtime_source), adapter="retrieval", out=str(tmp_path / "f16"), dtype="fp16"), progress=False)
    islands = fp32_islands(out / "vision.onnx")
    assert any("merger" in name for name in islands) and any("mlp.down_proj" in name for name in islands)
    enc = rt.load(out, provider=provider)
    images = _images()
    assert _cos(enc.encode_image(images), runtime_reference.encode_image(images)).min() >= 0.999
    texts = ["a short query", "a somewhat longer passage about the weather in the mountains " * 5]
    assert _cos(enc.encode_text(texts), runtime_reference.encode_text(texts)).min() >= 0.999
