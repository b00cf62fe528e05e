"""Reading and validating a jina-embeddings-v4 ``config.json``.

The file is a flat Qwen2.5-VL config (text settings at the top level, plus
nested ``text_config`` and ``vision_config``) with jina's extras on top. We
validate the extras ourselves, because a wrong ``matryoshka_dims`` or
``task_names`` would only show up later as silently wrong embeddings, and
hand the rest to transformers' own ``Qwen2_5_VLConfig``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jev4.errors import ConfigError, EncodeError, TaskError
from jev4.json_object import read_json_object

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
DEFAULT_TASKS = ("retrieval", "text-matching", "code")
# Keys that only jina's wrapper reads; transformers' config must not see them.
JINA_KEYS = (
    "task_names",
    "matryoshka_dims",
    "truncate_dim",
    "multi_vector_projector_dim",
    "single_vector_pool_strategy",
    "pretrained_peft_model_name_or_path",
    "verbosity",
    "auto_map",
    "jev4_merged_task",
)
# Set by jev4's merge: the adapter folded into the weights of this checkpoint.
MERGED_TASK_KEY = "jev4_merged_task"
SUPPORTED_POOLING = ("mean",)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the encoder needs to build prompts and pooling masks."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


@dataclass(frozen=True)
class JinaV4Config:
    """The validated settings of one checkpoint.

    ``raw`` keeps the file's dict so that exports can write it back unchanged
    apart from what they mean to change.
    """

    raw: dict[str, Any] = field(repr=False)
    task_names: tuple[str, ...]
    matryoshka_dims: tuple[int, ...]
    truncate_dim: int | None
    multi_vector_dim: int
    hidden_size: int
    num_hidden_layers: int
    special_tokens: SpecialTokens
    torch_dtype: str
    merged_task: str | None = None
    source: str = field(default=CONFIG_NAME, compare=False)

    @property
    def vision_config(self) -> dict[str, Any]:
        return dict(self.raw.get("vision_config") or {})

    def check_task(self, task: str) -> str:
        """Return ``task`` if the checkpoint knows it, else raise naming the known ones."""
        if task not in self.task_names:
            raise TaskError(f"unknown task {task!r}; this checkpoint has {list(self.task_names)}")
        return task

    def check_truncate_dim(self, dim: int | None) -> int | None:
        """Matryoshka truncation is only trained at ``matryoshka_dims`` (and the full size)."""
        if dim is None or dim == self.hidden_size:
            return None
        if dim not in self.matryoshka_dims:
            raise EncodeError(
                f"truncate_dim={dim} is not allowed; choose one of {sorted(self.matryoshka_dims)} "
                f"or {self.hidden_size} (no truncation)"
            )
        return dim

    def to_transformers(self):
        """Build transformers' ``Qwen2_5_VLConfig`` (text + vision) from the raw dict."""
        from transformers import Qwen2_5_VLConfig

        kwargs = {k: v for k, v in self.raw.items() if k not in JINA_KEYS}
        kwargs.pop("architectures", None)
        kwargs.pop("model_type", None)
        text = dict(_section(kwargs, "text_config", self.source))
        # The flat top-level text settings win where both are present: they are
        # what upstream's modelling code reads.
        for key in _TEXT_KEYS:
            if key in kwargs:
                text[key] = kwargs[key]
        text.pop("model_type", None)
        text["rope_parameters"] = _rope_parameters(_section(text, "rope_scaling", self.source), text, self.source)
        text.pop("rope_scaling", None)
        text.pop("rope_theta", None)
        vision = dict(_section(kwargs, "vision_config", self.source))
        vision.pop("model_type", None)
        try:
            cfg = Qwen2_5_VLConfig(
                text_config=text,
                vision_config=vision,
                image_token_id=self.special_tokens.image_token_id,
                video_token_id=self.special_tokens.video_token_id,
                vision_start_token_id=self.special_tokens.vision_start_token_id,
                vision_end_token_id=self.special_tokens.vision_end_token_id,
            )
        except Exception as exc:  # a library's own validation: report it against the file
            raise ConfigError(
                f"{self.source}: transformers' Qwen2_5_VLConfig refused these settings "
                f"({type(exc).__name__}: {_one_line(exc)}); fix the value it names"
            ) from exc
        return cfg


_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """A library's (possibly multi-line) message as one line, cut at ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or repr(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section(where: dict[str, Any], key: str, source: str, prefix: str = "") -> dict[str, Any]:
    """A nested section (``text_config``, ``rope_scaling``...): absent or null is empty; anything but an object is an error."""
    value = where.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {prefix}{key} must be a JSON object, got {type(value).__name__}")
    return value


def _rope_parameters(rope_scaling: dict | None, text: dict, source: str = CONFIG_NAME) -> dict[str, Any]:
    """Normalise the two spellings of M-RoPE settings into transformers 5.x ``rope_parameters``."""
    params = dict(_section(text, "rope_parameters", source, "text_config."))
    if rope_scaling:
        params.update(rope_scaling)
    params.pop("type", None)
    params["rope_type"] = "default"
    if "rope_theta" in text:
        params["rope_theta"] = text["rope_theta"]
    params.setdefault("rope_theta", 1000000.0)
    if "mrope_section" not in params:
        raise ConfigError(f"{source}: no mrope_section in rope_scaling / rope_parameters")
    return params


def load_config(model_dir: Path) -> JinaV4Config:
    """Read ``model_dir/config.json`` and validate jina's extras."""
    path = Path(model_dir) / CONFIG_NAME
    raw = read_json_object(path, ConfigError, f"not found (is {model_dir} a jina-embeddings-v4 checkpoint?)")
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> JinaV4Config:
    """Validate a config dict; every problem is reported with the offending key."""
    text_config = _section(raw, "text_config", source)
    for key in ("rope_scaling", "rope_parameters"):
        _section(raw, key, source)
        _section(text_config, key, source, "text_config.")
    text = {**text_config, **{k: raw[k] for k in _TEXT_KEYS if k in raw}}

    def need_int(key: str, where: dict = text) -> int:
        value = where.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
        return value

    hidden = need_int("hidden_size")
    heads = need_int("num_attention_heads")
    kv_heads = need_int("num_key_value_heads")
    layers = need_int("num_hidden_layers")
    need_int("intermediate_size")
    vocab = need_int("vocab_size")
    if hidden % heads:
        raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    rope = {**_section(text, "rope_parameters", source), **_section(text, "rope_scaling", source)}
    _need_positive_number(text, "rms_norm_eps", source)
    _need_positive_number(text, "rope_theta", source)
    for key in ("rope_parameters", "rope_scaling"):
        _need_positive_number(_section(text, key, source), "rope_theta", source, f"{key}.")
    section = rope.get("mrope_section")
    if not (isinstance(section, list) and len(section) == 3 and all(isinstance(s, int) for s in section)):
        raise ConfigError(f"{source}: rope_scaling.mrope_section must be three integers, got {section!r}")
    if 2 * sum(section) != hidden // heads:
        raise ConfigError(
            f"{source}: mrope_section {section} sums to {sum(section)}, expected head_dim/2 = {hidden // heads // 2}"
        )

    tasks = raw.get("task_names", list(DEFAULT_TASKS))
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks)):
        raise ConfigError(f"{source}: task_names must be a non-empty list of names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"{source}: task_names has duplicates: {tasks}")

    dims = raw.get("matryoshka_dims", [128, 256, 512, 1024, 2048])
    if not (isinstance(dims, list) and all(isinstance(d, int) and 0 < d <= hidden for d in dims)):
        raise ConfigError(f"{source}: matryoshka_dims must be integers in 1..{hidden}, got {dims!r}")
    truncate = raw.get("truncate_dim")
    if truncate is not None and truncate not in dims:
        raise ConfigError(f"{source}: truncate_dim {truncate} is not one of matryoshka_dims {dims}")

    pool = raw.get("single_vector_pool_strategy", "mean")
    if pool not in SUPPORTED_POOLING:
        raise ConfigError(f"{source}: single_vector_pool_strategy {pool!r} is not supported; jev4 knows {SUPPORTED_POOLING}")
    mv_dim = raw.get("multi_vector_projector_dim", 128)
    if not isinstance(mv_dim, int) or mv_dim <= 0:
        raise ConfigError(f"{source}: multi_vector_projector_dim must be a positive integer, got {mv_dim!r}")

    vision = raw.get("vision_config")
    if vision is None:
        raise ConfigError(f"{source}: vision_config is missing")
    if not isinstance(vision, dict):
        raise ConfigError(f"{source}: vision_config must be a JSON object, got {type(vision).__name__}")
    out_hidden = vision.get("out_hidden_size", hidden)
    if out_hidden != hidden:
        raise ConfigError(f"{source}: vision_config.out_hidden_size {out_hidden} != hidden_size {hidden}")

    def in_vocab(key: str, value: Any, note: str = "") -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        if not 0 <= value < vocab:
            raise ConfigError(
                f"{source}: {key} {value}{note} is outside the vocabulary: token ids must be in 0..{vocab - 1} "
                f"(vocab_size {vocab}); fix {key} or vocab_size"
            )

    def token(key: str, default: int) -> int:
        value = raw.get(key, default)
        in_vocab(key, value, "" if key in raw else " (the default; the file does not set it)")
        return value

    # Text token ids: null is allowed (no such token); eos_token_id may be a list.
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = text.get(key)
        for one in value if isinstance(value, list) else [value]:
            if one is not None:
                in_vocab(key, one)
    if raw.get("vision_token_id") is not None:
        in_vocab("vision_token_id", raw["vision_token_id"])

    special = SpecialTokens(
        image_token_id=token("image_token_id", 151655),
        video_token_id=token("video_token_id", 151656),
        vision_start_token_id=token("vision_start_token_id", 151652),
        vision_end_token_id=token("vision_end_token_id", 151653),
    )
    merged = raw.get(MERGED_TASK_KEY)
    if merged is not None and merged not in tasks:
        raise ConfigError(f"{source}: {MERGED_TASK_KEY} {merged!r} is not one of task_names {tasks}")
    return JinaV4Config(
        raw=raw,
        merged_task=merged,
        task_names=tuple(tasks),
        matryoshka_dims=tuple(sorted(d for d in dims if d < hidden)),
        truncate_dim=truncate if truncate != hidden else None,
        multi_vector_dim=mv_dim,
        hidden_size=hidden,
        num_hidden_layers=layers,
        special_tokens=special,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        source=source,
    )


def _need_positive_number(where: dict[str, Any], key: str, source: str, prefix: str = "") -> None:
    """``rms_norm_eps``, ``rope_theta``: absent is the library default; else a positive finite number.

    Zero or a negative value does not fail in transformers: it makes the network
    produce NaN, which would later look like an fp16 overflow.
    """
    if key not in where:
        return
    value = where[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{source}: {prefix}{key} must be a positive finite number, got {value!r}")
