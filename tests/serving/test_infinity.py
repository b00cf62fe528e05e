"""jev4 over a real infinity-emb server (0.0.78, torch engine, CPU, .venv-infinity): started on a free loopback port, queried, always stopped.

One server for the module; the test that kills it runs last. Skipped, with
the reason, where the infinity environment has not been built.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import jev4.runtime as rt
from jev4.errors import EncodeError, ManifestError
from jev4.export.merge import MergeSettings, merge_checkpoint
from jev4.model.tiny import TINY_HEAD_DIM_32, write_tiny_checkpoint
from jev4.runtime.infinity_backend import DEFAULT_INFINITY_PYTHON, InfinityServer, InfinityServerSettings
from jev4.runtime.server_process import ServingError, free_port

INFINITY_PYTHON = Path(__file__).resolve().parents[2] / DEFAULT_INFINITY_PYTHON
pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(not (INFINITY_PYTHON.parents[1] / ".installed").is_file(), reason=f"no complete infinity-emb environment at {INFINITY_PYTHON.parents[1]} (make infinity-env builds it; make test tries to)"),
]
TEXTS = ["what is a llama?", "def add(a, b):\n    return a + b", "Ein kurzer Satz.", "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("infinity") / "tiny32", seed=7, spec=TINY_HEAD_DIM_32)


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("infinity-export") / "text-only"
    return merge_checkpoint(MergeSettings(model=str(checkpoint), adapter="retrieval", out=str(out), dtype="fp32", text_only=True), progress=False)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """jev4's fp32 reference: the unmerged checkpoint, adapter applied as LoRA."""
    return rt.load(checkpoint)


@pytest.fixture(scope="module")
def served(export):
    encoder = rt.load(export, backend="infinity", infinity_python=str(INFINITY_PYTHON))
    yield encoder
    encoder.close()
    assert encoder.server.process.poll() is not None  # always stopped


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("prompt", ["query", "passage"])
@pytest.mark.parametrize("dim", [None, 64])
def test_parity_with_the_reference(served, reference, prompt, dim):
    """The served export answers what jev4's fp32 reference computes; jev4 applies the prompts, infinity only embeds."""
    got = served.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim)
    want = reference.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim)
    assert got.shape == want.shape == (len(TEXTS), dim or 128)
    assert _cos(got, want).min() >= 0.99999
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # re-normalised after truncation


def test_the_prompt_is_sent_by_jev4(served, reference):
    """Without jev4's prompt the served vector is another vector: the server adds none of its own."""
    query = served.encode_text(TEXTS, task="retrieval", prompt_name="query")
    passage = served.encode_text(TEXTS, task="retrieval", prompt_name="passage")
    assert _cos(query, passage).max() < 0.999


def test_trailing_whitespace_is_stripped_by_infinity(served, reference, caplog):
    """infinity strips its inputs: 'x \\n' is embedded as 'x' (a warning says so), unlike the reference."""
    with caplog.at_level(logging.WARNING, logger="jev4.runtime.infinity_backend"):
        got = served.encode_text(["a text that ends in a newline\n"], task="retrieval")
    assert "strips leading/trailing whitespace" in caplog.text
    stripped = reference.encode_text(["a text that ends in a newline"], task="retrieval")
    as_given = reference.encode_text(["a text that ends in a newline\n"], task="retrieval")
    assert _cos(got, stripped).min() >= 0.99999
    assert _cos(got, as_given).max() < 0.9999


def test_a_running_server_by_url(served, export):
    client = rt.load(export, backend="infinity", url=served.url)
    assert client.server is None
    assert client.engine() == f"infinity-emb 0.0.78 at {served.url}"
    assert _cos(client.encode_text(TEXTS, task="retrieval"), served.encode_text(TEXTS, task="retrieval")).min() > 0.999999


def test_what_infinity_does_not_serve_is_refused(served, checkpoint):
    with pytest.raises(EncodeError, match="pooled vectors only"):
        served.encode_text(TEXTS, task="retrieval", return_multivector=True)
    with pytest.raises(EncodeError, match="no vision tower"):
        served.encode_image(["page.png"], task="retrieval")
    with pytest.raises(ManifestError, match="infinity-emb serves the --text-only export"):
        rt.load(checkpoint, backend="infinity", url="http://127.0.0.1:9")


def test_nothing_listening(export):
    url = f"http://127.0.0.1:{free_port()}"
    client = rt.load(export, backend="infinity", url=url)
    started = time.monotonic()
    with pytest.raises(ServingError, match=rf"{url}/embeddings: no answer from the infinity-emb server"):
        client.encode_text(["x"], task="retrieval")
    assert time.monotonic() - started < 10


def test_a_server_that_is_not_ready_in_time_is_stopped(export):
    server = InfinityServer(InfinityServerSettings(artifact=str(export), python=str(INFINITY_PYTHON), startup_timeout=0.5))
    with pytest.raises(ServingError, match=r"did not become ready at http://127.0.0.1:\d+/health within"):
        server.__enter__()
    assert server.process.poll() is not None


def test_a_server_that_cannot_load_the_folder_is_stopped(tmp_path):
    """A folder that is not a sentence-transformers export: infinity exits, the error names it and quotes its log."""
    (tmp_path / "config.json").write_text("{}")
    server = InfinityServer(InfinityServerSettings(artifact=str(tmp_path), python=str(INFINITY_PYTHON), startup_timeout=120))
    with pytest.raises(ServingError, match="infinity-emb exited with code"):
        server.__enter__()
    assert server.process.poll() is not None


def _wait_until_in_flight(url: str, timeout: float) -> bool:
    """True once infinity's /models stats show work queued or pending: the request is inside the server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
            stats = json.loads(response.read())["data"][0]["stats"]
        if stats["queue_absolute"] > 0 or stats["results_pending"] > 0:
            return True
        time.sleep(0.05)
    return False


def test_validate_by_url(served, checkpoint, export, tmp_path):
    """jev4 validate --backend infinity --url judges the running server; the report names infinity-emb and its version."""
    from jev4.cli.main import main

    out = tmp_path / "report"
    code = main(["validate", "--reference", str(checkpoint), "--adapter", "retrieval", "--artifact", str(export), "--backend", "infinity", "--url", served.url,
                 "--max-queries", "20", "--max-docs", "60", "--out", str(out), "--no-progress"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["passed"], report["failures"]
    assert report["environment"]["engine"] == f"infinity-emb 0.0.78 at {served.url}"
    assert [gap.split(":")[0] for gap in report["settings"]["not_measured"]] == ["images", "multi-vectors"]
    assert report["parity"]["multi_token_cosine_min"] is None
    assert min(report["parity"]["single_cosine_min"].values()) >= 0.9999  # fp32 threshold; infinity strips trailing whitespace, so not 1 - 1e-13


def test_server_killed_mid_request(served):
    """Runs last: the server dies while a request is in flight; the client gets an error naming the URL, not a hang."""
    result: dict = {}

    def encode():
        started = time.monotonic()
        try:
            served.encode_text(["word " * 1500] * 256, task="retrieval", batch_size=256)
        except ServingError as exc:
            result["error"] = str(exc)
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=encode)
    worker.start()
    assert _wait_until_in_flight(served.url, timeout=30)
    served.server.process.kill()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert f"{served.url}/embeddings" in result.get("error", "") and "no answer" in result["error"]
    assert result["seconds"] < 30
