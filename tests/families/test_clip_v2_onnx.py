"""jina-clip-v2 ONNX exports on the tiny checkpoint: parity with ``ClipV2Encoder``, fp16, the Jina signature, w-int8, the runtime, refusals.

Every artifact is exported for real (dynamo exporter, onnxruntime CPU) and
compared with the fp32 torch reference encoder row by row, on texts of
different lengths in one batch (so with padding) and images of different
sizes and modes.
"""

import json
import logging
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import jev4.families.jina_clip_v2.onnx_export as clip_onnx
from jev4.cli.export import main as export_main
from jev4.errors import EncodeError, ManifestError, SettingsError
from jev4.export.manifest import MANIFEST_NAME
from jev4.families.jina_clip_v2.encoder import ClipV2Encoder
from jev4.families.jina_clip_v2.onnx_encoder import ClipV2OnnxEncoder
from jev4.families.jina_clip_v2.onnx_export import JINA_OUTPUTS, ClipV2OnnxSettings, export_clip_v2_onnx, half_towers
from jev4.families.jina_clip_v2.tiny import write_tiny_checkpoint
from jev4.runtime import load

TEXTS = [
    "a",
    "capital of France",
    "The quick brown fox jumps over the lazy dog, then runs into the forest and disappears from view.",
    "def add(a, b): return a + b",
    "",
]
FP32_BAR = 0.99999  # the bar; measured 1 - 1e-13 on the tiny checkpoint
# fp16: 11-bit mantissa, so each activation carries ~5e-4 relative error; over 2 layers this costs the pooled vector
# a cosine of ~1e-6 (measured 0.9999997 text, 0.999997 vision): 0.9999 leaves a 30x margin.
FP16_BAR = 0.9999
INT8_BAR = 0.99  # measured 0.9998 text, 0.9986 vision (dynamic int8 on 32-wide layers: coarse per-tensor activation scales)


def _images():
    rng = np.random.default_rng(1)
    shapes = [(56, 56, "RGB"), (60, 80, "RGB"), (100, 40, "RGB"), (70, 70, "L"), (56, 120, "RGB")]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8), mode) for h, w, mode in shapes]


def _row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def _assert_tighter_than_between_inputs(got: torch.Tensor, want: torch.Tensor) -> None:
    """The export's distance to the reference is 1000x below the distance between different inputs' vectors.

    The tiny model's vectors share one dominant direction (random weights), so
    different texts can sit at a cosine of 0.9994; a graph that ignored its
    input would still be that close, and this check would refuse it.
    """
    between = 1 - (want.double() @ want.double().T).fill_diagonal_(-1).max()
    assert 1 - _row_cosines(got, want).min() < between / 1000


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def reference(clip_dir):
    return ClipV2Encoder.from_pretrained(clip_dir, dtype="fp32")


@pytest.fixture(scope="module")
def fp32_art(clip_dir, tmp_path_factory):
    """The fp32 artifact, exported through the CLI (``jev4-export --model DIR`` dispatches on config.json's model_type)."""
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    assert export_main(["--model", str(clip_dir), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def fp32_encoder(fp32_art):
    return load(fp32_art)


def _export(clip_dir, tmp_path_factory, name, **kwargs):
    out = tmp_path_factory.mktemp("onnx") / name
    export_clip_v2_onnx(ClipV2OnnxSettings(model=str(clip_dir), out=str(out), **kwargs), progress=False)
    return out


# --------------------------------------------------------------------------- fp32


def test_fp32_artifact_layout_and_manifest(fp32_art):
    manifest = json.loads((fp32_art / MANIFEST_NAME).read_text())
    contents = manifest["contents"]
    assert manifest["kind"] == "onnx" and contents["family"] == "jina-clip-v2" and contents["precision"] == "fp32"
    assert set(contents["graphs"]) == {"text", "vision"}
    assert {"text.onnx", "text.onnx.data", "vision.onnx", "vision.onnx.data", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert contents["validation"]["text_min_cosine"] > 1 - 1e-9 and contents["validation"]["vision_min_cosine"] > 1 - 1e-9
    assert manifest["settings"]["dtype"] == "fp32" and manifest["settings"]["jina_signature"] is False
    text = ort.InferenceSession(str(fp32_art / "text.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"] and [o.name for o in text.get_outputs()] == ["text_embeds"]
    vision = ort.InferenceSession(str(fp32_art / "vision.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in vision.get_inputs()] == ["pixel_values"] and vision.get_inputs()[0].shape[1:] == [3, 56, 56]


def test_text_parity_fp32(fp32_encoder, reference):
    assert isinstance(fp32_encoder, ClipV2OnnxEncoder)
    for prompt in (None, "query"):
        got = fp32_encoder.encode_text(TEXTS, prompt_name=prompt, batch_size=5)  # one padded batch of very different lengths
        want = reference.encode_text(TEXTS, prompt_name=prompt, batch_size=5)
        assert got.shape == want.shape == (len(TEXTS), 32)
        assert _row_cosines(got, want).min() >= FP32_BAR
        _assert_tighter_than_between_inputs(got, want)
    # padding does not leak: a text alone equals the same text inside a padded batch
    alone = fp32_encoder.encode_text(TEXTS[1:2])
    assert _row_cosines(alone, fp32_encoder.encode_text(TEXTS, batch_size=5)[1:2]).min() >= FP32_BAR


def test_image_parity_fp32(fp32_encoder, reference):
    images = _images()
    got = fp32_encoder.encode_image(images, batch_size=3)  # batches of 3 and 2
    want = reference.encode_image(images)
    assert got.shape == want.shape == (len(images), 32)
    assert _row_cosines(got, want).min() >= FP32_BAR
    _assert_tighter_than_between_inputs(got, want)


def test_matryoshka_truncation(fp32_encoder, reference):
    got = fp32_encoder.encode_text(TEXTS, truncate_dim=16)
    assert got.shape == (len(TEXTS), 16)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    assert _row_cosines(got, reference.encode_text(TEXTS, truncate_dim=16)).min() >= FP32_BAR
    # truncate first, then normalise: not the first 16 dims of the normalised 32-dim vector
    full = fp32_encoder.encode_text(TEXTS)
    assert torch.allclose(got, F.normalize(full[:, :16], dim=-1), atol=1e-6)
    assert not torch.allclose(got, full[:, :16], atol=1e-3)
    images = fp32_encoder.encode_image(_images()[:2], truncate_dim=8)
    assert images.shape == (2, 8) and _row_cosines(images, reference.encode_image(_images()[:2], truncate_dim=8)).min() >= FP32_BAR


def test_bad_inputs_are_named(fp32_encoder):
    with pytest.raises(EncodeError, match="truncate_dim=12"):
        fp32_encoder.encode_text(["x"], truncate_dim=12)
    with pytest.raises(EncodeError, match="prompt_name='document'"):
        fp32_encoder.encode_text(["x"], prompt_name="document")
    with pytest.raises(EncodeError, match="batch_size"):
        fp32_encoder.encode_image(_images()[:1], batch_size=0)
    # a feed that does not fit the graph is refused by its spec, naming the input and the expected shape
    with pytest.raises(EncodeError, match=r"vision graph: input 'pixel_values' axis 2 expected 56, got 64"):
        fp32_encoder.vision_tower(torch.zeros(1, 3, 64, 64))


def test_runtime_load_dispatch(fp32_art, clip_dir):
    assert isinstance(load(clip_dir), ClipV2Encoder) and not isinstance(load(clip_dir), ClipV2OnnxEncoder)
    with pytest.raises(ManifestError, match="use backend='onnxruntime'"):
        load(fp32_art, backend="torch")
    with pytest.raises(SettingsError, match="task apply to jina-embeddings-v4 only"):
        load(fp32_art, task="retrieval")
    encoder = load(fp32_art, threads=1)
    assert encoder.threads == 1 and "onnxruntime" in encoder.engine()
    # output codecs through the loader's wrapper: ubinary codes are the packed signs of the float vectors
    floats = encoder.encode_text(TEXTS, truncate_dim=16)
    codes = encoder.encode_text(TEXTS, truncate_dim=16, output_precision="ubinary")
    assert codes.shape == (len(TEXTS), 2)
    assert np.array_equal(np.unpackbits(codes, axis=-1).astype(bool), floats.numpy() > 0)


def test_artifact_loads_alone_and_missing_graph_is_named(fp32_art, reference, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(fp32_art, moved)  # nothing points back at the checkpoint
    assert _row_cosines(load(moved).encode_text(TEXTS[:2]), reference.encode_text(TEXTS[:2])).min() >= FP32_BAR
    (moved / "vision.onnx").unlink()
    with pytest.raises(ManifestError, match="vision.onnx: missing"):
        load(moved)
    with pytest.raises(ManifestError, match=r"vision.onnx: the vision graph named in the manifest is missing"):
        load(moved, verify=False)


# --------------------------------------------------------------------------- fp16


def test_half_towers_keep_overflow_prone_parts_fp32(reference):
    text, vision = half_towers(reference.text_tower, reference.vision_tower)
    assert reference.text_tower.backbone.embeddings.word_embeddings.weight.dtype == torch.float32  # originals untouched
    assert text.backbone.embeddings.word_embeddings.weight.dtype == torch.float16
    assert vision.blocks[0].attn.q_proj.weight.dtype == torch.float16 and vision.blocks[0].mlp.w3.weight.dtype == torch.float16
    norms = [m for m in [*text.modules(), *vision.modules()] if isinstance(m, clip_onnx.LayerNormFp32)]
    assert len(norms) == 1 + 2 * 2 + 2 * 4 + 1  # emb_ln, 2 per text layer, 4 per vision block, final norm
    assert all(m.weight.dtype == torch.float32 for m in norms)
    assert text.backbone.rotary_emb.inv_freq.dtype == torch.float32
    assert vision.rope_cos.dtype == torch.float32
    ids = torch.randint(3, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.inference_mode():
        want = reference.text_tower(ids, mask)
        assert _row_cosines(text(ids, mask), want).min() >= FP16_BAR


def test_fp16_export(clip_dir, tmp_path_factory, reference):
    art = _export(clip_dir, tmp_path_factory, "fp16", dtype="fp16")
    contents = json.loads((art / MANIFEST_NAME).read_text())["contents"]
    assert contents["precision"] == "fp16" and contents["float_dtype"] == "float16"
    assert {"layer_norm", "swiglu_gate", "text_rotary", "mean_pooling"} <= set(contents["kept_fp32"])
    graph = onnx.load(str(art / "vision.onnx"), load_external_data=False)
    init_types = {init.name: init.data_type for init in graph.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in init_types.values()
    for node in graph.graph.node:  # every LayerNormalization's scale is an fp32 initializer
        if node.op_type == "LayerNormalization" and node.input[1] in init_types:
            assert init_types[node.input[1]] == onnx.TensorProto.FLOAT, node.name
    encoder = load(art)
    assert _row_cosines(encoder.encode_text(TEXTS, batch_size=5), reference.encode_text(TEXTS)).min() >= FP16_BAR
    assert _row_cosines(encoder.encode_image(_images()), reference.encode_image(_images())).min() >= FP16_BAR
    assert encoder.encode_text(TEXTS).dtype == torch.float32


# --------------------------------------------------------------------------- Jina signature, int8


def test_jina_signature_graph(clip_dir, tmp_path_factory, reference):
    from jev4.quant.output_codec import OutputCodecSettings, calibrate_output_codec

    codec = calibrate_output_codec(reference.encode_text(TEXTS).numpy(), None, OutputCodecSettings(precision="int8"))
    out = tmp_path_factory.mktemp("onnx") / "jina"
    export_clip_v2_onnx(ClipV2OnnxSettings(model=str(clip_dir), out=str(out), jina_signature=True), progress=False, output_codec=codec)
    art = out
    assert (art / "model.onnx").is_file() and not (art / "text.onnx").exists()
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "pixel_values"]
    assert [o.name for o in session.get_outputs()] == list(JINA_OUTPUTS)
    batch = reference.text_preprocessor(TEXTS)
    pixels = reference.image_preprocessor(_images()[:3])
    text, image, text_l2, image_l2 = session.run(None, {"input_ids": batch.input_ids.numpy(), "pixel_values": pixels.numpy()})
    with torch.inference_mode():
        want_text = reference.text_tower(batch.input_ids, batch.attention_mask)
        want_image = reference.vision_tower(pixels)
    assert text.shape == (len(TEXTS), 32) and image.shape == (3, 32)
    assert _row_cosines(torch.from_numpy(text), want_text).min() >= FP32_BAR
    assert _row_cosines(torch.from_numpy(image), want_image).min() >= FP32_BAR
    assert np.allclose(np.linalg.norm(text), np.linalg.norm(want_text.numpy()), rtol=1e-4)  # unnormalised, like the tower
    assert np.allclose(text_l2, F.normalize(torch.from_numpy(text), dim=-1).numpy(), atol=1e-6)
    assert np.allclose(image_l2, F.normalize(torch.from_numpy(image), dim=-1).numpy(), atol=1e-6)
    # the runtime drives it with an empty batch for the side not asked for
    encoder = load(art)
    assert _row_cosines(encoder.encode_text(TEXTS, prompt_name="query"), reference.encode_text(TEXTS, prompt_name="query")).min() >= FP32_BAR
    assert _row_cosines(encoder.encode_image(_images()), reference.encode_image(_images())).min() >= FP32_BAR
    # the calibrated int8 output codec recorded at export: codes are the codec applied to the float vectors
    codes = encoder.encode_text(TEXTS, output_precision="int8", truncate_dim=16)
    assert codes.dtype == np.int8 and codes.shape == (len(TEXTS), 16)
    assert np.array_equal(codes, codec.codec("single", 16, "int8").encode(encoder.encode_text(TEXTS, truncate_dim=16).numpy()))
    assert len(np.unique(codes)) > 8  # not saturated to two values


def test_weight_int8(clip_dir, tmp_path_factory, reference):
    art = _export(clip_dir, tmp_path_factory, "int8", weights="int8")
    contents = json.loads((art / MANIFEST_NAME).read_text())["contents"]
    assert contents["precision"] == "w-int8"
    assert contents["weights"]["graphs"]["text"]["quantized_matmuls"] == 2 * 6  # q, k, v, out, fc1, fc2 per layer
    assert contents["weights"]["graphs"]["vision"]["quantized_matmuls"] == 2 * 7  # q, k, v, proj, w1, w2, w3 per block
    encoder = load(art)
    text = _row_cosines(encoder.encode_text(TEXTS), reference.encode_text(TEXTS))
    image = _row_cosines(encoder.encode_image(_images()), reference.encode_image(_images()))
    assert text.min() >= INT8_BAR and image.min() >= INT8_BAR
    assert text.min() < 1 - 1e-6  # the weights really are quantized


# --------------------------------------------------------------------------- refusals


def test_export_refuses_to_publish_when_its_check_fails(clip_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(clip_onnx.VALIDATION_BARS, "fp32", 1 + 1e-9)  # no graph can reach it
    out = tmp_path / "refused"
    with caplog.at_level(logging.ERROR):
        # the one-graph export: the same check, half the export time
        assert export_main(["--model", str(clip_dir), "--out", str(out), "--jina-onnx-signature", "--no-progress"]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing published, no temp dir left
    assert any("model.onnx (fp32) at text 1 x 1, images 1: min cosine" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adapter", "retrieval"], "has no task adapters"),
        (["--text-only"], "--text-only: not for jina-clip-v2"),
        (["--format", "gguf"], "jina-clip-v2 exports ONNX only"),
        (["--weights", "int8", "--dtype", "fp16"], "drop --dtype fp16"),
        (["--weights", "int4"], "--weights int4: jina-clip-v2 supports int8"),
    ],
)
def test_cli_refuses_v4_options(clip_dir, tmp_path, caplog, flags, message):
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert export_main(["--model", str(clip_dir), "--out", str(out), *flags]) == 2
    assert any(message in record.getMessage() for record in caplog.records)
    assert not out.exists()
