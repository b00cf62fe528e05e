"""Where the FP8 fast path's time goes: one Linear of each jina-embeddings-v4 shape, bf16 vs FP8, on a GPU.

For the token count of a 32 x 512 batch (M = 16384) and each language-model
projection shape (K -> N), times with CUDA events (median of 20 after 5
warm-ups, fresh random inputs, never zeros):

- ``bf16``: ``F.linear`` in bf16 (the reference);
- ``fp8 row``: ``torch._scaled_mm`` with row-wise scales (what ``FP8Linear`` runs), fast accumulation;
- ``fp8 tensor``: the same with one scale per tensor;
- ``quant eager`` / ``quant compiled``: the per-token activation quantization alone
  (``quantize_activation`` eager, and under ``torch.compile``).

    python scripts/fp8_gemm_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from jev4.runtime.torch_fp8 import quantize_activation, quantize_weight

SHAPES = {"q/o (2048->2048)": (2048, 2048), "k/v (2048->256)": (2048, 256), "gate/up (2048->11008)": (2048, 11008), "down (11008->2048)": (11008, 2048)}


def timed(fn, warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out")
    args = parser.parse_args()
    dev = torch.device("cuda")
    m = args.tokens
    compiled = torch.compile(quantize_activation, dynamic=True)
    rows = []
    for name, (k, n) in SHAPES.items():
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_weight(w, "row")
        wqt, wst = quantize_weight(w, "tensor")
        xq, xs = quantize_activation(x, "row")
        xqt, xst = quantize_activation(x, "tensor")
        ref = F.linear(x.float(), w.float())
        out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        flops = 2 * m * k * n
        row = {
            "shape": name,
            "bf16_ms": timed(lambda: F.linear(x, w)),
            "fp8_row_ms": timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True)),
            "fp8_tensor_ms": timed(lambda: torch._scaled_mm(xqt, wqt.t(), scale_a=xst, scale_b=wst, out_dtype=torch.bfloat16, use_fast_accum=True)),
            "quant_eager_ms": timed(lambda: quantize_activation(x, "row")),
            "quant_compiled_ms": timed(lambda: compiled(x, "row")),
            "fp8_row_rel_error": err,
        }
        row["bf16_tflops"] = flops / row["bf16_ms"] / 1e9
        row["fp8_row_tflops"] = flops / row["fp8_row_ms"] / 1e9
        rows.append(row)
    print(f"M = {m} tokens, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':24s} {'bf16 ms':>8s} {'fp8row ms':>9s} {'fp8tens ms':>10s} {'q eager':>8s} {'q comp':>7s} {'bf16 TF':>8s} {'fp8 TF':>7s} {'err':>6s}")
    for r in rows:
        print(
            f"{r['shape']:24s} {r['bf16_ms']:8.3f} {r['fp8_row_ms']:9.3f} {r['fp8_tensor_ms']:10.3f} {r['quant_eager_ms']:8.3f} "
            f"{r['quant_compiled_ms']:7.3f} {r['bf16_tflops']:8.0f} {r['fp8_row_tflops']:7.0f} {r['fp8_row_rel_error']:6.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": m, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
