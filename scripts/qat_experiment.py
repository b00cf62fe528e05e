"""The docs/qat.md experiment: QAT vs post-training quantization vs float, from the same tiny checkpoint.

For each seed, the built-in stdlib-code pairs are split three ways: a test
split (``--test``, reported), a validation split (``--validation``, which
picks each run's best checkpoint) and the rest to train on, so that the
checkpoint choice never sees the reported queries. Then, for each arm
(``precision`` or ``precision:both`` to quantize queries too):

(a) start: the untrained adapter, float and quantized;
(b) PTQ: the adapter fine-tuned in float for ``--steps``, then quantized
    (calibrated on the test documents, as an index would be);
(c) QAT: the adapter trained for the same steps through the codec, then
    quantized the same way (``--scaling rolling``: with the statistics it
    trained with).

All on the test split. The table holds the mean and standard deviation over
seeds and the per-seed QAT - PTQ and float FT - PTQ differences (paired: same
split, same batch order). Writes docs/results/qat-experiment.json and
docs/img/qat-experiment.png.

Options for the follow-up experiments of docs/qat.md (all off by default):

- ``--init-steps N``: first fine-tune the adapter in float for N steps
  (shared by both arms), then continue from that same adapter for
  ``--steps`` more, either in float (then PTQ) or with QAT, with the same
  batch order: QAT as a fine-tuning stage on a trained adapter. The shared
  adapter is reported too (``init``), float and quantized.
- ``--dim D``: evaluate (test, and the validation that picks checkpoints) on
  embeddings truncated to D dims and re-normalised before the codec; both
  arms train with D added to the loss (``--matryoshka-dims``).
- ``--ptq-only``: skip QAT: only the float fine-tune and its PTQ per arm,
  to screen which settings make PTQ lose most.

    OMP_NUM_THREADS=1 python scripts/qat_experiment.py --model demo-out/tiny --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import shutil
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

import jev4.qat.trainer as trainer
from jev4.model.encoder import TorchEncoder
from jev4.qat.data import PairSplit, builtin_pairs, split_pairs
from jev4.qat.export import source_adapter_dir, write_adapter
from jev4.qat.trainer import QATSettings, evaluate_split, train

METRICS = ("ndcg@10", "recall@100")


def splits(size: int, test: int, validation: int, seed: int) -> tuple[PairSplit, list]:
    """(train + validation split, test pairs): disjoint, seeded."""
    first = split_pairs(builtin_pairs(size), test, seed, "stdlib-code")
    return PairSplit(first.train[validation:], first.train[:validation], "stdlib-code"), first.held_out


def arm_settings(base: QATSettings, arm: str) -> QATSettings:
    """``precision[:both][@field=value+field=value...]``: e.g. ``binary:both@ste=clipped+error_weight=1``."""
    spec, _, overrides = arm.partition("@")
    precision, _, mode = spec.partition(":")
    types = {f.name: f.type for f in fields(QATSettings)}
    changes = {}
    for item in filter(None, overrides.split("+")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"arm {arm!r}: QATSettings has no field {key!r}")
        changes[key] = {"float": float, "int": int}.get(types[key], str)(value)
    return replace(base, precision=precision, quantize=mode or "docs", **changes)


def truncate_evaluation(dim: int) -> None:
    """Make every evaluation (validation and test) use embeddings truncated to ``dim`` and re-normalised."""
    encode = trainer._encode_eval

    def truncated(*args, **kwargs) -> np.ndarray:
        x = encode(*args, **kwargs)[:, :dim]
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    trainer._encode_eval = truncated


def shared_start(base: QATSettings, split: PairSplit, args: argparse.Namespace, seed: int, root: Path) -> tuple[QATSettings, dict]:
    """--init-steps: fine-tune in float, write the adapter, and make it the starting point of both arms.

    With ``--init-cache DIR`` the adapter (and its history) is kept in DIR/init-SEED with the settings
    that made it, and reused by a later run with the same settings: training is deterministic on the
    CPU, so a follow-up experiment on the same init need not retrain it.
    """
    init = replace(base, steps=args.init_steps, lr=args.init_lr or args.lr, eval_every=max(args.init_steps // 6, 1))
    key = {"model": base.model, "seed": seed, "steps": init.steps, "lr": init.lr, "batch_size": init.batch_size, "max_length": init.max_length,
           "data_size": args.data_size, "test": args.test, "validation": args.validation, "dims": list(init.matryoshka_dims)}
    out = Path(args.init_cache) / f"init-{seed}" if args.init_cache else root / f"init-{seed}"
    record = out / "init-run.json"
    cached = json.loads(record.read_text()) if record.is_file() else {}
    if cached.get("key") == key:
        logging.info("seed %d: reusing the shared float init in %s", seed, out)
        run = cached["run"]
    else:
        result, encoder = train(init, split)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        write_adapter(encoder, base.adapter, source_adapter_dir(base), out)
        run = {"history": result.history, "best": {k: v for k, v in result.best.items() if k != "tensors"}}
        record.write_text(json.dumps({"key": key, "run": run}))
    # The continuation has its own batch order (the same for both arms), not a replay of the first stage's.
    return replace(base, adapter_dir=str(out), seed=seed + 1000), run


def run_seed(base: QATSettings, arms: list[str], args: argparse.Namespace, seed: int) -> tuple[dict, dict]:
    base = replace(base, seed=seed)
    split, test = splits(args.data_size, args.test, args.validation, seed)
    start_encoder = TorchEncoder.from_pretrained(base.model)
    runs = {}
    init_encoder = None
    if args.init_steps:
        base, runs["float init (shared)"] = shared_start(base, split, args, seed, Path(base.out).parent)
        init_encoder = TorchEncoder.from_pretrained(base.model, adapter_dir=base.adapter_dir)
    float_result, float_encoder = train(base, split)
    runs["float fine-tune"] = {"history": float_result.history, "best": float_result.best}
    rows = {}
    for arm in arms:
        settings = arm_settings(base, arm)
        start = evaluate_split(start_encoder, test, settings, settings.precision)
        ptq = evaluate_split(float_encoder, test, settings, settings.precision)
        evaluated = {"start float": (start, "float/"), "start quantized": (start, "quantized/"), "float FT": (ptq, "float/"), "PTQ": (ptq, "quantized/")}
        if init_encoder is not None:
            init = evaluate_split(init_encoder, test, settings, settings.precision)
            evaluated.update({"init float": (init, "float/"), "init PTQ": (init, "quantized/")})
        if not args.ptq_only:
            qat_result, qat_encoder = train(settings, split)
            qat = evaluate_split(qat_encoder, test, settings, settings.precision, qat_result.calibration)
            runs[f"QAT {arm}"] = {"history": qat_result.history, "best": qat_result.best}
            evaluated.update({"QAT": (qat, "quantized/"), "QAT float": (qat, "float/")})
        rows[arm] = {f"{name} {m}": result[prefix + m] for name, (result, prefix) in evaluated.items() for m in METRICS}
        logging.info("seed %d %s: %s", seed, arm, json.dumps(rows[arm]))
    return rows, runs


def summarise(per_seed: dict[int, dict]) -> dict:
    table = {}
    for arm in next(iter(per_seed.values())):
        rows = [per_seed[s][arm] for s in per_seed]
        entry = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            entry[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        for m in METRICS:
            for a, b in (("QAT", "PTQ"), ("float FT", "PTQ"), ("QAT", "init PTQ"), ("PTQ", "init PTQ")):
                if f"{a} {m}" not in rows[0] or f"{b} {m}" not in rows[0]:
                    continue
                diffs = [r[f"{a} {m}"] - r[f"{b} {m}"] for r in rows]
                entry[f"{a} - {b} {m}"] = {
                    "mean": statistics.fmean(diffs),
                    "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                    "wins": sum(d > 0 for d in diffs),
                    "per seed": diffs,
                }
        table[arm] = entry
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data-size", type=int, default=3000, help="built-in pairs used (train + validation + test)")
    parser.add_argument("--test", type=int, default=500, help="pairs reported on")
    parser.add_argument("--validation", type=int, default=500, help="pairs that pick each run's best checkpoint")
    parser.add_argument("--seeds", default="0,1,2", help="each seed: its own split and batch order")
    parser.add_argument("--arms", default="binary,int4", help="precision or precision:both (queries quantized too), optionally @field=value+... QAT settings")
    parser.add_argument("--scaling", default="minmax")
    parser.add_argument("--multivector-weight", type=float, default=0.0, help="0: single-vector training, which is what the evaluation measures")
    parser.add_argument("--float-weight", type=float, default=1.0)
    parser.add_argument("--results", default="docs/results/qat-experiment.json")
    parser.add_argument("--plot", default="docs/img/qat-experiment.png")
    parser.add_argument("--init-steps", type=int, default=0, help="N > 0: both arms continue from one adapter fine-tuned in float for N steps")
    parser.add_argument("--init-cache", default=None, help="keep/reuse the shared float init per seed in this directory")
    parser.add_argument("--init-lr", type=float, default=None, help="lr of the shared float stage (default: --lr)")
    parser.add_argument("--dim", type=int, default=None, help="evaluate on embeddings truncated to this Matryoshka dim")
    parser.add_argument("--ptq-only", action="store_true", help="skip QAT: float fine-tune and PTQ only (screening)")
    parser.add_argument("--merge", default=None, help="comma-separated results of the same settings over other seeds: combine them into --results/--plot, training nothing")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge.split(","), args.results, args.plot)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.dim:
        if args.scaling == "rolling":
            parser.error("--dim evaluates with the documents' own calibration; use --scaling minmax")
        truncate_evaluation(args.dim)
    base = QATSettings(
        model=args.model, adapter="retrieval", precision=None, data="stdlib-code", out=tempfile.mkdtemp() + "/x",
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, held_out=args.validation,
        eval_every=max(args.steps // 6, 1), scaling=args.scaling, multivector_weight=args.multivector_weight,
        float_weight=args.float_weight, progress=True, matryoshka_dims=(args.dim,) if args.dim else (),
    )
    arms = args.arms.split(",")
    per_seed, curves = {}, {}
    for seed in (int(s) for s in args.seeds.split(",")):
        per_seed[seed], runs = run_seed(base, arms, args, seed)
        curves = curves or runs  # the first seed's curves are plotted
    table = summarise(per_seed)
    for arm, entry in table.items():
        print(arm, {k: round(v["mean"], 4) for k, v in entry.items()})
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "table": table, "per_seed": per_seed, "runs": curves}
    Path(args.results).write_text(json.dumps(report, indent=1) + "\n")
    plot(curves, table, len(per_seed), args.plot)


def merge(paths: list[str], results: str, plot_path: str) -> None:
    """One report from runs of the same settings over disjoint seeds (e.g. run in parallel)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    ignored = ("seeds", "results", "plot", "init_cache")
    settings = [{k: v for k, v in r["settings"].items() if k not in ignored} for r in reports]
    if any(s != settings[0] for s in settings):
        raise SystemExit("--merge: the runs' settings differ")
    per_seed = {seed: rows for r in reports for seed, rows in r["per_seed"].items()}
    table = summarise(per_seed)
    merged = {**reports[0]["settings"], "seeds": ",".join(per_seed), "results": results, "plot": plot_path, "merged from": ",".join(paths)}
    report = {"settings": merged, "table": table, "per_seed": per_seed, "runs": reports[0]["runs"]}
    Path(results).write_text(json.dumps(report, indent=1) + "\n")
    plot(reports[0]["runs"], table, len(per_seed), plot_path)


def plot(runs: dict, table: dict, seeds: int, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), dpi=110, layout="constrained")
    curve, valid, bars = fig.subplots(1, 3)
    palette = ["#1a7f37", "#cf222e", "#8250df", "#bf8700", "#0969da", "#57606a"]
    init = runs.get("float init (shared)")
    shift = init["history"][-1]["step"] if init else 0  # --init-steps: the continuations start where the shared stage ended
    for color, (name, run) in zip(palette, runs.items()):
        offset = 0 if run is init else shift
        loss = [(h["step"] + offset, h["loss"]) for h in run["history"] if "loss" in h]
        steps, values = zip(*loss)
        window = max(1, len(values) // 15)
        smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        curve.plot(steps, smooth, color=color, label=name)
        quantized = name.startswith("QAT")
        key = "quantized/ndcg@10" if quantized else "float/ndcg@10"
        evals = [(h["step"] + offset, h[key]) for h in run["history"] if key in h]
        valid.plot(*zip(*evals), marker="o", markersize=3, color=color, label=name + (" (quantized)" if quantized else ""))
    curve.set(xlabel="step", ylabel="loss (running mean)", title="training loss, first seed (QAT: quantized + float InfoNCE)")
    curve.legend(frameon=False, fontsize=8)
    valid.set(xlabel="step", ylabel="validation nDCG@10", title="validation split (picks the checkpoint)")
    valid.legend(frameon=False, fontsize=8)
    named = {
        "start quantized ndcg@10": "start, quantized",
        "init PTQ ndcg@10": "shared float init + PTQ",
        "PTQ ndcg@10": "float FT + PTQ",
        "QAT ndcg@10": "QAT",
        "float FT ndcg@10": "float FT (float32)",
    }
    first = next(iter(table.values()))
    keys = [k for k in named if k in first]
    labels = [named[k] for k in keys]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(zip(keys, labels)):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(table))]
        container = bars.bar(xs, [table[a][key]["mean"] for a in table], width, yerr=[table[a][key]["std"] for a in table], capsize=2, label=label)
        bars.bar_label(container, fmt="%.3f", fontsize=6, padding=2)
    bars.set_xticks(range(len(table)), list(table))
    bars.set(ylabel="test nDCG@10", title=f"test split, mean ± sd over {seeds} seeds")
    top = max(table[a][k]["mean"] + table[a][k]["std"] for a in table for k in keys)
    bars.set_ylim(0, top * 1.35)
    bars.legend(frameon=False, fontsize=7, loc="upper left", ncols=2)
    for ax in (curve, valid, bars):
        ax.grid(alpha=0.3)
    fig.savefig(path, metadata={"Software": None})


if __name__ == "__main__":
    main()
