"""``vision.onnx``: the Qwen2.5-VL vision tower as one ONNX graph with a dynamic patch axis.

A plain export of transformers' vision tower fails: everything derived from
``grid_thw`` (rotary position ids, ``cu_seqlens``, the window permutation and
``cu_window_seqlens``) is computed with ``.tolist()`` and Python loops, and
the non-flash attention splits the sequence with
``torch.split(..., lengths.tolist())``. jev4 therefore

- computes those grid-only tensors outside the graph with transformers' own
  ``vision_utils`` (:func:`vision_side_inputs`, run by the runtime before
  every vision call) and feeds them to the tower, which accepts them as
  precomputed keyword arguments; and
- replaces the per-segment split in ``Qwen2_5_VLVisionAttention`` with one
  attention call over the whole packed sequence under a block-diagonal mask
  built in the graph from ``cu_seqlens`` by comparisons (no
  ``searchsorted``, which neither exporter supports). The patch lives on the
  attention *instances* and only for the duration of a :class:`VisionGraph`
  forward (:func:`block_diagonal_attention`); transformers' classes are never
  modified.

Everything else (patch embedding, rotary embedding, window permutation, the
blocks, the merger, the reverse permutation -- ``argsort(window_index)``,
exported as an ONNX TopK) is transformers' own code: the graph is the tower's
``forward`` traced with the side inputs supplied. The two masks (full and
windowed attention) are built once per forward and shared by the blocks.

Exporter: ``torch.onnx.export(dynamo=True)`` works and is used; the legacy
TorchScript exporter is only a fallback (see :func:`export_vision_graph`).

Graph (names as in :func:`vision_graph_spec`)::

    pixel_values      float32 [patches, C*T*P*P]   (cast to the graph dtype inside)
    position_ids      int64   [patches, 2]          (h, w) rotary ids, image order
    window_index      int64   [merged_tokens]       window permutation of merged tokens
    cu_seqlens        int64   [segments + 1]        per-image (per-frame) boundaries
    cu_window_seqlens int64   [windows + 1]         per-window boundaries (window order)
    -> image_embeds   float   [merged_tokens, out_hidden]   all images, concatenated in order

fp16: Qwen2.5-VL-3B's vision tower overflows fp16 in the last block's
``mlp.down_proj`` and in the merger (NVIDIA's TensorRT Edge-LLM exporter keeps
both in fp32). ``export_vision_graph(dtype=torch.float16)`` keeps the modules
named in ``fp32_modules`` in fp32 with explicit casts around them, so the
graph really runs those matmuls in fp32 (:func:`fp32_islands` lists them).
"""

from __future__ import annotations

import copy
import logging
import time
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAMES = ("pixel_values", "position_ids", "window_index", "cu_seqlens", "cu_window_seqlens")
OUTPUT_NAME = "image_embeds"
SIDE_INPUT_NAMES = INPUT_NAMES[1:]
# Modules Qwen2.5-VL-3B cannot run in fp16 (they overflow); "{last}" is the last vision block's index.
DEFAULT_FP32_MODULES = ("blocks.{last}.mlp.down_proj", "merger")
# Past this many bytes of weights the graph is written with external data (protobuf's 2 GB limit, with margin).
EXTERNAL_DATA_BYTES = 1_800_000_000
_MATMUL_OPS = ("MatMul", "Gemm")


def _cfg(vision_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(vision_config, Mapping):
        value = vision_config.get(key, default)
    else:
        value = getattr(vision_config, key, default)
    if value is None:
        raise ValueError(f"vision_config has no {key!r}")
    return value


def vision_side_inputs(grid_thw: torch.Tensor, vision_config: Any) -> dict[str, torch.Tensor]:
    """The grid-only, data-dependent inputs of ``vision.onnx`` for one batch of images (int64 tensors).

    Computed with transformers' ``vision_utils`` (the functions the tower
    itself calls), for any number of images of any sizes. ``vision_config``
    is the transformers vision config or the ``vision_config`` dict of
    ``config.json`` (``spatial_merge_size``, ``window_size``, ``patch_size``).
    """
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    grid = torch.as_tensor(grid_thw, dtype=torch.int64).cpu()
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape [images, 3], got {tuple(grid.shape)}")
    merge = int(_cfg(vision_config, "spatial_merge_size", 2))
    if bool(((grid[:, 1:] % merge) != 0).any()):
        raise ValueError(f"grid_thw {grid.tolist()}: heights and widths must be multiples of spatial_merge_size {merge}")
    position_ids = get_vision_position_ids(grid, merge)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid,
        spatial_merge_size=merge,
        window_size=int(_cfg(vision_config, "window_size")),
        patch_size=int(_cfg(vision_config, "patch_size", 14)),
    )
    cu_seqlens = get_vision_cu_seqlens(grid)
    return {
        "position_ids": position_ids.to(torch.int64).contiguous(),
        "window_index": window_index.to(torch.int64).contiguous(),
        "cu_seqlens": cu_seqlens.to(torch.int64).contiguous(),
        "cu_window_seqlens": cu_window_seqlens.to(torch.int64).contiguous(),
    }


def vision_feed(pixel_values: torch.Tensor, grid_thw: torch.Tensor, vision_config: Any, float_dtype: Any = None) -> dict[str, np.ndarray]:
    """The complete onnxruntime feed of ``vision.onnx``: fp32 pixel values plus :func:`vision_side_inputs`.

    ``float_dtype`` (the graph's float dtype) is accepted for symmetry with the
    language graph; pixel values are always fed as float32 and cast inside.
    """
    side = vision_side_inputs(grid_thw, vision_config)
    pixels = torch.as_tensor(pixel_values).detach().cpu().to(torch.float32).numpy()
    merge_unit = int(_cfg(vision_config, "spatial_merge_size", 2)) ** 2
    if pixels.ndim != 2 or pixels.shape[0] != side["window_index"].shape[0] * merge_unit:
        raise ValueError(f"pixel_values has shape {pixels.shape}, grid_thw {torch.as_tensor(grid_thw).tolist()} needs {side['window_index'].shape[0] * merge_unit} patches")
    return {"pixel_values": np.ascontiguousarray(pixels), **{k: v.numpy() for k, v in side.items()}}


def vision_graph_spec(config: Any) -> Any:
    """The ``GraphSpec`` of ``vision.onnx`` for a ``JinaV4Config`` (or a vision config / dict)."""
    from jev4.export.graphs import GraphSpec, TensorSpec

    vision = getattr(config, "vision_config", config)
    patch_dim = int(_cfg(vision, "in_channels", 3)) * int(_cfg(vision, "temporal_patch_size", 2)) * int(_cfg(vision, "patch_size", 14)) ** 2
    out_hidden = int(_cfg(vision, "out_hidden_size"))
    return GraphSpec(
        name="vision",
        file="vision.onnx",
        inputs=(
            TensorSpec("pixel_values", "float32", ("patches", patch_dim)),
            TensorSpec("position_ids", "int64", ("patches", 2)),
            TensorSpec("window_index", "int64", ("merged_tokens",)),
            TensorSpec("cu_seqlens", "int64", ("segments_plus_1",)),
            TensorSpec("cu_window_seqlens", "int64", ("windows_plus_1",)),
        ),
        outputs=(TensorSpec(OUTPUT_NAME, "float", ("merged_tokens", out_hidden)),),
    )


def split_image_embeds(image_embeds: Any, grid_thw: torch.Tensor, spatial_merge_size: int = 2) -> list:
    """Per-image chunks of the concatenated graph output (what ``get_image_features`` returns)."""
    sizes = (torch.as_tensor(grid_thw).prod(-1) // spatial_merge_size**2).tolist()
    bounds = np.cumsum([0, *sizes])
    return [image_embeds[int(a) : int(b)] for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------------------------
# The attention patch


def block_diagonal_mask(cu_seqlens: torch.Tensor, seq_len: int | torch.SymInt, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, N, N] mask: 0 inside each ``cu_seqlens`` segment, the dtype's minimum elsewhere.

    A position's segment is the number of boundaries ``cu_seqlens[1:]`` it is
    at or past: comparisons and a sum, so the graph has no data-dependent
    shape and no ``searchsorted``.
    """
    pos = torch.arange(seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    segment = (pos[:, None] >= cu_seqlens[None, 1:]).sum(-1)
    same = segment[:, None] == segment[None, :]
    zero = torch.zeros((), dtype=dtype, device=cu_seqlens.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=cu_seqlens.device)
    return torch.where(same, zero, blocked)[None, None]


def _masked_vision_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    *,
    _mask_cache: dict,
    **kwargs: Any,
) -> torch.Tensor:
    """``Qwen2_5_VLVisionAttention.forward`` with the per-segment split replaced by one masked call.

    The projections, the vision rotary embedding and the attention kernel are
    transformers' own (``apply_rotary_pos_emb_vision`` and the configured
    ``sdpa``/``eager`` attention interface); only the ``torch.split`` over
    ``cu_seqlens.tolist()`` is replaced by a block-diagonal mask, built once
    per ``cu_seqlens`` tensor and shared by all blocks that use it.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb_vision,
        eager_attention_forward,
    )

    seq_length = hidden_states.shape[0]
    query_states, key_states, value_states = (
        self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    )
    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb_vision(query_states, key_states, cos, sin)
    query_states = query_states.transpose(0, 1).unsqueeze(0)
    key_states = key_states.transpose(0, 1).unsqueeze(0)
    value_states = value_states.transpose(0, 1).unsqueeze(0)

    key = (id(cu_seqlens), query_states.dtype)
    if key not in _mask_cache:
        _mask_cache[key] = (cu_seqlens, block_diagonal_mask(cu_seqlens, seq_length, query_states.dtype))
    mask = _mask_cache[key][1]

    implementation = self.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        implementation = "sdpa"  # flash / flex kernels cannot be exported; sdpa computes the same thing
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    attn_output, _ = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask=mask,
        scaling=self.scaling,
        dropout=0.0,
        is_causal=False,
    )
    attn_output = attn_output.reshape(seq_length, -1).contiguous()
    return self.proj(attn_output)


@contextmanager
def block_diagonal_attention(visual: nn.Module) -> Iterator[None]:
    """Within the block, every vision attention of ``visual`` attends under a block-diagonal mask.

    Sets ``forward`` on the attention *instances* (never on the class) and
    removes it on exit, so nothing outlives the context.
    """
    cache: dict = {}
    patched = []
    try:
        for block in visual.blocks:
            attn = block.attn
            if "forward" in vars(attn):
                raise RuntimeError("vision attention is already patched")
            bound = types.MethodType(_masked_vision_attention_forward, attn)
            attn.forward = lambda *a, _bound=bound, **k: _bound(*a, _mask_cache=cache, **k)
            patched.append(attn)
        yield
    finally:
        for attn in patched:
            del attn.forward
        cache.clear()


# ----------------------------------------------------------------------------------------------
# fp32 islands


def resolve_fp32_modules(visual: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` with ``{last}`` replaced by the last vision block's index; each must name a submodule."""
    last = len(visual.blocks) - 1
    resolved = []
    for name in names:
        name = name.format(last=last)
        visual.get_submodule(name)  # raises AttributeError for a wrong name
        if name not in resolved:
            resolved.append(name)
    return resolved


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module``, creating empty parent modules along the dotted path."""
    *parents, leaf = name.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


def _island_forward(island: nn.Module, out_dtype: torch.dtype | None):
    """A forward that runs ``island`` (fp32) on upcast inputs and casts the output to ``out_dtype``."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        def up(x: Any) -> Any:
            return x.to(torch.float32) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        out = island(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
        return out if out_dtype is None else out.to(out_dtype)

    return forward


@contextmanager
def fp32_islands_patch(visual: nn.Module, islands: Mapping[str, nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Route the named submodules of a ``dtype`` tower through fp32 copies, with explicit casts.

    ``islands`` maps resolved module names to fp32 modules. Inputs are cast
    up, outputs down to ``dtype`` -- except the last block's
    ``mlp.down_proj`` when the merger is an island too: its fp32 output then
    makes that block's residual add fp32 (torch type promotion), so the
    activations that overflow fp16 reach the merger's fp32 RMSNorm without
    ever being rounded to ``dtype``. Only instance ``forward`` attributes are
    set, and removed on exit.
    """
    last_down = f"blocks.{len(visual.blocks) - 1}.mlp.down_proj"
    patched = []
    try:
        for name, island in islands.items():
            module = visual.get_submodule(name)
            if "forward" in vars(module):
                raise RuntimeError(f"{name} is already patched")
            keep_fp32 = name == last_down and "merger" in islands
            module.forward = _island_forward(island, None if keep_fp32 else dtype)
            patched.append(module)
        yield
    finally:
        for module in patched:
            vars(module).pop("forward", None)


# ----------------------------------------------------------------------------------------------
# The graph


class VisionGraph(nn.Module):
    """What ``vision.onnx`` computes: the transformers vision tower fed precomputed grid inputs.

    ``forward(pixel_values, position_ids, window_index, cu_seqlens,
    cu_window_seqlens)`` returns the merged image tokens of all images
    concatenated, ``[merged_tokens, out_hidden]`` -- the tower's
    ``pooler_output`` -- computed by the tower's own ``forward`` under
    :func:`block_diagonal_attention`.

    ``fp32_modules`` (``{last}`` = last block) are run in fp32: the graph holds
    fp32 copies of them (taken from ``fp32_source`` when given, e.g. the
    original fp32 tower, so their weights are never rounded to fp16) under
    ``fp32.<name>`` and routes the tower through them
    with explicit casts (:func:`fp32_islands_patch`). The tower passed in is
    never modified; its own copies of those modules go unused.
    """

    def __init__(self, visual: nn.Module, fp32_modules: Sequence[str] = (), fp32_source: nn.Module | None = None):
        super().__init__()
        self.visual = visual
        source = visual if fp32_source is None else fp32_source
        self.island_names = tuple(resolve_fp32_modules(visual, fp32_modules))
        # fp32 copies under the same paths: weights are named fp32.blocks.N.mlp.down_proj.weight etc.
        self.fp32 = nn.Module()
        for name in self.island_names:
            _set_submodule(self.fp32, name, copy.deepcopy(source.get_submodule(name)).to(torch.float32))

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.patch_embed.proj.weight.dtype

    def forward(
        self,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor,
        window_index: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cu_window_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        islands = {name: self.fp32.get_submodule(name) for name in self.island_names}
        with block_diagonal_attention(self.visual), fp32_islands_patch(self.visual, islands, self.dtype):
            out = self.visual(
                pixel_values,
                grid_thw=None,  # unused: every grid-derived tensor below is precomputed
                position_ids=position_ids,
                cu_seqlens=cu_seqlens,
                window_index=window_index,
                cu_window_seqlens=cu_window_seqlens,
                # Only flash attention reads these; given so the tower never computes them with .item().
                max_seqlen=0,
                max_window_seqlen=0,
            )
        return out.pooler_output


def _example_inputs(visual: nn.Module) -> tuple[torch.Tensor, ...]:
    """Three images whose sizes make every dynamic axis distinct and > 1 (so none is specialised)."""
    config = visual.config
    merge = int(config.spatial_merge_size)
    window = max(1, int(config.window_size) // merge // int(config.patch_size))  # merged tokens per window side
    # Image 1 spans 2x2 windows, image 2 spans 2x1, image 3 is one window: 3 segments, 7 windows.
    grids = [(1, merge * (window + 1), merge * (window + 2)), (1, merge * (window + 1), merge), (1, merge, merge)]
    grid = torch.tensor(grids, dtype=torch.int64)
    side = vision_side_inputs(grid, config)
    patch_dim = int(config.in_channels) * int(config.temporal_patch_size) * int(config.patch_size) ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=torch.Generator().manual_seed(0))
    return (pixels, *(side[k] for k in SIDE_INPUT_NAMES))


def _dynamic_shapes(merge_unit: int) -> dict[str, dict[int, Any]]:
    Dim = torch.export.Dim
    merged = Dim("merged_tokens", min=1)
    patches = merge_unit * merged
    return {
        "pixel_values": {0: patches},
        "position_ids": {0: patches},
        "window_index": {0: merged},
        "cu_seqlens": {0: Dim("segments_plus_1", min=2)},
        "cu_window_seqlens": {0: Dim("windows_plus_1", min=2)},
    }


def _weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(b.numel() * b.element_size() for b in module.buffers())


def export_vision_graph(
    visual: nn.Module,
    path: Path,
    opset: int = 18,
    dtype: torch.dtype = torch.float32,
    fp32_modules: tuple[str, ...] = DEFAULT_FP32_MODULES,
) -> Path:
    """Export a transformers Qwen2.5-VL vision tower to ``path`` (``vision.onnx``) and check it.

    The caller's tower is not modified: it is deep-copied when it has to be
    cast to ``dtype``; the attention patch and the fp32 islands are undone
    after the export. ``fp32_modules`` apply to fp16 and bf16 exports only
    (``{last}`` means the last block); for fp32 they are ignored.

    Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export, non-strict),
    which keeps the patch axis symbolic, with the relation ``patches =
    merge_unit * merged_tokens`` declared as a derived dim. The legacy
    TorchScript exporter is the fallback if dynamo fails (it also works on
    this graph with the side inputs precomputed, but it traces shapes and is
    deprecated).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = visual
    if visual.patch_embed.proj.weight.dtype != dtype:
        visual = copy.deepcopy(visual).to(dtype)
    islands = tuple(fp32_modules) if dtype in (torch.float16, torch.bfloat16) else ()
    graph = VisionGraph(visual, islands, fp32_source=source).eval()
    args = _example_inputs(visual)
    external = _weight_bytes(visual) > EXTERNAL_DATA_BYTES
    started = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # patches = merge_unit * merged_tokens: the derived axis keeps its expression as its name.
            warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used")
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes=_dynamic_shapes(int(visual.config.spatial_merge_size) ** 2),
                external_data=external,
                verbose=False,
            )
        exporter = "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back to the legacy exporter
        log.warning("dynamo export of the vision tower failed (%s: %s); falling back to the legacy exporter", type(exc).__name__, exc)
        _legacy_export(graph, args, path, opset, external)
        exporter = "legacy"
    onnx.checker.check_model(str(path))  # path-based: also works with external data
    log.info("exported %s (%s exporter, %s) in %.1f s", path.name, exporter, dtype, time.perf_counter() - started)
    return path


def _legacy_export(graph: nn.Module, args: tuple, path: Path, opset: int, external: bool) -> None:
    """The TorchScript exporter, with the same names and dynamic axes."""
    with torch.no_grad():
        torch.onnx.export(
            graph,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "pixel_values": {0: "patches"},
                "position_ids": {0: "patches"},
                "window_index": {0: "merged_tokens"},
                "cu_seqlens": {0: "segments_plus_1"},
                "cu_window_seqlens": {0: "windows_plus_1"},
                OUTPUT_NAME: {0: "merged_tokens"},
            },
            do_constant_folding=True,
        )
    if external:
        import onnx

        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")


# ----------------------------------------------------------------------------------------------
# Inspecting an exported graph


def fp32_islands(onnx_path: Path | str) -> list[str]:
    """The float32 MatMul/Gemm computations of a graph, named by the weights they multiply.

    In an fp16 ``vision.onnx`` these are exactly the fp32 islands (e.g.
    ``fp32.blocks.3.mlp.down_proj.weight``, ``fp32.merger.mlp.0.weight``); in an fp32
    graph every matmul is listed. Each entry is the name of the initializer
    feeding the matmul (through Transpose/Cast/Identity), or the node's name
    when no initializer feeds it (activation x activation products such as
    attention scores).
    """
    return [weight for weight, _ in _matmul_dtypes(onnx_path) if _ == "float32"]


def matmul_dtypes(onnx_path: Path | str) -> dict[str, str]:
    """``{weight or node name: numpy dtype name}`` of every MatMul/Gemm in the graph."""
    return dict(_matmul_dtypes(onnx_path))


def _matmul_dtypes(onnx_path: Path | str) -> list[tuple[str, str]]:
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    initializers = {init.name for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:  # Constant nodes hold weights too
        if node.op_type == "Constant":
            initializers.update(node.output)
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type

    def source(name: str) -> str | None:
        for _ in range(8):
            if name in initializers:
                return name
            node = producer.get(name)
            if node is None or node.op_type not in ("Transpose", "Cast", "Identity", "Reshape"):
                return None
            name = node.input[0]
        return None

    found = []
    for node in graph.node:
        if node.op_type not in _MATMUL_OPS:
            continue
        elem = types.get(node.input[0]) or types.get(node.output[0])
        dtype = helper.tensor_dtype_to_np_dtype(elem).name if elem else "unknown"
        weight = next((w for w in (source(n) for n in node.input[1:2]) if w), None)
        found.append((weight or node.name, dtype))
    return found
