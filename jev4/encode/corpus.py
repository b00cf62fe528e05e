"""The corpus: where its records are, the one pass that checks them all, and the reading of one shard.

A corpus is a JSONL file (one ``{"id": "...", "text": "..."}`` object per
line; blank lines are allowed), a Parquet file with string columns ``id`` and
``text``, or a directory of such files (``*.jsonl`` and ``*.parquet`` found
recursively, in sorted order of their paths; names starting with ``.`` or
``_`` are skipped, as Spark and Ray write ``_SUCCESS`` and ``_metadata``).

``scan_corpus`` streams the whole corpus once on the driver before any model
loads, so that a bad line stops the job at once with one error naming the
file and line, instead of on a worker hours later. The same pass:

- checks every record: valid UTF-8 and JSON, an object, a non-empty string
  ``id``, a string ``text``, no lone surrogates (Parquet cannot store them);
- finds duplicate ids in ~8 bytes per record: a numpy array of 64-bit
  hashes of the ids, sorted at the end; only when two hashes collide does a
  second pass compare the real ids (of the colliding hashes only), so the
  error names both lines and a mere hash collision is no error;
- computes the corpus checksum (sha256 of each file's bytes), which the
  sidecar records so that a re-run on a changed corpus is refused;
- cuts the shard plan (``jev4.encode.plan``), with byte offsets for JSONL.

Memory stays flat as the corpus grows, apart from those 8 bytes per id (and
16 for a moment while the hashes are sorted) and ~150 bytes per shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from jev4.datasets.containers import DatasetError
from jev4.encode import deps
from jev4.encode.plan import PlanBuilder, Shard

log = logging.getLogger(__name__)

ID_FIELD = "id"
TEXT_FIELD = "text"
JSONL = "jsonl"
PARQUET = "parquet"
_PARQUET_MAGIC = b"PAR1"
_BOM = b"\xef\xbb\xbf"
_HASH_CHUNK = 1 << 16
_READ_CHUNK = 1 << 22
_FIELDS_HINT = 'every record needs {"id": "<string>", "text": "<string>"}'


@dataclass(frozen=True)
class Source:
    """One file of the corpus: its absolute path, the name errors use, its format, and its name in the corpus (checksummed)."""

    path: str
    label: str
    kind: str
    rel: str

    def where(self, position: int) -> str:
        """``corpus.jsonl line 17`` (1-based, as editors count) or ``part-0.parquet row 16`` (0-based, as Arrow does)."""
        return f"{self.label} line {position + 1}" if self.kind == JSONL else f"{self.label} row {position}"


@dataclass(frozen=True)
class CorpusScan:
    """What the pre-pass found: the files, the shard plan, the record count and the checksum."""

    sources: tuple[Source, ...]
    shards: tuple[Shard, ...]
    records: int
    bytes: int
    checksum: str
    file_checksums: tuple[str, ...]

    def describe(self, corpus: str) -> dict[str, Any]:
        """The corpus as the sidecar records it."""
        return {
            "path": str(Path(corpus).expanduser().resolve()),
            "checksum": self.checksum,
            "records": self.records,
            "bytes": self.bytes,
            "files": [{"name": s.label, "kind": s.kind, "sha256": c} for s, c in zip(self.sources, self.file_checksums)],
        }


def _kind(path: Path) -> str:
    with path.open("rb") as fh:
        return PARQUET if fh.read(4) == _PARQUET_MAGIC else JSONL


def find_sources(corpus: str | Path) -> tuple[Source, ...]:
    """The corpus's files in a fixed order (the order of the shard plan)."""
    root = Path(corpus).expanduser()
    if not root.exists():
        raise DatasetError(f"--corpus {corpus}: no such file or directory")
    if root.is_file():
        return (Source(str(root.resolve()), str(corpus), _kind(root), ""),)  # a lone file: its content counts, not its name
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith((".", "_")) for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in (".jsonl", ".parquet"):
            kind = PARQUET if path.suffix == ".parquet" else JSONL
            files.append(Source(str(path.resolve()), str(Path(corpus) / rel), kind, rel.as_posix()))
    if not files:
        raise DatasetError(f"--corpus {corpus}: a directory with no .jsonl or .parquet files in it")
    return tuple(files)


# --------------------------------------------------------------------------- one record


def check_record(record_id: Any, text: Any, where: str) -> tuple[str, str]:
    """``(id, text)`` when both are fine, else one DatasetError naming ``where`` and the fix."""
    if record_id is _MISSING:
        raise DatasetError(f'{where}: no "{ID_FIELD}" field; {_FIELDS_HINT}')
    if not isinstance(record_id, str):
        hint = " (write it as a JSON string)" if isinstance(record_id, (int, float)) else ""
        raise DatasetError(f'{where}: "{ID_FIELD}" must be a string, got {type(record_id).__name__} {record_id!r}{hint}')
    if not record_id:
        raise DatasetError(f'{where}: "{ID_FIELD}" is empty; every record needs a non-empty id')
    if text is _MISSING:
        raise DatasetError(f'{where}: no "{TEXT_FIELD}" field (id {record_id!r}); {_FIELDS_HINT}')
    if not isinstance(text, str):
        raise DatasetError(f'{where}: "{TEXT_FIELD}" must be a string, got {type(text).__name__} (id {record_id!r})')
    for name, value in ((ID_FIELD, record_id), (TEXT_FIELD, text)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DatasetError(f'{where}: "{name}" holds a lone surrogate {value[exc.start]!r} at position {exc.start}, which is not valid Unicode') from None
    return record_id, text


_MISSING = object()


def parse_jsonl_line(raw: bytes, where: str) -> tuple[str, str]:
    """One non-blank JSONL line -> ``(id, text)``; every way it can be wrong is one DatasetError naming ``where``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: not valid UTF-8 (byte {exc.start} of the line); save the corpus as UTF-8") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); {_FIELDS_HINT}") from None
    except RecursionError:
        raise DatasetError(f"{where}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_FIELDS_HINT}")
    return check_record(obj.get(ID_FIELD, _MISSING), obj.get(TEXT_FIELD, _MISSING), where)


# --------------------------------------------------------------------------- reading a source


def _jsonl_lines(fh: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, bytes as in the file)`` of every line of a file opened in binary mode."""
    offset = 0
    for number, raw in enumerate(fh):
        yield number, offset, raw
        offset += len(raw)


def _content(number: int, raw: bytes) -> bytes:
    """A line without the UTF-8 byte order mark that some editors put at the start of a file."""
    return raw[len(_BOM) :] if number == 0 and raw.startswith(_BOM) else raw


def _parquet_file(source: Source) -> Any:
    """The ParquetFile, with its ``id``/``text`` columns checked to be strings."""
    pa = deps.pyarrow()
    try:
        pf = pa.parquet.ParquetFile(source.path)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{source.label}: not a readable Parquet file ({exc})") from None
    schema = pf.schema_arrow
    for name in (ID_FIELD, TEXT_FIELD):
        if schema.get_field_index(name) < 0:
            raise DatasetError(f"{source.label}: no column {name!r} (columns: {', '.join(schema.names)}); {_FIELDS_HINT}")
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise DatasetError(f"{source.label}: column {name!r} is {kind}, expected string")
    return pf


def _parquet_ids(source: Source, pf: Any) -> Iterator[tuple[int, str]]:
    """``(row, id)`` of every row; nulls named by their row (text is read for its nulls only)."""
    row = 0
    for batch in pf.iter_batches(batch_size=_HASH_CHUNK, columns=[ID_FIELD, TEXT_FIELD]):
        ids, texts = batch.column(0), batch.column(1)
        for column, name in ((ids, ID_FIELD), (texts, TEXT_FIELD)):
            if column.null_count:
                first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise DatasetError(f'{source.where(row + first)}: "{name}" is null; {_FIELDS_HINT}')
        for offset, record_id in enumerate(ids.to_pylist()):
            if not record_id:
                raise DatasetError(f'{source.where(row + offset)}: "{ID_FIELD}" is empty; every record needs a non-empty id')
            yield row + offset, record_id
        row += batch.num_rows


def _record_ids(source: Source) -> Iterator[tuple[int, str]]:
    """``(position, id)`` of every record of ``source`` (the confirmation pass of the duplicate check)."""
    if source.kind == PARQUET:
        yield from _parquet_ids(source, _parquet_file(source))
        return
    with open(source.path, "rb") as fh:
        for number, _, raw in _jsonl_lines(fh):
            line = _content(number, raw)
            if line.strip():
                yield number, parse_jsonl_line(line, source.where(number))[0]


def _file_sha256(path: str, progress: Any) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk) / 2)  # a Parquet file is read twice: once for its bytes, once for its rows
    return digest.hexdigest()


# --------------------------------------------------------------------------- the pre-pass


class _IdHashes:
    """64-bit hashes of every id, in int64 chunks: duplicates are adjacent once sorted.

    ``hash(str)`` is salted per process, which is fine: the hashes live and die
    within one scan. The confirmation pass compares the ids themselves.
    """

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._pending: list[int] = []

    def add(self, record_id: str) -> None:
        self._pending.append(hash(record_id))
        if len(self._pending) == _HASH_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._chunks.append(np.fromiter(self._pending, dtype=np.int64, count=len(self._pending)))
            self._pending = []

    def colliding(self) -> set[int]:
        """Hashes seen more than once."""
        self._flush()
        if not self._chunks:
            return set()
        hashes = np.concatenate(self._chunks)
        self._chunks = []
        hashes.sort()
        same = hashes[1:] == hashes[:-1]
        return {int(h) for h in np.unique(hashes[1:][same])}


def _confirm_duplicates(sources: tuple[Source, ...], colliding: set[int]) -> None:
    """Compare the real ids behind colliding hashes; raise naming both places of the first true duplicate."""
    first_seen: dict[str, str] = {}
    for source in sources:
        for position, record_id in _record_ids(source):
            if hash(record_id) not in colliding:
                continue
            where = source.where(position)
            if record_id in first_seen:
                raise DatasetError(f"{where}: duplicate id {record_id!r} (first at {first_seen[record_id]}); every id must be unique")
            first_seen[record_id] = where
    log.debug("%d colliding id hashes, no duplicate ids", len(colliding))


def scan_corpus(corpus: str | Path, shard_size: int, progress: bool = False) -> CorpusScan:
    """Check every record and cut the shard plan, in one streaming pass (see the module doc)."""
    sources = find_sources(corpus)
    total = sum(Path(s.path).stat().st_size for s in sources)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="checking corpus", unit="B", unit_scale=True)
    hashes = _IdHashes()
    plan = PlanBuilder(shard_size)
    checksums = []
    records = 0
    try:
        for index, source in enumerate(sources):
            if source.kind == PARQUET:
                checksums.append(_file_sha256(source.path, bar))
                pf = _parquet_file(source)
                for row, record_id in _parquet_ids(source, pf):
                    hashes.add(record_id)
                    plan.add(index, row)
                    records += 1
                if bar is not None:
                    bar.update(Path(source.path).stat().st_size / 2)
            else:
                digest = hashlib.sha256()
                with open(source.path, "rb") as fh:
                    for number, offset, raw in _jsonl_lines(fh):
                        digest.update(raw)
                        line = _content(number, raw)
                        if line.strip():
                            record_id, _ = parse_jsonl_line(line, source.where(number))
                            hashes.add(record_id)
                            plan.add(index, number, offset, offset + len(raw))
                            records += 1
                        if bar is not None:
                            bar.update(len(raw))
                checksums.append(digest.hexdigest())
            plan.close()
    finally:
        if bar is not None:
            bar.close()
    if records == 0:
        raise DatasetError(f"--corpus {corpus}: holds no records; {_FIELDS_HINT}")
    colliding = hashes.colliding()
    if colliding:
        _confirm_duplicates(sources, colliding)
    overall = hashlib.sha256()
    for source, checksum in zip(sources, checksums):
        overall.update(f"{source.rel}\0{source.kind}\0{checksum}\n".encode())
    return CorpusScan(sources, tuple(plan.shards), records, total, overall.hexdigest(), tuple(checksums))


# --------------------------------------------------------------------------- one shard (on a worker)


def _changed(source: Source, shard: Shard, found: int) -> DatasetError:
    return DatasetError(
        f"{source.label}: changed while the job ran: shard {shard.name} should hold {shard.records} records "
        f"({source.where(shard.start)} on), found {found}; re-run the job (it re-checks the corpus)"
    )


def read_shard(source: Source, shard: Shard) -> tuple[list[str], list[str]]:
    """The ids and texts of one shard, in corpus order, checked again (the corpus may have changed since the scan)."""
    ids: list[str] = []
    texts: list[str] = []
    if source.kind == JSONL:
        with open(source.path, "rb") as fh:
            fh.seek(shard.byte_start)
            data = fh.read(shard.byte_end - shard.byte_start)
        for number, raw in enumerate(data.split(b"\n"), start=shard.start):
            line = _content(number, raw)
            if line.strip():
                record_id, text = parse_jsonl_line(line, source.where(number))
                ids.append(record_id)
                texts.append(text)
    else:
        pf = _parquet_file(source)
        groups, first_row, row = [], None, 0
        for group in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if row < shard.end and row + rows > shard.start:
                groups.append(group)
                first_row = row if first_row is None else first_row
            row += rows
        if groups:
            table = pf.read_row_groups(groups, columns=[ID_FIELD, TEXT_FIELD]).slice(shard.start - first_row, shard.end - shard.start)
            ids, texts = table.column(ID_FIELD).to_pylist(), table.column(TEXT_FIELD).to_pylist()
        for offset, (record_id, text) in enumerate(zip(ids, texts)):
            check_record(_MISSING if record_id is None else record_id, _MISSING if text is None else text, source.where(shard.start + offset))
    if len(ids) != shard.records:
        raise _changed(source, shard, len(ids))
    return ids, texts
