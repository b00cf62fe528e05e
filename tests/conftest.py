import numpy as np
import pytest
from PIL import Image

from jev4.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny checkpoint as upstream writes it (older base layout, current adapter layout)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


@pytest.fixture(scope="session")
def encoder(tiny_dir):
    from jev4.model.encoder import TorchEncoder

    return TorchEncoder.from_pretrained(tiny_dir, dtype="fp32")


def make_images(sizes=((60, 90), (100, 120), (140, 210))):
    """Deterministic RGB images of different sizes (so image_grid_thw varies)."""
    rng = np.random.RandomState(11)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in sizes]


@pytest.fixture(scope="session")
def images():
    return make_images()
