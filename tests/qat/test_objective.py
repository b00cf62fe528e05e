"""The QAT objective's options: the clipped straight-through estimator and the quantization-error penalty."""

import numpy as np
import pytest
import torch

from jev4.qat.loss import Quantizer, batch_stats, qat_loss, quantization_error
from jev4.qat.trainer import QATError, QATSettings
from jev4.quant.embeddings import EmbeddingCodec, calibrate


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(seed))


def test_clipped_quantizer_drops_the_gradient_beyond_the_extreme_codes():
    x = _batch().requires_grad_(True)
    Quantizer("binary", gradient="clipped")(x).sum().backward()
    stats = batch_stats(x, "binary")  # decode = centre +/- magnitude
    dist = (x.detach() - stats["center"]).abs()
    inside, outside = dist < stats["magnitude"] * 0.999, dist > stats["magnitude"] * 1.001
    assert inside.any() and outside.any()
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[outside] == 0)
    x.grad = None
    Quantizer("binary")(x).sum().backward()
    assert torch.all(x.grad == 1)  # the default identity STE passes everything


def test_quantization_error_is_zero_on_the_codes_and_its_gradient_pulls_values_onto_them():
    quantizer = Quantizer("binary")
    x = _batch(1)
    codes = quantizer(x)
    assert quantization_error(codes, quantizer(codes)).item() == pytest.approx(0.0, abs=1e-10)
    before = quantization_error(x, codes).item()
    assert 0.2 < before < 0.6  # ~0.36 for Gaussian dims: the scale the weight is chosen against
    moved = x.clone().requires_grad_(True)
    for _ in range(20):
        moved.grad = None
        quantization_error(moved, quantizer(moved.detach())).backward()
        with torch.no_grad():
            moved -= 50.0 * moved.grad  # the mean over 32 rows and the spread (~16) scale the gradient down
    assert quantization_error(moved.detach(), quantizer(moved.detach())).item() < 0.5 * before


def test_error_weight_adds_the_penalty_of_every_quantized_side():
    q, d = _batch(2), _batch(3)
    quantizer = Quantizer("binary")
    plain = qat_loss(q, d, quantizer, True, 0.05, (16,))
    both = qat_loss(q, d, quantizer, True, 0.05, (16,), error_weight=2.0)
    docs = qat_loss(q, d, quantizer, False, 0.05, (16,), error_weight=2.0) - qat_loss(q, d, quantizer, False, 0.05, (16,))
    qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    q_codes, d_codes = quantizer.pair(qn, dn, True)
    expected_both = 2.0 * (quantization_error(qn, q_codes) + quantization_error(dn, d_codes)) / 2
    torch.testing.assert_close(both - plain, expected_both)
    torch.testing.assert_close(docs, 2.0 * quantization_error(dn, quantizer(dn)))
    assert qat_loss(q, d, Quantizer(None), False, 0.05, (16,), error_weight=5.0) == qat_loss(q, d, Quantizer(None), False, 0.05, (16,))


@pytest.mark.parametrize("field, value, message", [("ste", "soft", "--ste"), ("error_weight", -1.0, "--error-weight"), ("ste", "tanh", "not int4")])
def test_bad_objective_settings_are_named(field, value, message):
    with pytest.raises(QATError, match=message):
        QATSettings(model="m", adapter="retrieval", precision="int4" if value == "tanh" else "binary", data="stdlib-code", out="o", **{field: value})


@pytest.mark.parametrize("precision", ["binary", "ternary", "int4"])
def test_queries_are_quantized_with_the_documents_calibration_as_evaluation_and_serving_do(precision):
    queries, documents = _batch(4) + 0.7, _batch(5)  # different medians, as "Query: " and "Passage: " give
    q_codes, d_codes = Quantizer(precision).pair(queries, documents, quantize_queries=True)
    codec = EmbeddingCodec(precision, calibrate(documents.numpy(), precision))
    np.testing.assert_allclose(d_codes.numpy(), codec.decode(codec.encode(documents.numpy())), atol=1e-6)
    np.testing.assert_allclose(q_codes.numpy(), codec.decode(codec.encode(queries.numpy())), atol=1e-6)
    assert not torch.allclose(q_codes, Quantizer(precision)(queries))  # not centred on the queries' own batch
    untouched, _ = Quantizer(precision).pair(queries, documents, quantize_queries=False)
    assert untouched is queries
