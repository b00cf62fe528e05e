"""``jev4 triton-repo``: configs valid under Triton's own schema and consistent across models; the python models run in a real Triton.

The schema tests need only ``tritonclient`` (Triton's model_config protobuf)
in jev4's environment. The last test starts the Triton 2.51 binary PyTriton
bundles (python backend only, so the repository is written with
``--language-backend python``) and is skipped without ``.venv-triton``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import jev4.runtime as rt
from jev4.errors import ManifestError, SettingsError
from jev4.export.manifest import Manifest, read_manifest, verify_manifest, write_manifest
from jev4.export.onnx import OnnxExportSettings, export_onnx
from jev4.model.tiny import write_tiny_checkpoint

pytest.importorskip("tritonclient.grpc", reason="Triton's schema comes with the Triton client: pip install 'jev4[serving]'")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from jev4.export.triton_repo import TritonRepoSettings, check_repository, write_triton_repo  # noqa: E402
from jev4.runtime.server_process import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
TEXTS = ["what is a llama?", "def add(a, b):\n    return a + b", "x"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tiny = write_tiny_checkpoint(tmp_path_factory.mktemp("triton-repo") / "tiny", seed=13)
    return export_onnx(OnnxExportSettings(model=str(tiny), adapter="retrieval", out=str(tmp_path_factory.mktemp("triton-repo-onnx") / "onnx")), progress=False)


@pytest.fixture(scope="module")
def repo(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "repo"
    return write_triton_repo(TritonRepoSettings(str(artifact), str(out), max_batch_size=4, instances=2, kind="gpu"))


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_every_config_parses_with_tritons_schema(repo):
    configs = {path.parent.name: _parse(path) for path in repo.glob("*/config.pbtxt")}
    assert sorted(configs) == ["jev4", "language", "pool", "preprocess"]
    assert configs["language"].platform == "onnxruntime_onnx" and configs["language"].default_model_filename == "model.onnx"
    assert configs["jev4"].platform == "ensemble"
    assert [step.model_name for step in configs["jev4"].ensemble_scheduling.step] == ["preprocess", "language", "pool"]
    for name in ("preprocess", "language", "pool"):
        assert configs[name].max_batch_size == 4
        assert configs[name].HasField("dynamic_batching")
        assert configs[name].instance_group[0].count == 2
    assert configs["language"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert configs["preprocess"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [(t.name, list(t.dims)) for t in configs["language"].input][2] == ("position_ids", [3, -1])
    assert json.loads(configs["preprocess"].parameters["prefixes"].string_value) == {"query": "Query: ", "passage": "Passage: "}
    assert configs["pool"].parameters["matryoshka_dims"].string_value == "8,16,32"


def test_files_and_manifest(repo, artifact):
    assert verify_manifest(repo)["kind"] == "triton-repo"
    assert (repo / "preprocess/1/tokenizer.json").read_bytes() == (artifact / "tokenizer.json").read_bytes()
    assert (repo / "preprocess/1/model.py").is_file() and (repo / "pool/1/model.py").is_file()
    assert (repo / "language/1/language.onnx.data").stat().st_size == (artifact / "language.onnx.data").stat().st_size


def test_cross_model_check_names_the_mismatch(repo, tmp_path):
    broken = shutil.copytree(repo, tmp_path / "broken")
    pool = broken / "pool/config.pbtxt"
    config = _parse(pool)
    config.input[0].data_type = model_config_pb2.TYPE_FP16
    pool.write_text(text_format.MessageToString(config))
    with pytest.raises(ManifestError, match=r"'graph_single' from language.single_vector is TYPE_FP32 rank 2, pool.single_vector expects TYPE_FP16 rank 2"):
        check_repository(broken)
    (broken / "pool/config.pbtxt").write_text((repo / "pool/config.pbtxt").read_text())
    ensemble = broken / "jev4/config.pbtxt"
    ensemble.write_text(ensemble.read_text().replace('key: "TRUNCATE_DIM"', 'key: "TRUNC"'))
    with pytest.raises(ManifestError, match=r"jev4 -> pool: no input 'TRUNC'"):
        check_repository(broken)


def test_batch_first_graph_matches_the_artifact(repo, artifact):
    """The wrapped language graph (position ids [B, 3, T], no image input) answers what the artifact's graph answers."""
    import onnxruntime as ort

    reference = rt.load(artifact)
    inputs = reference.preprocessor.text_inputs(["Query: " + t for t in TEXTS])
    feed = {
        "input_ids": inputs.input_ids.numpy(), "attention_mask": inputs.attention_mask.numpy(),
        "position_ids": inputs.position_ids.permute(1, 0, 2).contiguous().numpy(), "pooling_mask": inputs.pooling_mask.numpy(),
    }  # fmt: skip
    single, multi = ort.InferenceSession(str(repo / "language/1/model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    want_single, want_multi = reference._forward(inputs, ["retrieval"] * len(TEXTS))
    assert np.abs(single - want_single.numpy()).max() < 1e-6
    assert np.abs(multi - want_multi.numpy()).max() < 1e-6


def test_engines_get_a_tensorrt_plan_model(artifact, tmp_path):
    with_plan = shutil.copytree(artifact, tmp_path / "with-plan")
    (with_plan / "language.plan").write_bytes(b"not a real engine: the config is what is checked")
    manifest = read_manifest(with_plan)
    write_manifest(with_plan, Manifest(kind="onnx", source=manifest["source"], settings=manifest["settings"], contents=manifest["contents"]))
    out = write_triton_repo(TritonRepoSettings(str(with_plan), str(tmp_path / "repo")))
    config = _parse(out / "language_trt/config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0
    assert [list(t.dims) for t in config.input if t.name == "position_ids"] == [[3, -1, -1]]
    assert (out / "language_trt/1/language.plan").read_bytes().startswith(b"not a real engine")


def test_bad_settings_and_artifacts(artifact, tmp_path):
    with pytest.raises(SettingsError, match="--instances must be an integer >= 1, got 0"):
        TritonRepoSettings(str(artifact), str(tmp_path / "x"), instances=0)
    with pytest.raises(SettingsError, match="--kind 'tpu'"):
        TritonRepoSettings(str(artifact), str(tmp_path / "x"), kind="tpu")
    tiny = write_tiny_checkpoint(tmp_path / "tiny", seed=1)
    with pytest.raises(ManifestError, match="not found; is .* a jev4 artifact"):
        write_triton_repo(TritonRepoSettings(str(tiny), str(tmp_path / "y")))
    assert not (tmp_path / "y").exists()


def _bundled_triton(tmp: Path) -> tuple[Path, dict[str, str]]:
    """PyTriton's Triton binary with the python backend stub for this Python, as PyTriton itself lays it out."""
    site = subprocess.run([str(TRITON_PYTHON), "-c", "import pytriton, sysconfig; print(pytriton.__path__[0]); print(sysconfig.get_config_var('LIBDIR'))"],
                          capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    dist, libdir = Path(site[0]) / "tritonserver", site[1]
    backends = tmp / "backends" / "python"
    backends.mkdir(parents=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            os.symlink(item, backends / item.name)
    shutil.copy(dist / "python_backend_stubs" / "3.11" / "triton_python_backend_stub", backends / "triton_python_backend_stub")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{dist.parent.parent / 'nvidia_pytriton.libs'}", "PATH": f"{TRITON_PYTHON.parent}:{os.environ['PATH']}"}
    return dist / "bin" / "tritonserver", env


@pytest.mark.serving
@pytest.mark.skipif(not TRITON_PYTHON.is_file(), reason=f"no Triton environment at {TRITON_PYTHON}: make triton-env builds it")
def test_repository_runs_in_a_real_triton(artifact, tmp_path):
    """preprocess -> language (onnxruntime in the python backend) -> pool, as the ensemble jev4, in Triton 2.51; parity with jev4."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    out = write_triton_repo(TritonRepoSettings(str(artifact), str(tmp_path / "repo"), language_backend="python"))
    binary, env = _bundled_triton(tmp_path / "server")
    http, grpc = free_port(), free_port()
    command = [str(binary), "--model-repository", str(out), "--backend-directory", str(tmp_path / "server" / "backends"), "--allow-metrics", "false",
               "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc), "--exit-timeout-secs", "5"]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/jev4/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the repository did not become ready within 120 s"
            time.sleep(0.5)
        reference = rt.load(artifact)
        for module, port in ((httpclient, http), (grpcclient, grpc)):
            client = module.InferenceServerClient(f"127.0.0.1:{port}")
            for prompt, dim in (("query", 0), ("passage", 16)):
                tensors = []
                for name, array, dtype in (
                    ("TEXT", np.array([[t.encode()] for t in TEXTS], dtype=object), "BYTES"),
                    ("PROMPT_NAME", np.array([[prompt.encode()]] * len(TEXTS), dtype=object), "BYTES"),
                    ("TRUNCATE_DIM", np.full((len(TEXTS), 1), dim, dtype=np.int32), "INT32"),
                ):
                    tensor = module.InferInput(name, list(array.shape), dtype)
                    tensor.set_data_from_numpy(array)
                    tensors.append(tensor)
                answer = client.infer("jev4", tensors)
                single = torch.from_numpy(answer.as_numpy("SINGLE").copy())
                want = reference.encode_text(TEXTS, task="retrieval", prompt_name=prompt, truncate_dim=dim or None)
                assert single.shape == want.shape
                assert torch.nn.functional.cosine_similarity(single, want).min() >= 0.99999
                multi, lengths = answer.as_numpy("MULTI"), answer.as_numpy("LENGTHS").reshape(-1)
                want_multi = reference.encode_text(TEXTS, task="retrieval", prompt_name=prompt, return_multivector=True)
                assert lengths.tolist() == [w.shape[0] for w in want_multi]
                for row, vectors in enumerate(want_multi):
                    got = torch.from_numpy(multi[row, : lengths[row]].copy())
                    assert torch.nn.functional.cosine_similarity(got, vectors).min() >= 0.99999
            bad = module.InferInput("TRUNCATE_DIM", [1, 1], "INT32")
            bad.set_data_from_numpy(np.array([[12]], dtype=np.int32))
            text = module.InferInput("TEXT", [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[b"x"]], dtype=object))
            prompt_in = module.InferInput("PROMPT_NAME", [1, 1], "BYTES")
            prompt_in.set_data_from_numpy(np.array([[b"query"]], dtype=object))
            with pytest.raises(Exception, match="TRUNCATE_DIM=12 is not allowed"):
                client.infer("jev4", [text, prompt_in, bad])
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
    assert server.returncode is not None
