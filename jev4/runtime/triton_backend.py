"""An encoder over a Triton Inference Server: jev4's encode API, answered by the model ``jev4`` that Triton serves.

Triton's python backend runs in an environment of its own (``make
triton-env`` builds ``.venv-triton`` with PyTriton, which bundles the
server), so jev4 drives it as its users do: ``TritonServer`` starts
``python -m jev4.runtime.triton_serve`` from that environment on free
loopback ports, waits until the model answers ready and always stops it;
``TritonEncoder`` talks to any running server over HTTP or gRPC through
``tritonclient`` (``pip install 'jev4[serving]'``).

The server runs jev4's own runtime, so it tokenizes (prompts included),
pools and truncates; the client sends raw texts (or encoded image files)
and request parameters, and checks arguments first against what the server
says it serves (``describe``), because a bad request fails the whole batch
Triton's dynamic batcher joined it to. Every failure to reach or understand
the server is a ``ServingError`` naming the URL, after at most ``timeout``
seconds.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from jev4.errors import EncodeError, Jev4Error, MissingDependencyError
from jev4.model.config import JinaV4Config, SpecialTokens
from jev4.model.encoder import Encoder, _as_list, check_encode_args, check_texts
from jev4.model.preprocess import DEFAULT_MAX_LENGTH, ModelInputs, text_prefix
from jev4.runtime.server_process import ServerOwner, ServerProcess, ServingError, engine_python, free_port

log = logging.getLogger(__name__)

DEFAULT_TRITON_PYTHON = Path(".venv-triton/bin/python")
MODEL_NAME = "jev4"
PROTOCOLS = ("http", "grpc")
INSTALL_HINT = "pip install 'jev4[serving]' (tritonclient[http,grpc])"
_SERVER_MESSAGE = re.compile(r"PyTritonValidationError: request \d+: (.+)")


def _client_module(protocol: str) -> Any:
    if protocol not in PROTOCOLS:
        raise EncodeError(f"unknown Triton protocol {protocol!r}; choose one of {PROTOCOLS}")
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as exc:
        raise MissingDependencyError(f"the Triton client is not installed ({exc}); {INSTALL_HINT}") from None
    return module


def _host_port(url: str) -> str:
    """``http://h:p``, ``grpc://h:p`` or ``h:p`` -> ``h:p`` (tritonclient takes no scheme)."""
    return re.sub(r"^[a-z]+://", "", url.strip()).rstrip("/")


def _server_message(exc: BaseException) -> str:
    """The jev4 message inside Triton's error text (a traceback from the python backend), else its first line."""
    text = str(exc)
    found = _SERVER_MESSAGE.search(text)
    return found.group(1).strip() if found else text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


def config_from_description(data: dict[str, Any]) -> JinaV4Config:
    """The JinaV4Config the server described (no raw dict: the client never builds a network)."""
    fields = dict(data["config"])
    fields["special_tokens"] = SpecialTokens(**fields["special_tokens"])
    fields["task_names"] = tuple(fields["task_names"])
    fields["matryoshka_dims"] = tuple(fields["matryoshka_dims"])
    return JinaV4Config(raw={}, **fields)


@dataclass(frozen=True)
class TritonServerSettings:
    """How to start ``python -m jev4.runtime.triton_serve`` for one artifact."""

    artifact: str
    python: str = field(default_factory=lambda: engine_python(DEFAULT_TRITON_PYTHON.parents[1], "JEV4_TRITON_PYTHON"))  # $JEV4_TRITON_PYTHON, or .venv-triton here or beside jev4
    host: str = "127.0.0.1"
    http_port: int | None = None  # None: a free port
    grpc_port: int | None = None
    provider: str = "cpu"
    max_batch_size: int = 32
    startup_timeout: float = 300.0

    def command(self, http_port: int, grpc_port: int, workspace: str) -> list[str]:
        return [
            self.python, "-m", "jev4.runtime.triton_serve", self.artifact, "--workspace", workspace,
            "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--host", self.host,
            "--provider", self.provider, "--max-batch-size", str(self.max_batch_size),
        ]  # fmt: skip


class TritonServer:
    """The real Triton server (PyTriton) as a context manager: ready when the model ``jev4`` is, always stopped on exit.

    Readiness is ``/v2/models/jev4/ready``, not ``/v2/health/ready``: PyTriton
    starts Triton with no model and loads it afterwards, and the server-wide
    health answers 200 in between.
    """

    def __init__(self, settings: TritonServerSettings):
        if not Path(settings.python).is_file():
            raise ServingError(f"{settings.python}: no Triton environment; build it with make triton-env (or point python= at one)")
        self.settings = settings
        self.http_port = settings.http_port or free_port(settings.host)
        self.grpc_port = settings.grpc_port or free_port(settings.host)
        health = f"http://{settings.host}:{self.http_port}/v2/models/{MODEL_NAME}/ready"
        # PyTriton's workspace (model store, sockets) is ours: removed on stop even when the server was killed.
        self.workspace = tempfile.mkdtemp(prefix="jev4-triton-")
        self.process = ServerProcess(
            "Triton", settings.command(self.http_port, self.grpc_port, str(Path(self.workspace) / "pytriton")), health, settings.startup_timeout, make_env="make triton-env"
        )

    def url(self, protocol: str = "http") -> str:
        return f"{protocol}://{self.settings.host}:{self.http_port if protocol == 'http' else self.grpc_port}"

    def __enter__(self) -> TritonServer:
        self.process.__enter__()
        log.info("Triton serving %s at %s and %s", self.settings.artifact, self.url("http"), self.url("grpc"))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.workspace, ignore_errors=True)


class TritonEncoder(ServerOwner, Encoder):
    """``encode_text`` / ``encode_image`` through a Triton server's model ``jev4`` (HTTP or gRPC)."""

    def __init__(
        self,
        url: str,
        protocol: str = "http",
        model: str = MODEL_NAME,
        timeout: float = 120.0,
        server: TritonServer | None = None,
    ):
        self.module = _client_module(protocol)
        self.protocol = protocol
        self.url = url if "://" in url else f"{protocol}://{url}"
        self.model = model
        self.timeout = float(timeout)
        self.server = server  # the server this encoder started (load(..., backend="triton")); stopped by close()
        address = _host_port(url)
        try:
            if protocol == "http":
                self.client = self.module.InferenceServerClient(address, connection_timeout=self.timeout, network_timeout=self.timeout)
            else:
                self.client = self.module.InferenceServerClient(address)
        except Exception as exc:  # noqa: BLE001  (tritonclient raises plain exceptions for a bad address)
            raise ServingError(f"{self.url}: cannot make a Triton {protocol} client ({_server_message(exc)})") from None
        description = self._describe()
        super().__init__(config_from_description(description), None, description["tasks"])
        self._supports_images = bool(description.get("supports_images", True))
        self.max_batch_size = self._max_batch_size()
        self.own_server(server)

    @property
    def supports_images(self) -> bool:
        return self._supports_images

    def engine(self) -> str:
        """``Triton Inference Server <version>``, the version the server's metadata reports, with model and URL, for reports."""
        try:
            metadata = self.client.get_server_metadata(**({"client_timeout": self.timeout} if self.protocol == "grpc" else {}))
        except Exception as exc:  # noqa: BLE001  (tritonclient raises plain exceptions)
            raise ServingError(f"{self.url}: no server metadata ({_server_message(exc)})") from None
        version = metadata.version if self.protocol == "grpc" else metadata.get("version", "?")
        return f"Triton Inference Server {version} (model {self.model!r}, {self.protocol}, {self.url})"

    # ------------------------------------------------------------------ transport

    def _infer(self, inputs: list[Any], parameters: dict[str, Any], outputs: Sequence[str]) -> Any:
        requested = [self.module.InferRequestedOutput(name) for name in outputs]
        where = f"{self.url} (model {self.model!r})"
        try:
            if self.protocol == "grpc":
                return self.client.infer(self.model, inputs, parameters=parameters, outputs=requested, client_timeout=self.timeout)
            return self.client.infer(self.model, inputs, parameters=parameters, outputs=requested)
        except Jev4Error:
            raise
        except Exception as exc:  # noqa: BLE001  (InferenceServerException, socket errors, gevent timeouts: all mean the same here)
            message = _server_message(exc)
            if _SERVER_MESSAGE.search(str(exc)):
                raise EncodeError(f"{where}: {message}") from None
            raise ServingError(f"{where}: no usable answer from the Triton server ({message}); is it running and serving jev4?") from None

    def _bytes_input(self, name: str, items: Sequence[bytes]) -> Any:
        tensor = self.module.InferInput(name, [len(items), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[item] for item in items], dtype=object))
        return tensor

    def _describe(self) -> dict[str, Any]:
        """What the server serves (config, tasks); an answer that is not jev4's is a ServingError."""
        result = self._infer([self._bytes_input("TEXT", [b""])], {"describe": True}, ["CONFIG"])
        try:
            raw = result.as_numpy("CONFIG").reshape(-1)[0]
            data = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
            config_from_description(data)
            return data
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise ServingError(f"{self.url}: model {self.model!r} did not describe itself as jev4's model ({exc})") from None

    def _max_batch_size(self) -> int:
        try:
            config = self.client.get_model_config(self.model, **({"client_timeout": self.timeout} if self.protocol == "grpc" else {}))
        except Exception as exc:  # noqa: BLE001
            raise ServingError(f"{self.url}: cannot read model {self.model!r}'s config ({_server_message(exc)})") from None
        value = config.config.max_batch_size if self.protocol == "grpc" else config.get("max_batch_size", 0)
        return int(value) or 1

    # ------------------------------------------------------------------ encode API

    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise EncodeError(f"{self.url}: the Triton server tokenizes and runs the model itself; use encode_text / encode_image")

    def _request(self, name: str, items: list[bytes], params: dict[str, Any], multivector: bool, batch_size: int) -> list[torch.Tensor]:
        """Send ``items`` in requests of at most the server's max_batch_size rows; rows back in order."""
        rows: list[torch.Tensor] = []
        step = max(1, min(batch_size, self.max_batch_size))
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            if multivector:
                result = self._infer([self._bytes_input(name, chunk)], params, ["MULTI", "LENGTHS"])
                multi, lengths = result.as_numpy("MULTI"), result.as_numpy("LENGTHS")
                self._check_shape(multi, (len(chunk), None, self.config.multi_vector_dim), "MULTI")
                rows += [torch.from_numpy(multi[i, : int(lengths.reshape(-1)[i])].copy()) for i in range(len(chunk))]
            else:
                single = self._infer([self._bytes_input(name, chunk)], params, ["SINGLE"]).as_numpy("SINGLE")
                self._check_shape(single, (len(chunk), None), "SINGLE")
                rows += list(torch.from_numpy(single.copy()))
        return rows

    def _check_shape(self, array: np.ndarray | None, want: tuple[int | None, ...], name: str) -> None:
        if array is None or array.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, array.shape)):
            got = None if array is None else tuple(array.shape)
            raise ServingError(f"{self.url}: output {name} has shape {got}, expected {want} (None: any)")

    def _run_groups(self, name: str, items: list[bytes], labels: list[str], params: dict[str, Any], multivector: bool, batch_size: int):
        """One stream of requests per task (a request carries one task); results back in input order."""
        out: dict[int, torch.Tensor] = {}
        for task in dict.fromkeys(labels):
            members = [i for i, label in enumerate(labels) if label == task]
            rows = self._request(name, [items[i] for i in members], {**params, "task": task}, multivector, batch_size)
            out.update(zip(members, rows))
        ordered = [out[i] for i in range(len(items))]
        if multivector:
            return ordered
        width = self.config.hidden_size if params.get("truncate_dim", 0) == 0 else params["truncate_dim"]
        return torch.stack(ordered) if ordered else torch.empty(0, width)

    def encode_text(
        self,
        texts: str | Sequence[str],
        task: str | Sequence[str] = "retrieval",
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        return_multivector: bool = False,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 8,
        progress: bool = False,
        output_precision: str | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """As ``Encoder.encode_text``; the server applies prompts, pooling and truncation."""
        texts = _as_list(texts, "texts", (str,), "a string or a sequence of strings")
        truncate_dim = check_encode_args(task, truncate_dim, return_multivector, batch_size, self.config.multi_vector_dim, max_length)
        check_texts(texts)
        labels = self._task_labels(task, len(texts))
        for label in set(labels):
            text_prefix(label, prompt_name)  # an unknown prompt_name is refused here, before any request
        dim = self.config.check_truncate_dim(truncate_dim)
        params = {"prompt_name": prompt_name or "", "truncate_dim": dim or 0, "multivector": return_multivector, "max_length": int(max_length)}
        vectors = self._run_groups("TEXT", [t.encode("utf-8") for t in texts], labels, params, return_multivector, batch_size)
        return self._quantize_output(vectors, output_precision, dim, return_multivector)

    def encode_image(
        self,
        images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
        task: str | Sequence[str] = "retrieval",
        truncate_dim: int | None = None,
        return_multivector: bool = False,
        max_pixels: int | None = None,
        batch_size: int = 8,
        progress: bool = False,
        output_precision: str | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """As ``Encoder.encode_image``: image files are sent as they are, PIL images as PNG; the server decodes them."""
        if not self._supports_images:
            raise EncodeError(f"{self.url}: the artifact this server runs cannot encode images (text only)")
        if max_pixels is not None:
            raise EncodeError(f"{self.url}: max_pixels is not a request parameter of the Triton model; the server uses the processor's limits")
        items = _as_list(images, "images", (Image.Image, str, Path), "a PIL image, a path, or a sequence of them")
        truncate_dim = check_encode_args(task, truncate_dim, return_multivector, batch_size, self.config.multi_vector_dim)
        labels = self._task_labels(task, len(items))
        dim = self.config.check_truncate_dim(truncate_dim)
        payload = [_image_bytes(item, index) for index, item in enumerate(items)]
        params = {"truncate_dim": dim or 0, "multivector": return_multivector}
        vectors = self._run_groups("IMAGE", payload, labels, params, return_multivector, batch_size)
        return self._quantize_output(vectors, output_precision, dim, return_multivector)


def _image_bytes(item: Image.Image | str | Path, index: int) -> bytes:
    """An image file's bytes as they are, or a PIL image as PNG (lossless)."""
    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    path = Path(item)
    if not path.is_file():
        raise EncodeError(f"image #{index} {path}: no such file")
    return path.read_bytes()
