"""Applying a recipe: Q/DQ arithmetic (checked against onnxruntime), weight scales, SmoothQuant, emulation."""

import numpy as np
import pytest
import torch

from jev4.quant.calibration import collect_input_absmax, make_forward_loop
from jev4.quant.recipes import make_recipe
from jev4.quant.weights import build_plan, dequantize, fake_quant, fake_quantized, quantize, select_linears, smooth


def _onnx_qdq(x: np.ndarray, scale: float, precision: str) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear run by onnxruntime (opset 19): the definition the graph uses."""
    import ml_dtypes
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    zero = np.zeros((), dtype=ml_dtypes.float8_e4m3fn if precision == "fp8" else np.int8)
    inits = [numpy_helper.from_array(np.float32(scale), "s"), numpy_helper.from_array(zero, "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_fake_quant_is_bit_exact_with_onnxruntime(precision):
    rng = np.random.default_rng(0)
    scale = 0.0123
    qmax = 448.0 if precision == "fp8" else 127.0
    # normal values, values past saturation, exact ties (k + 0.5) * scale, and zeros
    x = np.concatenate([rng.standard_normal(2000) * qmax * scale / 3, [3 * qmax * scale, -5 * qmax * scale, 0.0], (np.arange(-20, 20) + 0.5) * scale])
    x = x.astype(np.float32)
    ours = fake_quant(torch.from_numpy(x), torch.tensor(scale), precision).numpy()
    np.testing.assert_array_equal(ours, _onnx_qdq(x, scale, precision))
    lowest = 448.0 if precision == "fp8" else 128.0  # activations use QuantizeLinear's full range, -128 included
    assert np.isfinite(ours).all() and np.abs(ours).max() <= lowest * scale * (1 + 1e-6)  # saturated, never inf/nan


def test_int8_rounds_half_to_even_and_weights_use_the_narrow_range():
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, -200.0, 200.0]), torch.tensor(1.0), "int8")
    assert q.tolist() == [0, 2, 2, 0, -2, -128, 127]
    assert quantize(torch.tensor([-200.0]), torch.tensor(1.0), "int8", narrow=True).tolist() == [-127]


@pytest.mark.parametrize("precision, granularity", [("fp8", "per-tensor"), ("fp8", "per-channel"), ("int8", "per-channel"), ("int8", "per-tensor")])
def test_weight_quantization_error_and_scales(precision, granularity):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 16)
    with torch.no_grad():
        linear.weight[3] = 0.0  # an all-zero output channel
        linear.weight[5] *= 50.0  # an outlier channel
    net = torch.nn.Sequential(linear)
    recipe = make_recipe(precision, granularity, smoothquant_alpha=None)
    plan = build_plan(net, recipe, {"0": torch.ones(48)}, ["0"], {})
    q = plan.modules["0"]
    assert q.weight.dtype == (torch.float8_e4m3fn if precision == "fp8" else torch.int8)
    assert q.weight.shape == linear.weight.shape
    assert q.weight_scale.shape == ((16,) if granularity == "per-channel" else ())
    assert torch.isfinite(q.weight_scale).all() and (q.weight_scale > 0).all()
    assert torch.isfinite(q.input_scale) and q.input_scale.item() == pytest.approx(1.0 / recipe.qmax)
    w, deq = linear.weight.detach(), q.dequantized_weight()
    amax = w.abs().amax(dim=1, keepdim=True) if granularity == "per-channel" else w.abs().amax()
    if precision == "int8":  # rounding error at most half a step
        assert ((w - deq).abs() <= amax / 127 / 2 + 1e-7).all()
    else:  # E4M3: 3 mantissa bits, relative error <= 2^-4 for normal values
        normal = w.abs() >= (amax / 448) * 2**-6
        assert ((w - deq).abs()[normal] <= w.abs()[normal] * 2**-4 + 1e-7).all()
    assert (deq[3] == 0).all()
    if granularity == "per-channel":
        # per-channel scales keep the small channels accurate despite the outlier row
        assert (w - deq).abs()[0].max() < (w - deq).abs()[5].max()


def test_dequantize_per_channel_axis():
    q = torch.tensor([[1, 2], [3, 4]], dtype=torch.int8)
    assert dequantize(q, torch.tensor([1.0, 10.0]), axis=0).tolist() == [[1.0, 2.0], [30.0, 40.0]]
    assert dequantize(q, torch.tensor([1.0, 10.0]), axis=1).tolist() == [[1.0, 20.0], [3.0, 40.0]]


@pytest.fixture(scope="module")
def tiny_network(tiny_dir):
    from jev4.model.checkpoint import list_checkpoint_files
    from jev4.model.config import load_config
    from jev4.model.network import build_network, load_base_weights
    from jev4.model.preprocess import Preprocessor

    config = load_config(tiny_dir)
    net = build_network(config, torch.float32)
    load_base_weights(net, list_checkpoint_files(tiny_dir))
    return net, Preprocessor.from_dir(tiny_dir, config)


TEXTS = ["def add(a, b):\n    return a + b", "How do I sort a list?", "Mean pooling of token embeddings", "x" * 40, "Wer hat das geschrieben?", "import os"]


def _outputs(net, pre):
    inputs = pre.text_inputs(TEXTS)
    with torch.inference_mode():
        out = net(inputs.input_ids, inputs.attention_mask, inputs.position_ids)
    return out.hidden, out.projected


def test_smoothquant_keeps_the_float_network_and_flattens_activations(tiny_network):
    import copy

    net, pre = tiny_network
    net = copy.deepcopy(net)
    recipe = make_recipe("int8")
    quantized, _ = select_linears(net, recipe)
    absmax = collect_input_absmax(net, quantized, make_forward_loop(pre, TEXTS, "retrieval"))
    before = {k: v.clone() for k, v in absmax.items()}
    hidden0, proj0 = _outputs(net, pre)
    groups = smooth(net, absmax, 0.5, quantized)
    # q/k/v <- input_layernorm, gate/up <- post_attention_layernorm, down <- up_proj, in both layers
    assert groups["model.language_model.layers.1.input_layernorm"] == [f"model.language_model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    assert groups["model.language_model.layers.0.mlp.up_proj"] == ["model.language_model.layers.0.mlp.down_proj"]
    assert len(groups) == 6
    hidden1, proj1 = _outputs(net, pre)
    torch.testing.assert_close(hidden1, hidden0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(proj1, proj0, rtol=1e-4, atol=1e-5)
    # Statistics now describe the smoothed inputs: re-calibrating gives the same per-channel maxima.
    again = collect_input_absmax(net, quantized, make_forward_loop(pre, TEXTS, "retrieval"))
    for name in quantized:
        torch.testing.assert_close(again[name], absmax[name], rtol=1e-4, atol=1e-6)
    # alpha 0.5 balances activations and weights: the activation channels' spread shrinks
    name = "model.language_model.layers.0.self_attn.q_proj"
    spread = lambda v: (v.max() / v.median()).item()  # noqa: E731
    assert spread(absmax[name]) < spread(before[name])
    # o_proj has no smoothing group: untouched
    assert torch.equal(absmax["model.language_model.layers.0.self_attn.o_proj"], before["model.language_model.layers.0.self_attn.o_proj"])


def test_fake_quantized_emulates_and_restores(tiny_network):
    net, pre = tiny_network
    recipe = make_recipe("fp8")
    quantized, excluded = select_linears(net, recipe)
    absmax = collect_input_absmax(net, quantized, make_forward_loop(pre, TEXTS, "retrieval"))
    plan = build_plan(net, recipe, absmax, quantized, excluded)
    hidden0, _ = _outputs(net, pre)
    with fake_quantized(net, plan):
        hidden_q, _ = _outputs(net, pre)
        with pytest.raises(RuntimeError, match="already patched"):
            with fake_quantized(net, plan):
                pass
    hidden1, _ = _outputs(net, pre)
    assert torch.equal(hidden1, hidden0)  # nothing left patched
    assert not torch.equal(hidden_q, hidden0)
    cos = torch.nn.functional.cosine_similarity(hidden_q.flatten(0, 1), hidden0.flatten(0, 1), dim=-1)
    assert cos.min() > 0.95 and cos.mean() > 0.99
    summary = plan.summary()
    assert summary["recipe"]["precision"] == "fp8" and len(summary["quantized_modules"]) == 14
    assert 0 < summary["input_scale_range"][0] <= summary["input_scale_range"][1] < float("inf")
