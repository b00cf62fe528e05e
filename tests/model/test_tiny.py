"""The tiny checkpoint writer: upstream's files, names, dtypes; deterministic."""

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from jev4.errors import OutputExistsError
from jev4.model.preprocess import load_tokenizer
from jev4.model.tiny import write_tiny_checkpoint

FILES = {
    "config.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "adapters/adapter_config.json",
    "adapters/adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
}


def test_files_and_keys(tiny_dir):
    assert {p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()} == FILES
    keys = set()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(str(tiny_dir / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys |= set(f.keys())
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    assert "model.layers.0.self_attn.q_proj.bias" in keys and "model.layers.0.self_attn.o_proj.weight" in keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    assert "visual.patch_embed.proj.weight" in keys and "visual.blocks.0.attn.qkv.weight" in keys
    assert "visual.merger.mlp.0.weight" in keys and "multi_vector_projector.bias" in keys
    assert not any(k.startswith(("model.language_model", "model.visual", "lm_head")) for k in keys)
    adapter = load_file(tiny_dir / "adapters" / "adapter_model.safetensors")
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.retrieval.weight" in adapter
    assert "base_model.model.multi_vector_projector.lora_B.text-matching.weight" in adapter
    assert len(adapter) == (2 * 7 + 1) * 3 * 2
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if ".lora_B." in k)
    assert json.loads((tiny_dir / "adapters" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"


def test_tokenizer_and_special_ids(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    tok = load_tokenizer(tiny_dir)
    for key, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert config[key] == tok.convert_tokens_to_ids(token)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.bos_token is None
    ids = tok("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi")["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") == ids[0]
    assert tok.decode(tok("Grüße, 東京!")["input_ids"]) == "Grüße, 東京!"
    assert config["vocab_size"] >= len(tok)


def test_deterministic(tmp_path, tiny_dir):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    other = write_tiny_checkpoint(tmp_path / "other", seed=5)
    for name in ("model-00001-of-00002.safetensors", "adapters/adapter_model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert (other / "model-00001-of-00002.safetensors").read_bytes() != (tiny_dir / "model-00001-of-00002.safetensors").read_bytes()


def test_refuses_existing_out(tiny_dir):
    with pytest.raises(OutputExistsError, match="--force"):
        write_tiny_checkpoint(tiny_dir)
