"""``jev4 validate`` for jina-clip-v2: the torch reference vs an artifact, on the two-tower retrieval evaluation, with a verdict.

jina-clip-v2 has no task adapters, no multi-vectors and no probe set of its
own, so v4's runner (``jev4.validate.runner``) does not fit it; what does is
``run_clip_retrieval``: text->text on multilingual-names, text->image on
pydoc-pages, image->image on the pages' crops, at every Matryoshka dim, plus
the cosine between the two encoders' vectors of every input. Every number is
checked against the thresholds of the artifact's precision
(``CLIP_DEFAULTS`` in ``jev4.validate.thresholds``, read from the manifest
as v4 does) and the reports (report.json / .md / .html, with plots) are
written into OUT atomically, as v4's are.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jev4.atomic import atomic_output_dir, claim_output
from jev4.errors import ConfigError, SettingsError
from jev4.families.registry import CONFIG_NAME, family_of
from jev4.validate.clip_retrieval import ClipRetrievalResult, ClipRetrievalSettings, CosineParity, run_clip_retrieval
from jev4.validate.results import MetricCheck, RetrievalResult
from jev4.validate.thresholds import evaluate_clip, load_clip_thresholds

log = logging.getLogger(__name__)

__all__ = ["FAMILY", "ClipValidateSettings", "ClipValidationReport", "retrieval_results", "validate_clip"]

FAMILY = "jina-clip-v2"


@dataclass(frozen=True)
class ClipValidateSettings:
    """Options of ``jev4 validate`` on a jina-clip-v2 reference; recorded in the report."""

    reference: str
    artifact: str
    out: str
    thresholds: str | None = None  # JSON file overriding CLIP_DEFAULTS (same format as v4's)
    precision: str | None = None  # threshold set; default: the artifact's manifest
    provider: str = "cpu"
    threads: int | None = None
    retrieval: ClipRetrievalSettings = field(default_factory=ClipRetrievalSettings)
    force: bool = False

    def __post_init__(self) -> None:
        from jev4.runtime.loader import check_threads

        for flag, value in (("--max-queries", self.retrieval.text_queries), ("--max-docs", self.retrieval.text_docs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SettingsError(f"{flag} must be a positive integer, got {value!r}")
        check_threads(self.threads, "onnxruntime")  # before any model loads

    def sources(self) -> tuple[str | None, ...]:
        """What the run reads: the report may not be, hold or sit inside any of them."""
        return (self.reference, self.artifact, self.thresholds)


@dataclass
class ClipValidationReport:
    """Everything one clip-v2 validation measured and judged; ``retrieval`` in v4's shape so its tables and plots serve."""

    settings: dict[str, Any]
    environment: dict[str, Any]
    precision: str
    thresholds: dict[str, float]
    parity: list[CosineParity]
    retrieval: list[RetrievalResult]
    checks: list[MetricCheck]
    checksums: dict[str, str] = field(default_factory=dict)
    family: str = FAMILY

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[MetricCheck]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["failures"] = [c.describe() for c in self.failures]
        for item, obj in zip(data["retrieval"], self.retrieval):
            item["delta"] = obj.delta
        return data


def retrieval_results(results: list[ClipRetrievalResult]) -> list[RetrievalResult]:
    """Clip results as v4's ``RetrievalResult`` (dataset ``"<set> (<direction>)"``, single vectors, candidate as artifact)."""
    return [RetrievalResult(f"{r.dataset} ({r.direction})", "single", r.dim, dict(r.reference), dict(r.candidate), r.queries) for r in results]


def _check_artifact(settings: ClipValidateSettings) -> None:
    """The artifact must be jina-clip-v2 too: one line before any model loads."""
    path = Path(settings.artifact).expanduser()
    if not (path / CONFIG_NAME).is_file():
        raise ConfigError(f"--artifact {settings.artifact}: no {CONFIG_NAME}; a jina-clip-v2 artifact (jev4-export --model {settings.reference}) carries one")
    family = family_of(path).name
    if family != FAMILY:
        raise ConfigError(f"--artifact {settings.artifact}: is {family}, but the reference {settings.reference} is {FAMILY}")


def validate_clip(settings: ClipValidateSettings) -> ClipValidationReport:
    """Measure, judge and write the reports into ``settings.out``; returns the report (``report.passed`` is the verdict)."""
    import jev4.runtime as rt
    from jev4.validate.report import write_clip_reports
    from jev4.validate.runner import artifact_precision, environment

    with claim_output(settings.out, settings.force, settings.sources()):
        _check_artifact(settings)
        precision = settings.precision or artifact_precision(Path(settings.artifact))
        thresholds = load_clip_thresholds(precision, settings.thresholds)  # an unknown precision fails here, before any model loads
        with atomic_output_dir(settings.out, force=settings.force) as tmp:
            reference = rt.load(settings.reference, backend="torch", dtype="fp32")
            artifact = rt.load(settings.artifact, provider=settings.provider, threads=settings.threads)
            try:
                measured = run_clip_retrieval(reference, artifact, settings.retrieval)
            finally:
                close = getattr(artifact, "close", None)
                if close is not None:
                    close()
            retrieval = retrieval_results(measured.retrieval)
            engine = artifact.engine() if hasattr(artifact, "engine") else type(artifact).__name__
            report = ClipValidationReport(
                settings={**asdict(settings), "thresholds": thresholds.to_json(), "family": FAMILY},
                environment=environment(engine),
                precision=precision,
                thresholds=thresholds.to_json(),
                parity=measured.parity,
                retrieval=retrieval,
                checks=evaluate_clip(measured.parity, retrieval, thresholds),
                checksums=dict(measured.checksums),
            )
            write_clip_reports(report, tmp)
    log.info("jina-clip-v2 validation: %s (%d checks, %d failed)", "PASS" if report.passed else "FAIL", len(report.checks), len(report.failures))
    return report
