"""Prompts, position ids and pooling masks: shared by every backend, so checked against transformers."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from jev4.errors import CheckpointError, EncodeError
from jev4.model.encoder import TorchEncoder
from jev4.model.preprocess import (
    IMAGE_PROMPT,
    load_image,
    load_tokenizer,
    missing_tokenizer_files,
    mrope_position_ids,
    text_position_ids,
    text_prefix,
    vision_span_mask,
)

TEXTS = ["Query: a", "Query: What is the capital of France?", "Passage: Paris is the capital and largest city of France."]


@pytest.mark.parametrize(
    "task, prompt_name, prefix",
    [
        ("retrieval", None, "Query: "),
        ("retrieval", "query", "Query: "),
        ("retrieval", "passage", "Passage: "),
        ("code", None, "Query: "),
        ("code", "query", "Query: "),
        ("code", "passage", "Passage: "),
        ("text-matching", None, "Query: "),
        ("text-matching", "query", "Query: "),
        ("text-matching", "passage", "Query: "),  # documented rule: text-matching always uses the query prefix
    ],
)
def test_text_prefix_rules(task, prompt_name, prefix):
    assert text_prefix(task, prompt_name) == prefix


@pytest.mark.parametrize("task", ["retrieval", "text-matching", "code"])
def test_unknown_prompt_name(task):
    with pytest.raises(EncodeError, match=r"unknown prompt_name 'document'; choose one of \['passage', 'query'\]"):
        text_prefix(task, "document")


def test_text_position_ids_are_cumsum_of_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    pos = text_position_ids(mask)
    assert pos.shape == (3, 3, 4) and pos.dtype == torch.long
    assert pos[:, 0].tolist() == [[0, 1, 2, 0]] * 3
    assert pos[:, 1].tolist() == [[0, 1, 2, 3]] * 3
    assert pos[:, 2].tolist() == [[0, 0, 0, 0]] * 3


def test_text_inputs(encoder):
    batch = encoder.preprocessor.text_inputs(TEXTS)
    mask = batch.attention_mask
    tok = encoder.preprocessor.tokenizer
    assert batch.batch_size == 3
    assert batch.lengths == [len(tok(t)["input_ids"]) for t in TEXTS] == mask.sum(-1).tolist()
    assert len(set(batch.lengths)) == 3  # padding really happens
    assert torch.equal(batch.pooling_mask, mask)
    expected = mask.cumsum(-1) - 1
    for section in range(3):
        assert torch.equal(batch.position_ids[section][mask.bool()], expected[mask.bool()])
    # right padding with <|endoftext|>, and the prefix is part of the tokens (no BOS before it)
    assert torch.all(batch.input_ids[~mask.bool()] == tok.convert_tokens_to_ids("<|endoftext|>"))
    assert mask[:, 0].all() and not mask[0, -1]
    for row, text in enumerate(TEXTS):
        assert tok.decode(batch.input_ids[row][mask[row].bool()]) == text
    # for text, M-RoPE ids without images are the text ids
    no_images = mrope_position_ids(batch.input_ids, mask, None, encoder.config.special_tokens.image_token_id, 2)
    assert torch.equal(no_images[:, mask.bool()], batch.position_ids[:, mask.bool()])


def test_text_max_length(encoder):
    batch = encoder.preprocessor.text_inputs(TEXTS, max_length=4)
    assert batch.input_ids.shape[1] == 4 and batch.lengths == [min(4, n) for n in encoder.preprocessor.token_lengths(TEXTS, 10_000)]


def _theirs(encoder, input_ids, attention_mask, grid):
    token_type = (input_ids == encoder.config.special_tokens.image_token_id).int()
    theirs, _ = encoder.network.model.get_rope_index(
        input_ids, mm_token_type_ids=token_type, image_grid_thw=grid, attention_mask=attention_mask
    )
    return theirs


def _assert_equal_on_valid(ours, theirs, mask):
    valid = mask.bool()
    assert ours.shape == (3, *mask.shape)
    for row in range(mask.shape[0]):
        assert torch.equal(ours[:, row, valid[row]], theirs[:, row, valid[row]].to(ours.dtype)), row


def test_mrope_ids_equal_transformers_get_rope_index(encoder, images):
    batch = encoder.preprocessor.image_inputs(images)
    grids = {tuple(g.tolist()) for g in batch.image_grid_thw}
    assert len(grids) == 3  # three different image sizes
    assert len(set(batch.lengths)) == 3  # and so padding
    special = encoder.config.special_tokens
    ours = mrope_position_ids(batch.input_ids, batch.attention_mask, batch.image_grid_thw, special.image_token_id, 2)
    assert torch.equal(ours, batch.position_ids)
    _assert_equal_on_valid(ours, _theirs(encoder, batch.input_ids, batch.attention_mask, batch.image_grid_thw), batch.attention_mask)
    # images really have 2-D positions: height and width ids differ inside the image
    assert not torch.equal(ours[1], ours[2])
    # the text after an image resumes at (largest id so far) + 1, so the last valid id is well below the length
    for row, n in enumerate(batch.lengths):
        assert ours[:, row, n - 1].max() < n - 1


def test_mrope_ids_for_mixed_rows_and_two_images_in_one_row(encoder, images):
    """A text-only row between image rows, and a row with two images: grids are consumed in order."""
    tok = encoder.preprocessor.tokenizer
    grid = encoder.preprocessor.image_inputs(images).image_grid_thw
    n = [int(g.prod()) // 4 for g in grid]
    pad = "<|image_pad|>"
    rows = [
        IMAGE_PROMPT.replace(pad, pad * n[0]),
        "Query: some text without any image",
        f"<|im_start|>user\n<|vision_start|>{pad * n[1]}<|vision_end|>and<|vision_start|>{pad * n[2]}<|vision_end|>two<|im_end|>\n",
    ]
    enc = tok(rows, padding=True, return_tensors="pt")
    image_id = encoder.config.special_tokens.image_token_id
    ours = mrope_position_ids(enc["input_ids"], enc["attention_mask"], grid, image_id, 2)
    _assert_equal_on_valid(ours, _theirs(encoder, enc["input_ids"], enc["attention_mask"], grid), enc["attention_mask"])
    text_row = enc["attention_mask"][1]
    assert ours[:, 1, text_row.bool()].tolist() == [list(range(int(text_row.sum())))] * 3
    with pytest.raises(EncodeError, match="3 images but 1 image placeholders"):
        mrope_position_ids(enc["input_ids"][:2], enc["attention_mask"][:2], grid, image_id, 2)


def test_mrope_ids_refuse_missing_images(encoder, images):
    batch = encoder.preprocessor.image_inputs(images)
    with pytest.raises(EncodeError, match="more image placeholders in input_ids than images"):
        mrope_position_ids(batch.input_ids, batch.attention_mask, batch.image_grid_thw[:2], encoder.config.special_tokens.image_token_id, 2)


def test_vision_span_mask_by_hand():
    ids = torch.tensor([[5, 9, 1, 1, 1, 8, 4, 0], [9, 1, 8, 4, 4, 4, 0, 0]])
    mask = vision_span_mask(ids, start_id=9, end_id=8)
    assert mask.tolist() == [[0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    with pytest.raises(EncodeError, match="vision_start"):
        vision_span_mask(torch.tensor([[1, 2, 3]]), start_id=9, end_id=8)
    with pytest.raises(EncodeError, match="exactly one"):
        vision_span_mask(torch.tensor([[9, 1, 8, 9, 1, 8]]), start_id=9, end_id=8)


def test_vision_span_mask_on_image_batch(encoder, images):
    special = encoder.config.special_tokens
    batch = encoder.preprocessor.image_inputs(images)
    for row in range(batch.batch_size):
        ids = batch.input_ids[row].tolist()
        start, end = ids.index(special.vision_start_token_id), ids.index(special.vision_end_token_id)
        expected = torch.zeros(len(ids), dtype=torch.long)
        expected[start : end + 1] = 1
        assert torch.equal(batch.pooling_mask[row], expected)
        n_image = int(batch.image_grid_thw[row].prod()) // 4
        assert end - start - 1 == ids.count(special.image_token_id) == n_image
        assert int(batch.pooling_mask[row].sum()) == n_image + 2


def test_image_inputs(encoder, images):
    tok = encoder.preprocessor.tokenizer
    batch = encoder.preprocessor.image_inputs(images)
    grid = batch.image_grid_thw
    assert grid[:, 0].tolist() == [1, 1, 1]
    # one row of 3 x 2 x 14 x 14 values per patch, all images' patches concatenated
    assert batch.pixel_values.shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    for row in range(batch.batch_size):
        text = tok.decode(batch.input_ids[row][batch.attention_mask[row].bool()])
        n = int(grid[row].prod()) // 4
        assert text == IMAGE_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * n)
    # larger images give more patches (sizes are ordered by area)
    patches = grid.prod(-1).tolist()
    assert patches == sorted(patches) and len(set(patches)) == 3


def test_max_pixels_lowers_the_number_of_image_tokens(encoder, images):
    image_id = encoder.config.special_tokens.image_token_id
    large = encoder.preprocessor.image_inputs(images[2:])
    small = encoder.preprocessor.image_inputs(images[2:], max_pixels=56 * 56 * 2)
    assert int((small.input_ids == image_id).sum()) < int((large.input_ids == image_id).sum())
    assert int(small.image_grid_thw[0, 1:].prod()) * 14 * 14 <= 56 * 56 * 2  # resized to at most max_pixels
    assert small.pixel_values.shape[0] == int(small.image_grid_thw.prod())
    with pytest.raises(EncodeError, match="max_pixels=100 is below the processor's minimum"):
        encoder.preprocessor.image_inputs(images[:1], max_pixels=100)


def test_checkpoint_pixel_limits_apply(encoder):
    """Without max_pixels the checkpoint's preprocessor_config min/max_pixels bound every image."""
    processor = encoder.preprocessor.image_processor
    lo, hi = processor.size["shortest_edge"], processor.size["longest_edge"]
    rng = np.random.RandomState(3)
    large, small = (Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in ((600, 800), (20, 20)))
    assert 600 * 800 > hi and 20 * 20 < lo
    for img in (large, small):
        grid = encoder.preprocessor.image_inputs([img]).image_grid_thw[0]
        pixels = int(grid[1:].prod()) * 14 * 14
        assert lo <= pixels <= hi
        assert grid[1] % 2 == 0 and grid[2] % 2 == 0  # whole 2x2 merge groups


def test_load_image(tmp_path, images):
    path = tmp_path / "img.png"
    images[0].convert("L").save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == images[0].size
    with pytest.raises(EncodeError, match="not-there.png: image file not found"):
        load_image(tmp_path / "not-there.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(EncodeError, match="bad.png: not a readable image"):
        load_image(tmp_path / "bad.png")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")


def copy_without_tokenizer(src, dst, keep=()):
    """A copy of a checkpoint with every tokenizer file removed except ``keep``."""
    shutil.copytree(src, dst)
    for name in TOKENIZER_FILES:
        if name not in keep:
            (dst / name).unlink()
    return dst


def test_load_tokenizer_without_files_names_dir_and_files(tmp_path, tiny_dir):
    # transformers 5 builds an empty Qwen2Tokenizer here (every text -> zero tokens) instead of failing
    bare = copy_without_tokenizer(tiny_dir, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no tokenizer files") as err:
        load_tokenizer(bare)
    message = str(err.value)
    assert str(bare) in message
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert name in message
    assert "write_full_size" in message and "jinaai/jina-embeddings-v4" in message


def test_load_tokenizer_half_a_vocab_pair_is_missing_files(tmp_path, tiny_dir):
    half = copy_without_tokenizer(tiny_dir, tmp_path / "half", keep=("vocab.json", "tokenizer_config.json"))
    assert missing_tokenizer_files(half) == ["tokenizer.json", "merges.txt"]
    with pytest.raises(CheckpointError, match=r"missing tokenizer\.json, merges\.txt"):
        load_tokenizer(half)


@pytest.mark.parametrize("keep", [("tokenizer.json", "tokenizer_config.json"), ("vocab.json", "merges.txt", "tokenizer_config.json")])
def test_load_tokenizer_from_either_file_set(tmp_path, tiny_dir, keep):
    ok = copy_without_tokenizer(tiny_dir, tmp_path / "ok", keep=keep)
    assert missing_tokenizer_files(ok) == []
    assert load_tokenizer(ok)("Query: hello")["input_ids"] == load_tokenizer(tiny_dir)("Query: hello")["input_ids"]


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_tokenizer(tmp_path / "absent")


def test_encoder_on_checkpoint_without_tokenizer_fails_early(tmp_path, tiny_dir):
    bare = copy_without_tokenizer(tiny_dir, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        TorchEncoder.from_pretrained(bare)
