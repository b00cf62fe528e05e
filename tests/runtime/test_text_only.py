"""jev4.runtime.text_only: the --text-only export loads back in jev4, in its current and its earlier layout."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import jev4.runtime as rt
from jev4.errors import CheckpointError, EncodeError
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.runtime.text_only import TextOnlyEncoder

TEXTS = ["what is a llama?", "def add(a, b):\n    return a + b", "x"]


@pytest.fixture(scope="module")
def text_only(tmp_path_factory, runtime_source):
    out = tmp_path_factory.mktemp("text-only") / "art"
    return merge_checkpoint(MergeSettings(model=str(runtime_source), adapter="code", out=str(out), dtype="fp32", text_only=True), progress=False)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_single_and_multi_vectors_equal_the_reference(text_only, runtime_reference):
    encoder = rt.load(text_only)
    assert isinstance(encoder, TextOnlyEncoder) and encoder.tasks == ("code",)
    assert _cos(encoder.encode_text(TEXTS, task="code", truncate_dim=16), runtime_reference.encode_text(TEXTS, task="code", truncate_dim=16)).min() > 0.999999
    for got, ref in zip(encoder.encode_text(TEXTS, task="code", return_multivector=True), runtime_reference.encode_text(TEXTS, task="code", return_multivector=True)):
        assert got.shape == ref.shape and _cos(got, ref).min() > 0.99999


def test_earlier_layout_loads_too(text_only, runtime_reference, tmp_path):
    """jev4 wrote model.-prefixed names and the projector at the top before: such exports still load."""
    old = shutil.copytree(text_only, tmp_path / "old")
    weights = load_file(str(old / "model.safetensors"))
    save_file({f"model.{k}": v for k, v in weights.items()}, str(old / "model.safetensors"), metadata={"format": "pt"})
    shutil.move(old / "multi_vector_projector" / "model.safetensors", old / "multi_vector_projector.safetensors")
    (old / "multi_vector_projector").rmdir()
    config = json.loads((old / "config.json").read_text())
    config["jev4_multi_vector_projector"] = "multi_vector_projector.safetensors"
    (old / "config.json").write_text(json.dumps(config))
    encoder = rt.load(old, verify=False)  # files changed on purpose: the manifest no longer matches
    assert _cos(encoder.encode_text(TEXTS, task="code"), runtime_reference.encode_text(TEXTS, task="code")).min() > 0.999999


def test_missing_projector_and_images(text_only, tmp_path):
    art = shutil.copytree(text_only, tmp_path / "art")
    with pytest.raises(EncodeError, match="cannot encode images"):
        rt.load(art).encode_image(Image.new("RGB", (56, 56)), task="code")
    shutil.rmtree(art / "multi_vector_projector")
    with pytest.raises(CheckpointError, match="multi-vector projector of this text-only export is missing"):
        rt.load(art, verify=False)
