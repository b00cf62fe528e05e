"""Nothing silent: a damaged source is an error from every path that reads it, and no output is left behind.

Each test edits a copy of the tiny checkpoint in ``tmp_path`` (session
fixtures are read-only). The unit checks live beside their modules
(test_checkpoint, test_adapters, test_encoder); here the same damage goes
through both consumers of a checkpoint, the torch encoder and the hf merge.
"""

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from jev4.errors import AdapterError, CheckpointError
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.model.encoder import TorchEncoder

SHARD1 = "model-00001-of-00002.safetensors"


def _rewrite(path, edit):
    """Rewrite a safetensors file with ``edit`` applied to its tensors, same keys and same metadata."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    keys = set(tensors)
    edit(tensors)
    assert set(tensors) == keys
    save_file(tensors, str(path), metadata=metadata)


def _merge(src, out, task="code"):
    return merge_checkpoint(MergeSettings(model=str(src), adapter=task, out=str(out)), progress=False)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"], ids=["adapted", "not-adapted"])
def test_nan_base_weight_fails_load_and_merge(tiny_dir, tmp_path, name):
    """A base tensor full of NaN: the encoder and the merge both refuse it by file and name; the merge writes nothing."""
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    shard = src / SHARD1
    _rewrite(shard, lambda t: t[name].fill_(float("nan")))
    shape = list(load_file(shard)[name].shape)
    count = shape[0] * (shape[1] if len(shape) > 1 else 1)
    first = [0] * len(shape)
    message = re.escape(
        f"{shard}: tensor '{name}' BF16{shape} holds non-finite values ({count} of {count} values are NaN, the first at {first}); "
        "the file is corrupt or was saved from a diverged model"
    )
    with pytest.raises(CheckpointError, match=message):
        TorchEncoder.from_pretrained(src)
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError, match=message):
        _merge(src, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left either


def test_one_inf_in_a_vision_tensor_fails_a_text_only_merge_too(tiny_dir, tmp_path):
    """The text-only merge reads the vision tensors it drops: a corrupt source is still named, not exported around."""
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    shard = src / "model-00002-of-00002.safetensors"
    name = "visual.blocks.0.attn.qkv.weight"

    def poison(t):
        t[name][1, 2] = float("-inf")

    _rewrite(shard, poison)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: tensor '{name}' BF16[96, 32] holds non-finite values (1 of 3072 values are inf, the first at [1, 2])")):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(tmp_path / "out"), text_only=True), progress=False)
    assert not (tmp_path / "out").exists()


def test_nan_adapter_weight_fails_load_and_merge(tiny_dir, tmp_path):
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    weights = src / "adapters" / "adapter_model.safetensors"
    key = "base_model.model.multi_vector_projector.lora_A.retrieval.weight"
    _rewrite(weights, lambda t: t[key].fill_(float("nan")))
    message = re.escape(f"{weights}: tensor '{key}' F32[8, 64] holds non-finite values (512 of 512 values are NaN, the first at [0, 0])")
    with pytest.raises(CheckpointError, match=message):
        TorchEncoder.from_pretrained(src)
    # the poisoned task is not the one merged: the adapter file is still corrupt, and still refused
    with pytest.raises(CheckpointError, match=message):
        _merge(src, tmp_path / "merged", task="code")
    assert not (tmp_path / "merged").exists()


def test_config_rank_disagreeing_with_the_tensors_fails_load_and_merge(tiny_dir, tmp_path):
    """adapter_config.json says r=16, the tensors have rank 8: before, the merge went ahead with alpha/16."""
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    config_path = src / "adapters" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["r"] == 8
    config["r"] = 16
    config_path.write_text(json.dumps(config))
    pattern = (
        re.escape(f"{src / 'adapters' / 'adapter_model.safetensors'}: tensors 'base_model.model.")
        + r".*' \(8, \d+\) and '.*' \(\d+, 8\) have rank 8, but "
        + re.escape(f"{config_path} says r=16")
    )
    with pytest.raises(AdapterError, match=pattern):
        TorchEncoder.from_pretrained(src)
    with pytest.raises(AdapterError, match=pattern):
        _merge(src, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_sound_copy_still_merges(tiny_dir, tmp_path):
    """The rewrite helper itself changes nothing: an unedited rewrite loads and merges, with identical weights."""
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    _rewrite(src / SHARD1, lambda t: None)
    assert all(torch.equal(a, b) for a, b in zip(load_file(src / SHARD1).values(), load_file(tiny_dir / SHARD1).values()))
    assert (_merge(src, tmp_path / "merged") / "config.json").is_file()
