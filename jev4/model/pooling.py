"""Single- and multi-vector heads, and Matryoshka truncation.

Written with plain tensor ops so the same functions run in the torch
reference and trace into exported graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, pooling_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, H] over the positions where ``pooling_mask`` [B, T] is 1, in fp32."""
    mask = pooling_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.float() * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1.0)


def single_vector(hidden: torch.Tensor, pooling_mask: torch.Tensor) -> torch.Tensor:
    """Mean pooled and L2 normalised: the 2048-d single vector."""
    return F.normalize(mean_pool(hidden, pooling_mask), p=2, dim=-1)


def multi_vector(projected: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token projector output, L2 normalised, zeroed on padding."""
    return F.normalize(projected.float(), p=2, dim=-1) * attention_mask.to(torch.float32).unsqueeze(-1)


def truncate(vectors: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Matryoshka truncation: keep the first ``dim`` components and re-normalise."""
    if dim is None or dim >= vectors.shape[-1]:
        return vectors
    return F.normalize(vectors[..., :dim], p=2, dim=-1)
