"""The Ray runner: the same ShardEncoder, as a Ray Data actor pool over the missing shards.

Why a dataset of shard descriptors and not ``read_json`` -> ``map_batches``
-> ``write_parquet``: Ray Data's readers cut blocks as they see fit and
``write_parquet`` names files by task and block ids, so after a killed job
nothing says which input rows were written, and a retried write task can
leave a file twice. Here the driver's pre-pass has cut the corpus into
shards named by their input range (``jev4.encode.plan``); the dataset holds
one row per missing shard, in its own block; ``map_batches(ShardEncoder,
compute=ActorPoolStrategy(size=workers))`` gives each actor one shard at a
time (``max_tasks_in_flight_per_actor=1``: a dying actor loses one shard,
and the last shards are spread evenly); each actor reads its shard from the
corpus, encodes it sorted by length, and publishes its file atomically.
What flows back to the driver is one small row per shard (name, records),
which drives the progress bar.

Faults: an actor that dies (killed, out of memory, its node lost) is
restarted and its shard retried: Ray Data's defaults for actor pools
(``max_restarts=-1``, ``max_task_retries=-1``), left as they are because
Ray 2.60 deprecates passing them through ``map_batches``. A retried shard
whose file is already there is skipped, so nothing is written twice. A
shard that kills its actor every time (out of memory on very long texts) is
retried without end: stop the job, lower ``--shard-size`` or
``--batch-size`` / ``--max-length``, and re-run; it resumes. An error that a
worker reports (a corpus changed under the job, a text the model cannot
encode) is not retried: the job stops with that error.

The corpus, the artifact and OUT must be at the same paths on every node
(a shared file system), and jev4 installed on every node.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from jev4.encode import deps
from jev4.encode.plan import Shard
from jev4.encode.settings import CorpusEncodeSettings
from jev4.encode.shard_encoder import FAULT_ENV, EncodeJob, ShardEncoder, ShardResult
from jev4.errors import Jev4Error

log = logging.getLogger(__name__)


@contextmanager
def ray_connection(address: str) -> Iterator[None]:
    """This process's Ray connection: the one it has (``ray.is_initialized()``), else joined or started here and shut down on exit.

    ``address``: ``"auto"`` (``RAY_ADDRESS``, a cluster started on this
    machine, else a new local one) or a cluster address for ``ray.init``.
    """
    ray = deps.ray()
    if ray.is_initialized():
        yield
        return
    log.info("connecting to Ray (%s)", "the cluster Ray finds, else a new local one" if address == "auto" else address)
    ray.init(address=None if address == "auto" else address)
    try:
        yield
    finally:
        ray.shutdown()


def default_workers(cluster: dict[str, float], settings: CorpusEncodeSettings) -> int:
    """One actor per ``gpus_per_worker`` GPUs when workers use GPUs, else one per ``cpus_per_worker`` CPUs."""
    if settings.gpus_per_worker:
        gpus = cluster.get("GPU", 0)
        if gpus < settings.gpus_per_worker:
            raise Jev4Error(f"gpus_per_worker={settings.gpus_per_worker}, but the Ray cluster has {gpus:g} GPU(s)")
        return max(1, int(gpus // settings.gpus_per_worker))
    return max(1, int(cluster.get("CPU", 1) // settings.cpus_per_worker)) if settings.cpus_per_worker else 1


def _with_threads(job: EncodeJob, settings: CorpusEncodeSettings) -> EncodeJob:
    """Without ``threads``, each actor's engine gets its CPU share (``cpus_per_worker``), not every core of the node.

    onnxruntime sizes its pool by the node's cores whatever Ray reserved, so
    N actors on N cores would run N x N threads.
    """
    if job.threads is not None or not settings.cpus_per_worker:
        return job  # a GPU-only worker (0 CPUs) keeps its engine's default
    return dataclasses.replace(job, threads=max(1, int(settings.cpus_per_worker)))  # a fraction of a CPU still runs one thread


def _worker_error(error_type: str, message: str) -> Jev4Error:
    """The jev4 error a worker reported (class ``module:qualname`` and message), raised again on the driver."""
    module, _, name = error_type.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        cls = Jev4Error
    if not (isinstance(cls, type) and issubclass(cls, Jev4Error)):
        cls = Jev4Error
    return cls(f"{message} (on a Ray worker)")


def _consume(dataset: Any, on_result: Callable[[ShardResult], None]) -> Jev4Error | None:
    """Run the dataset, reporting each shard; the first jev4 error a worker reports stops the run and is returned.

    Stopping = closing the iterator: Ray Data shuts the execution down and
    drops its actors, as after a successful run.
    """
    batches = dataset.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0)
    try:
        for batch in batches:
            for name, records, written, error_type, error in zip(batch["name"], batch["records"], batch["written"], batch["error_type"], batch["error"]):
                if error:
                    return _worker_error(str(error_type), str(error))
                on_result(ShardResult(str(name), int(records), bool(written)))
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return None


def run_on_ray(job: EncodeJob, shards: Sequence[Shard], settings: CorpusEncodeSettings, on_result: Callable[[ShardResult], None]) -> dict[str, Any]:
    """Encode ``shards`` on a Ray cluster; ``on_result`` is called on the driver as each shard is published."""
    ray = deps.ray()
    with ray_connection(settings.ray):
        from ray.data import ActorPoolStrategy, DataContext

        workers = settings.workers or default_workers(ray.cluster_resources(), settings)
        log.info("Ray: %d encoder actor(s), %g CPU and %g GPU each, %d shard(s)", workers, settings.cpus_per_worker, settings.gpus_per_worker, len(shards))
        if settings.gpus_per_worker and settings.device == "cpu" and settings.provider == "cpu":
            log.warning("gpus_per_worker=%g, but the encoders run on the CPU: pass --device cuda (torch) or --provider cuda (ONNX)", settings.gpus_per_worker)
        job = _with_threads(job, settings)
        context = DataContext.get_current()
        saved = {"enable_progress_bars": context.enable_progress_bars, "raise_original_map_exception": context.raise_original_map_exception}
        context.enable_progress_bars = False  # the driver shows one bar of its own, in shards
        context.raise_original_map_exception = True  # anything else a worker raises (a bug) reaches the driver as itself, not as "UDF failed"
        runtime_env = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}} if os.environ.get(FAULT_ENV) else None
        items = [{"shard": json.dumps(shard.to_json())} for shard in shards]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardEncoder,
            fn_constructor_kwargs={"job": job},
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=min(workers, len(shards)), max_tasks_in_flight_per_actor=1),
            num_cpus=settings.cpus_per_worker,
            num_gpus=settings.gpus_per_worker or None,
            runtime_env=runtime_env,
        )
        try:
            error = _consume(dataset, on_result)
        finally:
            for name, value in saved.items():  # the caller's own Ray Data settings, as they were
                setattr(context, name, value)
        if error is not None:
            raise error
        return {"runner": "ray", "address": ray.get_runtime_context().gcs_address, "workers": min(workers, len(shards))}
