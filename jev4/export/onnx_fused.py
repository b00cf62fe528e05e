"""``jev4-export --format onnx --fused --text-only``: ``language.onnx`` with fused attention and RMSNorm.

jev4's own export computes attention as MatMul-Softmax-MatMul under an
explicit mask: O(T^2) memory and no fused kernel. The fused graph is made by
onnxruntime-genai's model builder (``python -m
onnxruntime_genai.models.builder``), which writes Qwen2 with onnxruntime's
contrib ops: ``GroupQueryAttention`` (16 query / 2 KV heads, rotary embedding
applied inside the op from cos/sin caches), ``SkipSimplifiedLayerNormalization``
(residual add + RMSNorm) and ``SimplifiedLayerNormalization``. Why the
builder and not onnxruntime's transformer optimizer over jev4's graph: the
optimizer (``model_type`` qwen3 or gpt2, onnxruntime 1.32) fuses only the
RMSNorms; its attention patterns do not match the dynamo exporter's SDPA
under a padding mask, so Softmax stays. Measured in docs/edge.md.

The builder writes a decoder for generation; four small edits make it a jev4
language graph (no fusion is written by hand):

- the KV cache goes: ``past_key_values.*`` inputs and ``present.*`` outputs
  are dropped (both are optional inputs/outputs of GroupQueryAttention), so
  one call encodes the whole sequence;
- positions come from jev4's feed: ``position_ids[0]`` (text: all three
  M-RoPE sections equal) feeds GroupQueryAttention's ``position_ids`` input
  instead of the positions the op would derive itself;
- the builder's ``attention_mask`` handling stays: GroupQueryAttention takes
  per-row lengths (``sum(mask) - 1``) and is causal, which equals the
  reference on every valid token of a right-padded batch (jev4's tokenizer
  pads right); padded rows are masked out of pooling;
- jev4's heads are appended: the same torch code as the reference
  (``jev4.model.pooling``: mean pooling + L2, projector + L2, zero on
  padding), exported with torch.onnx at the builder's opset and joined at
  ``hidden_states``.

The result takes jev4's usual feeds and gives ``single_vector`` /
``multi_vector``, so the onnxruntime backend runs it unchanged. Text only:
the builder's graph has no place for image embeddings.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from jev4.errors import Jev4Error, MissingDependencyError
from jev4.export.onnx_files import adopt_external_data
from jev4.model.pooling import multi_vector, single_vector

log = logging.getLogger(__name__)

__all__ = ["FusedExportError", "build_fused_language_graph", "fused_op_counts", "require_builder"]

BUILDER_MODULE = "onnxruntime_genai.models.builder"
BUILDER_TIMEOUT_S = 4 * 3600  # the full-size fp32 build reads and writes 12 GB; a hang must still end
FUSED_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")


class FusedExportError(Jev4Error):
    """The fused graph could not be built (the builder failed, or its graph is not the one expected)."""


def require_builder() -> None:
    """The fused export runs onnxruntime-genai's model builder (the ``edge`` extras)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise MissingDependencyError("--fused needs onnxruntime-genai's model builder: pip install 'jev4[edge]' (onnxruntime-genai>=0.18)")


class EmbeddingHeads(nn.Module):
    """jev4's pooling and projector over the builder's ``hidden_states``: the same code as the reference."""

    def __init__(self, projector: nn.Linear):
        super().__init__()
        self.projector = projector

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, pooling_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return single_vector(hidden_states, pooling_mask), multi_vector(self.projector(hidden_states), attention_mask)


def run_builder(qwen2_dir: Path, out_dir: Path, work_dir: Path) -> Path:
    """Run the builder (fp32, CPU, no LM head) in a child process; returns its ``model.onnx``.

    A child process because the builder holds the whole model in memory and
    sets global state; its log goes to ``work_dir/builder.log``.
    """
    cmd = [
        sys.executable, "-m", BUILDER_MODULE,
        "-i", str(qwen2_dir), "-o", str(out_dir), "-p", "fp32", "-e", "cpu", "-c", str(work_dir / "cache"),
        "--extra_options", "exclude_lm_head=true", "hf_remote=false", "filename=model.onnx",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    log_path = work_dir / "builder.log"
    with log_path.open("wb") as log_file:
        try:
            result = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=BUILDER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise FusedExportError(f"{BUILDER_MODULE} did not finish within {BUILDER_TIMEOUT_S} s") from None
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    model = out_dir / "model.onnx"
    if result.returncode != 0 or not model.is_file():
        raise FusedExportError(f"{BUILDER_MODULE} failed (exit {result.returncode}) on {qwen2_dir}: {tail[0][:300]}")
    log.info("onnxruntime-genai builder wrote %s in %.1f s", model, time.perf_counter() - started)
    return model


def _export_heads(projector: nn.Linear, hidden: int, path: Path, opset: int) -> None:
    """``hidden_states, attention_mask, pooling_mask -> single_vector, multi_vector`` as a small ONNX graph."""
    heads = EmbeddingHeads(projector).eval()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    args = (torch.randn(2, 5, hidden), mask, mask.clone())
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    axes = {0: batch, 1: seq}
    torch.onnx.export(
        heads,
        args,
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=["hidden_states", "attention_mask", "pooling_mask"],
        output_names=["single_vector", "multi_vector"],
        dynamic_shapes={"hidden_states": axes, "attention_mask": axes, "pooling_mask": axes},
        external_data=False,
        verbose=False,
    )


def _main_opset(model) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _value_info(name: str, elem_type: int, shape: tuple):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem_type, list(shape))


def graft(decoder_path: Path, heads_path: Path, out_path: Path) -> dict[str, int]:
    """Turn the builder's decoder into ``language.onnx`` (see the module doc); returns the op counts."""
    import onnx
    from onnx import TensorProto, compose, helper

    model = onnx.load(str(decoder_path), load_external_data=False)  # the weights are renamed, never loaded (12.4 GB at full size)
    graph = model.graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if not attention:
        raise FusedExportError(f"{decoder_path}: the builder wrote no GroupQueryAttention node")
    if [o.name for o in graph.output if not o.name.startswith("present.")] != ["hidden_states"]:
        raise FusedExportError(f"{decoder_path}: expected a hidden_states output (exclude_lm_head), got {[o.name for o in graph.output]}")
    # 1. No KV cache; 2. positions from position_ids[0].
    first_positions = "jev4/position_ids_text"
    for node in attention:
        node.input[3] = node.input[4] = ""
        while len(node.input) < 10:
            node.input.append("")
        node.input[9] = first_positions
        for k in (1, 2):
            node.output[k] = ""
    zero = helper.make_tensor("jev4/section0", TensorProto.INT64, [], [0])
    graph.initializer.append(zero)
    graph.node.insert(0, helper.make_node("Gather", ["position_ids", "jev4/section0"], [first_positions], name="jev4/position_ids_text", axis=0))
    # 3. jev4's heads, prefixed so no name collides with the decoder's.
    heads = compose.add_prefix(onnx.load(str(heads_path)), "jev4_heads/", rename_inputs=False, rename_outputs=False)
    graph.node.extend(heads.graph.node)
    graph.initializer.extend(heads.graph.initializer)
    graph.value_info.extend(heads.graph.value_info)
    model.functions.extend(heads.functions)
    known = {(o.domain, o.version) for o in model.opset_import}
    for opset in heads.opset_import:
        if opset.domain not in {d for d, _ in known}:
            model.opset_import.append(opset)
    # Inputs and outputs as jev4's language graph spec has them (text only).
    inputs = [
        _value_info("input_ids", TensorProto.INT64, ("batch", "seq")),
        _value_info("attention_mask", TensorProto.INT64, ("batch", "seq")),
        _value_info("position_ids", TensorProto.INT64, (3, "batch", "seq")),
        _value_info("pooling_mask", TensorProto.INT64, ("batch", "seq")),
    ]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.output[:]
    graph.output.extend(heads.graph.output)
    adopt_external_data(model, decoder_path.parent, out_path)  # the heads' few small tensors stay inline
    onnx.save_model(model, str(out_path))
    # No onnx.checker here: the builder writes SimplifiedLayerNormalization in the default domain, where only
    # onnxruntime registers it, so the checker refuses a graph onnxruntime runs. The export's CPU check loads it.
    return fused_op_counts(out_path)


def fused_op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type the graph at ``path`` has (read without its weights)."""
    import onnx

    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


def write_qwen2_for_builder(qwen2_dir: Path) -> None:
    """Name the architecture the builder dispatches on: a jev4 text-only export says ``Qwen2Model`` (no LM head)."""
    path = qwen2_dir / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    path.write_text(json.dumps(config, indent=2) + "\n")


def build_fused_language_graph(qwen2_dir: Path, projector: nn.Linear, hidden: int, out_dir: Path, work_dir: Path) -> tuple[Path, dict]:
    """``out_dir/language.onnx`` from the text-only Qwen2 checkpoint at ``qwen2_dir`` (consumed: removed once read); returns (path, facts)."""
    import onnx

    require_builder()
    write_qwen2_for_builder(qwen2_dir)
    decoder = run_builder(qwen2_dir, work_dir / "builder", work_dir)
    shutil.rmtree(qwen2_dir)  # as big as the graph the builder just wrote; free the disk before the graph moves on
    opset = _main_opset(onnx.load(str(decoder), load_external_data=False))
    heads = work_dir / "heads.onnx"
    _export_heads(projector, hidden, heads, opset)
    path = out_dir / "language.onnx"
    counts = graft(decoder, heads, path)
    if counts.get("Softmax", 0) or not counts.get("GroupQueryAttention"):
        raise FusedExportError(f"{path}: attention is not fused (op counts {counts})")
    from importlib.metadata import version

    facts = {"producer": f"onnxruntime-genai {version('onnxruntime-genai')} model builder", "opset": opset, "fused_ops": {op: counts.get(op, 0) for op in FUSED_OPS}}
    log.info("fused language graph: %s", ", ".join(f"{n} {op}" for op, n in facts["fused_ops"].items()))
    return path, facts
