"""The llama.cpp backend: a jev4 GGUF artifact (``jev4-export --format gguf``) run by llama.cpp through llama-cpp-python.

Choices, and why:

- **jev4 tokenizes, llama.cpp gets token ids.** The inputs are then
  identical to the reference's by construction; llama.cpp's own BPE would
  have to match Qwen2's tokenizer byte for byte (NFC normalisation, special
  tokens in text), which is checked in the tests but is not needed here.
  Prompts, truncation (``max_length``), Matryoshka and output codecs come
  from ``Encoder`` like for every backend.
- **Per-token states from llama.cpp (pooling NONE), pooled by jev4.** One
  decode gives what both outputs need: the mean over the attention mask (the
  single vector, computed in fp32 exactly as the reference does) and the
  tokens the projector turns into multi-vectors. llama.cpp's own MEAN pooling
  (what the GGUF declares, for plain llama.cpp users) gives the same single
  vector; the tests check that.
- **One sequence per decode, context sized to the input.** The context's
  ``n_ctx`` = ``n_batch`` = ``n_ubatch`` is the next power of two that holds
  the longest text seen (at least ``min_context``), up to the GGUF's context
  length, and grows when a longer text comes: llama.cpp's defaults (512)
  would silently cut texts, and a fixed 32k context would allocate gigabytes
  of attention buffers for short queries. Everything else is llama.cpp's
  default (f16 KV cache, flash attention auto), so the parity measured here
  is what a llama.cpp user gets; an f32 KV cache changed nothing measurable
  on the tiny model (single-vector 1 - cos = 4.6e-8 either way).
- Images are refused: the GGUF holds the language model only.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jev4.errors import CheckpointError, EncodeError, ManifestError, MissingDependencyError
from jev4.model.config import JinaV4Config, SpecialTokens
from jev4.model.encoder import Encoder
from jev4.model.pooling import multi_vector, single_vector
from jev4.model.preprocess import ModelInputs, Preprocessor

log = logging.getLogger(__name__)
engine_log = logging.getLogger("jev4.runtime.llamacpp.engine")  # llama.cpp's own messages, at their levels

_INSTALL = "pip install 'jev4[edge]' (llama-cpp-python==0.3.36, gguf==0.19.*)"
_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}  # ggml: none, debug, info, warn, error, cont
_EXPECTED = "but [0] was specified"  # llama.cpp warns that pooling NONE overrides the GGUF's MEAN
_log_callback = None  # the ctypes callback must outlive every llama.cpp call: kept at module level


def llama_cpp_module():
    """``llama_cpp`` with its log routed to Python logging, or a MissingDependencyError with the pip command."""
    global _log_callback
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependencyError(f"the llama.cpp backend needs llama-cpp-python ({exc}); {_INSTALL}") from None
    if _log_callback is None:

        @llama_cpp.llama_log_callback
        def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            message = text.decode("utf-8", "replace").rstrip()
            if message:
                quiet = _EXPECTED in message  # jev4 asks for per-token states on purpose (pooling NONE)
                engine_log.log(logging.DEBUG if quiet else _LEVELS.get(level, logging.DEBUG), "%s", message)

        _log_callback = forward
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    return llama_cpp


def gguf_artifact_config(root: Path, manifest: dict[str, Any]) -> JinaV4Config:
    """The encode settings of a GGUF artifact, from its manifest alone (``jev4.runtime.inspect`` reads no weights)."""
    contents = manifest.get("contents") or {}
    task, hidden = contents.get("task"), contents.get("hidden_size")
    dims, multi = contents.get("matryoshka_dims", []), contents.get("multi_vector_dim")
    if not isinstance(task, str) or not isinstance(hidden, int) or not isinstance(multi, int) or not all(isinstance(d, int) and 0 < d < hidden for d in dims):
        raise ManifestError(f"{root}: the manifest of this GGUF artifact lacks task, hidden_size, multi_vector_dim or matryoshka_dims; re-export it")
    return JinaV4Config(
        raw={"model_type": "qwen2", "hidden_size": hidden, "jev4_merged_task": task},
        task_names=(task,),
        matryoshka_dims=tuple(sorted(dims)),
        truncate_dim=None,
        multi_vector_dim=multi,
        hidden_size=hidden,
        num_hidden_layers=int(contents.get("num_hidden_layers", 0)),
        special_tokens=SpecialTokens(-1, -1, -1, -1),  # no vision tower, no image tokens
        torch_dtype="float32",
        merged_task=task,
    )


@dataclass(frozen=True)
class LlamaCppSettings:
    """How llama.cpp runs the GGUF. ``threads`` None: the CPUs this process may use.

    Not llama.cpp's own default (GGML_DEFAULT_N_THREADS, 4 whatever the
    machine): on fewer cores its spinning threads oversubscribe them.
    """

    threads: int | None = None
    min_context: int = 512
    gpu_layers: int = 0  # layers offloaded by a CUDA/Metal build of llama.cpp; the PyPI build is CPU-only

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise EncodeError(f"llama.cpp threads must be >= 1, got {self.threads}")
        if self.min_context < 1:
            raise EncodeError(f"llama.cpp min_context must be >= 1, got {self.min_context}")


def read_gguf_keys(model, llama_cpp) -> dict[str, str]:
    """Every metadata key of a loaded model as strings (llama.cpp renders arrays as summaries)."""
    keys: dict[str, str] = {}
    buffer = ctypes.create_string_buffer(4096)
    for i in range(llama_cpp.llama_model_meta_count(model)):
        if llama_cpp.llama_model_meta_key_by_index(model, i, buffer, len(buffer)) < 0:
            continue
        key = buffer.value.decode("utf-8", "replace")
        if llama_cpp.llama_model_meta_val_str_by_index(model, i, buffer, len(buffer)) < 0:
            continue
        keys[key] = buffer.value.decode("utf-8", "replace")
    return keys


class LlamaCppModel:
    """A GGUF loaded once in llama.cpp, with an embeddings context (pooling NONE) resized to the input on demand."""

    def __init__(self, path: Path, settings: LlamaCppSettings, context_length: int):
        self.llama_cpp = llama_cpp_module()
        self.path = path
        self.settings = settings
        self.context_length = context_length
        self._ctx = None
        self._batch = None
        self._n_ctx = 0
        params = self.llama_cpp.llama_model_default_params()
        params.n_gpu_layers = settings.gpu_layers
        self.llama_cpp.llama_backend_init()
        self.model = self.llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise CheckpointError(f"{path}: llama.cpp could not load this GGUF (run with -v for llama.cpp's reason)")
        self.keys = read_gguf_keys(self.model, self.llama_cpp)
        self.n_embd = int(self.llama_cpp.llama_model_n_embd(self.model))

    def _context(self, tokens: int):
        """A context that holds ``tokens`` in one ubatch; a longer input than ever before replaces the context."""
        if tokens > self.context_length:
            raise EncodeError(f"{tokens} tokens exceed the GGUF's context length {self.context_length}; pass a smaller max_length")
        if self._ctx is not None and tokens <= self._n_ctx:
            return self._ctx
        size = max(self.settings.min_context, 1 << max(tokens - 1, 0).bit_length())
        size = min(size, self.context_length)
        self._free_context()
        params = self.llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = size
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = self.llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.n_threads = params.n_threads_batch = self.settings.threads or len(os.sched_getaffinity(0))
        ctx = self.llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise EncodeError(f"{self.path}: llama.cpp could not create a context of {size} tokens (out of memory?)")
        self._ctx, self._n_ctx = ctx, size
        self._batch = self.llama_cpp.llama_batch_init(size, 0, 1)
        log.debug("llama.cpp context: n_ctx = n_batch = n_ubatch = %d", size)
        return ctx

    def token_states(self, ids: list[int]) -> np.ndarray:
        """Last hidden states (after the final norm) of one sequence: [len(ids), n_embd] float32."""
        L = self.llama_cpp
        ctx = self._context(len(ids))
        batch = self._batch
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1  # every token is an output: per-token embeddings
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        status = L.llama_decode(ctx, batch)
        if status != 0:
            raise EncodeError(f"{self.path}: llama_decode failed with status {status} on a sequence of {len(ids)} tokens")
        pointer = L.llama_get_embeddings(ctx)
        if not pointer:
            raise EncodeError(f"{self.path}: llama.cpp returned no embeddings (context not in embeddings mode?)")
        return np.ctypeslib.as_array(pointer, shape=(len(ids) * self.n_embd,)).reshape(len(ids), self.n_embd).copy()

    def _free_context(self) -> None:
        if self._batch is not None:
            self.llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self.llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        self._free_context()
        if getattr(self, "model", None):
            self.llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may be gone already
            pass


class LlamaCppEncoder(Encoder):
    """``encode_text`` over a GGUF artifact: llama.cpp computes token states, jev4 pools, projects and normalises."""

    def __init__(self, model: LlamaCppModel, projector: torch.nn.Linear, config: JinaV4Config, preprocessor: Preprocessor):
        super().__init__(config, preprocessor, config.task_names)
        self.model = model
        self.projector = projector
        self.threads = model.settings.threads

    @classmethod
    def open(cls, root: Path, manifest: dict[str, Any], config: JinaV4Config, settings: LlamaCppSettings | None = None) -> LlamaCppEncoder:
        """Check the artifact (GGUF type, projector, jev4's keys), then load the GGUF in llama.cpp."""
        from jev4.export.gguf import GGUF_TYPES, KEY_FORMAT, KEY_GGUF_TYPE, KEY_MULTI_DIM, KEY_TASK
        from jev4.runtime.text_only import read_projector

        contents = manifest.get("contents") or {}
        gguf_type = contents.get("gguf_type")
        if gguf_type not in GGUF_TYPES:
            raise ManifestError(f"{root}: unknown GGUF type {gguf_type!r} in the manifest; this jev4 reads {', '.join(GGUF_TYPES)}")
        path = root / str(contents.get("gguf_file", "model.gguf"))
        if not path.is_file():
            raise CheckpointError(f"{path}: the GGUF file of this artifact is missing")
        projector_path = root / str(contents.get("projector_file", ""))
        if not projector_path.is_file():
            raise CheckpointError(f"{projector_path}: the multi-vector projector of this GGUF artifact is missing")
        projector = read_projector(projector_path, config.hidden_size, torch.float32, "cpu")
        model = LlamaCppModel(path, settings or LlamaCppSettings(), int(contents.get("context_length", 32768)))
        try:
            keys = model.keys
            if KEY_TASK not in keys or KEY_FORMAT not in keys:
                raise ManifestError(f"{path}: not a jev4 GGUF (no {KEY_TASK} / {KEY_FORMAT} keys); export one with jev4-export --format gguf")
            if keys[KEY_TASK] != config.merged_task or keys.get(KEY_GGUF_TYPE) != gguf_type:
                raise ManifestError(f"{path}: holds task {keys[KEY_TASK]!r} as {keys.get(KEY_GGUF_TYPE)!r}, the manifest says {config.merged_task!r} as {gguf_type!r}")
            if model.n_embd != config.hidden_size or int(keys.get(KEY_MULTI_DIM, -1)) != projector.out_features:
                raise ManifestError(f"{path}: embedding size {model.n_embd} / multi-vector dim {keys.get(KEY_MULTI_DIM)} disagree with the manifest and projector ({config.hidden_size} / {projector.out_features})")
        except BaseException:
            model.close()
            raise
        log.info("loaded GGUF %s (%s, task %s) in llama.cpp", path, gguf_type, config.merged_task)
        return cls(model, projector, config, Preprocessor.from_dir(root, config))

    @property
    def supports_images(self) -> bool:
        return False  # the GGUF has no vision tower: encode_image is refused by the preprocessor (no image processor)

    def engine(self) -> str:
        from importlib.metadata import version

        return f"llama.cpp (llama-cpp-python {version('llama-cpp-python')}, in-process)"

    @torch.inference_mode()
    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = inputs.attention_mask
        hidden = torch.zeros(*inputs.input_ids.shape, self.config.hidden_size, dtype=torch.float32)
        for row in range(inputs.batch_size):
            valid = mask[row].bool()
            ids = inputs.input_ids[row, valid].tolist()  # right padding: the valid tokens are a prefix
            if ids:
                hidden[row, : len(ids)] = torch.from_numpy(self.model.token_states(ids))
        single = single_vector(hidden, inputs.pooling_mask)
        multi = multi_vector(self.projector(hidden), mask)
        return single, multi

    def close(self) -> None:
        """Free llama.cpp's model and context now (otherwise when the encoder is collected)."""
        self.model.close()

    def __enter__(self) -> LlamaCppEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
