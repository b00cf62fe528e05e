"""An encoder over a vLLM server: jev4's encode API, answered by the engine serving teams deploy.

vLLM pins libraries of its own, so it runs in its own environment
(``make vllm-env`` builds ``.venv-vllm``) and jev4 drives it as its users do:
``VllmServer`` starts the real OpenAI-compatible server on a free loopback
port, waits for ``/health`` and always stops it; ``VllmEncoder`` talks to any
running server (``url``).

jev4 tokenizes (prompts included) and sends token ids, so the engine sees
exactly the inputs every other backend sees. A vLLM server runs one pooling
task, chosen at start:

- ``embed`` (the default): ``/v1/embeddings`` answers mean-pooled, normalised
  vectors (``modules.json`` of the --text-only export); single vectors only.
- ``token_embed`` (``--pooler-config '{"task": "token_embed", "use_activation":
  false}'``): ``/pooling`` answers every token's last hidden state; jev4 pools
  them into the single vector and applies the export's projector for the
  multi-vectors, so one server gives both.

Matryoshka truncation is jev4's, as for any backend.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from jev4.errors import EncodeError, SettingsError
from jev4.model.config import JinaV4Config
from jev4.model.encoder import Encoder
from jev4.model.pooling import multi_vector, single_vector
from jev4.model.preprocess import ModelInputs, Preprocessor
from jev4.runtime.server_process import ServerOwner, ServerProcess, ServingError, engine_python, free_port, post_json

log = logging.getLogger(__name__)

DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")
SERVED_NAME = "jev4"
POOLING_TASKS = ("embed", "token_embed")
TOKEN_EMBED_POOLER = {"task": "token_embed", "use_activation": False}  # raw last hidden states: jev4 pools and projects


def check_pooling(pooling: str) -> str:
    if pooling not in POOLING_TASKS:
        raise SettingsError(f"vLLM pooling {pooling!r}: choose one of {POOLING_TASKS}")
    return pooling


@dataclass(frozen=True)
class VllmServerSettings:
    """How to start ``vllm.entrypoints.openai.api_server`` for one artifact.

    ``kv_cache_gib`` bounds the CPU KV cache: by default vLLM's CPU worker
    reserves (and touches) nearly all of the machine's memory for it.
    """

    artifact: str
    python: str = field(default_factory=lambda: engine_python(DEFAULT_VLLM_PYTHON.parents[1], "JEV4_VLLM_PYTHON"))  # $JEV4_VLLM_PYTHON, or .venv-vllm here or beside jev4
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    pooling: str = "embed"
    max_model_len: int = 8192
    dtype: str = "float32"
    kv_cache_gib: int = 1
    startup_timeout: float = 600.0

    def __post_init__(self) -> None:
        check_pooling(self.pooling)

    def command(self, port: int) -> list[str]:
        command = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.artifact, "--served-model-name", SERVED_NAME, "--runner", "pooling",
            "--host", self.host, "--port", str(port),
            "--max-model-len", str(self.max_model_len), "--dtype", self.dtype, "--enforce-eager",
        ]  # fmt: skip
        if self.pooling == "token_embed":
            command += ["--pooler-config", json.dumps(TOKEN_EMBED_POOLER)]
        return command

    def env(self) -> dict[str, str]:
        return {"VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib)}


class VllmServer(ServerProcess):
    """The real vLLM server as a context manager: ready when ``/health`` answers 200, always stopped on exit."""

    def __init__(self, settings: VllmServerSettings):
        self.settings = settings
        self.port = settings.port or free_port(settings.host)
        health = f"http://{settings.host}:{self.port}/health"
        super().__init__("vLLM", settings.command(self.port), health, settings.startup_timeout, settings.env(), make_env="make vllm-env")

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}/v1"

    def __enter__(self) -> VllmServer:
        super().__enter__()
        log.info("vLLM (%s pooling) serving %s at %s", self.settings.pooling, self.settings.artifact, self.url)
        return self


class VllmEncoder(ServerOwner, Encoder):
    """``encode_text`` through a vLLM server: ``/v1/embeddings`` (embed) or ``/pooling`` (token_embed, + multi-vectors).

    ``pooling=None`` asks the server which task it runs (one token through
    ``/pooling``). ``projector`` (the export's) turns token states into
    multi-vectors; without it a token_embed server still gives single vectors.
    """

    def __init__(
        self,
        url: str,
        config: JinaV4Config,
        preprocessor: Preprocessor,
        pooling: str | None = None,
        projector: nn.Linear | None = None,
        model: str = SERVED_NAME,
        timeout: float = 120.0,
        server: VllmServer | None = None,
    ):
        super().__init__(config, preprocessor, (config.merged_task,) if config.merged_task else config.task_names)
        self.url = url.rstrip("/")
        self.base_url = self.url.removesuffix("/v1")  # /pooling, /version and /health sit beside /v1
        self.model = model
        self.timeout = timeout
        self.projector = projector
        self._pooling = None if pooling is None else check_pooling(pooling)
        self.own_server(server)  # the server this encoder started (load(..., backend=...)); stopped by close()

    @property
    def pooling(self) -> str:
        """The server's pooling task: given, or asked once."""
        if self._pooling is None:
            try:
                self._post(f"{self.base_url}/pooling", {"model": self.model, "input": [[0]], "task": "token_embed"})
                self._pooling = "token_embed"
            except ServingError as exc:
                if "HTTP" not in str(exc):
                    raise  # no answer at all: the server is not there
                self._pooling = "embed"
        return self._pooling

    @property
    def supports_images(self) -> bool:
        return False

    @property
    def supports_multivector(self) -> bool:
        return self.projector is not None and self.pooling == "token_embed"

    def engine(self) -> str:
        """``vLLM <version> (<pooling> pooling, <url>)``, the version as the server reports it (``/version``), for reports."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/version", timeout=10) as response:
                version = json.loads(response.read())["version"]
        except (urllib.error.URLError, OSError, KeyError, ValueError, TypeError) as exc:
            raise ServingError(f"{self.base_url}/version: no vLLM version answer ({getattr(exc, 'reason', exc)})") from None
        return f"vLLM {version} ({self.pooling} pooling, {self.url})"

    def encode_text(self, texts, *args, return_multivector: bool = False, **kwargs):
        if return_multivector and not self.supports_multivector:
            why = "the export's projector was not given" if self.projector is None else "this server runs the embed pooler"
            raise EncodeError(
                f"{self.url}: multi-vectors need a vLLM server started with --pooler-config '{json.dumps(TOKEN_EMBED_POOLER)}' "
                f"(load(..., backend='vllm', vllm_pooling='token_embed')), and {why}"
            )
        return super().encode_text(texts, *args, return_multivector=return_multivector, **kwargs)

    def encode_image(self, images, *args, **kwargs):
        raise EncodeError(f"{self.url}: the text-only export vLLM serves has no vision tower; encode images with the torch or onnxruntime backend")

    def _post(self, url: str, body: dict) -> dict:
        return post_json(url, body, self.timeout, "vLLM")

    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [row[: int(length)].tolist() for row, length in zip(inputs.input_ids, inputs.lengths)]
        if self.pooling == "token_embed":
            return self._forward_tokens(ids, inputs)
        url = f"{self.url}/embeddings"
        answer = self._post(url, {"model": self.model, "input": ids, "encoding_format": "float"})
        single = self._rows(answer, url, lambda row: torch.tensor(row["embedding"], dtype=torch.float32))
        single = torch.stack(single)
        if single.shape != (len(ids), self.config.hidden_size):
            raise ServingError(f"{url}: got {tuple(single.shape)} vectors, expected ({len(ids)}, {self.config.hidden_size})")
        return torch.nn.functional.normalize(single, dim=-1), torch.zeros(len(ids), 0, 0)

    def _forward_tokens(self, ids: list[list[int]], inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        url = f"{self.base_url}/pooling"
        answer = self._post(url, {"model": self.model, "input": ids, "task": "token_embed", "encoding_format": "float"})
        states = self._rows(answer, url, lambda row: torch.tensor(row["data"], dtype=torch.float32))
        width = inputs.input_ids.shape[1]
        hidden = torch.zeros(len(ids), width, self.config.hidden_size)
        for row, (tokens, state) in enumerate(zip(ids, states)):
            if state.shape != (len(tokens), self.config.hidden_size):
                raise ServingError(f"{url}: input {row} got token states {tuple(state.shape)}, expected ({len(tokens)}, {self.config.hidden_size})")
            hidden[row, : len(tokens)] = state  # jev4 pads on the right
        single = single_vector(hidden, inputs.pooling_mask)
        if self.projector is None:
            return single, torch.zeros(len(ids), 0, 0)
        with torch.inference_mode():
            multi = multi_vector(self.projector(hidden.to(self.projector.weight.dtype)), inputs.attention_mask)
        return single, multi

    @staticmethod
    def _rows(answer: dict, url: str, convert) -> list[torch.Tensor]:
        try:
            return [convert(row) for row in sorted(answer["data"], key=lambda item: item["index"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ServingError(f"{url}: not a pooling answer ({exc}): {str(answer)[:200]}") from None
