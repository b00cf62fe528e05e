"""The random-weight checkpoint writer (full size in benchmarks; the toy sizes here): a usable tokenizer included."""

import json

import pytest
import torch

from jev4.bench.merge import _reusable_source
from jev4.errors import ConfigError
from jev4.model.encoder import TorchEncoder
from jev4.model.preprocess import load_tokenizer
from jev4.model.synthetic import write_random_checkpoint
from jev4.model.tiny import FULL_SIZE_VOCAB, TinySpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
SPECIAL_KEYS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "pad_token_id": "<|endoftext|>",
    "eos_token_id": "<|im_end|>",
}


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    """The full-size writer at the toy sizes (the full size is 8 GB), with its default, the real vocabulary size."""
    return write_random_checkpoint(tmp_path_factory.mktemp("random") / "ckpt", spec=TinySpec(), progress=False)


def test_writes_the_tiny_tokenizer_files(random_dir, tiny_dir):
    for name in TOKENIZER_FILES:
        assert (random_dir / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_config_special_ids_are_the_tokenizers(random_dir):
    config = json.loads((random_dir / "config.json").read_text())
    tok = load_tokenizer(random_dir)
    for key, token in SPECIAL_KEYS.items():
        assert config[key] == tok.convert_tokens_to_ids(token), key
    assert config["vocab_size"] == FULL_SIZE_VOCAB >= len(tok)
    assert len(tok("Query: hello world")["input_ids"]) > 0


def test_encoder_runs_on_text_and_images(random_dir, images):
    encoder = TorchEncoder.from_pretrained(random_dir, dtype="fp32")
    text = encoder.encode_text(["hello world", "a longer text about the capital of France"], task="retrieval")
    image = encoder.encode_image(images[:2], task="retrieval")
    assert text.shape == image.shape == (2, 64)
    assert torch.isfinite(text).all() and torch.isfinite(image).all()


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size 100 is smaller than the synthetic tokenizer's"):
        write_random_checkpoint(tmp_path / "small", spec=TinySpec(), vocab_size=100, progress=False)
    assert not (tmp_path / "small").exists()


def test_merge_bench_rewrites_a_source_without_tokenizer(tmp_path, random_dir):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((random_dir / "config.json").read_text())
    assert not _reusable_source(old)
    assert not _reusable_source(tmp_path / "absent")
    assert _reusable_source(random_dir)
