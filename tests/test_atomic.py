"""jev4.atomic: publication with and without renameat2, re-entrant claims, stale outputs, temp-dir refusal."""

from __future__ import annotations

import os

import pytest

from jev4 import atomic
from jev4.atomic import TEMP_MARKER, atomic_output_dir, atomic_output_file, check_not_temp_dir, claim_output, remove_stale
from jev4.errors import Jev4Error, OutputExistsError


def _debris(out):
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


@pytest.fixture(params=["renameat2", "fallback"])
def publication(request, monkeypatch):
    """Every test runs with the kernel's renameat2 and with the check-then-rename fallback (other systems)."""
    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)
    return request.param


def test_publish_new_and_forced_replacement(tmp_path, publication):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert (tmp / TEMP_MARKER).is_file()  # the owner marker, while writing
        (tmp / "a").write_text("1")
    assert sorted(os.listdir(out)) == ["a"]  # the marker is not published
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(out)) == ["b"]
    assert _debris(out) == []


def test_failure_keeps_the_previous_output(tmp_path, publication):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == ["a"] and _debris(out) == []


def test_file_outputs(tmp_path, publication):
    out = tmp_path / "emb.npz"
    with atomic_output_file(out) as tmp:
        tmp.write_bytes(b"one")
    with atomic_output_file(out, force=True) as tmp:
        tmp.write_bytes(b"two")
    assert out.read_bytes() == b"two" and _debris(out) == []
    with pytest.raises(Jev4Error, match="produced no file"):
        with atomic_output_file(tmp_path / "none"):
            pass
    assert not (tmp_path / "none").exists()


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "f").stat().st_mode & 0o777 == 0o644


def test_claims_are_reentrant_within_a_process(tmp_path):
    out = tmp_path / "out"
    with claim_output(out):
        with atomic_output_dir(out) as tmp:  # the same run's export step inside its calibration step's claim
            (tmp / "a").write_text("1")
        assert (tmp_path / ".out.lock").exists()
    assert _debris(out) == [] and (out / "a").is_file()


def test_interrupted_forced_replacement_is_restored(tmp_path):
    """A fallback replacement cut between its renames leaves .OUT.old-PID and no OUT: the next run puts it back."""
    out = tmp_path / "out"
    old = tmp_path / ".out.old-999999-abcd"
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    assert remove_stale(out) == []
    assert (out / "model.safetensors").read_text() == "previous" and _debris(out) == []


def test_created_parents_are_removed_when_nothing_was_written(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "a" / "b" / "out"):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", [".out.tmp-123-abcd", ".out.old-123-abcd"])
def test_temp_dirs_are_refused_by_name_and_by_marker(tmp_path, name):
    by_name = tmp_path / name
    by_name.mkdir()
    with pytest.raises(Jev4Error, match="unfinished jev4 output"):
        check_not_temp_dir(by_name)
    renamed = tmp_path / "looks-normal"
    renamed.mkdir()
    (renamed / TEMP_MARKER).write_text('{"pid": 5, "started": null, "host": "h", "command": "jev4-export"}')
    with pytest.raises(Jev4Error, match="pid 5 on h"):
        check_not_temp_dir(renamed)
    check_not_temp_dir(tmp_path)  # an ordinary directory passes


def test_root_and_parent_file_refused(tmp_path):
    with pytest.raises(OutputExistsError, match="file system root"):
        atomic.check_output_path("/", force=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file, not a directory"):
        atomic.check_output_path(tmp_path / "f" / "g" / "out", force=False)


def test_dead_temp_dirs_of_other_outputs_are_swept_at_claim(tmp_path, caplog):
    """A killed export's 24 GB temp dir must not starve the next export in the same directory of disk."""
    import json
    import socket

    def marked(name, pid, host=None, started=None):
        entry = tmp_path / name
        entry.mkdir()
        (entry / "language.onnx.data").write_bytes(b"x" * 2048)
        owner = {"pid": pid, "started": started, "host": host or socket.gethostname(), "command": "jev4-export"}
        (entry / TEMP_MARKER).write_text(json.dumps(owner))
        return entry

    dead = marked(".onnx-int4.tmp-999999-abcd", 999999)
    reused = marked(".onnx-int8.tmp-1-abcd", 1, started="not-init's-start-time")  # pid 1 lives, but it is not the writer
    live = marked(".onnx-fp32.tmp-1-ef01", 1, started=atomic._process_start(1))
    elsewhere = marked(".gguf.tmp-999999-abcd", 999999, host="another-host")
    unmarked = tmp_path / ".user-dir.tmp-999999-abcd"
    unmarked.mkdir()
    old_backup = tmp_path / ".onnx-fp16.old-999999-abcd"
    old_backup.mkdir()
    with caplog.at_level("WARNING", logger="jev4.atomic"):
        with claim_output(tmp_path / "gguf-q4"):
            pass
    assert not dead.exists() and not reused.exists()
    assert live.exists() and elsewhere.exists() and unmarked.exists() and old_backup.exists()
    assert "onnx-int4.tmp-999999-abcd" in caplog.text and "run that is gone" in caplog.text
