"""ServerProcess: the bounded start and the full stop every engine server relies on, on a stand-in server (python's http.server)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from jev4.runtime.server_process import ServerProcess, ServingError, _live_members, free_port, post_json

# A server that, like vLLM's api server, spawns a worker that ignores SIGTERM, then serves HTTP.
STUBBORN = (
    "import subprocess, sys; "
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
    "import http.server; http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')"
)


def _stubborn(port: int, timeout: float = 30.0) -> ServerProcess:
    return ServerProcess("stand-in", [sys.executable, "-c", STUBBORN, str(port)], f"http://127.0.0.1:{port}/", timeout)


@pytest.mark.parametrize("leader_killed_first", [False, True])
def test_stop_leaves_no_process_of_the_group(tmp_path, monkeypatch, leader_killed_first):
    """A worker that ignores SIGTERM is killed too, also when the server itself died first (its workers orphaned)."""
    monkeypatch.chdir(tmp_path)
    port = free_port()
    server = _stubborn(port).__enter__()
    group = server.process.pid
    deadline = time.monotonic() + 10
    while len(_live_members(group)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_live_members(group)) == 2  # the server and its stubborn worker
    if leader_killed_first:
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        assert len(_live_members(group)) == 1  # the orphan still runs
    server.stop()
    assert _live_members(group) == []


def test_a_server_that_exits_while_starting_names_its_last_words():
    port = free_port()
    command = [sys.executable, "-c", "import sys; print('cannot load the model: no such folder'); sys.exit(3)"]
    with pytest.raises(ServingError, match=r"stand-in exited with code 3 while starting: cannot load the model: no such folder"):
        ServerProcess("stand-in", command, f"http://127.0.0.1:{port}/", 30).__enter__()


def test_not_ready_in_time_is_an_error_and_the_server_is_stopped():
    port = free_port()
    server = ServerProcess("stand-in", [sys.executable, "-c", "import time; time.sleep(600)"], f"http://127.0.0.1:{port}/", 1.5)
    started = time.monotonic()
    with pytest.raises(ServingError, match=rf"stand-in did not become ready at http://127.0.0.1:{port}/ within 2 s"):
        server.__enter__()
    assert time.monotonic() - started < 30
    assert server.process.poll() is not None and _live_members(server.process.pid) == []


def test_missing_environment_names_the_make_target(tmp_path):
    with pytest.raises(ServingError, match=r"nowhere/bin/python: no vLLM environment; build it with make vllm-env"):
        ServerProcess("vLLM", [str(tmp_path / "nowhere/bin/python")], "http://127.0.0.1:9/", 1, make_env="make vllm-env")


def test_post_json_errors_name_the_url():
    with pytest.raises(ServingError, match=r"http://127.0.0.1:9/embeddings: no answer from the vLLM server"):
        post_json("http://127.0.0.1:9/embeddings", {"input": []}, 5, "vLLM")
