"""jina-clip-v2's config.json, read into frozen settings with every problem named by its key.

The checkpoint's config does not carry the text tower's sizes: upstream
builds the tower from jina-embeddings-v3's config (``text_config.
hf_model_name_or_path``) updated with ``text_config.hf_model_config_kwargs``.
So ``TextTowerConfig``'s defaults are jina-embeddings-v3's values, and any of
them can be overridden through ``hf_model_config_kwargs`` under the same key
names (jev4's tiny writer does that). Sources:

- the defaults: transformers 5.23 ``JinaEmbeddingsV3Config`` (vocab 250002,
  hidden 1024, 24 layers, 16 heads, MLP 4096, type vocab 1, pad id 1, LayerNorm
  eps 1e-5, exact "gelu", ``default_theta = 20000.0``); shared/CLIP_V2.md
  (the v2 config does not pin the rotary base; upstream uses 20000).
- the LoRA (one adaptation ``retrieval.query``, rank 4, alpha 4): shared/CLIP_V2.md;
  scale = alpha / rank as in vLLM ``bert_with_rope.py`` ``jina_merge_lora_weights``.
- vision keys and their meaning: jina-ai/openclip ``src/open_clip/model.py``
  (``CLIPVisionCfg``: head_width, pt_hw_seq_len, intp_freq, qkv_bias; heads =
  width // head_width) and ``eva_model.py`` (MLP hidden = int(width * mlp_ratio)).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from jev4.errors import ConfigError, EncodeError
from jev4.json_object import read_json_object

__all__ = ["CONFIG_NAME", "MODEL_TYPE", "ClipV2Config", "TextTowerConfig", "VisionTowerConfig", "load_config", "parse_config"]

CONFIG_NAME = "config.json"
MODEL_TYPE = "jina_clip"


@dataclass(frozen=True)
class TextTowerConfig:
    """The jina-xlm-roberta text tower; defaults are jina-embeddings-v3's (see the module doc)."""

    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    rotary_emb_base: float = 20000.0
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_adaptations: tuple[str, ...] = ("retrieval.query",)
    default_lora_task: str = "retrieval.query"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def lora_index(self) -> int:
        """Which slice of the stacked ``[n_adaptations, ...]`` LoRA tensors is the one applied."""
        return self.lora_adaptations.index(self.default_lora_task)


@dataclass(frozen=True)
class VisionTowerConfig:
    """The EVA02 vision tower, from ``vision_config``."""

    width: int
    layers: int
    head_width: int
    patch_size: int
    image_size: int
    mlp_ratio: float
    pt_hw_seq_len: int
    intp_freq: bool
    layer_norm_eps: float = 1e-6  # openclip model.py: norm_layer=partial(norm_layer, eps=1e-6)
    rope_theta: float = 10000.0  # rope_embeddings.py VisionRotaryEmbeddingFast's default, not overridden by eva_model.py

    @property
    def num_heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        """Patches per side: the conv (kernel = stride = patch) drops the remainder (512 // 14 = 36)."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class ClipV2Config:
    """Both towers plus the output settings (Matryoshka dims, default truncation)."""

    text: TextTowerConfig
    vision: VisionTowerConfig
    projection_dim: int
    matryoshka_dims: tuple[int, ...]
    truncate_dim: int | None
    torch_dtype: str

    @property
    def hidden_size(self) -> int:
        """The embedding size of both towers (no projections: ``add_projections`` is false)."""
        return self.projection_dim

    def check_truncate_dim(self, dim: object) -> int | None:
        """A valid Matryoshka dim as an int, or None for no truncation; anything else is an EncodeError."""
        if dim is None:
            return None
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise EncodeError(f"truncate_dim must be an integer or None, got {dim!r}")
        dim = int(dim)
        if dim == self.hidden_size:
            return None
        if dim not in self.matryoshka_dims:
            raise EncodeError(
                f"truncate_dim={dim} is not allowed; choose one of {sorted(self.matryoshka_dims)} or {self.hidden_size} (no truncation)"
            )
        return dim


def load_config(model_dir: str | Path) -> ClipV2Config:
    """Read and validate ``model_dir/config.json``."""
    path = Path(model_dir) / CONFIG_NAME
    raw = read_json_object(path, ConfigError, f"not found (is {model_dir} a jina-clip-v2 checkpoint?)")
    return parse_config(raw, source=str(path))


class _Reader:
    """Typed access to one JSON object; errors name ``source`` and the dotted key."""

    def __init__(self, raw: dict[str, Any], source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key} {problem}")

    def section(self, key: str, required: bool = True) -> _Reader:
        value = self.raw.get(key)
        if value is None and not required:
            return _Reader({}, self.source, f"{self.prefix}{key}.")
        if not isinstance(value, dict):
            raise self.fail(key, "is missing" if value is None else f"must be a JSON object, got {type(value).__name__}")
        return _Reader(value, self.source, f"{self.prefix}{key}.")

    def get(self, key: str, kind: type, default: Any = None, required: bool = True) -> Any:
        if key not in self.raw:
            if required:
                raise self.fail(key, f"is missing (expected {kind.__name__})")
            return default
        value = self.raw[key]
        if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if kind in (str, bool, list) and isinstance(value, kind):
            return value
        raise self.fail(key, f"must be {kind.__name__}, got {value!r}")

    def positive(self, key: str, kind: type = int, default: Any = None, required: bool = True) -> Any:
        value = self.get(key, kind, default, required)
        if value <= 0:
            raise self.fail(key, f"must be > 0, got {value!r}")
        return value

    def expect(self, key: str, wanted: Any) -> None:
        """A switch jev4 supports in one position only (the one jina-clip-v2 ships)."""
        value = self.raw.get(key)
        if value != wanted:
            raise self.fail(key, f"is {value!r}; jev4 supports jina-clip-v2's {wanted!r} only")


def _text_config(text: _Reader) -> TextTowerConfig:
    if text.raw.get("pooler_type", "mean_pooler") != "mean_pooler":
        raise text.fail("pooler_type", f"is {text.raw['pooler_type']!r}; jina-clip-v2 uses 'mean_pooler'")
    kwargs = text.section("hf_model_config_kwargs", required=False)
    defaults = TextTowerConfig()
    values: dict[str, Any] = {}
    for field in fields(TextTowerConfig):
        default = getattr(defaults, field.name)
        if field.name == "lora_adaptations":
            names = kwargs.get(field.name, list, list(default), required=False)
            if not names or not all(isinstance(n, str) for n in names):
                raise kwargs.fail(field.name, f"must be a non-empty list of names, got {names!r}")
            values[field.name] = tuple(names)
        elif field.name == "default_lora_task":
            values[field.name] = text.get(field.name, str, default, required=False)
        elif isinstance(default, float):
            values[field.name] = kwargs.positive(field.name, float, default, required=False)
        else:
            values[field.name] = kwargs.get(field.name, int, default, required=False)
            if field.name != "pad_token_id" and values[field.name] <= 0:
                raise kwargs.fail(field.name, f"must be > 0, got {values[field.name]!r}")
    config = TextTowerConfig(**values)
    if config.default_lora_task not in config.lora_adaptations:
        raise text.fail("default_lora_task", f"{config.default_lora_task!r} is not one of lora_adaptations {list(config.lora_adaptations)}")
    if config.hidden_size % config.num_attention_heads:
        raise kwargs.fail("hidden_size", f"{config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}")
    if not 0 <= config.pad_token_id < config.vocab_size:
        raise kwargs.fail("pad_token_id", f"{config.pad_token_id} is outside the vocabulary (size {config.vocab_size})")
    return config


def _vision_config(vision: _Reader) -> VisionTowerConfig:
    # The one EVA02 variant jina-clip-v2 is (shared/CLIP_V2.md): anything else would need other weights.
    for key, wanted in (("naive_swiglu", True), ("subln", True), ("rope_embeddings", True), ("qkv_bias", True), ("post_norm", False)):
        vision.expect(key, wanted)
    config = VisionTowerConfig(
        width=vision.positive("width"),
        layers=vision.positive("layers"),
        head_width=vision.positive("head_width"),
        patch_size=vision.positive("patch_size"),
        image_size=vision.positive("image_size"),
        mlp_ratio=vision.positive("mlp_ratio", float),
        pt_hw_seq_len=vision.positive("pt_hw_seq_len"),
        intp_freq=vision.get("intp_freq", bool),
    )
    if config.width % config.head_width:
        raise vision.fail("width", f"{config.width} is not a multiple of head_width {config.head_width}")
    if config.head_width % 4:
        raise vision.fail("head_width", f"{config.head_width} must be a multiple of 4 (2D RoPE: half the head per axis, in pairs)")
    if config.grid < 1:
        raise vision.fail("image_size", f"{config.image_size} is smaller than patch_size {config.patch_size}")
    if not config.intp_freq and config.pt_hw_seq_len != config.grid:
        raise vision.fail(
            "intp_freq",
            f"is false but pt_hw_seq_len {config.pt_hw_seq_len} != the patch grid {config.grid}; the RoPE table would not fit the patches",
        )
    return config


def parse_config(raw: dict[str, Any], source: str = CONFIG_NAME) -> ClipV2Config:
    """Validate a config dict into a ``ClipV2Config``; every problem names its key."""
    top = _Reader(raw, source)
    if raw.get("model_type") != MODEL_TYPE:
        raise top.fail("model_type", f"is {raw.get('model_type')!r}, expected {MODEL_TYPE!r} (jina-clip-v2)")
    if top.get("add_projections", bool, False, required=False):
        raise top.fail("add_projections", "is true; jina-clip-v2 has no projections and jev4 supports none")
    text = _text_config(top.section("text_config"))
    vision = _vision_config(top.section("vision_config"))
    projection_dim = top.positive("projection_dim")
    for name, size in (("text_config hidden_size", text.hidden_size), ("vision_config.width", vision.width)):
        if size != projection_dim:
            raise top.fail("projection_dim", f"is {projection_dim} but {name} is {size}; without projections they must be equal")
    dims = top.get("matryoshka_dimensions", list, [projection_dim], required=False)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= projection_dim for d in dims):
        raise top.fail("matryoshka_dimensions", f"must be a non-empty list of integers in 1..{projection_dim}, got {dims!r}")
    truncate = raw.get("truncate_dim")
    config = ClipV2Config(
        text=text,
        vision=vision,
        projection_dim=projection_dim,
        matryoshka_dims=tuple(sorted(set(dims))),
        truncate_dim=None,
        torch_dtype=top.get("torch_dtype", str, "float32", required=False),
    )
    try:
        checked = config.check_truncate_dim(truncate)
    except EncodeError as exc:
        raise top.fail("truncate_dim", f"is invalid: {exc}") from None
    return replace(config, truncate_dim=checked)
