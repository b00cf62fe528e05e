"""``validate()``: the reference and an artifact, measured on probes and datasets, with a verdict.

Steps: load both encoders through the runtime, run parity on the probe set,
run retrieval (and STS) on each dataset, check every number against the
thresholds of the artifact's precision, write report.json/.md/.html.
"""

from __future__ import annotations

import logging
import os
import platform
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
    force: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_queries", "max_docs", "max_length", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SettingsError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        check_threads(self.threads, self.backend)  # before the reference loads or a server starts

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
    sts_sets = [load_sts_tsv(Path(p)) for p in settings.sts]
    if not (settings.probes or datasets or sts_sets):
        raise ConfigError("nothing to validate: probes are off and no --dataset or --sts was given")
    output_codec = OutputCodec.read(Path(settings.artifact))
    codecs = settings.codecs if settings.codecs is not None else ((output_codec.precision,) if output_codec else ())
    calibrations = {"single": output_codec.single, "multi": output_codec.multi} if output_codec else None
    # The artifact's own codec is judged (by its emb-* thresholds); other codecs are measured and reported.
    judged = {c: codec_thresholds(c, settings.thresholds) for c in codecs if output_codec and c.split("+", 1)[0] == output_codec.precision}
    with atomic_output_dir(settings.out, force=settings.force) as tmp:
        reference = rt.load(settings.reference, backend="torch", dtype="fp32")
        artifact = settings.load_artifact()
        try:
            report = _measure(settings, reference, artifact, datasets, sts_sets, precision, thresholds, judged, codecs, calibrations)
        finally:
            close = getattr(artifact, "close", None)
            if close is not None:
                close()  # a server started for this run is stopped
        write_reports(report, tmp)
    return report


def _refuse_image_datasets(datasets: list, what: str) -> None:
    images = [d.name for d in datasets if d.doc_kind == "image"]
    if images:
        raise SettingsError(f"--dataset {images[0]}: its documents are images, and {what} serves text only")


def _not_measured(artifact: rt.Encoder, settings: ValidateSettings) -> list[str]:
    """What the usual verdict covers but this artifact cannot serve: named in the report, not silently dropped."""
    missing = []
    if not artifact.supports_images:
        missing.append(f"images: {artifact.engine()} serves text only (no vision tower)")
    if not artifact.supports_multivector:
        missing.append(f"multi-vectors: {artifact.engine()} serves pooled vectors only")
    elif not settings.multivector:
        missing.append("multi-vector retrieval (MaxSim): --no-multivector")
    return missing


def _measure(
    settings: ValidateSettings, reference: rt.Encoder, artifact: rt.Encoder, datasets: list, sts_sets: list, precision: str, thresholds: Thresholds, judged: dict, codecs: tuple[str, ...], calibrations: dict | None
) -> ValidationReport:
    """Parity, retrieval, STS and the checks, with both encoders loaded."""
    if not artifact.supports_images:
        _refuse_image_datasets(datasets, artifact.engine())
    multivector = settings.multivector and artifact.supports_multivector
    parity = None
    if settings.probes:
        parity = run_parity(reference, artifact, default_probes(settings.max_length), settings.adapter, settings.batch_size, settings.progress)
    retrieval, codec_results = [], []
    for data in datasets:
        found, coded = run_retrieval_and_codecs(
            reference,
            artifact,
            data,
            settings.adapter,
            multivector,
            settings.batch_size,
            settings.max_length,
            settings.progress,
            codecs,
            calibrations,
        )
        retrieval += found
        codec_results += coded
    sts = [run_sts(reference, artifact, data, settings.adapter, settings.batch_size) for data in sts_sets]
    report = ValidationReport(
        settings={
            **asdict(settings),
            "thresholds": thresholds.to_json(),
            "codec_thresholds": {c: t.to_json() for c, t in judged.items()},
            "datasets_checksums": {d.name: d.checksum() for d in datasets},
            "not_measured": _not_measured(artifact, settings),
        },
        environment=environment(artifact.engine()),
        precision=precision,
        parity=parity,
        retrieval=retrieval,
        sts=sts,
        checks=evaluate(parity, retrieval, sts, thresholds) + codec_checks(codec_results, judged),
        codecs=codec_results,
    )
    return report
