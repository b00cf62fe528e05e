"""The reference encoder: upstream semantics on the tiny checkpoint.

Expected values are recomputed by hand from the network's weights (or from the
files on disk), never hard-coded.
"""

import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from jev4.errors import EncodeError, TaskError
from jev4.model.checkpoint import list_checkpoint_files
from jev4.model.config import load_config
from jev4.model.encoder import TorchEncoder, describe_image, describe_text
from jev4.model.lora import MultiTaskLoRALinear
from jev4.model.network import build_network, load_base_weights
from jev4.model.preprocess import DEFAULT_MAX_LENGTH

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
    with pytest.raises(EncodeError, match=r"^batch_size must be an integer >= 1, got 0$"):
        encoder.encode_text(["a"], batch_size=0)
    with pytest.raises(EncodeError, match=r"^text #1 is of type int, not str; encode_text takes strings \(use encode_image for images\)$"):
        encoder.encode_text(["a", 3])
    with pytest.raises(EncodeError, match=r"^text #0 is of type bytes, not str"):
        encoder.encode_text([b"utf-8 bytes"])
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(EncodeError, match=r"^text #2 is of type PngImageFile, not str.*use encode_image"):
        encoder.encode_text(["a", "b", Image.open(tmp_path / "ok.png")])
    with pytest.raises(EncodeError, match="not-there.png: image file not found"):
        encoder.encode_image([tmp_path / "not-there.png"])
    with pytest.raises(EncodeError, match="not-there.png"):
        encoder.encode_image(str(tmp_path / "not-there.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(EncodeError, match="bad.png: not a readable image"):
        encoder.encode_image([tmp_path / "bad.png"])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e, imgs: e.encode_text(None), "texts must be a string or a sequence of strings, got NoneType"),
        (lambda e, imgs: e.encode_text(42), "texts must be a string or a sequence of strings, got int"),
        (lambda e, imgs: e.encode_text(b"abc"), "texts must be a string or a sequence of strings, got bytes"),
        (lambda e, imgs: e.encode_image(None), "images must be a PIL image, a path, or a sequence of them, got NoneType"),
        (lambda e, imgs: e.encode_image([imgs[0], None]), "image #1 is of type NoneType; give a PIL image or a path to an image file"),
        (lambda e, imgs: e.encode_text(["a"], task=None), "task must be a task name or a sequence of names (one per input), got NoneType"),
        (lambda e, imgs: e.encode_image(imgs[:1], task=None), "task must be a task name or a sequence of names (one per input), got NoneType"),
        (lambda e, imgs: e.encode_text(["a"], task=[None]), "task labels must be strings, got NoneType (None)"),
        (lambda e, imgs: e.encode_text(["a"], batch_size=1.5), "batch_size must be an integer >= 1, got 1.5"),
        (lambda e, imgs: e.encode_text(["a"], batch_size=True), "batch_size must be an integer >= 1, got True"),
        (lambda e, imgs: e.encode_image(imgs[:1], batch_size=-2), "batch_size must be an integer >= 1, got -2"),
        (lambda e, imgs: e.encode_text(["a"], truncate_dim=8.0), "truncate_dim must be an integer or None, got 8.0"),
        (lambda e, imgs: e.encode_image(imgs[:1], truncate_dim="8"), "truncate_dim must be an integer or None, got '8'"),
        (lambda e, imgs: e.encode_text(["a"], max_length=0), "max_length must be an integer >= 1 (tokens), got 0"),
        (lambda e, imgs: e.encode_text(["a"], max_length=-1), "max_length must be an integer >= 1 (tokens), got -1"),
        (lambda e, imgs: e.encode_text(["a"], max_length=2.5), "max_length must be an integer >= 1 (tokens), got 2.5"),
        (
            lambda e, imgs: e.encode_text(["a"], return_multivector=True, truncate_dim=8),
            "truncate_dim applies to single vectors (Matryoshka); multi-vectors keep their 32 dims: pass truncate_dim=None with return_multivector=True",
        ),
        (
            lambda e, imgs: e.encode_image(imgs[:1], return_multivector=True, truncate_dim=64),
            "truncate_dim applies to single vectors (Matryoshka); multi-vectors keep their 32 dims",
        ),
    ],
)
def test_bad_arguments_name_the_argument(encoder, images, monkeypatch, call, message):
    def no_forward(*args, **kwargs):  # every argument is checked before any batch runs
        raise AssertionError("_forward ran")

    monkeypatch.setattr(encoder, "_forward", no_forward)
    with pytest.raises(EncodeError, match="^" + re.escape(message)):
        call(encoder, images)


def test_integer_like_arguments_are_accepted(encoder):
    import numpy as np

    got = encoder.encode_text(np.array(["a", "b"]), truncate_dim=np.int64(8), batch_size=np.int64(1), max_length=np.int32(16))
    assert got.shape == (2, 8)
    assert encoder.encode_text(("a",), max_length=1).shape == (1, 64)


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


UNICODE_HINT = "; decode your input as UTF-8 (invalid bytes?)"


def test_text_that_is_not_valid_unicode(encoder):
    """A lone surrogate is one EncodeError naming the input, the character and its position; not a tokenizer traceback."""
    with pytest.raises(EncodeError, match=re.escape(r"text #1 is not valid Unicode: lone surrogate '\ud800' at position 3" + UNICODE_HINT)):
        encoder.encode_text(["fine", "abc\ud800def", "fine too"])
    # what sys.argv or os.fsdecode make of invalid UTF-8 bytes (surrogateescape)
    argv_like = os.fsdecode(b"caf\xe9 au lait")
    assert argv_like == "caf\udce9 au lait"
    with pytest.raises(EncodeError, match=re.escape(r"text #0 is not valid Unicode: lone surrogate '\udce9' at position 3" + UNICODE_HINT)):
        encoder.encode_text(argv_like)
    with pytest.raises(EncodeError, match=re.escape(r"text #2 is not valid Unicode: lone surrogate '\udcff' at position 0")):
        encoder.encode_text(["a", "b", "\udcff"], return_multivector=True)
    # a surrogate pair spelled out in a str is two lone surrogates, not an emoji
    with pytest.raises(EncodeError, match=re.escape(r"text #0 is not valid Unicode: lone surrogate '\ud83d' at position 2")):
        encoder.encode_text(["hi\ud83d\ude00"])
    assert encoder.encode_text(["hi \U0001f600 caf\u00e9"]).shape == (1, 64)  # real non-ASCII text is fine


def test_describe_inputs(tmp_path, images):
    assert describe_text(3, "short") == "text #3 'short'"
    assert describe_text(0, "y" * 40) == f"text #0 '{'y' * 40}'"
    assert describe_text(1, "z" * 41) == f"text #1 '{'z' * 40}'..."
    assert describe_text(2, "a\nb") == "text #2 'a\\nb'"
    assert describe_image(4, tmp_path / "cat.png") == f"image #4 {tmp_path / 'cat.png'}"
    assert describe_image(0, images[0]) == "image #0 (PIL image 90x60)"
    images[0].save(tmp_path / "dog.png")
    assert describe_image(1, Image.open(tmp_path / "dog.png")) == f"image #1 {tmp_path / 'dog.png'}"


NON_FINITE = (
    ": the model produced a non-finite {kind} (NaN or inf); "
    "an overflow in fp16 or another reduced precision, non-finite weights, or an invalid config.json value would do this"
)


def _poison_rows(encoder, monkeypatch, target: str, prompt: str = "Query: "):
    """Make ``_forward`` return NaN for the row holding ``target`` (found by its token count, unique in TEXTS)."""
    lengths = encoder.preprocessor.token_lengths([prompt + t for t in TEXTS], DEFAULT_MAX_LENGTH)
    target_length = lengths[TEXTS.index(target)]
    assert lengths.count(target_length) == 1
    forward = encoder._forward

    def poisoned(inputs, tasks):
        single, multi = (t.clone() for t in forward(inputs, tasks))  # inference tensors are read-only
        for row, length in enumerate(inputs.lengths):
            if length == target_length:
                single[row, 40] = float("nan")
                multi[row, length - 1, 0] = float("inf")
        return single, multi

    monkeypatch.setattr(encoder, "_forward", poisoned)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_non_finite_output_names_the_input(encoder, monkeypatch, batch_size):
    """The bad row is named by its input index and text, not its (length-sorted) row in the batch."""
    target = TEXTS[3]
    _poison_rows(encoder, monkeypatch, target)
    expected = "text #3 'def f(a):\\n    return a * 2'"
    with pytest.raises(EncodeError, match="^" + re.escape(expected + NON_FINITE.format(kind="vector")) + "$"):
        encoder.encode_text(TEXTS, batch_size=batch_size)
    with pytest.raises(EncodeError, match="^" + re.escape(expected + NON_FINITE.format(kind="multi-vector")) + "$"):
        encoder.encode_text(TEXTS, batch_size=batch_size, return_multivector=True)
    # checked before Matryoshka truncation: the NaN in dimension 40 is an error at truncate_dim=8 too
    with pytest.raises(EncodeError, match=re.escape(expected)):
        encoder.encode_text(TEXTS, batch_size=batch_size, truncate_dim=8)
    # the other inputs are fine
    others = [t for t in TEXTS if t != target]
    assert torch.isfinite(encoder.encode_text(others, batch_size=batch_size)).all()


@pytest.fixture
def fresh_encoder(tiny_dir):
    """An encoder of its own, for tests that break its weights in memory."""
    return TorchEncoder.from_pretrained(tiny_dir)


def test_inf_weight_in_memory_names_the_first_input(fresh_encoder, images, tmp_path):
    fresh_encoder.network.model.language_model.norm.weight.data[7] = float("inf")
    with pytest.raises(EncodeError, match="^" + re.escape("text #0 'only one'" + NON_FINITE.format(kind="vector")) + "$"):
        fresh_encoder.encode_text(["only one"])
    with pytest.raises(EncodeError, match=re.escape("(and 1 more input(s) of the same batch)")):
        fresh_encoder.encode_text(["one", "two"])
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    # batches are sorted by area, largest first: image #2 runs first
    with pytest.raises(EncodeError, match="^" + re.escape(f"image #2 {paths[2]}" + NON_FINITE.format(kind="vector")) + "$"):
        fresh_encoder.encode_image(paths, batch_size=1)
    with pytest.raises(EncodeError, match="^" + re.escape("image #0 (PIL image 90x60)" + NON_FINITE.format(kind="multi-vector"))):
        fresh_encoder.encode_image(images[:1], return_multivector=True)


def test_only_returned_outputs_are_checked(fresh_encoder):
    """A NaN in the multi-vector projector breaks multi-vectors; the single vectors do not use it and still pass."""
    fresh_encoder.network.multi_vector_projector.base.weight.data[0, 0] = float("nan")
    single = fresh_encoder.encode_text(TEXTS)
    assert torch.isfinite(single).all()
    with pytest.raises(EncodeError, match=re.escape(NON_FINITE.format(kind="multi-vector"))):
        fresh_encoder.encode_text(TEXTS, return_multivector=True)


def test_fp16_overflow_is_an_error(tiny_dir):
    """Weights fine in fp32 whose MLP activations pass fp16's 65504 give NaN embeddings in fp16: an error, not output."""
    outputs = {}
    for dtype in ("fp32", "fp16"):
        enc = TorchEncoder.from_pretrained(tiny_dir, dtype=dtype)
        enc.network.model.language_model.layers[0].post_attention_layernorm.weight.data.fill_(1000.0)
        if dtype == "fp32":
            outputs[dtype] = enc.encode_text(["overflows"])
            assert torch.isfinite(outputs[dtype]).all()
        else:
            with pytest.raises(EncodeError, match="^" + re.escape("text #0 'overflows'" + NON_FINITE.format(kind="vector")) + "$"):
                enc.encode_text(["overflows"])
