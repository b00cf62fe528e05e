"""The text-only layout of a merged checkpoint: a standard Qwen2 model plus sentence-transformers metadata.

For text input the three M-RoPE sections share one position id, so
Qwen2.5-VL's language model with M-RoPE computes exactly what a plain Qwen2
with 1-D RoPE computes. Written as a Qwen2 checkpoint, the merged model loads
in transformers' ``AutoModel`` and sentence-transformers as it is.

The layout is the one other tools read without help:
- tensor names as ``Qwen2Model.save_pretrained`` writes them (``layers.0...``,
  ``embed_tokens.weight``, ``norm.weight``; no ``model.`` prefix), which is
  what loaders keyed on architecture ``Qwen2Model`` expect (llama.cpp's
  converter, for one);
- the multi-vector projector, which no such tool knows, in a folder of its
  own (``PROJECTOR_FILE``): an engine that loads every ``*.safetensors`` at
  the top of the folder (vLLM does, without an index) never sees it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jev4.model.config import JinaV4Config
from jev4.model.preprocess import PREFIXES, QUERY_ONLY_TASKS

PROJECTOR_FILE = "multi_vector_projector/model.safetensors"
_LANGUAGE_PREFIX = "model.language_model."


def qwen2_key(name: str) -> str:
    """An in-memory language-model tensor name as ``Qwen2Model.save_pretrained`` writes it (no prefix)."""
    if not name.startswith(_LANGUAGE_PREFIX):
        raise ValueError(f"{name!r} is not a language-model tensor")
    return name[len(_LANGUAGE_PREFIX) :]
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
    "attention_dropout",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def qwen2_config(config: JinaV4Config, torch_dtype: str) -> dict[str, Any]:
    """A Qwen2 config with the language model's settings; RoPE is plain (M-RoPE == RoPE for text)."""
    raw = config.raw
    text = {**(raw.get("text_config") or {}), **{k: raw[k] for k in _TEXT_KEYS if k in raw}}
    rope = {**(text.get("rope_parameters") or {}), **(text.get("rope_scaling") or raw.get("rope_scaling") or {})}
    theta = float(raw.get("rope_theta", text.get("rope_theta", rope.get("rope_theta", 1000000.0))))
    out = {k: text[k] for k in _TEXT_KEYS if k in text}
    out.update(
        {
            "architectures": ["Qwen2Model"],
            "model_type": "qwen2",
            "rope_theta": theta,
            "rope_scaling": None,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": config.num_hidden_layers,
            "tie_word_embeddings": True,
            "use_cache": False,
            "torch_dtype": torch_dtype,
            "jev4_multi_vector_projector": PROJECTOR_FILE,
            "jev4_matryoshka_dims": list(config.matryoshka_dims),
        }
    )
    return out


def sentence_transformers_files(out: Path, config: JinaV4Config, task: str, max_seq_length: int) -> None:
    """modules.json (Transformer -> mean Pooling -> Normalize) and the task's prompts."""
    passage = PREFIXES["query"] if task in QUERY_ONLY_TASKS else PREFIXES["passage"]
    _write_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    (out / "1_Pooling").mkdir(exist_ok=True)
    _write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": config.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    (out / "2_Normalize").mkdir(exist_ok=True)
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": {"query": PREFIXES["query"], "passage": passage},
            "default_prompt_name": "query",
            "similarity_fn_name": "cosine",
        },
    )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
