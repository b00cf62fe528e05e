"""jev4's torch image backend against transformers' real fast (torchvision) Qwen2-VL processor.

The reference is ``data/fast_processor_reference.npz``, written by
``scripts/make_fast_processor_fixture.py`` in an environment where
torchvision imports (it does not beside jev4's torch).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jev4.errors import CheckpointError, EncodeError
from jev4.model.image_resize import Qwen2VLImageSettings, TorchImageProcessor, smart_resize
from jev4.model.preprocess import ModelInputs, Preprocessor, load_image_processor

FIXTURE = Path(__file__).parent / "data" / "fast_processor_reference.npz"
REFERENCE = np.load(FIXTURE)
META = json.loads(str(REFERENCE["meta"]))
CASES = list(enumerate(META["cases"]))


def reference(i: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(pixel_values, image_grid_thw, max_pixels override or None) of fixture case ``i``."""
    max_pixels = int(REFERENCE[f"max_pixels_{i}"])
    return REFERENCE[f"pixel_values_{i}"], REFERENCE[f"grid_{i}"], max_pixels or None


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return TorchImageProcessor.from_pretrained(tiny_dir)


def test_fixture_is_the_real_fast_processor_on_this_config(tiny_dir):
    assert FIXTURE.stat().st_size < 600_000
    assert META["processor"] == "Qwen2VLImageProcessor"  # transformers 5's torchvision backend (use_fast=True)
    assert set(META["versions"]) >= {"torch", "torchvision", "transformers"}
    assert META["versions"]["transformers"] == "5.23.0" and META["versions"]["torchvision"].startswith("0.29")
    # the tiny checkpoint still writes the preprocessor config the fixture was made from
    assert json.loads((tiny_dir / "preprocessor_config.json").read_text()) == META["preprocessor_config"]


@pytest.mark.parametrize("i, name", CASES, ids=[name for _, name in CASES])
def test_pixel_values_equal_the_fast_processor(processor, i, name):
    pixel_values, grid, max_pixels = reference(i)
    size = None if max_pixels is None else {"longest_edge": max_pixels}
    out = processor([REFERENCE[f"input_{i}"]], size=size)
    assert out["image_grid_thw"].tolist() == grid.tolist()
    assert out["pixel_values"].dtype == torch.float32
    assert out["pixel_values"].shape == pixel_values.shape
    assert float(np.abs(out["pixel_values"].numpy() - pixel_values).max()) <= 1e-6


def test_batch_equals_the_fast_processor(processor):
    """Several images in one call (two of one shape, which transformers resizes stacked): concatenated in order."""
    images = [Image.fromarray(REFERENCE[f"batch_input_{j}"]) for j in range(META["batch_size"])]
    out = processor(images)
    assert out["image_grid_thw"].tolist() == REFERENCE["batch_grid"].tolist()
    assert float(np.abs(out["pixel_values"].numpy() - REFERENCE["batch_pixel_values"]).max()) <= 1e-6


def test_preprocessor_uses_the_torch_backend_by_default(encoder):
    """Through Preprocessor.image_inputs (what every encoder calls), max_pixels included."""
    assert isinstance(encoder.preprocessor.image_processor, TorchImageProcessor)
    for i, _ in CASES:
        pixel_values, grid, max_pixels = reference(i)
        batch = encoder.preprocessor.image_inputs([Image.fromarray(REFERENCE[f"input_{i}"])], max_pixels=max_pixels)
        assert batch.image_grid_thw.tolist() == grid.tolist()
        assert float(np.abs(batch.pixel_values.numpy() - pixel_values).max()) <= 1e-6


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_embeddings_equal_those_of_the_fast_processor(encoder):
    """The tiny reference encoder on jev4's pixel_values vs the real fast processor's: per-token cosine >= 0.999999."""
    cases = [i for i, _ in CASES if reference(i)[2] is None]
    ours = encoder.preprocessor.image_inputs([Image.fromarray(REFERENCE[f"input_{i}"]) for i in cases])
    theirs_pixels = torch.from_numpy(np.concatenate([reference(i)[0] for i in cases]))
    assert theirs_pixels.shape == ours.pixel_values.shape
    theirs = ModelInputs(**{**vars(ours), "pixel_values": theirs_pixels})
    tasks = ["retrieval"] * ours.batch_size
    single_ours, multi_ours = encoder._forward(ours, tasks)
    single_theirs, multi_theirs = encoder._forward(theirs, tasks)
    valid = ours.attention_mask.bool()
    assert float(_cosine(multi_ours[valid], multi_theirs[valid]).min()) >= 0.999999
    assert float(_cosine(single_ours, single_theirs).min()) >= 0.999999


def test_pil_backend_is_selectable_and_close(tiny_dir, encoder):
    """The PIL processor stays available (image_backend="pil"): same grids, pixels within a couple of 8-bit levels."""
    pil = Preprocessor.from_dir(tiny_dir, encoder.config, image_backend="pil")
    assert type(pil.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    worst = 0.0
    for i, _ in CASES:
        pixel_values, grid, max_pixels = reference(i)
        batch = pil.image_inputs([Image.fromarray(REFERENCE[f"input_{i}"])], max_pixels=max_pixels)
        assert batch.image_grid_thw.tolist() == grid.tolist()
        worst = max(worst, float(np.abs(batch.pixel_values.numpy() - pixel_values).max()))
    level = 1 / (255 * min(META["preprocessor_config"]["image_std"]))  # one 8-bit level after normalising
    assert level < worst <= 2.01 * level  # PIL's bicubic filter is not torch's: it differs, a little
    with pytest.raises(EncodeError, match=r"unknown image_backend 'cv2'; choose one of \['torch', 'pil'\]"):
        load_image_processor(tiny_dir, "cv2")


# --- smart_resize and settings -----------------------------------------------


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (28, 28, (56, 56)),  # below min_pixels: grown
        (56, 84, (56, 84)),  # already multiples of 28
        (70, 70, (56, 56)),  # 70 / 28 = 2.5 rounds half to even, as Python's round
        (98, 98, (112, 112)),  # 3.5 -> 4
        (2, 400, (28, 812)),  # aspect ratio exactly 200 is allowed
        (1000, 1000, (448, 448)),  # over max_pixels: shrunk, rounded down
    ],
)
def test_smart_resize(height, width, expected):
    assert smart_resize(height, width, 28, 56 * 56, 28 * 28 * 256) == expected


def test_smart_resize_refuses_aspect_over_200():
    with pytest.raises(EncodeError, match=r"^image 3: aspect ratio 201 \(201x1 pixels\) is over the limit of 200"):
        smart_resize(1, 201, 28, 3136, 200704, "image 3")


def test_processor_names_the_image_it_refuses(processor):
    ok = np.zeros((30, 30, 3), dtype=np.uint8)
    with pytest.raises(EncodeError, match=r"^image 1: aspect ratio 201"):
        processor([ok, np.zeros((1, 201, 3), dtype=np.uint8)])
    with pytest.raises(EncodeError, match=r"^image 0: mode 'L', expected RGB"):
        processor([Image.new("L", (30, 30))])


def test_settings_from_config_as_transformers_reads_it():
    config = {"size": {"shortest_edge": 100, "longest_edge": 1000}, "min_pixels": 200, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    settings = Qwen2VLImageSettings.from_config(config)
    assert (settings.min_pixels, settings.max_pixels) == (200, 1000)  # top-level min/max_pixels override size
    assert settings.image_mean == (0.5, 0.5, 0.5) and settings.patch_size == 14 and settings.factor == 28
    assert Qwen2VLImageSettings.from_config({}) == Qwen2VLImageSettings()
    with pytest.raises(CheckpointError, match=r"resample=2 .* bicubic \(3\) only; use image_backend='pil'"):
        Qwen2VLImageSettings.from_config({"resample": 2})
    with pytest.raises(CheckpointError, match="do_resize=false"):
        Qwen2VLImageSettings.from_config({"do_resize": False})


def test_normalisation_is_the_fused_arithmetic(processor):
    """(v - 255 * mean) / (255 * std) in float32, as transformers fuses rescale and normalise."""
    settings = processor.settings
    values = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(3, 16, 16)
    got = processor.normalize(values)
    fused_mean = torch.tensor(settings.image_mean) * (1.0 / settings.rescale_factor)
    fused_std = torch.tensor(settings.image_std) * (1.0 / settings.rescale_factor)
    assert torch.equal(got, (values.float() - fused_mean.view(3, 1, 1)) / fused_std.view(3, 1, 1))
    mean, std = torch.tensor(settings.image_mean).view(3, 1, 1), torch.tensor(settings.image_std).view(3, 1, 1)
    unfused = (values.float() * settings.rescale_factor - mean) / std
    assert float((got - unfused).abs().max()) < 1e-5  # the same up to float32 rounding
