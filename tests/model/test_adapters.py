"""The multi-task adapter: its tensors decide what is adapted, and each must fit a base Linear."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jev4.errors import AdapterError
from jev4.model.adapters import load_adapters
from jev4.model.encoder import TorchEncoder
from jev4.model.tiny import write_tiny_checkpoint

TASKS = ("retrieval", "text-matching", "code")


def test_load_tiny_adapter(tiny_dir):
    adapters = load_adapters(tiny_dir / "adapters", TASKS)
    assert len(adapters.modules) == 2 * 7 + 1 and adapters.tasks == TASKS
    lora = adapters.modules["model.language_model.layers.1.mlp.down_proj"]["code"]
    assert lora.A.shape == (8, 128) and lora.B.shape == (64, 8) and lora.scale == 16 / 8
    assert lora.A.dtype == torch.float32
    torch.testing.assert_close(lora.delta(), 2.0 * lora.B @ lora.A)
    assert all(by_task[t].B.abs().sum() > 0 for by_task in adapters.modules.values() for t in TASKS)


def _adapter_copy(tiny_dir, tmp_path):
    dst = tmp_path / "adapters"
    shutil.copytree(tiny_dir / "adapters", dst)
    return dst


def test_rslora_scale(tiny_dir, tmp_path):
    dst = _adapter_copy(tiny_dir, tmp_path)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    lora = load_adapters(dst, TASKS).modules["multi_vector_projector"]["retrieval"]
    assert lora.scale == pytest.approx(16 / math.sqrt(8))


def test_old_names_and_bf16_adapter_load_identically(tmp_path, tiny_dir):
    old = write_tiny_checkpoint(tmp_path / "old", seed=0, adapter_layout="old", adapter_dtype="bf16")
    keys = load_file(old / "adapters" / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.model.layers.0.") for k in keys)
    a = load_adapters(old / "adapters", TASKS)
    b = load_adapters(tiny_dir / "adapters", TASKS)
    assert a.modules.keys() == b.modules.keys()
    for module in a.modules:
        torch.testing.assert_close(a.modules[module]["code"].A, b.modules[module]["code"].A.bfloat16().float())


def _edit_adapter(tiny_dir, tmp_path, edit):
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    path = src / "adapters" / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))
    return src


def test_missing_adapters_dir(tiny_dir, tmp_path):
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    shutil.rmtree(src / "adapters")
    with pytest.raises(AdapterError, match="adapters"):
        TorchEncoder.from_pretrained(src)


def test_task_not_in_config(tiny_dir, tmp_path):
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.update({k.replace(".code.", ".summarize."): v.clone() for k, v in t.items() if ".code." in k}))
    with pytest.raises(AdapterError, match="'summarize'"):
        TorchEncoder.from_pretrained(src)


def test_shape_mismatch(tiny_dir, tmp_path):
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.retrieval.weight"
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.update({key: torch.zeros(32, 8)}))
    with pytest.raises(AdapterError, match=r"q_proj.*lora_A/B.retrieval.*out=64"):
        TorchEncoder.from_pretrained(src)


def test_non_linear_module(tiny_dir, tmp_path):
    def add_embed_lora(t):
        for task in TASKS:
            t[f"base_model.model.model.language_model.embed_tokens.lora_A.{task}.weight"] = torch.zeros(8, 64)
            t[f"base_model.model.model.language_model.embed_tokens.lora_B.{task}.weight"] = torch.zeros(640, 8)

    src = _edit_adapter(tiny_dir, tmp_path, add_embed_lora)
    with pytest.raises(AdapterError, match="embed_tokens.*not a Linear"):
        TorchEncoder.from_pretrained(src)


def test_vision_mlp_is_not_adapted_even_if_the_regex_matches(tiny_dir):
    """target_modules would match the vision MLP's gate/up/down_proj; the tensors decide, and they don't."""
    cfg = json.loads((tiny_dir / "adapters" / "adapter_config.json").read_text())
    assert "gate_proj" in cfg["target_modules"]
    assert not any("visual" in m for m in load_adapters(tiny_dir / "adapters", TASKS).modules)


def test_a_without_b(tiny_dir, tmp_path):
    key = "base_model.model.multi_vector_projector.lora_B.code.weight"
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match="multi_vector_projector.code has lora_A but not both"):
        TorchEncoder.from_pretrained(src)
