"""The CPU edge ONNX export: ``jev4-export --format onnx [--fused] [--weights int4|int8]``.

One flow for the three edge variants, each a normal jev4 ONNX artifact
(manifest, checksums, ``single_vector`` / ``multi_vector`` outputs, jev4's
feeds), so ``jev4.runtime.load`` and ``jev4 validate`` treat them like any
other:

1. merge the adapter (fp32);
2. ``language.onnx``: jev4's own export, or with ``--fused`` the fused graph
   from onnxruntime-genai's builder (:mod:`jev4.export.onnx_fused`), made
   from a text-only Qwen2 checkpoint written to a scratch dir beside OUT;
3. with ``--weights``: weight-only quantization of that graph by
   onnxruntime's quantizers (:mod:`jev4.export.onnx_weights`);
4. run it on onnxruntime CPU at three shapes with ragged right padding
   against the torch network; the bar is the precision's own threshold set
   (``jev4.validate.thresholds``), so an export that would fail ``jev4
   validate``'s parity floor never gets published;
5. manifest: ``contents.precision`` (``fp32`` / ``w-int8`` / ``w-int4``)
   picks validate's thresholds; ``contents.weights`` and ``contents.fused``
   record how the graph was made.

Only fp32 graphs: the float parts of an edge graph run on a CPU, where fp16
is emulated and slower, and onnxruntime-genai's builder writes fp32 for CPU.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from jev4.atomic import atomic_output_dir, claim_output
from jev4.errors import SettingsError
from jev4.export.manifest import Manifest, write_manifest
from jev4.export.onnx import ExportValidationError, LanguageGraph, OnnxExportSettings, _copy_side_files, export_language_graph, require_onnx, validation_feeds
from jev4.export.onnx_weights import WeightQuantSettings, precision_name, quantize_weights

log = logging.getLogger(__name__)

__all__ = ["EdgeSettings", "export_edge_onnx"]

FP32_BARS = (0.9999, 0.999)  # single-vector, per-token multi-vector: the float export's own bars (jev4.export.onnx)


@dataclass(frozen=True)
class EdgeSettings:
    """The edge half of an ONNX export: fused attention and/or weight-only quantization."""

    fused: bool = False
    weights: WeightQuantSettings | None = None

    @property
    def active(self) -> bool:
        return self.fused or self.weights is not None

    def check(self, settings: OnnxExportSettings) -> None:
        """Refuse what cannot work before any model loads: one line naming the flag."""
        flag = "--fused" if self.fused else f"--weights {self.weights.precision}"
        if settings.dtype != "fp32":
            raise SettingsError(f"{flag} writes an fp32 graph for CPU (weights quantized, the rest fp32); drop --dtype {settings.dtype}")
        if self.fused and not settings.text_only:
            raise SettingsError("--fused builds the text path only (the fused graph takes no image embeddings); add --text-only")

    def to_json(self) -> dict:
        return {"fused": self.fused, "weights": self.weights.to_json() if self.weights else None}


def export_edge_onnx(settings: OnnxExportSettings, edge: EdgeSettings, progress: bool = True, output_codec=None) -> Path:
    """Merge ``settings.adapter`` and write the edge ONNX artifact to ``settings.out`` (atomically)."""
    edge.check(settings)
    with claim_output(settings.out, settings.force, settings.sources()):
        return _export(settings, edge, progress, output_codec)


def _scratch_qwen2(settings: OnnxExportSettings, scratch: Path, progress: bool) -> Path:
    """The merged text-only Qwen2 checkpoint the builder reads, streamed shard by shard (never the whole network)."""
    from jev4.export.merge import MergeSettings, merge_checkpoint

    out = scratch / "qwen2"
    merge_checkpoint(
        MergeSettings(model=settings.model, adapter=settings.adapter, out=str(out), dtype="fp32", text_only=True, adapter_dir=settings.adapter_dir),
        progress=progress,
    )
    return out


def _export(settings: OnnxExportSettings, edge: EdgeSettings, progress: bool, output_codec) -> Path:
    from jev4.export.merge import MergeSettings, merge_into_network, plan_merge
    from jev4.model.network import build_network, dtype_name, load_base_weights

    require_onnx()
    plan = plan_merge(MergeSettings(model=settings.model, adapter=settings.adapter, out=settings.out, adapter_dir=settings.adapter_dir, force=settings.force))
    started = time.perf_counter()
    precision = precision_name(edge.weights.precision if edge.weights else None)
    contents: dict = {"task": settings.adapter, "precision": precision, "float_dtype": "float32"}
    with atomic_output_dir(settings.out, force=settings.force) as tmp:
        # Scratch inside the temp output dir: removed with it on any failure, and by the next run after a crash.
        work_dir = tmp / ".edge-work"
        work_dir.mkdir()
        if edge.fused:
            from jev4.export.onnx_fused import build_fused_language_graph, require_builder

            require_builder()
            qwen2 = _scratch_qwen2(settings, work_dir, progress)
        # The fp32 merged network: the unfused graph is exported from it, and every graph is checked against it.
        network = build_network(plan.config, torch.float32)
        load_base_weights(network, plan.files, progress=progress)
        merge_into_network(network, plan.loras)
        if settings.text_only:
            del network.model.visual
        with_images = not settings.text_only
        if edge.fused:
            path, contents["fused"] = build_fused_language_graph(qwen2, network.multi_vector_projector, plan.config.hidden_size, tmp, work_dir)
            shutil.rmtree(qwen2)  # the scratch checkpoint is as big as the model; free the disk early
            from jev4.export.graphs import language_graph_spec

            spec = language_graph_spec(plan.config.hidden_size, plan.config.multi_vector_dim, with_images=False)
            contents["opset"] = contents["fused"]["opset"]
        else:
            spec = export_language_graph(network, plan.config, tmp, settings.opset, with_images=with_images)
            path = tmp / spec.file
            contents["opset"] = settings.opset
        contents["graphs"] = {"language": spec.to_json()}
        if with_images:
            from jev4.export.onnx_vision import export_vision_graph, vision_graph_spec

            export_vision_graph(network.model.visual, tmp / "vision.onnx", opset=settings.opset, dtype=torch.float32)
            contents["graphs"]["vision"] = vision_graph_spec(plan.config).to_json()
        if edge.weights is not None:
            contents["weights"] = {**edge.weights.to_json(), **quantize_weights(path, edge.weights), "vision": "fp32 (not quantized)" if with_images else None}
        shutil.rmtree(work_dir)
        _copy_side_files(plan.model_dir, tmp, plan.config, settings)
        contents["validation"] = validate_edge(network, plan.config, tmp, with_images, precision) if settings.validate else {}
        if output_codec is not None:
            contents["output_codec"] = output_codec.describe()
            output_codec.write(tmp)
        contents["export_seconds"] = round(time.perf_counter() - started, 1)
        write_manifest(
            tmp,
            Manifest(
                kind="onnx",
                source=str(plan.model_dir),
                settings={**asdict(settings), "source_dtype": dtype_name(plan.source_dtype), "edge": edge.to_json()},
                contents=contents,
            ),
        )
    return Path(settings.out)


def _bars(precision: str) -> tuple[float, float]:
    """(single-vector min cosine, per-token min cosine) an export must reach: validate's floors for the precision."""
    if precision == "fp32":
        return FP32_BARS
    from jev4.validate.thresholds import load_thresholds

    t = load_thresholds(precision)
    return t.single_cosine_min, t.multi_token_cosine_min


def validate_edge(network: torch.nn.Module, config, root: Path, with_images: bool, precision: str) -> dict[str, float]:
    """Run ``language.onnx`` on CPU at three shapes (ragged right padding) against the fp32 torch network.

    Unlike the Q/DQ check (which compares with an emulation of the same
    arithmetic), weight-only graphs are compared with float directly: the
    quantizers are onnxruntime's, so what is checked is how far the artifact
    lands from the reference, against the precision's own floors.
    """
    import onnxruntime as ort

    graph = LanguageGraph(network, config.special_tokens.image_token_id, with_images).eval()
    session = ort.InferenceSession(str(root / "language.onnx"), providers=["CPUExecutionProvider"])
    single_bar, token_bar = _bars(precision)
    worst_single, worst_token = 1.0, 1.0
    for batch, seq, feed in validation_feeds(config.hidden_size, with_images, "float32"):
        got_single, got_multi = session.run(None, feed)
        with torch.inference_mode():
            ref_single, ref_multi = graph(*(torch.from_numpy(feed[k]) for k in feed))
        single = float((torch.from_numpy(got_single).double() * ref_single.double()).sum(-1).min())
        valid = torch.from_numpy(feed["attention_mask"]).bool()
        tokens = torch.nn.functional.cosine_similarity(torch.from_numpy(got_multi).double()[valid], ref_multi.double()[valid], dim=-1)
        token = float(tokens.min())
        worst_single, worst_token = min(worst_single, single), min(worst_token, token)
        if single < single_bar or token < token_bar or not np.isfinite(got_multi).all():
            raise ExportValidationError(
                f"language.onnx ({precision}) differs from torch at batch {batch} x seq {seq}: "
                f"single min cosine {single:.6f} (bar {single_bar}), token min cosine {token:.6f} (bar {token_bar})"
            )
    log.info("language.onnx (%s) validated on CPU: single min cosine %.6f, token min cosine %.6f over 3 shapes", precision, worst_single, worst_token)
    return {"language_min_cosine": worst_single, "language_token_min_cosine": worst_token}
