"""Unmerged multi-task LoRA, as upstream's ``MultiAdapterLinear`` applies it.

Each adapted Linear computes ``base(x) + scale_t * B_t(A_t(x))`` where ``t``
is the task of the sample. All tasks' A/B are stacked so one batch can mix
tasks: the per-sample matrices are gathered by task index, with no Python
loop over samples. A batch of one task (the usual case, and every QAT step)
skips the gather and runs two plain GEMMs on that task's matrices. The LoRA
path runs in fp32 whatever the base dtype, as upstream keeps LoRA weights in
fp32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from jev4.errors import TaskError
from jev4.model.adapters import TaskLora


class TaskSelector:
    """The per-sample task indices of the forward pass in flight, shared by every LoRA layer of one model.

    Upstream passes a ``task_label`` keyword through every module; a shared
    selector keeps transformers' modules unmodified.
    """

    def __init__(self, tasks: Sequence[str]):
        self.tasks = tuple(tasks)
        self._task_ids: torch.Tensor | None = None
        self._single: int | None = None  # the one task index when every sample has the same task

    def indices(self, task_labels: Sequence[str]) -> torch.Tensor:
        unknown = sorted({t for t in task_labels if t not in self.tasks})
        if unknown:
            raise TaskError(f"unknown task(s) {unknown}; known tasks are {list(self.tasks)}")
        return torch.tensor([self.tasks.index(t) for t in task_labels], dtype=torch.long)

    @contextmanager
    def select(self, task_labels: Sequence[str], device: torch.device | str = "cpu") -> Iterator[None]:
        previous = self._task_ids, self._single
        ids = self.indices(task_labels)
        self._single = int(ids[0]) if len(set(task_labels)) == 1 else None  # decided on the host: no device sync
        self._task_ids = ids.to(device)
        try:
            yield
        finally:
            self._task_ids, self._single = previous

    @property
    def task_ids(self) -> torch.Tensor:
        if self._task_ids is None:
            raise RuntimeError("a LoRA layer ran outside TaskSelector.select(): no task was chosen")
        return self._task_ids

    @property
    def single_task(self) -> int | None:
        """The task index shared by the whole batch, or None for a mixed batch (or outside ``select``)."""
        return self._single


class MultiTaskLoRALinear(nn.Module):
    """A frozen base Linear plus per-task low-rank updates, chosen per sample."""

    def __init__(self, base: nn.Linear, loras: dict[str, TaskLora], selector: TaskSelector):
        super().__init__()
        self.base = base
        self.selector = selector
        order = [loras[t] for t in selector.tasks]
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.stack([lo.A.float() for lo in order]).to(device), requires_grad=False)
        self.lora_B = nn.Parameter(torch.stack([lo.B.float() for lo in order]).to(device), requires_grad=False)
        self.register_buffer("scale", torch.tensor([lo.scale for lo in order], dtype=torch.float32, device=device))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ids = self.selector.task_ids
        if ids.shape[0] not in (1, x.shape[0]):
            raise RuntimeError(f"{ids.shape[0]} task labels for a batch of {x.shape[0]}")
        single = self.selector.single_task
        if single is not None:
            # One task for the batch (training, or encoding one task): two plain GEMMs on that task's A/B,
            # instead of gathering a [B, r, in] and [B, out, r] copy per sample and running batched matmuls.
            hidden = x.float() @ self.lora_A[single].T
            return out + ((hidden @ self.lora_B[single].T) * self.scale[single]).to(out.dtype)
        a = self.lora_A[ids]  # [B, r, in]
        b = self.lora_B[ids]  # [B, out, r]
        scale = self.scale[ids].view(-1, *([1] * (x.ndim - 1)))
        hidden = torch.einsum("b...i,bri->b...r", x.float(), a)
        update = torch.einsum("b...r,bor->b...o", hidden, b) * scale
        return out + update.to(out.dtype)
