"""onnxruntime (CPU) vs the torch reference with unmerged adapters, text inputs."""

import json
import shutil
from importlib import resources

import pytest
import torch

import jev4.runtime as rt
from jev4.errors import ManifestError, MissingDependencyError, OutputExistsError, ProviderError, TaskError
from jev4.export.onnx import OnnxExportSettings, export_onnx

TASKS = ("retrieval", "text-matching", "code")


def _corpus_texts():
    """Texts from 1 word to several hundred words (the longest truncate at max_length=512)."""
    words = resources.files("jev4.model").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8").split()
    sizes = [1, 2, 5, 9, 17, 33, 64, 120, 200, 300, 400, 600]
    return [" ".join(words[i : i + n] if i + n <= len(words) else (words * 3)[i : i + n]) for i, n in enumerate(sizes)]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("task", TASKS)
def test_single_and_multi_vector_parity_all_batch_sizes(onnx_artifacts, runtime_reference, task, provider, fp32_bound):
    ort_enc = rt.load(onnx_artifacts[task], backend="onnxruntime", provider=provider)
    texts = _corpus_texts()
    lengths = runtime_reference.preprocessor.token_lengths(["Passage: " + t for t in texts], 512)
    assert min(lengths) <= 5 and max(lengths) == 512
    ref = runtime_reference.encode_text(texts, task=task, prompt_name="passage", max_length=512)
    ref_multi = runtime_reference.encode_text(texts, task=task, prompt_name="passage", max_length=512, return_multivector=True)
    for batch_size in (1, 3, 16):
        got = ort_enc.encode_text(texts, task=task, prompt_name="passage", max_length=512, batch_size=batch_size)
        fp32_bound.check(got, ref, f"{task} single, batch {batch_size}")
    got_multi = ort_enc.encode_text(texts, task=task, prompt_name="passage", max_length=512, batch_size=5, return_multivector=True)
    fp32_bound.check(got_multi, ref_multi, f"{task} multi-vector tokens")


def test_every_matryoshka_dim(onnx_artifacts, runtime_reference, cpu_fp32_bound):
    ort_enc = rt.load(onnx_artifacts["retrieval"])
    texts = _corpus_texts()[:6]
    for dim in runtime_reference.config.matryoshka_dims:
        got = ort_enc.encode_text(texts, task="retrieval", truncate_dim=dim)
        ref = runtime_reference.encode_text(texts, task="retrieval", truncate_dim=dim)
        assert got.shape == (len(texts), dim)
        cpu_fp32_bound.check(got, ref, f"dim {dim}")


def test_prefix_rules_follow_the_task(onnx_artifacts, runtime_reference):
    enc = rt.load(onnx_artifacts["text-matching"])
    texts = ["a cat sat on the mat", "stocks fell sharply"]
    q = enc.encode_text(texts, task="text-matching", prompt_name="query")
    p = enc.encode_text(texts, task="text-matching", prompt_name="passage")
    torch.testing.assert_close(q, p)


def test_one_call_path_for_both_backends(onnx_artifacts, runtime_source, cpu_fp32_bound):
    """Switching backend is one argument; both are jev4.runtime.Encoder with the same API."""
    a = rt.load(runtime_source, backend="torch")
    b = rt.load(onnx_artifacts["code"], backend="onnxruntime")
    assert isinstance(a, rt.Encoder) and isinstance(b, rt.Encoder)
    texts = ["def f(x): return x + 1", "sort a list in place"]
    cpu_fp32_bound.check(b.encode_text(texts, task="code"), a.encode_text(texts, task="code"), "code")


def test_artifact_refuses_other_task(onnx_artifacts):
    enc = rt.load(onnx_artifacts["retrieval"])
    with pytest.raises(TaskError, match="retrieval"):
        enc.encode_text(["x"], task="code")


def test_manifest_records_graphs(onnx_artifacts):
    manifest = json.loads((onnx_artifacts["retrieval"] / "jev4-manifest.json").read_text())
    assert manifest["kind"] == "onnx" and manifest["contents"]["opset"] == 18
    language = manifest["contents"]["graphs"]["language"]
    assert [t["name"] for t in language["inputs"]] == ["input_ids", "attention_mask", "position_ids", "pooling_mask", "image_embeds"]
    assert language["outputs"][0]["shape"] == ["batch", 64]
    assert "language.onnx" in manifest["files"] and "language.onnx.data" in manifest["files"]
    # The export's own CPU check: a dot product of fp32-normalised vectors, which resolves ~1e-7 (measured 1 - 1e-7).
    assert manifest["contents"]["validation"]["language_min_cosine"] >= 1 - 1e-9 and manifest["contents"]["validation"]["language_token_min_cosine"] >= 1 - 1e-9


def test_fp16_text_only_export(tmp_path, runtime_source, runtime_reference, provider):
    out = export_onnx(OnnxExportSettings(model=str(runtime_source), adapter="retrieval", out=str(tmp_path / "fp16"), dtype="fp16", text_only=True), progress=False)
    enc = rt.load(out, provider=provider)
    assert enc.float_dtype.name == "float16"
    texts = _corpus_texts()
    got = enc.encode_text(texts, task="retrieval", max_length=512, batch_size=4)
    ref = runtime_reference.encode_text(texts, task="retrieval", max_length=512)
    assert _cos(got, ref).min() >= 0.999
    assert not (out / "vision.onnx").exists()


# ---- clear errors ----------------------------------------------------------------------------------


def test_unknown_adapter(tmp_path, runtime_source):
    with pytest.raises(TaskError, match="unknown task 'qa'"):
        export_onnx(OnnxExportSettings(model=str(runtime_source), adapter="qa", out=str(tmp_path / "o")), progress=False)
    assert not (tmp_path / "o").exists()


def test_out_exists_without_force(tmp_path, runtime_source):
    (tmp_path / "o").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        export_onnx(OnnxExportSettings(model=str(runtime_source), adapter="code", out=str(tmp_path / "o")), progress=False)


def test_onnx_extras_missing(tmp_path, runtime_source, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(MissingDependencyError, match=r"pip install 'jev4\[onnx\]'"):
        export_onnx(OnnxExportSettings(model=str(runtime_source), adapter="code", out=str(tmp_path / "o")), progress=False)


def test_checksum_mismatch_is_refused(tmp_path, onnx_artifacts):
    copy = shutil.copytree(onnx_artifacts["retrieval"], tmp_path / "art")
    data = copy / "language.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="language.onnx.data: sha256"):
        rt.load(copy)


def test_missing_execution_provider(onnx_artifacts):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the missing-provider path cannot be shown here")
    with pytest.raises(ProviderError, match=r"CUDAExecutionProvider is not available.*available: \["):
        rt.load(onnx_artifacts["retrieval"], provider="cuda")


def test_torch_backend_refuses_onnx_artifact(onnx_artifacts):
    with pytest.raises(ManifestError, match="backend='onnxruntime'"):
        rt.load(onnx_artifacts["retrieval"], backend="torch")
