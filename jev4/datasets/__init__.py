"""Labelled data: BEIR directories, STS tsv files, and built-in sets that work offline.

The built-ins are made from text every Python installation carries, so that
``jev4 validate``, calibration and ``jev4 qat`` need no download:

- ``stdlib-code`` (:func:`stdlib_code_search`): docstring summary -> function
  source, from the installed standard library (task ``code``).
- ``pydoc-pages`` (:func:`rendered_pages`): a query naming a Python help
  topic -> an image of that topic's help text (task ``retrieval``).
- ``multilingual-names`` (:func:`multilingual_names`): a territory's name in
  one of 16 languages -> its English name, from the CLDR data babel ships
  (jina-clip-v2's text->text check; usable by any text model).

Both are deterministic for a given Python installation (and, for the
images, Pillow version); :meth:`RetrievalDataset.checksum` pins the exact
content in reports. docs/datasets.md describes how each is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from jev4.datasets.containers import DatasetError, RetrievalDataset, STSDataset
from jev4.datasets.files import load_beir, load_sts_tsv
from jev4.datasets.multilingual_names import multilingual_names
from jev4.datasets.pydoc_pages import rendered_pages
from jev4.datasets.stdlib_code import stdlib_code_search

__all__ = [
    "BUILTIN",
    "DatasetError",
    "RetrievalDataset",
    "STSDataset",
    "load_beir",
    "load_sts_tsv",
    "multilingual_names",
    "rendered_pages",
    "resolve_dataset",
    "stdlib_code_search",
]

BUILTIN: dict[str, Callable[[], RetrievalDataset]] = {
    "stdlib-code": stdlib_code_search,
    "pydoc-pages": rendered_pages,
    "multilingual-names": multilingual_names,
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
