"""The torch FP8 path: FP8Linear numerics, which layers get replaced, encoder parity, the GPU capability check.

CPU runs real ``torch._scaled_mm`` FP8 GEMMs (slowly), so everything but
speed is checked here; the same parity bodies run on CUDA where there is one.
Measured numbers are printed (``pytest -s``) and attached as user properties.
"""


import pytest
import torch
from torch import nn

import jev4.runtime as rt
from jev4.errors import AdapterError, Jev4Error, ProviderError, TaskError
from jev4.model.config import load_config
from jev4.model.network import build_network
from jev4.model.tiny import ADAPTED_PROJECTIONS
from jev4.runtime.layer_select import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from jev4.runtime.torch_fp8 import (
    FP8Linear,
    FP8Settings,
    GPUCapabilityError,
    InputQuantizer,
    QuantizationError,
    check_fp8_device,
    quantize_activation,
    quantize_model_fp8,
    quantize_weight,
)
from jev4.runtime.torch_quantized import QuantizedTorchEncoder, load_quantized

TASKS = ["retrieval", "text-matching", "code"]
TEXTS = [
    "What is the capital of France?",
    "Paris is the capital of France. " * 20,
    "x",
    "def f(a): return a * 2",
    "import os\nfor name in os.listdir('.'):\n    print(name.upper())\n" * 4,
    "Le chat est sur la table; die Katze schläft.",
]
# Documented bound for one FP8 linear vs fp32 on Gaussian data (measured ~3.7%).
FP8_LINEAR_REL_ERROR = 0.06

cuda_only = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine; runs on the GPU host"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _gaussian_linear(k, n, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen) * 0.02)
    return lin


# ---------------------------------------------------------------- FP8Linear


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, n", [(64, 48), (512, 256)])
def test_fp8_linear_vs_fp32_linear(granularity, dtype, k, n, record_property):
    lin = _gaussian_linear(k, n)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(1))
    exact = lin(x).detach()
    fp8 = FP8Linear.from_linear(lin.to(dtype), granularity)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.shape == (n, k)
    got = fp8(x.to(dtype))
    assert got.dtype == dtype and got.shape == (37, n)
    rel = _rel(got, exact)
    record_property(f"fp8_linear_rel_error_{granularity}_{k}x{n}", rel)
    assert 0.005 < rel < FP8_LINEAR_REL_ERROR, rel  # > 0.005: it really went through 8-bit values
    assert _cos(got, exact).min() > 0.995

    # The GEMM computes exactly dequant(x_q) @ dequant(W_q)^T + b (up to output rounding).
    xq, x_scale = quantize_activation(x.to(dtype), granularity)
    emulated = (xq.float() * x_scale) @ fp8.dequantized_weight().T + fp8.bias.float()
    assert _rel(got, emulated) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_row_scales_isolate_outlier_channels():
    """One output channel 10^5 times larger: per-tensor scales push the others into E4M3's subnormals."""
    lin = _gaussian_linear(256, 64)
    with torch.no_grad():
        lin.weight[0] *= 1e5
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    exact = lin(x).detach()[:, 1:]
    row = _rel(FP8Linear.from_linear(lin, "row")(x)[:, 1:], exact)
    tensor = _rel(FP8Linear.from_linear(lin, "tensor")(x)[:, 1:], exact)
    assert row < FP8_LINEAR_REL_ERROR
    assert tensor > 3 * row


def test_per_token_activation_scales():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    x[2] *= 1000
    xq, scale = quantize_activation(x, "row")
    assert scale.shape == (4, 1) and scale.dtype == torch.float32 and xq.is_contiguous()
    assert torch.allclose(xq.float().abs().amax(dim=1), torch.full((4,), 448.0))  # each token's max maps to 448
    assert _rel(xq.float() * scale, x) < 0.05
    xq, scale = quantize_activation(x, "tensor")
    assert scale.numel() == 1 and xq.float().abs().max() == 448.0
    zero_q, zero_scale = quantize_activation(torch.zeros(2, 32), "row")  # an all-zero token stays finite
    assert torch.isfinite(zero_scale).all() and (zero_q.float() == 0).all()


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_meets_scaled_mm_cuda_rules_without_a_gpu(granularity):
    """torch's meta kernel for _scaled_mm applies the CUDA rules (row-major x, column-major W^T, K and N
    multiples of 16, float32 scales of shape [M, 1] / [1, N] or scalars) to fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for k, n in ((2048, 256), (11008, 2048)):  # jina-embeddings-v4's shapes
            weight, scale = quantize_weight(torch.empty(n, k, device="cuda", dtype=torch.bfloat16), granularity)
            layer = FP8Linear(weight, scale, torch.empty(n, device="cuda", dtype=torch.bfloat16), torch.bfloat16, granularity, True)
            x = torch.empty(5, 3, k, device="cuda", dtype=torch.bfloat16)
            out = layer(x)
            assert out.shape == (5, 3, n) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
            assert layer(x.transpose(0, 1)).shape == (3, 5, n)  # a non-contiguous input is made row-major
        odd_weight, odd_scale = quantize_weight(torch.empty(40, 24, device="cuda", dtype=torch.bfloat16), granularity)
        odd = FP8Linear(odd_weight, odd_scale, None, torch.bfloat16, granularity, True)
        with pytest.raises(RuntimeError, match="divisible by 16"):  # why quantize_model_fp8 skips such layers
            odd(torch.empty(4, 24, device="cuda", dtype=torch.bfloat16))


def test_fp8_linear_keeps_leading_dims_and_no_bias():
    lin = _gaussian_linear(32, 16, bias=False)
    fp8 = FP8Linear.from_linear(lin)
    x = torch.randn(2, 5, 32)
    out = fp8(x)
    assert out.shape == (2, 5, 16) and fp8.bias is None
    assert _rel(out, lin(x).detach()) < FP8_LINEAR_REL_ERROR
    with pytest.raises(RuntimeError, match="expects 32 input features"):
        fp8(torch.randn(3, 31))


def test_settings_are_validated():
    with pytest.raises(QuantizationError, match="granularity"):
        FP8Settings(granularity="block")
    with pytest.raises(QuantizationError, match="tuple of glob patterns"):
        FP8Settings(exclude="*norm*")
    data = FP8Settings().to_json()
    assert data["scheme"] == "fp8-e4m3" and data["granularity"] == "row" and data["version"] == 2


# ---------------------------------------------------------------- which layers


def _random_tiny_network(source):
    net = build_network(load_config(source))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return net


def test_replaces_exactly_the_language_model_linears(runtime_source):
    net = _random_tiny_network(runtime_source)
    before = {name for name, m in net.named_modules() if type(m) is nn.Linear}
    layers = load_config(runtime_source).num_hidden_layers
    expected = {f"model.language_model.layers.{i}.{proj}" for i in range(layers) for proj in ADAPTED_PROJECTIONS}
    selection = quantize_model_fp8(net)
    assert set(selection.chosen) == expected and selection.skipped == {}
    for name, module in net.named_modules():
        if name in expected:
            assert isinstance(module, FP8Linear), name
    untouched = {name for name, m in net.named_modules() if type(m) is nn.Linear}
    assert untouched == before - expected
    assert "multi_vector_projector" in untouched
    assert any(n.startswith("model.visual.") for n in untouched)
    assert not any(isinstance(m, FP8Linear) for n, m in net.named_modules() if n.startswith("model.visual") or "projector" in n)
    assert type(net.model.language_model.embed_tokens) is nn.Embedding


def test_siblings_share_one_quantization_of_their_input(runtime_source):
    """q/k/v (and gate/up) quantize the same hidden states once; the result is the same as quantizing per layer."""
    from jev4.model.preprocess import text_position_ids

    shared, separate = _random_tiny_network(runtime_source), _random_tiny_network(runtime_source)
    quantize_model_fp8(shared)
    quantize_model_fp8(separate, FP8Settings(share_input_quantization=False))
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = shared(input_ids=ids, attention_mask=mask, position_ids=text_position_ids(mask)).hidden
        b = separate(input_ids=ids, attention_mask=mask, position_ids=text_position_ids(mask)).hidden
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    layers = shared.model.language_model.layers
    quantizer = layers[0].self_attn.q_proj.quantizer
    assert all(m.quantizer is quantizer for m in shared.modules() if isinstance(m, FP8Linear))
    # per layer and forward: k and v reuse q's input, up reuses gate's; o and down have inputs of their own
    assert quantizer.hits == 3 * len(layers)
    assert quantizer._key is None and quantizer._value is None  # nothing held once the forward returned
    assert separate.model.language_model.layers[0].self_attn.q_proj.quantizer.hits == 0


def test_shared_quantization_sees_in_place_changes():
    """The same tensor object changed in place is quantized again (the version counter is part of the key)."""
    quantizer = InputQuantizer("row")
    x = torch.randn(4, 32)
    first, first_scale = quantizer(x, torch.float32)
    x.add_(1.0)
    second, second_scale = quantizer(x, torch.float32)
    assert quantizer.hits == 0 and second is not first
    assert not (torch.equal(first.float(), second.float()) and torch.equal(first_scale, second_scale))
    third, _ = quantizer(x, torch.float32)
    assert quantizer.hits == 1 and third is second
    quantizer(x.clone(), torch.float32)  # equal values, another tensor: computed again
    assert quantizer.hits == 1


def test_same_layers_as_the_onnx_quantization_recipe(runtime_source):
    """The torch fast path and the ONNX Q/DQ export keep the same modules in float by default."""
    weights = pytest.importorskip("jev4.quant.weights")
    from jev4.quant.recipes import make_recipe

    net = _random_tiny_network(runtime_source)
    onnx_chosen, _ = weights.select_linears(net, make_recipe("fp8"))
    assert set(quantize_model_fp8(net).chosen) == set(onnx_chosen)


def test_patterns_can_be_overridden(runtime_source):
    net = _random_tiny_network(runtime_source)
    selection = quantize_model_fp8(net, FP8Settings(exclude=DEFAULT_EXCLUDE + ("*mlp*",)))
    assert selection.chosen and all(".self_attn." in n for n in selection.chosen)
    assert all(".mlp." in n for n in selection.excluded) and len(selection.excluded) == 3 * load_config(runtime_source).num_hidden_layers
    wide = _random_tiny_network(runtime_source)
    selection = quantize_model_fp8(wide, FP8Settings(include=DEFAULT_INCLUDE + ("multi_vector_projector",), exclude=()))
    assert "multi_vector_projector" in selection.chosen and isinstance(wide.multi_vector_projector, FP8Linear)
    with pytest.raises(QuantizationError, match="no nn.Linear layer matches"):
        quantize_model_fp8(_random_tiny_network(runtime_source), FP8Settings(include=("nothing.*",)))


def test_misaligned_layers_are_kept_and_reported():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.good = nn.Linear(32, 48)
            self.odd = nn.Linear(24, 40)

    net = nn.Module()
    net.model = nn.Module()
    net.model.language_model = nn.Module()
    net.model.language_model.layers = nn.ModuleList([Block()])
    selection = quantize_model_fp8(net)
    assert selection.chosen == ("model.language_model.layers.0.good",)
    assert "not a multiple of 16" in selection.skipped["model.language_model.layers.0.odd"]
    assert type(net.model.language_model.layers[0].odd) is nn.Linear


# ---------------------------------------------------------------- encoder parity


def _device_dtype(device):
    return ("bf16",) if device == "cuda" else ("fp32", "bf16")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("task", TASKS)
def test_fp8_encoder_matches_reference(runtime_source, runtime_reference, images, task, device, record_property):
    ref_single = runtime_reference.encode_text(TEXTS, task=task)
    ref_multi = runtime_reference.encode_text(TEXTS, task=task, return_multivector=True)
    ref_image = runtime_reference.encode_image(images, task=task)
    for dtype in _device_dtype(device):
        enc = rt.load(runtime_source, backend="torch", quantization="fp8", task=task, device=device, dtype=dtype)
        assert isinstance(enc, QuantizedTorchEncoder) and enc.tasks == (task,)
        assert sum(isinstance(m, FP8Linear) for m in enc.network.modules()) == len(enc.selection.chosen) > 0
        single = _cos(enc.encode_text(TEXTS, task=task), ref_single)
        tokens = torch.cat([_cos(g, r) for g, r in zip(enc.encode_text(TEXTS, task=task, return_multivector=True), ref_multi)])
        image = _cos(enc.encode_image(images, task=task), ref_image)
        numbers = {
            "single_mean": single.mean().item(),
            "single_min": single.min().item(),
            "token_mean": tokens.mean().item(),
            "image_mean": image.mean().item(),
        }
        print(f"fp8 {device} {dtype} {task}: " + ", ".join(f"{k} {v:.5f}" for k, v in numbers.items()))
        for key, value in numbers.items():
            record_property(f"{device}_{dtype}_{task}_{key}", value)
        assert numbers["single_mean"] >= 0.99
        assert numbers["single_min"] >= 0.98
        assert numbers["token_mean"] >= 0.98
        assert numbers["image_mean"] >= 0.98
        with pytest.raises(TaskError):
            enc.encode_text(["x"], task=next(t for t in TASKS if t != task))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_retrieval_ndcg_delta(runtime_source, runtime_reference, device, record_property):
    """The FP8 path ranks the built-in stdlib-code set as the reference does.

    The tiny random model retrieves near chance (reference nDCG@10 ~0.01), so
    an nDCG delta bound could not fail; what is checked is the ranking
    itself: the top-10 documents per query and the query x document scores.
    Measured on CPU: top-10 overlap 0.927, score correlation 0.9988.
    """
    import numpy as np

    from jev4.datasets import resolve_dataset
    from jev4.validate.metrics import retrieval_metrics, topk_overlap
    from jev4.validate.retrieval import encode_dataset

    dtype = "bf16" if device == "cuda" else "fp32"
    enc = rt.load(runtime_source, backend="torch", quantization="fp8", task="code", device=device, dtype=dtype)
    data = resolve_dataset("stdlib-code", max_queries=30, max_docs=100)
    scores = {}
    for name, encoder in (("reference", runtime_reference), ("fp8", enc)):
        encoded = encode_dataset(encoder, data, "code", False, 32, 128, False)
        scores[name] = encoded.queries @ encoded.documents.T
    overlap = topk_overlap(scores["reference"], scores["fp8"], k=10)
    correlation = float(np.corrcoef(scores["reference"].ravel(), scores["fp8"].ravel())[0, 1])
    ndcg = {name: retrieval_metrics(s, data.qrels)["ndcg@10"] for name, s in scores.items()}
    print(f"fp8 {device} stdlib-code: top-10 overlap {overlap:.3f}, score correlation {correlation:.5f}, nDCG@10 {ndcg['reference']:.4f} -> {ndcg['fp8']:.4f}")
    record_property(f"{device}_top10_overlap", overlap)
    assert overlap >= 0.85 and correlation >= 0.995


def test_merged_checkpoint_needs_no_task(tmp_path, runtime_source, runtime_reference):
    from jev4.export.merge import MergeSettings, merge_checkpoint

    merged = merge_checkpoint(MergeSettings(model=str(runtime_source), adapter="code", out=str(tmp_path / "m"), dtype="fp32"), progress=False)
    enc = load_quantized(merged, "fp8", dtype="fp32")
    assert enc.tasks == ("code",)
    assert _cos(enc.encode_text(TEXTS, task="code"), runtime_reference.encode_text(TEXTS, task="code")).mean() >= 0.99
    with pytest.raises(TaskError, match="merged in"):
        load_quantized(merged, "fp8", task="retrieval", dtype="fp32")
    with pytest.raises(AdapterError, match="cannot be applied on top"):
        load_quantized(merged, "fp8", dtype="fp32", adapter_dir=runtime_source / "adapters")


def test_loader_arguments_are_checked(runtime_source):
    with pytest.raises(TaskError, match="pass task="):
        rt.load(runtime_source, quantization="fp8")
    with pytest.raises(TaskError, match="unknown task"):
        rt.load(runtime_source, quantization="fp8", task="summarize")
    with pytest.raises(QuantizationError, match="unknown quantization"):
        rt.load(runtime_source, quantization="int3", task="code")


# ---------------------------------------------------------------- capability check


def _fake_cuda(monkeypatch, capability, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_capability_below_8_9_is_a_clear_error(monkeypatch, runtime_source):
    _fake_cuda(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(GPUCapabilityError) as info:
        check_fp8_device("cuda")
    message = str(info.value)
    assert "NVIDIA A100-SXM4-80GB" in message and "compute capability 8.0" in message and ">= 8.9" in message
    assert isinstance(info.value, Jev4Error)  # the CLI turns it into one line and exit code 2
    # The loader refuses before reading any weight.
    with pytest.raises(GPUCapabilityError, match="A100"):
        rt.load(runtime_source, quantization="fp8", task="code", device="cuda:0", dtype="bf16")


def test_capability_8_9_and_9_0_pass(monkeypatch, runtime_source):
    for capability in ((8, 9), (9, 0)):
        _fake_cuda(monkeypatch, capability, "NVIDIA H100 80GB HBM3")
        check_fp8_device("cuda")
    with pytest.raises(QuantizationError, match="dtype='bf16'"):
        rt.load(runtime_source, quantization="fp8", task="code", device="cuda", dtype="fp32")


def test_other_devices_are_refused(monkeypatch):
    with pytest.raises(GPUCapabilityError, match="'mps'"):
        check_fp8_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ProviderError, match="no CUDA GPU"):
        check_fp8_device("cuda")
    check_fp8_device("cpu")


# ---------------------------------------------------------------- GPU only


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_compiled_matches_eager(runtime_source, device):
    """torch.compile of the FP8 network computes what eager does (measured on CPU: min cosine 0.99924, ~30 s with the compile).

    Not exactly: inductor fuses the activation amax and scaling, and a value
    near an FP8 rounding boundary can land on the other side.
    """
    eager = load_quantized(runtime_source, "fp8", task="retrieval", device=device)
    compiled = load_quantized(runtime_source, "fp8", task="retrieval", device=device, compile=True)
    assert _cos(compiled.encode_text(TEXTS), eager.encode_text(TEXTS)).min() >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("task", TASKS)
def test_fp16_onnx_cuda_ep_all_adapters(tmp_path, runtime_source, runtime_reference, task):
    onnxruntime = pytest.importorskip("onnxruntime")
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)")

    from jev4.export.onnx import OnnxExportSettings, export_onnx

    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()
    out = export_onnx(OnnxExportSettings(model=str(runtime_source), adapter=task, out=str(tmp_path / task), dtype="fp16", text_only=True), progress=False)
    enc = rt.load(out, provider="cuda")
    single = _cos(enc.encode_text(TEXTS, task=task), runtime_reference.encode_text(TEXTS, task=task))
    print(f"fp16 ONNX CUDA EP {task}: single min {single.min():.6f}")
    assert single.min() >= 0.999
