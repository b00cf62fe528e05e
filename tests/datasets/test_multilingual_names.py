"""The built-in multilingual-names set: CLDR territory names (babel) -> English names, checksum verified."""

import importlib
import re
import unicodedata

import pytest

from jev4.datasets import DatasetError, RetrievalDataset
from jev4.datasets.multilingual_names import EXPECTED_SHA256, LANGUAGES, build_multilingual_names, multilingual_names

# The package re-exports the function under the module's own name, so ``from jev4.datasets import multilingual_names``
# gives the function; monkeypatching needs the module itself.
mn = importlib.import_module("jev4.datasets.multilingual_names")


@pytest.fixture(scope="module")
def data() -> RetrievalDataset:
    return multilingual_names()


def test_sizes_and_checksum(data):
    assert data.name == "multilingual-names" and data.doc_kind == "text" and data.task == "retrieval"
    assert len(data.documents) == 257  # two-letter CLDR territories minus EU, EZ, QO, UN, XA, XB, ZZ
    assert len(data.queries) == 3648
    assert data.checksum() == EXPECTED_SHA256 == "b482bc8cb97e46593de2f56cdec7b2a113bb56fd2d2d91c3bfac4edabb2948e7"
    assert "3648 queries, 257 documents" in data.description and "babel 2.19.0" in data.description


def test_known_pairs(data):
    germany = data.documents.index("Germany")
    japan = data.documents.index("Japan")
    for name in ("Deutschland", "ألمانيا", "Германия", "독일", "德国", "ドイツ"):
        assert data.qrels[data.queries.index(name)] == {germany: 1.0}
    assert data.qrels[data.queries.index("Japon")] == {japan: 1.0}
    assert "Japan" not in data.queries  # German "Japan" equals the English name: dropped


def test_every_query_crosses_a_language(data):
    assert len(set(data.queries)) == len(data.queries)
    for query, judged in zip(data.queries, data.qrels):
        (doc,) = judged
        assert query.casefold() != data.documents[doc].casefold()
    english = __import__("babel").Locale("en").territories
    codes = sorted(c for c in english if len(c) == 2 and c.isalpha() and c not in mn.NOT_TERRITORIES)
    assert data.documents == [english[c] for c in codes]  # territory code order
    assert len(set(data.documents)) == len(data.documents)


def test_many_scripts(data):
    """At least 10 scripts among the queries (first word of each character's Unicode name)."""
    scripts = {unicodedata.name(ch).split()[0] for q in data.queries for ch in q if ch.isalpha()}
    assert {"ARABIC", "BENGALI", "LATIN", "GREEK", "HEBREW", "DEVANAGARI", "HANGUL", "CYRILLIC", "THAI", "CJK", "KATAKANA"} <= scripts
    assert len(LANGUAGES) == 16


def test_deterministic_and_language_major(data):
    again = build_multilingual_names()
    assert again.queries == data.queries and again.qrels == data.qrels and again.documents == data.documents
    only_de = build_multilingual_names(("de",))
    assert only_de.documents == data.documents
    start = len(build_multilingual_names(LANGUAGES[: LANGUAGES.index("de")]).queries)
    assert data.queries[start : start + len(only_de.queries)] == only_de.queries


def test_subset_spreads_over_languages(data):
    small = data.subset(32, None)
    assert len(small.queries) == 32 and len(small.documents) == 257
    assert small.queries[0] == data.queries[0] and small.queries[-1] == data.queries[(31 * 3648) // 32]


def test_changed_data_names_both_checksums(monkeypatch):
    real = build_multilingual_names

    def changed(languages):
        built = real(languages)
        return RetrievalDataset(built.name, built.queries[:-1], built.documents, "text", built.qrels[:-1], built.task)

    monkeypatch.setattr(mn, "build_multilingual_names", changed)
    with pytest.raises(DatasetError) as err:
        multilingual_names()
    message = str(err.value)
    found = re.search(r"has sha256 ([0-9a-f]{64}), expected ([0-9a-f]{64})", message)
    assert found and found.group(1) != EXPECTED_SHA256 and found.group(2) == EXPECTED_SHA256
    assert message.startswith("multilingual-names: the set built from babel 2.19.0 has sha256 ")
    assert message.endswith("(recorded with babel 2.19.0); install babel==2.19.0")


def test_unknown_language_is_named():
    with pytest.raises(DatasetError, match=re.escape("multilingual-names: babel has no locale 'xx_QQ'")):
        build_multilingual_names(("xx_QQ",))
