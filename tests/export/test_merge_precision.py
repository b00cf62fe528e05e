"""Merge precision and LoRA semantics against independent references.

- A bf16 merge must be upstream's: ``W + s * B @ A`` computed in fp32, cast
  to bf16 once. Adding a bf16-rounded delta to a bf16 weight rounds twice and
  puts a sizeable share of adapted weights one ulp off; these tests compare
  bit for bit, on the streamed merge and on the in-memory one the exporters use.
- jev4's unmerged LoRA layer, its scale and its merged weight are compared
  with PEFT itself (a ``LoraModel`` on a small Linear with the same A/B and
  the adapter's own r / lora_alpha / use_rslora).
"""

import json

import pytest
import torch
from torch import nn

from jev4.export.merge import MergeSettings, merge_checkpoint, merge_into_network, plan_merge
from jev4.model.adapters import LoraSettings, load_adapters
from jev4.model.checkpoint import canonical_name, iter_shard_tensors, list_checkpoint_files
from jev4.model.lora import MultiTaskLoRALinear, TaskSelector
from jev4.model.network import build_network, load_base_weights

TASKS = ("retrieval", "text-matching", "code")


def _weights(path):
    return {canonical_name(n): t for p, names in list_checkpoint_files(path).shards for n, t in iter_shard_tensors(p, names)}


def _fp32_then_cast(weight, lora):
    """Upstream's merge, written out: everything in fp32, one rounding to bf16 at the end."""
    return (weight.float() + lora.scale * (lora.B.float() @ lora.A.float())).to(torch.bfloat16)


@pytest.fixture(scope="module")
def merged_code_fp32(tmp_path_factory, merge_source):
    out = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="code", out=str(tmp_path_factory.mktemp("m32") / "m"), dtype="fp32"), progress=False)
    return _weights(out)


@pytest.fixture(scope="module")
def code_loras(merge_source):
    return load_adapters(merge_source / "adapters", TASKS).for_task("code")


def _check_bf16_merge(before, after, loras):
    """Every adapted weight equals the fp32 merge cast once, bit for bit; every other tensor is untouched."""
    wrong_if_bf16 = total = 0
    for name, tensor in before.items():
        module = name.removesuffix(".weight")
        if module not in loras:
            assert torch.equal(after[name], tensor), name
            continue
        expected = _fp32_then_cast(tensor, loras[module])
        assert after[name].dtype == torch.bfloat16, name
        assert torch.equal(after[name].view(torch.int16), expected.view(torch.int16)), name
        # The check can tell: adding a bf16 delta to the bf16 weight (two roundings) gives other bits.
        twice_rounded = tensor.to(torch.bfloat16) + (loras[module].scale * (loras[module].B.float() @ loras[module].A.float())).to(torch.bfloat16)
        wrong_if_bf16 += int((twice_rounded != expected).sum())
        total += expected.numel()
    assert total > 0 and wrong_if_bf16 / total > 0.05, (wrong_if_bf16, total)


def test_streamed_bf16_merge_is_the_fp32_merge_cast_once(tmp_path, merge_source, code_loras):
    before = _weights(merge_source)
    assert {t.dtype for t in before.values()} == {torch.bfloat16}  # the source is bf16, as upstream's checkpoint
    out = merge_checkpoint(MergeSettings(model=str(merge_source), adapter="code", out=str(tmp_path / "m"), dtype="bf16"), progress=False)
    after = _weights(out)
    assert set(after) == set(before)
    _check_bf16_merge(before, after, code_loras)


def test_in_memory_bf16_merge_is_the_fp32_merge_cast_once(merge_source, code_loras):
    plan = plan_merge(MergeSettings(model=str(merge_source), adapter="code", out=str(merge_source.parent / "unused")))
    network = build_network(plan.config, torch.bfloat16)
    load_base_weights(network, plan.files)
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    assert merge_into_network(network, plan.loras) == len(code_loras)
    after = {name: p.detach() for name, p in network.named_parameters()}
    _check_bf16_merge(before, after, code_loras)


# --------------------------------------------------------------------------- PEFT as the reference


class _One(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.lin = linear

    def forward(self, x):
        return self.lin(x)


def _peft_layer(weight, bias, lora, settings):
    """PEFT's LoraModel over one Linear holding ``weight``, with ``lora``'s A/B and the adapter's r / alpha / rsLoRA."""
    from peft import LoraConfig, get_peft_model

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.float())
    config = LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, use_rslora=settings.use_rslora, target_modules=["lin"], lora_dropout=0.0)
    model = get_peft_model(_One(linear), config).eval()
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora.A.float())
        layer.lora_B["default"].weight.copy_(lora.B.float())
    return model, layer


def _adapter_settings(merge_source):
    cfg = json.loads((merge_source / "adapters" / "adapter_config.json").read_text())
    return LoraSettings(r=cfg["r"], lora_alpha=float(cfg["lora_alpha"]), use_rslora=bool(cfg["use_rslora"]))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scale_is_peft_scaling(merge_source, use_rslora):
    settings = _adapter_settings(merge_source)
    settings = LoraSettings(r=settings.r, lora_alpha=settings.lora_alpha, use_rslora=use_rslora)
    lora = next(iter(load_adapters(merge_source / "adapters", TASKS).for_task("code").values()))
    _, layer = _peft_layer(torch.zeros(lora.B.shape[0], lora.A.shape[1]), None, lora, settings)
    assert layer.scaling["default"] == pytest.approx(settings.scale, rel=1e-12)
    assert settings.scale == pytest.approx(settings.lora_alpha / (settings.r**0.5 if use_rslora else settings.r), rel=1e-12)


@pytest.mark.parametrize("module", ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.mlp.down_proj", "multi_vector_projector"])
def test_lora_layer_and_merge_equal_peft(merge_source, merged_code_fp32, module):
    settings = _adapter_settings(merge_source)
    adapters = load_adapters(merge_source / "adapters", TASKS)
    assert adapters.settings == settings
    base = _weights(merge_source)
    weight, bias = base[f"{module}.weight"].float(), base.get(f"{module}.bias")
    x = torch.randn(5, 7, weight.shape[1], generator=torch.Generator().manual_seed(0))
    selector = TaskSelector(TASKS)
    for task in TASKS:
        lora = adapters.modules[module][task]
        peft_model, _ = _peft_layer(weight, bias, lora, settings)
        with torch.no_grad():
            expected = peft_model(x)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.float())
        jev4_layer = MultiTaskLoRALinear(linear, adapters.modules[module], selector)
        with torch.no_grad(), selector.select([task] * x.shape[0]):
            got = jev4_layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        # A mixed batch takes the gathered path: each sample as PEFT computes it for its own task.
        mixed = [TASKS[i % len(TASKS)] for i in range(x.shape[0])]
        with torch.no_grad(), selector.select(mixed):
            got_mixed = jev4_layer(x)
        rows = [i for i, t in enumerate(mixed) if t == task]
        torch.testing.assert_close(got_mixed[rows], expected[rows], rtol=1e-6, atol=1e-6)
        if task == "code":  # jev4's merged fp32 checkpoint holds PEFT's merged weight
            peft_merged = peft_model.merge_and_unload().lin.weight.detach()
            torch.testing.assert_close(merged_code_fp32[f"{module}.weight"], peft_merged, rtol=1e-6, atol=1e-7)
            assert not torch.equal(peft_merged, weight)  # the adapter does change this weight
