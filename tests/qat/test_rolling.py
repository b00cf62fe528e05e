"""Sign-codec statistics for QAT: per batch (as the codec calibrates), rolling, saved, resumed and shipped."""

import json

import numpy as np
import pytest
import torch

from jev4.model.encoder import TorchEncoder
from jev4.qat.export import run_qat
from jev4.qat.loss import Quantizer, RollingStats, batch_stats
from jev4.qat.trainer import QATSettings, evaluate_split, train
from jev4.qat.data import load_split
from jev4.quant.embeddings import Calibration, EmbeddingCodec, calibrate

SMALL = dict(data="stdlib-code", data_size=60, held_out=20, batch_size=4, max_length=48, lr=3e-3, progress=False)


@pytest.mark.parametrize("precision", ["binary", "ternary"])
def test_batch_stats_are_the_codec_calibration(precision):
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(3)) + 0.5
    cal = calibrate(x.numpy(), precision)
    stats = batch_stats(x, precision)
    assert set(stats) == {"center", "magnitude"} | ({"threshold"} if precision == "ternary" else set())
    for name, value in stats.items():
        np.testing.assert_allclose(value.numpy(), getattr(cal, name), rtol=1e-6, atol=1e-7, err_msg=name)
    # so the quantizer's forward is the codec's decode(encode(x)) with that calibration
    quantized = Quantizer(precision)(x).numpy()
    codec = EmbeddingCodec(precision, cal)
    np.testing.assert_allclose(quantized, codec.decode(codec.encode(x.numpy())), atol=1e-6)


def test_rolling_stats_average_round_trip_and_calibrate():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen) * 3
    state = RollingStats("ternary", 10, momentum=0.25)
    state.update(a)
    stats = state.update(b)
    for name in ("center", "threshold", "magnitude"):
        expected = 0.25 * batch_stats(a, "ternary")[name] + 0.75 * batch_stats(b, "ternary")[name]
        torch.testing.assert_close(stats[name], expected)
    again = RollingStats.from_json(json.loads(json.dumps(state.to_json())))
    assert again.count == 2 and all(torch.equal(again.stats[k], state.stats[k]) for k in state.stats)
    cal = state.to_calibration()
    assert cal.method == "rolling" and Calibration.from_json(cal.to_json()) == cal
    codec = EmbeddingCodec("ternary", cal)
    assert codec.decode(codec.encode(b.numpy())).shape == (8, 10)


def test_rolling_ternary_resumes_and_ships_what_it_evaluated(tiny_dir, tmp_path):
    def settings(out, **kw):
        return QATSettings(model=str(tiny_dir), adapter="retrieval", precision="ternary", scaling="rolling", out=str(out), **{**SMALL, **kw})

    straight, _ = train(settings(tmp_path / "a" / "out", steps=6, eval_every=3))
    train(settings(tmp_path / "b" / "out", steps=3, eval_every=3))
    saved = json.loads((tmp_path / "b" / "out.qat-state" / "state.json").read_text())
    assert saved["rolling"]["single/64"]["precision"] == "ternary" and saved["rolling"]["single/64"]["count"] == 3
    resumed, _ = train(settings(tmp_path / "b" / "out", steps=6, eval_every=3, resume=True))
    losses = lambda r: [h["loss"] for h in r.history if "loss" in h]  # noqa: E731
    np.testing.assert_allclose(losses(resumed), losses(straight), rtol=1e-5)

    # The output ships the rolling calibration of the best step, and the reloaded adapter with it
    # reproduces the best step's held-out metrics exactly: what was evaluated is what is served.
    final = settings(tmp_path / "c" / "out", steps=6, eval_every=3)
    result = run_qat(final)
    shipped = Calibration.load(result.out / "calibration.json")
    assert shipped.method == "rolling" and shipped.precision == "ternary"
    reloaded = TorchEncoder.from_pretrained(tiny_dir, adapter_dir=result.out)
    held_out = load_split(final.data, final.held_out, final.seed, final.data_size).held_out
    metrics = evaluate_split(reloaded, held_out, final, "ternary", shipped)
    for key, value in result.best["metrics"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
