"""Checkpoint reading: both layouts, strict accounting, corrupt and truncated files named."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jev4.errors import CheckpointError
from jev4.model.checkpoint import (
    canonical_name,
    iter_shard_tensors,
    list_checkpoint_files,
    old_layout_name,
    read_safetensors_header,
    resolve_model_dir,
)
from jev4.model.encoder import TorchEncoder


def test_key_mapping_both_ways(tiny_dir):
    assert canonical_name("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert canonical_name("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert canonical_name("visual.blocks.0.attn.qkv.bias") == "model.visual.blocks.0.attn.qkv.bias"
    assert canonical_name("model.visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"
    assert canonical_name("multi_vector_projector.weight") == "multi_vector_projector.weight"
    files = list_checkpoint_files(tiny_dir)
    names = [n for _, shard in files.shards for n in shard]
    assert len(files.shards) == 2 and len(names) == files.tensor_count
    for name in names:
        assert old_layout_name(canonical_name(name)) == name


def test_reader_equals_safetensors(tiny_dir):
    path = tiny_dir / "model-00002-of-00002.safetensors"
    ours = dict(iter_shard_tensors(path))
    theirs = load_file(path)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key])


def _copy(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


def test_missing_dir_and_not_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_model_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_dir(tmp_path / "file")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="jinaai/jina-embeddings-v4.*(offline|hub)"):
        resolve_model_dir("jinaai/jina-embeddings-v4")


def test_corrupt_header(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = src / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: corrupt safetensors header"):
        list_checkpoint_files(src)


def test_truncated_shard(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: truncated"):
        TorchEncoder.from_pretrained(src)


def test_shard_missing_from_disk(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json but missing"):
        list_checkpoint_files(src)


def _rewrite(src, edit):
    shard = src / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | {k: shard.name for k in tensors}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"visual.merger.ln_q.weight": torch.ones(31, dtype=torch.bfloat16)}), r"visual.merger.ln_q.weight.*\(31,\).*\(32,\)"),
        (lambda t: t.update({"lm_head.weight": torch.ones(2, 2, dtype=torch.bfloat16)}), "unexpected tensor 'lm_head.weight'"),
        (lambda t: t.pop("visual.blocks.0.attn.qkv.bias"), "missing.*model.visual.blocks.0.attn.qkv.bias"),
        (lambda t: t.update({"model.visual.merger.ln_q.weight": t["visual.merger.ln_q.weight"].clone()}), "both map to"),
    ],
    ids=["wrong-shape", "unexpected", "missing", "both-layouts"],
)
def test_strict_accounting(tiny_dir, tmp_path, edit, message):
    src = _copy(tiny_dir, tmp_path)
    _rewrite(src, edit)
    with pytest.raises(CheckpointError, match=message):
        TorchEncoder.from_pretrained(src)


def test_header_offsets_checked(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = src / "model-00002-of-00002.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = "visual.merger.ln_q.weight"
    assert header[name]["shape"] == [32]
    header[name]["shape"] = [33]  # same number of characters, 2 bytes more than its offsets hold
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    shard.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(CheckpointError, match=f"corrupt safetensors header: '{name}'"):
        read_safetensors_header(shard)
