"""``jev4-export --model CLIP_V2_DIR``: jina-clip-v2 as ONNX graphs, each usable alone.

- ``text.onnx``: ``input_ids``, ``attention_mask`` int64 ``[batch, seq]`` ->
  ``text_embeds`` float32 ``[batch, 1024]``: the mean over the mask of the
  last hidden states, not normalised (as v4's ``language.onnx`` hands its
  pooled vector to the runtime, which truncates to the Matryoshka dim and then
  L2-normalises).
- ``vision.onnx``: ``pixel_values`` float32 ``[batch, 3, 512, 512]`` (already
  resized, cropped and normalised: ``preprocess.ImagePreprocessor``) ->
  ``image_embeds`` float32 ``[batch, 1024]``: the CLS token after the final norm.
- with ``--jina-onnx-signature``, instead: ``model.onnx``, one graph with the
  inputs and outputs of Jina's published ONNX (shared/CLIP_V2.md "What peers
  ship"): ``input_ids`` int64 ``[text_batch, seq]`` and ``pixel_values``
  ``[image_batch, 3, 512, 512]`` in (no attention mask: the graph masks
  ``input_ids != pad``, as upstream does), ``text_embeddings``,
  ``image_embeddings``, ``l2norm_text_embeddings``, ``l2norm_image_embeddings``
  out. The two batch axes are independent, and either may be 0, so a client
  embedding only texts may pass an empty image batch instead of a dummy image.

Inputs and outputs stay float32 at every precision; an fp16 graph casts
inside. fp16 keeps in fp32 what can overflow or lose its meaning in half
precision (``FP16_KEPT_FP32``, reasons in docs/jina-clip-v2.md "ONNX export").

The export follows v4's (``jev4.export.onnx``): torch's dynamo exporter with
dynamic axes and external data, the output written in a temporary directory
and published atomically, the manifest (checksums, versions, settings) written
last, and before publishing every graph run on onnxruntime's CPU provider at
several shapes against the fp32 torch reference (``ClipV2Encoder``'s towers);
an export below its precision's bar is refused and nothing is published.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jev4.atomic import atomic_output_dir, claim_output
from jev4.errors import CheckpointError, SettingsError
from jev4.export.graphs import GraphSpec, TensorSpec
from jev4.export.manifest import Manifest, write_manifest
from jev4.export.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportValidationError, _dynamic_shapes, _min_cosine, require_onnx
from jev4.families.jina_clip_v2.config import CONFIG_NAME, ClipV2Config
from jev4.families.jina_clip_v2.encoder import ClipV2Encoder
from jev4.families.jina_clip_v2.network import ClipV2TextTower, EvaVisionTower, SwiGLU

log = logging.getLogger(__name__)

__all__ = [
    "FAMILY",
    "FP16_KEPT_FP32",
    "ClipV2OnnxSettings",
    "export_clip_v2_onnx",
    "graph_specs",
    "half_towers",
    "text_probes",
    "vision_probes",
]

FAMILY = "jina-clip-v2"  # contents.family in the manifest: what jev4.runtime.load dispatches on
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
WEIGHT_PRECISIONS = ("int8",)
SIDE_FILES = (CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
JINA_OUTPUTS = ("text_embeddings", "image_embeddings", "l2norm_text_embeddings", "l2norm_image_embeddings")
# Min cosine (per row, against the fp32 torch reference) an export must reach before it is published. fp32 measures
# 1 - 1e-7 or closer on the tiny checkpoint; fp16 0.99999 (tiny, docs/jina-clip-v2.md); w-int8 0.998.
VALIDATION_BARS = {"fp32": 1 - 1e-5, "fp16": 0.999, "w-int8": 0.99}
# What an fp16 graph computes in fp32, and why (docs/jina-clip-v2.md "ONNX export").
FP16_KEPT_FP32 = {
    "layer_norm": "every LayerNorm (text emb_ln / post-attention / post-MLP; vision norm1, norm2, inner_attn_ln, ffn_ln, norm): "
    "input cast to fp32, weights fp32, as upstream's LayerNormFp32",
    "swiglu_gate": "vision SwiGLU silu(w1 x) * w2 x: the product of two unnormalised projections, fed to ffn_ln",
    "text_rotary": "the rotary angles position * inv_freq (positions up to 8191; fp16 spacing there is 4)",
    "vision_rope_tables": "the 2D RoPE cos/sin tables, cast to fp16 at use (values in [-1, 1])",
    "mean_pooling": "the masked sum and count over up to 8192 tokens",
    "outputs": "graph outputs (and the Jina signature's L2 norms)",
}


@dataclass(frozen=True)
class ClipV2OnnxSettings:
    """Options of a jina-clip-v2 ONNX export; recorded verbatim in the manifest."""

    model: str
    out: str
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    jina_signature: bool = False
    weights: str | None = None
    validate: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SettingsError(f"--dtype {self.dtype}: jina-clip-v2 ONNX exports are {' or '.join(DTYPES)}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise SettingsError(f"--opset {self.opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} (torch.onnx's exporter starts at {MIN_OPSET})")
        if self.weights is not None:
            if self.weights not in WEIGHT_PRECISIONS:
                raise SettingsError(f"--weights {self.weights}: jina-clip-v2 supports {', '.join(WEIGHT_PRECISIONS)} (onnxruntime dynamic quantization)")
            if self.dtype != "fp32":
                raise SettingsError(f"--weights {self.weights} quantizes an fp32 graph for CPU; drop --dtype {self.dtype}")

    @property
    def precision(self) -> str:
        """What the graphs compute in: ``fp32``, ``fp16`` or ``w-int8`` (as ``jev4.export.onnx_weights.precision_name``)."""
        return f"w-{self.weights}" if self.weights else self.dtype

    def sources(self) -> tuple[str, ...]:
        """What the run reads: OUT may not be, hold or sit inside it."""
        return (self.model,)


# --------------------------------------------------------------------------- graph specs


def graph_specs(config: ClipV2Config, jina_signature: bool) -> dict[str, GraphSpec]:
    """The graphs an export writes, by name: ``text`` and ``vision``, or ``jina`` alone."""
    hidden, size = config.hidden_size, config.vision.image_size
    if jina_signature:
        outputs = tuple(TensorSpec(name, "float32", ("text_batch" if "text" in name else "image_batch", hidden)) for name in JINA_OUTPUTS)
        return {
            "jina": GraphSpec(
                name="jina",
                file="model.onnx",
                inputs=(TensorSpec("input_ids", "int64", ("text_batch", "seq")), TensorSpec("pixel_values", "float32", ("image_batch", 3, size, size))),
                outputs=outputs,
            )
        }
    return {
        "text": GraphSpec(
            name="text",
            file="text.onnx",
            inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")), TensorSpec("attention_mask", "int64", ("batch", "seq"))),
            outputs=(TensorSpec("text_embeds", "float32", ("batch", hidden)),),
        ),
        "vision": GraphSpec(
            name="vision",
            file="vision.onnx",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, size, size)),),
            outputs=(TensorSpec("image_embeds", "float32", ("batch", hidden)),),
        ),
    }


# --------------------------------------------------------------------------- what the graphs compute


class TextGraph(nn.Module):
    """``text.onnx``: the text tower's pooled vector, float32."""

    def __init__(self, tower: ClipV2TextTower):
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tower(input_ids, attention_mask).float()


class VisionGraph(nn.Module):
    """``vision.onnx``: float32 pixels in (cast to the tower's dtype inside), the CLS vector out, float32."""

    def __init__(self, tower: EvaVisionTower):
        super().__init__()
        self.tower = tower
        self.dtype = tower.cls_token.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values.to(self.dtype)).float()


class JinaSignatureGraph(nn.Module):
    """``model.onnx`` with Jina's published names: the mask is ``input_ids != pad`` (openclip ``hf_model.py``)."""

    def __init__(self, text: ClipV2TextTower, vision: EvaVisionTower, pad_token_id: int):
        super().__init__()
        self.text, self.vision, self.pad_token_id = TextGraph(text), VisionGraph(vision), pad_token_id

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        text = self.text(input_ids, (input_ids != self.pad_token_id).to(torch.int64))
        image = self.vision(pixel_values)
        return text, image, F.normalize(text, dim=-1), F.normalize(image, dim=-1)


# --------------------------------------------------------------------------- fp16


class LayerNormFp32(nn.Module):
    """A LayerNorm computed in fp32 and cast back to its input's dtype (upstream's ``LayerNormFp32``, openclip ``transformer.py``).

    ONNX's LayerNormalization accumulates in fp32 already (``stash_type`` 1),
    but not every runtime honours that, and the scale/shift would be fp16; so
    the whole op runs in fp32 at the cost of two casts.
    """

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float())
        self.bias = nn.Parameter(norm.bias.detach().float()) if norm.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class SwiGLUFp32Gate(nn.Module):
    """The vision SwiGLU with ``silu(w1 x) * w2 x`` and ``ffn_ln`` in fp32; ``w1``, ``w2``, ``w3`` stay fp16."""

    def __init__(self, mlp: SwiGLU):
        super().__init__()
        self.w1, self.w2, self.w3 = mlp.w1, mlp.w2, mlp.w3
        self.ffn_ln = mlp.ffn_ln if isinstance(mlp.ffn_ln, LayerNormFp32) else LayerNormFp32(mlp.ffn_ln)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(self.w1(x).float()) * self.w2(x).float()
        return self.w3(self.ffn_ln(gate).to(x.dtype))


def _replace_modules(root: nn.Module, kind: type, make) -> int:
    """Replace every submodule of type ``kind`` by ``make(module)``; returns how many."""
    targets = [(name, module) for name, module in root.named_modules() if isinstance(module, kind) and name]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, make(module))
    return len(targets)


def half_towers(text: ClipV2TextTower, vision: EvaVisionTower) -> tuple[ClipV2TextTower, EvaVisionTower]:
    """fp16 copies of both towers with ``FP16_KEPT_FP32`` in fp32; the originals are left as they are.

    Parameters go to fp16, buffers do not: the text rotary ``inv_freq`` and the
    vision RoPE tables are buffers, so they stay fp32 (``nn.Module.half`` would
    round them too). Mean pooling is fp32 in ``network.mean_pool`` already.
    """
    text, vision = copy.deepcopy(text), copy.deepcopy(vision)
    for tower in (text, vision):
        _replace_modules(tower, SwiGLU, SwiGLUFp32Gate)
        _replace_modules(tower, nn.LayerNorm, LayerNormFp32)
        for module in tower.modules():
            if isinstance(module, LayerNormFp32):
                continue
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.to(torch.float16)
    return text.eval(), vision.eval()


# --------------------------------------------------------------------------- export


def _export_graph(module: nn.Module, args: tuple, spec: GraphSpec, path: Path, opset: int) -> None:
    """One graph with ``spec``'s names and dynamic axes (dynamo exporter, weights as external data)."""
    import onnx

    started = time.perf_counter()
    torch.onnx.export(
        module.eval(),
        args,
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


def _example_inputs(config: ClipV2Config) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Text batch 2 x 5 with padding, image batch 3: distinct sizes, so that no axis is traced as a constant."""
    pad = config.text.pad_token_id
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, pad, pad]])
    size = config.vision.image_size
    return (ids, (ids != pad).to(torch.int64)), torch.zeros(3, 3, size, size)


def export_graphs(text: ClipV2TextTower, vision: EvaVisionTower, config: ClipV2Config, out_dir: Path, jina_signature: bool, opset: int) -> dict[str, GraphSpec]:
    """Write the graphs of ``graph_specs`` into ``out_dir`` from the given towers (fp32 or ``half_towers``)."""
    specs = graph_specs(config, jina_signature)
    (ids, mask), pixels = _example_inputs(config)
    with torch.no_grad():
        if jina_signature:
            graph = JinaSignatureGraph(text, vision, config.text.pad_token_id)
            _export_graph(graph, (ids, pixels), specs["jina"], out_dir / specs["jina"].file, opset)
        else:
            _export_graph(TextGraph(text), (ids, mask), specs["text"], out_dir / specs["text"].file, opset)
            _export_graph(VisionGraph(vision), (pixels,), specs["vision"], out_dir / specs["vision"].file, opset)
    return specs


def _copy_side_files(model_dir: Path, out_dir: Path) -> None:
    """config.json and the tokenizer files, so that the artifact loads alone (``ClipV2OnnxEncoder``)."""
    for name in SIDE_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)


def export_clip_v2_onnx(settings: ClipV2OnnxSettings, progress: bool = True, output_codec=None) -> Path:
    """Export ``settings.model`` (a jina-clip-v2 checkpoint directory) to ``settings.out`` (atomically); returns OUT."""
    with claim_output(settings.out, settings.force, settings.sources()):
        return _export(settings, output_codec)


def _export(settings: ClipV2OnnxSettings, output_codec) -> Path:
    require_onnx()
    model_dir = Path(settings.model).expanduser()
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such directory (jina-clip-v2 exports read a local checkpoint directory)")
    started = time.perf_counter()
    reference = ClipV2Encoder.from_pretrained(model_dir, dtype="fp32")  # the towers are exported from, and checked against, it
    config = reference.config
    if settings.dtype == "fp16":
        text, vision = half_towers(reference.text_tower, reference.vision_tower)
    else:
        text, vision = reference.text_tower, reference.vision_tower
    contents: dict = {"family": FAMILY, "precision": settings.precision, "float_dtype": "float16" if settings.dtype == "fp16" else "float32", "opset": settings.opset}
    if settings.dtype == "fp16":
        contents["kept_fp32"] = FP16_KEPT_FP32
    with atomic_output_dir(settings.out, force=settings.force) as tmp:
        specs = export_graphs(text, vision, config, tmp, settings.jina_signature, settings.opset)
        contents["graphs"] = {name: spec.to_json() for name, spec in specs.items()}
        if settings.weights is not None:
            from jev4.export.onnx_weights import WeightQuantSettings, quantize_weights

            recipe = WeightQuantSettings(settings.weights)
            contents["weights"] = {**recipe.to_json(), "graphs": {name: quantize_weights(tmp / spec.file, recipe) for name, spec in specs.items()}}
        _copy_side_files(model_dir, tmp)
        contents["validation"] = check_graphs(tmp, specs, reference, settings.precision) if settings.validate else {}
        if output_codec is not None:
            contents["output_codec"] = output_codec.describe()
            output_codec.write(tmp)
        contents["export_seconds"] = round(time.perf_counter() - started, 1)
        write_manifest(
            tmp,
            Manifest(kind="onnx", source=str(model_dir), settings={**asdict(settings), "source_dtype": config.torch_dtype}, contents=contents),
        )
    return Path(settings.out)


# --------------------------------------------------------------------------- self-check


def text_probes(config: ClipV2Config, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, attention_mask) at 1 x 1, 3 x 17 and 4 x 64, right-padded with the pad id, ragged, seeded.

    Batch 1 x 1 catches an axis specialised to the example's size, 3 x 17
    odd sizes, 4 x 64 padding. Real ids are never the pad id (the Jina
    signature graph derives its mask from them).
    """
    rng = np.random.default_rng(seed)
    pad = config.text.pad_token_id
    for batch, seq in ((1, 1), (3, 17), (4, 64)):
        lengths = rng.integers(1, seq + 1, size=batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(0, config.text.vocab_size - 1, size=(batch, seq)).astype(np.int64)
        ids = np.where(ids >= pad, ids + 1, ids)  # skip the pad id
        yield np.where(mask == 1, ids, pad), mask


def vision_probes(config: ClipV2Config, seed: int = 0) -> Iterator[np.ndarray]:
    """Normalised-pixel batches of 1 and 2 (standard normal, seeded): two batch sizes, few images (a 512 px image is costly)."""
    rng = np.random.default_rng(seed)
    size = config.vision.image_size
    for batch in (1, 2):
        yield rng.standard_normal((batch, 3, size, size)).astype(np.float32)


def _check(where: str, got: np.ndarray, ref: torch.Tensor, bar: float) -> float:
    if not np.isfinite(got).all():
        raise ExportValidationError(f"{where}: its output holds NaN or inf")
    if got.shape != tuple(ref.shape):
        raise ExportValidationError(f"{where}: output shape {got.shape}, torch gives {tuple(ref.shape)}")
    cos = _min_cosine(torch.from_numpy(got), ref)
    if cos < bar:
        raise ExportValidationError(f"{where}: min cosine {cos:.9f} < {bar} against the fp32 torch reference")
    return cos


def check_graphs(root: Path, specs: dict[str, GraphSpec], reference: ClipV2Encoder, precision: str) -> dict[str, float]:
    """Run the written graphs on onnxruntime CPU at several shapes against the fp32 torch towers; refuse below the bar.

    Catches a wrong export, an axis frozen by tracing and an fp16 overflow
    before the artifact is published. Returns the min cosines, for the manifest.
    """
    import onnxruntime as ort

    bar = VALIDATION_BARS[precision]
    config = reference.config
    sessions = {name: ort.InferenceSession(str(root / spec.file), providers=["CPUExecutionProvider"]) for name, spec in specs.items()}
    texts = list(text_probes(config))
    images = list(vision_probes(config))
    with torch.inference_mode():
        text_refs = [reference.text_tower(torch.from_numpy(ids), torch.from_numpy(mask)) for ids, mask in texts]
        image_refs = [reference.vision_tower(torch.from_numpy(pixels)) for pixels in images]
    worst = {"text_min_cosine": 1.0, "vision_min_cosine": 1.0}
    if "jina" in sessions:
        # Each text probe with an image batch of 1, 2, then 0 (an empty image batch must work too).
        image_feeds = [*images, np.zeros((0, *images[0].shape[1:]), dtype=np.float32)]
        image_feed_refs = [*image_refs, torch.zeros(0, config.hidden_size)]
        for (ids, _), text_ref, pixels, image_ref in zip(texts, text_refs, image_feeds, image_feed_refs):
            text, image, text_l2, image_l2 = sessions["jina"].run(None, {"input_ids": ids, "pixel_values": pixels})
            where = f"model.onnx ({precision}) at text {ids.shape[0]} x {ids.shape[1]}, images {pixels.shape[0]}"
            worst["text_min_cosine"] = min(worst["text_min_cosine"], _check(where, text, text_ref, bar), _check(where, text_l2, text_ref, bar))
            if len(pixels):
                worst["vision_min_cosine"] = min(worst["vision_min_cosine"], _check(where, image, image_ref, bar), _check(where, image_l2, image_ref, bar))
            for name, value in (("l2norm_text_embeddings", text_l2), ("l2norm_image_embeddings", image_l2)):
                if len(value) and np.abs(np.linalg.norm(value, axis=-1) - 1).max() > 1e-4:
                    raise ExportValidationError(f"{where}: {name} are not unit vectors")
    else:
        for (ids, mask), ref in zip(texts, text_refs):
            (got,) = sessions["text"].run(None, {"input_ids": ids, "attention_mask": mask})
            cos = _check(f"text.onnx ({precision}) at batch {ids.shape[0]} x seq {ids.shape[1]}", got, ref, bar)
            worst["text_min_cosine"] = min(worst["text_min_cosine"], cos)
        for pixels, ref in zip(images, image_refs):
            (got,) = sessions["vision"].run(None, {"pixel_values": pixels})
            worst["vision_min_cosine"] = min(worst["vision_min_cosine"], _check(f"vision.onnx ({precision}) at batch {pixels.shape[0]}", got, ref, bar))
    log.info("%s (%s) validated on CPU: text min cosine %.9f, vision min cosine %.9f", ", ".join(s.file for s in specs.values()), precision, worst["text_min_cosine"], worst["vision_min_cosine"])
    return worst
