"""The docs/qat.md experiment: QAT vs post-training quantization vs float, from the same tiny checkpoint.

For each precision (binary, int4): (a) the float baseline before training,
(b) PTQ: the adapter fine-tuned in float for the same steps, then its
embeddings quantized, (c) QAT: the adapter trained through the codec, then
quantized the same way. Everything is evaluated on the same held-out split
of the built-in stdlib-code pairs. Writes docs/results/qat-experiment.json
and docs/img/qat-experiment.png.

    python scripts/qat_experiment.py --model demo-out/tiny --steps 300
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from jev4.qat.data import load_split
from jev4.qat.trainer import QATSettings, evaluate_split, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--data-size", type=int, default=1500)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--precisions", default="binary,int4")
    parser.add_argument("--scaling", default="minmax")
    parser.add_argument("--multivector-weight", type=float, default=0.0, help="0: single-vector training, which is what the evaluation measures")
    parser.add_argument("--float-weight", type=float, default=1.0)
    parser.add_argument("--results", default="docs/results/qat-experiment.json")
    parser.add_argument("--plot", default="docs/img/qat-experiment.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    base = QATSettings(
        model=args.model, adapter="retrieval", precision=None, data="stdlib-code", out=tempfile.mkdtemp() + "/x",
        steps=args.steps, lr=args.lr, data_size=args.data_size, held_out=args.held_out, eval_every=max(args.steps // 6, 1),
        scaling=args.scaling, multivector_weight=args.multivector_weight, float_weight=args.float_weight, progress=True,
    )
    split = load_split(base.data, base.held_out, base.seed, base.data_size)
    float_result, float_encoder = train(base, split)
    runs = {"float-finetune": {"history": float_result.history, "best": float_result.best}}
    table = {}
    for precision in args.precisions.split(","):
        ptq = evaluate_split(float_encoder, split.held_out, base, precision)
        qat_result, qat_encoder = train(replace(base, precision=precision), split)
        qat = evaluate_split(qat_encoder, split.held_out, base, precision)
        start = qat_result.history[0]
        runs[f"qat-{precision}"] = {"history": qat_result.history, "best": qat_result.best}
        table[precision] = {
            "before training: float": start["float/ndcg@10"],
            "before training: quantized": start["quantized/ndcg@10"],
            "float fine-tune: float": ptq["float/ndcg@10"],
            "float fine-tune + PTQ": ptq["quantized/ndcg@10"],
            "QAT: quantized": qat["quantized/ndcg@10"],
            "QAT: float": qat["float/ndcg@10"],
            "PTQ recall@100": ptq["quantized/recall@100"],
            "QAT recall@100": qat["quantized/recall@100"],
        }
        print(precision, json.dumps(table[precision], indent=1))
    Path(args.results).write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "table": table, "runs": runs}, indent=1) + "\n")
    plot(runs, table, args.plot)


def plot(runs: dict, table: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=110, layout="constrained")
    curve, bars = fig.subplots(1, 2)
    colors = {"float-finetune": "#1a7f37", "qat-binary": "#cf222e", "qat-int4": "#8250df", "qat-ternary": "#bf8700", "qat-int8": "#0969da"}
    for name, run in runs.items():
        loss = [(h["step"], h["loss"]) for h in run["history"] if "loss" in h]
        if loss:
            steps, values = zip(*loss)
            window = max(1, len(values) // 15)
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
            curve.plot(steps, smooth, color=colors.get(name, "#57606a"), label=name)
    curve.set(xlabel="step", ylabel="loss (running mean)", title="training loss (QAT: quantized + float InfoNCE)")
    curve.legend(frameon=False, fontsize=8)
    keys = ["before training: quantized", "float fine-tune + PTQ", "QAT: quantized", "float fine-tune: float"]
    labels = ["start, quantized", "float FT + PTQ", "QAT", "float FT (float32)"]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(zip(keys, labels)):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(table))]
        container = bars.bar(xs, [table[p][key] for p in table], width, label=label)
        bars.bar_label(container, fmt="%.3f", fontsize=7)
    bars.set_xticks(range(len(table)), list(table))
    bars.set(ylabel="held-out nDCG@10", title="stdlib-code held-out split, tiny model")
    bars.set_ylim(0, max(table[p][k] for p in table for k in keys) * 1.35)
    bars.legend(frameon=False, fontsize=8, loc="upper left", ncols=2)
    fig.savefig(path, metadata={"Software": None})


if __name__ == "__main__":
    main()
