"""The reference encoder: upstream semantics on the tiny checkpoint."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jev4.errors import EncodeError, TaskError
from jev4.model.encoder import TorchEncoder
from jev4.model.lora import MultiTaskLoRALinear
from jev4.model.tiny import write_tiny_checkpoint

TEXTS = ["What is the capital of France?", "Paris is the capital of France. " * 6, "x", "def f(a):\n    return a * 2"]
TASKS = ("retrieval", "text-matching", "code")


@pytest.fixture(scope="module")
def no_lora_encoder(tiny_dir):
    """The same checkpoint with every LoRA B zeroed: the base model alone."""
    enc = TorchEncoder.from_pretrained(tiny_dir)
    for module in enc.network.modules():
        if isinstance(module, MultiTaskLoRALinear):
            module.lora_B.data.zero_()
    return enc


def test_each_task_changes_outputs_differently(encoder, no_lora_encoder, images):
    base = no_lora_encoder.encode_text(TEXTS)
    outs = {t: encoder.encode_text(TEXTS, task=t) for t in TASKS}
    for task, out in outs.items():
        assert (out - base).abs().max() > 1e-2, task
    for a in TASKS:
        for b in TASKS:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-2, (a, b)
    img = {t: encoder.encode_image(images, task=t) for t in TASKS}
    assert (img["retrieval"] - img["code"]).abs().max() > 1e-2
    assert (img["retrieval"] - no_lora_encoder.encode_image(images)).abs().max() > 1e-2


def test_every_adapted_module_is_wrapped(encoder):
    wrapped = {name for name, m in encoder.network.named_modules() if isinstance(m, MultiTaskLoRALinear)}
    assert "multi_vector_projector" in wrapped
    assert len(wrapped) == 2 * 7 + 1
    assert not any("visual" in name for name in wrapped)


def test_mixed_task_batch_equals_per_task_batches(encoder):
    labels = ["code", "retrieval", "text-matching", "code"]
    mixed = encoder.encode_text(TEXTS, task=labels, batch_size=4)
    for i, task in enumerate(labels):
        alone = encoder.encode_text([TEXTS[i]], task=task)
        assert (mixed[i] - alone[0]).abs().max() < 1e-5
    mixed_mv = encoder.encode_text(TEXTS, task=labels, return_multivector=True, batch_size=4)
    for i, task in enumerate(labels):
        assert (mixed_mv[i] - encoder.encode_text([TEXTS[i]], task=task, return_multivector=True)[0]).abs().max() < 1e-5


def test_prefix_rules(encoder):
    q = encoder.encode_text(TEXTS, task="retrieval", prompt_name="query")
    p = encoder.encode_text(TEXTS, task="retrieval", prompt_name="passage")
    assert (q - p).abs().max() > 1e-3
    default = encoder.encode_text(TEXTS, task="retrieval")
    torch.testing.assert_close(default, q)
    tm_q = encoder.encode_text(TEXTS, task="text-matching", prompt_name="query")
    tm_p = encoder.encode_text(TEXTS, task="text-matching", prompt_name="passage")
    torch.testing.assert_close(tm_q, tm_p)
    # the prefix is part of the tokens the model sees
    ids = encoder.preprocessor.text_inputs(["Passage: " + TEXTS[0]]).input_ids[0]
    assert encoder.preprocessor.tokenizer.decode(ids).startswith("Passage: ")
    with pytest.raises(EncodeError, match="prompt_name"):
        encoder.encode_text(TEXTS, prompt_name="document")


def test_single_vector_is_mean_over_mask_and_normalised(encoder):
    batch = encoder.preprocessor.text_inputs(["Query: " + t for t in TEXTS])
    with torch.inference_mode(), encoder.selector.select(["retrieval"] * len(TEXTS)):
        out = encoder.network(batch.input_ids, batch.attention_mask, batch.position_ids)
    mask = batch.attention_mask
    for row in range(len(TEXTS)):
        valid = out.hidden[row, mask[row].bool()]
        expected = F.normalize(valid.mean(0), dim=-1)
        got = encoder.encode_text([TEXTS[row]], task="retrieval")[0]
        assert (got - expected).abs().max() < 1e-5
        proj = F.normalize(out.projected[row, mask[row].bool()], dim=-1)
        mv = encoder.encode_text([TEXTS[row]], task="retrieval", return_multivector=True)[0]
        assert mv.shape == proj.shape and (mv - proj).abs().max() < 1e-5
    norms = encoder.encode_text(TEXTS).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_image_pooling_span(encoder, images):
    """The image single vector is the mean over <|vision_start|>..<|vision_end|> inclusive, not the whole prompt."""
    special = encoder.config.special_tokens
    batch = encoder.preprocessor.image_inputs(images)
    with torch.inference_mode(), encoder.selector.select(["retrieval"] * len(images)):
        out = encoder.network(batch.input_ids, batch.attention_mask, batch.position_ids, batch.pixel_values, batch.image_grid_thw)
    got = encoder.encode_image(images)
    for row in range(len(images)):
        ids = batch.input_ids[row].tolist()
        start, end = ids.index(special.vision_start_token_id), ids.index(special.vision_end_token_id)
        n_image = ids.count(special.image_token_id)
        assert end - start - 1 == n_image == int(batch.image_grid_thw[row].prod()) // 4
        span = F.normalize(out.hidden[row, start : end + 1].mean(0), dim=-1)
        whole = F.normalize(out.hidden[row, batch.attention_mask[row].bool()].mean(0), dim=-1)
        assert (got[row] - span).abs().max() < 1e-5
        assert (got[row] - whole).abs().max() > 1e-3
    assert len({tuple(g.tolist()) for g in batch.image_grid_thw}) == 3


def test_matryoshka_truncation(encoder, images):
    full = encoder.encode_text(TEXTS)
    full_img = encoder.encode_image(images)
    for dim in encoder.config.matryoshka_dims:
        got = encoder.encode_text(TEXTS, truncate_dim=dim)
        torch.testing.assert_close(got, F.normalize(full[:, :dim], dim=-1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(encoder.encode_image(images, truncate_dim=dim), F.normalize(full_img[:, :dim], dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(encoder.encode_text(TEXTS, truncate_dim=encoder.config.hidden_size), full)
    for bad in (7, 100, 4096):
        with pytest.raises(EncodeError, match=f"truncate_dim={bad}"):
            encoder.encode_text(TEXTS, truncate_dim=bad)


def test_both_key_layouts_give_identical_outputs(tmp_path, encoder, images):
    new = TorchEncoder.from_pretrained(write_tiny_checkpoint(tmp_path / "new", seed=0, layout="new", adapter_layout="old"))
    torch.testing.assert_close(new.encode_text(TEXTS, task="code"), encoder.encode_text(TEXTS, task="code"), atol=0, rtol=0)
    torch.testing.assert_close(new.encode_image(images), encoder.encode_image(images), atol=0, rtol=0)


def test_batching_and_order_invariance(encoder, images):
    one = encoder.encode_text(TEXTS, batch_size=1)
    many = encoder.encode_text(TEXTS, batch_size=8)
    assert (one - many).abs().max() < 1e-5
    reversed_ = encoder.encode_text(TEXTS[::-1], batch_size=3)
    assert (reversed_.flip(0) - one).abs().max() < 1e-5
    assert (encoder.encode_image(images, batch_size=1) - encoder.encode_image(images, batch_size=3)).abs().max() < 1e-5


def test_bad_inputs(encoder, tmp_path):
    with pytest.raises(TaskError, match=r"'summary'.*retrieval.*text-matching.*code"):
        encoder.encode_text(["a"], task="summary")
    with pytest.raises(EncodeError, match="2 task labels for 1"):
        encoder.encode_text(["a"], task=["code", "code"])
    with pytest.raises(EncodeError, match="not-there.png"):
        encoder.encode_image([tmp_path / "not-there.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(EncodeError, match="bad.png"):
        encoder.encode_image([tmp_path / "bad.png"])
    assert encoder.encode_text([]).shape == (0, encoder.config.hidden_size)


def test_bf16_close_to_fp32(tiny_dir, encoder):
    bf16 = TorchEncoder.from_pretrained(tiny_dir, dtype="bf16")
    cos = F.cosine_similarity(bf16.encode_text(TEXTS), encoder.encode_text(TEXTS), dim=-1)
    assert cos.min() > 0.999
    assert all(b.dtype == torch.float32 for n, b in bf16.network.named_buffers() if "inv_freq" in n)
