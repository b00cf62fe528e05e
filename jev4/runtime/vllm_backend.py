"""An encoder over a vLLM server: jev4's encode API, answered by the engine serving teams deploy.

vLLM pins libraries of its own, so it runs in its own environment
(``make vllm-env`` builds ``.venv-vllm``) and jev4 drives it as its users do:
``VllmServer`` starts the real OpenAI-compatible server on a free loopback
port, waits for ``/health`` and always stops it; ``VllmEncoder`` talks to any
running server (``url``) through ``/v1/embeddings``.

jev4 tokenizes (prompts included) and sends token ids, so the engine sees
exactly the inputs every other backend sees; vLLM mean-pools and normalises
on its side (``modules.json`` of the --text-only export), and jev4 applies
Matryoshka truncation as for any backend. Multi-vectors need vLLM's
``token_embed`` pooler, which a server started for embeddings does not run:
asking for them is an error that says so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

import torch

from jev4.errors import EncodeError, Jev4Error
from jev4.model.config import JinaV4Config
from jev4.model.encoder import Encoder
from jev4.model.preprocess import ModelInputs, Preprocessor

log = logging.getLogger(__name__)

DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")
SERVED_NAME = "jev4"


class ServingError(Jev4Error):
    """A server could not start, stopped answering, or answered something that is not an embedding."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class VllmServerSettings:
    """How to start ``vllm.entrypoints.openai.api_server`` for one artifact."""

    artifact: str
    python: str = str(DEFAULT_VLLM_PYTHON)
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    max_model_len: int = 8192
    dtype: str = "float32"
    startup_timeout: float = 600.0

    def command(self, port: int) -> list[str]:
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.artifact, "--served-model-name", SERVED_NAME, "--runner", "pooling",
            "--host", self.host, "--port", str(port),
            "--max-model-len", str(self.max_model_len), "--dtype", self.dtype, "--enforce-eager",
        ]  # fmt: skip


class VllmServer:
    """The real vLLM server as a context manager: started on enter (ready when ``/health`` answers 200), always stopped on exit."""

    def __init__(self, settings: VllmServerSettings):
        if not Path(settings.python).is_file():
            raise ServingError(f"{settings.python}: no vLLM environment; build it with make vllm-env (or point python= at one)")
        self.settings = settings
        self.port = settings.port or free_port(settings.host)
        self.process: subprocess.Popen | None = None
        self.log_tail: deque[str] = deque(maxlen=40)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}/v1"

    def __enter__(self) -> VllmServer:
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        self.process = subprocess.Popen(self.settings.command(self.port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        Thread(target=self._drain, daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("vLLM serving %s at %s", self.settings.artifact, self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _drain(self) -> None:
        for line in self.process.stdout:  # keep the pipe empty; the tail explains a failed start
            self.log_tail.append(line.rstrip())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout
        health = f"http://{self.settings.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(f"vLLM exited with code {self.process.returncode} while starting on {self.settings.artifact}: " + " | ".join(list(self.log_tail)[-5:]))
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServingError(f"vLLM did not become ready at {health} within {self.settings.startup_timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class VllmEncoder(Encoder):
    """``encode_text`` through a vLLM server's ``/v1/embeddings`` (single vectors)."""

    def __init__(
        self, url: str, config: JinaV4Config, preprocessor: Preprocessor, model: str = SERVED_NAME, timeout: float = 120.0, server: VllmServer | None = None
    ):
        super().__init__(config, preprocessor, (config.merged_task,) if config.merged_task else config.task_names)
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.server = server  # the server this encoder started (load(..., backend="vllm")); stopped by close()
        if server is not None:
            weakref.finalize(self, server.stop)  # a safety net: close() or `with` is the way

    def __enter__(self) -> VllmEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server this encoder started (a server given by url is left running)."""
        if self.server is not None:
            self.server.stop()

    def encode_text(self, texts, *args, return_multivector: bool = False, **kwargs):
        if return_multivector:
            raise EncodeError(
                f"{self.url}: multi-vectors need vLLM's token_embed pooler, which a server started for embeddings does not run; "
                "use another backend for multi-vectors"
            )
        return super().encode_text(texts, *args, **kwargs)

    def encode_image(self, images, *args, **kwargs):
        raise EncodeError(f"{self.url}: the text-only export vLLM serves has no vision tower; encode images with the torch or onnxruntime backend")

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ServingError(f"{self.url}{path}: HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out: the server is gone or stuck
            raise ServingError(f"{self.url}{path}: no answer from the vLLM server ({getattr(exc, 'reason', exc)}); is it running?") from None

    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [row[: int(length)].tolist() for row, length in zip(inputs.input_ids, inputs.lengths)]
        answer = self._post("/embeddings", {"model": self.model, "input": ids, "encoding_format": "float"})
        try:
            rows = sorted(answer["data"], key=lambda item: item["index"])
            single = torch.tensor([row["embedding"] for row in rows], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ServingError(f"{self.url}/embeddings: not an embeddings answer ({exc}): {str(answer)[:200]}") from None
        if single.shape != (len(ids), self.config.hidden_size):
            raise ServingError(f"{self.url}/embeddings: got {tuple(single.shape)} vectors, expected ({len(ids)}, {self.config.hidden_size})")
        return torch.nn.functional.normalize(single, dim=-1), torch.zeros(len(ids), 0, 0)
