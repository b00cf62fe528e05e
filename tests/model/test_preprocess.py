"""Prompts, position ids and pooling masks: shared by every backend, so checked against transformers."""

import pytest
import torch

from jev4.errors import EncodeError
from jev4.model.preprocess import IMAGE_PROMPT, mrope_position_ids, text_position_ids, text_prefix, vision_span_mask


def test_text_prefix_rules():
    assert text_prefix("retrieval", None) == "Query: "
    assert text_prefix("retrieval", "passage") == "Passage: "
    assert text_prefix("code", "query") == "Query: "
    assert text_prefix("text-matching", "passage") == "Query: "
    with pytest.raises(EncodeError, match="unknown prompt_name 'doc'"):
        text_prefix("retrieval", "doc")


def test_text_position_ids_are_cumsum_of_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    pos = text_position_ids(mask)
    assert pos.shape == (3, 2, 4)
    assert pos[:, 0].tolist() == [[0, 1, 2, 0]] * 3 and pos[:, 1].tolist() == [[0, 1, 2, 3]] * 3


def test_mrope_ids_equal_transformers_get_rope_index(encoder, images):
    batch = encoder.preprocessor.image_inputs(images)
    special = encoder.config.special_tokens
    ours = mrope_position_ids(batch.input_ids, batch.attention_mask, batch.image_grid_thw, special.image_token_id, 2)
    token_type = (batch.input_ids == special.image_token_id).int()
    theirs, _ = encoder.network.model.get_rope_index(
        batch.input_ids, mm_token_type_ids=token_type, image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask
    )
    valid = batch.attention_mask.bool()
    for row in range(batch.batch_size):
        assert torch.equal(ours[:, row, valid[row]], theirs[:, row, valid[row]].to(ours.dtype))
    # images really have 2-D positions: height and width ids differ inside the image
    assert not torch.equal(ours[1], ours[2])


def test_mrope_ids_refuse_mismatched_images(encoder, images):
    batch = encoder.preprocessor.image_inputs(images)
    with pytest.raises(EncodeError, match="images"):
        mrope_position_ids(batch.input_ids, batch.attention_mask, batch.image_grid_thw[:2], encoder.config.special_tokens.image_token_id, 2)


def test_vision_span_mask():
    ids = torch.tensor([[5, 9, 1, 1, 1, 8, 4, 0], [9, 1, 8, 4, 4, 4, 0, 0]])
    mask = vision_span_mask(ids, start_id=9, end_id=8)
    assert mask.tolist() == [[0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    with pytest.raises(EncodeError, match="vision_start"):
        vision_span_mask(torch.tensor([[1, 2, 3]]), start_id=9, end_id=8)


def test_image_prompt_and_max_pixels(encoder, images):
    tok = encoder.preprocessor.tokenizer
    batch = encoder.preprocessor.image_inputs(images[:1])
    text = tok.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    n = int(batch.image_grid_thw[0].prod()) // 4
    assert text == IMAGE_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * n)
    small = encoder.preprocessor.image_inputs(images[2:], max_pixels=56 * 56 * 2)
    large = encoder.preprocessor.image_inputs(images[2:])
    assert small.image_grid_thw.prod() < large.image_grid_thw.prod()
    assert small.image_grid_thw[0].prod() * 14 * 14 <= 56 * 56 * 2
    with pytest.raises(EncodeError, match="max_pixels"):
        encoder.preprocessor.image_inputs(images[:1], max_pixels=100)
