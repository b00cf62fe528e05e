"""Adapter merge: merged == unmerged for every task, text-only export, bad inputs leave no output."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer  # at collection: mutation forks start with it loaded (~4 s)

from jev4.errors import AdapterError, CheckpointError, OutputExistsError, TaskError
from jev4.export.manifest import MANIFEST_NAME, verify_manifest
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.model.encoder import TorchEncoder

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France, on the river Seine. " * 4,
    "x",
    "def add(a, b):\n    return a + b",
    "日本の首都は東京です。",
]
TASKS = ["retrieval", "text-matching", "code"]


def _images():
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in [(60, 90), (112, 140), (150, 210)]]


def _min_cos(a, b):
    if isinstance(a, list):
        return min(_min_cos(x, y) for x, y in zip(a, b, strict=True))
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def _merge_scope(fixture_name, config):
    """Module scope: each merge once per run. Per test under ``make mutation`` (JEV4_MUTATION=1): mutmut runs a
    mutant against the tests whose own run reached its code, and a module fixture's merge runs inside the first
    test that asks for it only, so the tests that read the shared output would never see a mutant."""
    return "function" if os.environ.get("JEV4_MUTATION") == "1" else "module"


class _MergedByTask(dict):
    """Task -> merged fp32 checkpoint, merged when first asked for."""

    def __init__(self, root, source):
        super().__init__()
        self.root, self.source = root, source

    def __missing__(self, task):
        self[task] = merge_checkpoint(MergeSettings(model=str(self.source), adapter=task, out=str(self.root / task), dtype="fp32"), progress=False)
        return self[task]


@pytest.fixture(scope=_merge_scope)
def merged(tmp_path_factory, merge_source):
    return _MergedByTask(tmp_path_factory.mktemp("merged"), merge_source)


@pytest.mark.parametrize("task", TASKS)
def test_merged_equals_unmerged_text_and_image(merged, source_encoder, task):
    enc = TorchEncoder.from_pretrained(merged[task], dtype="fp32")
    assert enc.tasks == (task,)
    for prompt in ("query", "passage"):
        assert _min_cos(enc.encode_text(TEXTS, task=task, prompt_name=prompt), source_encoder.encode_text(TEXTS, task=task, prompt_name=prompt)) >= 0.99999
    assert _min_cos(enc.encode_text(TEXTS, task=task, return_multivector=True), source_encoder.encode_text(TEXTS, task=task, return_multivector=True)) >= 0.99999
    imgs = _images()
    assert _min_cos(enc.encode_image(imgs, task=task), source_encoder.encode_image(imgs, task=task)) >= 0.99999
    assert _min_cos(enc.encode_image(imgs, task=task, return_multivector=True), source_encoder.encode_image(imgs, task=task, return_multivector=True)) >= 0.99999


def test_merge_changes_exactly_the_adapted_weights(merged, merge_source):
    """W' - W equals s * B @ A for adapted modules and 0 elsewhere."""
    from jev4.model.adapters import load_adapters
    from jev4.model.checkpoint import canonical_name, iter_shard_tensors, list_checkpoint_files

    def weights(path):
        return {canonical_name(n): t.float() for p, names in list_checkpoint_files(path).shards for n, t in iter_shard_tensors(p, names)}

    before, after = weights(merge_source), weights(merged["code"])
    loras = load_adapters(merge_source / "adapters", tuple(TASKS)).for_task("code")
    assert set(before) == set(after)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {f"{m}.weight" for m in loras}
    for module, lora in loras.items():
        torch.testing.assert_close(after[f"{module}.weight"] - before[f"{module}.weight"], lora.scale * lora.B @ lora.A, rtol=1e-4, atol=1e-6)


def test_merged_checkpoint_refuses_other_task(merged):
    enc = TorchEncoder.from_pretrained(merged["retrieval"])
    with pytest.raises(TaskError, match="retrieval"):
        enc.encode_text(["a"], task="code")


def test_merged_layout_and_manifest(merged):
    out = merged["retrieval"]
    config = json.loads((out / "config.json").read_text())
    assert config["jev4_merged_task"] == "retrieval"
    assert config["torch_dtype"] == "float32"
    assert not (out / "adapters").exists()
    keys = set()
    for f in out.glob("*.safetensors"):
        keys |= set(load_file(f))
    assert any(k.startswith("model.layers.0.") for k in keys) and any(k.startswith("visual.") for k in keys)
    assert "multi_vector_projector.weight" in keys
    manifest = verify_manifest(out)
    assert manifest["settings"]["adapter"] == "retrieval"
    assert manifest["settings"]["out_dtype"] == "fp32" and manifest["settings"]["source_dtype"] == "bf16"
    assert {"torch", "transformers", "jev4"} <= set(manifest["versions"])
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


def test_default_dtype_is_the_source_dtype(tmp_path, merge_source):
    out = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="retrieval", out=str(tmp_path / "m")), progress=False)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors |= load_file(f)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_manifest_detects_tampering(tmp_path, merged):
    from jev4.errors import ManifestError

    copy = shutil.copytree(merged["retrieval"], tmp_path / "copy")
    verify_manifest(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    with pytest.raises(ManifestError, match="config.json"):
        verify_manifest(copy)


def test_small_shards_are_indexed(tmp_path, merge_source, source_encoder):
    out = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="code", out=str(tmp_path / "m"), dtype="fp32", max_shard_bytes=200_000), progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) > 2 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    enc = TorchEncoder.from_pretrained(out)
    assert _min_cos(enc.encode_text(TEXTS, task="code"), source_encoder.encode_text(TEXTS, task="code")) >= 0.99999


# ---- text-only export: a plain Qwen2 checkpoint that sentence-transformers loads --------------------


@pytest.fixture(scope=_merge_scope, params=["retrieval", "text-matching"])
def text_only(request, tmp_path_factory, merge_source):
    task = request.param
    out = tmp_path_factory.mktemp("text-only") / task
    return task, merge_checkpoint(MergeSettings(model=str(merge_source), adapter=task, out=str(out), dtype="fp32", text_only=True), progress=False)


def test_text_only_is_a_qwen2_checkpoint(text_only):
    from transformers import AutoModel

    task, out = text_only
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2Model"]
    keys = set(load_file(out / "model.safetensors"))
    assert not any("visual" in k for k in keys)
    assert "multi_vector_projector.weight" not in keys
    # Qwen2Model.save_pretrained's names (what tools keyed on Qwen2Model read), and no other weights at the top
    assert {"embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_proj.weight"} <= keys and not any(k.startswith("model.") for k in keys)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert set(load_file(out / "multi_vector_projector" / "model.safetensors")) == {"multi_vector_projector.weight", "multi_vector_projector.bias"}
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "Qwen2Model"


def test_text_only_hidden_states_equal_reference(text_only, source_encoder):
    """Plain transformers Qwen2Model (1-D RoPE) gives the reference's pooled vectors (M-RoPE)."""
    from transformers import AutoModel

    from jev4.model.pooling import single_vector
    from jev4.model.preprocess import text_prefix

    task, out = text_only
    model = AutoModel.from_pretrained(out).eval()
    prompted = [text_prefix(task, "passage") + t for t in TEXTS]
    batch = source_encoder.preprocessor.text_inputs(prompted)
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    ours = single_vector(hidden, batch.attention_mask)
    ref = source_encoder.encode_text(TEXTS, task=task, prompt_name="passage", batch_size=len(TEXTS))
    # encode_text sorts by length; compare row by row in input order
    assert _min_cos(ours, ref) >= 0.99999


def test_sentence_transformers_loads_text_only(text_only, source_encoder):
    task, out = text_only
    st = SentenceTransformer(str(out), device="cpu")
    for prompt in ("query", "passage"):
        got = st.encode(TEXTS, prompt_name=prompt, convert_to_tensor=True, batch_size=2)
        ref = source_encoder.encode_text(TEXTS, task=task, prompt_name=prompt)
        assert _min_cos(got.cpu(), ref) >= 0.99999
    expected_passage = "Query: " if task == "text-matching" else "Passage: "
    assert st.prompts["passage"] == expected_passage and st.prompts["query"] == "Query: "


def test_side_files_of_both_layouts(merged, text_only, merge_source):
    """The files around the weights: what tokenizers, transformers and sentence-transformers read from OUT."""
    from safetensors import safe_open

    from jev4.export.merge import TOKENIZER_FILES, VISION_FILES

    full = merged["retrieval"]
    task, text = text_only
    source_tokenizer = json.loads((merge_source / "tokenizer_config.json").read_text())
    for out, copied, left_out in ((full, TOKENIZER_FILES + VISION_FILES, ()), (text, TOKENIZER_FILES, VISION_FILES)):
        for name in copied:
            if name != "tokenizer_config.json" and (merge_source / name).is_file():
                assert (out / name).read_bytes() == (merge_source / name).read_bytes(), name
        assert all(not (out / name).exists() for name in left_out) and any((merge_source / name).is_file() for name in left_out or VISION_FILES)
        tokenizer = json.loads((out / "tokenizer_config.json").read_text())
        # right padding is the only change: valid tokens then get position ids 0..n-1, as plain Qwen2 computes them
        assert tokenizer == {**source_tokenizer, "padding_side": "right"}
    config = json.loads((text / "config.json").read_text())
    assert config["jev4_merged_task"] == task and config["torch_dtype"] == "float32"
    with safe_open(str(text / "multi_vector_projector" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers' and sentence-transformers' loaders require
    assert json.loads((text / "sentence_bert_config.json").read_text())["max_seq_length"] == source_tokenizer["model_max_length"]


def test_manifest_names_kind_source_and_output_codec(tmp_path, merge_source, caplog):
    """What the manifest says of a merge: its kind, its source dir and the output codec it carries (file included)."""
    import logging

    from jev4.quant.output_codec import OUTPUT_CODEC_NAME, OutputCodec

    codec = OutputCodec("ubinary", None, None, {"precision": "ubinary"})
    with caplog.at_level(logging.INFO, logger="jev4.export.merge"):
        out = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="code", out=str(tmp_path / "m")), progress=False, output_codec=codec)
    manifest = verify_manifest(out)
    assert manifest["kind"] == "merged" and manifest["source"] == str(merge_source)
    assert manifest["contents"] == {"output_codec": codec.describe()} and OUTPUT_CODEC_NAME in manifest["files"]
    assert json.loads((out / OUTPUT_CODEC_NAME).read_text()) == codec.to_json()
    adapted = sum(1 for key in load_file(next((merge_source / "adapters").glob("*.safetensors"))) if ".code.weight" in key and "lora_A" in key)
    assert f"merged {adapted} modules of task 'code' into {out}" in caplog.messages
    text = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="code", out=str(tmp_path / "t"), text_only=True), progress=False)
    manifest = verify_manifest(text)
    assert manifest["kind"] == "merged-text-only" and manifest["contents"] == {} and not (text / OUTPUT_CODEC_NAME).exists()


@pytest.mark.parametrize(("model_max_length", "expected"), [(131072, 32768), (None, 8192), (4096, 4096)])
def test_sentence_transformers_length_follows_the_tokenizer(tmp_path, merge_source, model_max_length, expected):
    """max_seq_length is the tokenizer's model_max_length, capped at 32768 (upstream's own model_max_length); 8192 without one."""
    src = shutil.copytree(merge_source, tmp_path / "src")
    tokenizer = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer.pop("model_max_length")
    if model_max_length is not None:
        tokenizer["model_max_length"] = model_max_length
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    out = merge_checkpoint(MergeSettings(model=str(src), adapter="code", out=str(tmp_path / "m"), text_only=True), progress=False)
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == expected


# ---- bad inputs: each its own clear error, and no output left behind ------------------------------


def _copy(src, dst):
    return shutil.copytree(src, dst)


def _assert_no_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_missing_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="no-such-dir"):
        merge_checkpoint(MergeSettings(model=str(tmp_path / "no-such-dir"), adapter="retrieval", out=str(out)), progress=False)
    _assert_no_output(out)


def test_no_adapters_dir(tmp_path, merge_source):
    src = _copy(merge_source, tmp_path / "src")
    shutil.rmtree(src / "adapters")
    out = tmp_path / "out"
    with pytest.raises(AdapterError, match="adapters"):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out)), progress=False)
    _assert_no_output(out)


def test_unknown_task(tmp_path, merge_source):
    out = tmp_path / "out"
    with pytest.raises(TaskError, match=r"retrieval.*text-matching.*code"):
        merge_checkpoint(MergeSettings(model=str(merge_source), adapter="summarize", out=str(out)), progress=False)
    _assert_no_output(out)


def test_corrupt_header(tmp_path, merge_source):
    src = _copy(merge_source, tmp_path / "src")
    shard = src / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*corrupt"):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out)), progress=False)
    _assert_no_output(out)


def test_truncated_shard(tmp_path, merge_source):
    src = _copy(merge_source, tmp_path / "src")
    shard = src / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*truncated"):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out)), progress=False)
    _assert_no_output(out)


def _rewrite_shard(src, edit):
    shard = src / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | {k: shard.name for k in tensors}
    index_path.write_text(json.dumps(index))


def test_wrong_shape(tmp_path, merge_source):
    src = _copy(merge_source, tmp_path / "src")
    _rewrite_shard(src, lambda t: t.update({"multi_vector_projector.weight": torch.zeros(7, 64, dtype=torch.bfloat16)}))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"multi_vector_projector.weight.*\(7, 64\)"):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out)), progress=False)
    _assert_no_output(out)


def test_unexpected_tensor(tmp_path, merge_source):
    src = _copy(merge_source, tmp_path / "src")
    _rewrite_shard(src, lambda t: t.update({"single_vector_projector.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="single_vector_projector.weight"):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out)), progress=False)
    _assert_no_output(out)


def test_missing_tensor(tmp_path, merge_source):
    src = _copy(merge_source, tmp_path / "src")
    _rewrite_shard(src, lambda t: t.pop("multi_vector_projector.bias"))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="missing.*multi_vector_projector.bias"):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out)), progress=False)
    _assert_no_output(out)


def test_out_exists(tmp_path, merge_source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        merge_checkpoint(MergeSettings(model=str(merge_source), adapter="retrieval", out=str(out)), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    merge_checkpoint(MergeSettings(model=str(merge_source), adapter="retrieval", out=str(out), force=True), progress=False)
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()


def test_failure_midway_keeps_previous_output(tmp_path, merge_source, monkeypatch):
    """A crash while writing leaves the old OUT intact and no temp dir behind."""
    import jev4.export.merge as merge_mod

    out = tmp_path / "out"
    merge_checkpoint(MergeSettings(model=str(merge_source), adapter="retrieval", out=str(out)), progress=False)
    before = (out / MANIFEST_NAME).read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge_mod, "write_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_checkpoint(MergeSettings(model=str(merge_source), adapter="code", out=str(out), force=True), progress=False)
    assert (out / MANIFEST_NAME).read_text() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_fp16_overflow_after_merge_is_named(tmp_path, merge_source):
    """bf16 holds values fp16 cannot (max 65504): a merge to fp16 that would write inf names the tensor."""
    src = _copy(merge_source, tmp_path / "src")
    shard = sorted(src.glob("model*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = next(n for n in sorted(tensors) if n.endswith("post_attention_layernorm.weight"))
    tensors[name] = torch.full_like(tensors[name], 1e5)  # finite in bf16
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"{name}.*overflows fp16 after the merge.*--dtype bf16 or fp32"):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out), dtype="fp16"), progress=False)
    _assert_no_output(out)
    merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out), dtype="bf16"), progress=False)
    verify_manifest(out)


def test_shard_limit_must_be_at_least_one_byte(merge_source):
    from jev4.errors import SettingsError

    for bad in (0, -5):
        with pytest.raises(SettingsError, match=rf"^max_shard_bytes must be positive, got {bad}$"):
            MergeSettings(model=str(merge_source), adapter="retrieval", out="unused", max_shard_bytes=bad)
    assert MergeSettings(model=str(merge_source), adapter="retrieval", out="unused", max_shard_bytes=1).max_shard_bytes == 1


def _cast_shards(src, cast):
    for shard in src.glob("model-*.safetensors"):
        tensors = load_file(shard)
        save_file({k: cast(k, t) for k, t in tensors.items()}, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("cast", "found"),
    [
        (lambda k, t: t.float() if k.endswith("norm.weight") else t, "['BF16', 'F32']"),  # mixed: which dtype would OUT have?
        (lambda k, t: t.double(), "['F64']"),  # one dtype, but not one the merge writes
    ],
)
def test_weights_of_mixed_or_unsupported_dtypes_are_refused(tmp_path, merge_source, cast, found):
    src = shutil.copytree(merge_source, tmp_path / "src")
    _cast_shards(src, cast)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as raised:
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(out)), progress=False)
    assert str(raised.value) == f"{src}: expected one float dtype for all weights, found {found}"
    _assert_no_output(out)


def test_a_tensor_given_twice_under_both_layouts_is_named(tmp_path, merge_source):
    src = shutil.copytree(merge_source, tmp_path / "src")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.language_model.norm.weight"] = tensors["model.norm.weight"].clone()  # the current layout's name for it
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["model.language_model.norm.weight"] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model\.(language_model\.)?norm\.weight' maps to '[\w.]+norm\.weight', which another tensor already provides"):
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(tmp_path / "out")), progress=False)


def test_an_already_merged_checkpoint_is_refused(tmp_path, merged):
    with pytest.raises(AdapterError) as raised:
        merge_checkpoint(MergeSettings(model=str(merged["retrieval"]), adapter="code", out=str(tmp_path / "out")), progress=False)
    assert str(raised.value) == f"{merged['retrieval']}: already has the 'retrieval' adapter merged in"


def test_text_only_merge_is_the_same_from_either_key_layout(tmp_path, tiny_dir, tiny_dir_new):
    """The same weights under the older and the current key names give the same text-only checkpoint.

    In the current layout `model.visual.*` sorts between the language model and the projector, so a merge
    that stopped reading a shard at its first vision tensor would lose the projector there."""
    outs = [
        merge_checkpoint(MergeSettings(model=str(src), adapter="retrieval", out=str(tmp_path / name), dtype="fp32", text_only=True), progress=False)
        for name, src in (("old", tiny_dir), ("new", tiny_dir_new))
    ]
    for rel in ("model.safetensors", "multi_vector_projector/model.safetensors"):
        old, new = (load_file(out / rel) for out in outs)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old), rel
