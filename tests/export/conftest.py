import pytest

from jev4.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def merge_source(tmp_path_factory):
    """The tiny checkpoint (upstream layout) that merge tests read; never modified."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("merge-src") / "tiny", seed=1)


@pytest.fixture(scope="session")
def source_encoder(merge_source):
    from jev4.model.encoder import TorchEncoder

    return TorchEncoder.from_pretrained(merge_source, dtype="fp32")
