"""What every jev4 command shares: the common flags, logging, signals, and the one error boundary.

The boundary decides what a user sees when a run stops early:

- bad input (a ``Jev4Error``) or a problem of the machine (an ``OSError``:
  permission, no space, a path that is a file, a name too long; memory):
  one line naming the path or value and what to do, exit code 2;
- SIGTERM or SIGHUP (``timeout``, ``docker stop``, a closed terminal):
  handled like Ctrl-C, so every ``with`` block cleans up its temporary
  output; exit code 128 + the signal number (130 for Ctrl-C);
- anything else is a bug in jev4: its traceback, labelled as a bug to
  report, exit code 70 (EX_SOFTWARE), so scripts can tell it from a failed
  check (``jev4 validate`` exits 1 for a FAIL verdict).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from jev4.atomic import os_error_in
from jev4.errors import Jev4Error

log = logging.getLogger("jev4")

EXIT_BAD_INPUT = 2
EXIT_BUG = 70
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_CHATTY_LOGGERS = ("transformers", "huggingface_hub", "sentence_transformers", "onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx")


class Interrupted(BaseException):
    """A handled signal arrived; a BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage before a bad-option error; jev4 prints one line (the usage is --help's job)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def common_flags() -> argparse.ArgumentParser:
    """The flags every command takes (a parent parser; defaults suppressed so a top-level ``-v`` survives)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging, and the warnings of the libraries jev4 drives")
    parent.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return parent


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbose:
        return
    # The exporters and model libraries warn about things jev4 already handles; -v shows them.
    # torch configures its own loggers when imported (later, lazily): TORCH_LOGS is how to reach them.
    os.environ.setdefault("TORCH_LOGS", "-onnx,-export,-dynamo")
    warnings.filterwarnings("ignore")
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Interrupted`` in the main thread; a repeat is ignored so cleanup is not cut short."""

    def handler(signum, frame):
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded; free some space or write somewhere else",
    errno.EACCES: "permission denied; choose a location you may use, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a location you may use, or fix its permissions",
    errno.EROFS: "read-only file system; choose a writable location",
    errno.ENOTDIR: "a part of this path is a file, not a directory",
    errno.EISDIR: "is a directory, expected a file",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.ENOENT: "no such file or directory",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.EFBIG: "file too large for this file system or limit (ulimit -f)",
    errno.EIO: "the write failed (is the disk full or failing?)",
}
def describe_os_error(exc: OSError) -> str:
    """One line: the path, what went wrong, what to do; nothing was published (atomic outputs)."""
    what = _OS_ADVICE.get(exc.errno, exc.strerror or str(exc))
    where = exc.filename if exc.filename is not None else "writing the output"
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {what} (errno {errno.errorcode.get(exc.errno, exc.errno)}); nothing was written to the output"


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand inside the error boundary (see the module doc)."""
    setup_logging(getattr(args, "verbose", False))
    try:
        with signals_as_interrupts():
            return handler(args)
    except Jev4Error as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        log.error("stopped by %s; unfinished output removed", exc)
        return 128 + exc.signum
    except KeyboardInterrupt:
        log.error("interrupted (Ctrl-C); unfinished output removed")
        return 128 + signal.SIGINT
    except MemoryError:
        log.error("out of memory; use a smaller --batch-size or a machine with more memory; nothing was written to the output")
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the boundary: machine problems are one line, everything else is a bug
        found = os_error_in(exc)
        if found is not None:
            log.error("%s", describe_os_error(found))
            return EXIT_BAD_INPUT
        if isinstance(exc, OSError):  # no errno: a library's own OSError (an unreadable file), still about the input
            log.error("%s", exc)
            return EXIT_BAD_INPUT
        log.critical("jev4 hit a bug (not a problem with your input): please report it with this traceback", exc_info=True)
        return EXIT_BUG
