"""``jev4.runtime.load(..., threads=N)``: each in-process engine really runs with N CPU threads, and nothing else changes.

What a Ray job needs of it: one process per CPU slot, each told its share.
The values are read back from the engines themselves (onnxruntime's session
options, llama.cpp's context, torch's pool), not from jev4's attributes only.
"""

import os
import re

import numpy as np
import pytest
import torch

import jev4.runtime as rt
from jev4.cli.main import main as jev4_main
from jev4.errors import SettingsError
from jev4.validate.runner import ValidateSettings

TEXTS = ["what is a thread pool?", "def add(a, b):\n    return a + b", "x"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A torch load with threads= sets the process-wide pool: give the rest of the suite its value back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _encode_all(encoder, images=None) -> list[np.ndarray]:
    """Single and multi-vectors of TEXTS (and images when given), as arrays to compare."""
    out = [encoder.encode_text(TEXTS, task="retrieval").numpy()]
    out += [v.numpy() for v in encoder.encode_text(TEXTS, task="retrieval", return_multivector=True)]
    if images is not None:
        out.append(encoder.encode_image(images, task="retrieval").numpy())
        out += [v.numpy() for v in encoder.encode_image(images, task="retrieval", return_multivector=True)]
    return out


def _assert_same(got: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-6)


# onnxruntime


def test_onnxruntime_sessions_carry_the_threads(onnx_artifacts):
    import onnxruntime

    encoder = rt.load(onnx_artifacts["retrieval"], threads=2)
    assert encoder.threads == 2
    assert set(encoder.sessions) == {"language", "vision"}  # both graphs, not only the language one
    for name, session in encoder.sessions.items():
        options = session.get_session_options()
        assert options.intra_op_num_threads == 2, name
        assert options.inter_op_num_threads == 1, name
        assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL, name


def test_onnxruntime_default_leaves_the_session_options_alone(onnx_artifacts):
    import onnxruntime

    encoder = rt.load(onnx_artifacts["retrieval"])
    assert encoder.threads is None
    defaults = onnxruntime.SessionOptions()
    for session in encoder.sessions.values():
        options = session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads, options.execution_mode) == (
            defaults.intra_op_num_threads,
            defaults.inter_op_num_threads,
            defaults.execution_mode,
        )


def test_onnxruntime_one_thread_gives_the_default_outputs(onnx_artifacts, images):
    art = onnx_artifacts["retrieval"]
    _assert_same(_encode_all(rt.load(art, threads=1), images), _encode_all(rt.load(art), images))


# torch


def test_torch_load_sets_the_process_pool_and_keeps_the_outputs(runtime_source, runtime_reference, images):
    torch.set_num_threads(2)
    reference = _encode_all(runtime_reference, images)  # the default pool of this machine (2 cores)
    encoder = rt.load(runtime_source, backend="torch", threads=1)
    assert torch.get_num_threads() == 1 and encoder.threads == 1
    _assert_same(_encode_all(encoder, images), reference)


def test_torch_default_leaves_the_process_pool_alone(runtime_source):
    torch.set_num_threads(2)
    encoder = rt.load(runtime_source, backend="torch")
    assert torch.get_num_threads() == 2 and encoder.threads is None


# llama.cpp


@pytest.fixture(scope="module")
def gguf_artifact(tmp_path_factory, runtime_source):
    pytest.importorskip("gguf", reason="the GGUF export needs the gguf package: pip install 'jev4[edge]'")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'jev4[edge]'")
    from jev4.export.gguf import GgufSettings, export_gguf

    out = tmp_path_factory.mktemp("gguf-threads") / "f32"
    return export_gguf(GgufSettings(model=str(runtime_source), adapter="retrieval", out=str(out), gguf_type="f32"), progress=False)


def _context_threads(encoder) -> tuple[int, int]:
    """(n_threads, n_threads_batch) of the llama.cpp context, as llama.cpp reports them."""
    import llama_cpp

    ctx = encoder.model._context(1)  # the context is created on first use, sized to the input
    return llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)


def test_llamacpp_context_gets_the_threads_and_keeps_the_outputs(gguf_artifact):
    with rt.load(gguf_artifact, threads=1) as one, rt.load(gguf_artifact) as default:
        assert one.threads == 1 and default.threads is None
        outputs = _encode_all(one), _encode_all(default)
        assert _context_threads(one) == (1, 1)
        cpus = len(os.sched_getaffinity(0))
        assert _context_threads(default) == (cpus, cpus)  # unchanged: the CPUs this process may use
        _assert_same(*outputs)


# refused values and backends


@pytest.mark.parametrize("value", [0, -3, 1.5, "2", True])
def test_bad_values_are_refused_before_anything_loads(value):
    with pytest.raises(SettingsError, match=f"positive integer.*got {re.escape(repr(value))}$"):
        rt.load("/nonexistent/artifact", threads=value)  # the value is checked before the path is even read


@pytest.mark.parametrize(
    "backend, why",
    [
        ("vllm", "runs in a vLLM server, whose threads are set where that server is started"),
        ("triton", "runs in a Triton server, whose threads are set where that server is started"),
        ("infinity", "runs in an infinity-emb server, whose threads are set where that server is started"),
        ("tensorrt", "runs on a GPU"),
    ],
)
def test_servers_and_tensorrt_refuse_threads_before_starting(onnx_artifacts, backend, why):
    for url in (None, "http://127.0.0.1:9"):  # neither started nor contacted: port 9 would refuse a connection
        with pytest.raises(SettingsError, match=f"threads=2: backend '{backend}' {why}"):
            rt.load(onnx_artifacts["retrieval"], backend=backend, threads=2, **({} if backend == "tensorrt" else {"url": url}))
    with pytest.raises(SettingsError, match=f"backend '{backend}'"):
        ValidateSettings(reference="ref", adapter="retrieval", artifact="art", out="out", backend=backend, threads=2)


# CLI


def test_jev4_encode_threads(onnx_artifacts, tmp_path):
    art = onnx_artifacts["retrieval"]
    common = ["encode", "--model", str(art), "--task", "retrieval", "--text", "hello", "--text", "def f(): pass", "--no-progress"]
    assert jev4_main([*common, "--threads", "1", "--out", str(tmp_path / "one.npz")]) == 0
    assert jev4_main([*common, "--out", str(tmp_path / "default.npz")]) == 0
    one, default = np.load(tmp_path / "one.npz"), np.load(tmp_path / "default.npz")
    assert sorted(one.files) == ["text_0", "text_1"]
    _assert_same([one[k] for k in one.files], [default[k] for k in one.files])


def test_jev4_encode_and_validate_refuse_bad_threads(onnx_artifacts, runtime_source, tmp_path, caplog):
    out = tmp_path / "zero.npz"
    assert jev4_main(["encode", "--model", str(onnx_artifacts["retrieval"]), "--text", "hello", "--threads", "0", "--out", str(out)]) == 2
    assert "got 0" in caplog.text and not out.exists()
    report = tmp_path / "report"
    argv = ["validate", "--reference", str(runtime_source), "--adapter", "retrieval", "--artifact", str(runtime_source), "--backend", "vllm", "--threads", "2", "--out", str(report)]
    assert jev4_main(argv) == 2
    assert "backend 'vllm'" in caplog.text and not report.exists()
