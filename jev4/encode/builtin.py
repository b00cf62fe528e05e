"""A built-in data set's documents as a corpus file, so that ``jev4 encode --corpus`` and its tests need no download."""

from __future__ import annotations

import json
from pathlib import Path

from jev4.datasets import BUILTIN
from jev4.datasets.containers import DatasetError


def write_corpus_jsonl(path: str | Path, dataset: str = "stdlib-code", max_docs: int | None = None) -> Path:
    """Write the text documents of a built-in set as JSONL ``{"id": "<name>-<index>", "text": ...}``, in the set's order."""
    if dataset not in BUILTIN:
        raise DatasetError(f"unknown built-in data set {dataset!r}; known: {', '.join(sorted(BUILTIN))}")
    data = BUILTIN[dataset]()
    if data.doc_kind != "text":
        raise DatasetError(f"{dataset}: its documents are {data.doc_kind}s; a corpus holds texts")
    path = Path(path)
    with path.open("w", encoding="utf-8") as fh:
        for index, text in enumerate(data.documents[:max_docs]):
            fh.write(json.dumps({"id": f"{dataset}-{index}", "text": text}, ensure_ascii=False) + "\n")
    return path
