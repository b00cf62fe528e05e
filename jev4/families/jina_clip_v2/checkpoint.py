"""jina-clip-v2's ``model.safetensors``: the key layout as a table, checked whole, then converted.

Every key in the file must be one the table expects (else an error naming
it), every expected key must be there (else an error naming it), and every
shape must match (else an error naming key, expected and found shape), all
before any tensor is read. Then the always-on LoRA is merged in fp32, the
text tower's fused ``Wqkv`` is split, and the text keys are renamed into
transformers' ``JinaEmbeddingsV3Model``; the vision keys keep their names
(jev4's EVA02 module uses upstream's). Safetensors only: nothing is unpickled.

Sources of the layout (the key names and shapes are shared/CLIP_V2.md's, from
graphs traced from the real model):

- text renaming ``emb_ln`` -> ``embeddings.LayerNorm``, ``encoder.layers`` ->
  ``layers``, ``mixer.out_proj`` -> ``self_attn.o_proj``, ``norm1`` ->
  ``post_attention_layernorm``, ``norm2`` -> ``post_mlp_layernorm``, ``mixer.Wqkv``
  chunked in three along dim 0 into q/k/v: transformers 5.23
  ``conversion_mapping.py``, entry ``"jina_embeddings_v3"``; vLLM
  ``bert_with_rope.py`` ``JinaRobertaModel.hf_to_vllm_mapper`` maps the same names.
- the LoRA merge (``parametrizations.weight.original`` + ``0.lora_A`` /
  ``0.lora_B``, one slice per adaptation, scale alpha / rank, A and B swapped for
  embedding tables): vLLM ``bert_with_rope.py`` ``JinaRobertaModel.jina_merge_lora_weights``.
- vision names: jina-ai/openclip ``src/open_clip/eva_model.py`` (``EVAVisionTransformer``,
  ``Block``, ``Attention`` with ``subln``, ``SwiGLU``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from jev4.errors import CheckpointError
from jev4.families.jina_clip_v2.config import ClipV2Config, TextTowerConfig, VisionTowerConfig

log = logging.getLogger(__name__)

__all__ = [
    "LOGIT_SCALE",
    "SAFETENSORS_NAME",
    "TEXT_PREFIX",
    "VISION_PREFIX",
    "ClipV2Weights",
    "expected_layout",
    "merge_embedding_lora",
    "merge_linear_lora",
    "read_checkpoint",
]

SAFETENSORS_NAME = "model.safetensors"
TEXT_PREFIX = "text_model.transformer.roberta."
VISION_PREFIX = "vision_model."
LOGIT_SCALE = "logit_scale"
_ORIGINAL = ".parametrizations.weight.original"
_LORA_A = ".parametrizations.weight.0.lora_A"
_LORA_B = ".parametrizations.weight.0.lora_B"
_LISTED = 8  # names quoted in one error; the rest are counted


class Kind(Enum):
    NORM = "norm"  # weight and bias, plain
    LINEAR = "linear"  # LoRA-parametrised weight + plain bias
    EMBEDDING = "embedding"  # LoRA-parametrised table, A and B swapped


@dataclass(frozen=True)
class TextModule:
    """One module of the text checkpoint: its source name, its target name(s) in ``JinaEmbeddingsV3Model``, its weight shape."""

    source: str
    targets: tuple[str, ...]
    kind: Kind
    shape: tuple[int, int] | tuple[int]

    def keys(self, text: TextTowerConfig) -> dict[str, tuple[int, ...]]:
        """Source key -> shape for this module, all under ``TEXT_PREFIX``."""
        n, r = len(text.lora_adaptations), text.lora_rank
        p = TEXT_PREFIX + self.source
        if self.kind is Kind.NORM:
            return {p + ".weight": self.shape, p + ".bias": self.shape}
        rows, cols = self.shape
        if self.kind is Kind.LINEAR:
            return {p + _ORIGINAL: self.shape, p + _LORA_A: (n, r, cols), p + _LORA_B: (n, rows, r), p + ".bias": (rows,)}
        return {p + _ORIGINAL: self.shape, p + _LORA_A: (n, rows, r), p + _LORA_B: (n, r, cols)}


def text_modules(text: TextTowerConfig) -> list[TextModule]:
    """The text tower's modules in checkpoint order (see the module doc for the renaming's source)."""
    h, i = text.hidden_size, text.intermediate_size
    modules = [
        TextModule("embeddings.word_embeddings", ("embeddings.word_embeddings",), Kind.EMBEDDING, (text.vocab_size, h)),
        TextModule("embeddings.token_type_embeddings", ("embeddings.token_type_embeddings",), Kind.EMBEDDING, (text.type_vocab_size, h)),
        TextModule("emb_ln", ("embeddings.LayerNorm",), Kind.NORM, (h,)),
    ]
    for n in range(text.num_hidden_layers):
        src, dst = f"encoder.layers.{n}.", f"layers.{n}."
        qkv = tuple(f"{dst}self_attn.{x}_proj" for x in "qkv")
        modules += [
            TextModule(src + "mixer.Wqkv", qkv, Kind.LINEAR, (3 * h, h)),
            TextModule(src + "mixer.out_proj", (dst + "self_attn.o_proj",), Kind.LINEAR, (h, h)),
            TextModule(src + "norm1", (dst + "post_attention_layernorm",), Kind.NORM, (h,)),
            TextModule(src + "mlp.fc1", (dst + "mlp.fc1",), Kind.LINEAR, (i, h)),
            TextModule(src + "mlp.fc2", (dst + "mlp.fc2",), Kind.LINEAR, (h, i)),
            TextModule(src + "norm2", (dst + "post_mlp_layernorm",), Kind.NORM, (h,)),
        ]
    return modules


def vision_keys(vision: VisionTowerConfig) -> dict[str, tuple[int, ...]]:
    """Vision key (without ``VISION_PREFIX``) -> shape; the names are also jev4's module names."""
    w, m, p = vision.width, vision.mlp_hidden, vision.patch_size
    keys: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, w),
        "pos_embed": (1, vision.grid**2 + 1, w),
        "patch_embed.proj.weight": (w, 3, p, p),
        "patch_embed.proj.bias": (w,),
    }
    for n in range(vision.layers):
        b = f"blocks.{n}."
        keys.update({b + f"{norm}.{x}": (w,) for norm in ("norm1", "norm2", "attn.inner_attn_ln") for x in ("weight", "bias")})
        keys.update({b + f"attn.{x}_proj.weight": (w, w) for x in "qkv"})
        keys.update({b + "attn.q_bias": (w,), b + "attn.v_bias": (w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,)})
        keys.update({b + f"mlp.{x}.weight": (m, w) for x in ("w1", "w2")})
        keys.update({b + f"mlp.{x}.bias": (m,) for x in ("w1", "w2")})
        keys.update({b + "mlp.ffn_ln.weight": (m,), b + "mlp.ffn_ln.bias": (m,), b + "mlp.w3.weight": (w, m), b + "mlp.w3.bias": (w,)})
    keys.update({"norm.weight": (w,), "norm.bias": (w,)})
    return keys


def expected_layout(config: ClipV2Config) -> dict[str, tuple[int, ...]]:
    """Every key of ``model.safetensors`` and its shape, in file order (text, vision, logit_scale)."""
    layout: dict[str, tuple[int, ...]] = {}
    for module in text_modules(config.text):
        layout.update(module.keys(config.text))
    layout.update({VISION_PREFIX + k: s for k, s in vision_keys(config.vision).items()})
    layout[LOGIT_SCALE] = ()
    return layout


def merge_linear_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + (B @ A) * scale`` in fp32 for a Linear: ``W [out, in]``, ``A [r, in]``, ``B [out, r]``.

    The LoRA is always on (one adaptation, applied to queries and documents
    alike), so merging it once equals applying it at every call.
    """
    return weight.float() + (lora_b.float() @ lora_a.float()) * scale


def merge_embedding_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + (A @ B).view(W) * scale`` in fp32 for an embedding table: ``W [vocab, H]``, ``A [vocab, r]``, ``B [r, H]``.

    For embedding tables upstream's parametrisation swaps the roles: ``lora_A``
    is the left factor ``[vocab, r]`` and ``lora_B`` the right ``[r, H]``. vLLM's
    ``bert_with_rope.py`` (``jina_merge_lora_weights``: for names containing
    "embeddings" it takes B from ``lora_A`` and A from ``lora_B``, then
    ``matmul(B, A).view(shape)``) and shared/CLIP_V2.md state this.
    """
    return weight.float() + (lora_a.float() @ lora_b.float()).view(weight.shape) * scale


@dataclass(frozen=True)
class ClipV2Weights:
    """The converted checkpoint, fp32: state dicts for each tower and the (unused for embedding) logit scale."""

    text: dict[str, torch.Tensor]
    vision: dict[str, torch.Tensor]
    logit_scale: torch.Tensor


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def check_layout(found: dict[str, tuple[int, ...]], config: ClipV2Config, source: str) -> None:
    """Raise naming every unexpected key, every missing key, or the first wrong shape (expected vs found)."""
    expected = expected_layout(config)
    extra = [k for k in found if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} key(s) that jina-clip-v2's layout does not have: {_listed(extra)}")
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} key(s) missing: {_listed(missing)}")
    for key, shape in expected.items():
        if tuple(found[key]) != shape:
            raise CheckpointError(f"{source}: {key} has shape {list(found[key])}, expected {list(shape)} (from config.json)")


def _convert_text(tensors: dict[str, torch.Tensor], text: TextTowerConfig) -> dict[str, torch.Tensor]:
    """Merge the LoRA slice ``text.lora_index``, split fused weights, rename into ``JinaEmbeddingsV3Model``."""
    index, scale = text.lora_index, text.lora_scale
    out: dict[str, torch.Tensor] = {}
    for module in text_modules(text):
        p = TEXT_PREFIX + module.source
        if module.kind is Kind.NORM:
            weight, bias = tensors[p + ".weight"].float(), tensors[p + ".bias"].float()
        elif module.kind is Kind.LINEAR:
            weight = merge_linear_lora(tensors[p + _ORIGINAL], tensors[p + _LORA_A][index], tensors[p + _LORA_B][index], scale)
            bias = tensors[p + ".bias"].float()
        else:
            weight = merge_embedding_lora(tensors[p + _ORIGINAL], tensors[p + _LORA_A][index], tensors[p + _LORA_B][index], scale)
            bias = None
        parts = len(module.targets)
        for target, w in zip(module.targets, weight.chunk(parts, dim=0)):
            out[target + ".weight"] = w.contiguous()
        if bias is not None:
            for target, b in zip(module.targets, bias.chunk(parts, dim=0)):
                out[target + ".bias"] = b.contiguous()
    return out


def read_checkpoint(model_dir: str | Path, config: ClipV2Config) -> ClipV2Weights:
    """Check ``model_dir/model.safetensors`` against the layout, then load and convert it (fp32)."""
    from safetensors import safe_open

    path = Path(model_dir) / SAFETENSORS_NAME
    if not path.is_file():
        pickled = [p.name for p in Path(model_dir).glob("*.bin")]
        hint = f" (found {pickled}: jev4 reads safetensors only and never unpickles)" if pickled else ""
        raise CheckpointError(f"{path}: not found{hint}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            check_layout(found, config, str(path))
            tensors = {key: handle.get_tensor(key) for key in found}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupt header or truncated data
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: {key} has dtype {tensor.dtype}, expected a floating-point dtype")
    weights = ClipV2Weights(
        text=_convert_text(tensors, config.text),
        vision={key[len(VISION_PREFIX) :]: t.float() for key, t in tensors.items() if key.startswith(VISION_PREFIX)},
        logit_scale=tensors[LOGIT_SCALE].float(),
    )
    log.info("read %s: %d tensors, LoRA %r merged (scale %g)", path, len(tensors), config.text.default_lora_task, config.text.lora_scale)
    return weights
