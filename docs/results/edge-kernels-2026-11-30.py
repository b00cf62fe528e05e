"""Speed of onnxruntime CPU weight kernels at prefill shapes: fp32 MatMul vs dynamic int8 vs MatMulNBits int4 configs."""
import time, json, sys
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
from pathlib import Path
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
rng = np.random.default_rng(0)
nodes, inits, prev = [], [], "x"
for i in range(8):
    shape = (2048, 11008) if i % 2 == 0 else (11008, 2048)
    inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), f"w{i}"))
    nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}")); prev = f"h{i}"
g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 2048])], [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["m", 2048])], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
onnx.save_model(m, "fp32.onnx", save_as_external_data=True, location="fp32.onnx.data")
quantize_dynamic("fp32.onnx", "int8.onnx", weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"], use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
variants = {"fp32": "fp32.onnx", "int8-dynamic": "int8.onnx"}
for block in (32, 128):
    for sym in (False, True):
        for acc in (4, 1):
            name = f"int4-b{block}-{'sym' if sym else 'asym'}-acc{acc}"
            q = MatMulNBitsQuantizer(onnx.load("fp32.onnx"), bits=4, block_size=block, is_symmetric=sym, accuracy_level=acc, op_types_to_quantize=("MatMul",))
            q.process(); q.model.save_model_to_file(name + ".onnx", use_external_data_format=True)
            variants[name] = name + ".onnx"
q = MatMulNBitsQuantizer(onnx.load("fp32.onnx"), bits=8, block_size=32, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",))
q.process(); q.model.save_model_to_file("nbits8.onnx", use_external_data_format=True); variants["nbits8-b32-sym-acc4"] = "nbits8.onnx"
x = {}
res = {}
for name, path in variants.items():
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 2
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for M in (128, 4096):
        feed = {"x": rng.standard_normal((M, 2048)).astype(np.float32)}
        s.run(None, feed)
        t = time.perf_counter(); n = 0
        while time.perf_counter() - t < 4 or n < 2:
            s.run(None, feed); n += 1
        res[f"{name} M={M}"] = (time.perf_counter() - t) / n
        print(f"{name:24s} M={M:5d}: {1000*res[f'{name} M={M}']:8.1f} ms  ({res[f'{name} M={M}'] and M/res[f'{name} M={M}']:.0f} rows/s)", flush=True)
json.dump(res, open("probe.json", "w"), indent=1)
