"""Writing a tiny jina-clip-v2 checkpoint in the exact upstream layout.

The real weights cannot be downloaded here (and CC-BY-NC-4.0 forbids shipping
them), so tests run on a checkpoint with upstream's file names, config keys
and tensor keys (shared/CLIP_V2.md; ``checkpoint.expected_layout`` is the one
table both the writer and the reader use) at toy size: seeded random bf16
weights, LoRA ``A`` and ``B`` both non-zero so that the merge changes the
outputs, and a small XLM-RoBERTa-style tokenizer (Unigram + Metaspace, ids
``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3 as in XLM-R, ``<mask>`` last)
trained on jev4's bundled corpus, because the real sentencepiece model cannot
be shipped either.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from jev4.atomic import atomic_output_dir
from jev4.families.jina_clip_v2.checkpoint import LOGIT_SCALE, SAFETENSORS_NAME, expected_layout
from jev4.families.jina_clip_v2.config import CONFIG_NAME, MODEL_TYPE, parse_config
from jev4.families.jina_clip_v2.preprocess import QUERY_PREFIX, TOKENIZER_NAME

log = logging.getLogger(__name__)

__all__ = ["TinyClipSpec", "tiny_config", "write_tiny_checkpoint"]

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R's first four ids
MASK_TOKEN = "<mask>"  # XLM-R's last id
# Unigram scores are kept to this many decimals in tokenizer.json (see canonical_unigram: why the trained ones are not).
SCORE_DECIMALS = 2
NORM_SUFFIXES = ("norm1.weight", "norm2.weight", "emb_ln.weight", "inner_attn_ln.weight", "ffn_ln.weight", "norm.weight")


@dataclass(frozen=True)
class TinyClipSpec:
    """Toy sizes: text 2 layers x 32 (4 heads), vision 2 blocks x 32 (head 8, patch 14, 56 px: a 4 x 4 grid)."""

    hidden_size: int = 32
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 64
    vocab: int = 400
    vision_width: int = 32
    vision_layers: int = 2
    head_width: int = 8
    patch_size: int = 14
    image_size: int = 56
    pt_hw_seq_len: int = 16  # the real value: the 4 x 4 grid then exercises the frequency interpolation
    lora_rank: int = 4
    lora_alpha: float = 4.0
    matryoshka_dims: tuple[int, ...] = (8, 16, 32)


def train_tokenizer(spec: TinyClipSpec):
    """A Unigram tokenizer with XLM-R's special ids, Metaspace pre-tokenizer and ``<s> $A </s>`` template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    corpus = resources.files("jev4.model").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()  # XLM-R ships a precompiled NFKC-style charsmap; plain NFKC stands in for it
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=spec.vocab, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(corpus.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(MASK_TOKEN, lstrip=True, special=True)])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tok = Tokenizer.from_str(canonical_unigram(tok.to_str()))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2, 3]:
        raise RuntimeError(f"the tiny tokenizer's special ids are {ids}, expected XLM-R's [0, 1, 2, 3]")  # a tokenizers change
    return tok


def canonical_unigram(tokenizer_json: str) -> str:
    """``tokenizer_json`` with its Unigram pieces in one order that every training run reproduces.

    Why: tokenizers' Unigram trainer gives the same set of pieces on every run
    but not the same file. Pieces with equal scores come out in hash-map
    order, the single characters it appends at the end (every character of
    the corpus must stay encodable) get scores 1e-4 apart in hash-set order,
    and the EM sums differ in the last float digit (parallel reductions). The
    ids, and so the text vectors of a tiny checkpoint, then changed from one
    write to the next. Here the special tokens keep ids 0-3; every other
    piece gets its score rounded to :data:`SCORE_DECIMALS` decimals (which
    puts the appended characters, 2e-3 apart in all, into one score) and the
    pieces are ordered by score (highest first), then by the piece itself.
    Rounding only merges near-ties of a toy vocabulary, so tokenization
    barely changes and stays deterministic (the Viterbi search sees one vocab).
    """
    data = json.loads(tokenizer_json)
    model = data["model"]
    if model.get("type") != "Unigram":
        raise RuntimeError(f"the tiny tokenizer's model is {model.get('type')!r}, expected 'Unigram'")  # a tokenizers change
    head, rest = model["vocab"][: len(SPECIAL_TOKENS)], model["vocab"][len(SPECIAL_TOKENS) :]
    rounded = [(piece, round(float(score), SCORE_DECIMALS) + 0.0) for piece, score in rest]  # + 0.0: no -0.0
    model["vocab"] = [*head, *(list(p) for p in sorted(rounded, key=lambda p: (-p[1], p[0])))]
    return json.dumps(data, ensure_ascii=False, indent=2)


def write_tokenizer(tok, out: Path) -> None:
    """tokenizer.json plus the small config files an XLM-R checkpoint carries."""
    tok.save(str(out / TOKENIZER_NAME))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>", "mask_token": MASK_TOKEN}
    _write_json(out / "special_tokens_map.json", specials)
    _write_json(out / "tokenizer_config.json", {**specials, "tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 8192})


def tiny_config(spec: TinyClipSpec, vocab_size: int) -> dict:
    """config.json in upstream's shape; the text sizes go to ``hf_model_config_kwargs`` (see config.py)."""
    return {
        "architectures": ["JinaCLIPModel"],
        "model_type": MODEL_TYPE,
        "add_projections": False,
        "projection_dim": spec.hidden_size,
        "matryoshka_dimensions": list(spec.matryoshka_dims),
        "truncate_dim": None,
        "torch_dtype": "bfloat16",
        "text_config": {
            "embed_dim": spec.hidden_size,
            "hf_model_name_or_path": "jinaai/jina-embeddings-v3",
            "hf_model_config_kwargs": {
                "vocab_size": vocab_size,
                "hidden_size": spec.hidden_size,
                "num_hidden_layers": spec.layers,
                "num_attention_heads": spec.heads,
                "intermediate_size": spec.intermediate_size,
                "lora_adaptations": ["retrieval.query"],
                "lora_rank": spec.lora_rank,
                "lora_alpha": spec.lora_alpha,
                "lora_dropout_p": 0.0,
                "task_instructions": {"retrieval.query": QUERY_PREFIX},
            },
            "pooler_type": "mean_pooler",
            "default_lora_task": "retrieval.query",
        },
        "vision_config": {
            "width": spec.vision_width,
            "layers": spec.vision_layers,
            "head_width": spec.head_width,
            "patch_size": spec.patch_size,
            "image_size": spec.image_size,
            "mlp_ratio": 2.6667,
            "naive_swiglu": True,
            "subln": True,
            "rope_embeddings": True,
            "pt_hw_seq_len": spec.pt_hw_seq_len,
            "intp_freq": True,
            "qkv_bias": True,
            "x_attention": True,
            "post_norm": False,
        },
    }


def random_weights(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded bf16 tensors for ``layout``: LayerNorm scales near 1, matrices ~ 1/sqrt(fan_in), LoRA factors
    large enough (0.2) that the merged weights differ clearly from the originals."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in layout.items():
        if key == LOGIT_SCALE:
            value = torch.tensor(math.log(1 / 0.07))
        elif key.endswith(NORM_SUFFIXES):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "lora_" in key:
            value = 0.2 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2:
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[-1] if "embeddings" not in key else 1)
        else:
            value = 0.1 * torch.randn(shape, generator=gen)
        out[key] = value.to(torch.bfloat16).contiguous()
    return out


def write_tiny_checkpoint(out: str | Path, seed: int = 0, spec: TinyClipSpec = TinyClipSpec(), force: bool = False) -> Path:
    """Write the tiny checkpoint to ``out`` atomically (nothing at ``out`` unless it all succeeds); returns ``out``."""
    out = Path(out)
    with atomic_output_dir(out, force=force) as tmp:
        tok = train_tokenizer(spec)
        write_tokenizer(tok, tmp)
        raw = tiny_config(spec, tok.get_vocab_size())
        config = parse_config(raw, source="tiny config")  # the writer's config must pass the reader's checks
        _write_json(tmp / CONFIG_NAME, raw)
        save_file(random_weights(expected_layout(config), seed), str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
    log.info("wrote a tiny jina-clip-v2 checkpoint to %s (seed %d)", out, seed)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
