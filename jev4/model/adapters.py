"""Reading the multi-task LoRA adapter (``adapters/``) of a jina-embeddings-v4 checkpoint.

Upstream keeps all three task adapters in one PEFT directory: every adapted
Linear holds ``lora_A.<task>`` / ``lora_B.<task>`` for each task. The file's
``target_modules`` regex is not trusted to say which modules are adapted (a
regex seen in public training code would also match the vision MLP); the
tensors decide, and each must fit a base Linear of matching shape.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jev4.errors import AdapterError, TaskError
from jev4.json_object import read_json_object
from jev4.model.checkpoint import ADAPTER_DIR, canonical_name, iter_shard_tensors, read_safetensors_header

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PATTERN = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.(?P<task>[^.]+)\.weight$")


@dataclass(frozen=True)
class LoraSettings:
    """What ``adapter_config.json`` says that jev4 uses."""

    r: int
    lora_alpha: float
    use_rslora: bool

    @property
    def scale(self) -> float:
        """PEFT's scaling, from the config's r as PEFT computes it: alpha / r, or alpha / sqrt(r) with rsLoRA.

        Only meaningful once every tensor's rank is known to equal ``r``
        (``load_adapters`` checks that); PEFT itself would refuse to load
        tensors of another rank.
        """
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class TaskLora:
    """One task's low-rank update of one Linear: ``W' = W + scale * B @ A``."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    def delta(self) -> torch.Tensor:
        """The dense update in fp32 (merges are computed in fp32 whatever the storage dtype)."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass(frozen=True)
class AdapterSet:
    """All tasks' LoRA weights, keyed by the in-memory module path (e.g. ``model.language_model.layers.0.mlp.up_proj``)."""

    source: Path
    settings: LoraSettings
    tasks: tuple[str, ...]
    modules: dict[str, dict[str, TaskLora]] = field(repr=False)

    def for_task(self, task: str) -> dict[str, TaskLora]:
        if task not in self.tasks:
            raise TaskError(f"unknown task {task!r}; the adapter has {list(self.tasks)}")
        return {module: by_task[task] for module, by_task in self.modules.items()}

    def check_fits(self, linear_shapes: dict[str, tuple[int, int]]) -> None:
        """Each adapted module must be a base Linear whose [out, in] matches B's and A's shapes."""
        for module, by_task in self.modules.items():
            if module not in linear_shapes:
                raise AdapterError(
                    f"{self.source}: adapter tensors for {module!r}, which is not a Linear layer of the base model"
                )
            out_features, in_features = linear_shapes[module]
            for task, lora in by_task.items():
                if lora.A.shape[1] != in_features or lora.B.shape[0] != out_features:
                    raise AdapterError(
                        f"{self.source}: {module}.lora_A/B.{task} has shape A{tuple(lora.A.shape)} "
                        f"B{tuple(lora.B.shape)}, but the base Linear is [out={out_features}, in={in_features}]"
                    )


def adapter_dir_of(model_dir: Path) -> Path:
    return Path(model_dir) / ADAPTER_DIR


def read_lora_settings(adapter_dir: Path) -> LoraSettings:
    path = adapter_dir / ADAPTER_CONFIG
    cfg = read_json_object(
        path, AdapterError, "not found (a jina-embeddings-v4 checkpoint keeps its task adapters in adapters/)", "must be a JSON object (PEFT's LoraConfig)"
    )
    if cfg.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: LoRA biases (bias={cfg['bias']!r}) are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"{path}: per-module rank_pattern/alpha_pattern is not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    # bool is an int in Python, and int(16.5) would quietly become 16: take only what PEFT means.
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{path}: 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: 'lora_alpha' must be a finite number, got {alpha!r}")
    return LoraSettings(r=r, lora_alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora")))


def load_adapters(adapter_dir: Path, task_names: tuple[str, ...]) -> AdapterSet:
    """Read and check every task's A/B; tensors are kept in fp32.

    Every tensor's rank must equal the config's ``r``: PEFT scales by
    ``alpha / r`` from the config, so tensors cut to another rank (or a config
    edited after training) would merge with a wrong scale and no error.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: no adapter directory (expected adapters/ next to config.json)")
    settings = read_lora_settings(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{weights}: not found")
    read_safetensors_header(weights)
    pieces: dict[str, dict[str, dict[str, tuple[str, torch.Tensor]]]] = {}
    for name, tensor in iter_shard_tensors(weights):
        match = KEY_PATTERN.match(name)
        if not match:
            raise AdapterError(f"{weights}: tensor {name!r} is not a LoRA weight of the form base_model.model.<module>.lora_A|B.<task>.weight")
        task = match["task"]
        if task not in task_names:
            raise AdapterError(f"{weights}: tensor {name!r} is for task {task!r}, not one of config task_names {list(task_names)}")
        if tensor.ndim != 2:
            raise AdapterError(f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)}, expected a matrix")
        module = canonical_name(match["module"])
        slot = pieces.setdefault(module, {}).setdefault(task, {})
        if match["kind"] in slot:
            raise AdapterError(f"{weights}: {module}.lora_{match['kind']}.{task} appears twice (both key layouts?)")
        slot[match["kind"]] = (name, tensor.float())
    if not pieces:
        raise AdapterError(f"{weights}: holds no LoRA tensors")
    modules: dict[str, dict[str, TaskLora]] = {}
    for module, by_task in sorted(pieces.items()):
        absent = [t for t in task_names if t not in by_task]
        if absent:
            raise AdapterError(f"{weights}: module {module!r} has no LoRA weights for task(s) {absent}")
        modules[module] = {}
        for task in task_names:  # in config order, so that the first problem reported does not depend on the file's key order
            parts = by_task[task]
            if set(parts) != {"A", "B"}:
                raise AdapterError(f"{weights}: {module}.{task} has lora_{''.join(parts)} but not both A and B")
            (a_name, A), (b_name, B) = parts["A"], parts["B"]
            if A.shape[0] != B.shape[1]:
                raise AdapterError(
                    f"{weights}: {module}.{task}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree on the rank"
                )
            if A.shape[0] != settings.r:
                raise AdapterError(
                    f"{weights}: tensors {a_name!r} {tuple(A.shape)} and {b_name!r} {tuple(B.shape)} have rank {A.shape[0]}, "
                    f"but {adapter_dir / ADAPTER_CONFIG} says r={settings.r} (PEFT scales by lora_alpha/r, so the two must agree)"
                )
            modules[module][task] = TaskLora(A=A, B=B, scale=settings.scale)
    log.info("adapter %s: %d modules x %d tasks, r=%d alpha=%g", adapter_dir, len(modules), len(task_names), settings.r, settings.lora_alpha)
    return AdapterSet(source=adapter_dir, settings=settings, tasks=tuple(task_names), modules=modules)
