"""Where the output goes: existing, shared with a source, contended, unwritable, full, or oddly named.

Each case asserts the exit code, one error line without a traceback, that
OUT (and the source) is as it was, and that no temp dir or lock is left.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest

from jev4.atomic import atomic_output_dir, atomic_output_file, claim_output, remove_stale
from jev4.errors import OutputExistsError, OutputLockedError
from jev4.export.manifest import verify_manifest
from harness import command, env, run, temp_entries, when_locked
from conftest import copy_tree, tree_digest


def _merge(model, out, *extra):
    return command("jev4-export", "--model", model, "--adapter", "retrieval", "--out", out, "--no-progress", *extra)


# --------------------------------------------------------------------------- OUT and the source


def test_out_equal_to_model_with_force_keeps_the_source(tiny, tmp_path):
    model = copy_tree(tiny, tmp_path / "model")
    before = tree_digest(model)
    result = run(_merge(model, model, "--force"))
    assert result.code == 2 and "which this run reads" in result.one_error()
    assert tree_digest(model) == before
    assert temp_entries(model) == []


@pytest.mark.parametrize("where", ["inside", "containing"])
def test_out_inside_or_containing_the_model(tiny, tmp_path, where):
    model = copy_tree(tiny, tmp_path / "parent" / "model")
    out = model / "merged" if where == "inside" else tmp_path / "parent"
    before = tree_digest(tmp_path)
    result = run(_merge(model, out, "--force"))
    assert result.code == 2 and f"{where.replace('containing', 'contains').replace('inside', 'is inside')} {model}" in result.one_error()
    assert tree_digest(tmp_path) == before


def test_out_dot_with_force(tiny, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    result = run(_merge(tiny, ".", "--force"), cwd=work)
    assert result.code == 2 and "current directory" in result.one_error()
    assert sorted(os.listdir(work)) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["work"]  # no hidden finished export beside it


def test_validate_report_inside_the_artifact_is_refused(tiny, merged, tmp_path):
    result = run(command("jev4", "validate", "--reference", tiny, "--adapter", "retrieval", "--artifact", merged, "--out", merged / "report"))
    assert result.code == 2 and "is inside" in result.one_error()
    verify_manifest(merged)


# --------------------------------------------------------------------------- two writers


def test_two_exports_to_one_out(tiny, tmp_path):
    """The second gets exit 2 naming the first's pid; the first's artifact is published whole."""
    out = tmp_path / "out"
    first = subprocess.Popen(_merge(tiny, out, "--dtype", "fp32"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    holding = when_locked(out)
    deadline = time.monotonic() + 120
    while not holding() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    second = run(_merge(tiny, out, "--dtype", "fp32"))
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    if holding() or "being written" in second.stderr:
        line = second.one_error()
        assert second.code == 2 and f"is being written by pid {first.pid}" in line
    else:  # the first finished before the second started: the second must still not replace it
        assert second.code == 2 and "already exists" in second.one_error()
    verify_manifest(out)
    assert temp_entries(out) == []


def test_lock_names_the_holder_in_process(tmp_path):
    """API: a second claim from another process fails at once, naming this pid; the lock file goes with the claim."""
    out = tmp_path / "out"
    code = f"from jev4.atomic import claim_output\nwith claim_output({str(out)!r}): pass"
    with claim_output(out):
        other = subprocess.run([command("jev4")[0].replace("jev4", "python"), "-c", code], capture_output=True, text=True)
        assert "OutputLockedError" in other.stderr and f"pid {os.getpid()}" in other.stderr
    assert temp_entries(out) == []


def test_out_appearing_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while jev4 was writing"):
        with atomic_output_dir(out) as tmp:
            (tmp / "new").write_text("new")
            out.mkdir()  # another program creates OUT while jev4 writes
            (out / "theirs").write_text("theirs")
    assert sorted(os.listdir(out)) == ["theirs"]
    assert temp_entries(out) == []


def test_stale_temp_of_a_live_writer_is_left_alone(tmp_path, caplog):
    """Only temp dirs whose owner is gone are removed: a live pid (here a sleeping child) keeps its own."""
    out = tmp_path / "out"
    child = subprocess.Popen(["sleep", "30"])
    try:
        live = tmp_path / f".out.tmp-{child.pid}-abcd"
        dead = tmp_path / ".out.tmp-999999-abcd"
        live.mkdir()
        dead.mkdir()
        (dead / "model.safetensors").write_bytes(b"x" * 1000)
        removed = remove_stale(out)
        assert removed == [dead] and live.exists()
        assert "still running" in caplog.text
    finally:
        child.kill()


# --------------------------------------------------------------------------- jev4 encode --out


def test_encode_refuses_existing_file_and_writes_the_exact_name(tiny, tmp_path):
    out = tmp_path / "emb"  # no .npz suffix: written exactly here
    args = ["encode", "--model", tiny, "--text", "hello", "--out", out, "--no-progress"]
    first = run(command("jev4", *args))
    assert first.code == 0, first.stderr
    assert out.is_file() and not (tmp_path / "emb.npz").exists()
    assert f"to {out}" in first.stderr
    before = out.read_bytes()
    again = run(command("jev4", *args))
    assert again.code == 2 and "already exists; pass --force" in again.one_error()
    assert out.read_bytes() == before
    forced = run(command("jev4", *args, "--text", "world", "--force"))
    assert forced.code == 0 and sorted(np.load(out).files) == ["text_0", "text_1"]
    assert temp_entries(out) == []


def test_encode_creates_a_missing_parent(tiny, tmp_path):
    out = tmp_path / "a" / "b" / "emb.npz"
    result = run(command("jev4", "encode", "--model", tiny, "--text", "hi", "--out", out, "--no-progress"))
    assert result.code == 0 and out.is_file()


@pytest.mark.parametrize("tool", ["export", "encode"])
def test_out_parent_is_a_file(tiny, tmp_path, tool):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    cmd = _merge(tiny, out) if tool == "export" else command("jev4", "encode", "--model", tiny, "--text", "x", "--out", out)
    result = run(cmd)
    assert result.code == 2 and f"{blocker} is a file, not a directory" in result.one_error()
    assert blocker.read_text() == "not a directory"


def test_name_too_long(tiny, tmp_path):
    out = tmp_path / ("x" * 300)
    result = run(command("jev4", "encode", "--model", tiny, "--text", "x", "--out", out))
    assert result.code == 2 and "name too long" in result.one_error()


# --------------------------------------------------------------------------- unwritable and full disks


@pytest.mark.parametrize("tool", ["export", "encode"])
def test_read_only_out_parent(tiny, tmp_path, small_fs, tool):
    parent = small_fs(read_only=True)
    out = parent / "out"
    cmd = _merge(tiny, out) if tool == "export" else command("jev4", "encode", "--model", tiny, "--text", "x", "--out", out)
    result = run(cmd)
    assert result.code == 2
    line = result.one_error()
    assert str(parent) in line and "read-only file system" in line
    assert os.listdir(parent) == []


def test_permission_denied_names_the_path(tmp_path, monkeypatch):
    """Not root (or no mount): EACCES from the file system becomes one line naming the directory (API + boundary)."""
    import errno

    from jev4.cli.common import describe_os_error

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError) as info:
        with claim_output(tmp_path / "out"):
            pass
    line = describe_os_error(info.value)
    assert line.startswith(f"{tmp_path}: permission denied")


@pytest.mark.parametrize("tool", ["merge", "onnx", "validate", "encode"])
def test_full_disk(tiny, onnx_artifact, tmp_path, small_fs, tool):
    disk = small_fs("300k")
    out = disk / "out"
    cmd = {
        "merge": _merge(tiny, out, "--dtype", "fp32"),
        "onnx": _merge(tiny, out, "--format", "onnx"),
        "validate": command("jev4", "validate", "--reference", tiny, "--adapter", "retrieval", "--artifact", onnx_artifact, "--out", out, "--max-queries", "5", "--max-docs", "20", "--no-progress"),
        "encode": command("jev4", "encode", "--model", tiny, "--text", "a b " * 15_000, "--multivector", "--out", out, "--no-progress"),
    }[tool]
    if tool == "encode":
        (disk / "filler").write_bytes(b"\0" * (300 * 1024 - 8192))  # leave too little for the embeddings
    result = run(cmd)
    assert result.code == 2, result.stderr
    line = result.one_error()
    assert str(out) in line and ("no space left" in line or "write failed" in line)
    assert not out.exists() and temp_entries(out) == []


def test_full_disk_inside_a_library_names_out(tmp_path):
    """API: a library that wraps ENOSPC in its own error (safetensors does) still surfaces as an OSError naming OUT."""
    out = tmp_path / "out"
    with pytest.raises(OSError) as info:
        with atomic_output_file(out):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
    assert info.value.filename == str(out) and info.value.errno == 28
    assert temp_entries(out) == []


# --------------------------------------------------------------------------- names a careful user tries


def test_unicode_and_spaces_in_paths(tiny, tmp_path):
    model = copy_tree(tiny, tmp_path / "modèle à tester")
    out = tmp_path / "sortie été" / "résultat"
    result = run(_merge(model, out))
    assert result.code == 0, result.stderr
    verify_manifest(out)


def test_force_over_a_symlinked_out_replaces_the_link_not_its_target(tiny, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    result = run(_merge(tiny, link, "--force"))
    assert result.code == 0, result.stderr
    assert not link.is_symlink() and (link / "jev4-manifest.json").is_file()
    assert sorted(os.listdir(target)) == ["keep"]


def test_quoted_tilde_is_a_literal_name(tiny, tmp_path):
    """A quoted '~' names a directory called ~ (the shell expands ~, not jev4): the home directory is never touched."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "important.txt").write_text("keep")
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(command("jev4", "make-tiny", "~", "--force"), capture_output=True, text=True, cwd=work, env={**env(), "HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert (work / "~" / "config.json").is_file()
    assert sorted(os.listdir(home)) == ["important.txt"]


@pytest.mark.parametrize("out, message", [("emb.npz/", "ends with /, which names a directory"), ("", "the output path is empty")])
def test_encode_out_names(tiny, tmp_path, out, message):
    result = run(command("jev4", "encode", "--model", tiny, "--text", "x", "--out", out), cwd=tmp_path)
    assert result.code == 2 and message in result.one_error()
    assert os.listdir(tmp_path) == []
