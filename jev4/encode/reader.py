"""Reading OUT back: the sidecar, then the plan's shards in corpus order, as numpy.

``read_embeddings(OUT)`` yields ``(ids, vectors)`` one shard at a time, so a
consumer (``jev4 validate``, an indexer) holds one shard in memory, not the
corpus. ``vectors`` is a [rows, width] array (float32, or the codes' dtype),
or for multi-vectors a list of [tokens, width] arrays. Only the files the
plan names are read, and only from a complete OUT, so every id comes back
exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jev4.encode import deps
from jev4.encode.output import EMBEDDING_COLUMN, ID_COLUMN, SIDECAR_NAME, read_sidecar
from jev4.encode.plan import Shard
from jev4.errors import Jev4Error

Vectors = np.ndarray | list[np.ndarray]


@dataclass(frozen=True)
class EmbeddingsInfo:
    """OUT's sidecar, with the parts a consumer asks for."""

    out: Path
    sidecar: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.sidecar.get("complete"))

    @property
    def settings(self) -> dict[str, Any]:
        return self.sidecar["settings"]

    @property
    def records(self) -> int:
        return int(self.sidecar["corpus"]["records"])

    @property
    def shards(self) -> tuple[Shard, ...]:
        return tuple(Shard.from_json(s) for s in self.sidecar["shards"])

    @property
    def output(self) -> dict[str, Any] | None:
        return self.sidecar.get("output")


def open_embeddings(out: str | Path, allow_incomplete: bool = False) -> EmbeddingsInfo:
    """OUT's sidecar; an OUT whose job has not finished is refused unless ``allow_incomplete``."""
    out = Path(out)
    sidecar = read_sidecar(out)
    if sidecar is None:
        raise Jev4Error(f"{out}: no {SIDECAR_NAME}; not the output of jev4 encode --corpus")
    info = EmbeddingsInfo(out, sidecar)
    if not info.complete and not allow_incomplete:
        raise Jev4Error(f"{out}: the encode job has not finished (its sidecar says incomplete); run it again with the same settings to finish it")
    return info


def _to_numpy(column: Any, multivector: bool) -> Vectors:
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if multivector:
        inner = column.flatten()
        width = inner.type.list_size
        values = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
        return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def read_shard_file(path: str | Path, multivector: bool) -> tuple[list[str], Vectors]:
    """``(ids, vectors)`` of one shard file."""
    table = deps.pyarrow().parquet.read_table(path, columns=[ID_COLUMN, EMBEDDING_COLUMN])
    return table.column(ID_COLUMN).to_pylist(), _to_numpy(table.column(EMBEDDING_COLUMN), multivector)


def read_embeddings(out: str | Path, allow_incomplete: bool = False) -> Iterator[tuple[list[str], Vectors]]:
    """``(ids, vectors)`` per shard, in corpus order; with ``allow_incomplete``, the shards written so far."""
    info = open_embeddings(out, allow_incomplete)
    multivector = bool(info.settings["multivector"])
    for shard in info.shards:
        path = info.out / shard.name
        if allow_incomplete and not path.exists():
            continue
        yield read_shard_file(path, multivector)


def load_embeddings(out: str | Path) -> tuple[list[str], Vectors]:
    """All of OUT at once (ids, and one array or one list): for corpora that fit in memory."""
    ids: list[str] = []
    parts: list[Any] = []
    info = open_embeddings(out)
    for shard_ids, vectors in read_embeddings(out):
        ids.extend(shard_ids)
        parts.append(vectors)
    if info.settings["multivector"]:
        return ids, [v for part in parts for v in part]
    return ids, np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
