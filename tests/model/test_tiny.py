"""The tiny checkpoint writer: upstream's files, names, dtypes; deterministic."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from jev4.errors import OutputExistsError
from jev4.model.preprocess import load_tokenizer
from jev4.model.tiny import SPECIAL_TOKENS, write_tiny_checkpoint

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
FILES = {
    "config.json",
    "model.safetensors.index.json",
    *SHARDS,
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
BINARY = (*SHARDS, "adapters/adapter_model.safetensors", "tokenizer.json")
TASKS = ("retrieval", "text-matching", "code")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def expected_base_keys(layers=2, blocks=4):
    """UPSTREAM.md's list of base keys in the older layout, for the tiny sizes."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "multi_vector_projector.weight", "multi_vector_projector.bias"}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"}
        keys |= {f"{p}self_attn.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")}
        keys |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    keys |= {"visual.patch_embed.proj.weight", "visual.merger.ln_q.weight"}
    keys |= {f"visual.merger.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    for j in range(blocks):
        p = f"visual.blocks.{j}."
        keys |= {p + "norm1.weight", p + "norm2.weight"}
        keys |= {f"{p}attn.{x}.{k}" for x in ("qkv", "proj") for k in ("weight", "bias")}
        keys |= {f"{p}mlp.{x}_proj.{k}" for x in ("gate", "up", "down") for k in ("weight", "bias")}
    return keys


def test_file_names(tiny_dir):
    assert {p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()} == FILES
    assert not list(tiny_dir.rglob("*.py"))


def test_base_keys_dtypes_and_metadata(tiny_dir):
    keys = {}
    for shard in SHARDS:
        with safe_open(str(tiny_dir / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert k not in keys
                keys[k] = f.get_tensor(k)
    assert set(keys) == expected_base_keys()
    assert {t.dtype for t in keys.values()} == {torch.bfloat16}
    assert "model.layers.0.self_attn.o_proj.bias" not in keys and "visual.patch_embed.proj.bias" not in keys
    assert not any(k.startswith(("model.language_model.", "model.visual.", "lm_head")) for k in keys)
    assert keys["visual.patch_embed.proj.weight"].shape == (32, 3, 2, 14, 14)
    assert keys["multi_vector_projector.weight"].shape == (32, 64)
    assert keys["visual.blocks.0.attn.qkv.weight"].shape == (96, 32)
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(keys) and set(index["weight_map"].values()) == set(SHARDS)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in keys.values())


def test_new_layout_has_the_same_tensors(tiny_dir, tiny_dir_new):
    old = {**load_file(tiny_dir / SHARDS[0]), **load_file(tiny_dir / SHARDS[1])}
    new = {**load_file(tiny_dir_new / SHARDS[0]), **load_file(tiny_dir_new / SHARDS[1])}
    assert len(old) == len(new)
    for name, tensor in new.items():
        assert name.startswith(("model.language_model.", "model.visual.", "multi_vector_projector."))
        old_name = name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        assert torch.equal(old[old_name], tensor), name
    assert (tiny_dir / "adapters/adapter_model.safetensors").read_bytes() == (tiny_dir_new / "adapters/adapter_model.safetensors").read_bytes()


def test_adapter_keys(tiny_dir):
    adapter = load_file(tiny_dir / "adapters" / "adapter_model.safetensors")
    expected = {
        f"base_model.model.{module}.lora_{kind}.{task}.weight"
        for module in [f"model.language_model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS] + ["multi_vector_projector"]
        for kind in "AB"
        for task in TASKS
    }
    assert set(adapter) == expected and len(adapter) == (2 * 7 + 1) * 3 * 2
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.retrieval.weight" in adapter
    assert "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_A.text-matching.weight" in adapter
    assert "base_model.model.multi_vector_projector.lora_A.code.weight" in adapter
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    for key, tensor in adapter.items():
        if ".lora_B." in key:
            assert tensor.abs().sum() > 0, key
    # tasks differ from each other
    a = "base_model.model.multi_vector_projector.lora_B.{}.weight"
    assert not torch.equal(adapter[a.format("retrieval")], adapter[a.format("code")])
    with safe_open(str(tiny_dir / "adapters" / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_adapter_config(tiny_dir):
    cfg = json.loads((tiny_dir / "adapters" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "FEATURE_EXTRACTION"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["bias"] == "none"
    assert cfg["use_rslora"] is False and cfg["use_dora"] is False
    assert isinstance(cfg["target_modules"], str)
    assert "task_names" not in cfg


def test_config_json(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == ["JinaEmbeddingsV4Model"]
    assert config["torch_dtype"] == "bfloat16"
    assert config["task_names"] == list(TASKS)
    assert config["rope_scaling"]["mrope_section"] == [2, 3, 3]
    assert config["text_config"]["tie_word_embeddings"] is True
    assert config["vision_config"]["out_hidden_size"] == config["hidden_size"] == 64
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config["text_config"][key] == config[key]
    processor = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "Qwen2VLImageProcessor"
    assert processor["processor_class"] == "JinaEmbeddingsV4Processor"
    assert processor["size"] == {"shortest_edge": processor["min_pixels"], "longest_edge": processor["max_pixels"]}


def test_tokenizer_and_special_ids(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    tok = load_tokenizer(tiny_dir)
    for key, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("pad_token_id", "<|endoftext|>"),
        ("eos_token_id", "<|im_end|>"),
    ):
        assert config[key] == tok.convert_tokens_to_ids(token), key
    # every Qwen special token exists, in Qwen's order, as one token
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    for token in SPECIAL_TOKENS:
        assert tok(token)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.bos_token is None
    encoded = tok("Query: hello")["input_ids"]
    assert tok.decode(encoded) == "Query: hello"  # no BOS (or anything else) added
    assert tok.decode(tok("Grüße, 東京!")["input_ids"]) == "Grüße, 東京!"
    assert config["vocab_size"] >= len(tok)
    tok_cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "Qwen2Tokenizer" and tok_cfg["model_max_length"] == 32768
    assert json.loads((tiny_dir / "added_tokens.json").read_text()) == dict(zip(SPECIAL_TOKENS, ids))


def test_deterministic(tmp_path, tiny_dir):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    other = write_tiny_checkpoint(tmp_path / "other", seed=5)
    for name in BINARY:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    for name in (*SHARDS, "adapters/adapter_model.safetensors"):
        assert (other / name).read_bytes() != (tiny_dir / name).read_bytes(), name
    # the tokenizer does not depend on the seed
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_refuses_existing_out_unless_forced(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "out", seed=0)
    before = (out / SHARDS[0]).read_bytes()
    with pytest.raises(OutputExistsError, match=f"{out}: already exists; pass --force"):
        write_tiny_checkpoint(out, seed=3)
    assert (out / SHARDS[0]).read_bytes() == before  # untouched
    write_tiny_checkpoint(out, seed=3, force=True)
    assert (out / SHARDS[0]).read_bytes() != before
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == FILES
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary dirs left behind


def test_bad_layout_argument(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        write_tiny_checkpoint(tmp_path / "x", layout="newest")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("seed", [99999999999999999999, 2**63, -1, 1.5, True, "7"])
def test_seed_out_of_range_is_a_settings_error(tmp_path, seed):
    from jev4.errors import SettingsError

    with pytest.raises(SettingsError, match=rf"^--seed {re.escape(repr(seed))}: must be an integer between 0 and 9223372036854775807"):
        write_tiny_checkpoint(tmp_path / "x", seed=seed)
    assert not (tmp_path / "x").exists()


def test_largest_seed_is_accepted(tmp_path):
    write_tiny_checkpoint(tmp_path / "x", seed=2**63 - 1)
    assert (tmp_path / "x" / "config.json").is_file()


def test_head_dim_32_variant_has_the_same_layout(tmp_path, tiny_dir):
    """The head_dim-32 toy (for engines whose attention rejects 16) keeps the layout: same files and tensor names."""
    from jev4.cli.main import main
    from jev4.model.checkpoint import list_checkpoint_files, read_safetensors_header
    from jev4.model.config import load_config
    from jev4.model.encoder import TorchEncoder

    out = tmp_path / "tiny32"
    assert main(["make-tiny", str(out), "--head-dim", "32", "--no-progress"]) == 0
    config = load_config(out)
    assert config.hidden_size // config.raw["num_attention_heads"] == 32
    names = lambda d: sorted(n for path, _ in list_checkpoint_files(d).shards for n in read_safetensors_header(path))
    assert names(out) == names(tiny_dir)
    vectors = TorchEncoder.from_pretrained(out).encode_text(["hello", "def f(): pass"], task="code")
    assert vectors.shape == (2, 128) and torch.allclose(vectors.norm(dim=-1), torch.ones(2))
