"""What a validation run produces, as plain dataclasses that serialise to JSON.

Running and comparing are separate steps (as in Polygraphy): encoders are run
once, the numbers land here, and the verdict and the reports are computed
from these objects alone, so a report can be rebuilt from ``report.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MetricCheck:
    """One thresholded number: ``value`` must be >= ``minimum`` (or <= ``maximum``)."""

    name: str
    value: float
    minimum: float | None = None
    maximum: float | None = None

    @property
    def passed(self) -> bool:
        if self.value != self.value:  # NaN never passes
            return False
        if self.minimum is not None and self.value < self.minimum:
            return False
        if self.maximum is not None and self.value > self.maximum:
            return False
        return True

    def describe(self) -> str:
        bound = f">= {self.minimum:g}" if self.minimum is not None else f"<= {self.maximum:g}"
        return f"{self.name} = {self.value:.6g} (needs {bound})"


@dataclass
class ParityResult:
    """Artifact vs reference on the probe set, per output.

    ``per_input`` holds one row per probe input (id, kind, length, cosine per dim,
    max abs error, multi-vector min/mean token cosine); the aggregates below are
    what thresholds look at.
    """

    single_cosine_min: dict[str, float]  # per Matryoshka dim ("2048", "128", ...)
    single_cosine_mean: dict[str, float]
    single_max_abs: dict[str, float]
    multi_token_cosine_min: float | None  # None: not measured (the artifact serves no multi-vectors)
    multi_token_cosine_mean: float | None
    maxsim_pearson: float | None
    topk_overlap: float  # mean top-10 overlap of query->doc rankings
    score_spearman: float  # Spearman of query-document scores
    per_input: list[dict[str, Any]] = field(default_factory=list)
    single_cosines: list[float] = field(default_factory=list)  # full-dim cosine per input, for histograms
    token_cosines: list[float] = field(default_factory=list)  # a sample of per-token cosines, for histograms


@dataclass
class RetrievalResult:
    """One dataset x scoring mode x Matryoshka dim: reference and artifact metrics."""

    dataset: str
    scoring: str  # "single" or "multi" (MaxSim)
    dim: int | None
    reference: dict[str, float]
    artifact: dict[str, float]
    queries: int = 0  # how many queries the metrics average over (their resolution is 1/queries)

    @property
    def delta(self) -> dict[str, float]:
        return {k: self.artifact[k] - self.reference[k] for k in self.reference if k in self.artifact}


@dataclass
class CodecResult:
    """One dataset x codec x scoring x dim: metrics, the float32 metrics they are compared with, and the costs."""

    dataset: str
    codec: str
    scoring: str  # "single" or "multi"
    dim: int
    metrics: dict[str, float]
    float_metrics: dict[str, float]
    bytes_per_doc: int
    search_ms_per_query: float
    queries: int = 0
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def retention(self) -> dict[str, float]:
        """metric / float32 metric (1.0 = nothing lost; NaN where float32 scored 0)."""
        return {k: (v / self.float_metrics[k] if self.float_metrics.get(k) else float("nan")) for k, v in self.metrics.items()}


@dataclass
class STSResult:
    dataset: str
    reference_spearman: float
    artifact_spearman: float


@dataclass
class ValidationReport:
    """Everything ``jev4 validate`` measured, the checks against thresholds, and the context."""

    settings: dict[str, Any]
    environment: dict[str, Any]
    precision: str
    parity: ParityResult | None
    retrieval: list[RetrievalResult]
    sts: list[STSResult]
    checks: list[MetricCheck]
    codecs: list[CodecResult] = field(default_factory=list)  # the artifact's embeddings through each output codec

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
        for item, obj in zip(data["codecs"], self.codecs):
            item["retention"] = obj.retention
        return data
