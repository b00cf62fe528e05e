"""jina-clip-v2's room on the tiny checkpoint: layout reading, LoRA merge, both towers vs hand computations, preprocessing, encode API.

The hand computations use only torch ops on the raw safetensors tensors, so
they check jev4's conversion (renaming, Wqkv split, LoRA merge) and the
networks (transformers' JinaEmbeddingsV3Model, jev4's EVA02) independently.
"""

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from jev4.errors import CheckpointError, ConfigError, EncodeError
from jev4.families.jina_clip_v2.checkpoint import SAFETENSORS_NAME, expected_layout, read_checkpoint
from jev4.families.jina_clip_v2.config import load_config, parse_config
from jev4.families.jina_clip_v2.encoder import ClipV2Encoder
from jev4.families.jina_clip_v2.network import ClipV2TextTower, EvaVisionTower
from jev4.families.jina_clip_v2.preprocess import CLIP_MEAN, CLIP_STD, QUERY_PREFIX, ImagePreprocessor, TextPreprocessor
from jev4.families.jina_clip_v2.tiny import TinyClipSpec, tiny_config, write_tiny_checkpoint

T = "text_model.transformer.roberta."
LORA_A, LORA_B, ORIGINAL = ".parametrizations.weight.0.lora_A", ".parametrizations.weight.0.lora_B", ".parametrizations.weight.original"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def config(clip_dir):
    return load_config(clip_dir)


@pytest.fixture(scope="module")
def raw(clip_dir):
    """The raw tensors as stored (bf16), in fp32."""
    return {k: v.float() for k, v in load_file(str(clip_dir / SAFETENSORS_NAME)).items()}


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return ClipV2Encoder.from_pretrained(clip_dir, dtype="fp32")


def _edited_copy(clip_dir, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(clip_dir, copy)
    tensors = load_file(str(copy / SAFETENSORS_NAME))
    edit(tensors)
    save_file(tensors, str(copy / SAFETENSORS_NAME))
    return copy


# --------------------------------------------------------------------------- layout


def test_every_key_is_consumed(clip_dir, config, raw):
    assert set(raw) == set(expected_layout(config))
    weights = read_checkpoint(clip_dir, config)
    text, vision = ClipV2TextTower(config.text), EvaVisionTower(config.vision)
    assert set(weights.text) == set(text.backbone.state_dict())
    assert set(weights.vision) == set(vision.state_dict())
    text.load_converted(weights.text)
    vision.load_state_dict(weights.vision, strict=True)
    # every raw key is accounted for: text keys by module, vision keys one to one, plus logit_scale
    assert len([k for k in raw if k.startswith("vision_model.")]) == len(weights.vision)
    assert weights.logit_scale.shape == ()


def test_extra_key_is_named(clip_dir, config, tmp_path):
    copy = _edited_copy(clip_dir, tmp_path, lambda t: t.update({"vision_model.head.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"does not have: vision_model\.head\.weight"):
        read_checkpoint(copy, config)


def test_missing_key_is_named(clip_dir, config, tmp_path):
    key = T + "encoder.layers.1.mixer.Wqkv" + LORA_B
    copy = _edited_copy(clip_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"1 key\(s\) missing: " + key.replace(".", r"\.")):
        read_checkpoint(copy, config)


def test_wrong_shape_names_key_expected_and_found(clip_dir, config, tmp_path):
    key = "vision_model.blocks.0.mlp.w1.weight"
    copy = _edited_copy(clip_dir, tmp_path, lambda t: t.update({key: torch.zeros(3, 32, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" has shape \[3, 32\], expected \[85, 32\]"):
        read_checkpoint(copy, config)


def test_pickled_checkpoint_is_refused(clip_dir, config, tmp_path):
    copy = tmp_path / "pickled"
    shutil.copytree(clip_dir, copy)
    (copy / SAFETENSORS_NAME).rename(copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        read_checkpoint(copy, config)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="bert"), "model_type is 'bert', expected 'jina_clip'"),
        (lambda c: c["vision_config"].pop("width"), "vision_config.width is missing"),
        (lambda c: c["vision_config"].update(subln=False), "vision_config.subln is False"),
        (lambda c: c["text_config"]["hf_model_config_kwargs"].update(num_attention_heads="4"), "hf_model_config_kwargs.num_attention_heads must be int"),
        (lambda c: c.update(truncate_dim=7), "truncate_dim is invalid"),
        (lambda c: c.update(projection_dim=64), "projection_dim is 64 but text_config hidden_size is 32"),
    ],
)
def test_config_errors_name_the_key(edit, message):
    raw = tiny_config(TinyClipSpec(), vocab_size=401)
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_text_defaults_are_jina_embeddings_v3s():
    raw = tiny_config(TinyClipSpec(), vocab_size=401)
    raw["text_config"]["hf_model_config_kwargs"] = {}
    raw["projection_dim"] = raw["vision_config"]["width"] = 1024
    raw["vision_config"]["head_width"] = 64
    text = parse_config(raw).text
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size) == (24, 1024, 16, 4096)
    assert (text.vocab_size, text.pad_token_id, text.layer_norm_eps, text.rotary_emb_base) == (250002, 1, 1e-5, 20000.0)
    assert text.lora_scale == 1.0


# --------------------------------------------------------------------------- LoRA merge


def test_linear_lora_merge_equals_unmerged(clip_dir, config, raw):
    """x W^T + b + scale * (x A^T) B^T, with W the fused Wqkv, vs the merged q/k/v the reader produced."""
    p = T + "encoder.layers.0.mixer.Wqkv"
    w, a, b, bias = raw[p + ORIGINAL], raw[p + LORA_A][0], raw[p + LORA_B][0], raw[p + ".bias"]
    assert b.abs().sum() > 0  # the tiny LoRA is not a no-op
    x = torch.randn(5, config.text.hidden_size, generator=torch.Generator().manual_seed(1))
    unmerged = x @ w.T + bias + config.text.lora_scale * ((x @ a.T) @ b.T)
    converted = read_checkpoint(clip_dir, config).text
    parts = [x @ converted[f"layers.0.self_attn.{n}_proj.weight"].T + converted[f"layers.0.self_attn.{n}_proj.bias"] for n in "qkv"]
    torch.testing.assert_close(torch.cat(parts, dim=-1), unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmerged, x @ w.T + bias, atol=1e-3)


def test_embedding_lora_merge_equals_unmerged(clip_dir, config, raw):
    """Embedding LoRA unmerged: lookup in W plus scale * (lookup in lora_A [vocab, r]) @ lora_B [r, H]."""
    p = T + "embeddings.word_embeddings"
    ids = torch.tensor([0, 5, 17, 400])
    a, b = raw[p + LORA_A][0], raw[p + LORA_B][0]
    assert a.shape == (config.text.vocab_size, config.text.lora_rank) and b.shape == (config.text.lora_rank, config.text.hidden_size)
    unmerged = F.embedding(ids, raw[p + ORIGINAL]) + config.text.lora_scale * (F.embedding(ids, a) @ b)
    merged = read_checkpoint(clip_dir, config).text["embeddings.word_embeddings.weight"]
    torch.testing.assert_close(F.embedding(ids, merged), unmerged, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- text tower by hand


def _merged(raw, name, scale, embedding=False):
    w, a, b = raw[T + name + ORIGINAL], raw[T + name + LORA_A][0], raw[T + name + LORA_B][0]
    return w + (a @ b if embedding else b @ a) * scale


def _rotary(x, base):
    """Non-interleaved rotary (halves), positions 0..T-1: x [B, heads, T, d]."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rotated = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    return x * cos + rotated * sin


def _text_by_hand(raw, text, input_ids):
    s, eps, heads = text.lora_scale, text.layer_norm_eps, text.num_attention_heads
    mask = input_ids != text.pad_token_id
    x = F.embedding(input_ids, _merged(raw, "embeddings.word_embeddings", s, True))
    x = x + _merged(raw, "embeddings.token_type_embeddings", s, True)[0]
    x = F.layer_norm(x, (text.hidden_size,), raw[T + "emb_ln.weight"], raw[T + "emb_ln.bias"], eps)
    bsz, t, h = x.shape
    for n in range(text.num_hidden_layers):
        p = f"encoder.layers.{n}."
        qkv = x @ _merged(raw, p + "mixer.Wqkv", s).T + raw[T + p + "mixer.Wqkv.bias"]
        q, k, v = (z.reshape(bsz, t, heads, -1).transpose(1, 2) for z in qkv.split(h, dim=-1))
        q, k = _rotary(q, text.rotary_emb_base), _rotary(k, text.rotary_emb_base)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, t, h)
        attn = attn @ _merged(raw, p + "mixer.out_proj", s).T + raw[T + p + "mixer.out_proj.bias"]
        x = F.layer_norm(x + attn, (h,), raw[T + p + "norm1.weight"], raw[T + p + "norm1.bias"], eps)
        mlp = F.gelu(x @ _merged(raw, p + "mlp.fc1", s).T + raw[T + p + "mlp.fc1.bias"], approximate="none")
        mlp = mlp @ _merged(raw, p + "mlp.fc2", s).T + raw[T + p + "mlp.fc2.bias"]
        x = F.layer_norm(x + mlp, (h,), raw[T + p + "norm2.weight"], raw[T + p + "norm2.bias"], eps)
    m = mask.float()[..., None]
    return (x * m).sum(1) / m.sum(1)


def test_text_tower_matches_hand_computation(clip_dir, config, raw, encoder):
    batch = TextPreprocessor.from_dir(clip_dir, config)(["what is the capital of France?", "Paris"])
    assert (batch.input_ids[1] == config.text.pad_token_id).any()  # padding is exercised
    with torch.no_grad():
        got = encoder.text_tower(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(got, _text_by_hand(raw, config.text, batch.input_ids), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- vision tower by hand

V = "vision_model."


def _rope_by_hand(x, vision):
    """2D RoPE on patch tokens of x [B, heads, 1 + G*G, d], pair by pair: rows on the first half, columns on the second."""
    grid, d = vision.grid, x.shape[-1]
    half = d // 2
    freqs = [vision.rope_theta ** (-(2 * i) / half) for i in range(half // 2)]
    out = x.clone()
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        for axis, pos in ((0, row), (1, col)):
            for i, f in enumerate(freqs):
                angle = pos / grid * vision.pt_hw_seq_len * f
                j = axis * half + 2 * i
                x0, x1 = x[:, :, 1 + token, j], x[:, :, 1 + token, j + 1]
                out[:, :, 1 + token, j] = x0 * math.cos(angle) - x1 * math.sin(angle)
                out[:, :, 1 + token, j + 1] = x1 * math.cos(angle) + x0 * math.sin(angle)
    return out


def _block_by_hand(raw, vision, n, x):
    p, eps, w = f"{V}blocks.{n}.", vision.layer_norm_eps, vision.width

    def ln(z, name):
        return F.layer_norm(z, (z.shape[-1],), raw[p + name + ".weight"], raw[p + name + ".bias"], eps)

    y = ln(x, "norm1")
    bsz, t, _ = y.shape
    q = y @ raw[p + "attn.q_proj.weight"].T + raw[p + "attn.q_bias"]
    k = y @ raw[p + "attn.k_proj.weight"].T
    v = y @ raw[p + "attn.v_proj.weight"].T + raw[p + "attn.v_bias"]
    q, k, v = (z.reshape(bsz, t, vision.num_heads, -1).transpose(1, 2) for z in (q, k, v))
    q, k = _rope_by_hand(q, vision), _rope_by_hand(k, vision)
    attn = ((q @ k.transpose(-1, -2)) / math.sqrt(vision.head_width)).softmax(-1) @ v
    attn = ln(attn.transpose(1, 2).reshape(bsz, t, w), "attn.inner_attn_ln")
    x = x + attn @ raw[p + "attn.proj.weight"].T + raw[p + "attn.proj.bias"]
    y = ln(x, "norm2")
    hidden = F.silu(y @ raw[p + "mlp.w1.weight"].T + raw[p + "mlp.w1.bias"]) * (y @ raw[p + "mlp.w2.weight"].T + raw[p + "mlp.w2.bias"])
    return x + ln(hidden, "mlp.ffn_ln") @ raw[p + "mlp.w3.weight"].T + raw[p + "mlp.w3.bias"]


def test_rope_rotates_patch_tokens_only(config, encoder):
    vision = config.vision
    x = torch.randn(2, vision.num_heads, 1 + vision.grid**2, vision.head_width, generator=torch.Generator().manual_seed(2))
    attn = encoder.vision_tower.blocks[0].attn
    out = attn.rope(x, encoder.vision_tower.rope_cos, encoder.vision_tower.rope_sin)
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # CLS unchanged
    torch.testing.assert_close(out[:, :, 1], x[:, :, 1])  # patch (0, 0): angle 0
    assert not torch.allclose(out[:, :, 2:], x[:, :, 2:])
    torch.testing.assert_close(out, _rope_by_hand(x, vision), rtol=1e-5, atol=1e-5)


def test_vision_block_and_tower_match_hand_computation(config, raw, encoder):
    vision = config.vision
    pixels = torch.randn(2, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(3))
    patches = F.unfold(pixels, vision.patch_size, stride=vision.patch_size).transpose(1, 2)  # [B, G*G, 3*P*P], row-major
    x = patches @ raw[V + "patch_embed.proj.weight"].reshape(vision.width, -1).T + raw[V + "patch_embed.proj.bias"]
    x = torch.cat((raw[V + "cls_token"].expand(2, -1, -1), x), dim=1) + raw[V + "pos_embed"]
    tower = encoder.vision_tower
    with torch.no_grad():
        torch.testing.assert_close(tower.blocks[0](x, tower.rope_cos, tower.rope_sin), _block_by_hand(raw, vision, 0, x), rtol=1e-4, atol=1e-4)
        for n in range(vision.layers):
            x = _block_by_hand(raw, vision, n, x)
        cls = F.layer_norm(x, (vision.width,), raw[V + "norm.weight"], raw[V + "norm.bias"], vision.layer_norm_eps)[:, 0]
        torch.testing.assert_close(tower(pixels), cls, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- preprocessing


def test_image_preprocessing_shape_and_formula():
    prep = ImagePreprocessor(56)
    flat = Image.new("RGB", (60, 40), (200, 100, 50))  # PIL size is (width, height): a 3 x 40 x 60 image
    out = prep([flat])
    assert out.shape == (1, 3, 56, 56) and out.dtype == torch.float32
    for c, value in enumerate((200, 100, 50)):
        assert out[0, c, 10, 20].item() == pytest.approx((value / 255 - CLIP_MEAN[c]) / CLIP_STD[c], abs=1e-6)


def test_image_preprocessing_matches_pil_resize_and_centre_crop():
    """Upstream runs PIL's bicubic resize (via torchvision): within one 8-bit level of it."""
    rng = np.random.RandomState(4)
    image = Image.fromarray((rng.rand(40, 60, 3) * 255).astype(np.uint8))
    prep = ImagePreprocessor(56)
    assert prep.resized_shape(40, 60) == (56, 84)
    resized = np.asarray(image.resize((84, 56), Image.BICUBIC)).astype(np.float32)
    top, left = 0, 14  # round((56 - 56) / 2), round((84 - 56) / 2)
    expected = (resized[top : top + 56, left : left + 56] / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    got = prep([image])[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() <= 1.0 / 255 / min(CLIP_STD) + 1e-5


# --------------------------------------------------------------------------- encode API

TEXTS = ["what is the capital of France?", "Paris is the capital and most populous city of France.", "plants"]


def test_encode_text_shapes_norms_and_determinism(encoder):
    full = encoder.encode_text(TEXTS, prompt_name="passage")
    assert full.shape == (3, 32) and full.dtype == torch.float32
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(encoder.encode_text(TEXTS, prompt_name="passage", batch_size=1), full, rtol=1e-5, atol=1e-5)
    assert torch.equal(encoder.encode_text(TEXTS, prompt_name="passage"), full)
    torch.testing.assert_close(encoder.encode_text(TEXTS), full)  # no prompt and "passage": no prefix


def test_truncate_then_normalise(encoder):
    full = encoder.encode_text(TEXTS)
    short = encoder.encode_text(TEXTS, truncate_dim=8)
    assert short.shape == (3, 8)
    torch.testing.assert_close(short, F.normalize(full[:, :8], dim=-1))
    images = encoder.encode_image([Image.new("RGB", (70, 60), (9, 99, 199))], truncate_dim=16)
    assert images.shape == (1, 16)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(1))
    with pytest.raises(EncodeError, match="truncate_dim=7 is not allowed"):
        encoder.encode_text(TEXTS, truncate_dim=7)


def test_query_prefix_changes_the_vector(encoder):
    query = encoder.encode_text(TEXTS[:1], prompt_name="query")
    torch.testing.assert_close(query, encoder.encode_text([QUERY_PREFIX + TEXTS[0]]))
    assert not torch.allclose(query, encoder.encode_text(TEXTS[:1]), atol=1e-3)
    with pytest.raises(EncodeError, match="prompt_name='document' is unknown"):
        encoder.encode_text(TEXTS, prompt_name="document")


def test_encode_image_shapes_norms_and_determinism(encoder, tmp_path):
    rng = np.random.RandomState(5)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in ((40, 60), (80, 56), (56, 56))]
    images[1].save(tmp_path / "b.png")
    out = encoder.encode_image([images[0], tmp_path / "b.png", images[2]], batch_size=2)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(encoder.encode_image(images, batch_size=1), out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[2], atol=1e-3)
