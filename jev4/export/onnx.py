"""``jev4-export --format onnx``: the merged model as ONNX graphs (language model, vision tower).

No public exporter handles Qwen2.5-VL embedding models (optimum's qwen2_5_vl
export fails on 3-D M-RoPE), so jev4 exports two graphs itself:

- ``language.onnx``: (input_ids, attention_mask, position_ids [3,B,T],
  pooling_mask, image_embeds) -> single_vector [B, H] (mean over the pooling
  mask, L2) and multi_vector [B, T, P]. Image token embeddings are placed at
  the ``<|image_pad|>`` positions inside the graph with a gather (a masked
  scatter whose shape does not depend on data), so one graph serves text and
  images. Position ids come from the shared preprocessing, so M-RoPE needs
  nothing data-dependent in the graph.
- ``vision.onnx`` (unless ``--text-only``): flattened patches -> image token
  embeddings (see ``onnx_vision``).

The adapter is merged in memory with the same math as the checkpoint merge;
weights are loaded shard by shard into a network built in the export dtype.
Right after export each graph is run with onnxruntime (CPU) on probe inputs of
several shapes and compared with the torch network it came from.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jev4.atomic import atomic_output_dir, claim_output
from jev4.errors import Jev4Error, MissingDependencyError, SettingsError
from jev4.export.graphs import GraphSpec, language_graph_spec
from jev4.export.manifest import Manifest, write_manifest
from jev4.quant.output_codec import OutputCodec
from jev4.export.merge import TOKENIZER_FILES, VISION_FILES, MergeSettings, merge_into_network, plan_merge
from jev4.model.config import MERGED_TASK_KEY, JinaV4Config
from jev4.model.network import JinaEmbeddingsV4, build_network, dtype_name, load_base_weights, parse_dtype
from jev4.model.pooling import multi_vector, single_vector

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 23  # torch.onnx's dynamo exporter starts at 18; onnxruntime 1.2x runs up to 23
NUMPY_FLOAT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ExportValidationError(Jev4Error):
    """An exported graph does not reproduce the torch network it came from."""


def require_onnx() -> None:
    """ONNX export needs onnx, onnxscript and onnxruntime (the ``onnx`` extras)."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingDependencyError(f"ONNX export needs {', '.join(missing)}: pip install 'jev4[onnx]'")


@dataclass(frozen=True)
class OnnxExportSettings:
    """Options of ``jev4-export --format onnx``; recorded verbatim in the manifest."""

    model: str
    adapter: str
    out: str
    dtype: str = "fp32"
    text_only: bool = False
    opset: int = DEFAULT_OPSET
    adapter_dir: str | None = None
    validate: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise SettingsError(f"--opset {self.opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} (torch.onnx's exporter starts at {MIN_OPSET})")

    def sources(self) -> tuple[str | None, ...]:
        """What the run reads: OUT may not be, hold or sit inside any of them."""
        return (self.model, self.adapter_dir)


class LanguageGraph(nn.Module):
    """What ``language.onnx`` computes, as a torch module over the (merged) network."""

    def __init__(self, network: JinaEmbeddingsV4, image_token_id: int, with_images: bool):
        super().__init__()
        self.language_model = network.model.language_model
        self.projector = network.multi_vector_projector
        self.image_token_id = image_token_id
        self.with_images = with_images

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        pooling_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.language_model.embed_tokens(input_ids)
        if self.with_images:
            embeds = place_image_embeds(embeds, input_ids == self.image_token_id, image_embeds)
        hidden = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return single_vector(hidden, pooling_mask), multi_vector(self.projector(hidden), attention_mask)


def place_image_embeds(embeds: torch.Tensor, is_image: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Put the i-th image embedding at the i-th ``<|image_pad|>`` position (row-major), by gather.

    A zero row is appended so that text batches (no image tokens, zero image
    embeddings) gather something valid; those rows are never selected.
    """
    flat = is_image.reshape(-1).to(torch.int64)
    index = (flat.cumsum(0) - 1).clamp(min=0)
    table = torch.cat([image_embeds.to(embeds.dtype), embeds.new_zeros(1, embeds.shape[-1])])
    gathered = table[index].reshape(embeds.shape)
    return torch.where(is_image.unsqueeze(-1), gathered, embeds)


def _dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, torch.export.Dim]]:
    dims: dict[str, torch.export.Dim] = {}
    shapes = {}
    for tensor in spec.inputs:
        shapes[tensor.name] = {
            axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in enumerate(tensor.shape) if isinstance(name, str)
        }
    return shapes


def export_language_graph(network: JinaEmbeddingsV4, config: JinaV4Config, out_dir: Path, opset: int, with_images: bool) -> GraphSpec:
    """Export ``language.onnx`` with dynamic batch and sequence axes (dynamo exporter, external data)."""
    import onnx

    spec = language_graph_spec(config.hidden_size, config.multi_vector_dim, with_images)
    graph = LanguageGraph(network, config.special_tokens.image_token_id, with_images).eval()
    dtype = network.multi_vector_projector.weight.dtype
    # Example inputs of batch 2 and length 5 (distinct, so that no axis is specialised to a constant).
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    args = [torch.randint(0, 100, (2, 5)), mask, torch.zeros(3, 2, 5, dtype=torch.long), mask.clone()]
    if with_images:
        args.append(torch.zeros(3, config.hidden_size, dtype=dtype))
    path = out_dir / spec.file
    started = time.perf_counter()
    torch.onnx.export(
        graph,
        tuple(args),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=spec.input_names(),
        output_names=spec.output_names(),
        dynamic_shapes=_dynamic_shapes(spec),
        external_data=True,
        verbose=False,
    )
    onnx.checker.check_model(str(path))
    log.info("exported %s in %.1f s", path.name, time.perf_counter() - started)
    return spec


def _copy_side_files(model_dir: Path, tmp: Path, config: JinaV4Config, settings: OnnxExportSettings) -> None:
    names = TOKENIZER_FILES if settings.text_only else TOKENIZER_FILES + VISION_FILES
    for filename in names:
        if (model_dir / filename).is_file():
            shutil.copy2(model_dir / filename, tmp / filename)
    raw = {**config.raw, MERGED_TASK_KEY: settings.adapter}
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def export_onnx(settings: OnnxExportSettings, progress: bool = True, output_codec: OutputCodec | None = None) -> Path:
    """Merge ``settings.adapter`` and export the graphs to ``settings.out`` (atomically)."""
    with claim_output(settings.out, settings.force, settings.sources()):
        return _export_onnx(settings, progress, output_codec)


def _export_onnx(settings: OnnxExportSettings, progress: bool, output_codec: OutputCodec | None) -> Path:
    require_onnx()
    plan = plan_merge(
        MergeSettings(model=settings.model, adapter=settings.adapter, out=settings.out, adapter_dir=settings.adapter_dir, force=settings.force)
    )
    dtype = parse_dtype(settings.dtype)
    started = time.perf_counter()
    network = build_network(plan.config, dtype)
    load_base_weights(network, plan.files, progress=progress)
    merge_into_network(network, plan.loras)
    if settings.text_only:
        del network.model.visual  # free its memory before the export traces the language model
    graphs: dict[str, dict] = {}
    with atomic_output_dir(settings.out, force=settings.force) as tmp:
        language = export_language_graph(network, plan.config, tmp, settings.opset, with_images=not settings.text_only)
        graphs["language"] = language.to_json()
        if not settings.text_only:
            from jev4.export.onnx_vision import export_vision_graph, vision_graph_spec

            export_vision_graph(network.model.visual, tmp / "vision.onnx", opset=settings.opset, dtype=dtype)
            graphs["vision"] = vision_graph_spec(plan.config).to_json()
        _copy_side_files(plan.model_dir, tmp, plan.config, settings)
        validation = validate_export(network, plan.config, tmp, graphs) if settings.validate else {}
        extra = {"output_codec": output_codec.describe()} if output_codec is not None else {}
        if output_codec is not None:
            output_codec.write(tmp)
        write_manifest(
            tmp,
            Manifest(
                kind="onnx",
                source=str(plan.model_dir),
                settings={**asdict(settings), "source_dtype": dtype_name(plan.source_dtype)},
                contents={
                    "task": settings.adapter,
                    "float_dtype": NUMPY_FLOAT[dtype],
                    "opset": settings.opset,
                    "graphs": graphs,
                    "export_seconds": round(time.perf_counter() - started, 1),
                    "validation": validation,
                    **extra,
                },
            ),
        )
    return Path(settings.out)


def validation_feeds(hidden_size: int, with_images: bool, float_dtype: str) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(batch, seq, feed) for checking a language graph on CPU: three shapes, ragged padding, seeded.

    Batch 1 x 1 catches an axis specialised to the example's size, 3 x 17 odd
    sizes and 4 x 64 padding; the float and the Q/DQ exporters check on the same inputs.
    """
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 1), (3, 17), (4, 64)):
        lengths = rng.integers(1, seq + 1, size=batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(0, 200, size=(batch, seq)).astype(np.int64)
        pos = np.broadcast_to(np.maximum(mask.cumsum(-1) - 1, 0) * mask, (3, batch, seq)).astype(np.int64).copy()
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "pooling_mask": mask}
        if with_images:
            feed["image_embeds"] = np.zeros((0, hidden_size), dtype=float_dtype)
        yield batch, seq, feed


# (single-vector, per-token) min cosine an export must reach against torch on CPU. fp32 reaches 1 - 1e-12 and
# 1 - 1e-10 (tests/export); a 1% error in a LoRA scale gives 1 - 3e-5, which the fp32 bar must refuse.
VALIDATION_BARS = {"float32": (1 - 1e-5, 1 - 1e-4), "float16": (0.999, 0.99)}


def validate_export(network: JinaEmbeddingsV4, config: JinaV4Config, root: Path, graphs: dict[str, dict]) -> dict[str, float]:
    """Run the exported language graph on CPU at several shapes and compare with the torch network.

    Catches an axis frozen by tracing or a wrong export before the artifact is
    published. bf16 graphs cannot run on onnxruntime's CPU provider; they are
    checked structurally only (``onnx.checker``).
    """
    import onnxruntime as ort

    float_dtype = NUMPY_FLOAT[network.multi_vector_projector.weight.dtype]
    if float_dtype == "bfloat16":
        log.warning("bf16 graphs cannot be validated with onnxruntime on CPU; skipped")
        return {}
    with_images = any(t["name"] == "image_embeds" for t in graphs["language"]["inputs"])
    graph = LanguageGraph(network, config.special_tokens.image_token_id, with_images).eval()
    session = ort.InferenceSession(str(root / "language.onnx"), providers=["CPUExecutionProvider"])
    single_bar, token_bar = VALIDATION_BARS[float_dtype]
    worst = worst_token = 1.0
    for batch, seq, feed in validation_feeds(config.hidden_size, with_images, float_dtype):
        got_single, got_multi = session.run(None, feed)
        with torch.inference_mode():
            ref_single, ref_multi = graph(*(torch.from_numpy(feed[k]) for k in feed))
        where = f"language.onnx differs from torch at batch {batch} x seq {seq}"
        if not (np.isfinite(got_single).all() and np.isfinite(got_multi).all()):
            raise ExportValidationError(f"{where}: its outputs hold NaN or inf")
        cos = _min_cosine(torch.from_numpy(got_single), ref_single)
        token_cos = _min_cosine(torch.from_numpy(got_multi), ref_multi)  # every token the mask keeps (masked ones are zero in both)
        worst, worst_token = min(worst, cos), min(worst_token, token_cos)
        if cos < single_bar:
            raise ExportValidationError(f"{where}: single-vector min cosine {cos:.9f} < {single_bar}")
        if token_cos < token_bar:
            raise ExportValidationError(f"{where}: multi-vector per-token min cosine {token_cos:.9f} < {token_bar}")
    log.info("language.onnx validated on CPU: min cosine %.10f single, %.10f per token, over 3 shapes", worst, worst_token)
    return {"language_min_cosine": worst, "language_token_min_cosine": worst_token}


def _min_cosine(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Min cosine over the vectors (last axis) that are not zero in the reference, computed in float64."""
    got, ref = got.double().flatten(0, -2), ref.double().flatten(0, -2)
    keep = ref.norm(dim=-1) > 0
    return torch.nn.functional.cosine_similarity(got[keep], ref[keep], dim=-1).min().item() if keep.any() else 1.0
