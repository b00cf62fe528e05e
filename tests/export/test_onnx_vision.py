"""vision.onnx: the Qwen2.5-VL vision tower exported once per dtype, run by onnxruntime (CPU) at many shapes.

The tiny tower has depth 4, full attention in blocks 1 and 3, windows of 4x4
merged tokens; every image set below goes through the SAME exported graph,
which proves the patch / segment / window axes are dynamic.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from jev4.export.onnx_vision import (  # noqa: E402
    DEFAULT_FP32_MODULES,
    INPUT_NAMES,
    VisionGraph,
    block_diagonal_mask,
    export_vision_graph,
    fp32_islands,
    matmul_dtypes,
    split_image_embeds,
    vision_feed,
    vision_graph_spec,
    vision_side_inputs,
)

# (width, height) of each image; grids in patches are noted for the tiny processor (patch 14, merge 2).
IMAGE_SETS = {
    "4x4-merged": [(112, 112)],  # 8x8 patches: exactly one window
    "2x2-merged": [(56, 56)],  # the smallest image
    "60x90": [(60, 90)],  # 6x4 patches
    "200x300": [(200, 300)],  # 22x14 patches: 11x7 merged, 3x2 windows
    "280x280": [(280, 280)],  # 20x20 patches: 10x10 merged, 3x3 windows (padded)
    "batch-3": [(200, 300), (56, 56), (280, 280)],
    "batch-2": [(60, 90), (112, 112)],
}
FP32_MAX_ABS = 1e-5
FP32_MIN_COS = 0.99999
FP16_MIN_COS = 0.999


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _min_cosine(a, b) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def _graph_args(feed):
    return [torch.from_numpy(feed[name]) for name in INPUT_NAMES]


@pytest.fixture(scope="module")
def visual(source_encoder):
    return source_encoder.network.model.visual


@pytest.fixture(scope="module")
def cases(source_encoder, visual):
    """Per image set: the vision feed, grid_thw and the torch tower's output (fp32)."""
    out = {}
    for name, sizes in IMAGE_SETS.items():
        inputs = source_encoder.preprocessor.image_inputs(_images(sizes))
        with torch.no_grad():
            ref = visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw).pooler_output
        feed = vision_feed(inputs.pixel_values, inputs.image_grid_thw, source_encoder.config.vision_config)
        out[name] = {"pixel_values": inputs.pixel_values, "grid": inputs.image_grid_thw, "feed": feed, "ref": ref}
    return out


@pytest.fixture(scope="module")
def fp32_session(tmp_path_factory, visual):
    path = export_vision_graph(visual, tmp_path_factory.mktemp("vision32") / "vision.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory, visual):
    """The fp16 graph (default fp32 islands), and whether exporting left the fp32 tower untouched."""
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    path = export_vision_graph(visual, tmp_path_factory.mktemp("vision16") / "vision.onnx", dtype=torch.float16)
    after = visual.state_dict()
    untouched = before.keys() == after.keys() and all(
        after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items()
    )
    untouched = untouched and not any("forward" in vars(m) for m in visual.modules())
    return path, untouched


# --- side inputs and the torch wrapper ---------------------------------------------------------


def test_side_inputs_shapes_and_mask(source_encoder, cases):
    case = cases["batch-3"]
    grid = case["grid"]
    side = vision_side_inputs(grid, source_encoder.config.vision_config)
    patches = int(grid.prod(-1).sum())
    assert side["position_ids"].shape == (patches, 2)
    assert side["window_index"].shape == (patches // 4,)
    assert sorted(side["window_index"].tolist()) == list(range(patches // 4))
    assert side["cu_seqlens"].tolist() == [0, *np.cumsum(grid.prod(-1).tolist()).tolist()]
    assert side["cu_window_seqlens"][-1].item() == patches
    assert len(side["cu_window_seqlens"]) - 1 == 6 + 1 + 9  # windows of 200x300, 56x56, 280x280
    assert all(v.dtype == torch.int64 for v in side.values())
    # The in-graph mask (comparisons only) is the block diagonal of the segments.
    cu = side["cu_window_seqlens"]
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    want = segment[:, None] == segment[None, :]
    got = block_diagonal_mask(cu, patches, torch.float32)[0, 0] == 0
    assert torch.equal(got, want)
    # The feed satisfies the graph spec the runtime checks.
    vision_graph_spec(source_encoder.config).check_feed(case["feed"], "float32")


def test_wrapper_equals_tower(visual, cases):
    """VisionGraph (precomputed inputs, one masked attention) reproduces the tower before any export.

    Bit-exact where attention has one segment; with several segments the
    masked softmax over the whole row sums in another order than the
    per-window split, which moves the last bits only.
    """
    graph = VisionGraph(visual).eval()
    for name, case in cases.items():
        with torch.no_grad():
            got = graph(*_graph_args(case["feed"]))
        ref = case["ref"]
        assert got.shape == ref.shape, name
        if name in ("4x4-merged", "2x2-merged", "60x90"):
            assert torch.equal(got, ref), name
        else:
            assert (got - ref).abs().max().item() <= 1e-6, name
    # The attention patch does not outlive the forward; the tower still runs its own code.
    assert not any("forward" in vars(m) for m in visual.modules())


def test_side_inputs_reject_bad_grid(source_encoder):
    with pytest.raises(ValueError):
        vision_side_inputs(torch.tensor([[1, 5, 4]]), source_encoder.config.vision_config)
    with pytest.raises(ValueError):
        vision_feed(torch.zeros(8, 1176), torch.tensor([[1, 4, 4]]), source_encoder.config.vision_config)


# --- fp32 graph ---------------------------------------------------------------------------------


def test_fp32_graph_axes_are_dynamic(fp32_session):
    inputs = {i.name: i.shape for i in fp32_session.get_inputs()}
    assert list(inputs) == list(INPUT_NAMES)
    for name in INPUT_NAMES:
        assert isinstance(inputs[name][0], str), f"{name} axis 0 was baked in: {inputs[name]}"
    assert inputs["pixel_values"][1] == 1176 and inputs["position_ids"][1] == 2
    assert isinstance(fp32_session.get_outputs()[0].shape[0], str)


@pytest.mark.parametrize("name", list(IMAGE_SETS))
def test_fp32_graph_matches_torch(fp32_session, cases, name):
    case = cases[name]
    (got,) = fp32_session.run(None, case["feed"])
    ref = case["ref"].numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= FP32_MAX_ABS
    assert _min_cosine(got, ref) >= FP32_MIN_COS
    # Per-image chunks, as get_image_features returns them.
    chunks = split_image_embeds(got, case["grid"])
    assert [len(c) for c in chunks] == (case["grid"].prod(-1) // 4).tolist()


# --- fp16 graph ---------------------------------------------------------------------------------


def test_fp16_export_leaves_tower_untouched(fp16_export):
    assert fp16_export[1]


def test_fp16_graph_keeps_fp32_islands(fp16_export, visual):
    path, _ = fp16_export
    last = len(visual.blocks) - 1
    islands = set(fp32_islands(path))
    assert islands == {f"fp32.blocks.{last}.mlp.down_proj.weight", "fp32.merger.mlp.0.weight", "fp32.merger.mlp.2.weight"}
    dtypes = matmul_dtypes(path)
    rest = {k: v for k, v in dtypes.items() if k.startswith("visual.")}
    assert rest and set(rest.values()) == {"float16"}, rest
    assert f"visual.blocks.{last}.mlp.down_proj.weight" not in dtypes  # the fp16 copy is unused and dropped


@pytest.mark.parametrize("name", ["4x4-merged", "280x280", "batch-3"])
def test_fp16_graph_runs_on_cpu(fp16_export, visual, cases, name):
    """ORT's CPU provider runs the fp16 graph (ops without an fp16 CPU kernel get casts inserted by ORT)."""
    session = ort.InferenceSession(str(fp16_export[0]), providers=["CPUExecutionProvider"])
    case = cases[name]
    (got,) = session.run(None, case["feed"])
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert _min_cosine(got, case["ref"].numpy()) >= FP16_MIN_COS
    # And it matches the same fp16 computation in torch.
    v16 = copy.deepcopy(visual).half()
    with torch.no_grad():
        want = VisionGraph(v16, DEFAULT_FP32_MODULES, fp32_source=visual)(*_graph_args(case["feed"]))
    assert _min_cosine(got, want.float().numpy()) >= 0.9999


def test_fp32_islands_prevent_fp16_overflow(visual, cases):
    """An activation past fp16's range in the last down_proj: inf without islands, finite with them.

    The last block's residual add stays fp32 when both the down_proj and the
    merger are islands, so the large values reach the merger's fp32 RMSNorm.
    """
    boosted = copy.deepcopy(visual)
    with torch.no_grad():
        boosted.blocks[-1].mlp.down_proj.bias[:4] += 1e5
    case = cases["280x280"]
    args = _graph_args(case["feed"])
    half = copy.deepcopy(boosted).half()
    with torch.no_grad():
        ref = VisionGraph(boosted)(*args)
        plain = VisionGraph(half)(*args)
        merger_only = VisionGraph(half, ("merger",), fp32_source=boosted)(*args)
        islands = VisionGraph(half, DEFAULT_FP32_MODULES, fp32_source=boosted)(*args)
    assert not torch.isfinite(plain).all()
    assert not torch.isfinite(merger_only).all()
    assert torch.isfinite(islands).all()
    assert _min_cosine(islands.float(), ref) >= FP16_MIN_COS


def test_fp16_graph_islands_prevent_overflow_in_onnxruntime(tmp_path, visual, cases):
    """The same overflow through the exported fp16 graph: the islands (and the fp32 residual) are really in it."""
    boosted = copy.deepcopy(visual)
    with torch.no_grad():
        boosted.blocks[-1].mlp.down_proj.bias[:4] += 1e5
    path = export_vision_graph(boosted, tmp_path / "vision.onnx", dtype=torch.float16)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    case = cases["batch-3"]
    (got,) = session.run(None, case["feed"])
    with torch.no_grad():
        ref = VisionGraph(boosted)(*_graph_args(case["feed"]))
    assert np.isfinite(got).all()
    assert _min_cosine(got, ref.numpy()) >= FP16_MIN_COS
