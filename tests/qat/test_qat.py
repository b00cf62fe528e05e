"""jev4 qat on the tiny checkpoint: what trains, what stays frozen, the loss, the saved adapter, resuming."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jev4.cli.main import main as jev4_main
from jev4.errors import Jev4Error
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


# --------------------------------------------------------------------------- bad settings and data, named by flag / file / line

BASE = dict(model="unused", adapter="retrieval", precision="binary", data="stdlib-code", out="unused")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": float("nan")}, "--lr nan: must be a positive finite number (e.g. 5e-4)"),
        ({"lr": -1.0}, "--lr -1.0: must be a positive finite number"),
        ({"lr": 0}, "--lr 0: must be a positive finite number"),
        ({"temperature": 0.0}, "--temperature 0.0: must be a positive finite number"),
        ({"temperature": -0.05}, "--temperature -0.05: must be a positive finite number (e.g. 0.05; a negative one would invert the loss)"),
        ({"temperature": float("nan")}, "--temperature nan: must be a positive finite number"),
        ({"float_weight": float("nan")}, "--float-weight nan: must be a finite number >= 0 (0 turns the term off)"),
        ({"float_weight": -1.0}, "--float-weight -1.0: must be a finite number >= 0"),
        ({"error_weight": float("inf")}, "--error-weight inf: must be a finite number >= 0"),
        ({"error_weight": -0.5}, "--error-weight -0.5: must be a finite number >= 0"),
        ({"multivector_weight": float("-inf")}, "--multivector-weight -inf: must be a finite number >= 0"),
        ({"multivector_weight": -1.0}, "--multivector-weight -1.0: must be a finite number >= 0"),
        ({"max_length": 0}, "--max-length 0: must be an integer >= 1"),
        ({"max_length": -8}, "--max-length -8: must be an integer >= 1"),
        ({"data_size": 0}, "--data-size 0: must be an integer >= 1 (or leave it out to use every pair)"),
        ({"steps": 0}, "--steps 0: must be an integer >= 1"),
        ({"eval_every": 0}, "--eval-every 0: must be an integer >= 1"),
        ({"batch_size": 1}, "--batch-size 1: must be an integer >= 2 (in-batch negatives need at least 2 pairs per batch)"),
        ({"held_out": 0}, "--held-out 0: must be an integer >= 1"),
        ({"seed": -1}, "--seed -1: must be an integer >= 0"),
        ({"seed": 2**64}, "--seed 18446744073709551616: must be between 0 and 9223372036854775807"),
        ({"matryoshka_dims": "abc"}, "--matryoshka-dims abc: 'abc' is not a dimension; give comma-separated integers >= 1, e.g. 128,256"),
        ({"matryoshka_dims": (0, -5)}, "--matryoshka-dims 0,-5: 0 is not a dimension"),
        ({"matryoshka_dims": "16,-5"}, "--matryoshka-dims 16,-5: -5 is not a dimension"),
        ({"matryoshka_dims": (8.0,)}, "--matryoshka-dims 8.0: 8.0 is not a dimension"),
    ],
)
def test_settings_name_the_flag(changes, message):
    with pytest.raises(QATError, match="^" + re.escape(message)) as info:
        QATSettings(**{**BASE, **changes})
    assert isinstance(info.value, Jev4Error)


def test_matryoshka_dims_accept_text_and_sequences():
    assert QATSettings(**BASE, matryoshka_dims="8, 16").matryoshka_dims == (8, 16)
    assert QATSettings(**BASE, matryoshka_dims=["8", 16]).matryoshka_dims == (8, 16)
    assert QATSettings(**BASE, matryoshka_dims="").matryoshka_dims == ()
    assert QATSettings(**BASE, matryoshka_dims=None).matryoshka_dims == ()


def test_matryoshka_dim_the_checkpoint_lacks_is_named_before_the_weights_load(tiny_dir, tmp_path, monkeypatch):
    import jev4.qat.trainer as trainer

    monkeypatch.setattr(trainer.TorchEncoder, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(QATError, match="^" + re.escape("--matryoshka-dims 8,12: 12 is not a Matryoshka dim of this checkpoint; choose from [8, 16, 32] (or 64, the full size)")):
        trainer.prepare(settings(tiny_dir, tmp_path, matryoshka_dims=(8, 12)))


def _pairs_file(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_held_out_larger_than_the_data_names_the_flag(tmp_path):
    path = _pairs_file(tmp_path, [{"query": f"q{i}", "positive": f"p{i}"} for i in range(12)])
    with pytest.raises(QATDataError, match="^" + re.escape("--held-out 200 is more than the 12 pairs allow (1..10)")):
        load_split(str(path), 200, 0)
    assert len(load_split(str(path), 10, 0).held_out) == 10
    with pytest.raises(QATDataError, match="^" + re.escape("--held-out 11 is more than the 12 pairs allow (1..10)")):
        load_split(str(path), 11, 0)


def test_pairs_file_that_is_binary_a_directory_or_a_fifo(tmp_path):
    import os

    binary = tmp_path / "pairs.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(QATDataError, match="^" + re.escape(f"--data {binary}: not a UTF-8 text file (invalid start byte at byte 0)")):
        load_pairs(binary)
    with pytest.raises(QATDataError, match="^" + re.escape(f"--data {tmp_path}: is a directory; give a JSONL file of pairs (or stdlib-code)")):
        load_split(str(tmp_path), 4, 0)
    with pytest.raises(QATDataError, match="^" + re.escape(f"--data {tmp_path / 'nope.jsonl'}: pairs file not found")):
        load_pairs(tmp_path / "nope.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(QATDataError, match="^" + re.escape(f"--data {tmp_path / 'fifo.jsonl'}: is not a regular file")):
        load_pairs(tmp_path / "fifo.jsonl")


def test_missing_image_path_names_the_line(tmp_path, images):
    images[0].save(tmp_path / "page.png")
    rows = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(4)]
    path = _pairs_file(tmp_path, rows + [{"query": "/no/such/img.png", "positive": "page.png"}])
    with pytest.raises(QATDataError, match="^" + re.escape(f'{path}:5 query: image file /no/such/img.png not found; fix the path, or write {{"text": "/no/such/img.png"}} if it is text')):
        load_pairs(path)
    path = _pairs_file(tmp_path, rows + [{"query": "a page", "positive": "pages/missing.jpg"}])
    with pytest.raises(QATDataError, match="^" + re.escape(f"{path}:5 positive: image file {tmp_path / 'pages' / 'missing.jpg'} not found")):
        load_pairs(path)
    path = _pairs_file(tmp_path, rows + [{"query": "a page", "positive": {"image": "gone.png"}}])
    with pytest.raises(QATDataError, match=re.escape(f"{path}:5 positive: image file {tmp_path / 'gone.png'} not found")):
        load_pairs(path)
    (tmp_path / "dir.png").mkdir()
    path = _pairs_file(tmp_path, rows + [{"query": "a page", "positive": "dir.png"}])
    with pytest.raises(QATDataError, match=re.escape(f"{path}:5 positive: image {tmp_path / 'dir.png'} is not a regular file")):
        load_pairs(path)
    path = _pairs_file(tmp_path, rows + [{"query": "a page", "positive": {"img": "page.png"}}])
    with pytest.raises(QATDataError, match=re.escape(f'{path}:5 positive: an object must be {{"text": "..."}} or {{"image": "path"}}')):
        load_pairs(path)


def test_text_that_ends_like_an_image_name(tmp_path, images):
    """A sentence ending in '.png' is text; a bare name is text when written as {"text": ...}; an explicit image loads."""
    images[0].save(tmp_path / "page.png")
    rows = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(4)]
    rows += [
        {"query": "how do I save a plot as figure.png", "positive": {"text": "logo.png"}},
        {"query": {"text": "q"}, "positive": {"image": "page.png"}},
    ]
    pairs = load_pairs(_pairs_file(tmp_path, rows))
    assert pairs[4] == Pair(Item("how do I save a plot as figure.png"), Item("logo.png"))
    assert pairs[5].positive == Item(str(tmp_path / "page.png"), True)
