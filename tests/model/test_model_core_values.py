"""Pooling, LoRA layers and adapter settings pinned by value: what a first mutation run of jev4/model/ left alive.

Why apart from the encoder tests: those compare whole encoders, where a
per-row positive scale vanishes in the L2 normalisation and a one-row batch
hides a norm taken over the whole batch. These call each piece directly.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jev4.errors import AdapterError
from jev4.model.adapters import TaskLora, load_adapters, read_lora_settings
from jev4.model.checkpoint import canonical_name
from jev4.model.lora import MultiTaskLoRALinear, TaskSelector
from jev4.model.pooling import mean_pool, multi_vector, single_vector, truncate

TASKS = ("retrieval", "text-matching", "code")


def test_mean_pool_is_the_mean_over_the_mask():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])  # a long mask, as tokenizers give
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1, 1]])
    assert torch.equal(mean_pool(hidden, mask), expected)
    assert torch.equal(mean_pool(hidden, mask.bool()), expected)
    assert torch.equal(mean_pool(hidden, torch.zeros(2, 3, dtype=torch.long)), torch.zeros(2, 2))  # empty: 0, not NaN
    assert mean_pool(hidden.to(torch.bfloat16), mask).dtype == torch.float32


def test_single_vector_normalises_each_row():
    hidden = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])
    out = single_vector(hidden, torch.ones(2, 1))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_multi_vector_zeroes_padding_and_normalises_each_token():
    projected = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [5.0, 5.0]]])
    out = multi_vector(projected, torch.tensor([[1, 1, 0]]))
    assert torch.equal(out[0, 2], torch.zeros(2))  # padding is exactly zero (no 0/0, no inf)
    assert torch.allclose(out[0, :2], torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    assert out.dtype == torch.float32


def test_truncate_renormalises_each_row_alone():
    vectors = torch.tensor([[3.0, 4.0, 12.0], [0.0, 1.0, 0.0]])
    out = truncate(vectors, 2)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert truncate(vectors, 3) is vectors and truncate(vectors, None) is vectors  # full width: untouched, unnormalised


def _layer(base_dtype=torch.float32):
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 3).to(base_dtype)
    loras = {t: TaskLora(torch.randn(2, 4), torch.randn(3, 2), scale=0.5 * (i + 1)) for i, t in enumerate(TASKS)}
    selector = TaskSelector(TASKS)
    return MultiTaskLoRALinear(base, loras, selector), base, loras, selector


def test_lora_layer_is_frozen_fp32_and_keeps_the_base_dtype():
    layer, base, loras, selector = _layer(torch.bfloat16)
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.scale.dtype == torch.float32
    assert layer.scale.tolist() == [0.5, 1.0, 1.5]
    x = torch.randn(2, 5, 4).to(torch.bfloat16)
    for labels in (["code", "code"], ["code", "retrieval"]):  # the one-task path and the gathered path
        with selector.select(labels):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        expected = torch.stack([base(x[i]) + (loras[t].scale * (x[i].float() @ loras[t].A.T @ loras[t].B.T)).to(torch.bfloat16) for i, t in enumerate(labels)])
        torch.testing.assert_close(out, expected, atol=0.02, rtol=0.02)
    assert selector.indices(["code", "retrieval"]).dtype == torch.long


def test_a_mixed_batch_uses_each_samples_task():
    layer, base, loras, selector = _layer()
    x = torch.randn(3, 4)
    with selector.select(["text-matching", "retrieval", "text-matching"]):
        out = layer(x)
    for i, t in enumerate(["text-matching", "retrieval", "text-matching"]):
        torch.testing.assert_close(out[i], base(x[i]) + loras[t].delta() @ x[i], atol=1e-5, rtol=1e-5)


@pytest.fixture
def adapter_copy(tiny_dir, tmp_path):
    dst = tmp_path / "adapters"
    shutil.copytree(tiny_dir / "adapters", dst)
    return dst


def _config(dst, drop=(), **changes):
    cfg = json.loads((dst / "adapter_config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))


def test_settings_defaults_and_refusals(adapter_copy):
    _config(adapter_copy, drop=("bias", "rank_pattern", "alpha_pattern"), r=1)
    settings = read_lora_settings(adapter_copy)
    assert (settings.r, settings.use_rslora) == (1, False)  # rank 1 is a rank; bias absent means none
    path = adapter_copy / "adapter_config.json"
    for change, message in [
        ({"alpha_pattern": {"q_proj": 4}}, f"{path}: per-module rank_pattern/alpha_pattern is not supported"),
        ({"rank_pattern": {"q_proj": 4}}, f"{path}: per-module rank_pattern/alpha_pattern is not supported"),
        ({"bias": "all"}, f"{path}: LoRA biases (bias='all') are not supported"),
        ({"r": 0}, f"{path}: 'r' must be a positive integer, got 0"),
    ]:
        _config(adapter_copy, drop=("bias", "rank_pattern", "alpha_pattern"), **{"r": 8, **change})
        with pytest.raises(AdapterError) as info:
            read_lora_settings(adapter_copy)
        assert str(info.value) == message


def test_load_adapters_messages_and_log(adapter_copy, caplog):
    weights = adapter_copy / "adapter_model.safetensors"
    with caplog.at_level(logging.INFO, logger="jev4.model.adapters"):
        loaded = load_adapters(adapter_copy, TASKS)
    assert loaded.source == adapter_copy
    assert [r.getMessage() for r in caplog.records if r.name == "jev4.model.adapters"] == [
        f"adapter {adapter_copy}: {len(loaded.modules)} modules x 3 tasks, r=8 alpha=16"
    ]
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("lora_A.code.weight"))
    module = canonical_name(name.removeprefix("base_model.model.").removesuffix(".lora_A.code.weight"))
    cases = [
        ({**tensors, name: tensors[name].flatten()}, f"{weights}: tensor {name!r} has shape ({tensors[name].numel()},), expected a matrix"),
        ({}, f"{weights}: holds no LoRA tensors"),
        ({n: t for n, t in tensors.items() if n != name}, f"{weights}: {module}.code has lora_B but not both A and B"),
    ]
    for content, message in cases:
        save_file(content, weights)
        with pytest.raises(AdapterError) as info:
            load_adapters(adapter_copy, TASKS)
        assert str(info.value) == message
