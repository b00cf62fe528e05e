"""Two-tower retrieval evaluation (text->text, text->image, image->image) on the tiny jina-clip-v2 checkpoint."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jev4.datasets.multilingual_names import multilingual_names
from jev4.datasets.pydoc_pages import rendered_pages
from jev4.errors import EncodeError, SettingsError
from jev4.families.jina_clip_v2.encoder import ClipV2Encoder
from jev4.families.jina_clip_v2.tiny import write_tiny_checkpoint
from jev4.validate.clip_retrieval import DIRECTIONS, ClipRetrievalSettings, crop_queries, run_clip_retrieval

SETTINGS = ClipRetrievalSettings(text_queries=48, pages=16)
DIMS = [32, 16, 8]  # the tiny checkpoint: hidden 32, Matryoshka (8, 16, 32)
GROUPS = ["multilingual-names queries", "multilingual-names documents", "pydoc-pages queries", "pydoc-pages pages", "pydoc-pages crops"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def reference(clip_dir):
    return ClipV2Encoder.from_pretrained(clip_dir, dtype="fp32")


@pytest.fixture(scope="module")
def same(clip_dir, reference):
    """The reference against a second, separately loaded copy of itself."""
    return run_clip_retrieval(reference, ClipV2Encoder.from_pretrained(clip_dir, dtype="fp32"), SETTINGS)


class Noisy:
    """The reference's full-size vectors plus seeded Gaussian noise (std ``sigma`` per coordinate), re-normalised."""

    def __init__(self, inner, sigma, seed=0):
        self.inner, self.sigma = inner, sigma
        self.gen = torch.Generator().manual_seed(seed)

    def _noisy(self, vectors):
        return F.normalize(vectors + self.sigma * torch.randn(vectors.shape, generator=self.gen), dim=-1)

    def encode_text(self, texts, **kwargs):
        return self._noisy(self.inner.encode_text(texts, **kwargs))

    def encode_image(self, images, **kwargs):
        return self._noisy(self.inner.encode_image(images, **kwargs))


class Constant:
    """Every input gets the same unit vector: all scores tie, so a stable ranking is document index order."""

    def __init__(self, dim):
        self.vector = F.normalize(torch.arange(1.0, dim + 1), dim=0)

    def _rows(self, n, truncate_dim):
        return F.normalize(self.vector[:truncate_dim], dim=0).expand(n, -1).clone()

    def encode_text(self, texts, truncate_dim=None, **kwargs):
        return self._rows(len(texts), truncate_dim)

    def encode_image(self, images, truncate_dim=None, **kwargs):
        return self._rows(len(images), truncate_dim)


def test_shape_of_the_report(same):
    assert [(r.direction, r.dim) for r in same.retrieval] == [(d, dim) for d in DIRECTIONS for dim in DIMS]
    sizes = {r.direction: (r.dataset, r.queries, r.documents) for r in same.retrieval}
    assert sizes == {
        "text->text": ("multilingual-names", 48, 257),
        "text->image": ("pydoc-pages", 16, 16),
        "image->image": ("pydoc-pages crops", 16, 16),
    }
    assert [(p.inputs, p.dim) for p in same.parity] == [(g, dim) for g in GROUPS for dim in DIMS]
    assert {p.inputs: p.rows for p in same.parity} == dict(zip(GROUPS, [48, 257, 16, 16, 16]))
    for r in same.retrieval:
        assert set(r.reference) == {"ndcg@10", "recall@10", "mrr@10", "recall@1"}
        assert all(0.0 <= v <= 1.0 for v in r.reference.values())
    assert same.checksums == {
        "multilingual-names": multilingual_names().subset(48, None).checksum(),
        "pydoc-pages": rendered_pages(16).checksum(),
    }
    assert json.loads(json.dumps(same.to_dict()))["retrieval"][0]["delta"] == same.retrieval[0].delta


def test_reference_against_itself_is_exact(same):
    for r in same.retrieval:
        assert r.candidate == r.reference
        assert set(r.delta.values()) == {0.0}
    for p in same.parity:
        assert p.max_abs == 0.0
        assert p.min_cosine == pytest.approx(1.0, abs=1e-12) and p.mean_cosine == pytest.approx(1.0, abs=1e-12)


def test_reference_values_on_the_tiny_model(same):
    """Random weights retrieve little, but the image side is pinned (a change in pages, crops, metrics or the
    vision tower shows here). Text values are not: the tiny writer's trained tokenizer orders near-equal pieces
    differently from run to run, so token ids, and with them text vectors, change between checkpoints written anew."""
    ii = {dim: same.result("image->image", dim).reference for dim in DIMS}
    assert [ii[d]["recall@10"] for d in DIMS] == pytest.approx([8 / 16, 8 / 16, 8 / 16])
    assert [ii[d]["recall@1"] for d in DIMS] == pytest.approx([0, 0, 1 / 16])
    for direction, n in (("text->text", 48), ("text->image", 16)):
        for dim in DIMS:
            for k in ("recall@1", "recall@10"):
                value = same.result(direction, dim).reference[k] * n
                assert value == pytest.approx(round(value))  # a whole number of the n queries


def test_noisy_candidate_moves_metrics_and_cosine(reference, same):
    """Noise of std s per coordinate on a unit vector in d dims gives cosine ~ 1/sqrt(1 + d s^2), at every truncation."""
    sigma = 0.1
    noisy = run_clip_retrieval(reference, Noisy(reference, sigma), SETTINGS)
    expected = 1 / math.sqrt(1 + 32 * sigma**2)  # 0.870
    for p in noisy.parity:
        if p.dim == 32:  # truncated, a row keeps its own share of the norm, and the expectation depends on it
            assert p.mean_cosine == pytest.approx(expected, abs=0.06), p.inputs
        assert p.min_cosine < p.mean_cosine < 1.0 and p.max_abs > 0.05
    docs = next(p for p in noisy.parity if p.inputs == "multilingual-names documents" and p.dim == 32)
    assert docs.mean_cosine == pytest.approx(expected, abs=0.02)  # 257 rows: a tight mean
    for r in noisy.retrieval:
        assert r.reference == same.result(r.direction, r.dim).reference  # the reference side does not depend on the candidate
    moved = [r for r in noisy.retrieval if any(v != 0.0 for v in r.delta.values())]
    assert len(moved) >= 6  # of 9 direction x dim results
    assert noisy.result("text->text", 32).delta["ndcg@10"] != 0.0


def test_constant_candidate_ranks_by_index(reference):
    """Ties everywhere: query i's relevant document d ranks at d + 1, so every metric follows from the qrels alone."""
    report = run_clip_retrieval(reference, Constant(32), SETTINGS)
    ideal = sum(1 / math.log2(rank + 1) for rank in range(1, 11)) / 16
    for direction in ("text->image", "image->image"):
        for dim in DIMS:
            c = report.result(direction, dim).candidate
            assert c["recall@1"] == pytest.approx(1 / 16) and c["recall@10"] == pytest.approx(10 / 16)
            assert c["ndcg@10"] == pytest.approx(ideal) and c["mrr@10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / 16)
    relevant = [next(iter(q)) for q in multilingual_names().subset(48, None).qrels]
    c = report.result("text->text", 8).candidate
    assert c["recall@10"] == pytest.approx(np.mean([d < 10 for d in relevant]))
    assert c["recall@1"] == pytest.approx(np.mean([d == 0 for d in relevant]))
    assert all(p.min_cosine < 0.99 for p in report.parity)


def test_per_dim_encoding_matches_truncation(reference):
    """Asking the encoder for each dim gives what truncating the full vector gives (truncate, then normalise)."""
    from jev4.validate.clip_retrieval import _embed, _Group

    pages = rendered_pages(4).documents
    groups = [_Group("names", "text", ["Deutschland", "日本", "Россия"], "query"), _Group("pages", "image", pages)]
    derived = _embed(reference, "reference", groups, DIMS, ClipRetrievalSettings())
    asked = _embed(reference, "reference", groups, DIMS, ClipRetrievalSettings(per_dim_encoding=True))
    assert derived.keys() == asked.keys() == {(g, d) for g in ("names", "pages") for d in DIMS}
    for key in derived:
        np.testing.assert_allclose(asked[key], derived[key], atol=1e-6)  # equal up to float rounding (rankings may flip on exact near-ties)
    dims_only = run_clip_retrieval(reference, reference, ClipRetrievalSettings(text_queries=8, pages=4, dims=(16, 8)))
    assert sorted({r.dim for r in dims_only.retrieval}) == [8, 16]


def test_crop_queries():
    page = rendered_pages(1).documents[0]
    (crop,) = crop_queries([page], 0.75)
    assert crop.size == (336, 336)
    assert crop.tobytes() == page.crop((0, 0, 336, 336)).tobytes()


def test_bad_candidate_output_is_named(reference):
    class Short(Noisy):
        def encode_image(self, images, **kwargs):
            return super().encode_image(images, **kwargs)[:-1]

    with pytest.raises(EncodeError, match=re.escape("candidate: encode_image gave shape (3, 32) for pydoc-pages pages (4 inputs at dim 32), expected (4, 32)")):
        run_clip_retrieval(reference, Short(reference, 0.0), ClipRetrievalSettings(text_queries=4, pages=4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pages": 0}, "pages must be an integer >= 1, got 0"),
        ({"crop_fraction": 1.0}, "crop_fraction must be in [0.1, 1), got 1.0"),
        ({"recall_ks": ()}, "recall_ks must be integers >= 1, got ()"),
        ({"dims": (0,)}, "dims must be integers >= 1, got (0,)"),
    ],
)
def test_settings_are_checked(kwargs, message):
    with pytest.raises(SettingsError, match=re.escape(f"clip retrieval: {message}")):
        ClipRetrievalSettings(**kwargs)


def test_dims_needed_without_a_config(reference):
    with pytest.raises(SettingsError, match="pass settings.dims"):
        run_clip_retrieval(Constant(32), reference, ClipRetrievalSettings(text_queries=4, pages=2))
