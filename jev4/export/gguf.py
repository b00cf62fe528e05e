"""``jev4-export --format gguf``: the merged language model as one GGUF file for llama.cpp, the projector beside it.

Why GGUF: llama.cpp runs on CPUs and small GPUs without Python, and its
quantized types (Q8_0, Q4_0) shrink the 3B model to 3.3 / 1.8 GB. Jina's own
GGUFs drop the multi-vector projector; here it is kept, next to the GGUF as
safetensors (``PROJECTOR_FILE``), because llama.cpp has no place for a
second head: jev4's runtime applies it to llama.cpp's per-token embeddings.

What is written follows llama.cpp's own converter (``convert_hf_to_gguf.py``,
class ``Qwen2Model``) so that llama.cpp reads it like any Qwen2 GGUF:

- architecture ``qwen2``: for text, Qwen2.5-VL's M-RoPE equals plain RoPE
  (see ``jev4.export.qwen2_text``), so the language model *is* a Qwen2;
- the task's LoRA merged first, in memory and in fp32 (``jev4.export.merge``);
- tensor names from gguf's Qwen2 tensor map; every source tensor is either
  mapped, the projector, or vision (dropped): anything else is an error;
- types as the converter chooses them: 1-D tensors and norms stay F32, rows
  that do not fill whole quant blocks fall back to F16, and with Q4_0 the
  (tied) token embedding gets Q8_0, as ``llama-quantize`` gives a tied
  embedding a better type (Q6_K there; gguf's numpy code has no K-quants);
- tokenizer: the BPE vocabulary padded to ``vocab_size`` with unused tokens,
  merges, token types, special ids, pre-tokenizer ``qwen2``;
- mean pooling, the context length, and jev4's own keys (``jev4.*``: task,
  prompts, Matryoshka dims, projector file) so that a plain llama.cpp user
  finds the prompts in the file and jev4 can tell its GGUFs from others.

Tensors stream one at a time (header first, from the safetensors headers), so
the export holds one fp32 matrix at a time, not the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from jev4.atomic import atomic_output_dir, check_output_path, claim_output
from jev4.errors import CheckpointError, MissingDependencyError, SettingsError
from jev4.export.manifest import Manifest, package_versions, write_manifest
from jev4.export.merge import TOKENIZER_FILES, MergeSettings, plan_merge
from jev4.export.qwen2_text import qwen2_config
from jev4.model.checkpoint import canonical_name, check_accounting, iter_shard_tensors, list_checkpoint_files, read_safetensors_header, resolve_model_dir
from jev4.model.config import CONFIG_NAME, JinaV4Config
from jev4.model.preprocess import PREFIXES, QUERY_ONLY_TASKS
from jev4.quant.output_codec import OutputCodec

log = logging.getLogger(__name__)

GGUF_KIND = "gguf"
GGUF_FILE = "model.gguf"
PROJECTOR_FILE = "multi_vector_projector.safetensors"
GGUF_FORMAT_VERSION = 1
# jev4's own GGUF keys: how the runtime recognises its GGUFs, and what a plain llama.cpp user needs to know.
KEY_FORMAT = "jev4.format_version"
KEY_TASK = "jev4.task"
KEY_PROMPT = "jev4.prompt."  # + query / passage
KEY_MATRYOSHKA = "jev4.matryoshka_dims"
KEY_MULTI_DIM = "jev4.multi_vector_dim"
KEY_PROJECTOR = "jev4.multi_vector_projector"
KEY_GGUF_TYPE = "jev4.gguf_type"
MAX_CONTEXT = 32768  # upstream's model_max_length; the 128k of max_position_embeddings is RoPE's reach, not the training length
_INSTALL = "pip install 'jev4[edge]' (gguf==0.19.*, llama-cpp-python==0.3.36)"


@dataclass(frozen=True)
class GgufTypeRule:
    """How one ``--gguf-type`` stores the weights: matrices, the token embedding, and the file type llama.cpp reads."""

    matrix: str  # GGMLQuantizationType name for 2-D weights
    token_embedding: str  # for token_embd.weight (tied to the output, so it gets llama-quantize's better type)
    file_type: str  # LlamaFileType name for general.file_type


GGUF_TYPES: dict[str, GgufTypeRule] = {
    "f32": GgufTypeRule("F32", "F32", "ALL_F32"),
    "f16": GgufTypeRule("F16", "F16", "MOSTLY_F16"),
    "q8_0": GgufTypeRule("Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    "q4_0": GgufTypeRule("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
}


def gguf_module():
    """The ``gguf`` package, or a MissingDependencyError with the pip command."""
    try:
        import gguf
    except ImportError as exc:
        raise MissingDependencyError(f"GGUF export needs the gguf package ({exc}); {_INSTALL}") from None
    return gguf


def check_gguf_type(name: str) -> str:
    """``name`` if jev4 writes it; else one line listing the types it writes, and why K-quants are not among them."""
    if name in GGUF_TYPES:
        return name
    known = ", ".join(GGUF_TYPES)
    raise SettingsError(
        f"--gguf-type {name!r}: not supported; choose one of {known} (gguf 0.19's numpy quantizers implement no K-quants: "
        "for q4_k_m etc. run llama.cpp's llama-quantize on the f16 GGUF)"
    )


@dataclass(frozen=True)
class GgufSettings:
    """Options of ``jev4-export --format gguf``; recorded verbatim in the manifest.

    ``model`` is an upstream-layout checkpoint (the adapter is merged in
    memory) or a ``--text-only`` export (already merged; ``adapter`` must be
    its task).
    """

    model: str
    adapter: str
    out: str
    gguf_type: str = "f16"
    adapter_dir: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        check_gguf_type(self.gguf_type)

    def sources(self) -> tuple[str | None, ...]:
        return (self.model, self.adapter_dir)


@dataclass
class LanguageSource:
    """The merged language model to write, whatever the input was: settings, tensor shapes, a tensor stream, the projector."""

    root: Path
    config: JinaV4Config
    qwen2: dict[str, Any]  # a Qwen2 config (sizes, RoPE, norms)
    shapes: list[tuple[str, tuple[int, ...]]]  # HF Qwen2ForCausalLM names ("model.layers.0..."), in stream order
    stream: Any  # () -> Iterator[(name, fp32 tensor)] over ``shapes``' names, in that order
    projector: dict[str, torch.Tensor] = field(default_factory=dict)  # filled while streaming (checkpoint) or up front
    source_dtype: str = ""


# --------------------------------------------------------------------------- sources


def _checkpoint_source(settings: GgufSettings) -> LanguageSource:
    """An upstream checkpoint: every check of ``plan_merge`` (names, shapes, adapter fit), then a stream that merges the LoRA per tensor."""
    plan = plan_merge(MergeSettings(model=settings.model, adapter=settings.adapter, out=settings.out, adapter_dir=settings.adapter_dir, force=settings.force))
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for path, names in plan.files.shards:
        header = read_safetensors_header(path)
        for disk_name in names:
            name = canonical_name(disk_name)
            if name.startswith("model.language_model."):
                shapes.append(("model." + name[len("model.language_model.") :], tuple(header[disk_name].shape)))
    source = LanguageSource(plan.model_dir, plan.config, qwen2_config(plan.config, "float32"), shapes, None, source_dtype=str(plan.source_dtype).removeprefix("torch."))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        merged = 0
        for path, names in plan.files.shards:
            for disk_name, tensor in iter_shard_tensors(path, names):
                name = canonical_name(disk_name)
                if name.startswith("model.visual."):
                    continue  # llama.cpp's Qwen2 has no vision tower; images are refused by the runtime
                lora = plan.loras.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
                tensor = tensor.float()
                if lora is not None:
                    tensor = tensor + lora.delta()
                    merged += 1
                if name.startswith("multi_vector_projector."):
                    source.projector[name] = tensor.contiguous()
                elif name.startswith("model.language_model."):
                    yield "model." + name[len("model.language_model.") :], tensor
                else:
                    raise CheckpointError(f"{path}: tensor {disk_name!r} has no place in a GGUF (not language model, vision or projector)")
        if merged != len(plan.loras):
            raise CheckpointError(f"merged {merged} of {len(plan.loras)} adapted modules; the checkpoint changed while reading?")

    source.stream = stream
    return source


def _text_only_source(settings: GgufSettings, root: Path) -> LanguageSource:
    """A ``--text-only`` export: the adapter is merged already, tensors carry Qwen2 names, the projector has its own file."""
    from jev4.runtime.text_only import PROJECTOR_KEY, read_projector, read_text_only_config

    config = read_text_only_config(root)
    config.check_task(settings.adapter)
    if settings.adapter_dir is not None:
        raise SettingsError(f"--adapter-dir: {root} is a --text-only export with {config.merged_task!r} merged in already")
    files = list_checkpoint_files(root)
    shapes = []
    for path, names in files.shards:
        header = read_safetensors_header(path)
        shapes += [("model." + name.removeprefix("model."), tuple(header[name].shape)) for name in names]
    linear = read_projector(root / config.raw[PROJECTOR_KEY], config.hidden_size, torch.float32, "cpu")
    projector = {"multi_vector_projector.weight": linear.weight.detach().clone()}
    if linear.bias is not None:
        projector["multi_vector_projector.bias"] = linear.bias.detach().clone()
    config = JinaV4Config(**{**config.__dict__, "multi_vector_dim": linear.out_features})

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for path, names in files.shards:
            for name, tensor in iter_shard_tensors(path, names):
                yield "model." + name.removeprefix("model."), tensor.float()

    return LanguageSource(root, config, dict(config.raw), shapes, stream, projector, str(config.raw.get("torch_dtype", "")))


def open_source(settings: GgufSettings) -> LanguageSource:
    """The merged language model of ``settings.model``: a checkpoint, or a --text-only export."""
    from jev4.runtime.text_only import is_text_only

    root = resolve_model_dir(settings.model)
    try:
        raw = json.loads((root / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = {}
    if isinstance(raw, dict) and is_text_only(raw):
        check_output_path(Path(settings.out), settings.force, settings.sources())
        return _text_only_source(settings, root)
    return _checkpoint_source(settings)


# --------------------------------------------------------------------------- types and names


def tensor_type(gguf_name: str, shape: tuple[int, ...], rule: GgufTypeRule, gguf) -> tuple[Any, str | None]:
    """The GGML type of one tensor, and why it differs from the file's type (None when it does not)."""
    qt = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return qt.F32, "1-D / norm (llama.cpp reads these in F32)" if rule.matrix != "F32" else None
    wanted = qt[rule.token_embedding] if gguf_name == "token_embd.weight" else qt[rule.matrix]
    reason = "tied token embedding (llama-quantize's rule)" if wanted.name != rule.matrix else None
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block != 0:
        return qt.F16, f"rows of {shape[-1]} do not fill {wanted.name} blocks of {block} (convert_hf_to_gguf falls back to F16 too)"
    return wanted, reason


def _tensor_bytes(shape: tuple[int, ...], qtype, gguf) -> tuple[tuple[int, ...], int]:
    """The on-disk (byte) shape and size of a tensor of ``shape`` stored as ``qtype``."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return shape, int(np.prod(shape)) * 4
    if qtype == gguf.GGMLQuantizationType.F16:
        return shape, int(np.prod(shape)) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, int(np.prod(byte_shape))


def _encode(tensor: torch.Tensor, qtype, gguf) -> np.ndarray:
    """One tensor in its GGML type, through gguf's own numpy quantizers (bit-exact with llama.cpp's reference ones)."""
    return gguf.quants.quantize(tensor.detach().to(torch.float32).numpy(), qtype)


# --------------------------------------------------------------------------- metadata


def prompts_of(task: str) -> dict[str, str]:
    """The prompt prefixes jev4 applies for ``task`` (text-matching: always the query prefix)."""
    return {"query": PREFIXES["query"], "passage": PREFIXES["query"] if task in QUERY_ONLY_TASKS else PREFIXES["passage"]}


def _context_length(qwen2: dict[str, Any], tokenizer_dir: Path) -> int:
    limit = MAX_CONTEXT
    path = tokenizer_dir / "tokenizer_config.json"
    if path.is_file():
        limit = min(limit, int(json.loads(path.read_text()).get("model_max_length", MAX_CONTEXT)))
    return min(int(qwen2.get("max_position_embeddings", limit)), limit)


def _add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int, gguf) -> int:
    """The BPE vocabulary as convert_hf_to_gguf's ``_set_vocab_gpt2`` writes it; returns the real token count.

    Ids past the tokenizer (the embedding is padded to a multiple of 64) become
    ``[PAD<i>]`` tokens of type UNUSED, so the token list matches ``token_embd``.
    """
    from jev4.model.preprocess import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{tokenizer_dir}: the tokenizer has id {max(vocab.values())}, beyond the model's vocab_size {vocab_size}")
    reverse = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].special or (reverse[i].startswith("<|") and reverse[i].endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise CheckpointError(f"{tokenizer_dir}: no BPE merges found (tokenizer.json or merges.txt); llama.cpp cannot tokenize without them")
    special.add_to_gguf(writer)
    return len(vocab)


def _add_model_keys(writer, source: LanguageSource, settings: GgufSettings, context: int, gguf) -> None:
    """Qwen2 hyper-parameters (convert_hf_to_gguf's TextModel keys), pooling, and jev4's own keys."""
    q = source.qwen2
    heads = int(q["num_attention_heads"])
    writer.add_name(f"jina-embeddings-v4 {settings.adapter} (jev4)")
    writer.add_block_count(int(q["num_hidden_layers"]))
    writer.add_context_length(context)
    writer.add_embedding_length(int(q["hidden_size"]))
    writer.add_feed_forward_length(int(q["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(q.get("num_key_value_heads", heads)))
    writer.add_rope_freq_base(float(q.get("rope_theta", 1000000.0)))
    writer.add_layer_norm_rms_eps(float(q.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[settings.gguf_type].file_type])
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_uint32(KEY_FORMAT, GGUF_FORMAT_VERSION)
    writer.add_string(KEY_TASK, settings.adapter)
    writer.add_string(KEY_GGUF_TYPE, settings.gguf_type)
    for name, prefix in prompts_of(settings.adapter).items():
        writer.add_string(KEY_PROMPT + name, prefix)
    writer.add_array(KEY_MATRYOSHKA, [int(d) for d in source.config.matryoshka_dims])
    writer.add_uint32(KEY_MULTI_DIM, int(source.config.multi_vector_dim))
    writer.add_string(KEY_PROJECTOR, PROJECTOR_FILE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --------------------------------------------------------------------------- export


def export_gguf(settings: GgufSettings, progress: bool = True, output_codec: OutputCodec | None = None) -> Path:
    """Write the GGUF artifact to ``settings.out`` (atomically) and return its path.

    ``output_codec`` (``--output-precision``) is stored beside the GGUF, as in every jev4 artifact.
    """
    with claim_output(settings.out, settings.force, settings.sources()):
        return _export_gguf(settings, progress, output_codec)


def _export_gguf(settings: GgufSettings, progress: bool, output_codec: OutputCodec | None) -> Path:
    gguf = gguf_module()
    source = open_source(settings)
    rule = GGUF_TYPES[settings.gguf_type]
    layers = int(source.qwen2["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    plan: list[tuple[str, str, Any]] = []  # (source name, gguf name, ggml type), in stream order
    unmapped = []
    for name, shape in source.shapes:
        if name == "lm_head.weight":
            continue  # tied to the embedding; an embedding model never computes logits
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unmapped.append(name)
            continue
        qtype, reason = tensor_type(gguf_name, shape, rule, gguf)
        if reason:
            log.debug("%s: %s (%s)", gguf_name, qtype.name, reason)
        plan.append((name, gguf_name, qtype))
    if unmapped:
        raise CheckpointError(f"{source.root}: {len(unmapped)} tensor(s) have no name in llama.cpp's Qwen2 map: {', '.join(unmapped[:5])}")
    check_accounting({g for _, g, _ in plan}, _expected_gguf_names(layers, source.shapes), str(source.root))
    shapes = dict(source.shapes)
    vocab_size = int(source.qwen2["vocab_size"])
    context = _context_length(source.qwen2, source.root)
    out = Path(settings.out)
    with atomic_output_dir(out, force=settings.force) as tmp:
        writer = gguf.GGUFWriter(tmp / GGUF_FILE, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
        _add_model_keys(writer, source, settings, context, gguf)
        tokens = _add_tokenizer(writer, source.root, vocab_size, gguf)
        for name, gguf_name, qtype in plan:
            byte_shape, nbytes = _tensor_bytes(shapes[name], qtype, gguf)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor_info(gguf_name, byte_shape, np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16, nbytes)
            else:
                writer.add_tensor_info(gguf_name, byte_shape, np.uint8, nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        pending = iter(plan)
        stream = source.stream()
        if progress:
            from tqdm import tqdm

            stream = tqdm(stream, total=len(source.shapes), desc=f"gguf {settings.gguf_type}", unit="tensor")
        for name, tensor in stream:
            if name == "lm_head.weight":
                continue
            expected, gguf_name, qtype = next(pending)
            if name != expected or tuple(tensor.shape) != shapes[name]:
                raise CheckpointError(f"{source.root}: tensor {name!r} {tuple(tensor.shape)} came where {expected!r} {shapes[expected]} was planned; the checkpoint changed while reading?")
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{source.root}: tensor {name!r} holds NaN or inf after the merge")
            writer.write_tensor_data(_encode(tensor, qtype, gguf))
        writer.close()
        if next(pending, None) is not None:
            raise CheckpointError(f"{source.root}: the checkpoint ended before every planned tensor was written")
        _write_projector(tmp, source)
        _copy_tokenizer(source.root, tmp)
        if output_codec is not None:
            output_codec.write(tmp)
        types = Counter(qtype.name for _, _, qtype in plan)
        write_manifest(
            tmp,
            Manifest(
                kind=GGUF_KIND,
                source=str(source.root),
                settings={**asdict(settings), "source_dtype": source.source_dtype},
                contents={
                    "precision": f"gguf-{settings.gguf_type}",
                    "task": settings.adapter,
                    "gguf_type": settings.gguf_type,
                    "gguf_file": GGUF_FILE,
                    "projector_file": PROJECTOR_FILE,
                    "architecture": "qwen2",
                    "tensor_types": dict(sorted(types.items())),
                    "hidden_size": source.config.hidden_size,
                    "num_hidden_layers": layers,
                    "vocab_size": vocab_size,
                    "tokenizer_tokens": tokens,
                    "context_length": context,
                    "matryoshka_dims": list(source.config.matryoshka_dims),
                    "multi_vector_dim": source.config.multi_vector_dim,
                    "prompts": prompts_of(settings.adapter),
                    "pooling": "mean",
                    **({"output_codec": output_codec.describe()} if output_codec is not None else {}),
                },
                versions={**package_versions(), **_edge_versions()},
            ),
        )
    log.info("GGUF %s (%s) of task %r written to %s", settings.gguf_type, dict(types), settings.adapter, out)
    return out


def _expected_gguf_names(layers: int, shapes: list[tuple[str, tuple[int, ...]]]) -> set[str]:
    """Every tensor llama.cpp's Qwen2 needs (the output head is optional: tied to the embedding)."""
    per_layer = ("attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight", "attn_v.bias", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
    return {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}" for i in range(layers) for n in per_layer}


def _write_projector(tmp: Path, source: LanguageSource) -> None:
    """The multi-vector projector (task LoRA merged) in fp32 safetensors, as ``read_projector`` reads it back."""
    if "multi_vector_projector.weight" not in source.projector:
        raise CheckpointError(f"{source.root}: no multi_vector_projector.weight; a jina-embeddings-v4 checkpoint has one")
    save_file({k: v.float().contiguous() for k, v in source.projector.items()}, str(tmp / PROJECTOR_FILE), metadata={"format": "pt"})


def _copy_tokenizer(root: Path, tmp: Path) -> None:
    """jev4 tokenizes itself (llama.cpp gets token ids), so the artifact keeps the tokenizer files, right-padded."""
    for filename in TOKENIZER_FILES:
        if (root / filename).is_file():
            shutil.copy2(root / filename, tmp / filename)
    config = tmp / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["padding_side"] = "right"
        config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _edge_versions() -> dict[str, str]:
    found = {}
    for name in ("gguf", "llama-cpp-python"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
