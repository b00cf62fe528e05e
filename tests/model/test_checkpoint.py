"""Checkpoint reading: both layouts, strict accounting, corrupt, truncated and non-finite files named.

Every damaged checkpoint is a copy in ``tmp_path``; the session fixtures are never touched.
"""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jev4.errors import CheckpointError
from jev4.model.checkpoint import (
    INDEX_NAME,
    all_finite,
    canonical_name,
    describe_nonfinite,
    iter_shard_tensors,
    list_checkpoint_files,
    old_layout_name,
    read_safetensors_header,
    resolve_model_dir,
)
from jev4.model.encoder import TorchEncoder

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def _names(model_dir):
    return [n for _, shard in list_checkpoint_files(model_dir).shards for n in shard]


@pytest.mark.parametrize(
    "old, new",
    [
        ("model.layers.3.mlp.up_proj.weight", "model.language_model.layers.3.mlp.up_proj.weight"),
        ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
        ("model.norm.weight", "model.language_model.norm.weight"),
        ("visual.blocks.0.attn.qkv.bias", "model.visual.blocks.0.attn.qkv.bias"),
        ("visual.merger.mlp.2.weight", "model.visual.merger.mlp.2.weight"),
        ("multi_vector_projector.weight", "multi_vector_projector.weight"),
    ],
)
def test_canonical_name_maps_old_to_new(old, new):
    assert canonical_name(old) == new
    assert canonical_name(new) == new  # the current layout passes through unchanged
    assert old_layout_name(new) == old
    assert old_layout_name(old) == old


def test_old_layout_name_is_the_inverse_on_all_tiny_keys(tiny_dir, tiny_dir_new):
    old = _names(tiny_dir)
    new = _names(tiny_dir_new)
    assert len(old) == len(new) == 82
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in old)
    assert all(n.startswith(("model.language_model.", "model.visual.", "multi_vector_projector.")) for n in new)
    for name in old:
        assert old_layout_name(canonical_name(name)) == name
    for name in new:
        assert canonical_name(name) == name
        assert canonical_name(old_layout_name(name)) == name
    # both layouts name the same set of in-memory tensors, one to one
    assert sorted(canonical_name(n) for n in old) == sorted(new)
    assert len({canonical_name(n) for n in old}) == len(old)


def test_canonical_names_are_the_network_parameters(encoder, tiny_dir):
    params = {n for n, _ in encoder.network.named_parameters() if ".lora_" not in n}
    # LoRA-wrapped Linears hold their base weights under ".base."
    params = {n.replace(".base.", ".") for n in params}
    assert {canonical_name(n) for n in _names(tiny_dir)} == params


def test_list_checkpoint_files_finds_two_shards(tiny_dir):
    files = list_checkpoint_files(tiny_dir)
    assert [p.name for p, _ in files.shards] == [SHARD1, SHARD2]
    assert files.tensor_count == 82
    index = json.loads((tiny_dir / INDEX_NAME).read_text())["weight_map"]
    for path, names in files.shards:
        assert set(names) == {k for k, v in index.items() if v == path.name}
    assert all(n.startswith("model.") for n in files.shards[0][1])


def test_reader_equals_safetensors(tiny_dir):
    for shard in (SHARD1, SHARD2):
        ours = dict(iter_shard_tensors(tiny_dir / shard))
        theirs = load_file(tiny_dir / shard)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype == torch.bfloat16
            assert torch.equal(ours[key], theirs[key]), key


def test_loaded_weights_equal_the_files(encoder, tiny_dir):
    params = dict(encoder.network.named_parameters())
    for shard in (SHARD1, SHARD2):
        for name, tensor in load_file(tiny_dir / shard).items():
            module, _, leaf = canonical_name(name).rpartition(".")
            target = params.get(f"{module}.{leaf}", params.get(f"{module}.base.{leaf}"))
            assert target is not None, name
            assert target.dtype == torch.float32 and torch.equal(target, tensor.float()), name


def _copy(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


def test_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=re.escape(f"{missing}: no such checkpoint directory")):
        list_checkpoint_files(missing)
    with pytest.raises(CheckpointError, match=re.escape(f"{missing}: no such directory")):
        resolve_model_dir(missing)
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        TorchEncoder.from_pretrained(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_dir(tmp_path / "file")


def test_dir_without_weights(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    for name in (INDEX_NAME, SHARD1, SHARD2):
        (src / name).unlink()
    with pytest.raises(CheckpointError, match=f"no {re.escape(INDEX_NAME)} or model.safetensors found"):
        list_checkpoint_files(src)


def test_invalid_index(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    (src / INDEX_NAME).write_text("{garbage")
    with pytest.raises(CheckpointError, match=re.escape(f"{src / INDEX_NAME}: not a valid safetensors index")):
        list_checkpoint_files(src)


@pytest.mark.parametrize("weight_map", [["model.norm.weight"], None, {"model.norm.weight": 1}], ids=["list", "null", "int-filename"])
def test_malformed_index(tiny_dir, tmp_path, weight_map):
    """Valid JSON of the wrong shape is a bad input too: a CheckpointError naming the index, not a crash."""
    src = _copy(tiny_dir, tmp_path)
    (src / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=re.escape(str(src / INDEX_NAME))):
        list_checkpoint_files(src)


def test_corrupt_header_length(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = src / SHARD1
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: corrupt safetensors header (claims")):
        list_checkpoint_files(src)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: corrupt safetensors header")):
        TorchEncoder.from_pretrained(src)


def test_corrupt_header_json(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = src / SHARD2
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    shard.write_bytes(raw[:8] + b"#" * n + raw[8 + n :])  # same length, garbage instead of JSON
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: corrupt safetensors header (not JSON")):
        list_checkpoint_files(src)


def test_tiny_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: corrupt safetensors file (3 bytes, no header)")):
        read_safetensors_header(path)


def test_truncated_shard(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = src / SHARD2
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: truncated safetensors file")):
        list_checkpoint_files(src)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: truncated")):
        TorchEncoder.from_pretrained(src)


def test_header_offsets_checked(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = src / SHARD2
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = "visual.merger.ln_q.weight"
    assert header[name]["shape"] == [32]
    header[name]["shape"] = [33]  # 2 bytes more than its offsets hold
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    shard.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: corrupt safetensors header: '{name}'")):
        read_safetensors_header(shard)


def test_shard_listed_in_index_but_absent(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    (src / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{src / SHARD2}: listed in {INDEX_NAME} but missing")):
        list_checkpoint_files(src)
    with pytest.raises(CheckpointError, match="but missing"):
        TorchEncoder.from_pretrained(src)


def _rewrite(src, edit, update_index=True):
    """Rewrite shard 2 of a copied checkpoint with ``edit`` applied; keep the index in step unless told not to."""
    shard = src / SHARD2
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    if update_index:
        index = json.loads((src / INDEX_NAME).read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | {k: shard.name for k in tensors}
        (src / INDEX_NAME).write_text(json.dumps(index))
    return shard


def test_wrong_shape(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    name = "visual.merger.mlp.0.weight"

    def reshape(t):
        t[name] = t[name].reshape(64, 256).contiguous()

    shard = _rewrite(src, reshape)
    list_checkpoint_files(src)  # the file itself is sound; the model does not fit it
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: tensor '{name}' has shape (64, 256), the model expects (128, 128)")):
        TorchEncoder.from_pretrained(src)


def test_unexpected_tensor(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = _rewrite(src, lambda t: t.update({"lm_head.weight": torch.ones(640, 64, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: unexpected tensor 'lm_head.weight' maps to nothing in the model")):
        TorchEncoder.from_pretrained(src)


def test_tensor_in_file_but_not_in_index(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = _rewrite(src, lambda t: t.update({"extra.weight": torch.ones(2, dtype=torch.bfloat16)}), update_index=False)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: does not match {INDEX_NAME}") + r".*in file, not in index: \['extra.weight'\]"):
        list_checkpoint_files(src)


def test_missing_tensor(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    _rewrite(src, lambda t: t.pop("visual.blocks.0.attn.qkv.bias"))
    with pytest.raises(CheckpointError, match=re.escape(f"{src}: 1 missing tensor(s), e.g. ['model.visual.blocks.0.attn.qkv.bias']")):
        TorchEncoder.from_pretrained(src)


def test_tensor_in_index_but_not_in_file(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = _rewrite(src, lambda t: t.pop("visual.merger.ln_q.weight"), update_index=False)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: does not match {INDEX_NAME} (in index, not in file: ['visual.merger.ln_q.weight']")):
        list_checkpoint_files(src)


def test_same_tensor_in_both_layouts(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    shard = _rewrite(src, lambda t: t.update({"model.visual.merger.ln_q.weight": t["visual.merger.ln_q.weight"].clone()}))
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: ") + ".*both map to 'model.visual.merger.ln_q.weight'"):
        TorchEncoder.from_pretrained(src)


def test_single_file_checkpoint_loads_the_same(tiny_dir, tmp_path, encoder):
    src = _copy(tiny_dir, tmp_path)
    merged = {**load_file(src / SHARD1), **load_file(src / SHARD2)}
    for name in (INDEX_NAME, SHARD1, SHARD2):
        (src / name).unlink()
    save_file(merged, str(src / "model.safetensors"), metadata={"format": "pt"})
    files = list_checkpoint_files(src)
    assert [p.name for p, _ in files.shards] == ["model.safetensors"] and files.tensor_count == 82
    single = TorchEncoder.from_pretrained(src)
    texts = ["one small text", "and another, a little longer"]
    assert torch.equal(single.encode_text(texts), encoder.encode_text(texts))


FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def test_e8m0_is_checked_without_overflow():
    """A 1-byte float whose range passes fp16's is checked in fp32: 2**100 is finite, not an overflow."""
    assert all_finite(torch.tensor([2.0**100, 1.0]).to(torch.float8_e8m0fnu))
    assert not all_finite(torch.tensor([2.0**100, float("nan")]).to(torch.float8_e8m0fnu))


def _values(dtype, n, bad=None, pos=0):
    """n finite values in ``dtype`` (fp8 has no randn), with ``bad`` written at ``pos`` if given."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    if bad is not None:
        x[pos] = bad
    return x.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_all_finite_finds_every_nan_and_inf(dtype):
    """NaN, +inf and -inf anywhere (vectorised body, tail, ends) in every float dtype a checkpoint may hold."""
    values = [float("nan"), float("inf"), -float("inf")]
    if dtype is torch.float8_e4m3fn:
        values = values[:1]  # e4m3fn has no inf: +-inf become NaN on the cast, which is checked with the NaN
    for n in (1, 7, 16, 17, 64, 65, 1000, 4099):
        assert all_finite(_values(dtype, n)), (dtype, n)
        for bad in values:
            for pos in {0, n // 2, n - 1}:
                assert not all_finite(_values(dtype, n, bad, pos)), (dtype, n, bad, pos)
    # extremes are finite
    info = torch.finfo(dtype)
    assert all_finite(torch.tensor([info.max, info.min, info.tiny, 0.0], dtype=torch.float64).to(dtype))


def test_all_finite_other_tensors():
    assert all_finite(torch.empty(0, 4, dtype=torch.bfloat16))
    assert all_finite(torch.tensor(1.5)) and not all_finite(torch.tensor(float("nan")))
    assert all_finite(torch.tensor([-(2**63), 2**63 - 1]))
    assert all_finite(torch.tensor([True, False]))


def test_describe_nonfinite():
    t = torch.zeros(3, 4, dtype=torch.bfloat16)
    t[1, 2] = float("nan")
    t[2, 0] = float("inf")
    assert describe_nonfinite(t) == "2 of 12 values are NaN or inf, the first at [1, 2]"
    assert describe_nonfinite(torch.full((2,), float("nan")).to(torch.float8_e4m3fn)) == "2 of 2 values are NaN, the first at [0]"
    assert describe_nonfinite(torch.tensor(float("-inf"))) == "1 of 1 values are inf, the first at []"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_reader_rejects_a_non_finite_tensor(tmp_path, dtype):
    path = tmp_path / "w.safetensors"
    bad = torch.ones(3, 5)
    bad[2, 1] = float("nan")
    save_file({"a.weight": torch.ones(2, 2).to(dtype), "b.weight": bad.to(dtype), "ids": torch.arange(4)}, str(path))
    header = read_safetensors_header(path)["b.weight"].dtype
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"{path}: tensor 'b.weight' {header}[3, 5] holds non-finite values (1 of 15 values are NaN, the first at [2, 1]); "
            "the file is corrupt or was saved from a diverged model"
        ),
    ):
        dict(iter_shard_tensors(path))
    assert set(dict(iter_shard_tensors(path, ("a.weight", "ids")))) == {"a.weight", "ids"}  # only what is read is checked


def test_nan_base_tensor_is_named_on_load(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    name = "visual.merger.mlp.0.weight"
    shard = _rewrite(src, lambda t: t[name].fill_(float("nan")))
    list_checkpoint_files(src)  # headers alone cannot tell
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"{shard}: tensor '{name}' BF16[128, 128] holds non-finite values (16384 of 16384 values are NaN, the first at [0, 0])"),
    ):
        TorchEncoder.from_pretrained(src)
