"""Training pairs for ``jev4 qat``: JSONL pairs/triplets, or the built-in stdlib-code pairs, with a held-out split.

A line is ``{"query": ..., "positive": ..., "negative": ...}`` (negative
optional). A value that names an existing image file (png, jpg, jpeg,
webp, bmp, gif; relative to the JSONL file) is an image, so text-to-image
pairs train the image path too. A value with an image suffix and no
whitespace (``page.png``, ``/scans/p1.jpg``) is taken as an image path and
must exist: a typo in a path would otherwise train on the path's text. Any
other string is text. To say which it is, write ``{"text": "logo.png"}`` or
``{"image": "scans/page 1.png"}`` instead of the string. The split is by
line, seeded, so the held-out queries never appear in training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from jev4.datasets.files import read_text_file
from jev4.errors import Jev4Error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
BUILTIN = "stdlib-code"


class QATDataError(Jev4Error, ValueError):
    """A pairs file that cannot be read, or a line that is not a pair."""


@dataclass(frozen=True)
class Item:
    """One side of a pair: a text, or a path to an image."""

    value: str
    is_image: bool = False


@dataclass(frozen=True)
class Pair:
    query: Item
    positive: Item
    negative: Item | None = None


@dataclass(frozen=True)
class PairSplit:
    train: list[Pair]
    held_out: list[Pair]
    source: str


def _image(value: str, base: Path, where: str) -> Item:
    path = (base / value) if not Path(value).is_absolute() else Path(value)
    if path.is_file():
        return Item(str(path), True)
    if path.exists():
        raise QATDataError(f"{where}: image {path} is not a regular file")
    raise QATDataError(
        f"{where}: image file {path} not found; fix the path, or write {json.dumps({'text': value})} if it is text"
    )


def _item(value: object, base: Path, where: str) -> Item:
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("text"), str) and value["text"].strip():
            return Item(value["text"])
        if len(value) == 1 and isinstance(value.get("image"), str) and value["image"].strip():
            return _image(value["image"], base, where)
        raise QATDataError(f'{where}: an object must be {{"text": "..."}} or {{"image": "path"}}, got {json.dumps(value)[:80]}')
    if not isinstance(value, str) or not value.strip():
        raise QATDataError(f'{where}: must be a non-empty string (or {{"text": ...}} / {{"image": ...}}), got {value!r}')
    path = (base / value) if not Path(value).is_absolute() else Path(value)
    if Path(value).suffix.lower() in IMAGE_SUFFIXES:
        if path.is_file():
            return Item(str(path), True)
        if not any(c.isspace() for c in value):  # a path, not a sentence that ends in ".png"
            return _image(value, base, where)
    return Item(value)


def _read_pairs_text(path: Path) -> str:
    return read_text_file(path, f"--data {path}", "pairs file", f"give a JSONL file of pairs (or {BUILTIN})", QATDataError, "give a JSONL file, one pair per line")


def load_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a JSONL file; errors name the file and line."""
    path = Path(path)
    pairs = []
    for number, line in enumerate(_read_pairs_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QATDataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "query" not in row or "positive" not in row:
            raise QATDataError(f"{where}: needs 'query' and 'positive' (and optionally 'negative')")
        negative = _item(row["negative"], path.parent, f"{where} negative") if row.get("negative") is not None else None
        pairs.append(Pair(_item(row["query"], path.parent, f"{where} query"), _item(row["positive"], path.parent, f"{where} positive"), negative))
    if len(pairs) < 4:
        raise QATDataError(f"{path}: {len(pairs)} pairs; need at least 4 (a batch and a held-out split)")
    return pairs


def builtin_pairs(size: int | None = None) -> list[Pair]:
    """Query/code pairs of the built-in stdlib-code set (docstring summary -> function source)."""
    from jev4.datasets import stdlib_code_search

    data = stdlib_code_search()
    pairs = [Pair(Item(q), Item(data.documents[next(iter(rel))])) for q, rel in zip(data.queries, data.qrels)]
    return pairs[:size] if size else pairs


def split_pairs(pairs: list[Pair], held_out: int, seed: int, source: str) -> PairSplit:
    """A seeded split: ``held_out`` pairs for evaluation, the rest for training."""
    n = len(pairs)
    if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 1:
        raise QATDataError(f"--held-out must be an integer >= 1, got {held_out!r}")
    if n < 3:
        raise QATDataError(f"--held-out {held_out}: {source} gives only {n} pairs; need at least 3 (2 to train on, 1 held out)")
    if held_out > n - 2:
        raise QATDataError(
            f"--held-out {held_out} is more than the {n} pairs allow (1..{n - 2}); "
            f"lower --held-out or give more pairs (at least 2 stay for training)"
        )
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return PairSplit([pairs[i] for i in order[held_out:]], [pairs[i] for i in order[:held_out]], source)


def load_split(data: str, held_out: int, seed: int, size: int | None = None) -> PairSplit:
    """``data`` is a JSONL path or ``stdlib-code``."""
    pairs = builtin_pairs(size) if data == BUILTIN else load_pairs(data)
    if size and data != BUILTIN:
        pairs = pairs[:size]
    return split_pairs(pairs, held_out, seed, data)
