"""``jev4 build-engine``: settings, profiles, typing, graph inspection, and the TensorRT call sequence.

TensorRT cannot be installed on the CPU machines, so the builder is driven
against a small fake ``tensorrt`` module that records every call (this checks
jev4's wiring against the documented API, not TensorRT). Tests that need the
real library are at the end and skip without it.
"""

from __future__ import annotations

import importlib.machinery
import json
import logging
import os
import shlex
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from jev4.cli.main import build_parser
from jev4.cli.main import main as cli_main
from jev4.errors import EngineMismatchError, ManifestError, MissingDependencyError, OutputExistsError, TensorRTError
from jev4.export import tensorrt as engine_mod
from jev4.export.graphs import language_graph_spec
from jev4.export.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_manifest, write_manifest
from jev4.export.onnx_vision import vision_graph_spec
from jev4.export.tensorrt import (
    DEFAULT_BATCH,
    DEFAULT_IMAGE_TOKENS,
    DEFAULT_SEQ,
    AxisRange,
    EngineHost,
    EngineSettings,
    GraphInfo,
    axis_ranges,
    build_engine,
    build_engines,
    build_or_hint,
    check_engine_host,
    check_precision_supported,
    engine_hint,
    inspect_onnx,
    parse_range,
    plan_graph,
    profile_shapes,
    resolve_typing,
)

HIDDEN, MULTI = 8, 4
VISION_CONFIG = {"in_channels": 3, "temporal_patch_size": 2, "patch_size": 14, "out_hidden_size": HIDDEN, "spatial_merge_size": 2, "window_size": 112}
H100 = EngineHost("10.9.0", "NVIDIA H100 80GB HBM3", (9, 0))


# ----------------------------------------------------------------------------------------------
# Tiny ONNX graphs


def _value(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, list(dims))


def _elem(dtype: str) -> int:
    return {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "float": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]


def spec_graph(spec, weight_type=TensorProto.FLOAT, qdq: str | None = None) -> onnx.ModelProto:
    """A graph with ``spec``'s inputs and outputs (symbolic dims as named axes) and one weight; Q/DQ on request."""
    inputs = [_value(t.name, _elem(t.dtype), t.shape) for t in spec.inputs]
    outputs = [_value(t.name, _elem(t.dtype), t.shape) for t in spec.outputs]
    nodes, inits = [], []
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    if qdq == "fp8":
        inits += [
            numpy_helper.from_array(weight.astype(ml_dtypes.float8_e4m3fn), "w_q"),  # raw bytes, so it can go to external data
            helper.make_tensor("w_s", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("w_zp", TensorProto.FLOAT8E4M3FN, [], [0.0]),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"]))
    elif qdq == "int8":
        inits += [
            numpy_helper.from_array(weight, "w"),
            helper.make_tensor("a_s", TensorProto.FLOAT, [], [0.05]),
            helper.make_tensor("a_zp", TensorProto.INT8, [], [0]),
        ]
        nodes += [helper.make_node("QuantizeLinear", ["w", "a_s", "a_zp"], ["w_q"]), helper.make_node("DequantizeLinear", ["w_q", "a_s", "a_zp"], ["w_dq"])]
    else:
        inits.append(numpy_helper.from_array(weight.astype(helper.tensor_dtype_to_np_dtype(weight_type)), "w"))
    for out, source in zip(spec.outputs, spec.inputs):
        nodes.append(helper.make_node("Identity", [source.name], [out.name]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def language_spec(with_images=True):
    return language_graph_spec(HIDDEN, MULTI, with_images)


def vision_spec():
    return vision_graph_spec(VISION_CONFIG)


def make_artifact(root: Path, qdq: str | None = None, with_vision=True, weight_type=TensorProto.FLOAT) -> Path:
    """A minimal ONNX artifact: graphs with the real specs' I/O, config.json, a manifest."""
    root.mkdir(parents=True)
    graphs = {"language": language_spec(with_vision)}
    if with_vision:
        graphs["vision"] = vision_spec()
    for name, spec in graphs.items():
        onnx.save(spec_graph(spec, weight_type, qdq if name == "language" else None), str(root / spec.file))
    (root / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "vision_config": VISION_CONFIG}))
    write_manifest(
        root,
        Manifest(kind="onnx", source="tiny", settings={"dtype": "fp32"}, contents={"task": "retrieval", "float_dtype": "float32", "graphs": {n: s.to_json() for n, s in graphs.items()}}),
    )
    return root


# ----------------------------------------------------------------------------------------------
# A fake tensorrt module that records the calls


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, *call):
        self.calls.append(call)

    def names(self):
        return [c[0] for c in self.calls]

    def find(self, name):
        return [c for c in self.calls if c[0] == name]


def fake_tensorrt(rec: Recorder, version="10.9.0", weak=True, parse_errors=(), build_fails_for=(), profile_index=0) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo calls find_spec("tensorrt") on import
    trt.__version__ = version
    flag_names = ["TF32", *(["FP16", "BF16", "INT8", "FP8"] if weak else [])]
    trt.BuilderFlag = types.SimpleNamespace(**{n: f"BuilderFlag.{n}" for n in flag_names})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="MemoryPoolType.WORKSPACE")

    class Logger:
        WARNING = "Logger.WARNING"

        def __init__(self, level):
            rec("Logger", level)

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            rec("OnnxParser")
            self.network = network

        def parse_from_file(self, path):
            rec("parse_from_file", path)
            model = onnx.load(path, load_external_data=False)
            inits = {t.name for t in model.graph.initializer}
            self.network.inputs = [v.name for v in model.graph.input if v.name not in inits]
            self.network.path = path
            return not parse_errors

        @property
        def num_errors(self):
            return len(parse_errors)

        def get_error(self, i):
            return parse_errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            rec("serialize")
            return b"CACHE" + self.data[-3:] + b"+"

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            rec("set_memory_pool_limit", pool, size)

        @property
        def builder_optimization_level(self):
            return self._level

        @builder_optimization_level.setter
        def builder_optimization_level(self, level):
            rec("builder_optimization_level", level)
            self._level = level

        def set_flag(self, flag):
            rec("set_flag", flag)

        def add_optimization_profile(self, profile):
            rec("add_optimization_profile")
            return profile_index

        def create_timing_cache(self, data):
            rec("create_timing_cache", bytes(data))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            rec("set_timing_cache", ignore_mismatch)
            self.cache = cache
            return True

        def get_timing_cache(self):
            rec("get_timing_cache")
            return self.cache

    class Profile:
        def set_shape(self, name, low, opt, high):
            rec("set_shape", name, tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            rec("Builder")

        def create_network(self, flags):
            rec("create_network", flags)
            return Network()

        def create_builder_config(self):
            rec("create_builder_config")
            return Config()

        def create_optimization_profile(self):
            rec("create_optimization_profile")
            return Profile()

        def build_serialized_network(self, network, config):
            rec("build_serialized_network")
            name = Path(network.path).name
            return None if name in build_fails_for else b"PLAN:" + name.encode()

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, OnnxParser, Builder
    return trt


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def with_fake_trt(monkeypatch, rec):
    """Install a recording fake ``tensorrt`` and pretend this host has an H100."""

    def install(**kwargs):
        trt = fake_tensorrt(rec, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(engine_mod, "current_host", lambda trt, device=0: EngineHost(trt.__version__, H100.gpu, H100.capability))
        return trt

    return install


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# ----------------------------------------------------------------------------------------------
# Settings


def test_parse_range_accepts_min_opt_max():
    assert parse_range("1,8,32", "--batch") == (1, 8, 32)
    assert parse_range(" 4, 4 ,4", "--seq") == (4, 4, 4)
    assert parse_range((2, 3, 5), "--seq") == (2, 3, 5)


@pytest.mark.parametrize(
    "text, words",
    [("1,8", "three values"), ("1,8,32,64", "three values"), ("a,8,32", "three integers"), ("0,8,32", "positive"), ("-1,8,32", "positive"), ("8,1,32", "min <= opt <= max"), ("1,64,32", "min <= opt <= max"), ("", "three integers")],
)
def test_parse_range_errors_name_the_flag(text, words):
    with pytest.raises(TensorRTError) as err:
        parse_range(text, "--batch")
    assert "--batch" in str(err.value) and words in str(err.value)


def test_engine_settings_validate_and_normalise():
    settings = EngineSettings(precision="fp8", batch="2,4,8", seq=[16, 128, 1024], workspace_gib=2)
    assert settings.batch == (2, 4, 8) and settings.seq == (16, 128, 1024) and settings.image_tokens == DEFAULT_IMAGE_TOKENS
    assert settings.workspace_bytes == 2 * 1024**3
    assert json.loads(json.dumps(settings.to_json()))["batch"] == [2, 4, 8]
    for kwargs, flag in [({"precision": "int4"}, "--precision"), ({"seq": "9,1,2"}, "--seq"), ({"image_tokens": "1,2"}, "--image-tokens"), ({"workspace_gib": 0}, "--workspace-gib"), ({"optimization_level": 6}, "--optimization-level")]:
        with pytest.raises(TensorRTError, match=flag):
            EngineSettings(**kwargs)


def test_cli_defaults_are_the_module_defaults():
    args = build_parser().parse_args(["build-engine", "ART"])
    assert parse_range(args.batch, "--batch") == DEFAULT_BATCH
    assert parse_range(args.seq, "--seq") == DEFAULT_SEQ
    assert parse_range(args.image_tokens, "--image-tokens") == DEFAULT_IMAGE_TOKENS
    assert args.precision == EngineSettings().precision and args.optimization_level == EngineSettings().optimization_level
    assert args.strongly_typed is None and args.out is None and not args.force


# ----------------------------------------------------------------------------------------------
# Profiles


def test_language_profile_shapes_follow_the_spec_axes():
    settings = EngineSettings(batch=(1, 4, 16), seq=(2, 64, 256))
    shapes = profile_shapes(language_spec(), axis_ranges(settings))
    assert shapes == {
        "input_ids": ((1, 2), (4, 64), (16, 256)),
        "attention_mask": ((1, 2), (4, 64), (16, 256)),
        "position_ids": ((3, 1, 2), (3, 4, 64), (3, 16, 256)),
        "pooling_mask": ((1, 2), (4, 64), (16, 256)),
        # no image tokens for text; at most one per token of the largest batch
        "image_embeds": ((0, HIDDEN), (0, HIDDEN), (16 * 256, HIDDEN)),
    }
    text_only = profile_shapes(language_spec(with_images=False), axis_ranges(settings))
    assert sorted(text_only) == ["attention_mask", "input_ids", "pooling_mask", "position_ids"]


def test_vision_profile_shapes_follow_merge_unit_and_windows():
    settings = EngineSettings(batch=(1, 8, 32), image_tokens=(4, 256, 2048))
    shapes = profile_shapes(vision_spec(), axis_ranges(settings, merge_unit=4, window_tokens=16))
    patch_dim = 3 * 2 * 14 * 14
    assert shapes["pixel_values"] == ((16, patch_dim), (1024, patch_dim), (8192, patch_dim))
    assert shapes["position_ids"] == ((16, 2), (1024, 2), (8192, 2))
    assert shapes["window_index"] == ((4,), (256,), (2048,))
    assert shapes["cu_seqlens"] == ((2,), (2,), (33,))  # one image at least, batch.max images at most
    assert shapes["cu_window_seqlens"] == ((2,), (256 // 16 + 2,), (2049,))  # never more windows than tokens


def test_every_profile_is_ordered():
    ranges = axis_ranges(EngineSettings(batch=(3, 3, 3), seq=(1, 1, 1), image_tokens=(1, 1, 1)))
    for spec in (language_spec(), vision_spec()):
        for name, (low, opt, high) in profile_shapes(spec, ranges).items():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high)), name


def test_unknown_axis_is_named():
    spec = language_spec()
    spec = type(spec)(spec.name, spec.file, (*spec.inputs, type(spec.inputs[0])("extra", "int64", ("frames",))), spec.outputs)
    with pytest.raises(TensorRTError, match="'extra'.*'frames'"):
        profile_shapes(spec, axis_ranges(EngineSettings()))


def test_axis_range_rejects_disorder():
    assert AxisRange(0, 0, 5).as_tuple() == (0, 0, 5)
    with pytest.raises(TensorRTError):
        AxisRange(2, 1, 5)


# ----------------------------------------------------------------------------------------------
# Reading graphs


def test_inspect_detects_fp8_qdq(tmp_path):
    onnx.save(spec_graph(language_spec(), qdq="fp8"), str(tmp_path / "g.onnx"))
    info = inspect_onnx(tmp_path / "g.onnx")
    assert info.has_qdq and info.qdq_nodes == 1 and info.quant_types == ("fp8",)
    assert [t.name for t in info.inputs] == language_spec().input_names()
    assert info.inputs[2].shape == (3, "batch", "seq")


def test_inspect_detects_int8_qdq(tmp_path):
    onnx.save(spec_graph(language_spec(), qdq="int8"), str(tmp_path / "g.onnx"))
    info = inspect_onnx(tmp_path / "g.onnx")
    assert info.qdq_nodes == 2 and info.quant_types == ("int8",) and info.float_dtype == "fp32"


@pytest.mark.parametrize("weight_type, want", [(TensorProto.FLOAT, "fp32"), (TensorProto.FLOAT16, "fp16")])
def test_inspect_plain_graph(tmp_path, weight_type, want):
    onnx.save(spec_graph(language_spec(), weight_type), str(tmp_path / "g.onnx"))
    info = inspect_onnx(tmp_path / "g.onnx")
    assert not info.has_qdq and info.quant_types == () and info.float_dtype == want


def test_inspect_never_reads_external_weights(tmp_path):
    model = spec_graph(language_spec(), qdq="fp8")
    onnx.save_model(model, str(tmp_path / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="g.onnx.data", size_threshold=0)
    assert onnx.load(str(tmp_path / "g.onnx"), load_external_data=False).graph.initializer[0].data_location == TensorProto.EXTERNAL
    (tmp_path / "g.onnx.data").unlink()  # the weights are gone; their types and dims are still in the graph
    info = inspect_onnx(tmp_path / "g.onnx")
    assert info.quant_types == ("fp8",) and info.float_dtype == "fp32"


def test_inspect_finds_qdq_inside_functions(tmp_path):
    fn_nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    fn = helper.make_function("local", "qdq", ["x", "s"], ["y"], fn_nodes, [helper.make_opsetid("", 21)])
    graph = helper.make_graph(
        [helper.make_node("qdq", ["x", "s"], ["y"], domain="local")],
        "g",
        [_value("x", TensorProto.FLOAT, ("batch", 4))],
        [_value("y", TensorProto.FLOAT, ("batch", 4))],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])],
    )
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("local", 1)])
    onnx.save(model, str(tmp_path / "f.onnx"))
    info = inspect_onnx(tmp_path / "f.onnx")
    assert info.qdq_nodes == 2 and "int8" in info.quant_types


def test_inspect_missing_or_broken_file(tmp_path):
    with pytest.raises(TensorRTError, match="not found"):
        inspect_onnx(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x00not protobuf" * 10)
    with pytest.raises(TensorRTError, match="bad.onnx"):
        inspect_onnx(tmp_path / "bad.onnx")


# ----------------------------------------------------------------------------------------------
# Typing and flags


def _info(qdq=0, quant=(), float_dtype="fp32"):
    return GraphInfo("/a/language.onnx", qdq, tuple(quant), float_dtype)


@pytest.mark.parametrize(
    "precision, info, forced, weak, want",
    [
        ("fp8", _info(40, ["fp8"], "fp16"), None, True, (True, ())),  # Q/DQ graph: strongly typed, no flags
        ("fp8", _info(40, ["fp8"], "fp16"), None, False, (True, ())),  # same on TensorRT 11
        ("int8", _info(40, ["int8"]), None, True, (True, ())),
        ("fp8", _info(40, ["fp8"], "fp16"), False, True, (False, ("FP8", "FP16"))),  # forced weak: the old recipe
        ("int8", _info(40, ["int8"]), False, True, (False, ("INT8", "FP16"))),
        ("fp16", _info(float_dtype="fp16"), None, True, (True, ())),  # fp16 export: its own types (fp32 islands kept)
        ("bf16", _info(float_dtype="bf16"), None, False, (True, ())),
        ("fp32", _info(), None, False, (True, ())),
        ("fp16", _info(), None, True, (False, ("FP16",))),  # fp32 graph lowered by a flag on TensorRT 10
        ("bf16", _info(), None, True, (False, ("BF16",))),
        ("fp32", _info(float_dtype="fp16"), None, True, (False, ())),
    ],
)
def test_resolve_typing(precision, info, forced, weak, want):
    assert resolve_typing(precision, info, forced, weak) == want


@pytest.mark.parametrize(
    "precision, info, forced, weak, words",
    [
        ("fp8", _info(), None, True, "no Q/DQ nodes"),
        ("fp8", _info(10, ["int8"]), None, True, "['int8']"),
        ("int8", _info(10, ["fp8"]), None, True, "jev4-export --int8"),
        ("fp16", _info(), None, False, "TensorRT 11"),  # no precision flags any more: the graph's types decide
        ("fp16", _info(), True, True, "strongly typed build runs the graph in its own types (fp32)"),
        ("fp4", _info(), None, True, "unknown precision"),
    ],
)
def test_resolve_typing_refuses_incoherent_requests(precision, info, forced, weak, words):
    with pytest.raises(TensorRTError) as err:
        resolve_typing(precision, info, forced, weak)
    assert words in str(err.value) and "language.onnx" in str(err.value)


def test_auto_precision_is_the_graphs_own():
    settings = EngineSettings()
    assert plan_graph(language_spec(), _info(40, ["fp8"], "fp16"), settings, True).precision == "fp8"
    assert plan_graph(language_spec(), _info(40, ["int8"], "bf16"), settings, True).precision == "int8"
    plain = plan_graph(language_spec(), _info(float_dtype="fp16"), settings, False)
    assert (plain.precision, plain.strongly_typed, plain.flags) == ("fp16", True, ())


def test_weak_fp16_vision_build_warns_about_overflow(caplog):
    with caplog.at_level(logging.WARNING, logger="jev4.export.tensorrt"):
        plan = plan_graph(vision_spec(), GraphInfo("vision.onnx", 0, (), "fp32"), EngineSettings(precision="fp16"), True)
    assert plan.flags == ("FP16",)
    assert any("overflow" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Hosts and capability


def test_engine_host_round_trips_and_describes():
    assert EngineHost.from_json(H100.to_json()) == H100
    assert H100.describe() == "TensorRT 10.9.0 on NVIDIA H100 80GB HBM3 (sm_90)"
    with pytest.raises(ManifestError, match="compute_capability"):
        EngineHost.from_json({"version": "10.9.0", "gpu": "x"})


@pytest.mark.parametrize(
    "running",
    [
        EngineHost("10.3.0", "NVIDIA A10G", (8, 6)),
        EngineHost("10.3.0", H100.gpu, (9, 0)),  # same GPU, other TensorRT
        EngineHost("10.9.0", "NVIDIA H100 PCIe", (9, 0)),  # same TensorRT and sm, other GPU model
        EngineHost("10.9.0", "NVIDIA H200", (9, 0)),
    ],
)
def test_engine_host_mismatch_names_both(running):
    with pytest.raises(EngineMismatchError) as err:
        check_engine_host(H100, running, "/srv/art")
    message = str(err.value)
    assert H100.describe() in message and running.describe() in message
    assert "jev4 build-engine /srv/art" in message


def test_engine_host_match_passes():
    check_engine_host(H100, EngineHost("10.9.0", H100.gpu, (9, 0)), "art")


def test_precision_needs_capability():
    check_precision_supported("fp8", (8, 9))
    check_precision_supported("fp8", (9, 0))
    check_precision_supported("fp16", (7, 0))
    with pytest.raises(TensorRTError, match="fp8 needs compute capability >= 8.9; NVIDIA A10G is 8.6"):
        check_precision_supported("fp8", (8, 6), "NVIDIA A10G")
    with pytest.raises(TensorRTError, match="bf16"):
        check_precision_supported("bf16", (7, 5))


# ----------------------------------------------------------------------------------------------
# Missing TensorRT


def test_build_engine_without_tensorrt_says_how_to_install(tmp_path, no_tensorrt):
    onnx.save(spec_graph(language_spec()), str(tmp_path / "language.onnx"))
    with pytest.raises(MissingDependencyError) as err:
        build_engine(tmp_path / "language.onnx", EngineSettings(), tmp_path / "language.plan")
    message = str(err.value)
    assert "pip install tensorrt-cu12" in message and "--extra-index-url https://pypi.nvidia.com" in message
    assert "tensorrt-cu13" in message and "nvcr.io/nvidia/tensorrt" in message
    assert not (tmp_path / "language.plan").exists()


def test_hint_names_the_exact_command(tmp_path):
    art = tmp_path / "my art"
    message = engine_hint(art, "fp8", "the tensorrt package is not installed")
    assert "the tensorrt package is not installed" in message
    command = f"jev4 build-engine {shlex.quote(str(art))} --precision fp8 --batch 1,8,32 --seq 1,512,8192 --force"
    assert command in message
    assert "pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com" in message
    # the command parses with jev4's own CLI into the settings it names
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.artifact, args.precision, args.force) == (str(art), "fp8", True)
    assert EngineSettings(precision=args.precision, batch=args.batch, seq=args.seq).batch == DEFAULT_BATCH


def test_build_or_hint_without_tensorrt_warns_and_returns_the_hint(tmp_path, no_tensorrt, caplog):
    art = make_artifact(tmp_path / "art", qdq="fp8")
    before = (art / MANIFEST_NAME).read_bytes()
    with caplog.at_level(logging.WARNING, logger="jev4.export.tensorrt"):
        message = build_or_hint(art, "fp8")
    assert message is not None and "tensorrt package is not installed" in message
    assert f"jev4 build-engine {art} --precision fp8" in message
    assert [r.levelno for r in caplog.records if r.message == message] == [logging.WARNING]
    assert (art / MANIFEST_NAME).read_bytes() == before and not list(art.glob("*.plan"))


def test_build_or_hint_without_gpu(tmp_path, monkeypatch, rec):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    message = build_or_hint(make_artifact(tmp_path / "art", qdq="fp8"), "fp8")
    assert "no CUDA GPU" in message and "build_serialized_network" not in rec.names()


# ----------------------------------------------------------------------------------------------
# The call sequence, against the fake


def test_build_engine_follows_the_documented_sequence(tmp_path, with_fake_trt, rec):
    with_fake_trt()
    onnx.save(spec_graph(language_spec(), qdq="fp8"), str(tmp_path / "language.onnx"))
    settings = EngineSettings(precision="fp8", batch=(1, 2, 4), seq=(1, 16, 64), workspace_gib=2, optimization_level=4, timing_cache=str(tmp_path / "tc.bin"))
    result = build_engine(tmp_path / "language.onnx", settings, tmp_path / "language.plan", spec=language_spec())

    names = rec.names()
    assert names == [
        "Logger", "Builder", "create_network", "OnnxParser", "parse_from_file",
        "create_builder_config", "set_memory_pool_limit", "builder_optimization_level",
        "create_optimization_profile", *["set_shape"] * 5, "add_optimization_profile",
        "create_timing_cache", "set_timing_cache",
        "build_serialized_network", "get_timing_cache", "serialize",
    ]  # fmt: skip
    assert rec.find("create_network") == [("create_network", 1 << 1)]  # STRONGLY_TYPED: the Q/DQ graph decides types
    assert rec.find("parse_from_file") == [("parse_from_file", str(tmp_path / "language.onnx"))]
    assert rec.find("set_memory_pool_limit") == [("set_memory_pool_limit", "MemoryPoolType.WORKSPACE", 2 << 30)]
    assert rec.find("builder_optimization_level") == [("builder_optimization_level", 4)]
    assert not rec.find("set_flag")  # no precision flags on a strongly typed network
    shapes = {c[1]: c[2:] for c in rec.find("set_shape")}
    assert shapes["input_ids"] == ((1, 1), (2, 16), (4, 64))
    assert shapes["position_ids"] == ((3, 1, 1), (3, 2, 16), (3, 4, 64))
    assert shapes["image_embeds"] == ((0, HIDDEN), (0, HIDDEN), (4 * 64, HIDDEN))
    assert rec.find("create_timing_cache") == [("create_timing_cache", b"")]
    assert rec.find("set_timing_cache") == [("set_timing_cache", False)]
    assert (tmp_path / "language.plan").read_bytes() == b"PLAN:language.onnx"
    assert (tmp_path / "tc.bin").read_bytes() == b"CACHE+"
    assert result.plan.precision == "fp8" and result.bytes == len(b"PLAN:language.onnx")

    # a second build starts from the saved timing cache
    rec.calls.clear()
    build_engine(tmp_path / "language.onnx", settings, tmp_path / "language.plan", spec=language_spec())
    assert rec.find("create_timing_cache") == [("create_timing_cache", b"CACHE+")]


def test_weak_build_sets_precision_flags(tmp_path, with_fake_trt, rec):
    with_fake_trt()
    onnx.save(spec_graph(language_spec()), str(tmp_path / "language.onnx"))
    build_engine(tmp_path / "language.onnx", EngineSettings(precision="fp16"), tmp_path / "language.plan")
    assert rec.find("create_network") == [("create_network", 0)]
    assert rec.find("set_flag") == [("set_flag", "BuilderFlag.FP16")]
    assert not rec.find("set_memory_pool_limit") and not rec.find("create_timing_cache")
    # the spec read from the ONNX's named dims gives the same profile as the declared one
    shapes = {c[1]: c[2:] for c in rec.find("set_shape")}
    assert shapes == profile_shapes(language_spec(), axis_ranges(EngineSettings()))


def test_tensorrt_11_refuses_to_lower_an_fp32_graph(tmp_path, with_fake_trt, rec):
    with_fake_trt(version="11.1.0", weak=False)
    onnx.save(spec_graph(language_spec()), str(tmp_path / "language.onnx"))
    with pytest.raises(TensorRTError, match="strongly typed networks only"):
        build_engine(tmp_path / "language.onnx", EngineSettings(precision="fp16"), tmp_path / "language.plan")
    assert "Builder" not in rec.names()


def test_parser_errors_are_reported(tmp_path, with_fake_trt):
    with_fake_trt(parse_errors=("In node 3 (importFoo): UNSUPPORTED_NODE: Foo", "In node 9: INVALID_GRAPH"))
    onnx.save(spec_graph(language_spec()), str(tmp_path / "language.onnx"))
    with pytest.raises(TensorRTError) as err:
        build_engine(tmp_path / "language.onnx", EngineSettings(), tmp_path / "language.plan")
    assert "UNSUPPORTED_NODE: Foo" in str(err.value) and "INVALID_GRAPH" in str(err.value)
    assert not (tmp_path / "language.plan").exists()


def test_no_engine_is_an_error(tmp_path, with_fake_trt):
    with_fake_trt(build_fails_for=("language.onnx",))
    onnx.save(spec_graph(language_spec()), str(tmp_path / "language.onnx"))
    with pytest.raises(TensorRTError, match="built no engine"):
        build_engine(tmp_path / "language.onnx", EngineSettings(), tmp_path / "language.plan")
    assert not (tmp_path / "language.plan").exists()


def test_rejected_profile_is_an_error(tmp_path, with_fake_trt):
    with_fake_trt(profile_index=-1)
    onnx.save(spec_graph(language_spec()), str(tmp_path / "language.onnx"))
    with pytest.raises(TensorRTError, match="rejected the optimization profile"):
        build_engine(tmp_path / "language.onnx", EngineSettings(), tmp_path / "language.plan")


def test_network_inputs_must_match_the_spec(tmp_path, with_fake_trt):
    with_fake_trt()
    onnx.save(spec_graph(language_spec(with_images=False)), str(tmp_path / "language.onnx"))
    with pytest.raises(TensorRTError, match="differ from the graph spec"):
        build_engine(tmp_path / "language.onnx", EngineSettings(), tmp_path / "language.plan", spec=language_spec(with_images=True))


# ----------------------------------------------------------------------------------------------
# Whole artifacts


def test_build_engines_writes_a_new_artifact(tmp_path, with_fake_trt, rec):
    with_fake_trt()
    art = make_artifact(tmp_path / "art", qdq="fp8")
    source_manifest = (art / MANIFEST_NAME).read_bytes()
    out = build_engines(art, EngineSettings(precision="fp8", batch="1,2,4"), out=tmp_path / "art-trt")

    assert (out / "language.plan").read_bytes() == b"PLAN:language.onnx"
    assert (out / "vision.plan").read_bytes() == b"PLAN:vision.onnx"
    manifest = verify_manifest(out)  # every file, plans included, matches its checksum
    assert set(manifest["files"]) == set(read_manifest(art)["files"]) | {"language.plan", "vision.plan"}
    record = manifest["contents"]["tensorrt"]
    assert (record["version"], record["gpu"], record["compute_capability"], record["sm"]) == ("10.9.0", H100.gpu, [9, 0], "sm_90")
    assert record["precision"] == "fp8" and record["settings"]["batch"] == [1, 2, 4]
    language, vision = record["engines"]["language"], record["engines"]["vision"]
    assert (language["file"], language["precision"], language["strongly_typed"], language["flags"]) == ("language.plan", "fp8", True, [])
    # the vision graph has no Q/DQ: it keeps its own types
    assert (vision["file"], vision["precision"], vision["strongly_typed"]) == ("vision.plan", "fp32", True)
    assert language["profile"]["input_ids"] == {"min": [1, 1], "opt": [2, 512], "max": [4, 8192]}
    assert vision["profile"]["cu_seqlens"]["max"] == [5]
    assert manifest["versions"]["tensorrt"] == "10.9.0" and manifest["contents"]["graphs"] == read_manifest(art)["contents"]["graphs"]
    # the source artifact is untouched; unchanged files are shared, not copied
    assert (art / MANIFEST_NAME).read_bytes() == source_manifest and not list(art.glob("*.plan"))
    assert os.stat(out / "language.onnx").st_ino == os.stat(art / "language.onnx").st_ino


def test_build_engines_in_place_needs_force(tmp_path, with_fake_trt, rec):
    with_fake_trt()
    art = make_artifact(tmp_path / "art", qdq="fp8")
    with pytest.raises(OutputExistsError, match="--force"):
        build_engines(art, EngineSettings(precision="fp8"))
    assert "Builder" not in rec.names()
    build_engines(art, EngineSettings(precision="fp8"), force=True)
    assert verify_manifest(art)["contents"]["tensorrt"]["engines"]["language"]["file"] == "language.plan"
    # rebuilding replaces the plans (and records the new settings)
    build_engines(art, EngineSettings(precision="fp8", seq="1,64,128"), force=True)
    assert verify_manifest(art)["contents"]["tensorrt"]["settings"]["seq"] == [1, 64, 128]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp or old dirs left behind


def test_failed_build_leaves_the_artifact_as_it_was(tmp_path, with_fake_trt):
    with_fake_trt(build_fails_for=("vision.onnx",))
    art = make_artifact(tmp_path / "art", qdq="fp8")
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    with pytest.raises(TensorRTError, match="vision.onnx: TensorRT built no engine"):
        build_engines(art, EngineSettings(precision="fp8"), force=True)
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_fp8_on_an_unquantized_artifact_fails_before_building(tmp_path, with_fake_trt, rec):
    with_fake_trt()
    art = make_artifact(tmp_path / "art")
    with pytest.raises(TensorRTError, match="needs a graph quantized to fp8"):
        build_engines(art, EngineSettings(precision="fp8"), force=True)
    assert "Builder" not in rec.names()


def test_fp8_needs_an_fp8_capable_gpu(tmp_path, with_fake_trt, monkeypatch, rec):
    with_fake_trt()
    monkeypatch.setattr(engine_mod, "current_host", lambda trt, device=0: EngineHost("10.9.0", "NVIDIA A10G", (8, 6)))
    with pytest.raises(TensorRTError, match="NVIDIA A10G is 8.6"):
        build_engines(make_artifact(tmp_path / "art", qdq="fp8"), EngineSettings(precision="fp8"), force=True)
    assert "Builder" not in rec.names()


def test_build_engines_refuses_tampered_or_non_onnx_artifacts(tmp_path, with_fake_trt):
    with_fake_trt()
    art = make_artifact(tmp_path / "art")
    (art / "vision.onnx").write_bytes((art / "vision.onnx").read_bytes() + b"x")
    with pytest.raises(ManifestError, match="vision.onnx"):
        build_engines(art, EngineSettings(), force=True)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    write_manifest(merged, Manifest(kind="merged", source="x", settings={}))
    with pytest.raises(ManifestError, match="'merged' artifact"):
        build_engines(merged, EngineSettings(), force=True)


def test_build_or_hint_builds_when_it_can(tmp_path, with_fake_trt, rec):
    with_fake_trt()
    art = make_artifact(tmp_path / "art", qdq="fp8")
    assert build_or_hint(art, "fp8") is None
    record = verify_manifest(art)["contents"]["tensorrt"]
    assert record["precision"] == "fp8" and record["settings"]["batch"] == list(DEFAULT_BATCH) and record["settings"]["seq"] == list(DEFAULT_SEQ)


def test_build_or_hint_reports_a_failed_build(tmp_path, with_fake_trt, caplog):
    with_fake_trt(build_fails_for=("language.onnx",))
    art = make_artifact(tmp_path / "art", qdq="fp8")
    with caplog.at_level(logging.WARNING, logger="jev4.export.tensorrt"):
        message = build_or_hint(art, "fp8")
    assert "the build failed" in message and "built no engine" in message and "jev4 build-engine" in message
    assert not list(art.glob("*.plan"))


def test_build_or_hint_survives_an_unexpected_tensorrt_exception(tmp_path, with_fake_trt, monkeypatch):
    with_fake_trt()

    def explode(*args, **kwargs):
        raise RuntimeError("pybind11: incompatible function arguments")

    monkeypatch.setattr(engine_mod, "_build_planned", explode)
    art = make_artifact(tmp_path / "art", qdq="fp8")
    message = build_or_hint(art, "fp8")
    assert "RuntimeError: pybind11: incompatible function arguments" in message and "jev4 build-engine" in message
    verify_manifest(art)
    assert "tensorrt" not in read_manifest(art)["contents"]


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_builds(tmp_path, with_fake_trt, capsys):
    with_fake_trt()
    art = make_artifact(tmp_path / "art", qdq="int8", with_vision=False)
    code = cli_main(["build-engine", str(art), "--out", str(tmp_path / "out"), "--batch", "1,4,8", "--seq", "1,32,256", "--precision", "int8"])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "out")
    record = verify_manifest(tmp_path / "out")["contents"]["tensorrt"]
    assert record["engines"]["language"]["profile"]["input_ids"] == {"min": [1, 1], "opt": [4, 32], "max": [8, 256]}
    assert list(record["engines"]) == ["language"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--batch", "8,1,32", "--force"], "--batch"),
        (["--seq", "1,2", "--force"], "--seq"),
        (["--precision", "fp64", "--force"], "--precision"),
        ([], "--force"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, with_fake_trt, caplog, argv, words):
    with_fake_trt()
    art = make_artifact(tmp_path / "art")
    with caplog.at_level(logging.ERROR, logger="jev4"):
        assert cli_main(["build-engine", str(art), *argv]) == 2
    assert any(words in r.message for r in caplog.records if r.levelno == logging.ERROR)


def test_cli_without_tensorrt_exits_2_with_install_hint(tmp_path, no_tensorrt, caplog):
    art = make_artifact(tmp_path / "art")
    with caplog.at_level(logging.ERROR, logger="jev4"):
        assert cli_main(["build-engine", str(art), "--force"]) == 2
    assert any("pip install tensorrt-cu12" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Real TensorRT (GPU hosts with TensorRT only)


def _real_tensorrt_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (it cannot be on these machines; see docs/tensorrt.md)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_real_tensorrt_skip_reason() is not None, reason=str(_real_tensorrt_skip_reason()))
@pytest.mark.parametrize("weight_type, atol", [(TensorProto.FLOAT, 1e-5), (TensorProto.FLOAT16, 2e-3)])
def test_real_tensorrt_builds_and_runs_a_matmul(tmp_path, weight_type, atol):
    import tensorrt as trt
    import torch

    from jev4.export.graphs import GraphSpec, TensorSpec
    from jev4.runtime.tensorrt_backend import EngineRunner

    np_type = helper.tensor_dtype_to_np_dtype(weight_type)
    weight = (np.arange(12, dtype=np.float32).reshape(3, 4) / 10).astype(np_type)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [_value("x", weight_type, ("batch", 3))],
        [_value("y", weight_type, ("batch", 4))],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    dtype = "float16" if weight_type == TensorProto.FLOAT16 else "float32"
    spec = GraphSpec("mm", "mm.onnx", (TensorSpec("x", dtype, ("batch", 3)),), (TensorSpec("y", dtype, ("batch", 4)),))
    built = build_engine(tmp_path / "mm.onnx", EngineSettings(batch=(1, 4, 16)), tmp_path / "mm.plan", spec=spec)
    assert built.plan.strongly_typed
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((tmp_path / "mm.plan").read_bytes())
    runner = EngineRunner(trt, engine, spec, built.plan.profile, torch.device("cuda"), "mm.plan")
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np_type)
    got = runner.run({"x": x})["y"].float().cpu().numpy()
    np.testing.assert_allclose(got, x.astype(np.float32) @ weight.astype(np.float32), atol=atol, rtol=1e-2)
