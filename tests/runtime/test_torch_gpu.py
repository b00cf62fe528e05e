"""The torch backend on a CUDA GPU (skipped without one): bf16 and fp32 against the CPU fp32 reference."""

import numpy as np
import pytest
import torch
from PIL import Image

import jev4.runtime as rt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine; runs on the GPU host"),
]
TEXTS = ["What is the capital of France?", "Paris is the capital of France. " * 20, "x", "def f(a): return a * 2"]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("task", ["retrieval", "text-matching", "code"])
@pytest.mark.parametrize("dtype, single_bar, multi_bar", [("fp32", 0.99999, 0.9999), ("bf16", 0.999, 0.99)])
def test_cuda_matches_cpu_reference(runtime_source, runtime_reference, task, dtype, single_bar, multi_bar):
    enc = rt.load(runtime_source, backend="torch", device="cuda", dtype=dtype)
    assert _cos(enc.encode_text(TEXTS, task=task), runtime_reference.encode_text(TEXTS, task=task)).min() >= single_bar
    got = enc.encode_text(TEXTS, task=task, return_multivector=True)
    ref = runtime_reference.encode_text(TEXTS, task=task, return_multivector=True)
    assert min(_cos(g, r).min() for g, r in zip(got, ref)) >= multi_bar
    rng = np.random.RandomState(3)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in [(60, 90), (200, 300)]]
    assert _cos(enc.encode_image(images, task=task), runtime_reference.encode_image(images, task=task)).min() >= single_bar
