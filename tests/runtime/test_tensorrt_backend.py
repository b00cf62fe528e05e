"""The TensorRT backend: profile checks, image packing, host checks, and the runner's wiring.

TensorRT cannot be installed here. The wiring (I/O names and dtypes, shapes,
buffer addresses, scratch memory, image packing, feeds shared with the
onnxruntime backend) is checked with a fake ``tensorrt`` whose "engine" is the
ONNX graph run by onnxruntime on CPU, reading and writing the very buffers
the runner hands over by address: the TensorRT encoder must then reproduce
the onnxruntime encoder exactly. Real TensorRT runs at the end, skipped
without it.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import jev4.runtime as rt
from jev4.errors import EncodeError, EngineMismatchError, ManifestError, MissingDependencyError, ProviderError, TensorRTError
from jev4.export import tensorrt as engine_mod
from jev4.export.graphs import language_graph_spec
from jev4.export.manifest import read_manifest
from jev4.export.onnx_vision import vision_graph_spec
from jev4.export.tensorrt import EngineHost, EngineSettings, axis_ranges, build_engines, profile_shapes
from jev4.model.config import load_config
from jev4.model.preprocess import Preprocessor
from jev4.runtime import tensorrt_backend as backend_mod
from jev4.runtime.tensorrt_backend import EngineRunner, TensorRTEncoder, check_profile, group_images, load_runners

HOST = EngineHost("10.9.0", "NVIDIA H100 80GB HBM3", (9, 0))
TEXTS = ["What is the capital of France?", "Paris is the capital of France. " * 12, "x", "def f(a): return a * 2"]


# ----------------------------------------------------------------------------------------------
# Pure checks


def test_check_profile_accepts_shapes_inside():
    spec = language_graph_spec(16, 8, with_images=True)
    profile = profile_shapes(spec, axis_ranges(EngineSettings(batch=(1, 4, 8), seq=(1, 64, 128))))
    shapes = {"input_ids": (8, 128), "attention_mask": (8, 128), "position_ids": (3, 8, 128), "pooling_mask": (8, 128), "image_embeds": (0, 16)}
    check_profile(shapes, profile, spec, "language.plan")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"input_ids": (9, 10)}, ["'input_ids'", "'batch' (axis 0) is 9", "[1, 8]", "smaller batch_size", "--batch"]),
        ({"input_ids": (2, 129)}, ["'seq' (axis 1) is 129", "[1, 128]", "smaller max_length", "--seq"]),
        ({"position_ids": (2, 2, 10)}, ["'position_ids' axis 0 is 2", "[3, 3]"]),
        ({"image_embeds": (4, 15)}, ["'image_embeds' axis 1 is 15"]),
        ({"pooling_mask": (2,)}, ["'pooling_mask' has shape (2,)", "2 dims"]),
    ],
)
def test_check_profile_names_the_axis_and_the_fix(change, words):
    spec = language_graph_spec(16, 8, with_images=True)
    profile = profile_shapes(spec, axis_ranges(EngineSettings(batch=(1, 4, 8), seq=(1, 64, 128))))
    shapes = {"input_ids": (2, 10), "attention_mask": (2, 10), "position_ids": (3, 2, 10), "pooling_mask": (2, 10), "image_embeds": (0, 16), **change}
    with pytest.raises(EncodeError) as err:
        check_profile(shapes, profile, spec, "/art/language.plan")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "/art/language.plan" in str(err.value)


def test_vision_profile_errors_point_at_image_tokens():
    spec = vision_graph_spec({"out_hidden_size": 16, "spatial_merge_size": 2, "window_size": 112})
    profile = profile_shapes(spec, axis_ranges(EngineSettings(image_tokens=(1, 16, 64))))
    shapes = {"pixel_values": (4 * 65, 1176), "position_ids": (4 * 65, 2), "window_index": (65,), "cu_seqlens": (2,), "cu_window_seqlens": (3,)}
    with pytest.raises(EncodeError, match="'patches' \\(axis 0\\) is 260.*max_pixels.*--image-tokens"):
        check_profile(shapes, profile, spec, "vision.plan")


def test_group_images_packs_in_order_within_limits():
    grid = torch.tensor([[1, 4, 4], [1, 8, 8], [1, 4, 8], [1, 2, 2], [1, 16, 8]])  # 4, 16, 8, 1, 32 merged tokens
    assert group_images(grid, 4, max_tokens=32, max_images=8) == [slice(0, 4), slice(4, 5)]  # 29, then 32
    assert group_images(grid[:4], 4, max_tokens=20, max_images=8) == [slice(0, 2), slice(2, 4)]  # 20, then 9
    assert group_images(grid, 4, max_tokens=100, max_images=2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert group_images(grid, 4, max_tokens=100, max_images=8) == [slice(0, 5)]
    assert group_images(grid[:0], 4, 32, 8) == []
    with pytest.raises(EncodeError, match="image 4 has 32 merged tokens.*at most 16.*max_pixels.*--image-tokens"):
        group_images(grid, 4, max_tokens=16, max_images=8)


# ----------------------------------------------------------------------------------------------
# The fake: building = remembering the ONNX file; running = onnxruntime on the bound buffers


class DataType(enum.Enum):
    FLOAT = "tensor(float)"
    HALF = "tensor(float16)"
    INT64 = "tensor(int64)"


NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64}


class IOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


def _read(address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


class FakeContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.shapes, self.addresses, self.results = {}, {}, None
        self.device_memory = None
        self.executions = 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        self.results = None
        return True

    def set_tensor_address(self, name, address):
        assert isinstance(address, int) and address != 0, f"{name}: TensorRT needs a non-null address"
        self.addresses[name] = address
        return True

    def _run(self):
        feed = {}
        for name, _, dtype in self.engine.io_inputs:
            feed[name] = _read(self.addresses[name], self.shapes[name], NUMPY[dtype])
        self.results = dict(zip(self.engine.output_names, self.engine.session.run(None, feed)))

    def get_tensor_shape(self, name):
        if self.results is None:
            self._run()
        return self.results[name].shape

    def update_device_memory_size_for_shapes(self):
        return 4096

    def set_device_memory(self, address, size):
        assert size >= 4096
        self.device_memory = (address, size)

    def execute_async_v3(self, stream):
        assert stream == 0  # the CPU test device has no CUDA stream
        assert self.device_memory is not None, "USER_MANAGED context ran without scratch memory"
        if self.results is None:
            self._run()
        for name, value in self.results.items():
            value = np.ascontiguousarray(value)
            if value.size:
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.executions += 1
        return True


class FakeEngine:
    def __init__(self, onnx_path: Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.io_inputs = [(i.name, IOMode.INPUT, DataType(i.type)) for i in self.session.get_inputs()]
        self.io_outputs = [(o.name, IOMode.OUTPUT, DataType(o.type)) for o in self.session.get_outputs()]
        self.output_names = [o[0] for o in self.io_outputs]
        self.io = {name: (mode, dtype) for name, mode, dtype in self.io_inputs + self.io_outputs}
        self.contexts = []

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, index):
        return list(self.io)[index]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def create_execution_context(self, strategy=None):
        self.contexts.append(FakeContext(self, strategy))
        return self.contexts[-1]


def fake_tensorrt(version=HOST.tensorrt) -> types.ModuleType:
    """Builds "engines" that name their ONNX file, and runs them with onnxruntime."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo calls find_spec("tensorrt") on import
    trt.__version__ = version
    trt.TensorIOMode = IOMode
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, USER_MANAGED=2)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.engines = []

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Network:
        def __init__(self):
            self.inputs, self.path = [], None

        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            import onnx

            model = onnx.load(path, load_external_data=False)
            inits = {t.name for t in model.graph.initializer}
            self.network.inputs = [v.name for v in model.graph.input if v.name not in inits]
            self.network.path = path
            return True

    class Config:
        builder_optimization_level = 3

        def add_optimization_profile(self, profile):
            return 0

        def set_flag(self, flag):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            return json.dumps({"onnx": network.path}).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            engine = FakeEngine(Path(json.loads(bytes(data))["onnx"]))
            trt.engines.append(engine)
            return engine

    trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, OnnxParser, Builder, Runtime
    return trt


# ----------------------------------------------------------------------------------------------
# Artifacts


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory, runtime_source):
    """One fp32 ONNX artifact (text + vision), exported once for this module."""
    from jev4.export.onnx import OnnxExportSettings, export_onnx

    out = tmp_path_factory.mktemp("trt-onnx") / "retrieval"
    return export_onnx(OnnxExportSettings(model=str(runtime_source), adapter="retrieval", out=str(out)), progress=False)


@pytest.fixture(scope="module")
def engine_artifact(tmp_path_factory, onnx_artifact):
    """``jev4 build-engine`` run on the artifact (with the fake builder); small image-token range to force packing."""
    out = tmp_path_factory.mktemp("trt-engines") / "retrieval"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", fake_tensorrt())
        mp.setattr(engine_mod, "current_host", lambda trt, device=0: HOST)
        return build_engines(onnx_artifact, EngineSettings(batch=(1, 4, 16), seq=(1, 128, 1024), image_tokens=(1, 32, 96)), out=out)


@pytest.fixture
def fake_trt(monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def cpu_encoder(root: Path, trt) -> TensorRTEncoder:
    """The encoder over the fake engines, on the CPU (``TensorRTEncoder.open`` itself insists on CUDA)."""
    manifest = read_manifest(root)
    config = load_config(root)
    runners = load_runners(trt, trt.Runtime(None), root, manifest, torch.device("cpu"))
    return TensorRTEncoder(root, manifest, config, Preprocessor.from_dir(root, config), runners)


# ----------------------------------------------------------------------------------------------
# Wiring against onnxruntime


def test_text_matches_onnxruntime_exactly(engine_artifact, fake_trt):
    ours = cpu_encoder(engine_artifact, fake_trt)
    reference = rt.load(engine_artifact, backend="onnxruntime")
    for dim in (None, 16):
        got = ours.encode_text(TEXTS, truncate_dim=dim, batch_size=3)
        want = reference.encode_text(TEXTS, truncate_dim=dim, batch_size=3)
        assert got.shape == want.shape and torch.equal(got, want)
    got = ours.encode_text(TEXTS, return_multivector=True)
    want = reference.encode_text(TEXTS, return_multivector=True)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    language = ours.runners["language"]
    context = fake_trt.engines[0].contexts[0]
    assert context.strategy == 2 and language.user_memory  # scratch sized per call, not for the profile's max
    assert context.device_memory[1] >= 4096


def test_images_are_packed_into_calls_that_fit(engine_artifact, fake_trt):
    from PIL import Image

    rng = np.random.RandomState(5)
    sizes = [(200, 300), (60, 90), (100, 120), (140, 210), (56, 56)]
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in sizes]
    ours = cpu_encoder(engine_artifact, fake_trt)
    reference = rt.load(engine_artifact, backend="onnxruntime")
    got = ours.encode_image(images, batch_size=5)
    want = reference.encode_image(images, batch_size=5)
    # the vision tower's attention is block-diagonal per image, so packing changes nothing but float summation order
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    multi = ours.encode_image(images, batch_size=5, return_multivector=True)
    multi_ref = reference.encode_image(images, batch_size=5, return_multivector=True)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(multi, multi_ref))
    vision = next(e for e in fake_trt.engines if "pixel_values" in e.io)
    # merged tokens 77, 40, 16, 6, 4 (largest first) in calls of at most 96: [77], [40, 16, 6, 4]; two encodes
    assert sum(c.executions for c in vision.contexts) == 2 * 2
    # text after images runs the language engine with no image embeddings (an empty, non-null buffer)
    assert torch.equal(ours.encode_text(TEXTS[:2]), reference.encode_text(TEXTS[:2]))
    big = Image.fromarray((rng.rand(400, 600, 3) * 255).astype(np.uint8))  # 247 merged tokens
    with pytest.raises(EncodeError, match="has 247 merged tokens; the vision engine takes at most 96"):
        ours.encode_image([big])


def test_outside_the_profile_is_refused_before_running(engine_artifact, fake_trt):
    ours = cpu_encoder(engine_artifact, fake_trt)
    with pytest.raises(EncodeError, match="'batch' \\(axis 0\\) is 20, outside the engine's profile range \\[1, 16\\]"):
        ours.encode_text(["a"] * 20, batch_size=20)
    with pytest.raises(EncodeError, match="'seq' \\(axis 1\\) is .*\\[1, 1024\\].*max_length"):
        ours.encode_text(["word " * 2000])
    assert sum(c.executions for e in fake_trt.engines for c in e.contexts) == 0


def test_an_engine_with_other_io_is_refused(engine_artifact, onnx_artifact, fake_trt):
    manifest = read_manifest(engine_artifact)
    engine = FakeEngine(onnx_artifact / "vision.onnx")  # the vision graph where the language engine should be
    spec = engine_mod.spec_from_json(manifest["contents"]["graphs"]["language"])
    profile = backend_mod.profile_from_json(manifest["contents"]["tensorrt"]["engines"]["language"]["profile"])
    with pytest.raises(TensorRTError, match="engine I/O .* differs from the graph spec"):
        EngineRunner(fake_trt, engine, spec, profile, torch.device("cpu"), "language.plan")


# ----------------------------------------------------------------------------------------------
# Loading through jev4.runtime.load


def test_load_without_tensorrt_says_how_to_install(engine_artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match="pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com"):
        rt.load(engine_artifact, backend="tensorrt")


def test_load_without_engines_says_how_to_build(onnx_artifact, fake_trt):
    with pytest.raises(ManifestError, match="no TensorRT engines.*jev4 build-engine"):
        rt.load(onnx_artifact, backend="tensorrt")


def test_load_needs_cuda(engine_artifact, fake_trt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ProviderError, match="CUDA GPU"):
        rt.load(engine_artifact, backend="tensorrt")
    with pytest.raises(ProviderError, match="not cpu"):
        TensorRTEncoder.open(engine_artifact, read_manifest(engine_artifact), load_config(engine_artifact), None, device="cpu")


@pytest.mark.parametrize(
    "running",
    [EngineHost("10.3.0", "NVIDIA A10G", (8, 6)), EngineHost("10.9.0", "NVIDIA H200", (9, 0)), EngineHost("10.10.0", HOST.gpu, (9, 0))],
)
def test_load_refuses_engines_from_another_host(engine_artifact, fake_trt, monkeypatch, running):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend_mod, "current_host", lambda trt, device=0: running)
    with pytest.raises(EngineMismatchError) as err:
        rt.load(engine_artifact, backend="tensorrt")
    message = str(err.value)
    assert "engine built with TensorRT 10.9.0 on NVIDIA H100 80GB HBM3 (sm_90)" in message
    assert f"this host has {running.describe()}" in message and f"jev4 build-engine {engine_artifact}" in message
    assert not fake_trt.engines  # refused before TensorRT deserializes anything


def test_load_checks_engine_files_against_the_manifest(engine_artifact, tmp_path, fake_trt):
    damaged = tmp_path / "damaged"
    shutil.copytree(engine_artifact, damaged)
    (damaged / "language.plan").write_bytes(b"garbage")
    with pytest.raises(ManifestError, match="language.plan"):
        rt.load(damaged, backend="tensorrt")


def test_the_onnxruntime_backend_still_loads_an_artifact_with_engines(engine_artifact):
    encoder = rt.load(engine_artifact)  # auto: onnxruntime, the plans are ignored
    assert type(encoder).__name__ == "OnnxRuntimeEncoder"
    assert encoder.encode_text(["x"]).shape == (1, encoder.config.hidden_size)


# ----------------------------------------------------------------------------------------------
# Real TensorRT (GPU hosts with TensorRT only)


def _real_tensorrt_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (it cannot be on these machines; see docs/tensorrt.md)"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_real_tensorrt_skip_reason() is not None, reason=str(_real_tensorrt_skip_reason()))
def test_real_tensorrt_engines_match_onnxruntime(onnx_artifact, tmp_path):
    from PIL import Image

    out = build_engines(onnx_artifact, EngineSettings(batch=(1, 4, 8), seq=(1, 128, 512), image_tokens=(1, 64, 256)), out=tmp_path / "trt")
    ours = rt.load(out, backend="tensorrt", device="cuda")
    reference = rt.load(onnx_artifact, backend="onnxruntime")

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)

    assert cos(ours.encode_text(TEXTS), reference.encode_text(TEXTS)).min() >= 0.9999
    got, want = ours.encode_text(TEXTS, return_multivector=True), reference.encode_text(TEXTS, return_multivector=True)
    assert min(cos(g, w).min() for g, w in zip(got, want)) >= 0.999
    rng = np.random.RandomState(3)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in [(60, 90), (200, 300)]]
    assert cos(ours.encode_image(images), reference.encode_image(images)).min() >= 0.9999
