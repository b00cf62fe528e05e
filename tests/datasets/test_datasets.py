"""jev4.datasets: BEIR and STS files, the built-in sets, subsets and checksums."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from jev4.errors import Jev4Error
from jev4.datasets import (
    BUILTIN,
    DatasetError,
    RetrievalDataset,
    load_beir,
    load_sts_tsv,
    rendered_pages,
    resolve_dataset,
    stdlib_code_search,
)

# --------------------------------------------------------------------------- BEIR


def _write_beir(root, corpus=None, queries=None, qrels=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    corpus = corpus or [
        {"_id": "d1", "title": "Llamas", "text": "The llama is a camelid."},
        {"_id": "d2", "title": "Rust", "text": "Rust is a systems language."},
        {"_id": "d3", "title": "Tea", "text": "Tea is brewed from leaves."},
    ]
    queries = queries or [
        {"_id": "q1", "text": "what is a llama?"},
        {"_id": "q2", "text": "how is tea made?"},
        {"_id": "q3", "text": "unjudged query"},
    ]
    qrels = qrels or "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td2\t0\n"
    (root / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def test_load_beir(tmp_path):
    data = load_beir(_write_beir(tmp_path / "mini"))
    assert data.name == "mini" and data.doc_kind == "text" and data.task == "retrieval"
    assert data.documents == ["Llamas\nThe llama is a camelid.", "Rust\nRust is a systems language.", "Tea\nTea is brewed from leaves."]
    # q2's only row has score 0 and q3 has none: both dropped
    assert data.queries == ["what is a llama?"]
    assert data.qrels == [{0: 2.0, 2: 1.0}]


def test_load_beir_without_title(tmp_path):
    corpus = [{"_id": "a", "title": "", "text": "plain"}, {"_id": "b", "text": "no title field"}]
    root = _write_beir(tmp_path / "b", corpus=corpus, queries=[{"_id": "q", "text": "x"}], qrels="query-id\tcorpus-id\tscore\nq\tb\t1\n")
    data = load_beir(root)
    assert data.documents == ["plain", "no title field"]
    assert data.qrels == [{1: 1.0}]


def test_load_beir_errors(tmp_path):
    root = _write_beir(tmp_path / "e")
    (root / "queries.jsonl").unlink()
    with pytest.raises(DatasetError, match=r"queries\.jsonl: file not found"):
        load_beir(root)
    with pytest.raises(DatasetError, match=r"train\.tsv: file not found"):
        load_beir(_write_beir(tmp_path / "s"), split="train")
    with pytest.raises(DatasetError, match="not a directory"):
        load_beir(tmp_path / "nowhere")

    bad = _write_beir(tmp_path / "j")
    (bad / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": broken}\n')
    with pytest.raises(DatasetError, match=r"corpus\.jsonl:2: bad JSON") as err:
        load_beir(bad)
    assert isinstance(err.value, Jev4Error)

    unknown_doc = _write_beir(tmp_path / "u", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n")
    with pytest.raises(DatasetError, match=r"test\.tsv:3: unknown corpus id 'd9'"):
        load_beir(unknown_doc)
    unknown_query = _write_beir(tmp_path / "v", qrels="query-id\tcorpus-id\tscore\nq7\td1\t1\n")
    with pytest.raises(DatasetError, match=r"test\.tsv:2: unknown query id 'q7'"):
        load_beir(unknown_query)
    bad_score = _write_beir(tmp_path / "w", qrels="query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    with pytest.raises(DatasetError, match=r"test\.tsv:2: score 'high'"):
        load_beir(bad_score)
    missing_field = _write_beir(tmp_path / "m", queries=[{"_id": "q1"}])
    with pytest.raises(DatasetError, match=r"queries\.jsonl:1: missing field 'text'"):
        load_beir(missing_field)


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "Infinity", "1e400"])
def test_non_finite_qrels_score_names_the_file_and_line(tmp_path, score):
    root = _write_beir(tmp_path / "n", qrels=f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td3\t{score}\n")
    message = f"{root / 'qrels' / 'test.tsv'}:3: score {score!r}: relevance must be a finite number"
    with pytest.raises(DatasetError, match="^" + re.escape(message)):
        load_beir(root)


def test_negative_qrels_scores_are_judged_not_relevant(tmp_path):
    """TREC-style grades below 0 (Touché 2020's -2: spam) are non-relevant judgments, like 0: dropped."""
    root = _write_beir(tmp_path / "neg", qrels="query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t-2\nq2\td2\t-1\n")
    data = load_beir(root)
    assert data.queries == ["what is a llama?"] and data.qrels == [{0: 2.0}]


# --------------------------------------------------------------------------- STS


def test_load_sts(tmp_path):
    path = tmp_path / "sts-mini.tsv"
    path.write_text('sentence1\tsentence2\tscore\nA man plays "guitar".\tA man plays an instrument.\t4.2\nA cat.\tThe stock market.\t0\n')
    data = load_sts_tsv(path)
    assert data.name == "sts-mini"
    assert data.pairs == [('A man plays "guitar".', "A man plays an instrument."), ("A cat.", "The stock market.")]
    assert data.gold == [4.2, 0.0]


def test_load_sts_errors(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_sts_tsv(tmp_path / "none.tsv")
    bad_header = tmp_path / "h.tsv"
    bad_header.write_text("a\tb\tc\nx\ty\t1\n")
    with pytest.raises(DatasetError, match=r"h\.tsv:1: header"):
        load_sts_tsv(bad_header)
    bad_score = tmp_path / "s.tsv"
    bad_score.write_text("sentence1\tsentence2\tscore\nx\ty\t1\nx\ty\tn/a\n")
    with pytest.raises(DatasetError, match=r"s\.tsv:3: score 'n/a'"):
        load_sts_tsv(bad_score)


@pytest.mark.parametrize("score", ["nan", "inf", "-Infinity"])
def test_sts_non_finite_score_names_the_line(tmp_path, score):
    path = tmp_path / "sts.tsv"
    path.write_text(f"sentence1\tsentence2\tscore\na\tb\t1\nc\td\t2\ne\tf\t{score}\n")
    with pytest.raises(DatasetError, match="^" + re.escape(f"{path}:4: score {score!r}: the gold score must be a finite number")):
        load_sts_tsv(path)


def test_sts_all_gold_scores_equal(tmp_path):
    path = tmp_path / "flat.tsv"
    path.write_text("sentence1\tsentence2\tscore\na\tb\t3\nc\td\t3.0\ne\tf\t3\n")
    message = f"{path}: all 3 gold scores are equal (3); Spearman correlation is undefined"
    with pytest.raises(DatasetError, match="^" + re.escape(message)):
        load_sts_tsv(path)


# --------------------------------------------------------------------------- subset, checksum, resolve


def _toy(n_q=10, n_d=40):
    return RetrievalDataset(
        name="toy",
        queries=[f"q{i}" for i in range(n_q)],
        documents=[f"doc {i}" for i in range(n_d)],
        doc_kind="text",
        qrels=[{i: 1.0, (i + 20) % n_d: 2.0} for i in range(n_q)],
        task="retrieval",
    )


def test_subset_keeps_relevant_docs_and_remaps():
    data = _toy()
    sub = data.subset(3, 8)
    assert sub.queries == ["q0", "q3", "q6"]  # evenly spread: floor(i * 10 / 3)
    assert len(sub.documents) == 8
    for q, judged in zip(sub.queries, sub.qrels):
        i = int(q[1:])
        assert {sub.documents[d]: r for d, r in judged.items()} == {f"doc {i}": 1.0, f"doc {i + 20}": 2.0}
    indices = [int(d.split()[1]) for d in sub.documents]
    assert indices == sorted(indices)  # original order kept
    assert sub.checksum() == data.subset(3, 8).checksum()  # deterministic
    assert data.subset(None, None) is data
    # relevant documents are never dropped, even past max_docs
    assert len(data.subset(5, 2).documents) == 10
    with pytest.raises(DatasetError):
        data.subset(0, 10)


def test_checksum_changes_with_content():
    data = _toy()
    base = data.checksum()
    assert len(base) == 64 and base == _toy().checksum()
    changed = RetrievalDataset(data.name, data.queries, ["x", *data.documents[1:]], "text", data.qrels)
    assert changed.checksum() != base
    regraded = RetrievalDataset(data.name, data.queries, data.documents, "text", [{0: 2.0, 20: 2.0}, *data.qrels[1:]])
    assert regraded.checksum() != base
    white = Image.new("RGB", (8, 8), "white")
    dotted = white.copy()
    dotted.putpixel((3, 3), (0, 0, 0))
    img = RetrievalDataset("i", ["q"], [white], "image", [{0: 1.0}])
    assert img.checksum() == RetrievalDataset("i", ["q"], [white.copy()], "image", [{0: 1.0}]).checksum()
    assert img.checksum() != RetrievalDataset("i", ["q"], [dotted], "image", [{0: 1.0}]).checksum()


def test_dataset_validates_qrels():
    with pytest.raises(DatasetError, match="document 5"):
        RetrievalDataset("bad", ["q"], ["d"], "text", [{5: 1.0}])


def test_resolve_dataset(tmp_path):
    with pytest.raises(DatasetError, match="pydoc-pages, stdlib-code"):
        resolve_dataset("no-such-set")
    data = resolve_dataset(str(_write_beir(tmp_path / "r")), max_queries=1, max_docs=2)
    assert data.queries == ["what is a llama?"] and len(data.documents) == 2
    assert set(BUILTIN) == {"stdlib-code", "pydoc-pages", "multilingual-names"}


# --------------------------------------------------------------------------- built-in: stdlib-code


@pytest.fixture(scope="module")
def code_sets():
    return stdlib_code_search(), stdlib_code_search()


def test_code_search_stable(code_sets):
    first, second = code_sets
    assert first.name == "stdlib-code" and first.task == "code" and first.doc_kind == "text"
    assert len(first.queries) == len(second.queries) == len(first.documents) == 3000
    assert first.checksum() == second.checksum()
    assert first.qrels == [{i: 1.0} for i in range(3000)]


def test_code_search_pairs(code_sets):
    data = code_sets[0]
    assert len(set(data.queries)) == len(data.queries)
    assert len(set(data.documents)) == len(data.documents)
    for query, doc in zip(data.queries, data.documents):
        assert len(query.split()) >= 4
        assert query not in doc
        assert doc.lstrip().startswith(("def ", "async def ")), doc[:80]
        assert sum(1 for line in doc.splitlines() if line.strip()) >= 2


def test_code_search_known_function(code_sets):
    data = code_sets[0]
    index = data.queries.index("Serialize ``obj`` to a JSON formatted ``str``.")  # json.dumps
    doc = data.documents[index]
    assert doc.startswith("def dumps(obj, *, skipkeys=False")
    assert "Serialize" not in doc and "_default_encoder.encode(obj)" in doc


def test_code_search_small_and_subset(code_sets):
    small = stdlib_code_search(max_pairs=25)
    assert small.queries == code_sets[0].queries[:25]  # the first pairs in (path, line) order
    sub = code_sets[0].subset(50, 200)
    assert len(sub.queries) == 50 and len(sub.documents) == 200
    for q, judged in zip(sub.queries, sub.qrels):
        (d,) = judged
        assert sub.documents[d] == code_sets[0].documents[code_sets[0].queries.index(q)]


# --------------------------------------------------------------------------- built-in: pydoc-pages


@pytest.fixture(scope="module")
def pages():
    return rendered_pages(), rendered_pages()


def test_rendered_pages(pages):
    from pydoc_data.topics import topics

    data, again = pages
    eligible = sum(len(text.strip()) >= 200 for text in topics.values())
    assert len(data.queries) == len(data.documents) == min(300, eligible) > 50
    assert data.name == "pydoc-pages" and data.doc_kind == "image" and data.task == "retrieval"
    assert "Python documentation: assert" in data.queries
    for image in data.documents:
        assert image.mode == "RGB" and image.size == (448, 448)
        assert np.asarray(image).std() > 0
    assert [a.tobytes() for a in data.documents] == [b.tobytes() for b in again.documents]
    assert data.checksum() == again.checksum()


def test_rendered_pages_options():
    data = rendered_pages(max_pages=4, size=(224, 320))
    assert len(data.documents) == 4 and data.qrels == [{i: 1.0} for i in range(4)]
    assert all(image.size == (224, 320) and image.mode == "RGB" for image in data.documents)
    big = rendered_pages(max_pages=1, size=(896, 896))
    assert big.documents[0].size == (896, 896) and np.asarray(big.documents[0]).std() > 0
