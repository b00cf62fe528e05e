"""jev4-export --format gguf: metadata, tensor types and values, manifest, bad input; llama.cpp's own converter on the text-only export."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jev4.errors import OutputExistsError, SettingsError, TaskError
from jev4.export.gguf import GGUF_FILE, PROJECTOR_FILE, GgufSettings, export_gguf
from jev4.export.manifest import verify_manifest
from jev4.export.merge import MergeSettings, merge_checkpoint

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the gguf package: pip install 'jev4[edge]'")

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SDIST_CACHE = Path(os.environ.get("JEV4_SDIST_CACHE", Path.home() / ".cache" / "jev4" / "sdists"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, merge_source):
    root = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(GgufSettings(model=str(merge_source), adapter="code", out=str(root / t), gguf_type=t), progress=False) for t in ("f32", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def merged_weights(merge_source):
    """The merged checkpoint's tensors (fp32), the reference for what the GGUF must hold."""
    from jev4.export.merge import plan_merge
    from jev4.model.checkpoint import canonical_name, iter_shard_tensors

    plan = plan_merge(MergeSettings(model=str(merge_source), adapter="code", out="/nonexistent-out"))
    weights = {}
    for path, names in plan.files.shards:
        for disk, tensor in iter_shard_tensors(path, names):
            name = canonical_name(disk)
            lora = plan.loras.get(name.removesuffix(".weight"))
            weights[name] = tensor.float() + (lora.delta() if lora is not None and name.endswith(".weight") else 0)
    return weights


def _reader(art):
    return gguf.GGUFReader(art / GGUF_FILE)


def _field(reader, key):
    field = reader.fields[key]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [field.parts[i].tolist()[0] if field.types[-1] != gguf.GGUFValueType.STRING else bytes(field.parts[i]).decode() for i in field.data]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def _tensors(reader):
    return {t.name: t for t in reader.tensors}


def test_metadata_tokenizer_and_jev4_keys(artifacts, merge_source):
    reader = _reader(artifacts["q8_0"])
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.pooling_type") == int(gguf.PoolingType.MEAN)
    assert _field(reader, "qwen2.block_count") == 2 and _field(reader, "qwen2.embedding_length") == 64
    assert _field(reader, "qwen2.context_length") == 32768
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "qwen2"
    config = json.loads((merge_source / "config.json").read_text())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = json.loads((merge_source / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(tokens) == config["vocab_size"] == _tensors(reader)["token_embd.weight"].shape[1]
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-1] == f"[PAD{config['vocab_size'] - 1}]"
    added = json.loads((merge_source / "added_tokens.json").read_text())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert {types[i] for i in added.values()} == {int(gguf.TokenType.CONTROL)}
    assert _field(reader, "tokenizer.ggml.eos_token_id") == added["<|im_end|>"]
    assert _field(reader, "tokenizer.ggml.padding_token_id") == added["<|endoftext|>"]
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert len(_field(reader, "tokenizer.ggml.merges")) > 100
    assert _field(reader, "jev4.task") == "code" and _field(reader, "jev4.gguf_type") == "q8_0"
    assert _field(reader, "jev4.prompt.query") == "Query: " and _field(reader, "jev4.prompt.passage") == "Passage: "
    assert _field(reader, "jev4.matryoshka_dims") == [8, 16, 32] and _field(reader, "jev4.multi_vector_dim") == 32
    assert _field(reader, "jev4.multi_vector_projector") == PROJECTOR_FILE


@pytest.mark.parametrize(
    "kind, matrix, embedding",
    [("f32", "F32", "F32"), ("q8_0", "Q8_0", "Q8_0"), ("q4_0", "Q4_0", "Q8_0")],
)
def test_tensor_types_follow_llama_cpp(artifacts, kind, matrix, embedding):
    tensors = _tensors(_reader(artifacts[kind]))
    assert len(tensors) == 2 + 2 * 12  # token_embd, output_norm, 12 per layer; no vision, no projector, no output head
    for name, tensor in tensors.items():
        if name.endswith(("norm.weight", ".bias")):
            assert tensor.tensor_type.name == "F32", name
        elif name == "token_embd.weight":
            assert tensor.tensor_type.name == embedding
        else:
            assert tensor.tensor_type.name == matrix, name


@pytest.mark.parametrize("kind, tolerance", [("f32", 0.0), ("q8_0", 0.01), ("q4_0", 0.15)])
def test_values_are_the_merged_weights(artifacts, merged_weights, kind, tolerance):
    """Dequantized GGUF tensors equal the merged checkpoint (exactly in F32; relative RMS error for the quantized types)."""
    tensors = _tensors(_reader(artifacts[kind]))
    pairs = {
        "token_embd.weight": "model.language_model.embed_tokens.weight",
        "blk.1.attn_q.weight": "model.language_model.layers.1.self_attn.q_proj.weight",
        "blk.1.attn_q.bias": "model.language_model.layers.1.self_attn.q_proj.bias",
        "blk.0.ffn_down.weight": "model.language_model.layers.0.mlp.down_proj.weight",
        "output_norm.weight": "model.language_model.norm.weight",
    }
    for gguf_name, name in pairs.items():
        t = tensors[gguf_name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        want = merged_weights[name].numpy()
        error = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2))
        assert error <= tolerance, (gguf_name, error)
    torch.testing.assert_close(
        load_file(str(artifacts[kind] / PROJECTOR_FILE))["multi_vector_projector.weight"], merged_weights["multi_vector_projector.weight"]
    )


def test_manifest(artifacts):
    manifest = verify_manifest(artifacts["q4_0"])
    assert manifest["kind"] == "gguf"
    contents = manifest["contents"]
    assert contents["precision"] == "gguf-q4_0" and contents["task"] == "code"
    assert contents["tensor_types"] == {"F32": 11, "Q4_0": 14, "Q8_0": 1}
    assert {GGUF_FILE, PROJECTOR_FILE, "tokenizer.json"} <= set(manifest["files"])
    assert manifest["settings"]["gguf_type"] == "q4_0" and manifest["settings"]["source_dtype"] == "bfloat16"
    assert {"gguf", "torch", "jev4"} <= set(manifest["versions"])
    sizes = {k: (artifacts[k] / GGUF_FILE).stat().st_size for k in artifacts}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f32"]


def test_text_only_export_as_input_gives_the_same_tensors(artifacts, merge_source, tmp_path):
    text_only = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="code", out=str(tmp_path / "t"), dtype="fp32", text_only=True), progress=False)
    art = export_gguf(GgufSettings(model=str(text_only), adapter="code", out=str(tmp_path / "g"), gguf_type="q8_0"), progress=False)
    ours, theirs = _tensors(_reader(art)), _tensors(_reader(artifacts["q8_0"]))
    assert set(ours) == set(theirs)
    for name in ours:
        assert np.array_equal(ours[name].data, theirs[name].data), name
    assert load_file(str(art / PROJECTOR_FILE)).keys() == load_file(str(artifacts["q8_0"] / PROJECTOR_FILE)).keys()
    with pytest.raises(TaskError, match="'retrieval'"):
        export_gguf(GgufSettings(model=str(text_only), adapter="retrieval", out=str(tmp_path / "x")), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", ["q4_k_m", "bf17", "Q8_0"])
def test_unknown_gguf_type(bad, tmp_path, merge_source, caplog):
    with pytest.raises(SettingsError, match=r"choose one of f32, f16, q8_0, q4_0"):
        GgufSettings(model=str(merge_source), adapter="code", out=str(tmp_path / "o"), gguf_type=bad)
    from jev4.cli.export import main

    assert main(["--model", str(merge_source), "--adapter", "code", "--format", "gguf", "--gguf-type", bad, "--out", str(tmp_path / "o")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and f"--gguf-type {bad!r}" in errors[0] and "llama-quantize" in errors[0]
    assert not (tmp_path / "o").exists()


def test_cli_writes_a_gguf_and_refuses_flags_of_other_formats(tmp_path, merge_source):
    from jev4.cli.export import main

    out = tmp_path / "cli"
    assert main(["--model", str(merge_source), "--adapter", "retrieval", "--format", "gguf", "--gguf-type", "q8_0", "--out", str(out), "--no-progress"]) == 0
    assert verify_manifest(out)["contents"]["gguf_type"] == "q8_0"
    assert main(["--model", str(merge_source), "--adapter", "retrieval", "--format", "gguf", "--out", str(out)]) == 2  # exists, no --force
    assert main(["--model", str(merge_source), "--adapter", "retrieval", "--gguf-type", "q8_0", "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
    assert main(["--model", str(merge_source), "--adapter", "retrieval", "--format", "gguf", "--dtype", "bf16", "--out", str(tmp_path / "d")]) == 2
    with pytest.raises(OutputExistsError):
        export_gguf(GgufSettings(model=str(merge_source), adapter="retrieval", out=str(out)), progress=False)


# --------------------------------------------------------------------------- llama.cpp's own converter


def plain_llama_embedding(path: Path, text: str) -> np.ndarray:
    """What a llama.cpp user gets without jev4: the GGUF's own mean pooling, normalised, context sized to the text."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=512, n_batch=512, n_ubatch=512, verbose=False)
    try:
        return np.asarray(llm.embed(text, normalize=True), dtype=np.float64)
    finally:
        llm.close()


def _converter_dir() -> Path:
    """vendor/llama.cpp from the llama-cpp-python sdist (convert_hf_to_gguf.py, conversion/, gguf-py/), fetched once with pip."""
    version = LLAMA_CPP_PYTHON.split("==")[1]
    vendor = SDIST_CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (vendor / "convert_hf_to_gguf.py").is_file():
        return vendor
    SDIST_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = SDIST_CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", LLAMA_CPP_PYTHON, "--no-deps", "--no-binary", ":all:", "-d", str(SDIST_CACHE), "-q"],
            capture_output=True, text=True, timeout=900,
        )
        if result.returncode != 0 or not tarball.is_file():
            pytest.skip(f"cannot download the {LLAMA_CPP_PYTHON} sdist with pip: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].split("/")[0] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
        tar.extractall(SDIST_CACHE, members=members, filter="data")
    return vendor


# The converter run with one patch: its pre-tokenizer check hashes the tokens of a fixed text, and the tiny
# checkpoint's toy BPE (Qwen2's pre-tokenizer regex, 600 merges) cannot give the real Qwen2 vocabulary's hash.
_RUN_CONVERTER = """
import runpy, sys
vendor = sys.argv[1]
sys.path.insert(0, vendor + "/gguf-py")
sys.path.insert(0, vendor)
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [vendor + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_llama_cpp_converter_reads_the_text_only_export(merge_source, tmp_path):
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports sentencepiece (its requirements-convert_hf_to_gguf.txt); pip install sentencepiece")
    vendor = _converter_dir()
    text_only = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="code", out=str(tmp_path / "t"), dtype="fp32", text_only=True), progress=False)
    out = tmp_path / "converted.gguf"
    result = subprocess.run(
        [sys.executable, "-c", _RUN_CONVERTER, str(vendor), str(text_only), "--outtype", "f32", "--outfile", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.pooling_type") == int(gguf.PoolingType.MEAN)  # from the export's modules.json
    names = set(_tensors(reader))
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.bias", "blk.1.ffn_down.weight"} <= names
    assert not any("projector" in n for n in names)  # it stays in multi_vector_projector/, which the converter never reads
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'jev4[edge]'")
    art = export_gguf(GgufSettings(model=str(merge_source), adapter="code", out=str(tmp_path / "g"), gguf_type="f32"), progress=False)
    text = "Query: def add(a, b): return a + b"
    theirs, ours = plain_llama_embedding(out, text), plain_llama_embedding(art / GGUF_FILE, text)
    assert float(np.dot(theirs, ours)) >= 0.99999
