"""What a corpus encode is asked to do: one frozen dataclass, checked when it is made.

The fields fall in two groups, and the split decides what a re-run into the
same OUT may change:

- **result fields** (``RESULT_FIELDS``): they change the vectors or the shard
  plan (task, prompt, truncate_dim, multivector, output precision, max
  length, shard size, dtype). They are recorded in OUT's sidecar, and a
  re-run with different values is refused (or starts over with ``force``):
  a resumed job must not mix two kinds of vectors.
- **run fields**: how the work is done (batch size, device, provider, Ray
  address, workers, GPUs per worker). A resumed job may change them, e.g.
  start in-process and finish on a Ray cluster. They can move results by
  float rounding only (a different batch composition, another device), which
  is why they are recorded per run but not compared.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any

from jev4.errors import SettingsError
from jev4.model.preprocess import DEFAULT_MAX_LENGTH

DEFAULT_SHARD_SIZE = 10_000  # records per shard: 10k x 2048 float32 = 80 MB of vectors in flight per worker
DEFAULT_MULTIVECTOR_SHARD_SIZE = 1_000  # a multi-vector record is tokens x 128 floats: 1k x 500 tokens = 256 MB
PROMPTS = ("query", "passage")
RESULT_FIELDS = ("task", "prompt", "truncate_dim", "multivector", "output_precision", "max_length", "shard_size", "dtype")


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class CorpusEncodeSettings:
    """Options of ``jev4 encode --corpus`` (see ``jev4.encode`` for the output layout).

    ``ray``: None runs in this process; ``"auto"`` joins the cluster Ray finds
    (``RAY_ADDRESS``, or one started on this machine) or starts a local one;
    anything else is a cluster address for ``ray.init``. When this process is
    already connected (``ray.is_initialized()``), that connection is used.
    ``workers``: encoder actors (default: one per GPU with
    ``gpus_per_worker``, else one per ``cpus_per_worker`` CPUs of the cluster).
    ``threads``: CPU threads of the engine in each worker (``jev4.runtime.load``;
    default: the engine's own in-process, ``cpus_per_worker`` rounded down on Ray).
    ``batch_size``: texts per forward pass, the same in both runners (a Ray
    task is one whole shard). ``shard_size`` default: 10,000 records, or
    1,000 with ``multivector``.
    """

    model: str
    corpus: str
    out: str
    task: str = "retrieval"
    prompt: str = "passage"
    truncate_dim: int | None = None
    multivector: bool = False
    output_precision: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    shard_size: int | None = None
    batch_size: int = 8
    dtype: str = "fp32"
    device: str = "cpu"
    provider: str = "cpu"
    threads: int | None = None
    ray: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "corpus", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise SettingsError(f"{name} must be a non-empty path, got {getattr(self, name)!r}")
        if self.prompt not in PROMPTS:
            raise SettingsError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        _positive_int("truncate_dim", self.truncate_dim, allow_none=True)
        _positive_int("max_length", self.max_length)
        _positive_int("shard_size", self.shard_size, allow_none=True)
        _positive_int("batch_size", self.batch_size)
        _positive_int("threads", self.threads, allow_none=True)
        if self.multivector and self.truncate_dim is not None:
            raise SettingsError("truncate_dim applies to single vectors (Matryoshka); multi-vectors keep their own dims")
        if self.output_precision is not None:
            from jev4.quant.embeddings import check_precision

            check_precision(self.output_precision)
            if self.output_precision == "float32":
                object.__setattr__(self, "output_precision", None)  # floats are what the encoder returns anyway
        if self.shard_size is None:
            object.__setattr__(self, "shard_size", DEFAULT_MULTIVECTOR_SHARD_SIZE if self.multivector else DEFAULT_SHARD_SIZE)
        if self.ray is None:
            given = [f for f, v in (("workers", self.workers), ("gpus_per_worker", self.gpus_per_worker or None)) if v is not None]
            if given:
                raise SettingsError(f"{', '.join(given)} apply to a Ray run only; pass ray='auto' (--ray) or an address")
        elif not isinstance(self.ray, str) or not self.ray:
            raise SettingsError(f"ray must be 'auto' or a cluster address, got {self.ray!r}")
        _positive_int("workers", self.workers, allow_none=True)
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
                raise SettingsError(f"{name} must be a number >= 0, got {value!r}")
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise SettingsError("a worker needs some CPUs or GPUs: cpus_per_worker and gpus_per_worker are both 0")

    def result_settings(self) -> dict[str, Any]:
        """The fields that define the vectors and the shards; a resumed job must match them exactly."""
        return {name: getattr(self, name) for name in RESULT_FIELDS}

    def run_settings(self) -> dict[str, Any]:
        """How this run does the work (recorded, not compared)."""
        skip = {*RESULT_FIELDS, "model", "corpus", "out", "force", "progress"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
