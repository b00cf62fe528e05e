"""Corpus-scale encoding: ``jev4 encode --corpus`` (in this process, or on Ray with ``--ray``).

A corpus (JSONL or Parquet, records ``{"id", "text"}``) is checked in one
streaming pass, cut into shards named by their input range, and encoded
shard by shard into Parquet files in OUT, with a sidecar that records the
artifact's manifest, the settings, the corpus checksum and the plan. A
killed job re-run into the same OUT encodes only the missing shards; every
id ends up in exactly one shard file.

Modules, one job each:

- ``settings``: ``CorpusEncodeSettings`` (what a resumed job must match);
- ``corpus``: sources, the checking pre-pass, reading one shard;
- ``plan``: shards and their names;
- ``output``: shard files (atomic), the sidecar;
- ``shard_encoder``: ``ShardEncoder``, the code both runners run;
- ``local`` / ``ray_runner``: the in-process loop and the Ray Data actor pool;
- ``job``: ``encode_corpus``, the driver;
- ``reader``: reading OUT back.

Nothing here imports pyarrow or Ray until it is used: the core install
needs neither (``pip install 'jev4[ray]'`` brings both).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CorpusEncodeSettings",
    "EmbeddingsInfo",
    "encode_corpus",
    "load_embeddings",
    "open_embeddings",
    "read_embeddings",
    "write_corpus_jsonl",
]

_LAZY = {
    "CorpusEncodeSettings": "jev4.encode.settings",
    "encode_corpus": "jev4.encode.job",
    "EmbeddingsInfo": "jev4.encode.reader",
    "load_embeddings": "jev4.encode.reader",
    "open_embeddings": "jev4.encode.reader",
    "read_embeddings": "jev4.encode.reader",
    "write_corpus_jsonl": "jev4.encode.builtin",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jev4.encode' has no attribute {name!r}")
