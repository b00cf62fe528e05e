"""``encode_corpus(settings) -> OUT``: the driver's side of a corpus encode, whichever runner does the work.

1. Check the settings against the artifact (task, truncate_dim, the output
   codec) before anything long runs.
2. Lock OUT (``jev4.atomic.claim_output``: one job per OUT at a time).
3. Scan the corpus (``jev4.encode.corpus.scan_corpus``): every line checked,
   duplicate ids found, the checksum taken, the shard plan cut.
4. Compare with OUT's sidecar, if any: the same settings, artifact, corpus
   and plan resume; anything else is refused (``force`` starts over).
5. Write the sidecar (``complete: false``), then encode the shards whose
   files are missing, in this process or on Ray.
6. Check that every shard of the plan is there, whole and of one schema;
   mark the sidecar complete.

Why every id comes out exactly once: the plan partitions the checked corpus
(no duplicate ids) into shards; a shard's file is a pure function of the
shard, the settings and the artifact, and it is published whole by a
rename; a re-run or a retried task skips a shard whose file is there; the
reader (``jev4.encode.reader``) reads exactly the plan's files, and only once
the sidecar says complete.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import jev4
from jev4.atomic import claim_output
from jev4.encode import deps
from jev4.encode.corpus import CorpusScan, scan_corpus
from jev4.encode.output import (
    FORMAT,
    FORMAT_VERSION,
    SIDECAR_NAME,
    describe_output,
    now,
    read_sidecar,
    remove_temp_files,
    shard_done,
    sidecar_differences,
    stray_shards,
    write_sidecar,
)
from jev4.encode.plan import Shard, is_shard_name
from jev4.encode.settings import CorpusEncodeSettings
from jev4.encode.shard_encoder import EncodeJob, ShardResult
from jev4.errors import Jev4Error, OutputExistsError, TaskError

log = logging.getLogger(__name__)

_SMALL_FILE = 1 << 20  # checkpoint files up to this size are fingerprinted by content, larger ones by size


def _check_against_artifact(settings: CorpusEncodeSettings) -> Any:
    """The artifact's info, after checking that it can do what the settings ask (no model is loaded)."""
    import jev4.runtime as rt
    from jev4.quant.output_codec import OutputCodec

    info = rt.inspect(settings.model)
    if settings.task not in info.tasks:
        raise TaskError(f"unknown task {settings.task!r}; {settings.model} has {list(info.tasks)}")
    info.config.check_truncate_dim(settings.truncate_dim)
    if settings.output_precision is not None:
        codec = OutputCodec.read(info.root) or OutputCodec.uncalibrated()
        codec.codec("multi" if settings.multivector else "single", settings.truncate_dim, settings.output_precision)
    return info


def artifact_identity(info: Any) -> dict[str, Any]:
    """What makes two artifacts the same: the manifest (checksums of every file), or for a plain checkpoint a fingerprint of its files."""
    if info.manifest is not None:
        return {"kind": info.kind, "manifest": info.manifest}
    root = Path(info.root)
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
            size = path.stat().st_size
            files[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest() if size <= _SMALL_FILE else f"{size} bytes"
    return {"kind": info.kind, "files": files}


def _existing_sidecar(out: Path, force: bool) -> dict[str, Any] | None:
    """OUT's sidecar, None for a new or empty OUT; OUT that holds anything else is refused, even with force."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if (out / SIDECAR_NAME).exists():
        try:
            return read_sidecar(out)
        except Jev4Error:
            if force:
                return {}  # unreadable: force starts over
            raise
    if any(out.iterdir()):
        raise OutputExistsError(f"{out}: exists and is not a jev4 embeddings directory (no {SIDECAR_NAME}); choose another OUT, or empty it yourself")
    return None


def _clear(out: Path) -> None:
    """Remove what a previous job wrote (only the sidecar, shards and temp files: anything else stays and is named)."""
    for entry in out.iterdir():
        if entry.name == SIDECAR_NAME or is_shard_name(entry.name) or (entry.name.startswith(".") and ".tmp-" in entry.name):
            entry.unlink()
    left = [p.name for p in out.iterdir()]
    if left:
        log.warning("%s: kept files that are not jev4's: %s", out, ", ".join(left))
    log.info("%s: removed the previous embeddings (force)", out)


def _job(settings: CorpusEncodeSettings, info: Any, scan: CorpusScan, out: Path) -> EncodeJob:
    return EncodeJob(
        model=str(Path(info.root).resolve()),
        out=str(out.resolve()),
        sources=scan.sources,
        task=settings.task,
        prompt=settings.prompt,
        truncate_dim=settings.truncate_dim,
        multivector=settings.multivector,
        output_precision=settings.output_precision,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        dtype=settings.dtype,
        device=settings.device,
        provider=settings.provider,
        threads=settings.threads,
    )


def _verify(out: Path, shards: tuple[Shard, ...]) -> dict[str, Any]:
    """Every shard of the plan present, with its row count and one schema for all; returns the output description."""
    pa = deps.pyarrow()
    schema = None
    for shard in shards:
        path = out / shard.name
        try:
            meta = pa.parquet.ParquetFile(path)
        except FileNotFoundError:
            raise Jev4Error(f"{path}: missing after the run; run the job again to encode it") from None
        if meta.metadata.num_rows != shard.records:
            raise Jev4Error(f"{path}: {meta.metadata.num_rows} rows, the plan says {shard.records}; delete it and run the job again")
        if schema is None:
            schema = meta.schema_arrow
        elif not meta.schema_arrow.equals(schema, check_metadata=True):
            raise Jev4Error(f"{path}: its columns ({meta.schema_arrow}) differ from {shards[0].name}'s ({schema}); delete it and run the job again")
    return describe_output(schema)


def encode_corpus(settings: CorpusEncodeSettings) -> Path:
    """Encode the corpus into OUT (see the module doc); resumes where a killed job with the same settings stopped."""
    deps.pyarrow()
    if settings.ray is not None:
        deps.ray()
    info = _check_against_artifact(settings)
    out = Path(settings.out)
    with claim_output(out, True, (settings.model, settings.corpus), kind="dir"):  # True: an existing OUT is judged below, by its sidecar
        existing = _existing_sidecar(out, settings.force)
        scan = scan_corpus(settings.corpus, settings.shard_size, settings.progress)
        sidecar: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "jev4_version": jev4.__version__,
            "complete": False,
            "created": now(),
            "artifact": {"path": str(Path(info.root).resolve()), "kind": info.kind, "identity": artifact_identity(info)},
            "settings": settings.result_settings(),
            "corpus": scan.describe(settings.corpus),
            "shards": [shard.to_json() for shard in scan.shards],
            "output": None,
            "runs": [],
        }
        if existing is not None:
            problems = sidecar_differences(existing, sidecar) if existing else ["its sidecar is unreadable"]
            if settings.force:
                _clear(out)
            elif problems:
                raise OutputExistsError(
                    f"{out}: holds embeddings of another job ({'; '.join(problems)}); re-run with the same settings to resume it, "
                    "choose another OUT, or pass --force to start over"
                )
            else:
                sidecar.update(created=existing.get("created", sidecar["created"]), runs=existing.get("runs", []))
                if existing.get("complete"):
                    log.info("%s: already complete (%d embeddings in %d shards); nothing to do", out, scan.records, len(scan.shards))
                    return out
        out.mkdir(parents=True, exist_ok=True)
        remove_temp_files(out)
        stray = stray_shards(out, scan.shards)
        if stray:
            log.warning("%s: %d shard file(s) that the plan does not name are ignored: %s", out, len(stray), ", ".join(stray[:3]))
        todo = [shard for shard in scan.shards if not shard_done(out, shard)]
        log.info("corpus: %d records in %d shards; %d done already, %d to encode", scan.records, len(scan.shards), len(scan.shards) - len(todo), len(todo))
        run = {"started": now(), "finished": None, "shards_to_encode": len(todo), "shards_written": 0, **settings.run_settings()}
        sidecar["runs"] = [*sidecar["runs"], run]
        write_sidecar(out, sidecar)  # before any shard: no shard file exists without the sidecar that says what it is
        if todo:
            run.update(_run(settings, _job(settings, info, scan, out), todo, run))
        remove_temp_files(out)
        sidecar["output"] = _verify(out, scan.shards)
        sidecar["complete"] = True
        run["finished"] = now()
        write_sidecar(out, sidecar)
    log.info("wrote %d embeddings in %d shards to %s (%d shards encoded by this run)", scan.records, len(scan.shards), out, run["shards_written"])
    return out


def _run(settings: CorpusEncodeSettings, job: EncodeJob, todo: list[Shard], run: dict[str, Any]) -> dict[str, Any]:
    """Hand the missing shards to the runner, with a progress bar in shards on the driver."""
    bar = None
    if settings.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="encoding shards", unit="shard")
    records = 0

    def on_result(result: ShardResult) -> None:
        nonlocal records
        run["shards_written"] += int(result.written)
        records += result.records
        if bar is not None:
            bar.update(1)
            bar.set_postfix(records=records, refresh=False)

    try:
        if settings.ray is None:
            from jev4.encode.local import run_in_process

            return run_in_process(job, todo, on_result)
        from jev4.encode.ray_runner import run_on_ray

        return run_on_ray(job, todo, settings, on_result)
    finally:
        if bar is not None:
            bar.close()
