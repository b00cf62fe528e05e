"""``load(path, backend=...)``: read what a directory is and return the encoder that runs it.

- a checkpoint directory (upstream, or a jev4 merge): the torch backend;
- a jev4 text-only export (a Qwen2 checkpoint + projector): the torch
  text-only backend (``jev4.runtime.text_only``);
- a jev4 ONNX artifact (manifest kind ``onnx``): the onnxruntime backend, on
  the ``provider`` asked for (cpu, cuda, tensorrt);
- an ONNX artifact with engines from ``jev4 build-engine``, with
  ``backend="tensorrt"``: the TensorRT backend (``device``: a CUDA device);
- a jev4 GGUF artifact (manifest kind ``gguf``): llama.cpp
  (``jev4.runtime.llamacpp_backend``), also as ``backend="llamacpp"``.

``threads`` bounds the CPU threads of the engine that runs in this process
(onnxruntime's intra-op pool, llama.cpp's decode threads, torch's
process-wide pool), so that each process of a job (a Ray actor per CPU slot)
can be told its share; None leaves every engine at its own default.

A jev4 artifact's files are checked against its manifest checksums before
use; one whose manifest is gone is refused, since nothing then says whether
it is complete. An unfinished output (a temp dir of an interrupted run) is
refused too: it can look complete without being so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jev4.atomic import check_not_temp_dir
from jev4.errors import Jev4Error, ManifestError, ProviderError, SettingsError
from jev4.export.gguf import GGUF_KIND
from jev4.export.manifest import MANIFEST_NAME, read_manifest, verify_manifest
from jev4.families.registry import local_family
from jev4.model.checkpoint import resolve_model_dir
from jev4.model.config import CONFIG_NAME, MERGED_TASK_KEY, JinaV4Config, load_config
from jev4.model.encoder import Encoder, TorchEncoder
from jev4.model.preprocess import Preprocessor
from jev4.runtime.text_only import is_text_only, read_text_only_config
from jev4.runtime.torch_compiled import CompileSettings

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "vllm", "infinity", "triton", "llamacpp")
TEXT_ONLY_KIND = "merged-text-only"
# Backends whose compute threads this process does not own, and why: refused with threads= rather than ignored.
THREADLESS_BACKENDS = {
    "vllm": "runs in a vLLM server, whose threads are set where that server is started",
    "triton": "runs in a Triton server, whose threads are set where that server is started (its model config)",
    "infinity": "runs in an infinity-emb server, whose threads are set where that server is started",
    "tensorrt": "runs on a GPU, where there is no CPU thread pool to size",
}


@dataclass(frozen=True)
class LoadRequest:
    """What ``load`` was asked for, handed to a family's own loader (``Family.load_runtime``).

    ``v4_only`` names the options given that apply to jina-embeddings-v4
    only (tasks, quantization, compile, servers); a family refuses them in
    one line rather than ignoring them.
    """

    backend: str
    provider: str
    device: str
    dtype: str
    verify: bool
    threads: int | None
    v4_only: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArtifactInfo:
    """What a directory holds, read from its config and manifest only (no weights): enough to check arguments."""

    root: Path
    kind: str  # checkpoint, merged, merged-text-only, onnx, ...
    config: JinaV4Config
    manifest: dict[str, Any] | None

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.config.merged_task,) if self.config.merged_task else self.config.task_names


def _raw_config(root: Path) -> dict[str, Any]:
    """config.json as a dict, or {} when it is unreadable or not an object (``load_config`` then names the problem)."""
    try:
        raw = json.loads((root / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def inspect(path: str | Path) -> ArtifactInfo:
    """Classify ``path`` and read its config; refuses temp dirs and jev4 artifacts without a manifest."""
    if Path(path).expanduser().exists():
        check_not_temp_dir(path)
    root = resolve_model_dir(path)
    manifest = read_manifest(root) if (root / MANIFEST_NAME).is_file() else None
    raw = _raw_config(root)
    if manifest is None:
        if (root / "language.onnx").is_file():
            raise ManifestError(f"{root}: looks like a jev4 ONNX artifact whose {MANIFEST_NAME} is missing; re-export it (without the manifest its files cannot be checked)")
        if MERGED_TASK_KEY in raw:
            raise ManifestError(f"{root}: looks like a jev4 export whose {MANIFEST_NAME} is missing; re-export it (without the manifest its files cannot be checked)")
    kind = manifest["kind"] if manifest else "checkpoint"
    if kind == GGUF_KIND:
        from jev4.runtime.llamacpp_backend import gguf_artifact_config

        return ArtifactInfo(root, kind, gguf_artifact_config(root, manifest), manifest)
    config = read_text_only_config(root) if is_text_only(raw) else load_config(root)
    return ArtifactInfo(root, kind, config, manifest)


def check_device(device: str) -> None:
    """Refuse a CUDA device where no GPU is visible (one line, before anything loads)."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ProviderError(f"device {device!r} needs a CUDA GPU, and none is visible here; use device 'cpu'")


def check_threads(threads: object, backend: str) -> None:
    """Refuse a ``threads`` that is not a positive int, or that ``backend`` could not apply; None always passes.

    Called before anything loads or starts, so a Ray job with a bad setting
    fails at once instead of after a server start or a weight load.
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SettingsError(f"threads must be a positive integer (CPU threads of the engine), got {threads!r}")
    if backend in THREADLESS_BACKENDS:
        raise SettingsError(f"threads={threads}: backend {backend!r} {THREADLESS_BACKENDS[backend]}; leave threads=None")


def set_torch_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given.

    torch has one intra-op thread pool per process, not one per model, so
    this also bounds every other torch model of this process. That is what
    one-process-per-slot jobs want (each Ray actor is its own process); two
    torch encoders in one process cannot have different thread counts.
    """
    if threads is None:
        return
    import torch

    log.info("torch intra-op threads: %d -> %d (process-wide)", torch.get_num_threads(), threads)
    torch.set_num_threads(threads)


def load(
    path: str | Path,
    backend: str = "auto",
    provider: str = "cpu",
    device: str = "cpu",
    dtype: str = "fp32",
    verify: bool = True,
    quantization: str | None = None,
    task: str | None = None,
    url: str | None = None,
    vllm_python: str | None = None,
    vllm_pooling: str | None = None,
    triton_protocol: str = "http",
    triton_python: str | None = None,
    infinity_python: str | None = None,
    threads: int | None = None,
    compile: CompileSettings | bool | None = None,
) -> Encoder:
    """The encoder for ``path``; ``backend`` picks the engine (``auto``: what the directory holds).

    ``backend="vllm"`` (a --text-only export): with ``url``, a running vLLM
    server's ``/v1``; without, jev4 starts one from ``vllm_python`` (default
    ``.venv-vllm/bin/python``) and the encoder owns it: use it in ``with`` or
    call ``close()``. ``vllm_pooling``: ``embed`` (single vectors through
    ``/v1/embeddings``, the default for a started server) or ``token_embed``
    (token states: single and multi-vectors); None with ``url`` asks the server.

    ``backend="triton"`` (any artifact this runtime opens): with ``url``, a
    running Triton server (``jev4.runtime.triton_serve``); without, jev4 starts
    one from ``triton_python`` (default ``.venv-triton/bin/python``), owned by
    the encoder like vLLM's. ``triton_protocol``: ``http`` or ``grpc``.

    ``backend="infinity"`` (a --text-only export): with ``url``, a running
    infinity-emb server (``http://host:port``, no ``/v1``); without, jev4
    starts one from ``infinity_python`` (default ``.venv-infinity/bin/python``),
    owned by the encoder like vLLM's. Single vectors only; jev4 applies the prompts.

    ``quantization`` (torch only: ``fp8``, ``bnb-int8``, ``bnb-nf4``) merges ``task``'s adapter and
    quantizes the language model's Linear layers (``jev4.runtime.torch_quantized``);
    ``fp8-torchao`` does it with torchao on a CUDA GPU, always compiled (``jev4.runtime.torchao_fp8``).

    ``compile`` (torch only; True: ``CompileSettings()``'s buckets): merges ``task``'s adapter and
    runs text batches through ``torch.compile`` at a fixed set of (batch, length) buckets, each
    batch padded up to its bucket (``jev4.runtime.torch_compiled``; CUDA graphs on CUDA). The
    first call of a bucket compiles; ``encoder.warm_up()`` does it ahead and ``encoder.stats``
    reports the seconds per bucket.

    ``threads`` (an int >= 1; None: the engine's default, unchanged): the CPU
    threads of an in-process engine, read back as ``encoder.threads``.
    onnxruntime: ``intra_op_num_threads`` of every session (language and
    vision), one inter-op thread, sequential execution. llama.cpp:
    ``n_threads`` and ``n_threads_batch``. torch: ``torch.set_num_threads``,
    which is process-wide (see ``_set_torch_threads``). Served backends and
    tensorrt refuse it (``THREADLESS_BACKENDS``).
    """
    if backend not in BACKENDS:
        raise Jev4Error(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    check_threads(threads, backend)
    family = local_family(path)
    if family is not None and family.runtime_loader:
        v4_only = {"quantization": quantization, "task": task, "url": url, "vllm_python": vllm_python, "vllm_pooling": vllm_pooling, "triton_python": triton_python, "infinity_python": infinity_python, "compile": compile}
        given = tuple(name for name, value in v4_only.items() if value not in (None, False))
        return family.load_runtime(Path(path).expanduser(), LoadRequest(backend, provider, device, dtype, verify, threads, given))
    info = inspect(path)
    root, manifest, kind = info.root, info.manifest, info.kind
    if backend == "auto":
        backend = {"onnx": "onnxruntime", GGUF_KIND: "llamacpp"}.get(kind, "torch")
    compiled = _compile_settings(compile, quantization, backend)
    if manifest is not None and verify:
        verify_manifest(root)
    if backend == "infinity":
        return _infinity_encoder(info, url, infinity_python)
    if backend == "vllm":
        return _vllm_encoder(info, url, vllm_python, vllm_pooling)
    if backend == "triton":
        return _triton_encoder(info, url, triton_protocol, triton_python)
    if (backend == "llamacpp") != (kind == GGUF_KIND):
        raise ManifestError(f"{root}: is a {kind}; backend {backend!r} " + ("runs a GGUF artifact only (jev4-export --format gguf)" if backend == "llamacpp" else "cannot run it: use backend='llamacpp'"))
    if backend == "llamacpp":
        from jev4.runtime.llamacpp_backend import LlamaCppEncoder, LlamaCppSettings

        return with_output_codec(LlamaCppEncoder.open(root, manifest, info.config, LlamaCppSettings(threads=threads)), root)
    if backend == "torch":
        check_device(device)
        if kind == "onnx":
            raise ManifestError(f"{root}: is an ONNX artifact; load it with backend='onnxruntime' (or point torch at a checkpoint)")
        text_only = kind == TEXT_ONLY_KIND or is_text_only(info.config.raw)
        if text_only and quantization is not None:
            raise Jev4Error(f"quantization={quantization!r} is not available for a text-only export; load the full merged checkpoint")
        if text_only and compiled is not None:
            raise Jev4Error("compile= is not available for a text-only export; load the full merged checkpoint")
        set_torch_threads(threads)  # before the weights load: loading and merging run on the same pool
        if text_only:
            from jev4.runtime.text_only import TextOnlyEncoder

            encoder = TextOnlyEncoder.from_dir(root, dtype=dtype, device=device)
        elif compiled is not None:
            from jev4.runtime.torch_compiled import load_compiled

            encoder = load_compiled(root, compiled, task=task, dtype=dtype, device=device, quantization=quantization)
        elif quantization is not None:
            from jev4.runtime.torch_quantized import load_quantized

            encoder = load_quantized(root, quantization, task=task, dtype=dtype, device=device)
        else:
            encoder = TorchEncoder.from_pretrained(root, dtype=dtype, device=device)
        encoder.threads = threads
        return with_output_codec(encoder, root)
    if quantization is not None:
        raise Jev4Error(f"quantization={quantization!r} is for the torch backend; an ONNX artifact carries its own precision")
    if kind != "onnx":
        raise ManifestError(f"{root}: is a {kind}, not an ONNX artifact; export one with jev4-export --format onnx")
    config = info.config
    if backend == "tensorrt":
        from jev4.runtime.tensorrt_backend import TensorRTEncoder

        trt_device = device if str(device).startswith("cuda") else "cuda"
        return with_output_codec(TensorRTEncoder.open(root, manifest, config, Preprocessor.from_dir(root, config), device=trt_device), root)
    from jev4.runtime.onnxruntime_backend import OnnxRuntimeEncoder

    return with_output_codec(OnnxRuntimeEncoder(root, manifest, config, Preprocessor.from_dir(root, config), provider=provider, threads=threads), root)


def _compile_settings(compile: CompileSettings | bool | None, quantization: str | None, backend: str) -> CompileSettings | None:
    """The compile settings ``load`` runs with, or None (eager); refuses ``compile`` outside the torch backend."""
    from jev4.runtime.torchao_fp8 import TORCHAO_FP8

    if compile is not None and not isinstance(compile, (bool, CompileSettings)):
        raise SettingsError(f"compile must be True, False, None or a CompileSettings, got {type(compile).__name__}")
    if compile and backend != "torch":
        raise Jev4Error(f"compile= is for the torch backend (torch.compile); backend {backend!r} has its own graph optimisation")
    if quantization == TORCHAO_FP8:
        if compile is False:
            raise Jev4Error(f"quantization={TORCHAO_FP8!r} runs compiled only (its FP8 casts are fused by torch.compile); leave compile unset or True")
        return compile if isinstance(compile, CompileSettings) else CompileSettings()
    if isinstance(compile, CompileSettings):
        return compile
    return CompileSettings() if compile else None


def with_output_codec(encoder: Encoder, root: Path) -> Encoder:
    """Attach the artifact's output codec (``output-codec.json``), or a calibration-free one for binary/float16 outputs."""
    from jev4.quant.output_codec import OutputCodec

    encoder.output_codec = OutputCodec.read(root) or OutputCodec.uncalibrated()
    return encoder


def _vllm_encoder(info: ArtifactInfo, url: str | None, python: str | None, pooling: str | None) -> Encoder:
    """A vLLM encoder for a --text-only export: over ``url``, or over a server started here (and owned by the encoder)."""
    import torch

    from jev4.runtime.text_only import PROJECTOR_KEY, read_projector
    from jev4.runtime.vllm_backend import VllmEncoder, VllmServer, VllmServerSettings, check_pooling

    if info.kind != TEXT_ONLY_KIND:
        raise ManifestError(f"{info.root}: is a {info.kind}; vLLM serves the --text-only export (jev4-export --text-only)")
    if pooling is not None:
        check_pooling(pooling)
    preprocessor = Preprocessor.from_dir(info.root, info.config)
    projector = read_projector(info.root / info.config.raw[PROJECTOR_KEY], info.config.hidden_size, torch.float32, "cpu")
    if url is not None:
        return with_output_codec(VllmEncoder(url, info.config, preprocessor, pooling=pooling, projector=projector), info.root)
    settings = VllmServerSettings(artifact=str(info.root), pooling=pooling or "embed", **({"python": python} if python else {}))
    server = VllmServer(settings).__enter__()
    try:
        return with_output_codec(VllmEncoder(server.url, info.config, preprocessor, pooling=settings.pooling, projector=projector, server=server), info.root)
    except BaseException:
        server.stop()
        raise


def _triton_encoder(info: ArtifactInfo, url: str | None, protocol: str, python: str | None) -> Encoder:
    """A Triton encoder for any artifact: over ``url``, or over a server started here on ``info.root`` (owned by the encoder)."""
    from jev4.runtime.triton_backend import PROTOCOLS, TritonEncoder, TritonServer, TritonServerSettings

    if protocol not in PROTOCOLS:
        raise Jev4Error(f"unknown triton_protocol {protocol!r}; choose one of {PROTOCOLS}")
    if url is not None:
        return with_output_codec(TritonEncoder(url, protocol), info.root)
    server = TritonServer(TritonServerSettings(artifact=str(info.root), **({"python": python} if python else {}))).__enter__()
    try:
        return with_output_codec(TritonEncoder(server.url(protocol), protocol, server=server), info.root)
    except BaseException:
        server.stop()
        raise


def _infinity_encoder(info: ArtifactInfo, url: str | None, python: str | None) -> Encoder:
    """An infinity-emb encoder for a --text-only export: over ``url``, or over a server started here (and owned by the encoder)."""
    from jev4.runtime.infinity_backend import InfinityEncoder, InfinityServer, InfinityServerSettings

    if info.kind != TEXT_ONLY_KIND:
        raise ManifestError(f"{info.root}: is a {info.kind}; infinity-emb serves the --text-only export (jev4-export --text-only)")
    preprocessor = Preprocessor.from_dir(info.root, info.config)
    if url is not None:
        return with_output_codec(InfinityEncoder(url, info.config, preprocessor), info.root)
    settings = InfinityServerSettings(artifact=str(info.root), **({"python": python} if python else {}))
    server = InfinityServer(settings).__enter__()
    try:
        return with_output_codec(InfinityEncoder(server.url, info.config, preprocessor, server=server), info.root)
    except BaseException:
        server.stop()
        raise
