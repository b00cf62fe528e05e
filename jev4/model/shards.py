"""Writing weights as safetensors shards with bounded memory.

Tensors are buffered until the next one would push the buffer past
``max_bytes``; then the buffer is written as one shard and freed. The final
names (``model-0000i-of-0000n.safetensors``, or ``model.safetensors`` for one
shard) and the index are written by ``finish`` once the count is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jev4.errors import SettingsError
from safetensors.torch import save_file

from jev4.model.checkpoint import INDEX_NAME, SINGLE_NAME


class ShardWriter:
    """Buffers tensors and writes numbered shards of at most ``max_bytes`` (one tensor may exceed it)."""

    def __init__(self, out: Path, max_bytes: int):
        if max_bytes <= 0:
            raise SettingsError(f"max_bytes must be positive, got {max_bytes}")
        self.out, self.max_bytes = Path(out), max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        part = f"part-{len(self.written):05d}.safetensors"
        save_file(self.buffer, str(self.out / part), metadata={"format": "pt"})
        self.written.append((part, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> list[str]:
        """Give the shards their final names, write the index (if sharded), return the file names."""
        self.flush()
        count = len(self.written)
        if count == 1:
            (self.out / self.written[0][0]).rename(self.out / SINGLE_NAME)
            return [SINGLE_NAME]
        weight_map: dict[str, str] = {}
        finals = []
        for i, (part, names) in enumerate(self.written, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            (self.out / part).rename(self.out / final)
            weight_map.update({n: final for n in names})
            finals.append(final)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return finals
