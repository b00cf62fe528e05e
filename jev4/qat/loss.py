"""The QAT objective: InfoNCE over quantized embeddings, made differentiable by a straight-through estimator.

Documents (and with ``quantize="both"`` queries, encoded with the
documents' calibration as an index encodes them) pass through the same
codec as post-training quantization (``jev4.quant.embeddings.ste``: the
forward value is bit-identical to ``EmbeddingCodec.decode(encode(x))``, the
gradient is the identity), so the model learns to place embeddings where
quantization hurts least. Scaling of the range codecs (int8, int4) comes
from the batch itself (``minmax``) or from an exponential moving average of
per-dim min/max over batches (``rolling``), which Jina reports to work
better because one batch's extremes are noisy. Ternary and binary are
centred per dim (the codec's calibrated form, ``calibrate``): on the batch's
median, or under ``rolling`` on a moving average of the per-dim centre,
threshold and magnitude. Under ``rolling`` the final moving averages are the
calibration that evaluation and the output use, so serving quantizes exactly
as training did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from jev4.quant.embeddings import Calibration, RollingRange, ste

ROLLING_STATS = {"binary": ("center", "magnitude"), "ternary": ("center", "threshold", "magnitude")}
ZERO_FRACTION = 1.0 / 3.0  # calibrate()'s default share of ternary zeros

QAT_PRECISIONS = ("binary", "ternary", "int4", "int8")


def batch_stats(x: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    """Per-dim ``center`` (median), ``threshold`` (ternary) and ``magnitude`` of a batch [N, D], in torch.

    The same statistics as ``calibrate(x, precision)`` (linear-interpolated
    quantiles, as numpy's), computed on the batch's device without a copy to
    numpy (nor its small-sample warning, which a batch always triggers).
    """
    x = x.detach().float()
    center = torch.quantile(x, 0.5, dim=0)
    dist = (x - center).abs()
    if precision == "binary":
        return {"center": center, "magnitude": dist.mean(dim=0)}
    threshold = torch.quantile(dist, ZERO_FRACTION, dim=0)
    nonzero = dist > threshold
    count = nonzero.sum(dim=0)
    magnitude = torch.where(count > 0, (dist * nonzero).sum(dim=0) / count.clamp(min=1), threshold)
    return {"center": center, "threshold": threshold, "magnitude": magnitude}


class RollingStats:
    """Exponential moving average of a batch's binary/ternary statistics (``RollingRange``'s twin).

    ``--scaling rolling`` for the sign codecs: the centre, threshold and
    magnitude follow the training distribution instead of jumping with each
    batch's median; the final state is the calibration the output ships.
    """

    def __init__(self, precision: str, dim: int, momentum: float = 0.99) -> None:
        self.precision, self.dim, self.momentum = precision, int(dim), float(momentum)
        self.count = 0
        self.stats: dict[str, torch.Tensor] = {}

    def update(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = batch_stats(x, self.precision)
        if not self.stats:
            self.stats = {k: v.clone() for k, v in batch.items()}
        else:
            m = self.momentum
            self.stats = {k: self.stats[k].to(v.device) * m + v * (1.0 - m) for k, v in batch.items()}
        self.count += 1
        return self.stats

    def to_json(self) -> dict:
        arrays = {k: v.detach().cpu().double().tolist() for k, v in self.stats.items()}
        return {"precision": self.precision, "dim": self.dim, "momentum": self.momentum, "count": self.count, **arrays}

    @classmethod
    def from_json(cls, data: dict, device: torch.device | str | None = None) -> RollingStats:
        state = cls(data["precision"], data["dim"], data["momentum"])
        state.count = int(data["count"])
        state.stats = {k: torch.tensor(data[k], dtype=torch.float32, device=device) for k in ROLLING_STATS[state.precision] if k in data}
        return state

    def to_calibration(self) -> Calibration:
        arrays = {k: v.detach().cpu().float().numpy() for k, v in self.stats.items()}
        extra = {"zero_fraction": ZERO_FRACTION} if self.precision == "ternary" else {}
        return Calibration(self.precision, "rolling", self.dim, **arrays, **extra)


@dataclass
class Quantizer:
    """Fake-quantizes embeddings for the loss, keeping rolling statistics per output and dim when asked."""

    precision: str | None  # None: plain float fine-tuning (the post-training-quantization baseline)
    scaling: str = "minmax"
    momentum: float = 0.99
    gradient: str = "identity"  # the STE's backward: identity | clipped | tanh (ste_gradient_scale)
    rolling: dict[str, RollingRange | RollingStats] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, kind: str = "single") -> torch.Tensor:
        """Fake-quantize ``x`` [N, D] calibrated on itself; ``kind`` ("single"/"multi") keeps separate rolling statistics."""
        return self.apply(x, self.statistics(x, kind))

    def pair(self, queries: torch.Tensor, documents: torch.Tensor, quantize_queries: bool, kind: str = "single") -> tuple[torch.Tensor, torch.Tensor]:
        """Documents through the codec calibrated on the documents, and queries (when quantized) with the same calibration.

        That is how an index serves: the calibration is computed on (and
        stored with) the documents, and a query is encoded with it. Centring
        queries on their own batch instead trains codes that serving never
        produces: queries and documents carry different prefixes, so their
        per-dim medians differ.
        """
        stats = self.statistics(documents, kind)
        return (self.apply(queries, stats) if quantize_queries else queries), self.apply(documents, stats)

    def statistics(self, x: torch.Tensor, kind: str = "single") -> dict[str, torch.Tensor]:
        """The codec calibration for ``x`` [N, D]: of this batch (minmax) or the rolling state updated with it."""
        if self.precision is None:
            return {}
        key = f"{kind}/{x.shape[-1]}"
        if self.precision in ROLLING_STATS:
            # Centred per dim (binary: the sign of x - median, the codec's calibrated form). Mean-pooled
            # embeddings share a large common direction, so plain signs are nearly the same for every
            # document and the straight-through gradient cannot flip them: binary QAT without centring
            # did not learn at all.
            if self.scaling == "rolling":
                return self.rolling.setdefault(key, RollingStats(self.precision, x.shape[-1], self.momentum)).update(x)
            return batch_stats(x, self.precision)
        if self.scaling == "rolling":
            lower, upper = self.rolling.setdefault(key, RollingRange(x.shape[-1], self.momentum)).update(x.detach())
        else:
            lower, upper = x.detach().float().amin(dim=0), x.detach().float().amax(dim=0)
        return {"lower": lower, "upper": upper}

    def apply(self, x: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x`` through the codec with ``stats`` (from ``statistics``), differentiable by the straight-through estimator."""
        if self.precision is None:
            return x
        return ste(x, self.precision, gradient=self.gradient, **stats)

    def calibration(self, kind: str, dim: int) -> Calibration | None:
        """What training quantized against, as a codec calibration: the rolling state (None under minmax)."""
        state = self.rolling.get(f"{kind}/{dim}") if self.scaling == "rolling" else None
        if isinstance(state, RollingStats):
            return state.to_calibration() if state.stats else None
        return state.to_calibration(self.precision) if state is not None and state.lower is not None else None

    def state_json(self) -> dict:
        return {key: state.to_json() for key, state in self.rolling.items()}

    def load_state_json(self, data: dict, device: torch.device | str | None = None) -> None:
        self.rolling = {
            key: RollingStats.from_json(value, device) if "precision" in value else RollingRange.from_json(value, device=device)
            for key, value in data.items()
        }


def info_nce(queries: torch.Tensor, documents: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each query against all documents; query i's positive is document i.

    ``documents`` holds the batch's positives first, then any hard negatives,
    so every other positive is an in-batch negative.
    """
    scores = F.normalize(queries, dim=-1) @ F.normalize(documents, dim=-1).T / temperature
    return F.cross_entropy(scores, torch.arange(queries.shape[0], device=queries.device))


def quantization_error(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Squared distance of ``x`` [N, D] to its codes, relative to the batch's spread; gradient into ``x`` only.

    The deep-hashing quantization penalty: the straight-through InfoNCE says
    which way a value should move but not that a value near a decision
    boundary is fragile; this term pulls each value onto its code (binary:
    centre +/- magnitude), so the codes PTQ would give become the codes the
    model means. Dividing by the spread around the batch mean makes the
    weight independent of dim and codec scale (about 0.36 for a Gaussian
    dim under binary).
    """
    error = (x - quantized.detach()).pow(2).sum(-1).mean()
    spread = (x.detach() - x.detach().mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
    return error / spread


def qat_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    quantizer: Quantizer,
    quantize_queries: bool,
    temperature: float,
    dims: tuple[int, ...],
    error_weight: float = 0.0,
) -> torch.Tensor:
    """Mean InfoNCE over the full size and each Matryoshka dim (truncate, re-normalise, then quantize).

    ``error_weight`` adds ``quantization_error`` of every quantized input.
    """
    losses = []
    for dim in dims:
        q = F.normalize(queries[:, :dim], dim=-1)
        d = F.normalize(documents[:, :dim], dim=-1)
        q_codes, d_codes = quantizer.pair(q, d, quantize_queries)
        loss = info_nce(q_codes, d_codes, temperature)
        if error_weight and quantizer.precision is not None:
            errors = [quantization_error(d, d_codes)] + ([quantization_error(q, q_codes)] if quantize_queries else [])
            loss = loss + error_weight * torch.stack(errors).mean()
        losses.append(loss)
    return torch.stack(losses).mean()


def maxsim_loss(
    query_tokens: torch.Tensor,
    query_mask: torch.Tensor,
    doc_tokens: torch.Tensor,
    doc_mask: torch.Tensor,
    quantizer: Quantizer,
    quantize_queries: bool,
    temperature: float,
) -> torch.Tensor:
    """InfoNCE over late-interaction scores, document tokens (and query tokens) through the codec.

    MaxSim(q, d) = sum over q's tokens of the best cosine with d's tokens,
    divided by q's token count so that the temperature means the same as for
    single vectors. This term is what trains the multi-vector projector's LoRA.
    """
    q, d = quantizer.pair(F.normalize(query_tokens[query_mask], dim=-1), F.normalize(doc_tokens[doc_mask], dim=-1), quantize_queries, "multi")
    q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    docs = torch.zeros_like(doc_tokens).masked_scatter(doc_mask.unsqueeze(-1), d)
    queries = torch.zeros_like(query_tokens).masked_scatter(query_mask.unsqueeze(-1), q)
    sims = torch.einsum("qtp,dsp->qdts", queries, docs)
    sims = sims.masked_fill(~doc_mask[None, :, None, :], -2.0)
    best = sims.amax(dim=-1) * query_mask[:, None, :]
    scores = best.sum(-1) / query_mask.sum(-1, keepdim=True).clamp(min=1)
    return F.cross_entropy(scores / temperature, torch.arange(queries.shape[0], device=queries.device))
