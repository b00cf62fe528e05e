"""The multi-task adapter: its tensors decide what is adapted, and each must fit a base Linear."""

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jev4.errors import AdapterError, CheckpointError, TaskError
from jev4.model.adapters import load_adapters
from jev4.model.checkpoint import list_checkpoint_files
from jev4.model.config import load_config
from jev4.model.encoder import TorchEncoder
from jev4.model.lora import MultiTaskLoRALinear, TaskSelector
from jev4.model.network import attach_adapters, build_network, load_base_weights
from jev4.model.tiny import write_tiny_checkpoint

TASKS = ("retrieval", "text-matching", "code")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPECTED_MODULES = {f"model.language_model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS} | {"multi_vector_projector"}
# [out, in] of each adapted Linear in the tiny model (hidden 64, kv 2 x head 16, intermediate 128, projector 32)
SHAPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}


@pytest.fixture(scope="module")
def adapters(tiny_dir):
    return load_adapters(tiny_dir / "adapters", TASKS)


def _shape(module):
    return (32, 64) if module == "multi_vector_projector" else SHAPES[module.split(".", 4)[4]]


def test_load_tiny_adapter(adapters, tiny_dir):
    assert adapters.tasks == TASKS
    assert set(adapters.modules) == EXPECTED_MODULES and len(adapters.modules) == 2 * 7 + 1
    assert adapters.settings.r == 8 and adapters.settings.lora_alpha == 16 and not adapters.settings.use_rslora
    file = load_file(tiny_dir / "adapters" / "adapter_model.safetensors")
    for module, by_task in adapters.modules.items():
        assert set(by_task) == set(TASKS)
        n_out, n_in = _shape(module)
        for task, lora in by_task.items():
            assert lora.A.shape == (8, n_in) and lora.B.shape == (n_out, 8)
            assert lora.A.dtype == lora.B.dtype == torch.float32
            assert lora.scale == 16 / 8
            assert torch.equal(lora.A, file[f"base_model.model.{module}.lora_A.{task}.weight"])
            assert torch.equal(lora.B, file[f"base_model.model.{module}.lora_B.{task}.weight"])
            assert lora.B.abs().sum() > 0
    lora = adapters.modules["model.language_model.layers.1.mlp.down_proj"]["code"]
    torch.testing.assert_close(lora.delta(), 2.0 * lora.B @ lora.A)


def test_no_vision_module_is_adapted_even_if_the_regex_matches(adapters, tiny_dir):
    """target_modules would match the vision MLP's gate/up/down_proj; the tensors decide, and they don't."""
    cfg = json.loads((tiny_dir / "adapters" / "adapter_config.json").read_text())
    assert re.fullmatch(cfg["target_modules"], "model.visual.blocks.0.mlp.gate_proj")
    assert not any("visual" in m or "embed" in m for m in adapters.modules)


def test_for_task(adapters):
    code = adapters.for_task("code")
    assert set(code) == EXPECTED_MODULES
    assert code["multi_vector_projector"] is adapters.modules["multi_vector_projector"]["code"]
    with pytest.raises(TaskError, match=r"unknown task 'qa'; the adapter has \['retrieval', 'text-matching', 'code'\]"):
        adapters.for_task("qa")


def _adapter_copy(tiny_dir, tmp_path):
    dst = tmp_path / "adapters"
    shutil.copytree(tiny_dir / "adapters", dst)
    return dst


def _edit_config(dst, **changes):
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("r, alpha", [(8, 16), (8, 8), (8, 32)])
def test_scale_is_alpha_over_r(tiny_dir, tmp_path, r, alpha):
    dst = _adapter_copy(tiny_dir, tmp_path)
    _edit_config(dst, lora_alpha=alpha)
    for by_task in load_adapters(dst, TASKS).modules.values():
        assert {lo.scale for lo in by_task.values()} == {alpha / r}


def test_rslora_scale(tiny_dir, tmp_path):
    dst = _adapter_copy(tiny_dir, tmp_path)
    _edit_config(dst, use_rslora=True)
    loaded = load_adapters(dst, TASKS)
    assert loaded.settings.use_rslora
    for by_task in loaded.modules.values():
        for lora in by_task.values():
            assert lora.scale == pytest.approx(16 / math.sqrt(8))


def test_rslora_changes_outputs_by_the_scale(tiny_dir, tmp_path, encoder):
    """rsLoRA scales by alpha/sqrt(r): outputs equal plain LoRA with lora_alpha = alpha * r / sqrt(r), and differ from alpha/r."""
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    _edit_config(src / "adapters", use_rslora=True)
    rs = TorchEncoder.from_pretrained(src)
    plain = shutil.copytree(tiny_dir, tmp_path / "plain")
    _edit_config(plain / "adapters", lora_alpha=16 * 8 / math.sqrt(8))  # alpha' / r == alpha / sqrt(r)
    same = TorchEncoder.from_pretrained(plain)
    texts = ["rank stabilised", "LoRA scaling"]
    assert (rs.encode_text(texts) - same.encode_text(texts)).abs().max() < 1e-5
    assert (rs.encode_text(texts) - encoder.encode_text(texts)).abs().max() > 1e-3


def test_old_adapter_names_load_to_identical_tensors(tmp_path, adapters):
    old = write_tiny_checkpoint(tmp_path / "old", seed=0, adapter_layout="old")
    keys = load_file(old / "adapters" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.retrieval.weight" in keys
    assert not any(".language_model." in k for k in keys)
    loaded = load_adapters(old / "adapters", TASKS)
    assert loaded.modules.keys() == adapters.modules.keys()
    for module, by_task in loaded.modules.items():
        for task, lora in by_task.items():
            ref = adapters.modules[module][task]
            assert torch.equal(lora.A, ref.A) and torch.equal(lora.B, ref.B) and lora.scale == ref.scale


def test_bf16_adapter_loads(tmp_path, adapters):
    bf16 = write_tiny_checkpoint(tmp_path / "bf16", seed=0, adapter_dtype="bf16")
    file = load_file(bf16 / "adapters" / "adapter_model.safetensors")
    assert {t.dtype for t in file.values()} == {torch.bfloat16}
    loaded = load_adapters(bf16 / "adapters", TASKS)
    assert loaded.modules.keys() == adapters.modules.keys()
    for module, by_task in loaded.modules.items():
        for task, lora in by_task.items():
            ref = adapters.modules[module][task]
            assert lora.A.dtype == torch.float32  # kept in fp32 after loading
            assert torch.equal(lora.A, ref.A.bfloat16().float()) and torch.equal(lora.B, ref.B.bfloat16().float())
    enc = TorchEncoder.from_pretrained(bf16)
    assert enc.encode_text(["bf16 adapter"]).shape == (1, 64)


def _edit_adapter(tiny_dir, tmp_path, edit):
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    path = src / "adapters" / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))
    return src


def test_missing_adapters_dir(tiny_dir, tmp_path):
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    shutil.rmtree(src / "adapters")
    with pytest.raises(AdapterError, match=re.escape(f"{src / 'adapters'}: no adapter directory")):
        TorchEncoder.from_pretrained(src)
    with pytest.raises(AdapterError, match="no adapter directory"):
        load_adapters(src / "adapters", TASKS)


def test_missing_adapter_files(tiny_dir, tmp_path):
    dst = _adapter_copy(tiny_dir, tmp_path)
    (dst / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=re.escape(f"{dst / 'adapter_model.safetensors'}: not found")):
        load_adapters(dst, TASKS)
    (dst / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=re.escape(f"{dst / 'adapter_config.json'}: not found")):
        load_adapters(dst, TASKS)


@pytest.mark.parametrize(
    "changes, message",
    [({"use_dora": True}, "DoRA"), ({"bias": "all"}, "biases"), ({"rank_pattern": {"q_proj": 4}}, "rank_pattern")],
)
def test_unsupported_adapter_configs(tiny_dir, tmp_path, changes, message):
    dst = _adapter_copy(tiny_dir, tmp_path)
    _edit_config(dst, **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapters(dst, TASKS)


@pytest.mark.parametrize("content, kind", [("[1]", "list"), ('"r"', "str"), ("16", "int"), ("null", "NoneType")])
def test_adapter_config_that_is_not_an_object(tiny_dir, tmp_path, content, kind):
    dst = _adapter_copy(tiny_dir, tmp_path)
    (dst / "adapter_config.json").write_text(content)
    with pytest.raises(AdapterError, match=re.escape(f"{dst / 'adapter_config.json'}: must be a JSON object (PEFT's LoraConfig), got {kind}")):
        load_adapters(dst, TASKS)


def test_adapter_config_with_binary_bytes(tiny_dir, tmp_path):
    dst = _adapter_copy(tiny_dir, tmp_path)
    (dst / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AdapterError, match=re.escape(f"{dst / 'adapter_config.json'}: not valid JSON")):
        load_adapters(dst, TASKS)


def test_task_not_in_task_names(tiny_dir, tmp_path):
    src = _edit_adapter(
        tiny_dir, tmp_path, lambda t: t.update({k.replace(".code.", ".summarize."): v.clone() for k, v in t.items() if ".code." in k})
    )
    with pytest.raises(AdapterError, match=r"task 'summarize', not one of config task_names \['retrieval', 'text-matching', 'code'\]"):
        TorchEncoder.from_pretrained(src)


def test_task_names_without_adapter_weights(tiny_dir):
    with pytest.raises(AdapterError, match=r"has no LoRA weights for task\(s\) \['qa'\]"):
        load_adapters(tiny_dir / "adapters", (*TASKS, "qa"))


def test_shape_mismatch(tiny_dir, tmp_path):
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.retrieval.weight"
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.update({key: torch.zeros(32, 8)}))
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.q_proj\.lora_A/B\.retrieval has shape A\(8, 64\) B\(32, 8\), but the base Linear is \[out=64, in=64\]"):
        TorchEncoder.from_pretrained(src)


def test_shape_mismatch_via_attach_adapters(tiny_dir, tmp_path):
    key = "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_A.code.weight"
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.update({key: torch.zeros(8, 64)}))
    config = load_config(src)
    adapters = load_adapters(src / "adapters", config.task_names)  # the file alone is consistent
    net = build_network(config)
    with pytest.raises(AdapterError, match=r"layers\.1\.mlp\.down_proj\.lora_A/B\.code .*\[out=64, in=128\]"):
        attach_adapters(net, adapters)


def test_rank_mismatch_between_a_and_b(tiny_dir, tmp_path):
    key = "base_model.model.multi_vector_projector.lora_B.code.weight"
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.update({key: torch.zeros(32, 4)}))
    with pytest.raises(AdapterError, match=r"multi_vector_projector\.code: lora_A \(8, 64\) and lora_B \(32, 4\) disagree on the rank"):
        load_adapters(src / "adapters", TASKS)


def test_non_linear_module(tiny_dir, tmp_path):
    def add_embed_lora(t):
        for task in TASKS:
            t[f"base_model.model.model.language_model.embed_tokens.lora_A.{task}.weight"] = torch.zeros(8, 64)
            t[f"base_model.model.model.language_model.embed_tokens.lora_B.{task}.weight"] = torch.zeros(640, 8)

    src = _edit_adapter(tiny_dir, tmp_path, add_embed_lora)
    with pytest.raises(AdapterError, match=r"adapter tensors for 'model\.language_model\.embed_tokens', which is not a Linear layer"):
        TorchEncoder.from_pretrained(src)


def test_not_a_lora_key(tiny_dir, tmp_path):
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.update({"base_model.model.multi_vector_projector.weight": torch.zeros(32, 64)}))
    with pytest.raises(AdapterError, match=r"tensor 'base_model\.model\.multi_vector_projector\.weight' is not a LoRA weight"):
        load_adapters(src / "adapters", TASKS)


def test_a_without_b(tiny_dir, tmp_path):
    key = "base_model.model.multi_vector_projector.lora_B.code.weight"
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=r"multi_vector_projector\.code has lora_A but not both A and B"):
        TorchEncoder.from_pretrained(src)


def test_both_key_spellings_in_one_file(tiny_dir, tmp_path):
    key = "base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.code.weight"
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.update({key.replace(".language_model.", "."): t[key].clone()}))
    with pytest.raises(AdapterError, match="appears twice"):
        load_adapters(src / "adapters", TASKS)


def test_attach_wraps_exactly_the_adapted_modules(tiny_dir, adapters):
    config = load_config(tiny_dir)
    net = build_network(config)
    load_base_weights(net, list_checkpoint_files(tiny_dir))
    selector = attach_adapters(net, adapters)
    assert selector.tasks == TASKS
    wrapped = {name for name, m in net.named_modules() if isinstance(m, MultiTaskLoRALinear)}
    assert wrapped == EXPECTED_MODULES


def test_multitask_lora_linear_math(adapters):
    """base(x) + scale_t * x A_t^T B_t^T, chosen per sample; outside select() it refuses to run."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 128)
    module = "model.language_model.layers.0.mlp.up_proj"
    selector = TaskSelector(TASKS)
    layer = MultiTaskLoRALinear(base, adapters.modules[module], selector)
    x = torch.randn(3, 5, 64)
    labels = ["code", "retrieval", "code"]
    with torch.no_grad(), selector.select(labels):
        got = layer(x)
    with torch.no_grad():
        for i, task in enumerate(labels):
            lora = adapters.modules[module][task]
            expected = base(x[i]) + 2.0 * (x[i] @ lora.A.T @ lora.B.T)
            torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)
            # merged weights give the same
            torch.testing.assert_close(got[i], x[i] @ (base.weight + lora.delta()).T + base.bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="outside TaskSelector.select"):
        layer(x)
    with pytest.raises(TaskError, match=r"unknown task\(s\) \['qa'\]; known tasks are \['retrieval', 'text-matching', 'code'\]"):
        with selector.select(["qa"]):
            pass


A_KEY = "base_model.model.{module}.lora_A.{task}.weight"
B_KEY = "base_model.model.{module}.lora_B.{task}.weight"


def _rank_message(dst, module, task, rank, r):
    """The exact error for a module/task whose tensors have ``rank`` while the config says ``r``."""
    n_out, n_in = _shape(module)
    a, b = A_KEY.format(module=module, task=task), B_KEY.format(module=module, task=task)
    return re.escape(
        f"{dst / 'adapter_model.safetensors'}: tensors '{a}' {(rank, n_in)} and '{b}' {(n_out, rank)} have rank {rank}, "
        f"but {dst / 'adapter_config.json'} says r={r} (PEFT scales by lora_alpha/r, so the two must agree)"
    )


def test_config_rank_above_the_tensors(tiny_dir, tmp_path):
    """r=16 in the config, rank-8 tensors: PEFT would refuse to load them; jev4 must not merge with alpha/16."""
    src = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    dst = src / "adapters"
    _edit_config(dst, r=16)
    first = sorted(EXPECTED_MODULES)[0]
    with pytest.raises(AdapterError, match=_rank_message(dst, first, "retrieval", 8, 16)):
        load_adapters(dst, TASKS)
    with pytest.raises(AdapterError, match="have rank 8, but .* says r=16"):
        TorchEncoder.from_pretrained(src)


def test_tensors_cut_below_the_config_rank(tiny_dir, tmp_path):
    """Every tensor cut to rank 4 (A and B agree with each other) while the config keeps r=8."""

    def cut(t):
        for key, value in t.items():
            t[key] = (value[:4] if ".lora_A." in key else value[:, :4]).contiguous()

    src = _edit_adapter(tiny_dir, tmp_path, cut)
    dst = src / "adapters"
    with pytest.raises(AdapterError, match=_rank_message(dst, sorted(EXPECTED_MODULES)[0], "retrieval", 4, 8)):
        load_adapters(dst, TASKS)
    _edit_config(dst, r=4)  # config and tensors agree again: loads, scaled by alpha / 4 as PEFT would
    for by_task in load_adapters(dst, TASKS).modules.values():
        assert {lo.scale for lo in by_task.values()} == {16 / 4}


def test_one_module_cut_below_the_config_rank_is_named(tiny_dir, tmp_path):
    module, task = "model.language_model.layers.1.mlp.up_proj", "code"
    a, b = A_KEY.format(module=module, task=task), B_KEY.format(module=module, task=task)
    src = _edit_adapter(tiny_dir, tmp_path, lambda t: t.update({a: t[a][:6].contiguous(), b: t[b][:, :6].contiguous()}))
    with pytest.raises(AdapterError, match=_rank_message(src / "adapters", module, task, 6, 8)):
        load_adapters(src / "adapters", TASKS)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": 0}, "'r' must be a positive integer, got 0"),
        ({"r": 8.5}, "'r' must be a positive integer, got 8.5"),
        ({"r": "8"}, "'r' must be a positive integer, got '8'"),
        ({"r": True}, "'r' must be a positive integer, got True"),
        ({"r": None}, "'r' must be a positive integer, got None"),
        ({"lora_alpha": "16"}, "'lora_alpha' must be a finite number, got '16'"),
        ({"lora_alpha": float("inf")}, "'lora_alpha' must be a finite number, got inf"),
    ],
)
def test_bad_r_or_alpha(tiny_dir, tmp_path, changes, message):
    dst = _adapter_copy(tiny_dir, tmp_path)
    _edit_config(dst, **changes)
    with pytest.raises(AdapterError, match=re.escape(f"{dst / 'adapter_config.json'}: {message}")):
        load_adapters(dst, TASKS)


def test_non_finite_adapter_tensor_is_named(tiny_dir, tmp_path):
    key = B_KEY.format(module="model.language_model.layers.0.self_attn.v_proj", task="text-matching")

    def poison(t):
        t[key][3, 5] = float("inf")

    src = _edit_adapter(tiny_dir, tmp_path, poison)
    weights = src / "adapters" / "adapter_model.safetensors"
    message = re.escape(f"{weights}: tensor '{key}' F32[32, 8] holds non-finite values (1 of 256 values are inf, the first at [3, 5])")
    with pytest.raises(CheckpointError, match=message):
        load_adapters(src / "adapters", TASKS)
    with pytest.raises(CheckpointError, match=message):
        TorchEncoder.from_pretrained(src)
