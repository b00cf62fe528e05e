"""The built-in ``stdlib-code`` set: docstring summary -> function source, from the installed standard library.

Deterministic for a given Python installation; docs/datasets.md describes how it is built.
"""

from __future__ import annotations

import ast
import io
import os
import sysconfig
import textwrap
import tokenize
from pathlib import Path

from jev4.datasets.containers import DatasetError, RetrievalDataset


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
