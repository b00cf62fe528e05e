"""The torch backend of jev4's text-only export: a plain Qwen2 checkpoint plus the multi-vector projector beside it.

``jev4-export --text-only`` writes the merged language model as a standard
Qwen2 checkpoint so that other engines load it (jev4.export.qwen2_text). jev4
must load every artifact it writes, so this backend reads that layout back:
transformers' own ``Qwen2Model`` (for text, Qwen2.5-VL's M-RoPE equals plain
RoPE) with jev4's strict tensor accounting, and the projector from its file.
Images need the vision tower, which this artifact does not have: encoding
one is a clear error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jev4.errors import CheckpointError, ConfigError
from jev4.model.checkpoint import check_accounting, iter_shard_tensors, list_checkpoint_files
from jev4.model.config import CONFIG_NAME, MERGED_TASK_KEY, JinaV4Config, SpecialTokens
from jev4.model.encoder import Encoder
from jev4.model.network import parse_dtype
from jev4.model.pooling import multi_vector, single_vector
from jev4.model.preprocess import ModelInputs, Preprocessor

log = logging.getLogger(__name__)

PROJECTOR_KEY = "jev4_multi_vector_projector"
_PROJECTOR_PREFIX = "multi_vector_projector."
# Keys a Qwen2 checkpoint may carry: bare (what Qwen2Model.save_pretrained writes) or under "model." (a causal-LM layout).
_QWEN2_PREFIXES = ("model.", "")


def is_text_only(raw: dict[str, Any]) -> bool:
    """A jev4 text-only export: a Qwen2 config that names jev4's projector file."""
    return raw.get("model_type") == "qwen2" and PROJECTOR_KEY in raw


def read_text_only_config(root: Path) -> JinaV4Config:
    """The encode settings of a text-only export (tasks, Matryoshka dims, sizes) from its Qwen2 config.json."""
    path = Path(root) / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not is_text_only(raw):
        raise ConfigError(f"{path}: not a jev4 text-only export (model_type qwen2 with {PROJECTOR_KEY})")
    task = raw.get(MERGED_TASK_KEY)
    hidden = raw.get("hidden_size")
    dims = raw.get("jev4_matryoshka_dims", [])
    if not isinstance(task, str) or not isinstance(hidden, int) or not all(isinstance(d, int) and 0 < d < hidden for d in dims):
        raise ConfigError(f"{path}: needs {MERGED_TASK_KEY}, an integer hidden_size and jev4_matryoshka_dims below it")
    return JinaV4Config(
        raw=raw,
        task_names=(task,),
        matryoshka_dims=tuple(sorted(dims)),
        truncate_dim=None,
        multi_vector_dim=0,  # read from the projector file at load
        hidden_size=hidden,
        num_hidden_layers=int(raw.get("num_hidden_layers", 0)),
        special_tokens=SpecialTokens(-1, -1, -1, -1),  # no image tokens: this artifact has no vision tower
        torch_dtype=str(raw.get("torch_dtype") or "bfloat16"),
        merged_task=task,
    )


def _qwen2_name(disk_name: str, params: dict[str, nn.Parameter]) -> str | None:
    for prefix in _QWEN2_PREFIXES:
        if disk_name.startswith(prefix) and disk_name[len(prefix) :] in params:
            return disk_name[len(prefix) :]
    return None


class TextOnlyEncoder(Encoder):
    """``encode_text`` over a text-only export (fp32 by default, the reference precision)."""

    def __init__(self, model: nn.Module, projector: nn.Linear, config: JinaV4Config, preprocessor: Preprocessor, device: str | torch.device = "cpu"):
        super().__init__(config, preprocessor, config.task_names)
        self.model = model
        self.projector = projector
        self.device = torch.device(device)

    @classmethod
    def from_dir(cls, root: str | Path, dtype: str = "fp32", device: str | torch.device = "cpu") -> TextOnlyEncoder:
        from transformers import Qwen2Config, Qwen2Model

        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers < 5.x
            from transformers.modeling_utils import no_init_weights

        root = Path(root)
        config = read_text_only_config(root)
        torch_dtype = parse_dtype(dtype)
        settings = {k: v for k, v in config.raw.items() if not k.startswith("jev4_") and k not in ("architectures", "torch_dtype")}
        qwen = Qwen2Config(**settings)
        qwen._attn_implementation = "sdpa"
        with no_init_weights(), torch.device(device):
            model = Qwen2Model(qwen).to(torch_dtype)
        params = dict(model.named_parameters())
        files = list_checkpoint_files(root)
        seen: set[str] = set()
        with torch.no_grad():
            for path, names in files.shards:
                for disk_name, tensor in iter_shard_tensors(path, names):
                    name = _qwen2_name(disk_name, params)
                    if name is None:
                        raise CheckpointError(f"{path}: unexpected tensor {disk_name!r} maps to nothing in a Qwen2 model")
                    if tuple(tensor.shape) != tuple(params[name].shape):
                        raise CheckpointError(f"{path}: tensor {disk_name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
                    params[name].copy_(tensor)
                    seen.add(name)
        check_accounting(seen, set(params), str(root))
        projector = read_projector(root / config.raw[PROJECTOR_KEY], config.hidden_size, torch_dtype, device)
        config = JinaV4Config(**{**config.__dict__, "multi_vector_dim": projector.out_features})
        log.info("loaded text-only export %s (%s, task %s)", root, dtype, config.merged_task)
        return cls(model.eval(), projector, config, Preprocessor.from_dir(root, config), device)

    @property
    def supports_images(self) -> bool:
        return False  # no vision tower: encode_image is refused by the preprocessor (no image processor)

    @torch.inference_mode()
    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        mask = inputs.attention_mask.to(dev)
        hidden = self.model(
            input_ids=inputs.input_ids.to(dev),
            attention_mask=mask,
            position_ids=inputs.position_ids[0].to(dev),  # text: the three M-RoPE sections share one id
            use_cache=False,
        ).last_hidden_state
        single = single_vector(hidden, inputs.pooling_mask.to(dev))
        multi = multi_vector(self.projector(hidden), mask)
        return single.float(), multi.float()


def read_projector(path: Path, hidden: int, dtype: torch.dtype, device: str | torch.device) -> nn.Linear:
    """The multi-vector projector (Linear hidden -> dim) from its own file; any other tensor in it is an error."""
    if not path.is_file():
        raise CheckpointError(f"{path}: the multi-vector projector of this text-only export is missing")
    tensors = {name.removeprefix(_PROJECTOR_PREFIX): tensor for name, tensor in iter_shard_tensors(path)}
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or weight.ndim != 2 or weight.shape[1] != hidden or set(tensors) - {"weight", "bias"}:
        raise CheckpointError(f"{path}: expected {_PROJECTOR_PREFIX}weight [dim, {hidden}] (and bias), found {sorted(tensors)}")
    projector = nn.Linear(hidden, weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        projector.weight.copy_(weight)
        if bias is not None:
            projector.bias.copy_(bias)
    return projector
