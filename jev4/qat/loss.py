"""The QAT objective: InfoNCE over quantized embeddings, made differentiable by a straight-through estimator.

Documents (and with ``quantize="both"`` queries) pass through the same
codec as post-training quantization (``jev4.quant.embeddings.ste``: the
forward value is bit-identical to ``EmbeddingCodec.decode(encode(x))``, the
gradient is the identity), so the model learns to place embeddings where
quantization hurts least. Scaling of the range codecs (int8, int4) comes
from the batch itself (``minmax``) or from an exponential moving average of
per-dim min/max over batches (``rolling``), which Jina reports to work
better because one batch's extremes are noisy. Ternary and binary are
centred per dim on the batch (the codec's calibrated form, ``calibrate``),
and evaluated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from jev4.quant.embeddings import RollingRange, calibrate, calibration_tensors, ste

QAT_PRECISIONS = ("binary", "ternary", "int4", "int8")


@dataclass
class Quantizer:
    """Fake-quantizes embeddings for the loss, keeping rolling ranges per dim when asked."""

    precision: str | None  # None: plain float fine-tuning (the post-training-quantization baseline)
    scaling: str = "minmax"
    momentum: float = 0.99
    rolling: dict[str, RollingRange] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, kind: str = "single") -> torch.Tensor:
        """Fake-quantize ``x`` [N, D]; ``kind`` ("single"/"multi") keeps separate rolling ranges per output."""
        if self.precision is None:
            return x
        if self.precision in ("binary", "ternary"):
            # Centred per dim on the batch (binary: the sign of x - median). Mean-pooled embeddings share a
            # large common direction, so plain signs are nearly the same for every document and the
            # straight-through gradient cannot flip them: binary QAT without centring did not learn at all.
            cal = calibrate(x.detach().float().cpu().numpy(), self.precision)
            return ste(x, self.precision, **calibration_tensors(cal, device=x.device))
        if self.scaling == "rolling":
            state = self.rolling.setdefault(f"{kind}/{x.shape[-1]}", RollingRange(x.shape[-1], self.momentum))
            lower, upper = state.update(x.detach())
        else:
            lower, upper = x.detach().float().amin(dim=0), x.detach().float().amax(dim=0)
        return ste(x, self.precision, lower, upper)


def info_nce(queries: torch.Tensor, documents: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each query against all documents; query i's positive is document i.

    ``documents`` holds the batch's positives first, then any hard negatives,
    so every other positive is an in-batch negative.
    """
    scores = F.normalize(queries, dim=-1) @ F.normalize(documents, dim=-1).T / temperature
    return F.cross_entropy(scores, torch.arange(queries.shape[0], device=queries.device))


def qat_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    quantizer: Quantizer,
    quantize_queries: bool,
    temperature: float,
    dims: tuple[int, ...],
) -> torch.Tensor:
    """Mean InfoNCE over the full size and each Matryoshka dim (truncate, re-normalise, then quantize)."""
    losses = []
    for dim in dims:
        q = F.normalize(queries[:, :dim], dim=-1)
        d = F.normalize(documents[:, :dim], dim=-1)
        losses.append(info_nce(quantizer(q) if quantize_queries else q, quantizer(d), temperature))
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
    d = F.normalize(quantizer(F.normalize(doc_tokens[doc_mask], dim=-1), "multi"), dim=-1)
    docs = torch.zeros_like(doc_tokens).masked_scatter(doc_mask.unsqueeze(-1), d)
    q = F.normalize(query_tokens[query_mask], dim=-1)
    q = F.normalize(quantizer(q, "multi"), dim=-1) if quantize_queries else q
    queries = torch.zeros_like(query_tokens).masked_scatter(query_mask.unsqueeze(-1), q)
    sims = torch.einsum("qtp,dsp->qdts", queries, docs)
    sims = sims.masked_fill(~doc_mask[None, :, None, :], -2.0)
    best = sims.amax(dim=-1) * query_mask[:, None, :]
    scores = best.sum(-1) / query_mask.sum(-1, keepdim=True).clamp(min=1)
    return F.cross_entropy(scores / temperature, torch.arange(queries.shape[0], device=queries.device))
