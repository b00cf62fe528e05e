"""The shard plan: a corpus cut into consecutive input ranges, each encoded into one Parquet file named by its range.

Why shards are named by their input range: a shard's name then says which
records it holds, whoever wrote it and whenever. A re-run recomputes the same
plan from the same corpus and shard size (the plan is a pure function of
both), and a shard file that exists is a finished shard (shards are
published by an atomic rename), so "what is left to do" is the plan minus
the files present. No log of progress is needed, and no process's state.

``part-SSSSS-AAAAAAAAAAAA-BBBBBBBBBBBB.parquet``: source file SSSSS of the
corpus (0 for a single JSONL file), input range [A, B): 0-based line
numbers in a JSONL file (blank lines between shards belong to none), 0-based
row numbers in a Parquet file. A shard never spans two source files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"


@dataclass(frozen=True)
class Shard:
    """One unit of work and of output: records ``[start, end)`` of source ``source``.

    ``byte_start``/``byte_end`` (JSONL only) let a worker seek straight to
    its lines instead of reading the file from the top.
    """

    index: int
    source: int
    start: int
    end: int
    records: int
    byte_start: int | None = None
    byte_end: int | None = None

    @property
    def name(self) -> str:
        return f"{SHARD_PREFIX}{self.source:05d}-{self.start:012d}-{self.end:012d}{SHARD_SUFFIX}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["name"] = self.name
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Shard:
        return cls(**{k: data[k] for k in ("index", "source", "start", "end", "records")}, byte_start=data.get("byte_start"), byte_end=data.get("byte_end"))


def is_shard_name(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)


class PlanBuilder:
    """Collects shard boundaries while the corpus is scanned, one record at a time.

    ``add(source, position, byte_start, byte_end)`` for every record in
    corpus order (``position``: its line or row number); a shard closes after
    ``shard_size`` records or at the end of a source file.
    """

    def __init__(self, shard_size: int):
        self.shard_size = shard_size
        self.shards: list[Shard] = []
        self._open: dict[str, Any] | None = None

    def add(self, source: int, position: int, byte_start: int | None = None, byte_end: int | None = None) -> None:
        current = self._open
        if current is not None and current["source"] != source:
            self.close()
            current = None
        if current is None:
            current = self._open = {"source": source, "start": position, "records": 0, "byte_start": byte_start}
        current["end"] = position + 1
        current["byte_end"] = byte_end
        current["records"] += 1
        if current["records"] == self.shard_size:
            self.close()

    def close(self) -> None:
        """End the open shard (called at the end of every source file, and by ``add``)."""
        if self._open is None:
            return
        self.shards.append(Shard(index=len(self.shards), **self._open))
        self._open = None
