"""One way to write an output (an artifact directory, a report, an embeddings file) so that nothing is lost or left behind.

Why each piece exists (each failure was seen in practice):

- **Checked before any work** (``check_output_path``): an existing OUT needs
  ``force``; OUT may not be, contain or sit inside a source the run reads
  (``--out`` equal to ``--model`` with ``--force`` would delete the model
  while reading it), nor contain the working directory (``--out . --force``).
- **Locked for the whole run** (``claim_output``): an advisory ``flock`` on
  ``.<OUT>.lock`` beside OUT. Two runs writing one OUT at once would both
  succeed and the second would silently replace the first; now the second
  gets an error naming the first one's pid. The lock is re-entrant within a
  process (a command that calibrates and then exports claims OUT once for
  both), which is the one piece of process state kept here.
- **Written aside, published whole** (``atomic_output_dir`` /
  ``atomic_output_file``): everything goes to ``.<OUT>.tmp-<pid>-<random>``
  beside OUT (same file system, so the final rename is atomic), with a marker
  file naming the owner (pid, process start time, host, command). On success
  it is renamed into place: with ``renameat2(RENAME_NOREPLACE)`` so that an
  OUT that appeared meanwhile is never replaced without ``force``, and with
  ``RENAME_EXCHANGE`` under ``force`` so that there is no moment without an
  OUT. On any exception, Ctrl-C or a handled signal, the temp dir is removed.
- **Debris from crashes is removed** (``kill -9``, a power cut, an OOM kill
  cannot run cleanup code): the next run to the same OUT, holding the lock,
  removes every temp dir of that OUT whose owner is gone, and logs it on one
  line; it also removes marked temp dirs of other outputs in the same
  directory whose owner is gone (``remove_dead_siblings``), because one
  killed full-size export can fill the disk for every run after it. ``jev4.runtime.load`` refuses a temp dir (``check_not_temp_dir``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from jev4.errors import Jev4Error, OutputExistsError, OutputLockedError

log = logging.getLogger(__name__)

TEMP_MARKER = ".jev4-unfinished.json"
_TEMP_TAG = ".tmp-"
_OLD_TAG = ".old-"
_LOCK_SUFFIX = ".lock"
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class Owner:
    """Who is writing: enough to tell later whether that process is still alive (pids are reused)."""

    pid: int
    started: str | None  # the process start time from /proc (None where /proc is absent)
    host: str
    command: str

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), _process_start(os.getpid()), socket.gethostname(), " ".join(sys.argv)[:300])

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # another machine's process (a shared file system): cannot tell, so assume it runs
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        return self.started is None or _process_start(self.pid) in (None, self.started)

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where}" + (f" ({self.command})" if self.command else "")


def _process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); with the pid it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _read_owner(path: Path) -> Owner | None:
    try:
        data = json.loads(path.read_text())
        return Owner(int(data["pid"]), data.get("started"), str(data["host"]), str(data.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_owner(path: Path, owner: Owner) -> None:
    path.write_text(json.dumps(asdict(owner)) + "\n")


# --------------------------------------------------------------------------- checks


def _resolved(path: str | Path) -> Path:
    """Absolute, literal: ``~`` is the shell's to expand (a quoted ``'~'`` names a directory called ``~``)."""
    return Path(os.path.abspath(path))


def _related(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_output_path(out: str | Path, force: bool, sources: Iterable[str | Path | None] = (), kind: str = "dir") -> Path:
    """Refuse a bad OUT before any expensive work; returns OUT as given.

    ``sources`` are paths the run reads (a model dir, an artifact, a data
    file); a source that does not exist locally (a hub id) is skipped.
    ``kind`` is ``dir`` or ``file``: what OUT will be.
    """
    if not str(out):
        raise OutputExistsError("the output path is empty; name a directory or file to write")
    if kind == "file" and str(out).endswith(os.sep):
        raise OutputExistsError(f"{out}: ends with {os.sep}, which names a directory; give a file name")
    out = Path(out)
    target = _resolved(out)
    if target == Path(target.anchor):
        raise OutputExistsError(f"{out}: is the file system root; name a new directory for the output")
    cwd = Path.cwd().resolve()
    if kind == "dir" and (target == cwd or target in cwd.parents):
        raise OutputExistsError(f"{out}: is or contains the current directory; name a new directory for the output")
    for source in sources:
        if source is None or not str(source):
            continue
        read = Path(source).expanduser()  # the loaders expand ~ in what they read
        if not read.exists():
            continue
        relation = _related(target, _resolved(read)) or _related(target.resolve(), read.resolve())
        if relation is not None:
            raise OutputExistsError(f"{out}: {relation} {source}, which this run reads; choose an output outside it")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: already exists; pass --force to replace it")
        if kind == "dir" and not out.is_dir():
            raise OutputExistsError(f"{out}: exists and is not a directory")
        if kind == "file" and out.is_dir():
            raise OutputExistsError(f"{out}: is a directory, expected a file name")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"{out}: {parent} is a file, not a directory")
            break
    return out


# --------------------------------------------------------------------------- locking


@dataclass(frozen=True)
class _HeldLock:
    fd: int
    path: Path


_HELD: dict[Path, _HeldLock] = {}  # per process: locks are process state by nature (see the module doc)


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{_LOCK_SUFFIX}")


def _acquire(target: Path) -> _HeldLock:
    """flock ``.<OUT>.lock`` without waiting; the file is removed on release (checked by inode against races)."""
    import fcntl

    path = _lock_path(target)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            exc.filename = str(target.parent)  # name the directory that cannot take OUT, not jev4's lock file
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = None
            for _ in range(20):  # the holder writes its name right after locking
                holder = _read_owner(path)
                if holder is not None:
                    break
                time.sleep(0.05)
            who = holder.describe() if holder else "another process"
            raise OutputLockedError(f"{target}: is being written by {who}; wait for it to finish or stop it") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(asdict(Owner.current())) + "\n").encode())
    return _HeldLock(fd, path)


def _release(lock: _HeldLock) -> None:
    try:
        os.unlink(lock.path)
    except FileNotFoundError:
        pass
    os.close(lock.fd)


@contextmanager
def claim_output(out: str | Path, force: bool = False, sources: Iterable[str | Path | None] = (), kind: str = "dir") -> Iterator[Path]:
    """Check OUT, lock it for the block, and remove what crashed runs to the same OUT left behind."""
    sources = tuple(sources)
    out = check_output_path(out, force, sources, kind)
    target = _resolved(out)
    if target in _HELD:  # this process claimed OUT already (an outer step of the same run): the outer claim releases it
        yield out
        return
    created = [p for p in reversed(target.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _acquire(target)
    _HELD[target] = lock
    try:
        remove_stale(target)
        yield out
    finally:
        del _HELD[target]
        _release(lock)
        for parent in reversed(created):  # parents made for a run that wrote nothing go again
            try:
                parent.rmdir()
            except OSError:
                break


def _owner_of(entry: Path) -> Owner | None:
    """The owner recorded in a temp dir's marker, else the pid in its name (``.<OUT>.tmp-<pid>-...``)."""
    marker = entry / TEMP_MARKER
    owner = _read_owner(marker) if entry.is_dir() else None
    if owner is not None:
        return owner
    tail = entry.name.rsplit(_TEMP_TAG if _TEMP_TAG in entry.name else _OLD_TAG, 1)[-1]  # OUT's own name may hold the tag
    pid = tail.split("-", 1)[0]
    return Owner(int(pid), None, socket.gethostname(), "") if pid.isdigit() else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove_stale(target: Path) -> list[Path]:
    """Remove temp dirs/files of OUT whose writer is gone; called with OUT's lock held.

    A leftover ``.<OUT>.old-*`` (a forced replacement cut between its two
    renames, only where RENAME_EXCHANGE is missing) is put back as OUT when
    OUT itself is missing, so a crash never loses the previous artifact.
    """
    removed: list[Path] = []
    owners: set[int] = set()
    freed = 0
    prefixes = (f".{target.name}{_TEMP_TAG}", f".{target.name}{_OLD_TAG}")
    for name in sorted(os.listdir(target.parent)):
        if not name.startswith(prefixes):
            continue
        entry = target.parent / name
        owner = _owner_of(entry)
        if owner is not None and owner.pid != os.getpid() and owner.alive():
            log.warning("left %s alone: its writer, %s, is still running", entry, owner.describe())
            continue
        if name.startswith(prefixes[1]) and not target.exists():
            os.rename(entry, target)
            log.warning("restored %s from %s (a replacement of it was interrupted)", target, entry)
            continue
        freed += _size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
        if owner is not None:
            owners.add(owner.pid)
    if removed:
        log.warning(
            "removed %d unfinished output(s) of %s left by interrupted runs (pid %s), %.1f MB: %s",
            len(removed),
            target,
            ", ".join(map(str, sorted(owners))) or "unknown",
            freed / 1e6,
            ", ".join(p.name for p in removed),
        )
    return removed + remove_dead_siblings(target)


def remove_dead_siblings(target: Path) -> list[Path]:
    """Remove the temp dirs that dead jev4 runs left beside OUT for *other* outputs.

    Why: an OOM-killed full-size export leaves a 24 GB temp dir, and the next
    run in the same directory (a benchmark exporting format after format) then
    fails for want of disk although nothing there is worth keeping. Only temp
    dirs that carry jev4's owner marker, whose owner is provably gone (same
    host, pid dead or reused), are removed; temp files, ``.old-*`` backups
    (the restore path of their own OUT) and anything of another host stay.
    A concurrent sweeper removing the same dir is harmless.
    """
    removed: list[Path] = []
    own_prefix = f".{target.name}{_TEMP_TAG}"
    for name in sorted(os.listdir(target.parent)):
        if not name.startswith(".") or _TEMP_TAG not in name or name.startswith(own_prefix):
            continue
        entry = target.parent / name
        if entry.is_symlink() or not entry.is_dir():
            continue
        owner = _read_owner(entry / TEMP_MARKER)
        if owner is None or owner.alive():
            continue
        freed = _size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            log.warning("removed %s (%.1f MB): an unfinished output of a run that is gone (%s)", entry, freed / 1e6, owner.describe())
    return removed


# --------------------------------------------------------------------------- errors while writing

_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
_MESSAGE_ERRNO = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT, "StorageFull": errno.ENOSPC, "problem writing element": errno.EIO}  # the last: numpy's short write


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, its explicit cause, or a library's wrapped message (safetensors, torch.onnx).

    Only ``raise ... from`` chains are followed: an OSError that was merely
    being handled when another error arose is not that error's reason.
    """
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        for text, code in _MESSAGE_ERRNO.items():
            if text in str(current):
                return OSError(code, text)
        current = current.__cause__
    return None


def _name_output(exc: BaseException, out: Path) -> None:
    """A write error that names no file (a full disk inside a library) is about OUT: raise it as an OSError naming OUT."""
    found = os_error_in(exc)
    if found is None or found.errno not in _WRITE_ERRNOS:
        return
    if found is exc and exc.filename is not None:
        return
    raise OSError(found.errno, found.strerror or os.strerror(found.errno), str(out)) from exc


# --------------------------------------------------------------------------- temp dirs and publication


def temp_owner(path: str | Path) -> Owner | None:
    """The owner if ``path`` is an unfinished jev4 output (a temp dir), else None."""
    path = Path(path)
    if (path / TEMP_MARKER).is_file():
        return _read_owner(path / TEMP_MARKER) or Owner(-1, None, "?", "")
    name = path.name
    if name.startswith(".") and (_TEMP_TAG in name or _OLD_TAG in name):
        return _owner_of(path) or Owner(-1, None, "?", "")
    return None


def check_not_temp_dir(path: str | Path) -> None:
    """Refuse to use an unfinished output: it may be complete-looking but was never published."""
    owner = temp_owner(path)
    if owner is not None:
        by = f"by {owner.describe()}" if owner.pid > 0 else "by an earlier run"
        raise Jev4Error(
            f"{path}: is an unfinished jev4 output (a temporary directory written {by} that never completed); "
            "the next run to the same output removes it, or delete it yourself"
        )


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{_TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the call or the flag is not supported (then the caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is None:
        return False
    at_fdcwd = -100
    if func(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out``: never over an OUT that appeared meanwhile unless ``force``; never a moment without OUT."""
    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
        exists = out.exists() or out.is_symlink()
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        exists = True
    if exists and not force:
        raise OutputExistsError(f"{out}: appeared while jev4 was writing it (not by jev4: it would hold the lock); left it as it is")
    if not exists:
        os.rename(tmp, out)
        return
    if tmp.is_dir() and out.is_dir() and not out.is_symlink() and _renameat2(tmp, out, _RENAME_EXCHANGE):
        shutil.rmtree(tmp)  # now the previous OUT
        return
    if tmp.is_file():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}{_OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _publish_permissions(root: Path) -> None:
    """mkdtemp-style private modes would leak into the artifact; give it the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod((0o777 if root.is_dir() else 0o666) & ~umask)
    if root.is_dir():
        for path in root.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, sources: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds (see the module doc)."""
    with claim_output(out, force, sources, kind="dir") as out:
        target = _resolved(out)
        tmp = _temp_name(target)
        tmp.mkdir(mode=0o700)
        try:
            _write_owner(tmp / TEMP_MARKER, Owner.current())
            yield tmp
            (tmp / TEMP_MARKER).unlink()
            _publish_permissions(tmp)
            _publish(tmp, target, force)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            _name_output(exc, out)
            raise
    log.info("wrote %s", out)


@contextmanager
def atomic_output_file(out: str | Path, force: bool = False, sources: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary file path (beside ``out``) that becomes ``out`` when the block succeeds."""
    with claim_output(out, force, sources, kind="file") as out:
        target = _resolved(out)
        tmp = _temp_name(target)
        try:
            yield tmp
            if not tmp.is_file():
                raise Jev4Error(f"{out}: the writer produced no file")  # a bug in the caller, named plainly
            _publish_permissions(tmp)
            _publish(tmp, target, force)
        except BaseException as exc:
            if tmp.is_dir() and not tmp.is_symlink():  # a writer that made a directory: its error, not unlink's, is the news
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            _name_output(exc, out)
            raise
    log.info("wrote %s", out)
