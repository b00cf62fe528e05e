"""The probe set that parity is measured on, shipped with jev4 and deterministic.

It covers what breaks exports: very short and very long inputs (texts cut
at ``max_length``), many scripts, code, and images of several sizes (so the
vision grid varies). Queries and documents are separate so that ranking and
late-interaction agreement can be measured, not only per-vector cosines.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw

QUERIES = [
    "What is the capital of France?",
    "how do plants make food",
    "Wer hat die Relativitätstheorie entwickelt?",
    "¿Cuál es el río más largo de España?",
    "東京タワーの高さは？",
    "如何在Python中排序列表",
    "Как работает квантование весов?",
    "sort a list in place",
    "parse JSON from a string",
    "x",
    "mean pooling of token embeddings with a mask",
    "binary quantization of embeddings and rescoring",
]
# Real standard-library functions: their source is the code probe.
CODE_FUNCTIONS = (json.dumps, textwrap.dedent, textwrap.wrap, inspect.getdoc)
IMAGE_SIZES = ((56, 56), (120, 90), (224, 224), (448, 336), (640, 480))


@dataclass(frozen=True)
class ProbeSet:
    """Queries (encoded with the query prompt) and documents: texts (passage prompt) and images."""

    queries: list[str]
    texts: list[str]
    images: list[Image.Image]
    max_length: int

    @property
    def document_count(self) -> int:
        return len(self.texts) + len(self.images)


def _probe_image(width: int, height: int, seed: int) -> Image.Image:
    """A page-like picture: a gradient, blocks and text lines, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width, 1)), (y * 255 // max(height, 1)), np.full_like(x, 40 * seed % 255)], -1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        draw.rectangle([x0, y0, x0 + width // 4, y0 + height // 6], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    for line in range(max(1, height // 40)):
        draw.text((8, 8 + 30 * line), f"probe {seed} line {line}: embeddings", fill=(0, 0, 0))
    return img


def default_probes(max_length: int = 512) -> ProbeSet:
    """The built-in probe set; ``max_length`` is where the longest texts are cut."""
    corpus = resources.files("jev4.model").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
    lines = [line for line in corpus.splitlines() if line.strip()]
    texts = lines[:6] + [" ".join(lines[i : i + 6]) for i in range(0, 24, 6)]
    texts += [textwrap.dedent(inspect.getsource(fn)) for fn in CODE_FUNCTIONS]
    long_text = " ".join(lines) + "\n" + textwrap.dedent(inspect.getsource(textwrap))
    texts += [long_text, long_text[::-1]]  # both run past max_length and are cut there
    images = [_probe_image(w, h, seed) for seed, (w, h) in enumerate(IMAGE_SIZES)]
    return ProbeSet(queries=list(QUERIES), texts=texts, images=images, max_length=max_length)
