"""Retrieval quality and parity of a two-tower (text + image) encoder against its reference.

Works on any pair of objects with ``encode_text(texts, prompt_name=,
truncate_dim=, batch_size=, max_length=)`` and ``encode_image(images,
truncate_dim=, batch_size=)`` returning unit vectors (``ClipV2Encoder`` and
whatever backend mirrors it), so the same check serves the torch reference,
an ONNX export or a quantized copy. Three directions, each on a built-in set
that needs no download:

- **text->text**: ``multilingual-names`` (a territory's name in one of 16
  languages -> its English name). Queries get the ``"query"`` prompt and
  documents ``"passage"``: jina-clip-v2 prefixes queries with its retrieval
  instruction and documents with nothing (shared/CLIP_V2.md).
- **text->image**: ``pydoc-pages`` (a query naming a Python help topic -> the
  rendered page). The text side is a query, so it gets the ``"query"``
  prompt, as jina-clip-v2's own text-to-image search does.
- **image->image**: each page's top-left crop (``crop_fraction`` of its width
  and height) -> the full page. This is near-duplicate (copy) detection,
  the main use of image->image search: find the source of a partial view.
  Crop-and-rescale is the standard transform of copy-detection benchmarks
  (Copydays' crops, DISC21's augmentations). A crop, not a rescale of the
  whole page: the model's own resize to its input size would undo a rescale
  and leave nothing to test. Anchored top-left because a page begins there,
  so the query keeps the topic's first lines and is answerable from
  content. Not "the next page": pydoc-pages renders one page per topic, and
  "another page of the same topic" would test topical similarity, which is
  text->image's job.

Each encoder embeds every input once at the largest dim; smaller Matryoshka
dims are derived by truncating and re-normalising (what ``truncate_dim``
does: truncate, then L2-normalise). ``per_dim_encoding=True`` instead asks
the encoders for each dim, to test a backend's own truncation. For every
direction x dim: nDCG@k and Recall@k (``jev4.validate.metrics``) for the
reference and the candidate; for every input group x dim: the cosine
between the reference's and the candidate's vector of each input (min and
mean).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from jev4.datasets.containers import RetrievalDataset
from jev4.datasets.multilingual_names import multilingual_names
from jev4.datasets.pydoc_pages import rendered_pages
from jev4.errors import EncodeError, SettingsError
from jev4.validate.metrics import cosine_rows, max_abs, recall_at_k, retrieval_metrics

log = logging.getLogger(__name__)

__all__ = [
    "ClipRetrievalReport",
    "ClipRetrievalResult",
    "ClipRetrievalSettings",
    "CosineParity",
    "TwoTowerEncoder",
    "crop_queries",
    "run_clip_retrieval",
]

DIRECTIONS = ("text->text", "text->image", "image->image")


class TwoTowerEncoder(Protocol):
    """What the evaluation needs of an encoder (``ClipV2Encoder`` is one)."""

    def encode_text(self, texts: Sequence[str], prompt_name: str | None = None, truncate_dim: int | None = None, batch_size: int = 8, max_length: int = 512) -> Any: ...

    def encode_image(self, images: Sequence[Image.Image], truncate_dim: int | None = None, batch_size: int = 8) -> Any: ...


@dataclass(frozen=True)
class ClipRetrievalSettings:
    """Sizes (small by default: a CPU run on the full-size model stays in minutes) and what to measure.

    ``dims``: the dims to score, largest first; None takes the reference's
    ``config.hidden_size`` and ``config.matryoshka_dims``. ``text_queries`` /
    ``text_docs``: a :meth:`RetrievalDataset.subset` of multilingual-names
    (queries spread evenly over its 16 languages; None keeps all 3648 / 257).
    """

    text_queries: int | None = 64
    text_docs: int | None = None
    pages: int = 16
    page_size: tuple[int, int] = (448, 448)
    crop_fraction: float = 0.75
    dims: tuple[int, ...] | None = None
    ndcg_k: int = 10
    recall_ks: tuple[int, ...] = (1, 10)
    batch_size: int = 8
    max_length: int = 512
    per_dim_encoding: bool = False

    def __post_init__(self):
        for name in ("pages", "ndcg_k", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"clip retrieval: {name} must be an integer >= 1, got {value!r}")
        if not 0.1 <= self.crop_fraction < 1.0:
            raise SettingsError(f"clip retrieval: crop_fraction must be in [0.1, 1), got {self.crop_fraction!r}")
        if not self.recall_ks or any(k < 1 for k in self.recall_ks):
            raise SettingsError(f"clip retrieval: recall_ks must be integers >= 1, got {self.recall_ks!r}")
        if self.dims is not None and (not self.dims or any(d < 1 for d in self.dims)):
            raise SettingsError(f"clip retrieval: dims must be integers >= 1, got {self.dims!r}")


@dataclass
class ClipRetrievalResult:
    """One direction x dim: the reference's and the candidate's metrics (means over judged queries)."""

    direction: str
    dataset: str
    dim: int
    queries: int
    documents: int
    reference: dict[str, float]
    candidate: dict[str, float]

    @property
    def delta(self) -> dict[str, float]:
        """candidate - reference, per metric."""
        return {k: self.candidate[k] - self.reference[k] for k in self.reference if k in self.candidate}


@dataclass
class CosineParity:
    """One input group x dim: cosine between the reference's and the candidate's vector of each input, and max |difference|."""

    inputs: str
    dim: int
    rows: int
    min_cosine: float
    mean_cosine: float
    max_abs: float


@dataclass
class ClipRetrievalReport:
    """Everything one run measured, with the checksums of the exact data it ran on."""

    retrieval: list[ClipRetrievalResult]
    parity: list[CosineParity]
    settings: ClipRetrievalSettings
    checksums: dict[str, str] = field(default_factory=dict)

    def result(self, direction: str, dim: int) -> ClipRetrievalResult:
        for r in self.retrieval:
            if r.direction == direction and r.dim == dim:
                return r
        raise KeyError(f"no retrieval result for {direction} at dim {dim}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a run can be stored and compared later)."""
        return {
            "retrieval": [{**asdict(r), "delta": r.delta} for r in self.retrieval],
            "parity": [asdict(p) for p in self.parity],
            "settings": asdict(self.settings),
            "checksums": dict(self.checksums),
        }


def crop_queries(pages: Sequence[Image.Image], fraction: float) -> list[Image.Image]:
    """The top-left ``fraction`` x ``fraction`` of each page (see the module docstring for why)."""
    return [page.crop((0, 0, max(1, round(page.width * fraction)), max(1, round(page.height * fraction)))) for page in pages]


@dataclass(frozen=True)
class _Group:
    """One set of inputs both encoders embed: texts with a prompt, or images."""

    name: str
    kind: str  # "text" or "image"
    items: list
    prompt_name: str | None = None


def _as_array(value: Any, who: str, group: _Group, dim: int) -> np.ndarray:
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float64)
    expected = (len(group.items), dim)
    if array.shape != expected:
        raise EncodeError(f"{who}: encode_{group.kind} gave shape {array.shape} for {group.name} ({len(group.items)} inputs at dim {dim}), expected {expected}")
    if not np.isfinite(array).all():
        raise EncodeError(f"{who}: encode_{group.kind} gave non-finite values for {group.name} at dim {dim}")
    return array


def _encode(encoder: TwoTowerEncoder, who: str, group: _Group, dim: int, settings: ClipRetrievalSettings) -> np.ndarray:
    if group.kind == "text":
        out = encoder.encode_text(group.items, prompt_name=group.prompt_name, truncate_dim=dim, batch_size=settings.batch_size, max_length=settings.max_length)
    else:
        out = encoder.encode_image(group.items, truncate_dim=dim, batch_size=settings.batch_size)
    return _as_array(out, who, group, dim)


def _truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Truncate, then L2-normalise (a zero row stays zero)."""
    cut = vectors[:, :dim]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.where(norms == 0, 1.0, norms)


def _embed(encoder: TwoTowerEncoder, who: str, groups: list[_Group], dims: list[int], settings: ClipRetrievalSettings) -> dict[tuple[str, int], np.ndarray]:
    """Vectors per (group, dim): one encoding at ``dims[0]`` truncated, or one encoding per dim."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for group in groups:
        if settings.per_dim_encoding:
            for dim in dims:
                out[(group.name, dim)] = _encode(encoder, who, group, dim, settings)
        else:
            full = _encode(encoder, who, group, dims[0], settings)
            for dim in dims:
                out[(group.name, dim)] = full if dim == dims[0] else _truncate(full, dim)
        log.info("%s: embedded %d %s inputs (%s)", who, len(group.items), group.kind, group.name)
    return out


def _metrics(scores: np.ndarray, qrels: list[dict[int, float]], settings: ClipRetrievalSettings) -> dict[str, float]:
    out = retrieval_metrics(scores, qrels, ks=(settings.ndcg_k,))
    for k in settings.recall_ks:
        out[f"recall@{k}"] = float(np.nanmean(recall_at_k(scores, qrels, k)))
    return out


def _dims(reference: TwoTowerEncoder, settings: ClipRetrievalSettings) -> list[int]:
    if settings.dims is not None:
        return sorted(set(settings.dims), reverse=True)
    config = getattr(reference, "config", None)
    if config is None or not hasattr(config, "hidden_size") or not hasattr(config, "matryoshka_dims"):
        raise SettingsError("clip retrieval: the reference has no config.hidden_size / config.matryoshka_dims; pass settings.dims")
    return sorted({int(config.hidden_size), *(int(d) for d in config.matryoshka_dims)}, reverse=True)


def run_clip_retrieval(
    reference: TwoTowerEncoder,
    candidate: TwoTowerEncoder,
    settings: ClipRetrievalSettings = ClipRetrievalSettings(),
    text_set: RetrievalDataset | None = None,
    page_set: RetrievalDataset | None = None,
) -> ClipRetrievalReport:
    """Reference vs candidate on text->text, text->image and image->image at every dim (see the module docstring).

    ``text_set`` / ``page_set`` replace the built-ins (already cut to size;
    ``page_set`` must hold images); by default they are multilingual-names and
    pydoc-pages cut to ``settings``.
    """
    dims = _dims(reference, settings)
    text = text_set if text_set is not None else multilingual_names().subset(settings.text_queries, settings.text_docs)
    pages = page_set if page_set is not None else rendered_pages(max_pages=settings.pages, size=settings.page_size)
    if text.doc_kind != "text" or pages.doc_kind != "image":
        raise SettingsError(f"clip retrieval: {text.name} must hold texts and {pages.name} images, got {text.doc_kind} and {pages.doc_kind}")
    crops = crop_queries(pages.documents, settings.crop_fraction)
    groups = [
        _Group(f"{text.name} queries", "text", list(text.queries), "query"),
        _Group(f"{text.name} documents", "text", list(text.documents), "passage"),
        _Group(f"{pages.name} queries", "text", list(pages.queries), "query"),
        _Group(f"{pages.name} pages", "image", list(pages.documents)),
        _Group(f"{pages.name} crops", "image", crops),
    ]
    # image->image: crop of page i -> page i, whatever pydoc-pages' own qrels say (one page per query there too).
    page_qrels = [{i: 1.0} for i in range(len(pages.documents))]
    tasks = (
        ("text->text", text.name, groups[0], groups[1], text.qrels),
        ("text->image", pages.name, groups[2], groups[3], pages.qrels),
        ("image->image", f"{pages.name} crops", groups[4], groups[3], page_qrels),
    )
    log.info("clip retrieval at dims %s: %d text queries x %d documents, %d pages", dims, len(text.queries), len(text.documents), len(pages.documents))
    ref = _embed(reference, "reference", groups, dims, settings)
    cand = _embed(candidate, "candidate", groups, dims, settings)
    retrieval = []
    for direction, dataset, queries, documents, qrels in tasks:
        for dim in dims:
            scores = {who: vectors[(queries.name, dim)] @ vectors[(documents.name, dim)].T for who, vectors in (("reference", ref), ("candidate", cand))}
            retrieval.append(
                ClipRetrievalResult(
                    direction, dataset, dim, len(queries.items), len(documents.items),
                    _metrics(scores["reference"], qrels, settings), _metrics(scores["candidate"], qrels, settings),
                )
            )
    parity = []
    for group in groups:
        for dim in dims:
            a, b = ref[(group.name, dim)], cand[(group.name, dim)]
            cos = cosine_rows(a, b)
            parity.append(CosineParity(group.name, dim, len(cos), float(cos.min()), float(cos.mean()), max_abs(a, b)))
    checksums = {text.name: text.checksum(), pages.name: pages.checksum()}
    return ClipRetrievalReport(retrieval, parity, settings, checksums)
