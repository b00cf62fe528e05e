"""``python -m jev4.runtime.triton_serve ART``: the jev4 runtime behind a real Triton Inference Server (PyTriton).

Runs inside ``.venv-triton`` (``make triton-env``): PyTriton starts the
Triton 2.51 server it bundles, and Triton's python backend hands each batch
of requests to this process, where ``jev4.runtime.load`` runs the artifact
(any kind it opens: checkpoint, merge, text-only export, ONNX on
onnxruntime). So the Triton model ``jev4`` answers exactly what the
in-process runtime answers: prompts, tokenizer, pooling, Matryoshka
truncation are jev4's own code, not a re-implementation.

The model (``jev4``, dynamic batching on):

- inputs ``TEXT`` (BYTES [n, 1], UTF-8 texts) or ``IMAGE`` (BYTES [n, 1],
  encoded image files), both optional, exactly one per request;
- request parameters ``task``, ``prompt_name`` (query/passage), ``truncate_dim``
  (0: none), ``multivector`` (bool), ``max_length``;
- outputs ``SINGLE`` (FP32 [n, d]), ``MULTI`` (FP32 [n, T, 128], zero padded)
  with ``LENGTHS`` (INT32 [n, 1], tokens per row), and ``CONFIG`` (BYTES:
  what the client needs to check arguments, asked with ``describe=true``).

Requests that Triton's batcher puts together are grouped by their
parameters and encoded in one call each; every request gets its own answer.
A bad request (unknown task, a truncate_dim that is not allowed, a broken
image) fails alone, with jev4's one-line message. SIGTERM stops Triton and
exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import signal
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("jev4.triton_serve")

MODEL_NAME = "jev4"
PARAMETERS = ("task", "prompt_name", "truncate_dim", "multivector", "max_length", "describe")


@dataclass(frozen=True)
class ServeSettings:
    """Command-line settings of one server."""

    artifact: str
    http_port: int
    grpc_port: int
    provider: str = "cpu"
    host: str = "127.0.0.1"
    max_batch_size: int = 32
    queue_delay_us: int = 2000
    encode_batch_size: int = 8
    max_length: int = 8192
    workspace: str | None = None  # PyTriton's model store and sockets; None: a fresh dir under ~/.cache/pytriton


@dataclass(frozen=True)
class RequestKey:
    """What must be equal for two requests to be encoded in one call."""

    kind: str  # "text" | "image" | "describe"
    task: str
    prompt_name: str | None
    truncate_dim: int | None
    multivector: bool
    max_length: int


def describe_config(encoder: Any) -> dict[str, Any]:
    """The settings a client checks arguments against (a JinaV4Config without its raw dict), plus the tasks served."""
    config = dataclasses.asdict(encoder.config)
    config.pop("raw", None)
    config.pop("source", None)
    return {"config": config, "tasks": list(encoder.tasks), "supports_images": getattr(encoder, "supports_images", True)}


def _decode_strings(array: np.ndarray, what: str) -> list[str]:
    from jev4.errors import EncodeError

    out = []
    for index, item in enumerate(array.reshape(-1)):
        raw = item if isinstance(item, bytes) else str(item).encode()
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise EncodeError(f"{what} #{index} is not valid UTF-8 (byte {exc.start})") from None
    return out


def _decode_images(array: np.ndarray) -> list[Any]:
    from PIL import Image, UnidentifiedImageError

    from jev4.errors import EncodeError

    images = []
    for index, item in enumerate(array.reshape(-1)):
        try:
            images.append(Image.open(io.BytesIO(bytes(item))))
        except (UnidentifiedImageError, OSError) as exc:
            raise EncodeError(f"image #{index}: not an image file ({exc})") from None
    return images


def request_key(data: dict[str, np.ndarray], parameters: dict[str, Any] | None, default_max_length: int) -> RequestKey:
    """The request's parameters, checked for type (values are checked by the encoder)."""
    from jev4.errors import EncodeError

    params = dict(parameters or {})
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise EncodeError(f"unknown request parameter(s) {unknown}; this model takes {list(PARAMETERS)}")
    if params.get("describe"):
        return RequestKey("describe", "", None, None, False, 0)
    has_text, has_image = "TEXT" in data, "IMAGE" in data
    if has_text == has_image:
        raise EncodeError("send exactly one of the inputs TEXT (texts) or IMAGE (encoded image files)")
    dim = params.get("truncate_dim", 0)
    length = params.get("max_length", default_max_length)
    for name, value in (("truncate_dim", dim), ("max_length", length)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EncodeError(f"parameter {name} must be an integer, got {value!r}")
    prompt = params.get("prompt_name")
    return RequestKey(
        kind="text" if has_text else "image",
        task=str(params.get("task", "retrieval")),
        prompt_name=None if prompt in (None, "") else str(prompt),
        truncate_dim=int(dim) or None,
        multivector=bool(params.get("multivector", False)),
        max_length=int(length),
    )


def pad_multivectors(vectors: Sequence[Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged [tokens_i, dim] -> zero-padded [n, T, dim] and lengths [n, 1] (Triton tensors are rectangular)."""
    lengths = np.array([[int(v.shape[0])] for v in vectors], dtype=np.int32)
    longest = int(lengths.max()) if len(vectors) else 0
    padded = np.zeros((len(vectors), longest, dim), dtype=np.float32)
    for row, vector in enumerate(vectors):
        padded[row, : vector.shape[0]] = np.asarray(vector, dtype=np.float32)
    return padded, lengths


class Jev4TritonModel:
    """The inference callable PyTriton binds: a batch of requests in, one answer (or error) per request out."""

    def __init__(self, encoder: Any, settings: ServeSettings):
        self.encoder = encoder
        self.settings = settings
        self.describe = json.dumps(describe_config(encoder)).encode()

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        from pytriton.exceptions import PyTritonValidationError

        from jev4.errors import Jev4Error

        keys: list[RequestKey | None] = []
        errors: dict[int, str] = {}
        for index, request in enumerate(requests):
            try:
                keys.append(request_key(request.data, request.parameters, self.settings.max_length))
            except Jev4Error as exc:
                keys.append(None)
                errors[index] = str(exc)
        answers: dict[int, dict[str, np.ndarray]] = {}
        for key in {k for k in keys if k is not None}:
            members = [i for i, k in enumerate(keys) if k == key]
            try:
                answers.update(self._answer(key, [requests[i] for i in members], members))
            except Jev4Error as exc:
                if len(members) == 1:
                    errors[members[0]] = str(exc)
                else:  # one bad input must not fail its neighbours: retry one by one
                    for i in members:
                        try:
                            answers.update(self._answer(key, [requests[i]], [i]))
                        except Jev4Error as single:
                            errors[i] = str(single)
        if errors:
            # PyTriton answers a batch as a whole: a failed request fails the call, with its message.
            first = min(errors)
            raise PyTritonValidationError(f"request {first}: {errors[first]}")
        return [self._only_requested(answers[i], requests[i]) for i in range(len(requests))]

    @staticmethod
    def _only_requested(answer: dict[str, np.ndarray], request: Any) -> dict[str, np.ndarray]:
        wanted = getattr(request, "requested_output_names", None)
        return {name: value for name, value in answer.items() if not wanted or name in wanted}

    def _answer(self, key: RequestKey, requests: list[Any], indices: list[int]) -> dict[int, dict[str, np.ndarray]]:
        if key.kind == "describe":
            return {i: {"CONFIG": np.array([[self.describe]], dtype=object)} for i in indices}
        name = "TEXT" if key.kind == "text" else "IMAGE"
        per_request = [_decode_strings(r.data[name], "text") if key.kind == "text" else _decode_images(r.data[name]) for r in requests]
        flat = [item for items in per_request for item in items]
        common = dict(task=key.task, truncate_dim=key.truncate_dim, return_multivector=key.multivector, batch_size=self.settings.encode_batch_size)
        if key.kind == "text":
            vectors = self.encoder.encode_text(flat, prompt_name=key.prompt_name, max_length=key.max_length, **common)
        else:
            vectors = self.encoder.encode_image(flat, **common)
        out: dict[int, dict[str, np.ndarray]] = {}
        start = 0
        for index, items in zip(indices, per_request):
            rows = vectors[start : start + len(items)]
            start += len(items)
            if key.multivector:
                multi, lengths = pad_multivectors(rows, self.encoder.config.multi_vector_dim)
                out[index] = {"MULTI": multi, "LENGTHS": lengths}
            else:
                out[index] = {"SINGLE": np.asarray(rows, dtype=np.float32).reshape(len(items), -1)}
        return out


def python_libdir_env() -> dict[str, str]:
    """LD_LIBRARY_PATH with this Python's lib dir first: Triton's python backend stub must link this libpython.

    With a pyenv (or any non-system) Python, the stub otherwise finds the
    distribution's libpython and dies at start (``_thread.RLock`` errors).
    """
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": ":".join(p for p in (libdir, current) if p)}


def bind_and_serve(settings: ServeSettings) -> int:
    """Load the artifact, start Triton with the ``jev4`` model bound, serve until SIGTERM/SIGINT."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    import jev4.runtime as rt

    os.environ.update(python_libdir_env())
    encoder = rt.load(settings.artifact, provider=settings.provider)
    model = Jev4TritonModel(encoder, settings)
    config = TritonConfig(
        http_address=settings.host, http_port=settings.http_port, grpc_address=settings.host, grpc_port=settings.grpc_port,
        allow_metrics=False, exit_timeout_secs=5,
    )  # fmt: skip
    inputs = [Tensor(name="TEXT", dtype=bytes, shape=(1,), optional=True), Tensor(name="IMAGE", dtype=bytes, shape=(1,), optional=True)]
    outputs = [
        Tensor(name="SINGLE", dtype=np.float32, shape=(-1,)),
        Tensor(name="MULTI", dtype=np.float32, shape=(-1, encoder.config.multi_vector_dim)),
        Tensor(name="LENGTHS", dtype=np.int32, shape=(1,)),
        Tensor(name="CONFIG", dtype=bytes, shape=(1,)),
    ]
    batcher = DynamicBatcher(max_queue_delay_microseconds=settings.queue_delay_us)
    signal.signal(signal.SIGTERM, _interrupt)
    with Triton(config=config, workspace=settings.workspace) as triton:
        triton.bind(MODEL_NAME, model, inputs, outputs, config=ModelConfig(max_batch_size=settings.max_batch_size, batcher=batcher))
        log.info("serving %s as Triton model %r on http %s:%d, grpc %s:%d", settings.artifact, MODEL_NAME, settings.host, settings.http_port, settings.host, settings.grpc_port)
        triton.serve()  # returns on KeyboardInterrupt (SIGINT, or SIGTERM through _interrupt) after stopping Triton
    log.info("stopped")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: PyTriton's serve() stops Triton and its proxy backends on KeyboardInterrupt."""
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None = None) -> ServeSettings:
    parser = argparse.ArgumentParser(prog="python -m jev4.runtime.triton_serve", description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--provider", default="cpu", help="onnxruntime execution provider for an ONNX artifact: cpu, cuda, tensorrt")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-batch-size", type=int, default=32, help="Triton's max_batch_size (rows the dynamic batcher may join)")
    parser.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batcher: how long a request may wait for others")
    parser.add_argument("--encode-batch-size", type=int, default=8, help="rows per forward pass inside jev4")
    parser.add_argument("--max-length", type=int, default=8192, help="default token limit per text (a request's max_length overrides it)")
    parser.add_argument("--workspace", help="PyTriton workspace dir (default: a new one under ~/.cache/pytriton, removed on a clean stop)")
    args = parser.parse_args(argv)
    return ServeSettings(
        args.artifact, args.http_port, args.grpc_port, args.provider, args.host, args.max_batch_size, args.queue_delay_us, args.encode_batch_size, args.max_length, args.workspace
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from jev4.errors import Jev4Error

    settings = parse_args(argv)
    try:
        return bind_and_serve(settings)
    except Jev4Error as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
