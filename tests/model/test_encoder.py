"""The reference encoder: upstream semantics on the tiny checkpoint.

Expected values are recomputed by hand from the network's weights (or from the
files on disk), never hard-coded.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from jev4.errors import EncodeError, TaskError
from jev4.model.checkpoint import list_checkpoint_files
from jev4.model.config import load_config
from jev4.model.encoder import TorchEncoder
from jev4.model.lora import MultiTaskLoRALinear
from jev4.model.network import build_network, load_base_weights

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital of France. " * 6,
    "x",
    "def f(a):\n    return a * 2",
    "The quick brown fox jumps over the lazy dog",
]
TASKS = ("retrieval", "text-matching", "code")


def _max_diff(a, b):
    if isinstance(a, list):
        assert len(a) == len(b)
        return max(_max_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def no_lora_encoder(tiny_dir):
    """The same checkpoint with every LoRA B zeroed in memory: the base model alone."""
    enc = TorchEncoder.from_pretrained(tiny_dir)
    zeroed = 0
    for module in enc.network.modules():
        if isinstance(module, MultiTaskLoRALinear):
            module.lora_B.data.zero_()
            zeroed += 1
    assert zeroed == 2 * 7 + 1
    return enc


@pytest.fixture(scope="module")
def base_network(tiny_dir):
    """The base network with no LoRA attached at all, fp32."""
    net = build_network(load_config(tiny_dir))
    load_base_weights(net, list_checkpoint_files(tiny_dir))
    return net


def _merged_network(tiny_dir, task):
    """The base network with ``task``'s LoRA merged into the weights, computed straight from the files on disk."""
    net = build_network(load_config(tiny_dir))
    load_base_weights(net, list_checkpoint_files(tiny_dir))
    cfg = json.loads((tiny_dir / "adapters" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(tiny_dir / "adapters" / "adapter_model.safetensors")
    merged = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(f".lora_A.{task}.weight"):
                continue
            module = key[len("base_model.model.") : -len(f".lora_A.{task}.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            net.get_submodule(module).weight += scale * (b.float() @ a.float())
            merged += 1
    assert merged == 2 * 7 + 1
    return net


def _run_text(net, encoder, prompted):
    batch = encoder.preprocessor.text_inputs(prompted)
    with torch.inference_mode():
        out = net(batch.input_ids, batch.attention_mask, batch.position_ids)
    return batch, out


def _run_images(net, encoder, images):
    batch = encoder.preprocessor.image_inputs(images)
    with torch.inference_mode():
        out = net(batch.input_ids, batch.attention_mask, batch.position_ids, batch.pixel_values, batch.image_grid_thw)
    return batch, out


def _pool(hidden, mask):
    return torch.stack([F.normalize(hidden[row, mask[row].bool()].mean(0), dim=-1) for row in range(hidden.shape[0])])


def test_every_adapted_module_is_wrapped(encoder):
    wrapped = {name for name, m in encoder.network.named_modules() if isinstance(m, MultiTaskLoRALinear)}
    assert "multi_vector_projector" in wrapped
    assert len(wrapped) == 2 * 7 + 1
    assert not any("visual" in name or "embed" in name for name in wrapped)
    assert encoder.tasks == TASKS and encoder.selector.tasks == TASKS


def test_zero_b_is_the_base_model(no_lora_encoder, base_network):
    batch, out = _run_text(base_network, no_lora_encoder, ["Query: " + t for t in TEXTS])
    got = no_lora_encoder.encode_text(TEXTS, task="code")
    assert _max_diff(got, _pool(out.hidden, batch.attention_mask)) < 1e-5
    # with B zeroed, every task gives the same (base) outputs
    for task in TASKS:
        assert _max_diff(no_lora_encoder.encode_text(TEXTS, task=task), got) < 1e-6


def test_each_task_changes_outputs_differently(encoder, no_lora_encoder, images):
    base = no_lora_encoder.encode_text(TEXTS)
    base_mv = no_lora_encoder.encode_text(TEXTS, return_multivector=True)
    base_img = no_lora_encoder.encode_image(images)
    outs = {t: encoder.encode_text(TEXTS, task=t) for t in TASKS}
    mvs = {t: encoder.encode_text(TEXTS, task=t, return_multivector=True) for t in TASKS}
    imgs = {t: encoder.encode_image(images, task=t) for t in TASKS}
    for task in TASKS:
        assert _max_diff(outs[task], base) > 1e-2, task
        assert _max_diff(mvs[task], base_mv) > 1e-2, task
        assert _max_diff(imgs[task], base_img) > 1e-2, task
    for i, a in enumerate(TASKS):
        for b in TASKS[i + 1 :]:
            assert _max_diff(outs[a], outs[b]) > 1e-2, (a, b)
            assert _max_diff(mvs[a], mvs[b]) > 1e-2, (a, b)
            assert _max_diff(imgs[a], imgs[b]) > 1e-2, (a, b)


@pytest.mark.parametrize("task", TASKS)
def test_unmerged_lora_equals_weights_merged_from_the_files(tiny_dir, encoder, images, task):
    """W + (alpha/r) B A, computed from adapter_model.safetensors, gives the encoder's outputs."""
    net = _merged_network(tiny_dir, task)
    prompt = "Query: " if task == "text-matching" else "Passage: "
    batch, out = _run_text(net, encoder, [prompt + t for t in TEXTS])
    got = encoder.encode_text(TEXTS, task=task, prompt_name="passage")
    assert _max_diff(got, _pool(out.hidden, batch.attention_mask)) < 1e-5
    mv = encoder.encode_text(TEXTS, task=task, prompt_name="passage", return_multivector=True)
    mask = batch.attention_mask.bool()
    assert _max_diff(mv, [F.normalize(out.projected[r, mask[r]], dim=-1) for r in range(len(TEXTS))]) < 1e-5
    ibatch, iout = _run_images(net, encoder, images)
    assert _max_diff(encoder.encode_image(images, task=task), _pool(iout.hidden, ibatch.pooling_mask)) < 1e-5


def test_mixed_task_batch_equals_per_task_batches(encoder, images):
    labels = ["code", "retrieval", "text-matching", "code", "text-matching"]
    mixed = encoder.encode_text(TEXTS, task=labels, batch_size=8)
    mixed_mv = encoder.encode_text(TEXTS, task=labels, return_multivector=True, batch_size=8)
    for task in TASKS:
        rows = [i for i, t in enumerate(labels) if t == task]
        alone = encoder.encode_text([TEXTS[i] for i in rows], task=task)
        assert _max_diff(mixed[rows], alone) < 1e-5, task
        alone_mv = encoder.encode_text([TEXTS[i] for i in rows], task=task, return_multivector=True)
        assert _max_diff([mixed_mv[i] for i in rows], alone_mv) < 1e-5, task
    image_labels = ["text-matching", "code", "retrieval"]
    mixed_img = encoder.encode_image(images, task=image_labels, batch_size=3)
    for i, task in enumerate(image_labels):
        assert _max_diff(mixed_img[i : i + 1], encoder.encode_image([images[i]], task=task)) < 1e-5, task


def test_prefix_rules_reflected_in_outputs(encoder, base_network):
    q = encoder.encode_text(TEXTS, task="retrieval", prompt_name="query")
    p = encoder.encode_text(TEXTS, task="retrieval", prompt_name="passage")
    assert _max_diff(q, p) > 1e-3
    assert torch.equal(encoder.encode_text(TEXTS, task="retrieval"), q)  # default prompt is "query"
    assert _max_diff(encoder.encode_text(TEXTS, task="code", prompt_name="query"), encoder.encode_text(TEXTS, task="code", prompt_name="passage")) > 1e-3
    tm_q = encoder.encode_text(TEXTS, task="text-matching", prompt_name="query")
    tm_p = encoder.encode_text(TEXTS, task="text-matching", prompt_name="passage")
    assert torch.equal(tm_q, tm_p)
    # the prefix is what the model sees: "Passage: " + text, run by hand, gives the passage vector
    batch = encoder.preprocessor.text_inputs(["Passage: " + t for t in TEXTS])
    with torch.inference_mode(), encoder.selector.select(["retrieval"] * len(TEXTS)):
        out = encoder.network(batch.input_ids, batch.attention_mask, batch.position_ids)
    assert _max_diff(p, _pool(out.hidden, batch.attention_mask)) < 1e-5
    with pytest.raises(EncodeError, match="unknown prompt_name 'document'"):
        encoder.encode_text(TEXTS, prompt_name="document")


def test_text_single_vector_is_mean_over_mask_and_normalised(encoder):
    batch = encoder.preprocessor.text_inputs(["Query: " + t for t in TEXTS])
    with torch.inference_mode(), encoder.selector.select(["retrieval"] * len(TEXTS)):
        out = encoder.network(batch.input_ids, batch.attention_mask, batch.position_ids)
    got = encoder.encode_text(TEXTS, task="retrieval")
    assert got.shape == (len(TEXTS), 64) and got.dtype == torch.float32
    assert _max_diff(got, _pool(out.hidden, batch.attention_mask)) < 1e-5
    # prefix tokens are included: pooling without them gives something else
    prefix_len = len(encoder.preprocessor.tokenizer("Query: ")["input_ids"])
    without = F.normalize(out.hidden[0, prefix_len : batch.lengths[0]].mean(0), dim=-1)
    assert _max_diff(got[0], without) > 1e-3


def test_outputs_are_l2_normalised(encoder, images):
    for vectors in (
        encoder.encode_text(TEXTS),
        encoder.encode_text(TEXTS, task="code", truncate_dim=16),
        encoder.encode_image(images, task="text-matching"),
        encoder.encode_image(images, truncate_dim=8),
    ):
        norms = vectors.norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    for rows in encoder.encode_text(TEXTS, return_multivector=True) + encoder.encode_image(images, return_multivector=True):
        norms = rows.norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_matryoshka_truncation(encoder, tiny_dir, images):
    dims = json.loads((tiny_dir / "config.json").read_text())["matryoshka_dims"]
    assert dims == [8, 16, 32, 64]
    full = encoder.encode_text(TEXTS, task="code")
    full_img = encoder.encode_image(images)
    for dim in dims:
        got = encoder.encode_text(TEXTS, task="code", truncate_dim=dim)
        assert got.shape == (len(TEXTS), dim)
        assert _max_diff(got, F.normalize(full[:, :dim], dim=-1)) < 1e-6
        got_img = encoder.encode_image(images, truncate_dim=dim)
        assert got_img.shape == (len(images), dim)
        assert _max_diff(got_img, F.normalize(full_img[:, :dim], dim=-1)) < 1e-6
    assert encoder.encode_text([], truncate_dim=16).shape == (0, 16)
    for bad in (7, 12, 100, 2048):
        with pytest.raises(EncodeError, match=f"truncate_dim={bad} is not allowed"):
            encoder.encode_text(TEXTS, truncate_dim=bad)
        with pytest.raises(EncodeError, match=f"truncate_dim={bad}"):
            encoder.encode_image(images, truncate_dim=bad)


def test_config_truncate_dim_is_the_default(tiny_dir, tmp_path, encoder):
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    raw = json.loads((src / "config.json").read_text())
    raw["truncate_dim"] = 16
    (src / "config.json").write_text(json.dumps(raw))
    enc = TorchEncoder.from_pretrained(src)
    got = enc.encode_text(TEXTS)
    assert got.shape == (len(TEXTS), 16)
    assert _max_diff(got, F.normalize(encoder.encode_text(TEXTS)[:, :16], dim=-1)) < 1e-6
    assert enc.encode_text(TEXTS, truncate_dim=32).shape == (len(TEXTS), 32)
    assert enc.encode_text(TEXTS, truncate_dim=64).shape == (len(TEXTS), 64)


@pytest.mark.parametrize("task", TASKS)
def test_multi_vector_equals_projector_by_hand(encoder, task):
    prompted = [("Query: " if task == "text-matching" else "Passage: ") + t for t in TEXTS]
    batch = encoder.preprocessor.text_inputs(prompted)
    with torch.inference_mode(), encoder.selector.select([task] * len(TEXTS)):
        hidden = encoder.network.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state
    proj = encoder.network.multi_vector_projector
    t = TASKS.index(task)
    with torch.inference_mode():
        projected = F.linear(hidden, proj.base.weight, proj.base.bias) + proj.scale[t] * (hidden @ proj.lora_A[t].T @ proj.lora_B[t].T)
    got = encoder.encode_text(TEXTS, task=task, prompt_name="passage", return_multivector=True)
    assert isinstance(got, list) and len(got) == len(TEXTS)
    for row, vectors in enumerate(got):
        n_valid = batch.lengths[row]
        assert vectors.shape == (n_valid, 32)
        torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(n_valid), atol=1e-5, rtol=0)
        expected = F.normalize(projected[row, :n_valid], dim=-1)
        assert _max_diff(vectors, expected) < 1e-5


def test_image_multi_vectors_cover_the_whole_prompt(encoder, images):
    batch = encoder.preprocessor.image_inputs(images)
    with torch.inference_mode(), encoder.selector.select(["code"] * len(images)):
        out = encoder.network(batch.input_ids, batch.attention_mask, batch.position_ids, batch.pixel_values, batch.image_grid_thw)
    got = encoder.encode_image(images, task="code", return_multivector=True)
    for row, vectors in enumerate(got):
        assert vectors.shape == (batch.lengths[row], 32)
        assert _max_diff(vectors, F.normalize(out.projected[row, : batch.lengths[row]], dim=-1)) < 1e-5


@pytest.mark.parametrize("task", ["retrieval", "code"])
def test_image_single_vector_is_the_vision_span_mean(encoder, images, task):
    """The image vector is the mean over <|vision_start|>..<|vision_end|> inclusive, not the whole prompt."""
    special = encoder.config.special_tokens
    batch = encoder.preprocessor.image_inputs(images)
    assert len({tuple(g.tolist()) for g in batch.image_grid_thw}) == 3
    with torch.inference_mode(), encoder.selector.select([task] * len(images)):
        out = encoder.network(batch.input_ids, batch.attention_mask, batch.position_ids, batch.pixel_values, batch.image_grid_thw)
    got = encoder.encode_image(images, task=task)
    assert got.shape == (len(images), 64)
    for row in range(len(images)):
        ids = batch.input_ids[row].tolist()
        start, end = ids.index(special.vision_start_token_id), ids.index(special.vision_end_token_id)
        span = F.normalize(out.hidden[row, start : end + 1].mean(0), dim=-1)
        whole = F.normalize(out.hidden[row, : batch.lengths[row]].mean(0), dim=-1)
        inner = F.normalize(out.hidden[row, start + 1 : end].mean(0), dim=-1)
        assert _max_diff(got[row], span) < 1e-5
        assert _max_diff(got[row], whole) > 1e-3
        assert _max_diff(got[row], inner) > 1e-4


def test_image_paths_and_pil_images_agree(encoder, images, tmp_path):
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    assert _max_diff(encoder.encode_image(paths), encoder.encode_image(images)) < 1e-6
    assert _max_diff(encoder.encode_image(str(paths[1])), encoder.encode_image(images[1])) < 1e-6


def test_both_key_layouts_give_identical_outputs(tiny_dir_new, encoder, images):
    new = TorchEncoder.from_pretrained(tiny_dir_new)
    for task in TASKS:
        assert torch.equal(new.encode_text(TEXTS, task=task), encoder.encode_text(TEXTS, task=task)), task
        assert torch.equal(new.encode_image(images, task=task), encoder.encode_image(images, task=task)), task
    assert _max_diff(new.encode_text(TEXTS, return_multivector=True), encoder.encode_text(TEXTS, return_multivector=True)) == 0
    assert _max_diff(new.encode_image(images, return_multivector=True), encoder.encode_image(images, return_multivector=True)) == 0


def test_batch_size_and_order_invariance(encoder, images):
    one = encoder.encode_text(TEXTS, batch_size=1)
    many = encoder.encode_text(TEXTS, batch_size=8)
    assert _max_diff(one, many) < 1e-5
    # results come back in input order whatever the internal length sorting
    perm = [3, 0, 4, 2, 1]
    permuted = encoder.encode_text([TEXTS[i] for i in perm], batch_size=2)
    assert _max_diff(permuted, one[perm]) < 1e-5
    # each row equals the text encoded alone
    for i, text in enumerate(TEXTS):
        assert _max_diff(encoder.encode_text([text])[0], one[i]) < 1e-5
    mv1 = encoder.encode_text(TEXTS, return_multivector=True, batch_size=1)
    mv8 = encoder.encode_text(TEXTS, return_multivector=True, batch_size=8)
    assert _max_diff(mv1, mv8) < 1e-5
    img1 = encoder.encode_image(images, batch_size=1)
    img8 = encoder.encode_image(images, batch_size=8)
    assert _max_diff(img1, img8) < 1e-5
    assert _max_diff(encoder.encode_image(images[::-1], batch_size=2), img1.flip(0)) < 1e-5
    assert _max_diff(encoder.encode_image(images, return_multivector=True, batch_size=1), encoder.encode_image(images, return_multivector=True, batch_size=8)) < 1e-5


def test_single_string_and_empty_input(encoder):
    got = encoder.encode_text(TEXTS[0])
    assert got.shape == (1, 64)
    assert _max_diff(got, encoder.encode_text(TEXTS[:1])) < 1e-6
    assert encoder.encode_text([]).shape == (0, 64)
    assert encoder.encode_text([], return_multivector=True) == []


def test_unknown_task(encoder, images):
    with pytest.raises(TaskError, match=r"unknown task\(s\) \['summary'\]; this model has \['retrieval', 'text-matching', 'code'\]"):
        encoder.encode_text(["a"], task="summary")
    with pytest.raises(TaskError, match=r"\['qa'\].*retrieval.*text-matching.*code"):
        encoder.encode_text(["a", "b"], task=["code", "qa"])
    with pytest.raises(TaskError, match=r"\['summary'\]"):
        encoder.encode_image(images[:1], task="summary")


def test_bad_inputs(encoder, tmp_path):
    with pytest.raises(EncodeError, match="got 2 task labels for 1 inputs"):
        encoder.encode_text(["a"], task=["code", "code"])
    with pytest.raises(EncodeError, match="batch_size must be >= 1"):
        encoder.encode_text(["a"], batch_size=0)
    with pytest.raises(EncodeError, match="encode_text takes strings"):
        encoder.encode_text(["a", 3])
    with pytest.raises(EncodeError, match="not-there.png: image file not found"):
        encoder.encode_image([tmp_path / "not-there.png"])
    with pytest.raises(EncodeError, match="not-there.png"):
        encoder.encode_image(str(tmp_path / "not-there.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(EncodeError, match="bad.png: not a readable image"):
        encoder.encode_image([tmp_path / "bad.png"])


def _merged_copy(tiny_dir, tmp_path, keep_adapters):
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    raw = json.loads((src / "config.json").read_text())
    raw["jev4_merged_task"] = "code"
    (src / "config.json").write_text(json.dumps(raw))
    if not keep_adapters:
        shutil.rmtree(src / "adapters")
    return src


def test_merged_task_checkpoint_has_one_task(tiny_dir, tmp_path, no_lora_encoder):
    """A checkpoint marked as merged loads without adapters and answers only its own task."""
    enc = TorchEncoder.from_pretrained(_merged_copy(tiny_dir, tmp_path, keep_adapters=False))
    assert enc.selector is None and enc.tasks == ("code",)
    # the weights here are the unmodified base, so the outputs are the base model's
    assert _max_diff(enc.encode_text(TEXTS, task="code"), no_lora_encoder.encode_text(TEXTS, task="code")) < 1e-5
    with pytest.raises(TaskError, match=r"\['retrieval'\]; this model has \['code'\]"):
        enc.encode_text(TEXTS)  # the default task is retrieval


def test_merged_task_with_adapters_is_ambiguous(tiny_dir, tmp_path):
    from jev4.errors import AdapterError

    with pytest.raises(AdapterError, match="'code' merged in and an adapters/ dir: ambiguous"):
        TorchEncoder.from_pretrained(_merged_copy(tiny_dir, tmp_path, keep_adapters=True))


def test_bf16_close_to_fp32(tiny_dir, encoder, images):
    bf16 = TorchEncoder.from_pretrained(tiny_dir, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    cos = F.cosine_similarity(bf16.encode_text(TEXTS), encoder.encode_text(TEXTS), dim=-1)
    assert cos.min() > 0.999
    cos = F.cosine_similarity(bf16.encode_image(images), encoder.encode_image(images), dim=-1)
    assert cos.min() > 0.999
    for a, b in zip(bf16.encode_text(TEXTS, return_multivector=True), encoder.encode_text(TEXTS, return_multivector=True)):
        assert a.dtype == torch.float32 and F.cosine_similarity(a, b, dim=-1).min() > 0.99
    inv_freq = [b for n, b in bf16.network.named_buffers() if "inv_freq" in n]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    # LoRA weights stay fp32 on a bf16 base
    assert bf16.network.multi_vector_projector.lora_A.dtype == torch.float32
