"""jev4 over a real vLLM server (CPU build, .venv-vllm): started on a free loopback port, queried, always stopped.

The toy model has head_dim 32 (vLLM's CPU attention rejects 16). Skipped,
with the reason, where the vLLM environment has not been built.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

import jev4.runtime as rt
from jev4.cli.main import main
from jev4.errors import EncodeError
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.model.tiny import TINY_HEAD_DIM_32, write_tiny_checkpoint
from jev4.runtime.vllm_backend import DEFAULT_VLLM_PYTHON, ServingError, VllmEncoder

VLLM_PYTHON = Path(__file__).resolve().parents[2] / DEFAULT_VLLM_PYTHON
pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(not (VLLM_PYTHON.parents[1] / ".installed").is_file(), reason=f"no complete vLLM environment at {VLLM_PYTHON.parents[1]} (make vllm-env builds it; make test tries to)"),
]
TEXTS = ["what is a llama?", "def add(a, b):\n    return a + b", "Ein kurzer Satz.", "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vllm") / "tiny32", seed=7, spec=TINY_HEAD_DIM_32)


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-export") / "text-only"
    return merge_checkpoint(MergeSettings(model=str(checkpoint), adapter="retrieval", out=str(out), dtype="fp32", text_only=True), progress=False)


@pytest.fixture(scope="module")
def served(export):
    encoder = rt.load(export, backend="vllm", vllm_python=str(VLLM_PYTHON))
    yield encoder
    encoder.close()
    assert encoder.server.process.poll() is not None  # always stopped


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("prompt", ["query", "passage"])
@pytest.mark.parametrize("dim", [None, 64, 16])
def test_parity_with_the_reference(served, checkpoint, prompt, dim):
    """The served export answers what jev4's fp32 reference (unmerged adapter) computes; jev4 applies the prompts."""
    reference = rt.load(checkpoint)
    got = served.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim)
    want = reference.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim)
    assert got.shape == want.shape
    assert _cos(got, want).min() >= 0.99999


def test_a_running_server_by_url(served, export):
    client = rt.load(export, backend="vllm", url=served.url)
    assert client.server is None
    assert _cos(client.encode_text(TEXTS, task="retrieval"), served.encode_text(TEXTS, task="retrieval")).min() > 0.999999


def test_what_vllm_does_not_serve_is_refused(served):
    assert served.pooling == "embed" and not served.supports_multivector and not served.supports_images
    with pytest.raises(EncodeError, match="multi-vectors need a vLLM server started with --pooler-config .*token_embed.*this server runs the embed pooler"):
        served.encode_text(TEXTS, task="retrieval", return_multivector=True)
    with pytest.raises(EncodeError, match="no vision tower"):
        served.encode_image(["page.png"], task="retrieval")


def test_validate_a_running_embed_server_by_url(served, checkpoint, export, tmp_path):
    """jev4 validate judges what /v1/embeddings serves; the report names the engine and what it could not measure."""
    code = main(["validate", "--reference", str(checkpoint), "--adapter", "retrieval", "--artifact", str(export), "--backend", "vllm", "--url", served.url,
                 "--max-queries", "20", "--max-docs", "60", "--out", str(tmp_path / "report"), "--no-progress"])  # fmt: skip
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert code == 0 and report["passed"]
    assert report["environment"]["engine"] == f"vLLM 0.32.0 (embed pooling, {served.url})"
    assert report["parity"]["single_cosine_min"]["128"] >= 0.99999
    assert report["parity"]["multi_token_cosine_min"] is None
    assert any(gap.startswith("multi-vectors:") for gap in report["settings"]["not_measured"])
    assert not any("multi-vector per-token" in check["name"] for check in report["checks"])


def test_validate_starts_a_token_embed_server(checkpoint, export, tmp_path):
    """The acceptance command: jev4 validate --backend vllm starts vLLM (token_embed), judges single AND multi-vectors, stops it."""
    code = main(["validate", "--reference", str(checkpoint), "--adapter", "retrieval", "--artifact", str(export), "--backend", "vllm",
                 "--max-queries", "20", "--max-docs", "60", "--out", str(tmp_path / "report"), "--no-progress"])  # fmt: skip
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert code == 0 and report["passed"]
    assert report["environment"]["engine"].startswith("vLLM 0.32.0 (token_embed pooling, http://127.0.0.1:")
    assert report["parity"]["multi_token_cosine_min"] >= 0.99999
    assert min(report["parity"]["single_cosine_min"].values()) >= 0.99999
    assert report["settings"]["not_measured"] == ["images: " + report["environment"]["engine"] + " serves text only (no vision tower)"]
    assert {r["scoring"] for r in report["retrieval"]} >= {"single", "multi"}
    assert not _token_embed_servers_of(export)  # the server validate started is stopped after the run


def _token_embed_servers_of(export: Path) -> list[str]:
    """Pids of running vLLM token_embed servers on ``export`` (the module's embed server has no --pooler-config)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in args and str(export).encode() in args and b"--pooler-config" in args:
            found.append(cmdline.parent.name)
    return found


def test_nothing_listening(export):
    client = rt.load(export, backend="vllm", url="http://127.0.0.1:9/v1")
    with pytest.raises(ServingError, match=r"http://127.0.0.1:9/pooling: no answer from the vLLM server"):
        client.encode_text(["x"], task="retrieval")


def test_server_killed_mid_request(served):
    """Runs last: the server dies while a request is in flight; the client gets an error naming the URL, not a hang."""
    result: dict = {}

    def encode():
        started = time.monotonic()
        try:
            served.encode_text(["word " * 400] * 64, task="retrieval", batch_size=64)
        except ServingError as exc:
            result["error"] = str(exc)
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=encode)
    worker.start()
    time.sleep(0.3)
    served.server.process.kill()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert served.url in result.get("error", "") and "no answer" in result["error"]
