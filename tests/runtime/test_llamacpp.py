"""jev4.runtime.load on a GGUF artifact: llama.cpp's token states pooled and projected by jev4, against the fp32 reference."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import jev4.runtime as rt
from jev4.errors import CheckpointError, EncodeError, ManifestError
from jev4.export.gguf import GGUF_FILE, PROJECTOR_FILE, GgufSettings, export_gguf
from jev4.export.manifest import MANIFEST_NAME
from jev4.validate.thresholds import DEFAULTS

pytest.importorskip("gguf", reason="the GGUF export needs the gguf package: pip install 'jev4[edge]'")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'jev4[edge]'")

from jev4.runtime.llamacpp_backend import LlamaCppEncoder  # noqa: E402

TEXTS = [
    "what is a llama?",
    "def add(a, b):\n    return a + b",
    "x",
    "Le lama est un camélidé domestique d'Amérique du Sud. " * 3,
    "日本の首都は東京です。",
]
TYPES = ("f32", "q8_0", "q4_0")


@pytest.fixture(scope="module")
def gguf_artifacts(tmp_path_factory, runtime_source):
    root = tmp_path_factory.mktemp("gguf-rt")
    return {t: export_gguf(GgufSettings(model=str(runtime_source), adapter="retrieval", out=str(root / t), gguf_type=t), progress=False) for t in TYPES}


@pytest.fixture(scope="module")
def encoders(gguf_artifacts):
    loaded = {t: rt.load(art) for t, art in gguf_artifacts.items()}
    yield loaded
    for encoder in loaded.values():
        encoder.close()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _min_token_cos(got, ref):
    assert [g.shape for g in got] == [r.shape for r in ref]
    return min(_cos(g, r).min().item() for g, r in zip(got, ref))


def test_f32_single_and_multi_vectors_equal_the_reference(encoders, runtime_reference):
    encoder = encoders["f32"]
    assert isinstance(encoder, LlamaCppEncoder) and encoder.tasks == ("retrieval",) and not encoder.supports_images
    assert "llama.cpp" in encoder.engine()
    for prompt in ("query", "passage"):
        for dim in (None, 16, 8):
            got = encoder.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim)
            ref = runtime_reference.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim)
            assert got.shape == ref.shape and _cos(got, ref).min().item() >= 0.9999
    got = encoder.encode_text(TEXTS, task="retrieval", prompt_name="passage", return_multivector=True)
    ref = runtime_reference.encode_text(TEXTS, task="retrieval", prompt_name="passage", return_multivector=True)
    assert _min_token_cos(got, ref) >= 0.9999


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_types_stay_within_their_thresholds(encoders, runtime_reference, kind):
    bounds = DEFAULTS[f"gguf-{kind}"]
    single = _cos(encoders[kind].encode_text(TEXTS, task="retrieval"), runtime_reference.encode_text(TEXTS, task="retrieval"))
    assert single.min().item() >= bounds.single_cosine_min and single.mean().item() >= bounds.single_cosine_mean
    got = encoders[kind].encode_text(TEXTS, task="retrieval", return_multivector=True)
    ref = runtime_reference.encode_text(TEXTS, task="retrieval", return_multivector=True)
    assert _min_token_cos(got, ref) >= bounds.multi_token_cosine_min
    # and they are really quantized: further from the reference than F32
    f32 = _cos(encoders["f32"].encode_text(TEXTS, task="retrieval"), runtime_reference.encode_text(TEXTS, task="retrieval"))
    assert single.min().item() < f32.min().item()


def test_long_text_grows_the_context_and_is_not_cut(encoders, runtime_reference):
    """llama.cpp's default context (512) would cut this text; the backend sizes the context to it."""
    text = "tokens " * 700
    got = encoders["f32"].encode_text([text], task="retrieval", max_length=1500, return_multivector=True)
    ref = runtime_reference.encode_text([text], task="retrieval", max_length=1500, return_multivector=True)
    assert got[0].shape[0] > 512 and _min_token_cos(got, ref) >= 0.9999
    tokens = got[0].shape[0]
    assert encoders["f32"].model._n_ctx == 1 << (tokens - 1).bit_length()  # the next power of two


def test_output_codec_and_batching_come_from_the_base_class(encoders):
    encoder = encoders["q8_0"]
    one_by_one = torch.cat([encoder.encode_text([t], task="retrieval") for t in TEXTS])
    batched = encoder.encode_text(TEXTS, task="retrieval", batch_size=3)
    assert torch.allclose(one_by_one, batched, atol=1e-6)
    codes = encoder.encode_text(TEXTS, task="retrieval", output_precision="binary")
    assert codes.dtype == np.int8 and codes.shape == (len(TEXTS), 64 // 8)


def plain_llama(path, n_ctx=512):
    return llama_cpp.Llama(str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, verbose=False)


def test_plain_llama_cpp_gives_the_same_single_vector(gguf_artifacts, encoders):
    """No jev4 code: llama-cpp-python's Llama, its tokenizer and mean pooling, the prompt added by hand."""
    llm = plain_llama(gguf_artifacts["f32"] / GGUF_FILE)
    try:
        assert llm.metadata["jev4.prompt.query"] == "Query: " and llm.metadata["qwen2.pooling_type"] == "1"
        tokenizer = encoders["f32"].preprocessor.tokenizer
        for text in TEXTS:
            prompted = "Query: " + text
            assert llm.tokenize(prompted.encode(), add_bos=True, special=False) == tokenizer(prompted)["input_ids"], text
            theirs = torch.tensor(llm.embed(prompted, normalize=True))
            ours = encoders["f32"].encode_text([text], task="retrieval", prompt_name="query")[0]
            assert _cos(theirs, ours).item() >= 0.9999, text
    finally:
        llm.close()


def test_validate_passes_on_a_gguf_artifact(gguf_artifacts, runtime_source, tmp_path):
    from jev4.validate.runner import ValidateSettings, validate

    report = validate(
        ValidateSettings(
            reference=str(runtime_source), adapter="retrieval", artifact=str(gguf_artifacts["q8_0"]), out=str(tmp_path / "report"),
            max_queries=20, max_docs=60, progress=False,
        )
    )
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report.passed, report.failures
    assert data["precision"] == "gguf-q8_0"
    assert "llama.cpp" in json.dumps(data["environment"])


def test_inspect_and_backend_choice(gguf_artifacts, runtime_source):
    info = rt.inspect(gguf_artifacts["q4_0"])
    assert info.kind == "gguf" and info.tasks == ("retrieval",) and info.config.multi_vector_dim == 32
    with pytest.raises(ManifestError, match="use backend='llamacpp'"):
        rt.load(gguf_artifacts["q4_0"], backend="torch")
    with pytest.raises(ManifestError, match="runs a GGUF artifact only"):
        rt.load(runtime_source, backend="llamacpp")
    with rt.load(gguf_artifacts["q4_0"], backend="llamacpp") as encoder:
        assert isinstance(encoder, LlamaCppEncoder)


def test_images_are_refused(encoders):
    with pytest.raises(EncodeError, match="cannot encode images"):
        encoders["f32"].encode_image(Image.new("RGB", (56, 56)), task="retrieval")


def _copy(art, tmp_path):
    return shutil.copytree(art, tmp_path / "art")


def test_missing_projector(gguf_artifacts, tmp_path):
    art = _copy(gguf_artifacts["q8_0"], tmp_path)
    (art / PROJECTOR_FILE).unlink()
    with pytest.raises(ManifestError, match=f"{PROJECTOR_FILE}: missing"):
        rt.load(art)
    with pytest.raises(CheckpointError, match="multi-vector projector of this GGUF artifact is missing"):
        rt.load(art, verify=False)


def test_unknown_gguf_type_in_the_manifest(gguf_artifacts, tmp_path):
    art = _copy(gguf_artifacts["q8_0"], tmp_path)
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["contents"]["gguf_type"] = "q5_k"
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="unknown GGUF type 'q5_k'.*f32, f16, q8_0, q4_0"):
        rt.load(art, verify=False)


def test_a_gguf_that_is_not_jev4s(gguf_artifacts, runtime_source, tmp_path, monkeypatch):
    """The same model written without jev4's keys (as another converter would) is refused by name."""
    import jev4.export.gguf as export

    with monkeypatch.context() as patch:  # the runtime reads the real key names again afterwards
        patch.setattr(export, "KEY_TASK", "other.task")
        patch.setattr(export, "KEY_FORMAT", "other.format_version")
        foreign = export_gguf(GgufSettings(model=str(runtime_source), adapter="retrieval", out=str(tmp_path / "foreign"), gguf_type="q8_0"), progress=False)
    art = _copy(gguf_artifacts["q8_0"], tmp_path)
    shutil.copy(foreign / GGUF_FILE, art / GGUF_FILE)
    with pytest.raises(ManifestError, match="not a jev4 GGUF"):
        rt.load(art, verify=False)
    (art / GGUF_FILE).write_bytes(b"GGUF not really")
    with pytest.raises(CheckpointError, match="llama.cpp could not load this GGUF"):
        rt.load(art, verify=False)
