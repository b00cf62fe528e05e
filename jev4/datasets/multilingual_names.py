"""The built-in ``multilingual-names`` set: a territory's name in one of 16 languages -> its English name.

Made offline from the CLDR data that ``babel`` ships (``babel.Locale(lang).
territories``), so a multilingual text->text retrieval check needs no
download. CLDR names are curated translations, not machine output, and the
relevance judgement is exact (same territory code), which is why they make
a fair cross-lingual test. The set depends on babel's CLDR release, so the
builder checks the built set against a recorded SHA-256
(:data:`EXPECTED_SHA256`): another babel that changes a single name is an
error naming both checksums, never a silently different benchmark.

babel reads its locale data with its own loader (pickled files inside the
installed package, the same trust as its code); jev4 unpickles nothing.
"""

from __future__ import annotations

import logging

from jev4.datasets.containers import DatasetError, RetrievalDataset

log = logging.getLogger(__name__)

__all__ = ["BABEL_VERSION", "EXPECTED_SHA256", "LANGUAGES", "NAME", "build_multilingual_names", "multilingual_names"]

NAME = "multilingual-names"
# The babel release the checksum was recorded with (pyproject.toml pins it); it ships CLDR 49.
BABEL_VERSION = "2.19.0"
# RetrievalDataset.checksum() of the set built from babel 2.19.0 with LANGUAGES below.
EXPECTED_SHA256 = "b482bc8cb97e46593de2f56cdec7b2a113bb56fd2d2d91c3bfac4edabb2948e7"
# 16 languages in 11 scripts: Arabic (ar, fa), Bengali, Latin (de, es, fr, pt, tr), Greek, Hebrew,
# Devanagari, Japanese, Hangul, Cyrillic, Thai, Han. Queries come in this order, language by language.
LANGUAGES: tuple[str, ...] = ("ar", "bn", "de", "el", "es", "fa", "fr", "he", "hi", "ja", "ko", "pt", "ru", "th", "tr", "zh")
# CLDR codes with a two-letter name that are not territories (unions, pseudo-locales, "Unknown Region", ...).
NOT_TERRITORIES = frozenset({"EU", "EZ", "QO", "UN", "XA", "XB", "ZZ"})


def _babel():
    try:
        import babel
    except ImportError as exc:
        raise DatasetError(f"{NAME}: needs babel (pip install babel=={BABEL_VERSION}): {exc}") from exc
    return babel


def build_multilingual_names(languages: tuple[str, ...] = LANGUAGES) -> RetrievalDataset:
    """Build the set from the installed babel, without checking its checksum (see :func:`multilingual_names`).

    Documents: one per territory (CLDR codes of two letters, minus
    ``NOT_TERRITORIES``), its English name, sorted by code. Queries: for each
    language in ``languages`` order, for each territory in code order, the
    territory's name in that language; a name equal to the English one
    (case-folded: "Japan" in German) is dropped, so every query must cross a
    language (or script) to find its document, and a query text that
    appeared already (the same spelling in an earlier language) is dropped
    too. One relevant document (relevance 1) per query; task ``retrieval``.
    """
    babel = _babel()
    english = babel.Locale("en").territories
    codes = sorted(c for c in english if len(c) == 2 and c.isalpha() and c not in NOT_TERRITORIES)
    doc_index = {code: i for i, code in enumerate(codes)}
    queries: list[str] = []
    qrels: list[dict[int, float]] = []
    seen: set[str] = set()
    per_language: dict[str, int] = {}
    for language in languages:
        try:
            names = babel.Locale.parse(language).territories
        except (ValueError, babel.UnknownLocaleError) as exc:
            raise DatasetError(f"{NAME}: babel has no locale {language!r} ({exc})") from exc
        kept = 0
        for code in codes:
            name = names.get(code)
            if not name or name.casefold() == english[code].casefold() or name in seen:
                continue
            seen.add(name)
            queries.append(name)
            qrels.append({doc_index[code]: 1.0})
            kept += 1
        per_language[language] = kept
    log.debug("%s: queries per language %s", NAME, per_language)
    cldr = babel.core.get_cldr_version() if hasattr(babel.core, "get_cldr_version") else "?"
    return RetrievalDataset(
        name=NAME,
        queries=queries,
        documents=[english[code] for code in codes],
        doc_kind="text",
        qrels=qrels,
        task="retrieval",
        description=(
            f"CLDR {cldr} territory names (babel {babel.__version__}) in {len(languages)} languages "
            f"({', '.join(languages)}) -> the English name; {len(queries)} queries, {len(codes)} documents"
        ),
    )


def multilingual_names() -> RetrievalDataset:
    """Built-in ``multilingual-names``: :func:`build_multilingual_names` with the default languages, checksum verified.

    Raises :class:`DatasetError` naming the expected and the found SHA-256
    when the installed babel gives another set (another CLDR release).
    """
    data = build_multilingual_names(LANGUAGES)
    found = data.checksum()
    if found != EXPECTED_SHA256:
        raise DatasetError(
            f"{NAME}: the set built from babel {_babel().__version__} has sha256 {found}, expected {EXPECTED_SHA256} "
            f"(recorded with babel {BABEL_VERSION}); install babel=={BABEL_VERSION}"
        )
    return data
