"""jev4.atomic, piece by piece and in-process: every refusal's exact words, owners alive or gone, sweeps, error naming.

Why a file of its own: ``tests/test_atomic.py`` and ``tests/reliability`` test
the whole mechanism through real runs; these pin the parts (messages, log
lines, each branch) fast enough for ``make mutation`` to run them once per
mutant of ``atomic.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jev4 import atomic
from jev4.atomic import TEMP_MARKER, Owner
from jev4.errors import Jev4Error, OutputExistsError, OutputLockedError

HOST = socket.gethostname()
DEAD_PID = 999_999  # a pid no process holds on a test machine (checked by the fixture below)


@pytest.fixture(autouse=True)
def _dead_pid_is_dead():
    try:
        os.kill(DEAD_PID, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    pytest.skip(f"pid {DEAD_PID} exists on this machine; the dead-owner cases need it free")


def _mark(entry: Path, pid: int, host: str = HOST, started: str | None = None, command: str = "jev4-export") -> Path:
    entry.mkdir()
    (entry / TEMP_MARKER).write_text(json.dumps({"pid": pid, "started": started, "host": host, "command": command}))
    return entry


def _records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "jev4.atomic"]


# --------------------------------------------------------------------------- owners


def test_owner_current_describes_this_process():
    me = Owner.current()
    assert me.pid == os.getpid() and me.host == HOST
    assert me.started == Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    assert me.command == " ".join(sys.argv)[:300]
    assert me.alive()
    assert me.describe() == f"pid {os.getpid()} ({me.command})"


def test_owner_describe_names_another_host_and_omits_an_empty_command():
    assert Owner(7, None, "elsewhere", "").describe() == "pid 7 on elsewhere"
    assert Owner(7, None, HOST, "jev4 x").describe() == "pid 7 (jev4 x)"


def test_asking_whether_an_owner_is_alive_sends_it_no_signal():
    """alive() probes with signal 0; any real signal (SIGHUP = 1) would end a writer that keeps the default action."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        owner = Owner(child.pid, atomic._process_start(child.pid), HOST, "sleep")
        assert owner.alive()
        assert owner.alive()
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.3)  # still running
    finally:
        child.kill()
        child.wait()


def test_owner_alive_cases():
    assert not Owner(DEAD_PID, None, HOST, "").alive()  # no such process
    assert Owner(DEAD_PID, None, "another-host", "").alive()  # cannot tell: assumed running
    start_of_1 = atomic._process_start(1)
    assert Owner(1, start_of_1, HOST, "").alive()  # pid 1 exists (EPERM for non-root counts as alive too)
    assert Owner(1, None, HOST, "").alive()  # no recorded start time: the pid alone decides
    assert not Owner(1, "not-its-start-time", HOST, "").alive()  # pid reused by another process


def test_process_start_reads_field_22_and_none_without_proc():
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    assert atomic._process_start(os.getpid()) == fields[19]
    assert atomic._process_start(DEAD_PID) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"pid": "12", "host": "h"}', Owner(12, None, "h", "")),
        ('{"pid": 3, "started": "99", "host": "h", "command": "c"}', Owner(3, "99", "h", "c")),
        ("not json", None),
        ('{"host": "h"}', None),
        ('{"pid": "x", "host": "h"}', None),
        ("[1, 2]", None),
        ('{"pid": null, "host": "h"}', None),
    ],
)
def test_read_owner(tmp_path, text, expected):
    path = tmp_path / "owner.json"
    path.write_text(text)
    assert atomic._read_owner(path) == expected


def test_read_owner_of_a_missing_file(tmp_path):
    assert atomic._read_owner(tmp_path / "absent") is None


def test_owner_of_prefers_the_marker_then_the_name(tmp_path):
    marked = _mark(tmp_path / ".out.tmp-5-abcd", 77, started="1")
    assert atomic._owner_of(marked) == Owner(77, "1", HOST, "jev4-export")
    by_name = tmp_path / ".out.tmp-123-abcd"
    by_name.mkdir()
    assert atomic._owner_of(by_name) == Owner(123, None, HOST, "")
    old = tmp_path / ".out.old-456-ef01"
    old.write_text("x")
    assert atomic._owner_of(old) == Owner(456, None, HOST, "")
    assert atomic._owner_of(tmp_path / ".out.tmp-nopid-abcd") is None


def test_size_counts_files_and_skips_links(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 10)
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b").write_bytes(b"x" * 5)
    (tmp_path / "d" / "link").symlink_to(tmp_path / "d" / "a")
    assert atomic._size(tmp_path / "d") == 15
    assert atomic._size(tmp_path / "d" / "a") == 10


# --------------------------------------------------------------------------- checks


def test_check_output_path_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputExistsError) as info:
        atomic.check_output_path("", force=False)
    assert str(info.value) == "the output path is empty; name a directory or file to write"
    with pytest.raises(OutputExistsError) as info:
        atomic.check_output_path("dir/", force=False, kind="file")
    assert str(info.value) == "dir/: ends with /, which names a directory; give a file name"
    atomic.check_output_path("dir/", force=False, kind="dir")  # a trailing slash is fine for a directory
    with pytest.raises(OutputExistsError) as info:
        atomic.check_output_path("/", force=True)
    assert str(info.value) == "/: is the file system root; name a new directory for the output"
    for out in (".", ".."):
        with pytest.raises(OutputExistsError) as info:
            atomic.check_output_path(out, force=True)
        assert str(info.value) == f"{out}: is or contains the current directory; name a new directory for the output"
    with pytest.raises(OutputExistsError) as info:  # a file OUT does not swallow the cwd: it fails as a directory
        atomic.check_output_path(".", force=True, kind="file")
    assert str(info.value) == ".: is a directory, expected a file name"


def test_check_output_path_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    cases = {model: "is", model / "sub": "is inside", tmp_path / "m2": None}
    for out, relation in cases.items():
        if relation is None:
            assert atomic.check_output_path(out, force=False, sources=[model, None, "", "hub/id-not-local"]) == out
            continue
        with pytest.raises(OutputExistsError) as info:
            atomic.check_output_path(out, force=True, sources=[None, model])
        assert str(info.value) == f"{out}: {relation} {model}, which this run reads; choose an output outside it"
    (tmp_path / "parent" / "model").mkdir(parents=True)
    with pytest.raises(OutputExistsError) as info:
        atomic.check_output_path(tmp_path / "parent", force=True, sources=[tmp_path / "parent" / "model"])
    assert str(info.value).endswith(f"contains {tmp_path / 'parent' / 'model'}, which this run reads; choose an output outside it")
    link = tmp_path / "link-to-model"
    link.symlink_to(model)
    with pytest.raises(OutputExistsError, match=r"link-to-model: is .*model, which this run reads"):
        atomic.check_output_path(link, force=True, sources=[model])  # the same directory through a link


def test_check_output_path_existing_outputs(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(OutputExistsError) as info:
        atomic.check_output_path(d, force=False)
    assert str(info.value) == f"{d}: already exists; pass --force to replace it"
    assert atomic.check_output_path(d, force=True) == d
    with pytest.raises(OutputExistsError) as info:
        atomic.check_output_path(f, force=True, kind="dir")
    assert str(info.value) == f"{f}: exists and is not a directory"
    assert atomic.check_output_path(f, force=True, kind="file") == f
    with pytest.raises(OutputExistsError) as info:
        atomic.check_output_path(d, force=True, kind="file")
    assert str(info.value) == f"{d}: is a directory, expected a file name"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="already exists"):
        atomic.check_output_path(dangling, force=False)
    with pytest.raises(OutputExistsError) as info:
        atomic.check_output_path(f / "a" / "out", force=False)
    assert str(info.value) == f"{f / 'a' / 'out'}: {f} is a file, not a directory"
    assert atomic.check_output_path(tmp_path / "new" / "deeper" / "out", force=False) == tmp_path / "new" / "deeper" / "out"


# --------------------------------------------------------------------------- locking


def test_lock_file_name_and_a_second_claim_in_another_open(tmp_path):
    out = tmp_path / "out"
    assert atomic._lock_path(out) == tmp_path / ".out.lock"
    held = atomic._acquire(out)
    try:
        written = json.loads((tmp_path / ".out.lock").read_text())
        assert written["pid"] == os.getpid() and written["host"] == HOST
        with pytest.raises(OutputLockedError) as info:  # flock conflicts between two opens, even in one process
            atomic._acquire(out)
        assert str(info.value) == f"{out}: is being written by {Owner.current().describe()}; wait for it to finish or stop it"
    finally:
        atomic._release(held)
    assert not (tmp_path / ".out.lock").exists()
    atomic._release(atomic._acquire(out))  # free again


def test_lock_held_by_a_writer_that_left_no_name(tmp_path, monkeypatch):
    import fcntl

    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setattr(atomic.time, "sleep", lambda s: None)
    try:
        with pytest.raises(OutputLockedError) as info:
            atomic._acquire(out)
        assert str(info.value) == f"{out}: is being written by another process; wait for it to finish or stop it"
    finally:
        os.close(fd)


def test_lock_file_replaced_between_open_and_flock_is_locked_anew(tmp_path, monkeypatch):
    """The previous holder unlinks the lock file after we opened it: locking that orphan would lock nothing."""
    import fcntl

    out = tmp_path / "out"
    path = tmp_path / ".out.lock"
    real_flock = fcntl.flock
    calls = []

    def flock_after_a_swap(fd, op):
        calls.append(fd)
        if len(calls) == 1:  # the holder released: file removed, and a new one created by a third writer
            path.unlink()
            path.write_text("")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_swap)
    held = atomic._acquire(out)
    try:
        assert len(calls) == 2 and os.fstat(held.fd).st_ino == os.stat(path).st_ino
    finally:
        atomic._release(held)


def test_lock_in_a_directory_that_cannot_take_it_names_the_directory(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".out.lock"))

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError) as info:
        atomic._acquire(tmp_path / "out")
    assert info.value.filename == str(tmp_path)


def test_release_tolerates_a_removed_lock_file(tmp_path):
    held = atomic._acquire(tmp_path / "out")
    os.unlink(held.path)
    atomic._release(held)
    with pytest.raises(OSError):
        os.fstat(held.fd)  # closed all the same


def test_claim_creates_and_removes_parents_but_keeps_ones_that_got_content(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with atomic.claim_output(out):
        assert (tmp_path / "a" / "b").is_dir()
        (tmp_path / "a" / "keep").write_text("x")  # something else writes into a created parent
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a" / "keep").exists()
    assert atomic._HELD == {}


# --------------------------------------------------------------------------- stale outputs


def test_remove_stale_removes_dead_temps_and_logs_one_line(tmp_path, caplog):
    out = tmp_path / "out"
    dead_dir = _mark(tmp_path / ".out.tmp-1-aaaa", DEAD_PID)
    (dead_dir / "data").write_bytes(b"x" * 1_500_000)
    dead_file = tmp_path / f".out.tmp-{DEAD_PID - 1}-bbbb"
    dead_file.write_bytes(b"x" * 500_000)
    nameless = tmp_path / ".out.tmp-x-cccc"
    nameless.mkdir()
    mine = tmp_path / f".out.tmp-{os.getpid()}-dddd"  # this process's own leftover (an earlier failed attempt)
    mine.mkdir()
    other = tmp_path / ".outer.tmp-1-eeee"  # another OUT's, unmarked: not this OUT's business
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="jev4.atomic"):
        removed = atomic.remove_stale(out)
    assert removed == sorted([dead_dir, dead_file, nameless, mine], key=lambda p: p.name)
    assert other.exists()
    pids = ", ".join(map(str, sorted({DEAD_PID, DEAD_PID - 1, os.getpid()})))
    names = ", ".join(p.name for p in removed)
    assert _records(caplog) == [f"removed 4 unfinished output(s) of {out} left by interrupted runs (pid {pids}), 2.0 MB: {names}"]


def test_remove_stale_with_no_known_owner_says_unknown(tmp_path, caplog):
    nameless = tmp_path / ".out.tmp-x-cccc"
    nameless.mkdir()
    with caplog.at_level(logging.WARNING, logger="jev4.atomic"):
        assert atomic.remove_stale(tmp_path / "out") == [nameless]
    assert _records(caplog) == [f"removed 1 unfinished output(s) of {tmp_path / 'out'} left by interrupted runs (pid unknown), 0.0 MB: .out.tmp-x-cccc"]


def test_remove_stale_leaves_a_live_writer_and_says_so(tmp_path, caplog):
    live = _mark(tmp_path / ".out.tmp-1-aaaa", 1, started=atomic._process_start(1), command="jev4 other")
    with caplog.at_level(logging.WARNING, logger="jev4.atomic"):
        assert atomic.remove_stale(tmp_path / "out") == []
    assert live.exists()
    assert _records(caplog) == [f"left {live} alone: its writer, pid 1 (jev4 other), is still running"]


def test_remove_stale_restores_or_drops_an_old_backup(tmp_path, caplog):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{DEAD_PID}-abcd"
    old.mkdir()
    with caplog.at_level(logging.WARNING, logger="jev4.atomic"):
        assert atomic.remove_stale(out) == []
    assert out.is_dir() and not old.exists()
    assert _records(caplog) == [f"restored {out} from {old} (a replacement of it was interrupted)"]
    old.write_text("stale backup, OUT is there")  # OUT exists now: the backup is debris
    assert atomic.remove_stale(out) == [old] and not old.exists() and out.is_dir()


def test_remove_stale_removes_a_link_not_its_target(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "f").write_text("x")
    link = tmp_path / f".out.tmp-{DEAD_PID}-abcd"
    link.symlink_to(target)
    assert atomic.remove_stale(tmp_path / "out") == [link]
    assert not link.is_symlink() and (target / "f").exists()


def test_remove_dead_siblings(tmp_path, caplog):
    dead = _mark(tmp_path / ".other.tmp-1-aaaa", DEAD_PID, command="jev4-export --out other")
    (dead / "data").write_bytes(b"x" * 2_500_000)
    own = _mark(tmp_path / ".out.tmp-1-bbbb", DEAD_PID)  # OUT's own: remove_stale's job, under OUT's lock
    no_dot = _mark(tmp_path / "other.tmp-1-cccc", DEAD_PID)
    no_tag = _mark(tmp_path / ".other.old-1-dddd", DEAD_PID)
    unmarked = tmp_path / ".third.tmp-1-eeee"
    unmarked.mkdir()
    a_file = tmp_path / ".fourth.tmp-1-ffff"
    a_file.write_text("x")
    a_link = tmp_path / ".fifth.tmp-1-0000"
    a_link.symlink_to(dead)
    other_host = _mark(tmp_path / ".sixth.tmp-1-1111", DEAD_PID, host="another-host")
    with caplog.at_level(logging.WARNING, logger="jev4.atomic"):
        removed = atomic.remove_dead_siblings(tmp_path / "out")
    assert removed == [dead] and not dead.exists()
    assert all(p.exists() or p.is_symlink() for p in (own, no_dot, no_tag, unmarked, a_file, a_link, other_host))
    assert _records(caplog) == [f"removed {dead} (2.5 MB): an unfinished output of a run that is gone (pid {DEAD_PID} (jev4-export --out other))"]


def test_remove_dead_siblings_reports_only_what_it_removed(tmp_path, monkeypatch, caplog):
    stubborn = _mark(tmp_path / ".other.tmp-1-aaaa", DEAD_PID)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, ignore_errors=False: None)  # e.g. a read-only mount
    with caplog.at_level(logging.WARNING, logger="jev4.atomic"):
        assert atomic.remove_dead_siblings(tmp_path / "out") == []
    assert stubborn.exists() and _records(caplog) == []


# --------------------------------------------------------------------------- errors while writing


def test_os_error_in_follows_causes_and_library_messages():
    disk = OSError(errno.ENOSPC, "No space left on device")
    assert atomic.os_error_in(disk) is disk
    try:
        try:
            raise disk
        except OSError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert atomic.os_error_in(wrapped) is disk
    try:
        try:
            raise disk
        except OSError:
            raise RuntimeError("unrelated")  # noqa: B904 (implicit context, not a cause)
    except RuntimeError as unrelated:
        assert atomic.os_error_in(unrelated) is None
    for text, code, strerror in [
        ("Disk quota exceeded", errno.EDQUOT, "Disk quota exceeded"),
        ("IoError(Os { code: 28, kind: StorageFull })", errno.ENOSPC, "StorageFull"),
        ("problem writing element 3", errno.EIO, "problem writing element"),
        ("No space left on device", errno.ENOSPC, "No space left on device"),
    ]:
        found = atomic.os_error_in(RuntimeError(f"library: {text}"))
        assert (found.errno, found.strerror) == (code, strerror)
    assert atomic.os_error_in(OSError("no errno")) is None
    assert atomic.os_error_in(ValueError("nothing")) is None
    loop = RuntimeError("a")
    loop.__cause__ = RuntimeError("b")
    loop.__cause__.__cause__ = loop
    assert atomic.os_error_in(loop) is None  # a cycle ends


def test_name_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OSError) as info:
        atomic._name_output(RuntimeError("No space left on device"), out)
    assert (info.value.errno, info.value.strerror, info.value.filename) == (errno.ENOSPC, "No space left on device", str(out))
    assert isinstance(info.value.__cause__, RuntimeError)
    bare = OSError(errno.EIO, "Input/output error")
    with pytest.raises(OSError) as info:
        atomic._name_output(bare, out)
    assert (info.value.errno, info.value.filename) == (errno.EIO, str(out))
    nameless = OSError(errno.EROFS, None)
    with pytest.raises(OSError) as info:
        atomic._name_output(nameless, out)
    assert info.value.strerror == os.strerror(errno.EROFS)
    for code in (errno.EDQUOT, errno.EFBIG):
        with pytest.raises(OSError):
            atomic._name_output(OSError(code, "x"), out)
    atomic._name_output(OSError(errno.ENOSPC, "x", "/named/file"), out)  # names its file already: left as it is
    atomic._name_output(OSError(errno.ENOENT, "x"), out)  # not a write error
    atomic._name_output(ValueError("x"), out)


# --------------------------------------------------------------------------- temp dirs and publication


def test_temp_owner_and_refusal_messages(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert atomic.temp_owner(plain) is None
    assert atomic.temp_owner(tmp_path / "dot.tmp-1") is None  # no leading dot: a user's name
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / TEMP_MARKER).write_text("{")
    assert atomic.temp_owner(broken) == Owner(-1, None, "?", "")
    assert atomic.temp_owner(tmp_path / ".out.tmp-x-y") == Owner(-1, None, "?", "")
    assert atomic.temp_owner(tmp_path / ".out.old-12-y") == Owner(12, None, HOST, "")
    with pytest.raises(Jev4Error) as info:
        atomic.check_not_temp_dir(broken)
    assert str(info.value) == (
        f"{broken}: is an unfinished jev4 output (a temporary directory written by an earlier run that never completed); "
        "the next run to the same output removes it, or delete it yourself"
    )
    with pytest.raises(Jev4Error) as info:
        atomic.check_not_temp_dir(tmp_path / ".out.tmp-42-y")
    assert "(a temporary directory written by pid 42 that never completed)" in str(info.value)


def test_temp_name_is_beside_out_with_pid_and_random_tag(tmp_path):
    a, b = atomic._temp_name(tmp_path / "out"), atomic._temp_name(tmp_path / "out")
    assert a.parent == tmp_path and a != b
    prefix = f".out.tmp-{os.getpid()}-"
    assert a.name.startswith(prefix) and len(a.name) == len(prefix) + 8


def test_renameat2_flags(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (dst / "x").write_text("x")
    with pytest.raises(OSError) as info:
        atomic._renameat2(src, dst, atomic._RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST and info.value.filename == str(dst)
    assert atomic._renameat2(src, dst, atomic._RENAME_EXCHANGE)
    assert (src / "x").exists() and not (dst / "x").exists()  # exchanged
    assert atomic._renameat2(src, tmp_path / "new", atomic._RENAME_NOREPLACE) and (tmp_path / "new" / "x").exists()
    assert not atomic._renameat2(dst, tmp_path / "z", 1 << 30)  # a flag the kernel refuses: EINVAL -> fall back


def test_renameat2_elsewhere_is_not_supported(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.sys, "platform", "darwin")
    assert not atomic._renameat2(tmp_path / "a", tmp_path / "b", atomic._RENAME_NOREPLACE)


@pytest.mark.parametrize("kernel", ["renameat2", "fallback"])
def test_publish_paths(tmp_path, monkeypatch, kernel):
    if kernel == "fallback":
        monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)

    def made(name, content, is_dir=True):
        path = tmp_path / name
        if is_dir:
            path.mkdir()
            (path / "f").write_text(content)
        else:
            path.write_text(content)
        return path

    out = tmp_path / "out"
    atomic._publish(made("t1", "one"), out, force=False)
    assert (out / "f").read_text() == "one"
    with pytest.raises(OutputExistsError) as info:
        atomic._publish(made("t2", "two"), out, force=False)
    assert str(info.value) == f"{out}: appeared while jev4 was writing it (not by jev4: it would hold the lock); left it as it is"
    assert (out / "f").read_text() == "one" and (tmp_path / "t2").exists()
    atomic._publish(tmp_path / "t2", out, force=True)
    assert (out / "f").read_text() == "two" and not (tmp_path / "t2").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the previous OUT is gone, no .old- left
    file_out = tmp_path / "file"
    atomic._publish(made("t3", "a", is_dir=False), file_out, force=False)
    atomic._publish(made("t4", "b", is_dir=False), file_out, force=True)
    assert file_out.read_text() == "b"
    link_target = made("real", "r")
    link = tmp_path / "link"
    link.symlink_to(link_target)
    atomic._publish(made("t5", "new"), link, force=True)  # the link is replaced, not the directory it points to
    assert not link.is_symlink() and (link / "f").read_text() == "new" and (link_target / "f").read_text() == "r"
    assert sorted(os.listdir(tmp_path)) == ["file", "link", "out", "real"]


def test_publish_reraises_other_rename_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic._publish(tmp_path / "absent", tmp_path / "out", force=False)


def test_publish_permissions_follow_the_umask(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True, mode=0o700)
    (root / "sub" / "f").write_text("x")
    (root / "sub" / "f").chmod(0o600)
    old = os.umask(0o027)
    try:
        atomic._publish_permissions(root)
        single = tmp_path / "single"
        single.write_text("x")
        single.chmod(0o600)
        atomic._publish_permissions(single)
    finally:
        os.umask(old)
    assert os.umask(old) == old  # the umask is left as it was
    modes = [p.stat().st_mode & 0o777 for p in (root, root / "sub", root / "sub" / "f", single)]
    assert modes == [0o750, 0o750, 0o640, 0o640]


def test_atomic_output_dir_cleans_up_and_names_out_on_a_full_disk(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OSError) as info:
        with atomic.atomic_output_dir(out) as tmp:
            assert tmp.stat().st_mode & 0o777 == 0o700  # private while unfinished
            assert json.loads((tmp / TEMP_MARKER).read_text())["pid"] == os.getpid()
            raise RuntimeError("No space left on device")
    assert info.value.filename == str(out)
    assert os.listdir(tmp_path) == []


def test_atomic_outputs_log_what_they_wrote(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="jev4.atomic"):
        with atomic.atomic_output_dir(tmp_path / "d"):
            pass
        with atomic.atomic_output_file(tmp_path / "f") as tmp:
            tmp.write_text("x")
    assert _records(caplog) == [f"wrote {tmp_path / 'd'}", f"wrote {tmp_path / 'f'}"]
    with pytest.raises(Jev4Error) as info:
        with atomic.atomic_output_file(tmp_path / "g") as tmp:
            tmp.mkdir()  # not a file
    assert str(info.value) == f"{tmp_path / 'g'}: the writer produced no file"
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]  # the directory the writer made instead is removed


# --------------------------------------------------------------------------- edges that make mutation testing honest


def test_owner_command_is_cut_at_300_characters(monkeypatch):
    monkeypatch.setattr(atomic.sys, "argv", ["jev4", "x" * 400])
    assert Owner.current().command == ("jev4 " + "x" * 400)[:300]


def test_process_start_survives_a_command_name_with_parentheses(monkeypatch):
    """The second field is ``(comm)`` and comm may hold ')' and spaces: only the last ')' ends it."""
    fields = " ".join(["S"] + [str(n) for n in range(4, 30)])  # fields 3 ("S") onwards; field n is "n"

    class FakePath:
        def __init__(self, path):
            self.path = path

        def read_text(self):
            return f"123 (evil) name) {fields}"

    monkeypatch.setattr(atomic, "Path", FakePath)
    assert atomic._process_start(123) == "22"


def test_a_source_that_is_not_local_does_not_end_the_checks(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(OutputExistsError, match="which this run reads"):
        atomic.check_output_path(model / "out", force=False, sources=["org/hub-model", model])


def test_lock_file_mode_is_0644_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        held = atomic._acquire(tmp_path / "out")
    finally:
        os.umask(old)
    try:
        assert os.stat(held.path).st_mode & 0o777 == 0o644
    finally:
        atomic._release(held)


def test_a_named_holder_is_reported_without_waiting(tmp_path, monkeypatch):
    held = atomic._acquire(tmp_path / "out")
    naps = []
    monkeypatch.setattr(atomic.time, "sleep", naps.append)
    try:
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            atomic._acquire(tmp_path / "out")
    finally:
        atomic._release(held)
    assert naps == []


def test_an_unnamed_holder_is_waited_for_one_second_in_steps(tmp_path, monkeypatch):
    import fcntl

    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    naps = []
    monkeypatch.setattr(atomic.time, "sleep", naps.append)
    try:
        with pytest.raises(OutputLockedError, match="another process"):
            atomic._acquire(tmp_path / "out")
    finally:
        os.close(fd)
    assert naps == [0.05] * 20


def test_lock_file_removed_between_flock_and_stat_is_locked_anew(tmp_path, monkeypatch):
    import fcntl

    path = tmp_path / ".out.lock"
    real_flock = fcntl.flock
    calls = []

    def flock_then_vanish(fd, op):
        calls.append(fd)
        real_flock(fd, op)
        if len(calls) == 1:
            path.unlink()  # the previous holder's release removes the file we just locked

    monkeypatch.setattr(fcntl, "flock", flock_then_vanish)
    held = atomic._acquire(tmp_path / "out")
    try:
        assert len(calls) == 2 and path.exists() and os.fstat(held.fd).st_ino == os.stat(path).st_ino
    finally:
        atomic._release(held)


def test_owner_of_an_out_whose_name_holds_the_tag(tmp_path):
    entry = tmp_path / ".run.tmp-a.tmp-321-abcd"  # OUT is "run.tmp-a"
    entry.mkdir()
    assert atomic._owner_of(entry) == Owner(321, None, HOST, "")


def test_remove_stale_goes_on_past_unrelated_live_and_restored_entries(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".a-unrelated").mkdir()  # sorts first
    old = tmp_path / f".out.old-{DEAD_PID}-0000"  # sorts before the temps: restored, then the sweep goes on
    old.mkdir()
    live = _mark(tmp_path / ".out.tmp-1-0000", 1, started=atomic._process_start(1))
    dead = tmp_path / f".out.tmp-{DEAD_PID}-ffff"
    dead.mkdir()
    assert atomic.remove_stale(out) == [dead]
    assert out.is_dir() and live.exists() and not dead.exists() and (tmp_path / ".a-unrelated").exists()


@pytest.mark.parametrize(("size", "shown"), [(1_049_999, "1.0"), (1_050_000, "1.1")])
def test_freed_megabytes_are_counted_exactly(tmp_path, caplog, size, shown):
    """Sizes at a rounding edge of the one-decimal figure: off by one byte or by one in a million shows."""
    out = tmp_path / "out"
    own = tmp_path / f".out.tmp-{DEAD_PID}-aaaa"
    own.mkdir()
    (own / "data").write_bytes(b"x" * size)
    other = _mark(tmp_path / ".other.tmp-1-bbbb", DEAD_PID, command="")
    (other / "data").write_bytes(b"x" * (size - len((other / TEMP_MARKER).read_bytes())))
    with caplog.at_level(logging.WARNING, logger="jev4.atomic"):
        atomic.remove_stale(out)
    assert _records(caplog) == [
        f"removed 1 unfinished output(s) of {out} left by interrupted runs (pid {DEAD_PID}), {shown} MB: {own.name}",
        f"removed {other} ({shown} MB): an unfinished output of a run that is gone (pid {DEAD_PID})",
    ]


def test_a_sweep_that_cannot_remove_does_not_fail_the_run(tmp_path, monkeypatch):
    stubborn = _mark(tmp_path / ".other.tmp-1-aaaa", DEAD_PID)

    def rmtree(path, ignore_errors=False):
        if not ignore_errors:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    assert atomic.remove_dead_siblings(tmp_path / "out") == [] and stubborn.exists()


@pytest.mark.parametrize(("pid", "by"), [(0, "by an earlier run"), (1, "by pid 1")])
def test_refusal_names_a_real_pid_only(tmp_path, pid, by):
    with pytest.raises(Jev4Error, match=f"written {by} that never"):
        atomic.check_not_temp_dir(tmp_path / f".out.tmp-{pid}-y")


def test_renameat2_missing_from_libc_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.ctypes, "CDLL", lambda *a, **k: object())
    assert atomic._renameat2(tmp_path / "a", tmp_path / "b", atomic._RENAME_NOREPLACE) is False


def test_renameat2_with_relative_paths_works_from_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("src").mkdir()
    assert atomic._renameat2(Path("src"), Path("dst"), atomic._RENAME_NOREPLACE) and Path("dst").is_dir()
    Path("src").mkdir()
    with pytest.raises(OSError) as info:
        atomic._renameat2(Path("src"), Path("dst"), atomic._RENAME_NOREPLACE)
    assert (info.value.errno, info.value.strerror) == (errno.EEXIST, os.strerror(errno.EEXIST))


def test_single_file_permissions_with_no_umask(tmp_path):
    single = tmp_path / "single"
    single.write_text("x")
    old = os.umask(0)
    try:
        atomic._publish_permissions(single)
    finally:
        os.umask(old)
    assert single.stat().st_mode & 0o777 == 0o666


def test_owner_of_reads_the_pid_before_the_first_dash_of_the_tail(tmp_path):
    entry = tmp_path / ".out.tmp-12-ab-cd"  # not a name jev4 writes (its random tag is hex), but one a user may make
    entry.mkdir()
    assert atomic._owner_of(entry) == Owner(12, None, HOST, "")
