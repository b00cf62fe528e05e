"""OUT on disk: the shard files (Parquet, written atomically) and the sidecar that says what they are.

Layout of OUT::

    jev4-embeddings.json            the sidecar (below)
    part-00000-000000000000-000000010000.parquet
    part-00000-000000010000-000000020000.parquet
    ...

Every shard file has two columns, in corpus order:

- ``id``: string;
- ``embedding``: single vectors as ``fixed_size_list<float32>[dim]``, or the
  codes of ``output_precision`` as ``fixed_size_list<int8|uint8|float16>[width]``
  (packed layouts as ``jev4.quant.embeddings`` documents them: binary is
  int8 [ceil(dim/8)], int4 uint8 [ceil(dim/2)], ...); multi-vectors as a
  variable-length list per row, one entry per token:
  ``list<fixed_size_list<float32>[128]>`` (or of codes).

A shard is written to ``.<name>.tmp-<pid>-<random>`` inside OUT, fsynced,
renamed to its name and the directory fsynced: a shard file that exists is
whole, and a killed writer leaves only a temp file, which the next run
removes (it holds OUT's lock, so no other writer can be running).

The sidecar (``jev4-embeddings.json``) records: ``format``/``format_version``;
``complete`` (false until every shard is written and checked); the
``artifact`` (its path, kind, and its ``jev4-manifest.json`` verbatim, or a
fingerprint of a checkpoint's files where it has no manifest); the result
``settings`` (``jev4.encode.settings.RESULT_FIELDS``); the ``corpus`` (path,
sha256 checksum, record count, files); the shard plan (``shards``: name,
source, start, end, records and, for JSONL, byte offsets); ``output`` (the
columns, precision, dtype and width, filled in when complete); and ``runs``,
one entry per run (when, which runner, how many shards it wrote).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jev4.encode import deps
from jev4.encode.plan import Shard, is_shard_name
from jev4.errors import SettingsError

log = logging.getLogger(__name__)

SIDECAR_NAME = "jev4-embeddings.json"
FORMAT = "jev4-embeddings"
FORMAT_VERSION = 1
ID_COLUMN = "id"
EMBEDDING_COLUMN = "embedding"
_TEMP_TAG = ".tmp-"
_SCHEMA_KEY = b"jev4-embeddings"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{_TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def write_atomically(target: Path, write: Any) -> Path:
    """``write(file object)`` into a temp file beside ``target``, fsync, rename onto ``target``, fsync the directory.

    A reader sees the old file (or none) or the whole new one, never a part,
    even after a crash or a power cut.
    """
    tmp = _temp_path(target)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def remove_temp_files(out: Path) -> list[str]:
    """Remove the temp files of writers that were killed (call with OUT's lock held, and no worker running)."""
    removed = []
    for entry in sorted(out.iterdir()):
        if entry.name.startswith(".") and _TEMP_TAG in entry.name and entry.is_file():
            entry.unlink()
            removed.append(entry.name)
    if removed:
        log.warning("removed %d unfinished file(s) left in %s by interrupted writers: %s", len(removed), out, ", ".join(removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


# --------------------------------------------------------------------------- shards


def _fixed_size(pa: Any, array: np.ndarray) -> Any:
    """A [rows, width] numpy array as an Arrow fixed_size_list column (zero-copy over the flat values)."""
    array = np.ascontiguousarray(array)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])


def embedding_table(ids: Sequence[str], vectors: Any, multivector: bool, precision: str | None) -> Any:
    """ids plus the encoder's output (floats or codes; an array, or a list of per-record arrays) as an Arrow table."""
    pa = deps.pyarrow()
    if multivector:
        items = [np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in vectors]
        tokens = np.cumsum([len(v) for v in items], dtype=np.int64)
        if len(tokens) and tokens[-1] > np.iinfo(np.int32).max:  # Arrow's list offsets are int32 (large_list would change the schema)
            raise SettingsError(f"a shard of {len(items)} multi-vector records holds {tokens[-1]} token vectors, more than a Parquet list column takes; lower --shard-size")
        offsets = np.zeros(len(items) + 1, dtype=np.int32)
        offsets[1:] = tokens
        column = pa.ListArray.from_arrays(pa.array(offsets), _fixed_size(pa, np.concatenate(items)))
    else:
        column = _fixed_size(pa, np.asarray(vectors.numpy() if hasattr(vectors, "numpy") else vectors))
    if len(column) != len(ids):
        raise RuntimeError(f"{len(column)} embeddings for {len(ids)} ids")  # a bug in the encoder, not bad input
    meta = {"precision": precision or "float32", "multivector": multivector}
    schema = pa.schema([(ID_COLUMN, pa.string()), (EMBEDDING_COLUMN, column.type)], metadata={_SCHEMA_KEY: json.dumps(meta).encode()})
    return pa.Table.from_arrays([pa.array(list(ids), pa.string()), column], schema=schema)


def write_shard(out: Path, name: str, table: Any) -> Path:
    """One shard, published atomically under its final name."""
    pa = deps.pyarrow()
    return write_atomically(Path(out) / name, lambda fh: pa.parquet.write_table(table, fh))


def shard_rows(path: Path) -> int | None:
    """Rows of a shard file from its footer, or None when there is no readable file (missing or damaged)."""
    pa = deps.pyarrow()
    try:
        return pa.parquet.ParquetFile(path).metadata.num_rows
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s: unreadable (%s); it is encoded again", path, exc)
        return None


def shard_done(out: Path, shard: Shard) -> bool:
    """Whether ``shard``'s file exists with the expected number of rows (a file that does not is encoded again)."""
    rows = shard_rows(Path(out) / shard.name)
    if rows is not None and rows != shard.records:
        log.warning("%s: holds %d rows, the plan says %d; it is encoded again", shard.name, rows, shard.records)
    return rows == shard.records


def shard_schema(path: Path) -> Any:
    return deps.pyarrow().parquet.read_schema(path)


def describe_output(schema: Any) -> dict[str, Any]:
    """What the sidecar says of the columns: precision, dtype and width of the embedding column."""
    pa = deps.pyarrow()
    meta = json.loads((schema.metadata or {}).get(_SCHEMA_KEY, b"{}"))
    kind = schema.field(EMBEDDING_COLUMN).type
    if pa.types.is_list(kind):
        kind = kind.value_type
    return {
        "id_column": ID_COLUMN,
        "embedding_column": EMBEDDING_COLUMN,
        "precision": meta.get("precision", "float32"),
        "multivector": bool(meta.get("multivector", False)),
        "dtype": np.dtype(kind.value_type.to_pandas_dtype()).name,
        "width": kind.list_size,
        "arrow_type": str(schema.field(EMBEDDING_COLUMN).type),
    }


def stray_shards(out: Path, plan: Sequence[Shard]) -> list[str]:
    """Shard-like files in OUT that the plan does not name (they are never read)."""
    names = {s.name for s in plan}
    return sorted(p.name for p in Path(out).iterdir() if is_shard_name(p.name) and p.name not in names)


# --------------------------------------------------------------------------- sidecar


def read_sidecar(out: Path) -> dict[str, Any] | None:
    """The sidecar of OUT, None when there is none; an unreadable one is an error (OUT is then not usable as it is)."""
    from jev4.errors import Jev4Error

    path = Path(out) / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Jev4Error(f"{path}: unreadable ({exc}); pass --force to start {out} over") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise Jev4Error(f"{path}: not a jev4 embeddings sidecar; pass --force to start {out} over")
    if data.get("format_version") != FORMAT_VERSION:
        raise Jev4Error(f"{path}: format version {data.get('format_version')!r}, this jev4 reads {FORMAT_VERSION}")
    return data


def write_sidecar(out: Path, data: dict[str, Any]) -> Path:
    data = {**data, "updated": now()}
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    return write_atomically(Path(out) / SIDECAR_NAME, lambda fh: fh.write(text.encode()))


def sidecar_differences(existing: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What makes OUT's embeddings another job than this one: settings, artifact, corpus or plan; empty when none."""
    problems = []
    old, new = existing.get("settings", {}), expected["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            problems.append(f"{key} {old.get(key)!r} there, {new.get(key)!r} now")
    if existing.get("artifact", {}).get("identity") != expected["artifact"]["identity"]:
        problems.append(f"the artifact differs ({existing.get('artifact', {}).get('path')} there, {expected['artifact']['path']} now: another model or another build of it)")
    if existing.get("corpus", {}).get("checksum") != expected["corpus"]["checksum"]:
        problems.append(f"the corpus differs (checksum {str(existing.get('corpus', {}).get('checksum'))[:12]}... there, {expected['corpus']['checksum'][:12]}... now)")
    elif existing.get("shards") != expected["shards"]:
        problems.append("the shard plan differs")
    return problems
