"""A serving engine as a child process: started on a free loopback port, ready when its health URL answers, always stopped.

Every engine jev4 drives as its users do (vLLM, Triton, infinity-emb) runs
from an environment of its own (its own pins), so it is a separate process;
this module holds what they share: the port, the bounded wait for readiness,
the log tail that explains a failed start, stopping, and JSON over HTTP with
errors that name the URL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from collections import deque
from pathlib import Path
from threading import Thread

from jev4.errors import Jev4Error

log = logging.getLogger(__name__)


class ServingError(Jev4Error):
    """A server could not start, stopped answering, or answered something that is not an embedding."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def engine_python(venv: str | Path, variable: str) -> str:
    """The python of an engine's own venv: ``$variable`` if set, else ``<venv>/bin/python`` in the working
    directory, else beside jev4's source (the checkout where ``make`` built it), so it is found from anywhere."""
    if os.environ.get(variable):
        return os.environ[variable]
    relative = Path(venv) / "bin" / "python"
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / relative).is_file():
            return str(base / relative)
    return str(relative)


class ServerOwner:
    """For an encoder over a server: ``close()`` (or leaving ``with``) stops the server the encoder started.

    A server given by URL is someone else's and is left running.
    """

    server = None

    def own_server(self, server) -> None:
        self.server = server
        if server is not None:
            weakref.finalize(self, server.stop)  # a safety net: close() or `with` is the way

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


class ServerProcess:
    """One engine's server as a context manager: ``__enter__`` returns once ``health_url`` answers 200."""

    def __init__(self, name: str, command: list[str], health_url: str, startup_timeout: float, env: dict[str, str] | None = None, make_env: str = ""):
        if not Path(command[0]).is_file():
            raise ServingError(f"{command[0]}: no {name} environment; build it with {make_env or 'its make target'} (or point python= at one)")
        self.name = name
        self.command = command
        self.health_url = health_url
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.log_tail: deque[str] = deque(maxlen=40)

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True)
        Thread(target=self._drain, daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _drain(self) -> None:
        for line in self.process.stdout:  # keep the pipe empty; the tail explains a failed start
            self.log_tail.append(line.rstrip())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the drain thread read the last lines
                raise ServingError(f"{self.name} exited with code {self.process.returncode} while starting: " + " | ".join(list(self.log_tail)[-5:]))
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServingError(f"{self.name} did not become ready at {self.health_url} within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        """Terminate the server and everything it spawned (its process group); kill what is left after 30 s.

        The group is swept even when the server itself is already gone: an
        engine's workers (vLLM's engine core) outlive a killed server otherwise.
        """
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the server leads its own group
        if self.process.poll() is None:
            _signal_group(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(group, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + 10
        while _live_members(group) and time.monotonic() < deadline:
            _signal_group(group, signal.SIGTERM)
            time.sleep(0.2)
        if _live_members(group):
            _signal_group(group, signal.SIGKILL)
            deadline = time.monotonic() + 5  # SIGKILL is not instant: return once they are gone
            while _live_members(group) and time.monotonic() < deadline:
                time.sleep(0.05)


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _live_members(group: int) -> list[int]:
    """Pids of the process group that still run (zombies do not count: they hold nothing)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


def post_json(url: str, body: dict, timeout: float, engine: str) -> dict:
    """POST ``body`` as JSON, return the JSON answer; any failure is a ServingError naming ``url``."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServingError(f"{url}: HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out: the server is gone or stuck
        raise ServingError(f"{url}: no answer from the {engine} server ({getattr(exc, 'reason', exc)}); is it running?") from None
    except json.JSONDecodeError as exc:
        raise ServingError(f"{url}: the answer is not JSON ({exc})") from None
