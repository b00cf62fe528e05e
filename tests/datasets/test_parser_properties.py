"""Property-based tests (hypothesis) of the BEIR and STS readers: no input makes them fail with anything but one ``DatasetError`` line.

Inputs are drawn from a mix of valid records, near-valid ones (wrong types,
missing fields, unknown ids, NaN scores, extra tab fields) and arbitrary
text or bytes, so the readers see both the structure they parse and noise.
A valid directory must load with exactly the queries and judgements it holds.
"""

import json
import math

import pytest

pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install -e '.[dev]')")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jev4.datasets import load_sts_tsv  # noqa: E402
from jev4.datasets.containers import DatasetError  # noqa: E402
from jev4.datasets.files import load_beir  # noqa: E402

PROFILE = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

ids = st.sampled_from(["d1", "d2", "q1", "q2", "7", ""]) | st.text(max_size=4)
values = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=8) | st.lists(st.integers(), max_size=2)
record = st.fixed_dictionaries({}, optional={"_id": ids | values, "text": st.text(max_size=12) | values, "title": st.text(max_size=6) | values})
json_line = record.map(json.dumps) | st.text(max_size=20) | st.just("") | st.just("[1, 2]")
score = st.sampled_from(["1", "0", "-2", "2.5", "nan", "inf", "x", ""]) | st.floats(allow_nan=True).map(str)
qrels_line = st.tuples(ids, ids, score).map("\t".join) | st.text(max_size=20) | st.just("query-id\tcorpus-id\tscore")


def _write(root, corpus, queries, qrels, raw=None):
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("\n".join(corpus), encoding="utf-8", errors="surrogatepass")
    (root / "queries.jsonl").write_text("\n".join(queries), encoding="utf-8", errors="surrogatepass")
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels), encoding="utf-8", errors="surrogatepass")
    if raw is not None:
        (root / "corpus.jsonl").write_bytes(raw)


def _one_line_error(exc):
    message = str(exc)
    return isinstance(exc, DatasetError) and message and "\n" not in message


@PROFILE
@given(corpus=st.lists(json_line, max_size=5), queries=st.lists(json_line, max_size=4), qrels=st.lists(qrels_line, max_size=5), raw=st.none() | st.binary(max_size=30))
def test_beir_reader_loads_or_names_one_problem(tmp_path_factory, corpus, queries, qrels, raw):
    root = tmp_path_factory.mktemp("beir")
    _write(root, corpus, queries, qrels, raw)
    try:
        data = load_beir(root)
    except DatasetError as exc:
        assert _one_line_error(exc), repr(exc)
        return
    assert data.queries and len(data.queries) == len(data.qrels)
    for judged in data.qrels:
        assert judged and all(0 <= d < len(data.documents) and math.isfinite(s) and s > 0 for d, s in judged.items())


@PROFILE
@given(
    docs=st.lists(
        st.tuples(st.text("abcXYZ019-_.", min_size=1, max_size=5), st.text(max_size=10), st.text(max_size=4)), min_size=1, max_size=5, unique_by=lambda t: t[0]
    ),  # ids as BEIR sets write them (no tab or line break); texts and titles anything
    data=st.data(),
)
def test_a_valid_beir_directory_loads_exactly_what_it_holds(tmp_path_factory, docs, data):
    doc_ids = [d[0] for d in docs]
    judged = data.draw(st.lists(st.tuples(st.sampled_from(["q1", "q2"]), st.sampled_from(doc_ids), st.integers(-2, 3)), max_size=6))
    root = tmp_path_factory.mktemp("beir")
    corpus = [json.dumps({"_id": i, "title": title, "text": text}) for i, text, title in docs]
    queries = [json.dumps({"_id": q, "text": f"query {q}"}) for q in ("q1", "q2")]
    _write(root, corpus, queries, ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in judged])
    last = {}
    for q, d, s in judged:
        last[(q, d)] = s  # a repeated (query, doc) row overrides the earlier one
    expected = {q: {doc_ids.index(d): float(s) for (qq, d), s in last.items() if qq == q and s > 0} for q in ("q1", "q2")}
    expected = {q: j for q, j in expected.items() if j}
    if not expected:
        with pytest.raises(DatasetError, match="no query has a relevant document"):
            load_beir(root)
        return
    loaded = load_beir(root)
    assert loaded.queries == [f"query {q}" for q in expected] and loaded.qrels == list(expected.values())
    assert loaded.documents == [f"{title}\n{text}" if title.strip() else text for _, text, title in docs]


@PROFILE
@given(lines=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8), score).map("\t".join) | st.text(max_size=20), max_size=6))
def test_sts_reader_loads_or_names_one_problem(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("sts") / "pairs.tsv"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        data = load_sts_tsv(path)
    except DatasetError as exc:
        assert _one_line_error(exc), repr(exc)
        return
    assert len(data.pairs) == len(data.gold) and all(math.isfinite(g) for g in data.gold)
