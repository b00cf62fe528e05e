"""The one piece of code that turns a shard into its file, for both runners.

``ShardEncoder`` loads the artifact once (``jev4.runtime.load``) and encodes
one shard per call: read its records, ``encode_text`` them (which sorts the
shard's texts by token length into batches, so padding stays low, and
returns them in corpus order), and publish the shard file atomically. The
in-process runner calls ``encode_shard`` in a loop; the Ray runner hands
the class to ``map_batches`` as the callable of an actor pool, one shard
per batch. Same class, same calls, same shards: the two runners write the
same files.

Retries are safe: a shard whose file already exists whole is not encoded
again, so a task that Ray retries after its actor died (or a block that held
finished shards) writes nothing twice.

Test hooks (``JEV4_ENCODE_FAULT``; the Ray runner forwards the variable to
its actors): ``exit-on-shard:<index>:<marker file>`` ends the process
(``os._exit``, as a kill would) when it starts shard ``index`` and the marker
does not exist yet (it creates it first, so a restarted worker goes on);
``exit-after:<k>`` ends the process after it has written ``k`` shards;
``raise-on-shard:<index>`` raises an EncodeError at shard ``index``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jev4.encode.corpus import Source, read_shard
from jev4.encode.output import embedding_table, shard_done, write_shard
from jev4.encode.plan import Shard
from jev4.errors import EncodeError, Jev4Error

log = logging.getLogger(__name__)

FAULT_ENV = "JEV4_ENCODE_FAULT"


@dataclass(frozen=True)
class EncodeJob:
    """What every worker needs, small and picklable: absolute paths (a Ray worker's working directory is not the driver's)."""

    model: str
    out: str
    sources: tuple[Source, ...]
    task: str
    prompt: str
    truncate_dim: int | None
    multivector: bool
    output_precision: str | None
    max_length: int
    batch_size: int
    dtype: str
    device: str
    provider: str
    threads: int | None = None


@dataclass(frozen=True)
class ShardResult:
    name: str
    records: int
    written: bool  # False: the file was there already (a retried task)


class ShardEncoder:
    """Loads the artifact once; encodes whole shards into their files."""

    def __init__(self, job: EncodeJob):
        import jev4.runtime as rt

        self.job = job
        extra = {} if job.threads is None else {"threads": job.threads}
        self.encoder = rt.load(job.model, provider=job.provider, device=job.device, dtype=job.dtype, **extra)
        self.written = 0

    def encode_shard(self, shard: Shard) -> ShardResult:
        job = self.job
        if shard_done(Path(job.out), shard):
            return ShardResult(shard.name, shard.records, False)
        _fault("start", shard, self.written)
        source = job.sources[shard.source]
        ids, texts = read_shard(source, shard)
        try:
            vectors = self.encoder.encode_text(
                texts,
                task=job.task,
                prompt_name=job.prompt,
                truncate_dim=job.truncate_dim,
                return_multivector=job.multivector,
                max_length=job.max_length,
                batch_size=job.batch_size,
                output_precision=job.output_precision,
            )
        except EncodeError as exc:  # "text #k" counts within the shard: say which shard that is
            raise EncodeError(f"shard {shard.name} ({source.where(shard.start)} and after; #k = its k-th record): {exc}") from exc
        write_shard(Path(job.out), shard.name, embedding_table(ids, vectors, job.multivector, job.output_precision))
        self.written += 1
        _fault("written", shard, self.written)
        return ShardResult(shard.name, shard.records, True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data's entry: a batch of shard descriptors (normally one) in, one result row per shard out.

        A jev4 error (bad input, a corpus changed under the job) comes back as
        a row (its class and message), not as a raised exception: Ray Data logs
        a raised one with its traceback, and whoever keeps that log record
        (pytest's log capture does) keeps the failed execution's actors, and
        the CPUs or GPUs they hold, alive. The driver raises it (ray_runner).
        """
        rows = []
        for item in batch["shard"]:
            shard = Shard.from_json(_as_dict(item))
            try:
                result = self.encode_shard(shard)
            except Jev4Error as exc:
                rows.append((shard.name, 0, False, f"{type(exc).__module__}:{type(exc).__qualname__}", str(exc)))
            else:
                rows.append((result.name, result.records, result.written, "", ""))
        names, records, written, error_types, errors = zip(*rows) if rows else ((),) * 5
        return {
            "name": np.array(names, dtype=object),
            "records": np.array(records, dtype=np.int64),
            "written": np.array(written, dtype=bool),
            "error_type": np.array(error_types, dtype=object),
            "error": np.array(errors, dtype=object),
        }


def _as_dict(item: Any) -> dict[str, Any]:
    import json

    return json.loads(item) if isinstance(item, (str, bytes)) else dict(item)


def _fault(event: str, shard: Shard, written: int) -> None:
    """The test hooks of the module doc; nothing unless ``JEV4_ENCODE_FAULT`` is set."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, _, rest = spec.partition(":")
    if kind == "exit-on-shard" and event == "start":
        index, _, marker = rest.partition(":")
        if shard.index == int(index) and not os.path.exists(marker):
            Path(marker).write_text(f"{os.getpid()}\n")
            log.warning("%s: ending this process at shard %s", FAULT_ENV, shard.name)
            os._exit(1)
    elif kind == "raise-on-shard" and event == "start" and shard.index == int(rest):
        raise EncodeError(f"{FAULT_ENV}: a test error at shard {shard.name}")
    elif kind == "exit-after" and event == "written" and written >= int(rest):
        log.warning("%s: ending this process after %d shard(s)", FAULT_ENV, written)
        os._exit(137)
