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

import gc
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


def _scratch_projector(qwen2: Path, hidden: int, dim: int) -> torch.nn.Linear:
    """The merged projector the text-only merge wrote beside the Qwen2 weights (``jev4.export.qwen2_text.PROJECTOR_FILE``)."""
    from safetensors.torch import load_file

    from jev4.export.qwen2_text import PROJECTOR_FILE

    state = load_file(str(qwen2 / PROJECTOR_FILE))
    projector = torch.nn.Linear(hidden, dim, bias="multi_vector_projector.bias" in state)
    projector.load_state_dict({key.removeprefix("multi_vector_projector."): value.float() for key, value in state.items()})
    return projector


def _merged_network(plan, text_only: bool, progress: bool) -> torch.nn.Module:
    """The fp32 merged network: the unfused graph is exported from it, and every graph is checked against it."""
    from jev4.export.merge import merge_into_network
    from jev4.model.network import build_network, load_base_weights

    network = build_network(plan.config, torch.float32)
    load_base_weights(network, plan.files, progress=progress)
    merge_into_network(network, plan.loras)
    if text_only:
        del network.model.visual
    return network


def _export(settings: OnnxExportSettings, edge: EdgeSettings, progress: bool, output_codec) -> Path:
    """Memory at full size (24 GiB machine): the fp32 network, the fp32 graph and the quantizer's copy are 12.4 GB each,
    so no two are ever held at once: the fused graph is built from a scratch checkpoint on disk, the reference outputs
    are computed and the network dropped before quantization, and the graph is checked last."""
    from jev4.export.merge import MergeSettings, plan_merge
    from jev4.model.network import dtype_name

    require_onnx()
    plan = plan_merge(MergeSettings(model=settings.model, adapter=settings.adapter, out=settings.out, adapter_dir=settings.adapter_dir, force=settings.force))
    started = time.perf_counter()
    precision = precision_name(edge.weights.precision if edge.weights else None)
    contents: dict = {"task": settings.adapter, "precision": precision, "float_dtype": "float32"}
    with_images = not settings.text_only
    with atomic_output_dir(settings.out, force=settings.force) as tmp:
        # Scratch inside the temp output dir: removed with it on any failure, and by the next run after a crash.
        work_dir = tmp / ".edge-work"
        work_dir.mkdir()
        network = None
        if edge.fused:
            from jev4.export.graphs import language_graph_spec
            from jev4.export.onnx_fused import build_fused_language_graph, require_builder

            require_builder()
            qwen2 = _scratch_qwen2(settings, work_dir, progress)
            projector = _scratch_projector(qwen2, plan.config.hidden_size, plan.config.multi_vector_dim)
            path, contents["fused"] = build_fused_language_graph(qwen2, projector, plan.config.hidden_size, tmp, work_dir)
            spec = language_graph_spec(plan.config.hidden_size, plan.config.multi_vector_dim, with_images=False)
            contents["opset"] = contents["fused"]["opset"]
        else:
            network = _merged_network(plan, settings.text_only, progress)
            spec = export_language_graph(network, plan.config, tmp, settings.opset, with_images=with_images)
            path = tmp / spec.file
            contents["opset"] = settings.opset
        contents["graphs"] = {"language": spec.to_json()}
        if with_images:
            from jev4.export.onnx_vision import export_vision_graph, vision_graph_spec

            export_vision_graph(network.model.visual, tmp / "vision.onnx", opset=settings.opset, dtype=torch.float32)
            contents["graphs"]["vision"] = vision_graph_spec(plan.config).to_json()
        references = None
        if settings.validate:
            network = network if network is not None else _merged_network(plan, True, progress)
            references = reference_outputs(network, plan.config, with_images)
        del network  # frees 12.4 GB at full size before the quantizer loads the graph
        gc.collect()
        if edge.weights is not None:
            contents["weights"] = {**edge.weights.to_json(), **quantize_weights(path, edge.weights), "vision": "fp32 (not quantized)" if with_images else None}
        shutil.rmtree(work_dir)
        _copy_side_files(plan.model_dir, tmp, plan.config, settings)
        contents["validation"] = check_edge_graph(tmp, references, precision) if references is not None else {}
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


@dataclass(frozen=True)
class ReferenceCase:
    """One validation shape: the feed and what the fp32 torch network gives for it."""

    batch: int
    seq: int
    feed: dict[str, np.ndarray]
    single: torch.Tensor
    multi: torch.Tensor


def reference_outputs(network: torch.nn.Module, config, with_images: bool) -> list[ReferenceCase]:
    """The fp32 torch network's outputs at the three validation shapes (ragged right padding), computed before the network is dropped."""
    graph = LanguageGraph(network, config.special_tokens.image_token_id, with_images).eval()
    cases = []
    with torch.inference_mode():
        for batch, seq, feed in validation_feeds(config.hidden_size, with_images, "float32"):
            single, multi = graph(*(torch.from_numpy(feed[k]) for k in feed))
            cases.append(ReferenceCase(batch, seq, feed, single.clone(), multi.clone()))
    return cases


def check_edge_graph(root: Path, references: list[ReferenceCase], precision: str) -> dict[str, float]:
    """Run ``language.onnx`` on onnxruntime CPU on the reference cases; refuse the artifact below the precision's floors.

    Unlike the Q/DQ check (which compares with an emulation of the same
    arithmetic), weight-only graphs are compared with float directly: the
    quantizers are onnxruntime's, so what is checked is how far the artifact
    lands from the reference, against the precision's own floors.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(root / "language.onnx"), providers=["CPUExecutionProvider"])
    single_bar, token_bar = _bars(precision)
    worst_single, worst_token = 1.0, 1.0
    for case in references:
        got_single, got_multi = session.run(None, case.feed)
        single = float((torch.from_numpy(got_single).double() * case.single.double()).sum(-1).min())
        valid = torch.from_numpy(case.feed["attention_mask"]).bool()
        tokens = torch.nn.functional.cosine_similarity(torch.from_numpy(got_multi).double()[valid], case.multi.double()[valid], dim=-1)
        token = float(tokens.min())
        worst_single, worst_token = min(worst_single, single), min(worst_token, token)
        if single < single_bar or token < token_bar or not np.isfinite(got_multi).all():
            raise ExportValidationError(
                f"language.onnx ({precision}) differs from torch at batch {case.batch} x seq {case.seq}: "
                f"single min cosine {single:.6f} (bar {single_bar}), token min cosine {token:.6f} (bar {token_bar})"
            )
    log.info("language.onnx (%s) validated on CPU: single min cosine %.6f, token min cosine %.6f over 3 shapes", precision, worst_single, worst_token)
    return {"language_min_cosine": worst_single, "language_token_min_cosine": worst_token}
