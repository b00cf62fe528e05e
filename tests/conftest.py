"""Session fixtures shared by the whole suite: tiny checkpoints, the fp32 reference encoder, test images.

Session fixtures are read-only: a test that needs a damaged or edited
checkpoint copies one into its own ``tmp_path`` first.
"""

import numpy as np
import pytest
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401
from PIL import Image

from jev4.model.tiny import write_tiny_checkpoint

# The backbone's modelling module is imported at collection, not by the first fixture that builds a network
# (transformers imports it lazily, ~3 s): `make mutation` forks every mutant's test run from one process
# that has collected the tests, so each fork then starts with it loaded.

IMAGE_SIZES = ((60, 90), (100, 120), (140, 210))  # (height, width): three different image_grid_thw


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny checkpoint as upstream writes it (older base layout, current adapter layout)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_dir_new(tmp_path_factory):
    """The same weights (same seed) with base keys in the current layout (model.language_model.*, model.visual.*)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-new") / "tiny", seed=0, layout="new")


@pytest.fixture(scope="session")
def encoder(tiny_dir):
    """The fp32 torch reference on ``tiny_dir``, all task adapters attached."""
    from jev4.model.encoder import TorchEncoder

    return TorchEncoder.from_pretrained(tiny_dir, dtype="fp32")


def make_images(sizes=IMAGE_SIZES, seed=11):
    """Deterministic RGB images of different sizes (so image_grid_thw varies)."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in sizes]


@pytest.fixture(scope="session")
def images():
    """Three deterministic RGB images: 60x90, 100x120, 140x210 (height x width)."""
    return make_images()
