"""The unmerged multi-task LoRA layer: one-task batches take two plain GEMMs, mixed batches gather per sample."""

import pytest
import torch
from torch import nn

from jev4.model.adapters import TaskLora
from jev4.model.lora import MultiTaskLoRALinear, TaskSelector

TASKS = ("retrieval", "text-matching", "code")


def _layer(seed: int = 0) -> MultiTaskLoRALinear:
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(12, 10, bias=True)
    loras = {t: TaskLora(torch.randn(4, 12, generator=gen), torch.randn(10, 4, generator=gen), 0.5 + i) for i, t in enumerate(TASKS)}
    return MultiTaskLoRALinear(base, loras, TaskSelector(TASKS))


def test_one_task_batch_equals_the_dense_update_and_the_gathered_path():
    layer = _layer()
    x = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(1))
    for i, task in enumerate(TASKS):
        dense = layer.base.weight + (i + 0.5) * layer.lora_B[i] @ layer.lora_A[i]
        with layer.selector.select([task] * 5):
            assert layer.selector.single_task == i
            single = layer(x)
        torch.testing.assert_close(single, x @ dense.T + layer.base.bias, rtol=1e-5, atol=1e-5)
        other = TASKS[(i + 1) % 3]
        with layer.selector.select([task] * 4 + [other]):  # mixed: the gathered path
            assert layer.selector.single_task is None
            mixed = layer(x)
        torch.testing.assert_close(mixed[:4], single[:4], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[4], single[4])
    assert layer.selector.single_task is None  # the selection ends with its context


def test_one_label_for_the_batch_trains_only_that_task_and_counts_are_checked():
    layer = _layer(2)
    layer.lora_A.requires_grad_(True)
    x = torch.randn(3, 12)
    with layer.selector.select(["code"]):
        layer(x).sum().backward()
    assert layer.lora_A.grad[2].abs().sum() > 0 and layer.lora_A.grad[:2].abs().sum() == 0
    with layer.selector.select(["code", "code"]), pytest.raises(RuntimeError, match="2 task labels for a batch of 3"):
        layer(x)
