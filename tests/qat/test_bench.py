"""``jev4 bench qat`` on the tiny model on CPU (a smoke run: the figures that matter come from a GPU)."""

import json
import time

from jev4.cli.main import main as jev4_main


def test_bench_qat_reports_speed_and_memory_per_batch(tiny_dir, tmp_path, capsys):
    results = tmp_path / "qat-bench.json"
    argv = ["bench", "qat", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--batches", "2,4"]
    argv += ["--max-length", "32", "--steps", "2", "--warmup", "1", "--data-size", "40", "--results", str(results)]
    started = time.perf_counter()
    assert jev4_main(argv) == 0
    wall = time.perf_counter() - started
    report = json.loads(results.read_text())
    points = report["points"]
    assert [p["batch"] for p in points] == [2, 4] and all(p["error"] is None for p in points)
    for p in points:
        assert p["steps_per_s"] > 0 and p["peak_mem_gib"] > 0.05
        # Checked against the clock of this test and the shape of the data, not re-derived the way the bench derives them:
        assert 2 * p["batch"] / p["pairs_per_s"] < wall  # the 2 timed steps of this batch fit inside the whole run
        assert 2 * p["pairs_per_s"] < p["tokens_per_s"] <= 3 * 32 * p["pairs_per_s"]  # a pair is 2-3 texts of 2..32 tokens
    assert report["settings"]["gradient_checkpointing"] is True and report["settings"]["precision"] == "binary"
    assert "pairs/s" in capsys.readouterr().out
