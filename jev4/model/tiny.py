"""Writing a tiny jina-embeddings-v4 checkpoint in the exact upstream layout.

The real weights cannot be downloaded here (and the licence forbids shipping
them), so tests and the demo run on a checkpoint that has upstream's file
names, key names, config keys, adapter layout and tokenizer files at toy
size, with seeded random weights and non-zero LoRA B so that every task
adapter changes the outputs. See shared/UPSTREAM.md for the layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from jev4.atomic import atomic_output_dir
from jev4.errors import SettingsError
from jev4.model.checkpoint import ADAPTER_DIR, INDEX_NAME, old_layout_name
from jev4.model.config import parse_config
from jev4.model.network import JinaEmbeddingsV4, linear_shapes, parse_dtype

log = logging.getLogger(__name__)

TASKS = ["retrieval", "text-matching", "code"]
# Qwen2's special tokens in their real order (ids 151643.. in the real vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ADAPTED_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGET_REGEX = r"(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(single_vector_projector|multi_vector_projector).*$)"


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a synthetic model. The defaults are the toy model (head_dim 16, so
    mrope_section [2, 3, 3]); ``FULL_SIZE`` holds the real jina-embeddings-v4 sizes."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    bpe_vocab: int = 600
    vision_depth: int = 4
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    multi_vector_dim: int = 32
    lora_r: int = 8
    lora_alpha: int = 16
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 256
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    matryoshka_dims: tuple[int, ...] = (8, 16, 32, 64)


# The toy model with head_dim 32 (hidden 128, 4 heads): vLLM's CPU attention rejects the default's head_dim 16.
TINY_HEAD_DIM_32 = TinySpec(hidden_size=128, intermediate_size=256, mrope_section=(4, 6, 6))
TINY_SPECS = {16: TinySpec(), 32: TINY_HEAD_DIM_32}

# Qwen2.5-VL-3B + jina-embeddings-v4's heads and adapters (3.8B parameters).
FULL_SIZE = TinySpec(
    hidden_size=2048,
    layers=36,
    heads=16,
    kv_heads=2,
    intermediate_size=11008,
    vision_depth=32,
    vision_hidden=1280,
    vision_heads=16,
    vision_intermediate=3420,
    multi_vector_dim=128,
    lora_r=32,
    lora_alpha=32,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 1280,
    mrope_section=(16, 24, 24),
    fullatt_block_indexes=(7, 15, 23, 31),
    matryoshka_dims=(128, 256, 512, 1024, 2048),
)
FULL_SIZE_VOCAB = 151936
# The real special-token ids (Qwen2 vocabulary).
REAL_SPECIAL_IDS = {token: 151643 + i for i, token in enumerate(SPECIAL_TOKENS)}


def train_tokenizer(spec: TinySpec):
    """A byte-level BPE trained on the bundled corpus with Qwen2's pre-tokenizer and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = resources.files("jev4.model").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_tokenizer(out: Path, spec: TinySpec) -> tuple[dict[str, int], int]:
    """Train the toy BPE and write its files to ``out``; returns (special-token ids, tokenizer size).

    Every synthetic checkpoint, tiny or full size, gets this tokenizer: the
    real Qwen2 tokenizer cannot be shipped, and a model's vocabulary is only
    a range of ids, so any tokenizer whose ids fit ``vocab_size`` drives it.
    Writers must put the returned ids into config.json, so that the image
    and vision-span tokens the tokenizer emits are the ones the model expects.
    """
    tok = train_tokenizer(spec)
    return _tokenizer_files(tok, out), tok.get_vocab_size()


def _tokenizer_files(tok, out: Path) -> dict[str, int]:
    """tokenizer.json, vocab.json/merges.txt and the Qwen2 config files, as upstream ships them."""
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json, merges.txt
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t, i in ids.items()
    }
    additional = [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"]
    write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": additional,
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "extra_special_tokens": {},
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "padding_side": "right",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": additional,
            "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
            "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        },
    )
    write_json(out / "added_tokens.json", ids)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return ids


def tiny_config(spec: TinySpec, vocab_size: int, ids: dict[str, int]) -> dict:
    """config.json in upstream's shape: flat text settings, jina extras, nested text/vision configs."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": spec.layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_heads": spec.vision_heads,
        "in_chans": 3,
        "hidden_act": "silu",
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": spec.hidden_size,
        "fullatt_block_indexes": list(spec.fullatt_block_indexes),
        "tokens_per_second": 2,
        "model_type": "qwen2_5_vl",
    }
    return {
        "architectures": ["JinaEmbeddingsV4Model"],
        "model_type": "qwen2_5_vl",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.53.3",
        **text,
        "tie_word_embeddings": True,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "task_names": TASKS,
        "matryoshka_dims": list(spec.matryoshka_dims),
        "truncate_dim": None,
        "multi_vector_projector_dim": spec.multi_vector_dim,
        "single_vector_pool_strategy": "mean",
        "pretrained_peft_model_name_or_path": None,
        "verbosity": 1,
        "text_config": {**text, "model_type": "qwen2_5_vl_text", "tie_word_embeddings": True},
        "vision_config": vision,
    }


def _random_weights(net: JinaEmbeddingsV4, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded weights: norms near 1, matrices and biases N(0, 0.02)."""
    weights = {}
    for name, param in sorted(net.named_parameters()):
        if "norm" in name or name.endswith("ln_q.weight"):
            weights[name] = 1.0 + 0.05 * torch.randn(param.shape, generator=gen)
        else:
            weights[name] = 0.02 * torch.randn(param.shape, generator=gen)
    return weights


def random_adapter_tensors(
    shapes: dict[str, tuple[int, int]],
    modules: list[str],
    spec: TinySpec,
    gen: torch.Generator,
    rename=lambda name: name,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Adapter file tensors, per module and task: A ~ N(0, 1/in), B ~ N(0, 0.02).

    B is non-zero (unlike a fresh LoRA) so that each task changes the outputs.
    """
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        n_out, n_in = shapes[module]
        for task in TASKS:
            key = f"base_model.model.{rename(module)}"
            out[f"{key}.lora_A.{task}.weight"] = (torch.randn(spec.lora_r, n_in, generator=gen) / n_in**0.5).to(dtype)
            out[f"{key}.lora_B.{task}.weight"] = (0.02 * torch.randn(n_out, spec.lora_r, generator=gen)).to(dtype)
    return out


def adapted_modules(layers: int) -> list[str]:
    """What upstream adapts: q/k/v/o/gate/up/down of every text layer, and the multi-vector projector."""
    modules = [f"model.language_model.layers.{i}.{proj}" for i in range(layers) for proj in ADAPTED_PROJECTIONS]
    return modules + ["multi_vector_projector"]


MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes without overflow, as a non-negative seed


def write_tiny_checkpoint(
    out: str | Path,
    seed: int = 0,
    layout: str = "old",
    adapter_layout: str = "new",
    dtype: str = "bf16",
    adapter_dtype: str = "fp32",
    spec: TinySpec = TinySpec(),
    force: bool = False,
) -> Path:
    """Write the toy checkpoint. ``layout`` names the base keys' layout (upstream writes "old");
    ``adapter_layout`` the adapter keys' (upstream writes "new")."""
    if layout not in ("old", "new") or adapter_layout not in ("old", "new"):
        raise SettingsError(f"layout must be 'old' or 'new', got {layout!r} / {adapter_layout!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SettingsError(f"--seed {seed!r}: must be an integer between 0 and {MAX_SEED} (2**63-1)")
    store_dtype, lora_dtype = parse_dtype(dtype), parse_dtype(adapter_dtype)
    gen = torch.Generator().manual_seed(seed)
    with atomic_output_dir(out, force=force) as tmp:
        ids, tokens = write_tokenizer(tmp, spec)
        vocab = -(-tokens // 64) * 64
        raw = tiny_config(spec, vocab, ids)
        config = parse_config(raw)
        with torch.device("cpu"):
            net = JinaEmbeddingsV4(config)
        weights = _random_weights(net, gen)
        rename = old_layout_name if layout == "old" else (lambda n: n)
        shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
        for name, tensor in weights.items():
            shard = "model-00001-of-00002.safetensors" if name.startswith("model.language_model.") else "model-00002-of-00002.safetensors"
            shards[shard][rename(name)] = tensor.to(store_dtype).contiguous()
        weight_map, total = {}, 0
        for filename, tensors in shards.items():
            save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
            for name, tensor in tensors.items():
                weight_map[name] = filename
                total += tensor.numel() * tensor.element_size()
        write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        write_json(tmp / "config.json", raw)

        adapter_rename = (lambda n: n) if adapter_layout == "new" else old_layout_name
        adapter_tensors = random_adapter_tensors(
            linear_shapes(net), adapted_modules(spec.layers), spec, gen, adapter_rename, lora_dtype
        )
        (tmp / ADAPTER_DIR).mkdir()
        save_file(adapter_tensors, str(tmp / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_DIR / "adapter_config.json", adapter_config(spec))
        write_processor_files(tmp, spec)
        write_json(tmp / "generation_config.json", {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]})
    log.info("tiny checkpoint (seed %d, %s layout) written to %s", seed, layout, out)
    return Path(out)


def adapter_config(spec: TinySpec) -> dict:
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "jinaai/jina-embeddings-v4",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": 0.1,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.lora_r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": TARGET_REGEX,
        "task_type": "FEATURE_EXTRACTION",
        "use_dora": False,
        "use_rslora": False,
    }


def write_processor_files(out: Path, spec: TinySpec) -> None:
    image = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": spec.max_pixels,
        "merge_size": 2,
        "min_pixels": spec.min_pixels,
        "patch_size": 14,
        "processor_class": "JinaEmbeddingsV4Processor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": spec.max_pixels, "shortest_edge": spec.min_pixels},
        "temporal_patch_size": 2,
    }
    write_json(out / "preprocessor_config.json", image)
    video = {**image, "video_processor_type": "Qwen2VLVideoProcessor"}
    video.pop("image_processor_type")
    write_json(out / "video_preprocessor_config.json", video)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
