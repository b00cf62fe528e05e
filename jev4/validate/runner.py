"""``validate()``: the reference and an artifact, measured on probes and datasets, with a verdict.

Steps: load both encoders through the runtime, run parity on the probe set,
run retrieval (and STS) on each dataset, check every number against the
thresholds of the artifact's precision, write report.json/.md/.html.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import jev4.runtime as rt
from jev4.runtime.loader import TEXT_ONLY_KIND, check_threads
from jev4.atomic import atomic_output_dir, claim_output
from jev4.errors import ConfigError, SettingsError, TaskError
from jev4.export.manifest import MANIFEST_NAME, package_versions, read_manifest
from jev4.datasets import load_sts_tsv, resolve_dataset
from jev4.validate.parity import run_parity
from jev4.validate.probes import default_probes
from jev4.validate.report import write_reports
from jev4.validate.results import ValidationReport
from jev4.quant.output_codec import OutputCodec
from jev4.validate.retrieval import run_retrieval_and_codecs, run_sts
from jev4.validate.thresholds import Thresholds, codec_checks, codec_thresholds, evaluate, load_thresholds

log = logging.getLogger(__name__)

SERVED_BACKENDS = ("vllm", "triton", "infinity")  # engines reached over HTTP/gRPC, each in its own environment
FLOAT_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class ValidateSettings:
    """Options of ``jev4 validate``; recorded in the report."""

    reference: str
    adapter: str
    artifact: str
    out: str
    datasets: tuple[str, ...] = ("stdlib-code",)
    sts: tuple[str, ...] = ()
    thresholds: str | None = None
    precision: str | None = None  # default: read from the artifact's manifest
    provider: str = "cpu"
    backend: str = "auto"  # how the artifact runs: auto (what it is), torch, onnxruntime, tensorrt, vllm, triton, infinity
    url: str | None = None  # a running server of a served backend (vllm: http://HOST:PORT/v1); None: started for the run
    vllm_pooling: str | None = None  # a vLLM server started here: token_embed (default; single + multi) or embed
    threads: int | None = None  # CPU threads of the artifact's in-process engine (jev4.runtime.load); None: its default
    max_queries: int | None = 200
    max_docs: int | None = 1000
    max_length: int = 512
    batch_size: int = 8
    multivector: bool = True
    probes: bool = True
    codecs: tuple[str, ...] | None = None  # output codecs to measure; None: the artifact's own, if it has one
    ray: str | None = None  # retrieval through corpus encodes on Ray: "auto" or a cluster address (jev4.validate.corpus_retrieval)
    workers: int | None = None  # Ray encoder actors (default: one per GPU, or per CPU)
    gpus_per_worker: float = 0.0
    shard_size: int | None = None  # records per Parquet shard of the corpus encodes (default: jev4.encode's)
    embeddings: str | None = None  # where --ray keeps the corpora and their encodes (resumable); None: inside OUT's temp dir, removed
    force: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_queries", "max_docs", "max_length", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SettingsError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        check_threads(self.threads, self.backend)  # before the reference loads or a server starts
        self._check_ray()

    def _check_ray(self) -> None:
        if self.ray is None:
            given = [f"--{name.replace('_', '-')}" for name in ("workers", "shard_size", "embeddings") if getattr(self, name) is not None]
            given += ["--gpus-per-worker"] if self.gpus_per_worker else []
            if given:
                raise SettingsError(f"{', '.join(given)} apply with --ray only")
            return
        if self.backend != "auto":
            raise SettingsError(f"--backend {self.backend}: with --ray the workers run the artifact on what it is (leave --backend auto)")
        for name in ("workers", "shard_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SettingsError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.codecs:
            from jev4.validate.corpus_retrieval import check_codecs_for_corpus

            check_codecs_for_corpus(self.codecs)
        if self.embeddings is not None:
            emb, out = Path(self.embeddings).resolve(), Path(self.out).resolve()
            if emb == out or out in emb.parents:
                raise SettingsError(f"--embeddings {self.embeddings}: inside the report dir {self.out}, which is replaced on each run; keep it elsewhere")

    def load_artifact(self) -> rt.Encoder:
        """The artifact's encoder on the asked backend.

        A served backend (vllm, triton, infinity) uses ``url`` or starts its
        server for this run; a vLLM server started here runs token_embed
        (single and multi-vectors) unless multi-vectors are off.
        """
        if self.backend not in SERVED_BACKENDS and self.url is not None:
            raise SettingsError(f"--url is for a served backend ({', '.join(SERVED_BACKENDS)}), not --backend {self.backend}")
        if self.backend != "vllm" and self.vllm_pooling is not None:
            raise SettingsError("--vllm-pooling is for --backend vllm")
        if self.backend == "vllm":
            pooling = self.vllm_pooling
            if pooling is None and self.url is None:
                pooling = "token_embed" if self.multivector else "embed"
            return rt.load(self.artifact, backend="vllm", url=self.url, vllm_pooling=pooling)
        if self.backend in SERVED_BACKENDS:
            return rt.load(self.artifact, backend=self.backend, url=self.url)
        return rt.load(self.artifact, backend=self.backend, provider=self.provider, threads=self.threads)

    def sources(self) -> tuple[str | None, ...]:
        """What the run reads: the report may not be, hold or sit inside any of them."""
        return (self.reference, self.artifact, *self.datasets, *self.sts, self.thresholds)


def artifact_precision(path: Path) -> str:
    """The weight precision an artifact was built with, from its manifest (fp32 for a plain checkpoint)."""
    if not (Path(path) / MANIFEST_NAME).is_file():
        return "fp32"
    manifest = read_manifest(path)
    contents, settings = manifest.get("contents", {}), manifest.get("settings", {})
    if "precision" in contents:
        return contents["precision"]
    if "float_dtype" in contents:
        return FLOAT_PRECISION.get(contents["float_dtype"], contents["float_dtype"])
    return settings.get("out_dtype") or "fp32"


def environment(engine: str | None = None) -> dict:
    """Where the numbers were measured; ``engine`` names what computed the artifact's embeddings (e.g. ``vLLM 0.32.0``)."""
    env = {"versions": package_versions(), "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()}
    if engine is not None:
        env = {"engine": engine, **env}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def validate(settings: ValidateSettings) -> ValidationReport:
    """Measure, judge and write the reports; returns the report (``report.passed`` is the verdict)."""
    with claim_output(settings.out, settings.force, settings.sources()):
        return _validate(settings)


def _validate(settings: ValidateSettings) -> ValidationReport:
    for role, path in (("reference", settings.reference), ("artifact", settings.artifact)):
        tasks = rt.inspect(path).tasks  # config and manifest only: a wrong --adapter fails before any model loads
        if settings.adapter not in tasks:
            raise TaskError(f"--adapter {settings.adapter!r}: the {role} {path} has {list(tasks)}")
    text_only = rt.inspect(settings.artifact).kind == TEXT_ONLY_KIND
    precision = settings.precision or artifact_precision(Path(settings.artifact))
    thresholds = load_thresholds(precision, Path(settings.thresholds) if settings.thresholds else None)
    datasets = [resolve_dataset(name, settings.max_queries, settings.max_docs) for name in settings.datasets]
    if text_only:
        _refuse_image_datasets(datasets, f"{settings.artifact} (a --text-only export)")
    if settings.ray is not None:
        _refuse_image_datasets(datasets, "--ray (it encodes text corpora)")
    sts_sets = [load_sts_tsv(Path(p)) for p in settings.sts]
    if not (settings.probes or datasets or sts_sets):
        raise ConfigError("nothing to validate: probes are off and no --dataset or --sts was given")
    output_codec = OutputCodec.read(Path(settings.artifact))
    codecs = settings.codecs if settings.codecs is not None else ((output_codec.precision,) if output_codec else ())
    calibrations = {"single": output_codec.single, "multi": output_codec.multi} if output_codec else None
    # The artifact's own codec is judged (by its emb-* thresholds); other codecs are measured and reported.
    judged = {c: codec_thresholds(c, settings.thresholds) for c in codecs if output_codec and c.split("+", 1)[0] == output_codec.precision}
    with atomic_output_dir(settings.out, force=settings.force) as tmp:
        with Encoders(settings) as encoders:
            report = _measure(settings, encoders, datasets, sts_sets, precision, thresholds, judged, codecs, calibrations, tmp)
        write_reports(report, tmp)
    return report


class Encoders:
    """The reference and the artifact, each loaded when first used, closed at the end.

    In-memory validation uses both at once. With ``--ray`` the workers do the
    retrieval encodes, so this process loads a model only for the probes and
    STS (``--no-probes`` and no ``--sts`` keep it model-free).
    """

    def __init__(self, settings: ValidateSettings):
        self.settings = settings
        self._reference: rt.Encoder | None = None
        self._artifact: rt.Encoder | None = None

    @property
    def reference(self) -> rt.Encoder:
        if self._reference is None:
            self._reference = rt.load(self.settings.reference, backend="torch", dtype="fp32")
        return self._reference

    @property
    def artifact(self) -> rt.Encoder:
        if self._artifact is None:
            self._artifact = self.settings.load_artifact()
        return self._artifact

    @property
    def artifact_loaded(self) -> bool:
        return self._artifact is not None

    def __enter__(self) -> Encoders:
        return self

    def __exit__(self, *exc: object) -> None:
        close = getattr(self._artifact, "close", None)
        if close is not None:
            close()  # a server started for this run is stopped


def _refuse_image_datasets(datasets: list, what: str) -> None:
    images = [d.name for d in datasets if d.doc_kind == "image"]
    if images:
        raise SettingsError(f"--dataset {images[0]}: its documents are images, and {what} serves text only")


def _not_measured(artifact: rt.Encoder | None, settings: ValidateSettings) -> list[str]:
    """What the usual verdict covers but this run cannot measure: named in the report, not silently dropped."""
    missing = []
    if settings.ray is not None:
        missing.append("images: --ray encodes text corpora")
    elif not artifact.supports_images:
        missing.append(f"images: {artifact.engine()} serves text only (no vision tower)")
    if artifact is not None and not artifact.supports_multivector:
        missing.append(f"multi-vectors: {artifact.engine()} serves pooled vectors only")
    elif not settings.multivector:
        missing.append("multi-vector retrieval (MaxSim): --no-multivector")
    return missing


def _retrieval(settings: ValidateSettings, encoders: Encoders, datasets: list, codecs: tuple[str, ...], calibrations: dict | None, tmp: Path) -> tuple[list, list]:
    """Retrieval (and codec) results of every dataset: in memory, or from corpus encodes on Ray."""
    retrieval, codec_results = [], []
    if settings.ray is None:
        artifact = encoders.artifact
        if not artifact.supports_images:
            _refuse_image_datasets(datasets, artifact.engine())
        multivector = settings.multivector and artifact.supports_multivector
        for data in datasets:
            found, coded = run_retrieval_and_codecs(
                encoders.reference, artifact, data, settings.adapter, multivector, settings.batch_size, settings.max_length, settings.progress, codecs, calibrations
            )
            retrieval += found
            codec_results += coded
        return retrieval, codec_results
    from jev4.encode.ray_runner import ray_connection
    from jev4.validate.corpus_retrieval import CorpusValidation, dataset_folder, run_corpus_retrieval

    config = rt.inspect(settings.reference).config
    dims = [config.hidden_size, *sorted(config.matryoshka_dims, reverse=True)]
    embeddings = Path(settings.embeddings) if settings.embeddings else tmp / "embeddings"
    run = CorpusValidation(
        reference=settings.reference,
        artifact=settings.artifact,
        task=settings.adapter,
        embeddings=embeddings,
        ray=settings.ray,
        workers=settings.workers,
        gpus_per_worker=settings.gpus_per_worker,
        provider=settings.provider,
        threads=settings.threads,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        shard_size=settings.shard_size,
        multivector=settings.multivector,
        progress=settings.progress,
    )
    try:
        with ray_connection(settings.ray):
            for data in datasets:
                found, coded = run_corpus_retrieval(run, data, dims, dataset_folder(embeddings, data), codecs, calibrations)
                retrieval += found
                codec_results += coded
    finally:
        if settings.embeddings is None:
            shutil.rmtree(embeddings, ignore_errors=True)  # scratch: the report does not carry the vectors
    return retrieval, codec_results


def _engine(settings: ValidateSettings, encoders: Encoders) -> str:
    if settings.ray is None:
        return encoders.artifact.engine()
    what = encoders.artifact.engine() if encoders.artifact_loaded else f"{rt.inspect(settings.artifact).kind} artifact"
    return f"{what}; retrieval encoded by Ray workers (jev4 encode --corpus)"


def _measure(
    settings: ValidateSettings,
    encoders: Encoders,
    datasets: list,
    sts_sets: list,
    precision: str,
    thresholds: Thresholds,
    judged: dict,
    codecs: tuple[str, ...],
    calibrations: dict | None,
    tmp: Path,
) -> ValidationReport:
    """Parity, retrieval, STS and the checks."""
    parity = None
    if settings.probes:
        parity = run_parity(encoders.reference, encoders.artifact, default_probes(settings.max_length), settings.adapter, settings.batch_size, settings.progress)
    retrieval, codec_results = _retrieval(settings, encoders, datasets, codecs, calibrations, tmp)
    sts = [run_sts(encoders.reference, encoders.artifact, data, settings.adapter, settings.batch_size) for data in sts_sets]
    artifact = encoders.artifact if encoders.artifact_loaded else None
    report = ValidationReport(
        settings={
            **asdict(settings),
            "thresholds": thresholds.to_json(),
            "codec_thresholds": {c: t.to_json() for c, t in judged.items()},
            "datasets_checksums": {d.name: d.checksum() for d in datasets},
            "not_measured": _not_measured(artifact, settings),
        },
        environment=environment(_engine(settings, encoders)),
        precision=precision,
        parity=parity,
        retrieval=retrieval,
        sts=sts,
        checks=evaluate(parity, retrieval, sts, thresholds) + codec_checks(codec_results, judged),
        codecs=codec_results,
    )
    return report
