"""jev4 over a real Triton Inference Server (PyTriton's bundled Triton 2.51, .venv-triton): started on free loopback ports, queried, always stopped.

The server runs jev4's runtime on an ONNX export of the tiny checkpoint
(onnxruntime, CPU); answers are compared with the in-process jev4 reference
(torch, unmerged adapter). Skipped, with the reason, where the Triton
environment has not been built.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import jev4.runtime as rt
from jev4.errors import EncodeError, TaskError
from jev4.export.onnx import OnnxExportSettings, export_onnx
from jev4.model.tiny import write_tiny_checkpoint
from jev4.runtime.server_process import ServingError, free_port
from jev4.runtime.triton_backend import DEFAULT_TRITON_PYTHON, TritonEncoder, TritonServer, TritonServerSettings

TRITON_PYTHON = Path(__file__).resolve().parents[2] / DEFAULT_TRITON_PYTHON
pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(not (TRITON_PYTHON.parents[1] / ".installed").is_file(), reason=f"no complete Triton environment at {TRITON_PYTHON.parents[1]} (make triton-env builds it; make test tries to)"),
]
tritonclient = pytest.importorskip("tritonclient.http", reason="the Triton client is not installed: pip install 'jev4[serving]'")
TEXTS = ["what is a llama?", "def add(a, b):\n    return a + b", "Ein kurzer Satz.", "x"]
STARTUP_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("triton") / "tiny", seed=11)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-onnx") / "onnx"
    return export_onnx(OnnxExportSettings(model=str(checkpoint), adapter="retrieval", out=str(out)), progress=False)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return rt.load(checkpoint)


def _settings(artifact: Path) -> TritonServerSettings:
    return TritonServerSettings(artifact=str(artifact), python=str(TRITON_PYTHON), startup_timeout=STARTUP_TIMEOUT)


def _tritonserver_pids(server: TritonServer) -> list[int]:
    """The tritonserver binary PyTriton started (a child of the served module): it must be gone after stop."""
    import psutil

    return [p.pid for p in psutil.Process(server.process.process.pid).children(recursive=True) if p.name() == "tritonserver"]


@pytest.fixture(scope="module")
def served(artifact):
    """One server for the module, started by load() (HTTP encoder); stopped at the end, tritonserver included."""
    encoder = rt.load(artifact, backend="triton", triton_python=str(TRITON_PYTHON))
    children = _tritonserver_pids(encoder.server)
    assert children, "PyTriton did not start a tritonserver process"
    yield encoder
    encoder.close()
    assert encoder.server.process.process.returncode == 0  # SIGTERM: a clean exit
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children)
    assert not Path(encoder.server.workspace).exists()


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request, served, artifact):
    return served if request.param == "http" else rt.load(artifact, backend="triton", url=served.server.url("grpc"), triton_protocol="grpc")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("prompt", ["query", "passage"])
@pytest.mark.parametrize("dim", [None, 64, 16])
def test_single_vector_parity(client, reference, prompt, dim):
    got = client.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim)
    want = reference.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim)
    assert got.shape == want.shape == (len(TEXTS), dim or 64)
    assert _cos(got, want).min() >= 0.99999


@pytest.mark.parametrize("prompt", ["query", "passage"])
def test_multivector_parity_per_token(client, reference, prompt):
    got = client.encode_text(TEXTS, task="retrieval", prompt_name=prompt, return_multivector=True)
    want = reference.encode_text(TEXTS, task="retrieval", prompt_name=prompt, return_multivector=True)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert min(_cos(g, w).min().item() for g, w in zip(got, want)) >= 0.99999


def test_image_parity(client, reference, tmp_path):
    path = tmp_path / "page.png"
    Image.new("RGB", (96, 64), (30, 120, 200)).save(path)
    pil = Image.new("RGB", (40, 56), (250, 240, 10))
    got = client.encode_image([path, pil], task="retrieval")
    want = reference.encode_image([path, pil], task="retrieval")
    assert _cos(got, want).min() >= 0.99999


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_what_a_plain_tritonclient_sends(served, reference, protocol):
    """No jev4 on the client side: BYTES texts in, request parameters, SINGLE / MULTI + LENGTHS out."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if protocol == "http" else grpcclient
    address = served.server.url(protocol).split("://")[1]
    client = module.InferenceServerClient(address)
    text = module.InferInput("TEXT", [len(TEXTS), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=object))
    single = client.infer("jev4", [text], parameters={"task": "retrieval", "prompt_name": "passage", "truncate_dim": 32}).as_numpy("SINGLE")
    want = reference.encode_text(TEXTS, task="retrieval", prompt_name="passage", truncate_dim=32)
    assert single.dtype == np.float32 and _cos(torch.from_numpy(single.copy()), want).min() >= 0.99999
    answer = client.infer("jev4", [text], parameters={"task": "retrieval", "multivector": True})
    multi, lengths = answer.as_numpy("MULTI"), answer.as_numpy("LENGTHS").reshape(-1)
    want_multi = reference.encode_text(TEXTS, task="retrieval", return_multivector=True)
    assert lengths.tolist() == [w.shape[0] for w in want_multi]
    assert multi.shape == (len(TEXTS), max(lengths), 32)
    assert float(np.abs(multi[-1, lengths[-1] :]).max(initial=0.0)) == 0.0  # padding is zeros
    with pytest.raises(Exception, match="unknown task"):
        client.infer("jev4", [text], parameters={"task": "nope"})


def test_validate_by_url(served, checkpoint, artifact, tmp_path):
    """jev4 validate --backend triton --url judges the running server (images and multi-vectors included); the report names Triton and its version."""
    from jev4.cli.main import main

    out = tmp_path / "report"
    code = main(["validate", "--reference", str(checkpoint), "--adapter", "retrieval", "--artifact", str(artifact), "--backend", "triton", "--url", served.url,
                 "--max-queries", "20", "--max-docs", "60", "--out", str(out), "--no-progress"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["passed"], report["failures"]
    assert report["environment"]["engine"] == f"Triton Inference Server 2.51.0 (model 'jev4', http, {served.url})"
    assert report["settings"]["not_measured"] == []
    assert report["parity"]["multi_token_cosine_min"] >= 0.99999 and min(report["parity"]["single_cosine_min"].values()) >= 0.99999
    assert any(row["kind"] == "image" for row in report["parity"]["per_input"])


def test_refused_before_any_request(served):
    with pytest.raises(TaskError, match="unknown task"):
        served.encode_text(TEXTS, task="code")  # an ONNX artifact serves one task
    with pytest.raises(EncodeError, match="truncate_dim=12 is not allowed"):
        served.encode_text(TEXTS, task="retrieval", truncate_dim=12)
    with pytest.raises(EncodeError, match="unknown prompt_name"):
        served.encode_text(TEXTS, task="retrieval", prompt_name="document")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_nothing_listening(artifact, protocol):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ServingError, match=rf"{protocol}://127.0.0.1:{port} \(model 'jev4'\): no usable answer"):
        TritonEncoder(f"127.0.0.1:{port}", protocol, timeout=10)
    assert time.monotonic() - started < 15


def test_wrong_model(served):
    with pytest.raises(ServingError, match=rf"{served.server.url('http')} \(model 'bert'\)"):
        TritonEncoder(served.server.url("http"), "http", model="bert", timeout=10)


def test_server_killed_mid_request(artifact):
    """The server dies while a request is in flight; the client gets a ServingError naming the URL within its timeout, not a hang."""
    with TritonServer(_settings(artifact)) as server:
        encoder = TritonEncoder(server.url("grpc"), "grpc", timeout=30)
        result: dict = {}

        def encode() -> None:
            started = time.monotonic()
            try:
                encoder.encode_text(["word " * 300] * 64, task="retrieval", batch_size=32)
            except ServingError as exc:
                result["error"] = str(exc)
            result["seconds"] = time.monotonic() - started

        worker = threading.Thread(target=encode)
        worker.start()
        time.sleep(0.5)
        os.killpg(server.process.process.pid, 9)
        worker.join(timeout=60)
        assert not worker.is_alive()
        assert server.url("grpc") in result.get("error", "") and "no usable answer" in result["error"]
        assert result["seconds"] < 35
    assert server.process.process.poll() is not None
    assert not Path(server.workspace).exists()  # PyTriton's workspace goes too, though the server was killed
