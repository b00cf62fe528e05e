"""Write a QAT result as an upstream-format adapter directory, with its calibration, curve and manifest.

The output is a drop-in ``adapters/`` directory: ``adapter_config.json``
copied from the source and ``adapter_model.safetensors`` with the source's
exact key names (either layout) and dtype, every task's tensors kept and
the tuned task's replaced. jev4 (``--adapter-dir``) and upstream's PEFT
loading both read it. Beside it: the embedding calibration for the trained
precision (``calibration.json``), the training history, a loss/metric plot
and a jev4 manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from jev4.atomic import atomic_output_dir
from jev4.export.manifest import Manifest, write_manifest
from jev4.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PATTERN, adapter_dir_of
from jev4.model.checkpoint import canonical_name, iter_shard_tensors, resolve_model_dir
from jev4.model.encoder import TorchEncoder
from jev4.qat.trainer import QATResult, QATSettings, _encode_eval, lora_modules
from jev4.qat.data import load_split
from jev4.quant.embeddings import calibrate

log = logging.getLogger(__name__)

CALIBRATION_NAME = "calibration.json"
HISTORY_NAME = "qat-history.json"
CURVE_NAME = "qat-curve.png"


def source_adapter_dir(settings: QATSettings) -> Path:
    return Path(settings.adapter_dir) if settings.adapter_dir else adapter_dir_of(resolve_model_dir(settings.model))


def write_adapter(encoder: TorchEncoder, task: str, source: Path, out_dir: Path) -> int:
    """Copy the source adapter with ``task``'s A/B replaced by the encoder's; returns the number of tensors replaced."""
    modules = lora_modules(encoder)
    index = encoder.selector.tasks.index(task)
    tensors, replaced = {}, 0
    for name, tensor in iter_shard_tensors(source / ADAPTER_WEIGHTS):
        match = KEY_PATTERN.match(name)
        if match and match["task"] == task:
            module = modules[canonical_name(match["module"])]
            trained = (module.lora_A if match["kind"] == "A" else module.lora_B)[index]
            tensor = trained.detach().cpu().to(tensor.dtype).contiguous()
            replaced += 1
        tensors[name] = tensor
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(source / ADAPTER_CONFIG, out_dir / ADAPTER_CONFIG)
    return replaced


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss per step and held-out nDCG@10 (float and quantized) per evaluation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=110, layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if losses:
        steps, values = zip(*losses)
        loss_ax.plot(steps, values, color="#8c959f", linewidth=0.8, label="loss")
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        loss_ax.plot(steps[window - 1 :], smooth, color="#0969da", linewidth=1.8, label=f"mean of {window}")
    loss_ax.set(xlabel="step", ylabel="InfoNCE loss", title="training loss")
    loss_ax.legend(frameon=False, fontsize=8)
    evals = [h for h in history if "float/ndcg@10" in h]
    for key, color, label in (("float/ndcg@10", "#1a7f37", "float32"), ("quantized/ndcg@10", "#cf222e", "quantized")):
        points = [(h["step"], h[key]) for h in evals if key in h]
        if points:
            metric_ax.plot(*zip(*points), marker="o", color=color, label=label)
    metric_ax.set(xlabel="step", ylabel="nDCG@10 (held out)", title="held-out retrieval")
    metric_ax.legend(frameon=False, fontsize=8)
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, metadata={"Software": None})


def write_output(settings: QATSettings, result: QATResult, encoder: TorchEncoder) -> Path:
    """The tuned adapter directory (atomically), usable as ``jev4-export --adapter-dir OUT``."""
    source = source_adapter_dir(settings)
    calibration = result.calibration  # --scaling rolling: the statistics training converged to
    if settings.precision is not None and calibration is None:
        # Calibrated on held-out documents embedded by the tuned model: what the served index will look like.
        split = load_split(settings.data, settings.held_out, settings.seed, settings.data_size)
        docs = _encode_eval(encoder, [p.positive for p in split.held_out], settings.adapter, "passage", settings.max_length, settings.batch_size)
        method = "minmax"
        calibration = calibrate(docs, settings.precision, method=method)
    with atomic_output_dir(settings.out, force=settings.force) as tmp:
        replaced = write_adapter(encoder, settings.adapter, source, tmp)
        if calibration is not None:
            calibration.save(tmp / CALIBRATION_NAME)
        (tmp / HISTORY_NAME).write_text(json.dumps({"best": result.best, "history": result.history}, indent=1) + "\n")
        try:
            plot_curves(result.history, tmp / CURVE_NAME, f"jev4 qat: {settings.adapter}, {settings.precision or 'float'}, {settings.scaling}")
        except ImportError:
            log.warning("matplotlib is not installed: no %s", CURVE_NAME)
        write_manifest(
            tmp,
            Manifest(
                kind="qat-adapter",
                source=str(source),
                settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
                contents={"task": settings.adapter, "replaced_tensors": replaced, "precision": settings.precision, "best": result.best},
            ),
        )
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    log.info("tuned %r adapter (%d tensors) written to %s", settings.adapter, replaced, settings.out)
    return Path(settings.out)


def run_qat(settings: QATSettings) -> QATResult:
    """Train, then write the output; the checkpoint directory is removed once the output is complete."""
    from jev4.atomic import claim_output
    from jev4.qat.trainer import train

    with claim_output(settings.out, settings.force, (settings.model, settings.data, settings.adapter_dir)):
        result, encoder = train(settings)
        result.out = write_output(settings, result, encoder)
    return result

