"""The pre-pass over a corpus: every bad record named by file and line, duplicates, the shard plan, the checksum (no model)."""

import json

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from jev4.datasets.containers import DatasetError  # noqa: E402
from jev4.encode import corpus as corpus_mod  # noqa: E402
from jev4.encode.corpus import read_shard, scan_corpus  # noqa: E402


def _jsonl(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


def _rec(i, text=None):
    return json.dumps({"id": f"d{i}", "text": text if text is not None else f"text number {i}"})


def test_plan_cuts_shards_by_records_names_them_by_lines_and_reads_them_back(tmp_path):
    lines = [_rec(0), "", _rec(1), _rec(2), "   ", _rec(3), _rec(4), ""]
    path = _jsonl(tmp_path / "c.jsonl", lines)
    scan = scan_corpus(path, shard_size=2)
    assert scan.records == 5
    assert [(s.start, s.end, s.records) for s in scan.shards] == [(0, 3, 2), (3, 6, 2), (6, 7, 1)]
    assert [s.name for s in scan.shards] == [
        "part-00000-000000000000-000000000003.parquet",
        "part-00000-000000000003-000000000006.parquet",
        "part-00000-000000000006-000000000007.parquet",
    ]
    got = [read_shard(scan.sources[0], s) for s in scan.shards]
    assert [ids for ids, _ in got] == [["d0", "d1"], ["d2", "d3"], ["d4"]]
    assert got[1][1] == ["text number 2", "text number 3"]


def test_a_byte_order_mark_is_allowed(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_rec(0) + "\n" + _rec(1) + "\n").encode())
    scan = scan_corpus(path, shard_size=10)
    assert read_shard(scan.sources[0], scan.shards[0]) == (["d0", "d1"], ["text number 0", "text number 1"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"id": "x", "text": "unterminated', "not valid JSON"),
        ('["id", "text"]', "expected a JSON object, got list"),
        ('{"text": "no id"}', 'no "id" field'),
        ('{"id": 17, "text": "t"}', '"id" must be a string, got int 17 (write it as a JSON string)'),
        ('{"id": "", "text": "t"}', '"id" is empty'),
        ('{"id": "x"}', "no \"text\" field (id 'x')"),
        ('{"id": "x", "text": null}', '"text" must be a string, got NoneType'),
        ('{"id": "x", "text": "\\ud800"}', "lone surrogate"),
        (b'{"id": "x", "text": "\xff"}\n', "not valid UTF-8"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, bad, message):
    path = _jsonl(tmp_path / "corpus.jsonl", [_rec(0), _rec(1), bad, _rec(3)])
    with pytest.raises(DatasetError) as err:
        scan_corpus(path, shard_size=10)
    text = str(err.value)
    assert text.startswith(f"{path} line 3: ") and message in text and "\n" not in text


def test_a_duplicate_id_names_both_lines(tmp_path):
    path = _jsonl(tmp_path / "corpus.jsonl", [_rec(0), _rec(1), _rec(2), _rec(1, "again")])
    with pytest.raises(DatasetError, match=rf"^{path} line 4: duplicate id 'd1' \(first at {path} line 2\)"):
        scan_corpus(path, shard_size=10)


def test_colliding_id_hashes_are_checked_against_the_ids(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "corpus.jsonl", [_rec(i) for i in range(5)])
    monkeypatch.setattr(corpus_mod, "hash", lambda text: 42, raising=False)  # every id collides; none is a duplicate
    assert scan_corpus(path, shard_size=2).records == 5
    _jsonl(path, [_rec(i) for i in range(5)] + [_rec(3)])
    with pytest.raises(DatasetError, match="line 6: duplicate id 'd3' .*line 4"):
        scan_corpus(path, shard_size=2)


def test_an_empty_corpus_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="holds no records"):
        scan_corpus(_jsonl(tmp_path / "c.jsonl", ["", "  "]), shard_size=2)
    with pytest.raises(DatasetError, match="no such file"):
        scan_corpus(tmp_path / "missing.jsonl", shard_size=2)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(DatasetError, match="no .jsonl or .parquet files"):
        scan_corpus(tmp_path / "empty-dir", shard_size=2)


def test_the_checksum_follows_the_content_not_the_file_name(tmp_path):
    a = scan_corpus(_jsonl(tmp_path / "a.jsonl", [_rec(0), _rec(1)]), shard_size=2).checksum
    b = scan_corpus(_jsonl(tmp_path / "b.jsonl", [_rec(0), _rec(1)]), shard_size=2).checksum
    c = scan_corpus(_jsonl(tmp_path / "c.jsonl", [_rec(0), _rec(1, "changed")]), shard_size=2).checksum
    assert a == b != c


def _parquet(path, ids, texts, **types):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(ids, types.get("id", pa.string())), "text": pa.array(texts, types.get("text", pa.string()))})
    pq.write_table(table, path, row_group_size=3)
    return path


def test_a_parquet_directory_is_one_corpus_in_path_order(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    _parquet(root / "b.parquet", [f"b{i}" for i in range(7)], [f"bee {i}" for i in range(7)])
    _parquet(root / "sub" / "a.parquet", ["a0", "a1"], ["ay 0", "ay 1"])
    (root / "_SUCCESS").write_text("")
    _parquet(root / ".hidden.parquet", ["h"], ["hidden"])
    scan = scan_corpus(root, shard_size=4)
    assert [s.label for s in scan.sources] == [str(root / "b.parquet"), str(root / "sub" / "a.parquet")]
    assert [s.name for s in scan.shards] == [
        "part-00000-000000000000-000000000004.parquet",
        "part-00000-000000000004-000000000007.parquet",
        "part-00001-000000000000-000000000002.parquet",
    ]
    ids = [read_shard(scan.sources[s.source], s)[0] for s in scan.shards]
    assert ids == [["b0", "b1", "b2", "b3"], ["b4", "b5", "b6"], ["a0", "a1"]]  # row ranges across row groups of 3


def test_parquet_problems_name_the_file_and_row(tmp_path):
    import pyarrow as pa

    path = _parquet(tmp_path / "c.parquet", ["a", None, "c"], ["x", "y", "z"])
    with pytest.raises(DatasetError, match=rf'^{path} row 1: "id" is null'):
        scan_corpus(path, shard_size=2)
    path = _parquet(tmp_path / "d.parquet", ["a", "b", "a"], ["x", "y", "z"])
    with pytest.raises(DatasetError, match=rf"^{path} row 2: duplicate id 'a' \(first at {path} row 0\)"):
        scan_corpus(path, shard_size=2)
    path = _parquet(tmp_path / "e.parquet", [1, 2], ["x", "y"], id=pa.int64())
    with pytest.raises(DatasetError, match="column 'id' is int64, expected string"):
        scan_corpus(path, shard_size=2)
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "f.parquet")
    with pytest.raises(DatasetError, match="no column 'text' \\(columns: id, body\\)"):
        scan_corpus(tmp_path / "f.parquet", shard_size=2)


def test_id_hashes_cost_eight_bytes_per_id():
    hashes = corpus_mod._IdHashes()
    for i in range(70_000):
        hashes.add(f"id-{i}")
    hashes._flush()
    assert sum(chunk.nbytes for chunk in hashes._chunks) == 8 * 70_000
    assert all(chunk.dtype == np.int64 for chunk in hashes._chunks)
    assert hashes.colliding() == set()


def test_the_scan_holds_no_text_so_memory_stays_flat(tmp_path):
    """Peak Python memory of the pre-pass over 20k and 80k records of 1 kB: the texts (20 / 80 MB) are never held."""
    import tracemalloc

    text = "x" * 1000
    peaks = {}
    for n in (20_000, 80_000):
        path = tmp_path / f"c{n}.jsonl"
        with path.open("w") as fh:
            for i in range(n):
                fh.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
        tracemalloc.start()
        scan = scan_corpus(path, shard_size=1000)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert scan.records == n and len(scan.shards) == n // 1000
    growth = (peaks[80_000] - peaks[20_000]) / 60_000
    assert growth < 64, f"{growth:.0f} bytes per extra record"  # the id hashes (8 B, 16 B while sorted) and the shard plan
    assert peaks[80_000] < 8e6, peaks
