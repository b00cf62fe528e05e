"""jev4 qat on the tiny checkpoint: what trains, what stays frozen, the loss, the saved adapter, resuming."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jev4.cli.main import main as jev4_main
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.model.adapters import load_adapters
from jev4.model.encoder import TorchEncoder
from jev4.qat.data import Item, Pair, QATDataError, load_pairs, load_split
from jev4.qat.export import run_qat, write_adapter
from jev4.qat.loss import Quantizer, maxsim_loss, qat_loss
from jev4.qat.trainer import QATError, QATSettings, batch_indices, embed, freeze_all_but, lora_modules, mask_other_tasks, train
from jev4.quant.embeddings import EmbeddingCodec

FAST = dict(data="stdlib-code", data_size=120, held_out=40, batch_size=8, max_length=64, eval_every=10, lr=3e-3, progress=False)


def settings(tiny_dir, tmp_path, **kw):
    return QATSettings(model=str(tiny_dir), adapter="retrieval", out=str(tmp_path / "out"), **{**FAST, "precision": "binary", **kw})


def test_gradients_reach_only_the_task_lora_through_the_estimator(tiny_dir):
    encoder = TorchEncoder.from_pretrained(tiny_dir)
    params = freeze_all_but(encoder, "retrieval")
    index = encoder.selector.tasks.index("retrieval")
    pairs = load_split("stdlib-code", 10, 0, 40).train[:6]
    q, qt, qm = embed(encoder, [p.query for p in pairs], "retrieval", "query", 64)
    d, dt, dm = embed(encoder, [p.positive for p in pairs], "retrieval", "passage", 64)
    quantizer = Quantizer("binary")
    loss = qat_loss(q, d, quantizer, False, 0.05, (encoder.config.hidden_size,)) + maxsim_loss(qt, qm, dt, dm, quantizer, False, 0.05)
    loss.backward()
    mask_other_tasks(params, index)
    trainable = {n for n, p in encoder.network.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert any(n.startswith("multi_vector_projector") for n in trainable)  # the projector's LoRA is trained too
    for p in params:
        assert p.grad is not None and p.grad[index].abs().sum() > 0  # binary sign() has zero gradient: this is the STE
        assert all(p.grad[i].abs().sum() == 0 for i in range(p.shape[0]) if i != index)
    assert all(p.grad is None for n, p in encoder.network.named_parameters() if not n.endswith(("lora_A", "lora_B")))


def test_training_lowers_the_loss_and_leaves_the_backbone_alone(tiny_dir, tmp_path):
    before = TorchEncoder.from_pretrained(tiny_dir)
    base_before = {n: p.detach().clone() for n, p in before.network.named_parameters()}
    result, encoder = train(settings(tiny_dir, tmp_path, steps=40))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05
    index = encoder.selector.tasks.index("retrieval")
    changed = set()
    for name, p in encoder.network.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            for i in range(p.shape[0]):
                if not torch.equal(p[i], base_before[name][i]):
                    assert i == index, f"{name}: task {encoder.selector.tasks[i]} changed"
                    changed.add(name)
        else:
            assert torch.equal(p, base_before[name]), f"backbone parameter {name} changed"
    assert len(changed) == len(lora_modules(encoder)) * 2
    evals = [h for h in result.history if "quantized/ndcg@10" in h]
    assert evals[0]["step"] == 0 and result.best["step"] in {h["step"] for h in evals}


def test_saved_adapter_round_trips_and_merges(tiny_dir, tmp_path):
    result = run_qat(settings(tiny_dir, tmp_path, steps=10, precision="int4"))
    out = result.out
    original = load_file(str(tiny_dir / "adapters" / "adapter_model.safetensors"))
    tuned = load_file(str(out / "adapter_model.safetensors"))
    assert set(tuned) == set(original) and all(tuned[k].dtype == original[k].dtype for k in tuned)
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned if ".retrieval." in k)
    assert all(torch.equal(tuned[k], original[k]) for k in tuned if ".retrieval." not in k)
    load_adapters(out, ("retrieval", "text-matching", "code"))
    reloaded = TorchEncoder.from_pretrained(tiny_dir, adapter_dir=out)
    texts = ["sort a list in place", "def f(x): return x"]
    merged = merge_checkpoint(MergeSettings(model=str(tiny_dir), adapter="retrieval", out=str(tmp_path / "merged"), adapter_dir=str(out), dtype="fp32"), progress=False)
    a = reloaded.encode_text(texts).numpy()
    b = TorchEncoder.from_pretrained(merged).encode_text(texts).numpy()
    assert np.min(np.sum(a * b, axis=1)) > 0.99999
    assert (out / "calibration.json").is_file() and (out / "qat-curve.png").stat().st_size > 5000
    history = json.loads((out / "qat-history.json").read_text())
    assert history["best"]["metric"] == "quantized/ndcg@10"
    cal = EmbeddingCodec.__init__  # the calibration is the codec's own format
    from jev4.quant.embeddings import Calibration

    assert Calibration.load(out / "calibration.json").precision == "int4" and cal


def test_resume_continues_from_the_same_step(tiny_dir, tmp_path):
    straight, enc_a = train(settings(tiny_dir, tmp_path / "a", steps=20, scaling="rolling", precision="int8"))
    first, _ = train(settings(tiny_dir, tmp_path / "b", steps=10, scaling="rolling", precision="int8"))
    state = json.loads((tmp_path / "b" / "out.qat-state" / "state.json").read_text())
    assert state["step"] == 10 and state["rolling"]
    resumed, enc_b = train(settings(tiny_dir, tmp_path / "b", steps=20, scaling="rolling", precision="int8", resume=True))
    steps = [h["step"] for h in resumed.history if "loss" in h]
    assert steps == list(range(1, 21))  # history carried over, then steps 11..20
    loss_a = [h["loss"] for h in straight.history if "loss" in h]
    loss_b = [h["loss"] for h in resumed.history if "loss" in h]
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    for (name, pa), (_, pb) in zip(enc_a.network.named_parameters(), enc_b.network.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)


def test_batches_are_a_function_of_seed_and_step():
    assert batch_indices(7, 4, 10, 0) == batch_indices(7, 4, 10, 0)
    epoch = [i for s in range(5) for i in batch_indices(s, 2, 10, 0)]
    assert sorted(epoch) == list(range(10))  # one epoch visits every row once
    assert batch_indices(0, 4, 10, 0) != batch_indices(0, 4, 10, 1)


def test_pairs_file_and_bad_settings(tmp_path, tiny_dir, images):
    images[0].save(tmp_path / "page.png")
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"} for i in range(5)] + [{"query": "a page", "positive": "page.png"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(path)
    assert pairs[0] == Pair(Item("q0"), Item("p0"), Item("n0"))
    assert pairs[-1].positive.is_image and pairs[-1].negative is None
    path.write_text('{"query": "x"}\n')
    with pytest.raises(QATDataError, match="pairs.jsonl:1"):
        load_pairs(path)
    with pytest.raises(QATError, match="--precision"):
        settings(tiny_dir, tmp_path, precision="int3")
    with pytest.raises(QATError, match="rolling"):
        settings(tiny_dir, tmp_path, scaling="ema")


def test_image_pairs_and_hard_negatives_train(tiny_dir, tmp_path, images):
    for i, image in enumerate(images):
        image.save(tmp_path / f"img{i}.png")
    rows = [{"query": f"picture number {i}", "positive": f"img{i % 3}.png", "negative": f"text {i}"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result, _ = train(settings(tiny_dir, tmp_path, data=str(tmp_path / "pairs.jsonl"), data_size=None, held_out=4, steps=3, batch_size=4, eval_every=3))
    assert len([h for h in result.history if "loss" in h]) == 3


def test_cli(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["qat", "--model", str(tiny_dir), "--adapter", "code", "--precision", "binary", "--data", "stdlib-code", "--data-size", "60"]
    argv += ["--held-out", "20", "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--max-length", "48", "--out", str(out), "--no-progress"]
    assert jev4_main(argv) == 0
    assert "--adapter-dir" in capsys.readouterr().out
    assert jev4_main(argv) == 2  # OUT exists
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert write_adapter  # the same writer the export uses
    assert any(".code." in k for k in tensors)


def test_gradient_checkpointing_gives_the_same_steps(tiny_dir, tmp_path):
    """The GPU setting (checkpointed layers re-run in backward) must train exactly like the plain loop."""
    kw = dict(steps=3, batch_size=4, eval_every=3, data_size=60, held_out=20, max_length=48)
    plain, _ = train(settings(tiny_dir, tmp_path / "a", **kw))
    checkpointed, _ = train(settings(tiny_dir, tmp_path / "b", gradient_checkpointing=True, **kw))
    losses = lambda r: [h["loss"] for h in r.history if "loss" in h]  # noqa: E731
    np.testing.assert_allclose(losses(checkpointed), losses(plain), rtol=1e-5)
