"""The torch fast path: one task merged in, Linear layers quantized (FP8 or bitsandbytes), SDPA attention.

``load_quantized(path, "fp8", task="retrieval", device="cuda")`` returns a
``QuantizedTorchEncoder``: the same ``Encoder`` API as the reference, for the
one merged task. Steps:

1. check the device can run the scheme (FP8: compute capability >= 8.9),
   before any weight is read;
2. build the network in ``dtype`` on ``device`` and load the base weights;
3. merge the task's LoRA into the weights (``W += s * B @ A`` in fp32): FP8
   and bitsandbytes quantize plain Linear weights, and an unmerged LoRA
   would also cost a second, fp32 matmul per layer. A checkpoint that
   already has a task merged in (``jev4-export``) is used as it is;
4. quantize the selected Linear layers (``jev4.runtime.layer_select``);
5. optionally ``torch.compile`` the language model (dynamic shapes).

Attention is torch SDPA in the network's dtype (``JinaEmbeddingsV4`` asks
transformers for ``attn_implementation="sdpa"``); only the Linear GEMMs are
quantized.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from jev4.errors import AdapterError, TaskError
from jev4.model.adapters import adapter_dir_of, load_adapters
from jev4.model.checkpoint import list_checkpoint_files, resolve_model_dir
from jev4.model.config import JinaV4Config, load_config
from jev4.model.encoder import TorchEncoder
from jev4.model.network import JinaEmbeddingsV4, build_network, load_base_weights, parse_dtype
from jev4.model.preprocess import Preprocessor
from jev4.runtime.layer_select import LayerSelection
from jev4.runtime.torch_fp8 import FP8Settings, QuantizationError, check_fp8_device, quantize_model_fp8

log = logging.getLogger(__name__)

__all__ = ["QUANTIZATIONS", "QuantizedTorchEncoder", "load_quantized", "quantize_network"]

QUANTIZATIONS = ("fp8", "bnb-int8", "bnb-nf4")


class QuantizedTorchEncoder(TorchEncoder):
    """A ``TorchEncoder`` over a merged, quantized network; records what was quantized and how."""

    def __init__(self, network: JinaEmbeddingsV4, config: JinaV4Config, preprocessor: Preprocessor, device: torch.device | str, quantization: str, selection: LayerSelection, settings: dict):
        super().__init__(network, config, preprocessor, None, device)
        self.quantization = quantization
        self.selection = selection
        self.settings = settings


def check_quantization(quantization: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Fail before loading anything when the scheme cannot run here."""
    if quantization not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    if quantization == "fp8":
        check_fp8_device(device)
        if torch.device(device).type == "cuda" and dtype != torch.bfloat16:
            raise QuantizationError(f"FP8 on CUDA computes in bf16 (the row-wise FP8 kernels write bf16); pass dtype='bf16', not {dtype}")


def quantize_network(network: JinaEmbeddingsV4, quantization: str, fp8: FP8Settings | None = None) -> tuple[LayerSelection, dict]:
    """Quantize a merged network in place; returns (what was replaced, the settings as JSON)."""
    if quantization == "fp8":
        settings = fp8 or FP8Settings()
        return quantize_model_fp8(network, settings), settings.to_json()
    if quantization in ("bnb-int8", "bnb-nf4"):
        from jev4.runtime.torch_bnb import BnbSettings, quantize_model_bnb

        settings = BnbSettings(scheme=quantization.removeprefix("bnb-"))
        return quantize_model_bnb(network, settings), settings.to_json()
    raise QuantizationError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")


def compile_language_model(network: JinaEmbeddingsV4) -> None:
    """``torch.compile`` the language model in place (module names unchanged), dynamic in batch and length."""
    network.model.language_model.compile(dynamic=True)


def load_merged_network(
    name_or_path: str | Path, task: str | None, torch_dtype: torch.dtype, device: str | torch.device, adapter_dir: str | Path | None = None, progress: bool = False
) -> tuple[JinaEmbeddingsV4, JinaV4Config, Path, str]:
    """The checkpoint's network with ``task``'s adapter merged in: what every single-task torch path (quantized, compiled) starts from.

    Returns the network, the checkpoint's config, its directory and the task merged.
    """
    model_dir = resolve_model_dir(name_or_path)
    config = load_config(model_dir)
    network = build_network(config, torch_dtype, device)
    load_base_weights(network, list_checkpoint_files(model_dir), progress=progress)
    return network, config, model_dir, _merge_task(network, config, model_dir, task, adapter_dir)


def _merge_task(network: JinaEmbeddingsV4, config: JinaV4Config, model_dir: Path, task: str | None, adapter_dir: str | Path | None) -> str:
    """Merge ``task``'s adapter into ``network`` (unless the checkpoint has one merged already); returns the task."""
    from jev4.export.merge import merge_into_network

    if config.merged_task is not None:
        if task is not None and task != config.merged_task:
            raise TaskError(f"{model_dir}: has the {config.merged_task!r} adapter merged in; it cannot serve task {task!r}")
        if adapter_dir is not None:
            raise AdapterError(f"{model_dir}: has {config.merged_task!r} merged in; adapter_dir={str(adapter_dir)!r} cannot be applied on top")
        if (model_dir / "adapters").exists():
            raise AdapterError(f"{model_dir}: has {config.merged_task!r} merged in and an adapters/ dir: ambiguous")
        return config.merged_task
    if task is None:
        raise TaskError(f"quantized torch needs one task merged in: pass task=, one of {list(config.task_names)}")
    config.check_task(task)
    adapters = load_adapters(Path(adapter_dir) if adapter_dir else adapter_dir_of(model_dir), config.task_names)
    merged = merge_into_network(network, adapters.for_task(task))
    log.info("merged %d LoRA modules of task %r", merged, task)
    return task


def load_quantized(
    name_or_path: str | Path,
    quantization: str,
    task: str | None = None,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    adapter_dir: str | Path | None = None,
    compile: bool = False,
    fp8: FP8Settings | None = None,
    progress: bool = False,
) -> QuantizedTorchEncoder:
    """Load a checkpoint, merge ``task``, quantize; see the module docstring."""
    torch_dtype = parse_dtype(dtype)
    check_quantization(quantization, device, torch_dtype)
    network, config, model_dir, task = load_merged_network(name_or_path, task, torch_dtype, device, adapter_dir, progress)
    selection, settings = quantize_network(network, quantization, fp8)
    if compile:
        compile_language_model(network)
    merged_config = dataclasses.replace(config, merged_task=task)
    log.info("loaded %s: task %r merged, %s on %d layers (%s, %s)", model_dir, task, quantization, len(selection.chosen), dtype, device)
    return QuantizedTorchEncoder(network, merged_config, Preprocessor.from_dir(model_dir, config), device, quantization, selection, settings)
