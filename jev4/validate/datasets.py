"""Labelled data for validation: BEIR directories, STS tsv files, and built-in sets that work offline.

The built-ins are made from text every Python installation carries, so that
``jev4 validate`` needs no download:

- ``stdlib-code`` (:func:`stdlib_code_search`): docstring summary -> function
  source, from the installed standard library (task ``code``).
- ``pydoc-pages`` (:func:`rendered_pages`): a query naming a Python help
  topic -> an image of that topic's help text (task ``retrieval``).

Both are deterministic for a given Python installation (and, for the
images, Pillow version); :meth:`RetrievalDataset.checksum` pins the exact
content in reports. docs/datasets.md describes how each is built.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import sysconfig
import textwrap
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jev4.errors import Jev4Error

__all__ = [
    "BUILTIN",
    "DatasetError",
    "RetrievalDataset",
    "STSDataset",
    "load_beir",
    "load_sts_tsv",
    "rendered_pages",
    "resolve_dataset",
    "stdlib_code_search",
]


class DatasetError(Jev4Error):
    """A dataset is missing, malformed or inconsistent; the message names the file (and line)."""


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class RetrievalDataset:
    """Queries, documents and graded relevance judgements.

    ``qrels[q]`` maps a document index (into ``documents``) to a relevance > 0.
    ``documents`` holds texts (``doc_kind == "text"``) or PIL images (``"image"``).
    ``task`` is the jina task adapter the set is meant for.
    """

    name: str
    queries: list[str]
    documents: list
    doc_kind: str
    qrels: list[dict[int, float]]
    task: str = "retrieval"
    description: str = ""

    def __post_init__(self):
        if self.doc_kind not in ("text", "image"):
            raise DatasetError(f"{self.name}: doc_kind must be 'text' or 'image', got {self.doc_kind!r}")
        if len(self.qrels) != len(self.queries):
            raise DatasetError(f"{self.name}: {len(self.qrels)} qrels for {len(self.queries)} queries")
        for q, judged in enumerate(self.qrels):
            for d in judged:
                if not 0 <= d < len(self.documents):
                    raise DatasetError(f"{self.name}: query {q} judges document {d}, but there are {len(self.documents)} documents")

    def subset(self, max_queries: int | None, max_docs: int | None) -> RetrievalDataset:
        """A smaller set: at most ``max_queries`` queries, about ``max_docs`` documents.

        Queries are taken evenly spread over the set (indices ``floor(i * n / m)``),
        not the first m, so a subset covers the whole set. Every document
        relevant to a kept query is kept (so the document count can exceed
        ``max_docs`` only if the relevant documents alone do); the rest, up to
        ``max_docs``, are distractors taken evenly spread from the other
        documents. Documents keep their original relative order. ``None``
        means no limit. Deterministic: no randomness is involved.
        """
        for label, value in (("max_queries", max_queries), ("max_docs", max_docs)):
            if value is not None and value < 1:
                raise DatasetError(f"{self.name}: {label} must be >= 1, got {value}")
        n_q, n_d = len(self.queries), len(self.documents)
        if (max_queries is None or max_queries >= n_q) and (max_docs is None or max_docs >= n_d):
            return self
        keep_q = _spread(n_q, max_queries)
        relevant = sorted({d for q in keep_q for d in self.qrels[q]})
        keep_d = np.asarray(relevant, dtype=np.int64)
        room = (n_d if max_docs is None else max_docs) - len(relevant)
        if room > 0:
            others = np.setdiff1d(np.arange(n_d), keep_d, assume_unique=True)
            keep_d = np.union1d(keep_d, others[_spread(len(others), room)])
        new_index = {int(d): i for i, d in enumerate(keep_d)}
        return replace(
            self,
            queries=[self.queries[q] for q in keep_q],
            documents=[self.documents[d] for d in keep_d],
            qrels=[{new_index[d]: r for d, r in self.qrels[q].items()} for q in keep_q],
        )

    def checksum(self) -> str:
        """sha256 (hex) over a canonical serialisation of queries, documents and qrels.

        Queries and qrels are JSON (qrels as sorted ``[doc, float(rel)]`` pairs);
        each document follows as a tagged, length-prefixed record: UTF-8 for
        texts; for images, the mode, the size and the raw decoded pixel bytes
        (``Image.tobytes()``; not a PNG encoding, whose bytes depend on the
        zlib build, not on the pixels).
        """
        h = hashlib.sha256()
        head = {
            "doc_kind": self.doc_kind,
            "queries": self.queries,
            "qrels": [sorted([int(d), float(r)] for d, r in q.items()) for q in self.qrels],
        }
        _update(h, b"H", json.dumps(head, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode())
        for doc in self.documents:
            if isinstance(doc, Image.Image):
                _update(h, b"I", json.dumps([doc.mode, list(doc.size)]).encode())
                _update(h, b"P", doc.tobytes())
            else:
                _update(h, b"T", str(doc).encode("utf-8"))
        return h.hexdigest()


def _update(h, tag: bytes, payload: bytes) -> None:
    h.update(tag + len(payload).to_bytes(8, "little") + payload)


def _spread(n: int, m: int | None) -> np.ndarray:
    """m indices evenly spread over range(n) (all of them when m is None or >= n): floor(i * n / m)."""
    if m is None or m >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(m, dtype=np.int64) * n) // m


@dataclass(frozen=True)
class STSDataset:
    """Sentence pairs with gold similarity scores (for Spearman against cosine similarity)."""

    name: str
    pairs: list[tuple[str, str]]
    gold: list[float]


# --------------------------------------------------------------------------- files


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
    Missing files, bad JSON lines, malformed qrels rows and qrels naming
    unknown ids raise :class:`DatasetError` with the file and line.
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
        pairs.append((a, b))
        gold.append(score)
    if len(pairs) < 2:
        raise DatasetError(f"{path}: needs at least 2 pairs for a correlation, got {len(pairs)}")
    return STSDataset(name=path.stem, pairs=pairs, gold=gold)


# --------------------------------------------------------------------------- built-in: stdlib code search

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
MIN_QUERY_WORDS = 4


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(posix path relative to ``root``, path) of every .py file outside the skipped dirs, sorted by relative path."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith(".py"):
                full = Path(directory) / name
                found.append((full.relative_to(root).as_posix(), full))
    return sorted(found)


def _read_source(path: Path) -> str | None:
    """Decoded source (PEP 263 coding cookie honoured), newlines normalised to \\n; None if unreadable."""
    try:
        raw = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        text = raw.decode(encoding)
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _summary(doc: str) -> str:
    """The summary: first line of the first paragraph of a cleaned docstring (its first non-blank line), stripped."""
    return doc.strip().split("\n", 1)[0].strip()


def _function_pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> tuple[str, str] | None:
    """(summary, source without its docstring) for one function, or None if it does not qualify."""
    if len(node.body) < 2:
        return None  # docstring only (or no docstring): nothing left to retrieve
    first = node.body[0]
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)):
        return None
    summary = _summary(ast.get_docstring(node, clean=True) or "")
    if len(summary.split()) < MIN_QUERY_WORDS:
        return None
    start, end = node.lineno - 1, node.end_lineno  # the def line .. last line (decorators excluded, as get_source_segment)
    ds_start, ds_end = first.lineno - 1, first.end_lineno  # docstring lines, 0-based, end exclusive
    # The docstring must own its lines, so that removing them removes nothing else.
    if ds_start <= start or lines[ds_start][: _char_col(lines[ds_start], first.col_offset)].strip():
        return None
    tail = lines[ds_end - 1][_char_col(lines[ds_end - 1], first.end_col_offset) :].strip()
    if tail and not tail.startswith("#"):
        return None
    segment = lines[start:end]
    segment[-1] = segment[-1][: _char_col(segment[-1], node.end_col_offset)]  # as ast.get_source_segment ends
    kept = segment[: ds_start - start] + segment[ds_end - start :]
    if sum(1 for line in kept if line.strip()) < 2:
        return None
    document = textwrap.dedent("\n".join(kept))
    if summary in document:
        return None  # the query would be findable by string match (e.g. repeated in a message or comment)
    return summary, document


def _char_col(line: str, byte_col: int) -> int:
    """ast column offsets count UTF-8 bytes; convert to a str index."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def stdlib_code_search(max_pairs: int = 3000) -> RetrievalDataset:
    """Built-in ``stdlib-code``: docstring summary line -> the function's source without its docstring.

    Walks ``sysconfig.get_paths()["stdlib"]`` (sorted relative paths; skips
    site-packages, dist-packages, test, tests, idlelib, lib2to3 and files that
    fail to read or parse). For every function or method (nested ones
    included) whose docstring summary (first line of the first paragraph)
    has at least 4 words: query = the summary; document = the function's
    source (``def`` line to its end, as ``ast.get_source_segment``) with the
    docstring's lines removed and the rest kept verbatim, then dedented.
    Skipped: functions whose body is the docstring alone, docstrings that
    share a line with other code, documents with fewer than 2 non-blank
    lines, and documents that still contain the summary verbatim. Duplicate
    queries and duplicate documents are dropped (the first is kept), in
    (path, line) order; the first ``max_pairs`` pairs are taken. One
    relevant document (relevance 1) per query; task ``code``.
    """
    if max_pairs < 1:
        raise DatasetError(f"stdlib-code: max_pairs must be >= 1, got {max_pairs}")
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DatasetError(f"stdlib-code: the standard library directory {root} does not exist")
    queries: list[str] = []
    documents: list[str] = []
    seen_q: set[str] = set()
    seen_d: set[str] = set()
    files = 0
    for _, path in _stdlib_files(root):
        source = _read_source(path)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        files += 1
        lines = source.split("\n")
        functions = sorted(
            (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
            key=lambda n: (n.lineno, n.col_offset),
        )
        for node in functions:
            pair = _function_pair(node, lines)
            if pair is None or pair[0] in seen_q or pair[1] in seen_d:
                continue
            seen_q.add(pair[0])
            seen_d.add(pair[1])
            queries.append(pair[0])
            documents.append(pair[1])
            if len(queries) == max_pairs:
                break
        if len(queries) == max_pairs:
            break
    if not queries:
        raise DatasetError(f"stdlib-code: found no documented functions under {root}")
    return RetrievalDataset(
        name="stdlib-code",
        queries=queries,
        documents=documents,
        doc_kind="text",
        qrels=[{i: 1.0} for i in range(len(queries))],
        task="code",
        description=(
            f"Python {sysconfig.get_python_version()} standard library ({root}): docstring summary -> function source "
            f"without its docstring; {len(queries)} pairs from {files} files"
        ),
    )


# --------------------------------------------------------------------------- built-in: rendered help pages

PAGE_CHARS = 1000
MIN_TOPIC_CHARS = 200
PAGE_MARGIN = 6  # pixels at render scale
PAGE_BASE = 448  # a page is laid out for this many pixels (about 72 columns x 33 lines of the 6x11 font)


def _bitmap_font() -> ImageFont.ImageFont:
    """Pillow's built-in bitmap font (fixed 6x11 glyphs): no FreeType, identical on every machine."""
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1
    return loader() if loader is not None else ImageFont.load_default()


def _wrap_page(text: str, columns: int, rows: int) -> list[str]:
    """The text's lines, each wrapped at ``columns`` (indentation kept), cut to ``rows`` lines."""
    out: list[str] = []
    for line in text.expandtabs(4).split("\n"):
        line = "".join(ch if ch.isprintable() else " " for ch in line).rstrip()
        indent = line[: len(line) - len(line.lstrip())]
        wrapped = textwrap.wrap(line, width=columns, subsequent_indent=indent[: columns // 2], drop_whitespace=True) or [""]
        out.extend(wrapped)
        if len(out) >= rows:
            break
    return out[:rows]


def _render_page(text: str, size: tuple[int, int], font: ImageFont.ImageFont) -> Image.Image:
    """Black text on white; sizes of 896+ pixels are drawn at 1/scale and enlarged (nearest), so the text keeps its share of the page."""
    width, height = size
    scale = max(1, min(width, height) // PAGE_BASE)
    canvas = (max(1, width // scale), max(1, height // scale))
    left, top, right, bottom = font.getbbox("M")
    char_w = max(1, int(font.getlength("M")))
    line_h = max(1, bottom - top) + 2
    columns = max(1, (canvas[0] - 2 * PAGE_MARGIN) // char_w)
    rows = max(1, (canvas[1] - 2 * PAGE_MARGIN) // line_h)
    image = Image.new("RGB", canvas, "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(_wrap_page(text, columns, rows)):
        # Only ASCII survives the bitmap font; anything else becomes "?" (same on every machine).
        draw.text((PAGE_MARGIN, PAGE_MARGIN + i * line_h), line.encode("ascii", "replace").decode(), fill="black", font=font)
    if image.size != size:
        image = image.resize(size, Image.Resampling.NEAREST)
    return image


def _topic_query(title: str) -> str:
    return "Python documentation: " + " ".join(title.replace("_", " ").replace("-", " ").split())


def rendered_pages(max_pages: int = 300, size: tuple[int, int] = (448, 448)) -> RetrievalDataset:
    """Built-in ``pydoc-pages``: a query naming a Python help topic -> a rendered image of its help text.

    Source: ``pydoc_data.topics.topics`` (the text of ``help("assert")`` etc.),
    sorted titles, topics with at least 200 characters of text. Each page is
    the topic's first 1000 characters (stripped), each line wrapped at the
    page width (indentation kept) and cut to the lines that fit, drawn in
    black with Pillow's built-in 6x11 bitmap font (13-pixel lines, 6-pixel
    margin) on a white RGB canvas of ``size / scale`` (scale = min(size) //
    448, at least 1), enlarged by nearest-neighbour to ``size`` when scale > 1. Query: ``"Python documentation: "``
    + the title with underscores and dashes as spaces (a repeated query is
    dropped). One relevant page (relevance 1) per query; task ``retrieval``.
    """
    if max_pages < 1:
        raise DatasetError(f"pydoc-pages: max_pages must be >= 1, got {max_pages}")
    if len(size) != 2 or min(size) < 32:
        raise DatasetError(f"pydoc-pages: size must be (width, height) of at least 32 pixels, got {size}")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise DatasetError(f"pydoc-pages: this Python has no pydoc_data.topics ({exc})") from exc
    font = _bitmap_font()
    queries: list[str] = []
    pages: list[Image.Image] = []
    for title in sorted(topics):
        text = topics[title]
        if len(text.strip()) < MIN_TOPIC_CHARS:
            continue
        query = _topic_query(title)
        if query in queries:
            continue
        queries.append(query)
        pages.append(_render_page(text.strip()[:PAGE_CHARS], tuple(size), font))
        if len(pages) == max_pages:
            break
    return RetrievalDataset(
        name="pydoc-pages",
        queries=queries,
        documents=pages,
        doc_kind="image",
        qrels=[{i: 1.0} for i in range(len(queries))],
        task="retrieval",
        description=f"Python {sysconfig.get_python_version()} help topics (pydoc_data.topics) rendered as {size[0]}x{size[1]} page images; {len(pages)} pages",
    )


# --------------------------------------------------------------------------- lookup

BUILTIN: dict[str, Callable[[], RetrievalDataset]] = {
    "stdlib-code": stdlib_code_search,
    "pydoc-pages": rendered_pages,
}


def resolve_dataset(name_or_dir: str, max_queries: int | None = None, max_docs: int | None = None) -> RetrievalDataset:
    """A built-in by name, or a BEIR directory (split ``test``), cut down with :meth:`RetrievalDataset.subset`."""
    if name_or_dir in BUILTIN:
        data = BUILTIN[name_or_dir]()
    elif Path(name_or_dir).is_dir():
        data = load_beir(Path(name_or_dir))
    else:
        raise DatasetError(f"unknown dataset {name_or_dir!r}: not a directory, and the built-ins are {', '.join(sorted(BUILTIN))}")
    return data.subset(max_queries, max_docs)
