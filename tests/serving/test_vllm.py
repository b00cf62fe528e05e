"""jev4 over a real vLLM server (CPU build, .venv-vllm): started on a free loopback port, queried, always stopped.

The toy model has head_dim 32 (vLLM's CPU attention rejects 16). Skipped,
with the reason, where the vLLM environment has not been built.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import jev4.runtime as rt
from jev4.errors import EncodeError
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.model.tiny import TINY_HEAD_DIM_32, write_tiny_checkpoint
from jev4.runtime.vllm_backend import DEFAULT_VLLM_PYTHON, ServingError, VllmEncoder

VLLM_PYTHON = Path(__file__).resolve().parents[2] / DEFAULT_VLLM_PYTHON
pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"no vLLM environment at {VLLM_PYTHON}: make vllm-env builds it"),
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
    with pytest.raises(EncodeError, match="token_embed pooler"):
        served.encode_text(TEXTS, task="retrieval", return_multivector=True)
    with pytest.raises(EncodeError, match="no vision tower"):
        served.encode_image(["page.png"], task="retrieval")


def test_nothing_listening(export):
    client = rt.load(export, backend="vllm", url="http://127.0.0.1:9/v1")
    with pytest.raises(ServingError, match=r"http://127.0.0.1:9/v1/embeddings: no answer from the vLLM server"):
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
