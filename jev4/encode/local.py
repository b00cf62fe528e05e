"""The in-process runner: one ShardEncoder in this process, the missing shards in plan order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jev4.encode.plan import Shard
from jev4.encode.shard_encoder import EncodeJob, ShardEncoder, ShardResult


def run_in_process(job: EncodeJob, shards: Sequence[Shard], on_result: Callable[[ShardResult], None]) -> dict[str, Any]:
    """Encode ``shards`` here; ``on_result`` is called as each one is published. Returns what the sidecar records of the run."""
    encoder = ShardEncoder(job)
    for shard in shards:
        on_result(encoder.encode_shard(shard))
    return {"runner": "in-process", "engine": encoder.encoder.engine()}
