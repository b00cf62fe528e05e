"""bitsandbytes int8 / nf4 on the merged tiny model: which layers, storage, parity with the reference.

bitsandbytes 0.50 (pinned in constraints.txt) ships a CPU library, so these run here; the same bodies
run on CUDA where there is a GPU.
"""

import sys

import pytest
import torch
from torch import nn

import jev4.runtime as rt
from jev4.errors import MissingDependencyError
from jev4.model.config import load_config
from jev4.model.network import build_network
from jev4.runtime.layer_select import select_linears
from jev4.runtime.torch_bnb import BnbSettings, quantize_model_bnb
from jev4.runtime.torch_fp8 import QuantizationError

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -c constraints.txt bitsandbytes)")

TASKS = ["retrieval", "text-matching", "code"]
TEXTS = [
    "What is the capital of France?",
    "Paris is the capital of France. " * 20,
    "x",
    "def f(a): return a * 2",
    "import os\nfor name in os.listdir('.'):\n    print(name.upper())\n" * 4,
]
# scheme -> (single-vector mean, single min, per-token mean) lower bounds. Measured on the tiny model (CPU):
# int8 ~0.9999 everywhere; nf4 single mean ~0.988, token mean ~0.991 (4-bit weights on random, non-Gaussian-trained weights).
BARS = {"bnb-int8": (0.9995, 0.999, 0.9995), "bnb-nf4": (0.98, 0.97, 0.98)}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine; runs on the GPU host")]),
]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _random_tiny_network(source):
    net = build_network(load_config(source))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return net


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization", ["bnb-int8", "bnb-nf4"])
@pytest.mark.parametrize("task", TASKS)
def test_bnb_encoder_matches_reference(runtime_source, runtime_reference, quantization, task, device, record_property):
    dtype = "bf16" if device == "cuda" else "fp32"
    enc = rt.load(runtime_source, backend="torch", quantization=quantization, task=task, device=device, dtype=dtype)
    single = _cos(enc.encode_text(TEXTS, task=task), runtime_reference.encode_text(TEXTS, task=task))
    got = enc.encode_text(TEXTS, task=task, return_multivector=True)
    ref = runtime_reference.encode_text(TEXTS, task=task, return_multivector=True)
    tokens = torch.cat([_cos(g, r) for g, r in zip(got, ref)])
    print(f"{quantization} {device} {dtype} {task}: single mean {single.mean():.5f} min {single.min():.5f}, token mean {tokens.mean():.5f} min {tokens.min():.5f}")
    record_property(f"{quantization}_{device}_{task}_single_mean", single.mean().item())
    record_property(f"{quantization}_{device}_{task}_token_mean", tokens.mean().item())
    mean_bar, min_bar, token_bar = BARS[quantization]
    assert single.mean() >= mean_bar and single.min() >= min_bar and tokens.mean() >= token_bar
    assert single.mean() < 1 - 1e-7  # the weights really were quantized


@pytest.mark.parametrize("scheme, layer_type, storage, ratio", [("int8", "Linear8bitLt", torch.int8, 1 / 4), ("nf4", "Linear4bit", torch.uint8, 1 / 8)])
def test_replaces_the_same_layers_as_fp8(runtime_source, scheme, layer_type, storage, ratio):
    net = _random_tiny_network(runtime_source)
    expected, _ = select_linears(net)
    fp32_bytes = sum(net.get_submodule(n).weight.numel() * 4 for n in expected)
    before = {name for name, m in net.named_modules() if type(m) is nn.Linear}
    selection = quantize_model_bnb(net, BnbSettings(scheme=scheme))
    assert list(selection.chosen) == expected
    for name in expected:
        module = net.get_submodule(name)
        assert type(module).__name__ == layer_type and module.weight.dtype == storage, name
    assert {name for name, m in net.named_modules() if type(m) is nn.Linear} == before - set(expected)
    quant_bytes = sum(net.get_submodule(n).weight.numel() * net.get_submodule(n).weight.element_size() for n in expected)
    assert quant_bytes == pytest.approx(fp32_bytes * ratio)  # int8: 1 byte per weight; nf4: 2 weights per byte


def test_settings_are_validated():
    with pytest.raises(QuantizationError, match="unknown bitsandbytes scheme"):
        BnbSettings(scheme="fp4")
    with pytest.raises(QuantizationError, match="nf4_blocksize"):
        BnbSettings(scheme="nf4", nf4_blocksize=48)
    assert BnbSettings(scheme="nf4").to_json()["scheme"] == "bnb-nf4"


def test_missing_bitsandbytes_names_the_install(monkeypatch, runtime_source):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        quantize_model_bnb(_random_tiny_network(runtime_source))
