"""Full-size checkpoints with random weights, for speed and memory benchmarks.

Performance does not depend on weight values, so a random checkpoint with
the real sizes, layout and key names measures what the real one would. The
writer streams: one tensor is generated at a time and buffered into shards
of bounded size, so writing the 3.8B-parameter model needs about one shard
of memory, not the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from jev4.atomic import atomic_output_dir
from jev4.errors import ConfigError
from jev4.model.checkpoint import ADAPTER_DIR, old_layout_name
from jev4.model.config import parse_config
from jev4.model.network import JinaEmbeddingsV4, build_meta_network, build_network, linear_shapes, parse_dtype
from jev4.model.shards import ShardWriter
from jev4.model.tiny import (
    FULL_SIZE,
    FULL_SIZE_VOCAB,
    REAL_SPECIAL_IDS,
    TinySpec,
    adapted_modules,
    adapter_config,
    random_adapter_tensors,
    tiny_config,
    write_json,
    write_processor_files,
    write_tokenizer,
)

log = logging.getLogger(__name__)


def full_size_config(spec: TinySpec = FULL_SIZE, vocab_size: int = FULL_SIZE_VOCAB) -> dict:
    """config.json of the real model's shape, with the real special-token ids.

    For in-memory networks (``random_network``); ``write_random_checkpoint``
    uses its tokenizer's ids instead (see there).
    """
    return tiny_config(spec, vocab_size, REAL_SPECIAL_IDS)


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if "norm" in name or name.endswith("ln_q.weight"):
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    return (0.02 * torch.randn(shape, generator=gen)).to(dtype)


def write_random_checkpoint(
    out: str | Path,
    spec: TinySpec = FULL_SIZE,
    vocab_size: int = FULL_SIZE_VOCAB,
    seed: int = 0,
    dtype: str = "bf16",
    shard_bytes: int = 4 * 1024**3,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write a tokenizer, config, sharded base weights (older key layout, as upstream) and all tasks' adapters.

    The tokenizer is the tiny checkpoint's BPE (``write_tokenizer``), because
    encoders and ``jev4 bench qat`` need one and the real Qwen2 tokenizer
    cannot be shipped. It is the right stand-in: the vocabulary is only a
    range of ids, and speed depends on how many tokens a text becomes, not
    which. config.json carries that tokenizer's special-token ids, not the
    real ones (151643..), so that the image placeholders and vision spans it
    emits are the ones the model looks for.
    """
    store = parse_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    with atomic_output_dir(out, force=force) as tmp:
        ids, tokens = write_tokenizer(tmp, spec)
        if tokens > vocab_size:
            raise ConfigError(f"{out}: vocab_size {vocab_size} is smaller than the synthetic tokenizer's {tokens} tokens")
        raw = tiny_config(spec, vocab_size, ids)
        meta = build_meta_network(parse_config(raw))
        _write_base_weights(tmp, meta, gen, store, shard_bytes, progress)
        write_json(tmp / "config.json", raw)
        write_processor_files(tmp, spec)
        (tmp / ADAPTER_DIR).mkdir()
        adapters = random_adapter_tensors(linear_shapes(meta), adapted_modules(spec.layers), spec, gen)
        save_file(adapters, str(tmp / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_DIR / "adapter_config.json", adapter_config(spec))
    log.info("random %s checkpoint written to %s", dtype, out)
    return Path(out)


def _write_base_weights(
    out: Path, meta: JinaEmbeddingsV4, gen: torch.Generator, dtype: torch.dtype, shard_bytes: int, progress: bool
) -> None:
    """Stream one random tensor at a time into shards, so memory stays at about one shard."""
    params = list(meta.named_parameters())
    if progress:
        from tqdm import tqdm

        params = tqdm(params, desc="random weights", unit="tensor")
    writer = ShardWriter(out, shard_bytes)
    for name, param in params:
        writer.add(old_layout_name(name), _random_tensor(name, tuple(param.shape), gen, dtype))
    writer.finish()


def random_network(spec: TinySpec = FULL_SIZE, dtype: str = "bf16", device: str = "cpu", seed: int = 0) -> JinaEmbeddingsV4:
    """The full-size network with random weights, built in memory on ``device`` (no checkpoint on disk)."""
    net = build_network(parse_config(full_size_config(spec)), parse_dtype(dtype), device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "norm" in name or name.endswith("ln_q.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return net
