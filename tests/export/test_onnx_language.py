"""The language graph: in-graph placement of image embeddings, and its ONNX export run on CPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from jev4.export.onnx import LanguageGraph, export_language_graph, place_image_embeds
from jev4.model.encoder import TorchEncoder


def test_place_image_embeds_matches_masked_scatter():
    torch.manual_seed(0)
    embeds = torch.randn(3, 7, 4)
    is_image = torch.zeros(3, 7, dtype=torch.bool)
    is_image[0, 2:4] = True
    is_image[2, 1:6] = True
    image = torch.randn(int(is_image.sum()), 4)
    expected = embeds.masked_scatter(is_image.unsqueeze(-1), image)
    torch.testing.assert_close(place_image_embeds(embeds, is_image, image), expected)
    # no image tokens, no image rows: unchanged
    torch.testing.assert_close(place_image_embeds(embeds, torch.zeros_like(is_image), torch.zeros(0, 4)), embeds)


@pytest.fixture(scope="module")
def merged_encoder(tmp_path_factory, merge_source):
    from jev4.export.merge import MergeSettings, merge_checkpoint

    out = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="retrieval", out=str(tmp_path_factory.mktemp("m") / "m"), dtype="fp32"), progress=False)
    return TorchEncoder.from_pretrained(out)


def _image_batch(encoder):
    rng = np.random.RandomState(1)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in [(70, 100), (140, 200)]]
    return encoder.preprocessor.image_inputs(images)


def test_language_graph_equals_encoder_for_images(merged_encoder):
    """Vision embeddings placed by the graph give the encoder's image vectors (which use masked_scatter)."""
    enc = merged_encoder
    batch = _image_batch(enc)
    graph = LanguageGraph(enc.network, enc.config.special_tokens.image_token_id, with_images=True).eval()
    with torch.inference_mode():
        image_embeds = torch.cat(enc.network.model.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True).pooler_output)
        single, multi = graph(batch.input_ids, batch.attention_mask, batch.position_ids, batch.pooling_mask, image_embeds)
        ref_single, ref_multi = enc._forward(batch, ["retrieval"] * batch.batch_size)
    torch.testing.assert_close(single, ref_single, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(multi, ref_multi, atol=1e-6, rtol=1e-5)


def test_exported_language_graph_with_image_tokens(tmp_path, merged_encoder):
    import onnxruntime as ort

    enc = merged_encoder
    spec = export_language_graph(enc.network, enc.config, tmp_path, opset=18, with_images=True)
    session = ort.InferenceSession(str(tmp_path / spec.file), providers=["CPUExecutionProvider"])
    batch = _image_batch(enc)
    with torch.inference_mode():
        image_embeds = torch.cat(enc.network.model.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True).pooler_output)
        ref_single, ref_multi = enc._forward(batch, ["retrieval"] * batch.batch_size)
    feed = {
        "input_ids": batch.input_ids.numpy(),
        "attention_mask": batch.attention_mask.numpy(),
        "position_ids": batch.position_ids.numpy(),
        "pooling_mask": batch.pooling_mask.numpy(),
        "image_embeds": image_embeds.numpy(),
    }
    spec.check_feed(feed, "float32")
    single, multi = session.run(None, feed)
    assert np.abs(single - ref_single.numpy()).max() < 1e-5
    assert np.abs(multi - ref_multi.numpy()).max() < 1e-5
