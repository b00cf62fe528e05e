"""The jina-embeddings-v4 network: transformers' Qwen2.5-VL plus the multi-vector projector.

The transformer itself is transformers' ``Qwen2_5_VLModel`` (never
reimplemented); jev4 adds only what upstream adds on top: the
``multi_vector_projector`` and the task LoRA layers. Module names in memory
are the current layout (``model.language_model.*``, ``model.visual.*``,
``multi_vector_projector``), which is also the adapter file's layout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from jev4.errors import CheckpointError, SettingsError
from jev4.model.adapters import AdapterSet
from jev4.model.checkpoint import CheckpointFiles, canonical_name, check_accounting, iter_shard_tensors
from jev4.model.config import JinaV4Config
from jev4.model.lora import MultiTaskLoRALinear, TaskSelector

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise SettingsError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@dataclass
class NetworkOutput:
    """Last hidden state after the final norm, and the raw (unnormalised) projector output."""

    hidden: torch.Tensor  # [B, T, H]
    projected: torch.Tensor  # [B, T, P]


class JinaEmbeddingsV4(nn.Module):
    """Qwen2.5-VL backbone + ``multi_vector_projector``; pooling lives in the encoder."""

    def __init__(self, config: JinaV4Config):
        super().__init__()
        from transformers import Qwen2_5_VLModel

        qwen = config.to_transformers()
        qwen._attn_implementation = "sdpa"
        self.model = Qwen2_5_VLModel(qwen)
        self.multi_vector_projector = nn.Linear(config.hidden_size, config.multi_vector_dim)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> NetworkOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        return NetworkOutput(hidden=hidden, projected=self.multi_vector_projector(hidden))


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_network(config: JinaV4Config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> JinaEmbeddingsV4:
    """An uninitialised network (weights allocated, not initialised): to be filled by a load.

    Parameters are created in ``dtype``; buffers such as rotary ``inv_freq``
    stay fp32 (casting them would move outputs, see UPSTREAM.md).
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5.x kept it in modeling_utils
        from transformers.modeling_utils import no_init_weights

    with no_init_weights(), _default_dtype(dtype), torch.device(device):
        net = JinaEmbeddingsV4(config)
    for name, buf in net.named_buffers():
        if buf.is_floating_point() and buf.dtype != torch.float32:
            raise RuntimeError(f"buffer {name} was created in {buf.dtype}, expected fp32")
    return net.eval()


def build_meta_network(config: JinaV4Config) -> JinaEmbeddingsV4:
    """A network on the meta device: names and shapes only, free at any size."""
    with torch.device("meta"):
        return JinaEmbeddingsV4(config)


def linear_shapes(net: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (out_features, in_features)}`` of every plain Linear: what LoRA may adapt."""
    return {name: (m.out_features, m.in_features) for name, m in net.named_modules() if type(m) is nn.Linear}


def load_base_weights(net: JinaEmbeddingsV4, files: CheckpointFiles, progress: bool = False) -> None:
    """Fill ``net`` from the checkpoint, shard by shard, in either key layout; strict accounting."""
    params = dict(net.named_parameters())
    seen: dict[str, str] = {}
    shards = files.shards
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="loading shards", unit="shard")
    with torch.no_grad():
        for path, names in shards:
            for disk_name, tensor in iter_shard_tensors(path, names):
                name = canonical_name(disk_name)
                if name not in params:
                    raise CheckpointError(f"{path}: unexpected tensor {disk_name!r} maps to nothing in the model")
                if name in seen:
                    raise CheckpointError(f"{path}: {disk_name!r} and {seen[name]!r} both map to {name!r}")
                target = params[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"{path}: tensor {disk_name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
                    )
                target.copy_(tensor.to(target.dtype))
                seen[name] = disk_name
    check_accounting(set(seen), set(params), str(files.model_dir))


def attach_adapters(net: JinaEmbeddingsV4, adapters: AdapterSet) -> TaskSelector:
    """Wrap every adapted Linear with its task LoRA; returns the selector that picks tasks per sample."""
    adapters.check_fits(linear_shapes(net))
    selector = TaskSelector(adapters.tasks)
    for path, loras in adapters.modules.items():
        parent_path, _, child = path.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        setattr(parent, child, MultiTaskLoRALinear(getattr(parent, child), loras, selector))
    return selector
