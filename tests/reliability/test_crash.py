"""Runs stopped by a signal (SIGTERM, SIGHUP, Ctrl-C) or killed (kill -9) at real points of a merge, an ONNX export and a validation.

A handled signal must leave nothing behind: no temp dir, no lock, OUT as it
was, exit 128 + the signal. kill -9 cannot be handled: its temp dir stays,
is refused by ``jev4.runtime.load`` and ``jev4 encode``, and the next run to
the same OUT removes it (one log line) and publishes a complete artifact.

The CI set is a short loop; the full loop (every signal at every point) is
marked ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import signal

import pytest

from jev4.export.manifest import verify_manifest
from harness import (
    SIGHUP,
    SIGKILL,
    SIGTERM,
    command,
    run,
    run_and_stop,
    temp_dir,
    temp_entries,
    when_growing,
    when_locked,
    when_temp_dir,
)
from conftest import tree_digest

SIGINT = signal.SIGINT


def _merge(mid, out, *extra):
    return command("jev4-export", "--model", mid, "--adapter", "retrieval", "--dtype", "fp32", "--out", out, "--no-progress", *extra)


def _onnx(mid, out, *extra):
    return command("jev4-export", "--model", mid, "--adapter", "retrieval", "--format", "onnx", "--out", out, "--no-progress", *extra)


# (name, command builder, stop point builder, marks)
POINTS = {
    "merge-loading": (_merge, when_locked),
    "merge-temp-created": (_merge, when_temp_dir),
    "merge-writing-weights": (_merge, lambda out: when_growing(out, "model.safetensors", 1 << 20)),
    "onnx-tracing": (_onnx, when_locked),
    "onnx-writing-language": (_onnx, lambda out: when_growing(out, "language.onnx.data", 1 << 20)),
    "onnx-exporting-vision": (_onnx, lambda out: when_growing(out, "language.onnx", 1)),
}
CI_CASES = {("merge-writing-weights", SIGTERM), ("merge-writing-weights", SIGKILL), ("onnx-writing-language", SIGKILL)}
SIGNALS = {SIGTERM: "SIGTERM", SIGHUP: "SIGHUP", SIGINT: "SIGINT", SIGKILL: "SIGKILL"}


def _cases():
    for point in POINTS:
        for sig in SIGNALS:
            marks = () if (point, sig) in CI_CASES else (pytest.mark.slow,)
            yield pytest.param(point, sig, id=f"{point}-{SIGNALS[sig]}", marks=marks)


def _assert_handled(result, sig, out):
    """A handled signal: exit 128+n, one line saying what happened, nothing left beside OUT."""
    assert result.code == 128 + sig, result.stderr
    line = result.one_error()
    assert ("Ctrl-C" if sig == SIGINT else SIGNALS[sig]) in line and "removed" in line
    assert temp_entries(out) == []


@pytest.mark.parametrize("point, sig", list(_cases()))
def test_stopped_run_leaves_nothing_and_reruns(mid, tmp_path, point, sig):
    build, when = POINTS[point]
    out = tmp_path / "out"
    result = run_and_stop(build(mid, out), when(out), sig)
    if sig == SIGKILL:
        assert result.code == -9
        leftover = temp_dir(out)
        if leftover is not None:  # killed after the temp dir appeared: it stays, and nothing may use it
            # Written in another directory: a claim beside the leftover would sweep it as a dead sibling (jev4.atomic.remove_dead_siblings).
            elsewhere = tmp_path / "elsewhere" / "e.npz"
            refused = run(command("jev4", "encode", "--model", leftover, "--text", "x", "--out", elsewhere))
            assert refused.code == 2 and "unfinished jev4 output" in refused.one_error()
            assert not elsewhere.exists() and leftover.exists()
    else:
        _assert_handled(result, sig, out)
    assert not out.exists()
    rerun = run(build(mid, out))
    assert rerun.code == 0, rerun.stderr
    if sig == SIGKILL and leftover is not None:
        removed = [line for line in rerun.stderr.splitlines() if "unfinished output" in line]
        assert len(removed) == 1 and leftover.name in removed[0]
    verify_manifest(out)
    assert temp_entries(out) == []


@pytest.mark.parametrize("sig", [SIGKILL, pytest.param(SIGTERM, marks=pytest.mark.slow)], ids=["SIGKILL", "SIGTERM"])
def test_forced_replacement_stopped_keeps_the_old_artifact(mid, tmp_path, sig):
    out = tmp_path / "out"
    assert run(_merge(mid, out)).code == 0
    before = tree_digest(out)
    result = run_and_stop(_merge(mid, out, "--force"), when_growing(out, "model.safetensors", 1 << 20), sig)
    assert result.code in (-9, 128 + sig)
    assert tree_digest(out) == before
    verify_manifest(out)


@pytest.mark.slow
def test_validate_stopped(tiny, onnx_artifact, tmp_path):
    out = tmp_path / "report"
    cmd = command("jev4", "validate", "--reference", tiny, "--adapter", "retrieval", "--artifact", onnx_artifact, "--out", out, "--no-progress")
    _assert_handled(run_and_stop(cmd, when_locked(out), SIGTERM), SIGTERM, out)
    assert not out.exists()
