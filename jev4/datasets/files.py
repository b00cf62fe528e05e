"""Data sets from files: a BEIR directory (corpus.jsonl, queries.jsonl, qrels/*.tsv) and STS tsv pairs.

Every malformed line is one ``DatasetError`` naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from jev4.datasets.containers import DatasetError, RetrievalDataset, STSDataset
from jev4.errors import Jev4Error


def read_text_file(
    path: Path, label: str, noun: str, hint: str, error: type[Jev4Error] = DatasetError, encoding_hint: str | None = None
) -> str:
    """A user's UTF-8 text file, or one ``error`` naming it (``label``) and what to give instead (``hint``, ``encoding_hint``).

    Checked in this order: a directory, a missing file, not a regular file
    (a FIFO would block the read), not UTF-8. Shared by every reader of a
    user's file (calibration data, QAT pairs) so they all answer alike.
    """
    if path.is_dir():
        raise error(f"{label}: is a directory; {hint}")
    if not path.exists():
        raise error(f"{label}: {noun} not found")
    if not path.is_file():
        raise error(f"{label}: is not a regular file; {hint}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{label}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); {encoding_hint or hint}") from exc


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc


def _jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line, with the required string fields checked."""
    out = []
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: bad JSON: {exc.msg}") from exc
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object")
        for key in required:
            if key not in obj:
                raise DatasetError(f"{path}:{number}: missing field {key!r}")
        obj["_id"] = str(obj["_id"])
        out.append((number, obj))
    return out


def load_beir(path: Path, split: str = "test") -> RetrievalDataset:
    """A BEIR-layout directory: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

    Document text is ``title + "\\n" + text`` when the title is non-empty, else
    ``text``. Only queries with at least one qrels row of score > 0 are kept
    (in ``queries.jsonl`` order); documents keep corpus order. A repeated
    (query, doc) qrels row overrides the earlier one, as in BEIR's loader.
    A score of 0 or below is a judged non-relevant document and is dropped
    (TREC-style qrels use negative grades, e.g. Touché 2020's -2 for spam);
    a score that is not a finite number (``nan``, ``inf``) is an error, since
    it would turn nDCG into NaN. Missing files, bad JSON lines, malformed
    qrels rows and qrels naming unknown ids raise :class:`DatasetError` with
    the file and line.
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: not a directory (expected a BEIR dataset: corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    corpus_file, queries_file, qrels_file = path / "corpus.jsonl", path / "queries.jsonl", path / "qrels" / f"{split}.tsv"
    for f in (corpus_file, queries_file, qrels_file):
        if not f.is_file():
            raise DatasetError(f"{f}: file not found")

    doc_index: dict[str, int] = {}
    documents: list[str] = []
    for number, obj in _jsonl(corpus_file, ("_id", "text")):
        if obj["_id"] in doc_index:
            raise DatasetError(f"{corpus_file}:{number}: duplicate _id {obj['_id']!r}")
        title, text = obj.get("title") or "", obj["text"]
        if not isinstance(text, str) or not isinstance(title, str):
            raise DatasetError(f"{corpus_file}:{number}: 'title' and 'text' must be strings")
        doc_index[obj["_id"]] = len(documents)
        documents.append(f"{title}\n{text}" if title.strip() else text)

    query_text: dict[str, str] = {}
    query_order: list[str] = []
    for number, obj in _jsonl(queries_file, ("_id", "text")):
        if obj["_id"] in query_text:
            raise DatasetError(f"{queries_file}:{number}: duplicate _id {obj['_id']!r}")
        if not isinstance(obj["text"], str):
            raise DatasetError(f"{queries_file}:{number}: 'text' must be a string")
        query_text[obj["_id"]] = obj["text"]
        query_order.append(obj["_id"])

    judged: dict[str, dict[int, float]] = {}
    for number, line in enumerate(_read_lines(qrels_file), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if number == 1 and fields[:1] == ["query-id"]:
            continue  # header
        if len(fields) != 3:
            raise DatasetError(f"{qrels_file}:{number}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(fields)}")
        qid, did, score_text = fields
        try:
            score = float(score_text)
        except ValueError:
            raise DatasetError(f"{qrels_file}:{number}: score {score_text!r} is not a number") from None
        if not math.isfinite(score):
            raise DatasetError(
                f"{qrels_file}:{number}: score {score_text!r}: relevance must be a finite number "
                f"(above 0: relevant, the grade is the nDCG gain; 0 or below: not relevant)"
            )
        if qid not in query_text:
            raise DatasetError(f"{qrels_file}:{number}: unknown query id {qid!r} (not in {queries_file.name})")
        if did not in doc_index:
            raise DatasetError(f"{qrels_file}:{number}: unknown corpus id {did!r} (not in {corpus_file.name})")
        judged.setdefault(qid, {})[doc_index[did]] = score

    queries, qrels = [], []
    for qid in query_order:
        positive = {d: s for d, s in judged.get(qid, {}).items() if s > 0}
        if positive:
            queries.append(query_text[qid])
            qrels.append(positive)
    if not queries:
        raise DatasetError(f"{qrels_file}: no query has a relevant document (score > 0)")
    return RetrievalDataset(
        name=path.name,
        queries=queries,
        documents=documents,
        doc_kind="text",
        qrels=qrels,
        task="retrieval",
        description=f"BEIR dataset {path} (split {split}): {len(queries)} queries, {len(documents)} documents",
    )


def load_sts_tsv(path: Path) -> STSDataset:
    """A tab-separated file with the header ``sentence1  sentence2  score`` (extra columns are ignored)."""
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DatasetError(f"{path}: empty file (expected the header sentence1\\tsentence2\\tscore)")
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = [h.strip() for h in rows[0]]
    try:
        columns = [header.index(name) for name in ("sentence1", "sentence2", "score")]
    except ValueError:
        raise DatasetError(f"{path}:1: header must name sentence1, sentence2 and score, got {header}") from None
    pairs, gold = [], []
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(columns):
            raise DatasetError(f"{path}:{number}: expected {len(header)} tab-separated fields, got {len(row)}")
        a, b, score_text = (row[i] for i in columns)
        try:
            score = float(score_text)
        except ValueError:
            raise DatasetError(f"{path}:{number}: score {score_text!r} is not a number") from None
        if not math.isfinite(score):
            raise DatasetError(f"{path}:{number}: score {score_text!r}: the gold score must be a finite number")
        pairs.append((a, b))
        gold.append(score)
    if len(pairs) < 2:
        raise DatasetError(f"{path}: needs at least 2 pairs for a correlation, got {len(pairs)}")
    if len(set(gold)) == 1:
        raise DatasetError(
            f"{path}: all {len(gold)} gold scores are equal ({gold[0]:g}); Spearman correlation is undefined; "
            f"give pairs with different scores"
        )
    return STSDataset(name=path.stem, pairs=pairs, gold=gold)
