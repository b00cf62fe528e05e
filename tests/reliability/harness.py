"""Running jev4's console scripts as a user does, and stopping them at chosen moments.

A run is stopped when a condition on the file system becomes true (the
temporary output appears, a weight file in it starts growing, ...), polled
every few milliseconds: the points are the real phases of a real run, not
hooks inside jev4.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        """The ERROR/CRITICAL lines of the log (jev4 logs to stderr)."""
        return [line for line in self.stderr.splitlines() if line.startswith(("ERROR", "CRITICAL"))]

    def one_error(self) -> str:
        """The single error line a bad input must give, with no traceback."""
        assert TRACEBACK not in self.stderr, self.stderr
        assert len(self.errors) == 1, self.stderr
        return self.errors[0]


def command(name: str, *args: str) -> list[str]:
    """``jev4`` or ``jev4-export`` of this environment's venv, with arguments."""
    return [str(BIN / name), *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: Sequence[str], cwd: Path | None = None, timeout: float = 600, stdin: str | None = None) -> Result:
    done = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env(), input=stdin)
    return Result(done.returncode, done.stdout, done.stderr)


def temp_entries(out: Path) -> list[Path]:
    """jev4's temporary outputs of ``out`` (``.<name>.tmp-*``), and its lock file."""
    parent = out.parent
    if not parent.is_dir():
        return []
    return sorted(parent / n for n in os.listdir(parent) if n.startswith((f".{out.name}.tmp-", f".{out.name}.old-", f".{out.name}.lock")))


def temp_dir(out: Path) -> Path | None:
    dirs = [p for p in temp_entries(out) if p.is_dir()]
    return dirs[0] if dirs else None


def when_temp_dir(out: Path) -> Callable[[], bool]:
    return lambda: temp_dir(out) is not None


def when_growing(out: Path, filename: str, min_bytes: int = 1) -> Callable[[], bool]:
    """True once ``filename`` inside the temp dir holds at least ``min_bytes``: the run is writing it."""

    def check() -> bool:
        tmp = temp_dir(out)
        if tmp is None:
            return False
        try:
            return (tmp / filename).stat().st_size >= min_bytes
        except OSError:
            return False

    return check


def when_locked(out: Path) -> Callable[[], bool]:
    """True once the run holds OUT's lock (it is loading or computing; nothing written yet)."""
    return lambda: (out.parent / f".{out.name}.lock").exists()


def run_and_stop(cmd: Sequence[str], condition: Callable[[], bool], sig: int, timeout: float = 600) -> Result:
    """Start ``cmd``, send ``sig`` when ``condition()`` first holds, and wait for the process to end.

    Fails the test if the run finished before the condition held (the point was never reached).
    """
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the stop point was reached:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the stop point was not reached in time")
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, err)


SIGTERM, SIGKILL, SIGHUP = signal.SIGTERM, signal.SIGKILL, signal.SIGHUP
