"""Parity: how closely an artifact reproduces the reference on the probe set.

Both encoders are run on the same probes (run step), then compared (compare
step) per input and per output: single vectors at every Matryoshka dim,
multi-vectors per token, and what downstream search sees: MaxSim scores and
query-to-document rankings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from jev4.model.encoder import Encoder
from jev4.validate.metrics import cosine_rows, max_abs, maxsim_scores, pearson, spearman, topk_overlap
from jev4.validate.probes import ProbeSet
from jev4.validate.results import ParityResult

log = logging.getLogger(__name__)

MAX_TOKEN_COSINES = 5000


@dataclass
class EncodedSet:
    """One encoder's outputs on one group of probes: full-size single vectors and per-token multi-vectors."""

    single: np.ndarray  # [N, H], L2-normalised
    multi: list[np.ndarray]  # [tokens_i, P]


def encode_probes(encoder: Encoder, probes: ProbeSet, task: str, batch_size: int, progress: bool, multivector: bool = True) -> dict[str, EncodedSet]:
    """Run one encoder on every probe: queries (query prompt), texts (passage prompt), images; multi-vectors if asked."""
    common = dict(task=task, batch_size=batch_size, progress=progress)
    text_kw = dict(max_length=probes.max_length, **common)

    def multi(vectors) -> list[np.ndarray]:
        return [m.numpy() for m in vectors]

    groups: dict[str, EncodedSet] = {
        "query": EncodedSet(
            encoder.encode_text(probes.queries, prompt_name="query", **text_kw).numpy(),
            multi(encoder.encode_text(probes.queries, prompt_name="query", return_multivector=True, **text_kw)) if multivector else [],
        ),
        "text": EncodedSet(
            encoder.encode_text(probes.texts, prompt_name="passage", **text_kw).numpy(),
            multi(encoder.encode_text(probes.texts, prompt_name="passage", return_multivector=True, **text_kw)) if multivector else [],
        ),
    }
    if probes.images:
        groups["image"] = EncodedSet(
            encoder.encode_image(probes.images, **common).numpy(),
            multi(encoder.encode_image(probes.images, return_multivector=True, **common)) if multivector else [],
        )
    return groups


def _truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    return F.normalize(torch.from_numpy(vectors[:, :dim]).double(), dim=-1).numpy()


def compare_probes(reference: dict[str, EncodedSet], artifact: dict[str, EncodedSet], dims: list[int]) -> ParityResult:
    """Per-input and aggregate agreement between two encoders' probe outputs."""
    full = reference["query"].single.shape[1]
    dims = sorted({*dims, full}, reverse=True)
    per_input: list[dict] = []
    cos_by_dim: dict[str, list[float]] = {str(d): [] for d in dims}
    abs_by_dim: dict[str, float] = {str(d): 0.0 for d in dims}
    token_cos: list[np.ndarray] = []
    for kind, ref in reference.items():
        art = artifact[kind]
        if ref.single.shape != art.single.shape:
            raise ValueError(f"{kind}: reference {ref.single.shape} vs artifact {art.single.shape}")
        cosines = {str(d): cosine_rows(_truncate(ref.single, d), _truncate(art.single, d)) for d in dims}
        for d in dims:
            cos_by_dim[str(d)].extend(cosines[str(d)].tolist())
            abs_by_dim[str(d)] = max(abs_by_dim[str(d)], max_abs(_truncate(ref.single, d), _truncate(art.single, d)))
        if not art.multi:  # multi-vectors not measured (the artifact does not serve them)
            per_input += [
                {"id": f"{kind}-{i}", "kind": kind, "tokens": None, "cosine": {k: float(v[i]) for k, v in cosines.items()}, "max_abs": max_abs(ref.single[i], art.single[i])}
                for i in range(len(ref.single))
            ]
            continue
        for i, (rm, am) in enumerate(zip(ref.multi, art.multi, strict=True)):
            if rm.shape != am.shape:
                raise ValueError(f"{kind} {i}: multi-vector shape {rm.shape} vs {am.shape}")
            tc = cosine_rows(rm, am)
            token_cos.append(tc)
            per_input.append(
                {
                    "id": f"{kind}-{i}",
                    "kind": kind,
                    "tokens": int(rm.shape[0]),
                    "cosine": {k: float(v[i]) for k, v in cosines.items()},
                    "max_abs": max_abs(ref.single[i], art.single[i]),
                    "multi_cosine_min": float(tc.min()),
                    "multi_cosine_mean": float(tc.mean()),
                }
            )
    docs_ref = _documents(reference)
    docs_art = _documents(artifact)
    ref_scores = reference["query"].single @ docs_ref.single.T
    art_scores = artifact["query"].single @ docs_art.single.T
    k = min(10, ref_scores.shape[1])
    multi_min = multi_mean = maxsim = None
    sample = np.zeros(0)
    if token_cos:
        all_tokens = np.concatenate(token_cos)
        multi_min, multi_mean = float(all_tokens.min()), float(all_tokens.mean())
        maxsim = pearson(maxsim_scores(reference["query"].multi, docs_ref.multi).ravel(), maxsim_scores(artifact["query"].multi, docs_art.multi).ravel())
        sample = all_tokens if len(all_tokens) <= MAX_TOKEN_COSINES else all_tokens[np.linspace(0, len(all_tokens) - 1, MAX_TOKEN_COSINES).astype(int)]
    return ParityResult(
        single_cosine_min={d: float(np.min(v)) for d, v in cos_by_dim.items()},
        single_cosine_mean={d: float(np.mean(v)) for d, v in cos_by_dim.items()},
        single_max_abs=abs_by_dim,
        multi_token_cosine_min=multi_min,
        multi_token_cosine_mean=multi_mean,
        maxsim_pearson=maxsim,
        topk_overlap=topk_overlap(ref_scores, art_scores, k=k),
        score_spearman=spearman(ref_scores.ravel(), art_scores.ravel()),
        per_input=per_input,
        single_cosines=cos_by_dim[str(full)],
        token_cosines=sample.astype(float).tolist(),
    )


def _documents(groups: dict[str, EncodedSet]) -> EncodedSet:
    """Text and image probes together form the document side of the ranking checks."""
    parts = [groups[k] for k in ("text", "image") if k in groups]
    return EncodedSet(np.concatenate([p.single for p in parts]), [m for p in parts for m in p.multi])


def run_parity(reference: Encoder, artifact: Encoder, probes: ProbeSet, task: str, batch_size: int = 8, progress: bool = True) -> ParityResult:
    """Both encoders on the probe set; images and multi-vectors only where the artifact serves them (the report says which)."""
    dims = list(reference.config.matryoshka_dims)
    if not artifact.supports_images:
        probes = replace(probes, images=[])
    multivector = artifact.supports_multivector
    log.info("parity: encoding %d queries, %d texts, %d images with each encoder", len(probes.queries), len(probes.texts), len(probes.images))
    ref = encode_probes(reference, probes, task, batch_size, progress, multivector)
    art = encode_probes(artifact, probes, task, batch_size, progress, multivector)
    return compare_probes(ref, art, dims)
