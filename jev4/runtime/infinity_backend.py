"""An encoder over an infinity-emb server: jev4's encode API, answered by a popular open-source embedding server.

infinity-emb 0.0.78 pins numpy<2 and transformers 4.x, so it runs in its own
environment (``make infinity-env`` builds ``.venv-infinity``) and jev4 drives
it as its users do: ``InfinityServer`` starts ``infinity_emb v2`` (torch
engine, CPU) on a free loopback port, waits for ``/health`` and always stops
it; ``InfinityEncoder`` talks to any running server (``url``) through its
OpenAI-compatible ``/embeddings``.

infinity loads the --text-only export as the sentence-transformers folder it
is (Qwen2 + mean pooling + Normalize) but applies no prompts, and it takes
strings, not token ids. So jev4 applies the prompts and its own truncation
(``Encoder.encode_text``), and sends each row's kept tokens decoded back to
text; infinity re-tokenizes them with the same tokenizer. The one difference
is whitespace: infinity strips leading and trailing whitespace from every
input (its request schema and sentence-transformers both do), so a text that
ends in whitespace is embedded without it; the encoder logs a warning then.

Its embeddings route returns pooled vectors only: multi-vectors and images
are refused with a message that says so.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jev4.errors import EncodeError, SettingsError
from jev4.model.config import JinaV4Config
from jev4.model.encoder import SHORT_TEXT, Encoder
from jev4.model.preprocess import ModelInputs, Preprocessor
from jev4.runtime.server_process import ServerOwner, ServerProcess, ServingError, engine_python, free_port, post_json

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_INFINITY_PYTHON", "InfinityEncoder", "InfinityServer", "InfinityServerSettings"]

DEFAULT_INFINITY_PYTHON = Path(".venv-infinity/bin/python")
SERVED_NAME = "jev4"
ENGINE = "infinity-emb"


@dataclass(frozen=True)
class InfinityServerSettings:
    """How to start ``infinity_emb v2`` for one --text-only export.

    ``threads`` bounds torch's intra-op threads (OMP/MKL): the machines jev4
    is tested on are shared, and infinity otherwise takes every core.
    ``batch_size`` is infinity's dynamic-batching limit.
    """

    artifact: str
    python: str = field(default_factory=lambda: engine_python(DEFAULT_INFINITY_PYTHON.parents[1], "JEV4_INFINITY_PYTHON"))  # $JEV4_INFINITY_PYTHON, or .venv-infinity here or beside jev4
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    batch_size: int = 8
    threads: int = 1
    log_level: str = "warning"
    startup_timeout: float = 180.0

    def __post_init__(self) -> None:
        if self.port is not None and not 0 < self.port < 65536:
            raise SettingsError(f"infinity port must be in 1..65535, got {self.port}")
        if self.batch_size < 1 or self.threads < 1:
            raise SettingsError(f"infinity batch_size and threads must be >= 1, got {self.batch_size} and {self.threads}")
        if not self.startup_timeout > 0:
            raise SettingsError(f"infinity startup_timeout must be > 0 seconds, got {self.startup_timeout}")

    def command(self, port: int) -> list[str]:
        """The CLI as infinity documents it, with what jev4 needs spelled out.

        No remote code (infinity's default is to trust it; the export needs
        none), no torch.compile and no BetterTransformer (the eager fp32
        forward is what parity is measured against), no disk cache of vectors.
        """
        return [
            self.python, "-c", "from infinity_emb.cli import cli; cli()", "v2",
            "--model-id", self.artifact, "--served-model-name", SERVED_NAME,
            "--host", self.host, "--port", str(port),
            "--engine", "torch", "--device", "cpu", "--dtype", "float32",
            "--batch-size", str(self.batch_size),
            "--no-trust-remote-code", "--no-compile", "--no-bettertransformer",
            "--no-vector-disk-cache", "--no-model-warmup", "--log-level", self.log_level,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """Threads bounded, no telemetry, no Hub look-ups (the model is a local folder)."""
        threads = str(self.threads)
        return {
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
            "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1",
        }  # fmt: skip


class InfinityServer(ServerProcess):
    """The real infinity-emb server as a context manager: started on enter, ready when it serves ``jev4``, always stopped."""

    def __init__(self, settings: InfinityServerSettings):
        self.settings = settings
        self.port = settings.port or free_port(settings.host)
        super().__init__(
            ENGINE, settings.command(self.port), f"{self.url}/health", settings.startup_timeout,
            env=settings.environment(), make_env="make infinity-env",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def __enter__(self) -> InfinityServer:
        super().__enter__()
        try:
            self._check_serves_jev4()
        except BaseException:
            self.stop()
            raise
        log.info("infinity-emb serving %s at %s (pid %d)", self.settings.artifact, self.url, self.process.pid)
        return self

    def _check_serves_jev4(self) -> None:
        """A free port can be taken between our probe and the server's bind: make sure the answering server is ours."""
        models = f"{self.url}/models"
        try:
            with urllib.request.urlopen(models, timeout=10) as response:
                served = [item.get("id") for item in json.loads(response.read()).get("data", [])]
        except (urllib.error.URLError, OSError, ValueError, AttributeError) as exc:
            raise ServingError(f"{models}: could not list the served models ({exc})") from None
        if SERVED_NAME not in served or self.process.poll() is not None:
            raise ServingError(f"{models}: serves {served}, not {SERVED_NAME!r}; another server holds port {self.port}?")


class InfinityEncoder(ServerOwner, Encoder):
    """``encode_text`` through an infinity-emb server's ``/embeddings`` (single vectors); jev4 applies the prompts."""

    def __init__(
        self,
        url: str,
        config: JinaV4Config,
        preprocessor: Preprocessor,
        server: InfinityServer | None = None,
        model: str = SERVED_NAME,
        timeout: float = 120.0,
    ):
        super().__init__(config, preprocessor, (config.merged_task,) if config.merged_task else config.task_names)
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self._whitespace_warned = False
        self._version: str | None = None
        self.own_server(server)  # the server this encoder started (load(..., backend=...)); stopped by close()

    @property
    def supports_images(self) -> bool:
        return False

    @property
    def supports_multivector(self) -> bool:
        return False

    def engine(self) -> str:
        """``infinity-emb 0.0.78 at URL``: the version its OpenAPI document reports (a report must name what answered)."""
        if self._version is None:
            try:
                with urllib.request.urlopen(f"{self.url}/openapi.json", timeout=5) as response:
                    self._version = str(json.loads(response.read())["info"]["version"])
            except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
                return f"{ENGINE} (version unknown) at {self.url}"
        return f"{ENGINE} {self._version} at {self.url}"

    def encode_text(self, texts, *args, return_multivector: bool = False, **kwargs):
        if return_multivector:
            raise EncodeError(
                f"{self.url}: infinity-emb's /embeddings returns pooled vectors only, so there are no multi-vectors; "
                "use the torch, onnxruntime or vLLM (token_embed) backend for multi-vectors"
            )
        return super().encode_text(texts, *args, **kwargs)

    def encode_image(self, images, *args, **kwargs):
        raise EncodeError(
            f"{self.url}: infinity-emb serves the --text-only export, which has no vision tower; "
            "encode images with the torch or onnxruntime backend"
        )

    def _texts(self, inputs: ModelInputs) -> list[str]:
        """Each row's kept tokens (prompt included, after jev4's truncation) as text, for a server that takes strings."""
        tokenizer = self.preprocessor.tokenizer
        texts = [
            tokenizer.decode(row[: int(length)].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for row, length in zip(inputs.input_ids, inputs.lengths)
        ]
        stripped = [i for i, text in enumerate(texts) if text != text.strip()]
        if stripped:
            level = logging.DEBUG if self._whitespace_warned else logging.WARNING  # once per encoder, not once per batch
            self._whitespace_warned = True
            log.log(
                level,
                "%s: infinity-emb strips leading/trailing whitespace from its inputs; %d text(s) of this batch are embedded "
                "without it (first: %r), so they differ from other backends%s",
                self.url, len(stripped), texts[stripped[0]][:SHORT_TEXT], "" if level == logging.DEBUG else " (further batches: logged at DEBUG)",
            )  # fmt: skip
        return texts

    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = self._texts(inputs)
        endpoint = f"{self.url}/embeddings"
        answer = post_json(endpoint, {"model": self.model, "input": texts, "encoding_format": "float"}, self.timeout, ENGINE)
        try:
            rows = sorted(answer["data"], key=lambda item: item["index"])
            single = torch.tensor([row["embedding"] for row in rows], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ServingError(f"{endpoint}: not an embeddings answer ({exc}): {str(answer)[:200]}") from None
        if single.shape != (len(texts), self.config.hidden_size):
            raise ServingError(f"{endpoint}: got {tuple(single.shape)} vectors, expected ({len(texts)}, {self.config.hidden_size})")
        return torch.nn.functional.normalize(single, dim=-1), torch.zeros(len(texts), 0, 0)
