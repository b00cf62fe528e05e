"""Folding one task's LoRA into the base weights: ``W' = W + s * B @ A``.

Why stream: the full model is 3.8B parameters; loading it whole in fp32 to
merge would need ~15 GB plus a copy. Here each tensor is read from its
(memory-mapped) shard, merged in fp32 only if adapted, cast to the output
dtype and buffered into output shards of bounded size, so peak memory is one
output shard plus one fp32 matrix. Everything is checked (names, shapes,
adapter fit) from the safetensors headers before the first byte is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from jev4.atomic import atomic_output_dir, check_output_path, claim_output
from jev4.errors import AdapterError, CheckpointError, SettingsError
from jev4.export.manifest import Manifest, write_manifest
from jev4.quant.output_codec import OutputCodec
from jev4.export.qwen2_text import PROJECTOR_FILE, qwen2_config, qwen2_key, sentence_transformers_files
from jev4.model.adapters import TaskLora, adapter_dir_of, load_adapters
from jev4.model.checkpoint import (
    CheckpointFiles,
    all_finite,
    describe_nonfinite,
    canonical_name,
    check_accounting,
    iter_shard_tensors,
    list_checkpoint_files,
    old_layout_name,
    read_safetensors_header,
    resolve_model_dir,
)
from jev4.model.config import MERGED_TASK_KEY, JinaV4Config, load_config
from jev4.model.network import build_meta_network, dtype_name, linear_shapes, parse_dtype
from jev4.model.shards import ShardWriter

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
VISION_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class MergeSettings:
    """Options of ``jev4-export --format hf``; recorded verbatim in the manifest."""

    model: str
    adapter: str
    out: str
    dtype: str | None = None  # None: keep the source dtype
    text_only: bool = False
    adapter_dir: str | None = None
    max_shard_bytes: int = 2 * 1024**3
    force: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None:
            parse_dtype(self.dtype)
        if self.max_shard_bytes <= 0:
            raise SettingsError(f"max_shard_bytes must be positive, got {self.max_shard_bytes}")

    def sources(self) -> tuple[str | None, ...]:
        """What the run reads: OUT may not be, hold or sit inside any of them."""
        return (self.model, self.adapter_dir)


@dataclass(frozen=True)
class MergePlan:
    """Everything checked up front: source files, the task's LoRA per module, the output dtype."""

    model_dir: Path
    config: JinaV4Config
    files: CheckpointFiles
    loras: dict[str, TaskLora]
    source_dtype: torch.dtype


def plan_merge(settings: MergeSettings) -> MergePlan:
    """Validate the source and the adapter against the model's shapes, reading headers only."""
    check_output_path(Path(settings.out), settings.force, settings.sources())
    model_dir = resolve_model_dir(settings.model)
    check_output_path(Path(settings.out), settings.force, (model_dir,))  # a hub id resolved to its local copy
    config = load_config(model_dir)
    if config.merged_task is not None:
        raise AdapterError(f"{model_dir}: already has the {config.merged_task!r} adapter merged in")
    task = config.check_task(settings.adapter)
    adapter_dir = Path(settings.adapter_dir) if settings.adapter_dir else adapter_dir_of(model_dir)
    adapters = load_adapters(adapter_dir, config.task_names)
    meta = build_meta_network(config)
    adapters.check_fits(linear_shapes(meta))
    expected = {name: tuple(p.shape) for name, p in meta.named_parameters()}
    files = list_checkpoint_files(model_dir)
    seen: set[str] = set()
    dtypes: set[str] = set()
    for path, _ in files.shards:
        for disk_name, info in read_safetensors_header(path).items():
            name = canonical_name(disk_name)
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {disk_name!r} maps to nothing in the model")
            if name in seen:
                raise CheckpointError(f"{path}: {disk_name!r} maps to {name!r}, which another tensor already provides")
            if info.shape != expected[name]:
                raise CheckpointError(f"{path}: tensor {disk_name!r} has shape {info.shape}, the model expects {expected[name]}")
            seen.add(name)
            dtypes.add(info.dtype)
    check_accounting(seen, set(expected), str(model_dir))
    unknown = dtypes - set(_SAFETENSORS_DTYPES)
    if unknown or len(dtypes) != 1:
        raise CheckpointError(f"{model_dir}: expected one float dtype for all weights, found {sorted(dtypes)}")
    return MergePlan(model_dir, config, files, adapters.for_task(task), _SAFETENSORS_DTYPES[dtypes.pop()])


def merge_into_network(network: torch.nn.Module, loras: dict[str, TaskLora]) -> int:
    """The same merge, in memory: ``W += s * B @ A`` computed in fp32, stored back in the weight's dtype.

    For exporters that load the base network anyway; returns the number of merged modules.
    """
    with torch.no_grad():
        for path, lora in loras.items():
            linear = network.get_submodule(path)
            linear.weight.copy_((linear.weight.float() + lora.delta().to(linear.weight.device)).to(linear.weight.dtype))
    return len(loras)


def merge_checkpoint(settings: MergeSettings, progress: bool = True, output_codec: OutputCodec | None = None) -> Path:
    """Write a merged checkpoint to ``settings.out`` (atomically) and return its path."""
    with claim_output(settings.out, settings.force, settings.sources()):
        return _merge_checkpoint(settings, progress, output_codec)


def _merge_checkpoint(settings: MergeSettings, progress: bool, output_codec: OutputCodec | None) -> Path:
    plan = plan_merge(settings)
    out_dtype = parse_dtype(settings.dtype) if settings.dtype else plan.source_dtype
    out = Path(settings.out)
    shards = plan.files.shards
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc=f"merging {settings.adapter}", unit="shard")
    merged_count = 0
    with atomic_output_dir(out, force=settings.force) as tmp:
        writer = ShardWriter(tmp, settings.max_shard_bytes)
        projector: dict[str, torch.Tensor] = {}
        for path, names in shards:
            for disk_name, tensor in iter_shard_tensors(path, names):
                name = canonical_name(disk_name)
                if settings.text_only and name.startswith("model.visual."):
                    continue
                lora = plan.loras.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
                if lora is not None:
                    tensor = tensor.float() + lora.delta()
                    merged_count += 1
                tensor = tensor.to(out_dtype)
                if out_dtype == torch.float16 and not all_finite(tensor):  # fp16 tops out at 65504; bf16 has fp32's range
                    raise CheckpointError(f"{path}: tensor {disk_name!r} overflows fp16 after the merge ({describe_nonfinite(tensor)}); export with --dtype bf16 or fp32")
                if settings.text_only and name.startswith("multi_vector_projector."):
                    projector[name] = tensor.contiguous()
                else:
                    writer.add(qwen2_key(name) if settings.text_only else old_layout_name(name), tensor)
        writer.finish()
        if merged_count != len(plan.loras):
            raise CheckpointError(f"merged {merged_count} of {len(plan.loras)} adapted modules; the checkpoint changed while reading?")
        _write_side_files(tmp, plan, settings, out_dtype, projector)
        if output_codec is not None:
            output_codec.write(tmp)
        write_manifest(
            tmp,
            Manifest(
                kind="merged-text-only" if settings.text_only else "merged",
                source=str(plan.model_dir),
                settings={**asdict(settings), "source_dtype": dtype_name(plan.source_dtype), "out_dtype": dtype_name(out_dtype)},
                contents={"output_codec": output_codec.describe()} if output_codec is not None else {},
            ),
        )
    log.info("merged %d modules of task %r into %s", merged_count, settings.adapter, out)
    return out


def _write_side_files(tmp: Path, plan: MergePlan, settings: MergeSettings, out_dtype: torch.dtype, projector: dict[str, torch.Tensor]) -> None:
    """Config, tokenizer and processor files; the text-only layout adds sentence-transformers metadata."""
    names = TOKENIZER_FILES if settings.text_only else TOKENIZER_FILES + VISION_FILES
    for filename in names:
        if (plan.model_dir / filename).is_file():
            shutil.copy2(plan.model_dir / filename, tmp / filename)
    tokenizer_config = tmp / "tokenizer_config.json"
    if tokenizer_config.is_file():
        # Right padding: position ids of valid tokens then equal arange, as plain Qwen2 computes them.
        data = json.loads(tokenizer_config.read_text())
        data["padding_side"] = "right"
        tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    hf_dtype = _HF_DTYPE_NAMES[out_dtype]
    if settings.text_only:
        (tmp / PROJECTOR_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file(projector, str(tmp / PROJECTOR_FILE), metadata={"format": "pt"})
        config = qwen2_config(plan.config, hf_dtype)
        config[MERGED_TASK_KEY] = settings.adapter
        max_len = json.loads(tokenizer_config.read_text()).get("model_max_length", 8192) if tokenizer_config.is_file() else 8192
        sentence_transformers_files(tmp, plan.config, settings.adapter, min(int(max_len), 32768))
    else:
        config = {**plan.config.raw, MERGED_TASK_KEY: settings.adapter, "torch_dtype": hf_dtype}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
