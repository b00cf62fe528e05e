"""The fp32 verdict's sensitivity, pinned: perturbations that land just outside the fp32 bounds must fail.

The gross perturbation in test_validate.py moves the cosine to ~0.96, which
any bound would catch. Here the artifact's final RMSNorm scale is multiplied
by ``1 + eps * s`` (``s`` a fixed random sign per channel): every pooled
vector and every token is scaled channel-wise, so the cosine to the
reference is about ``1 - eps**2 / 2`` at every dim. ``eps = 0.03`` lands the
single-vector min cosine at ~0.99955 and the per-token min at ~0.998, between
the fp32 bounds (0.9999, 0.999) and bounds ten times looser (0.999, 0.99);
``eps = 0.01`` lands the mean cosine at ~0.99995, between 0.99999 and 0.9999.
So a verdict whose fp32 bounds were loosened tenfold passes these artifacts,
and these tests fail.
"""

import pytest
import torch

import jev4.runtime as rt
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.model.encoder import TorchEncoder
from jev4.validate.parity import run_parity
from jev4.validate.probes import default_probes
from jev4.validate.thresholds import DEFAULTS, evaluate

NORM = "model.language_model.norm.weight"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    merged = merge_checkpoint(
        MergeSettings(model=str(tiny_dir), adapter="retrieval", out=str(tmp_path_factory.mktemp("sens") / "m"), dtype="fp32"), progress=False
    )
    return rt.load(tiny_dir, backend="torch"), TorchEncoder.from_pretrained(merged), default_probes(128)


def _parity(setup, eps):
    reference, artifact, probes = setup
    weight = dict(artifact.network.named_parameters())[NORM]
    original = weight.detach().clone()
    signs = torch.randint(0, 2, original.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    try:
        with torch.no_grad():
            weight.mul_(1 + eps * signs)
        return run_parity(reference, artifact, probes, "retrieval", progress=False)
    finally:
        with torch.no_grad():
            weight.copy_(original)


def _failed(parity):
    return sorted(c.name for c in evaluate(parity, [], [], DEFAULTS["fp32"]) if not c.passed)


def test_unperturbed_merged_artifact_passes_with_room(setup):
    parity = _parity(setup, 0.0)
    assert _failed(parity) == []
    assert min(parity.single_cosine_min.values()) > 1 - 1e-9  # fp32 merged vs unmerged on CPU: ~1 - 1e-13
    assert parity.multi_token_cosine_min > 1 - 1e-9


def test_min_cosine_just_below_the_fp32_bound_fails(setup):
    parity = _parity(setup, 0.03)
    dims = sorted(parity.single_cosine_min, key=int)
    assert dims == ["8", "16", "32", "64"]
    # The perturbation lands where it should: inside the band a tenfold-looser bound would let through.
    for dim in dims:
        assert 0.9993 < parity.single_cosine_min[dim] < 0.9998, (dim, parity.single_cosine_min[dim])
    assert 0.995 < parity.multi_token_cosine_min < 0.9989, parity.multi_token_cosine_min
    failed = _failed(parity)
    for dim in dims:
        assert f"parity: single-vector min cosine (dim {dim})" in failed
    assert "parity: multi-vector per-token min cosine" in failed
    # Rankings barely move at this size: those checks pass, so the failure names exactly the cosines.
    assert parity.maxsim_pearson > 0.999 and parity.score_spearman > 0.999 and parity.topk_overlap == 1.0
    assert all("cosine" in name for name in failed)


def test_mean_cosine_just_below_the_fp32_bound_fails(setup):
    parity = _parity(setup, 0.01)
    for dim, value in parity.single_cosine_mean.items():
        assert 0.99991 < value < 0.999985, (dim, value)
    for dim, value in parity.single_cosine_min.items():
        assert value > 0.9999, (dim, value)  # the min bound alone would let this through
    failed = _failed(parity)
    assert [name for name in failed if "min cosine" in name and "single" in name] == []
    for dim in parity.single_cosine_mean:
        assert f"parity: single-vector mean cosine (dim {dim})" in failed
