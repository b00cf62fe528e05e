"""Bad arguments, bad texts, odd images and damaged artifacts: one error line, exit 2, nothing written.

Arguments are checked before any model loads: those tests assert that the
log never got as far as loading weights.
"""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import jev4.runtime as rt
from jev4.errors import AdapterError, CheckpointError, EncodeError, Jev4Error, ManifestError
from harness import BIN, TRACEBACK, Result, command, env, run, temp_entries
from conftest import copy_tree

LOADED = ("jev4.model.encoder: loaded", "jev4.model.adapters: adapter", "jev4.runtime.text_only: loaded", "jev4.export.merge: merged")  # weights were read


def _before_load(result: Result) -> str:
    line = result.one_error()
    assert result.code == 2, result.stderr
    assert not any(marker in result.stderr for marker in LOADED), f"checked only after loading:\n{result.stderr}"
    return line


# --------------------------------------------------------------------------- arguments, before any model loads


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "onnx", "--opset", "7"], "--opset 7 is not supported; use 18..23"),
        (["--fp8", "--calib-size", "0"], "--calib-size must be a positive integer, got 0"),
        (["--output-precision", "int8", "--output-calib-size", "1"], "--output-calib-size must be >= 2"),
        (["--opset", "18"], "--opset and --no-validate apply to ONNX exports"),
        (["--adapter", "summarize"], "unknown task 'summarize'"),
        (["--calib-data", "x.txt"], "apply to --fp8 or --int8 exports only"),
    ],
)
def test_export_arguments(tiny, tmp_path, args, message):
    base = ["--model", tiny, "--adapter", "retrieval", "--out", tmp_path / "out", "--no-progress"]
    if "--adapter" in args:
        base = base[:2] + base[4:]
    line = _before_load(run(command("jev4-export", *base, *args)))
    assert message in line
    assert not (tmp_path / "out").exists() and temp_entries(tmp_path / "out") == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--truncate-dim", "7"], "truncate_dim=7 is not allowed; choose one of [8, 16, 32] or 64"),
        (["--task", "summarize"], "unknown task 'summarize'"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--device", "cuda"], None),
    ],
)
def test_encode_arguments(tiny, tmp_path, args, message):
    out = tmp_path / "e.npz"
    result = run(command("jev4", "encode", "--model", tiny, "--text", "hello", "--out", out, *args))
    if args[0] == "--device":  # no GPU here: one line saying so (a GPU host would run it)
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
        assert result.code == 2 and "needs a CUDA GPU" in result.one_error()
    else:
        assert message in _before_load(result)
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--multivector", "--truncate-dim", "16"], "--truncate-dim applies to single vectors"),
        (["--max-length", "0"], "--max-length must be >= 1, got 0"),
        (["--batch-size", "1.5"], "argument --batch-size: invalid int value: '1.5' (see jev4 encode --help)"),
    ],
)
def test_encode_option_combinations(tiny, tmp_path, args, message):
    result = run(command("jev4", "encode", "--model", tiny, "--text", "hello", "--out", tmp_path / "e.npz", *args))
    assert result.code == 2 and TRACEBACK not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1  # argparse's usage block is not printed
    assert not (tmp_path / "e.npz").exists()


def test_empty_model_path(tmp_path):
    line = _before_load(run(command("jev4", "encode", "--model", "", "--text", "x", "--out", tmp_path / "e.npz")))
    assert "the model path is empty" in line


def test_output_calibration_flags_need_output_precision(tiny, tmp_path):
    line = _before_load(run(command("jev4-export", "--model", tiny, "--adapter", "retrieval", "--output-calib-size", "5", "--out", tmp_path / "o")))
    assert "apply with --output-precision only" in line


def test_config_that_is_not_an_object(tiny, tmp_path):
    model = copy_tree(tiny, tmp_path / "model")
    (model / "config.json").write_text("[1, 2]")
    line = _before_load(run(command("jev4", "encode", "--model", model, "--text", "x", "--out", tmp_path / "e.npz")))
    assert f"{model / 'config.json'}: expected a JSON object, got list" in line


def test_onnx_text_too_long_for_memory_is_refused(onnx_artifact, monkeypatch):
    """language.onnx materialises T x T attention per head: a batch that cannot fit is refused before onnxruntime runs
    (one 15,000-word text was killed by the kernel at 24 GB before)."""
    from jev4.runtime import onnxruntime_backend

    encoder = rt.load(onnx_artifact)
    monkeypatch.setattr(onnxruntime_backend, "available_memory", lambda: 2**30)
    with pytest.raises(EncodeError, match=r"a batch of 1 x 8192 tokens needs about 6.0 GiB for language.onnx's attention .*1.0 GiB available.*smaller max_length"):
        encoder.encode_text(["word " * 9000], task="retrieval", max_length=8192)
    assert encoder.encode_text(["word " * 9000], task="retrieval", max_length=1024).shape == (1, 64)  # fits: runs


def test_encode_needs_an_input(tiny, tmp_path):
    line = _before_load(run(command("jev4", "encode", "--model", tiny, "--out", tmp_path / "e.npz")))
    assert "give --text and/or --image" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-docs", "0"], "--max-docs must be a positive integer"),
        (["--adapter", "code"], "--adapter 'code': the artifact"),
        (["--dataset", "/no/such/beir"], "unknown dataset '/no/such/beir'"),
        (["--thresholds", "{bad"], "not valid JSON"),
    ],
)
def test_validate_arguments(tiny, merged, tmp_path, args, message):
    if args[0] == "--thresholds":
        (tmp_path / "t.json").write_text(args[1])
        args = ["--thresholds", tmp_path / "t.json"]
    base = {"--reference": tiny, "--adapter": "retrieval", "--artifact": merged, "--out": tmp_path / "r"}
    base.update(dict(zip(args[::2], args[1::2])))
    line = _before_load(run(command("jev4", "validate", *[x for kv in base.items() for x in kv])))
    assert message in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("sub", ["make-tiny", "encode", "export", "validate", "build-engine", "qat", "demo", "bench merge", "bench codecs"])
def test_every_command_takes_the_common_flags(sub):
    """-v and --no-progress are accepted by every command (checked by argparse alone: --help exits 0)."""
    result = run(command("jev4", *sub.split(), "--help"))
    assert result.code == 0
    assert "--no-progress" in result.stdout and "--verbose" in result.stdout


def test_onnx_export_is_quiet_without_verbose(tiny, tmp_path):
    """Only jev4's own log lines (torch's exporter warnings appear with -v)."""
    result = run(command("jev4-export", "--model", tiny, "--adapter", "retrieval", "--format", "onnx", "--text-only", "--out", tmp_path / "o", "--no-progress"))
    assert result.code == 0, result.stderr
    foreign = [line for line in result.stderr.splitlines() if not line.startswith(("INFO jev4", "WARNING jev4"))]
    assert foreign == []


def test_a_bug_is_labelled_with_its_traceback(monkeypatch, caplog):
    """Anything that is not bad input or the machine is shown as a bug to report, exit 70."""
    from jev4.cli.common import EXIT_BUG, run_command

    def broken(args):
        return {}["missing"]

    assert run_command(broken, type("Args", (), {"verbose": False})()) == EXIT_BUG
    assert "jev4 hit a bug" in caplog.text and "KeyError" in caplog.text


# --------------------------------------------------------------------------- texts


def test_invalid_utf8_on_the_command_line(tiny, tmp_path):
    out = tmp_path / "e.npz"
    done = subprocess.run([str(BIN / "jev4"), "encode", "--model", str(tiny), "--text", "ok", "--text", b"abc\xffdef", "--out", str(out)], capture_output=True, env=env())
    err = done.stderr.decode()
    assert done.returncode == 2 and TRACEBACK not in err
    assert "text #1 is not valid Unicode" in err and "position 3" in err
    assert not out.exists()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_lone_surrogate_through_the_api(tiny, onnx_artifact, backend):
    encoder = rt.load(tiny if backend == "torch" else onnx_artifact)
    with pytest.raises(EncodeError, match=r"text #2 is not valid Unicode: lone surrogate '\\ud800' at position 3"):
        encoder.encode_text(["fine", "also fine", "abc\ud800def"], task="retrieval")


def test_text_only_export_is_text_only(text_only):
    encoder = rt.load(text_only)
    with pytest.raises(EncodeError, match="cannot encode images"):
        encoder.encode_image(Image.new("RGB", (56, 56)), task="retrieval")


# --------------------------------------------------------------------------- images


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height, with one empty data chunk: a decompression bomb that costs nothing to make."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    "size, message",
    [((14000, 14000), "over jev4's limit of 89,478,485 pixels"), ((10000, 10000), "over jev4's limit"), ((1, 20000), "aspect ratio 20000 (1x20000 pixels) is over the limit of 200")],
    ids=["bomb-14000", "bomb-10000", "aspect-1x20000"],
)
def test_oversized_images(tiny, tmp_path, size, message):
    image = _png_header_only(tmp_path / "big.png", *size)
    result = run(command("jev4", "encode", "--model", tiny, "--image", image, "--out", tmp_path / "e.npz"))
    line = _before_load(result)
    assert str(image) in line and message in line


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"], ids=["text-file", "truncated-png"])
def test_unreadable_images(tiny, tmp_path, content):
    image = tmp_path / "bad.png"
    image.write_bytes(content)
    line = _before_load(run(command("jev4", "encode", "--model", tiny, "--image", image, "--out", tmp_path / "e.npz")))
    assert f"{image}: not a readable image" in line


def test_missing_and_directory_images(tiny, tmp_path):
    (tmp_path / "pictures").mkdir()
    for image, message in ((tmp_path / "absent.png", "image file not found"), (tmp_path / "pictures", "is a directory, not a readable image file")):
        line = _before_load(run(command("jev4", "encode", "--model", tiny, "--image", image, "--out", tmp_path / "e.npz")))
        assert str(image) in line and message in line


def test_sixteen_bit_grayscale_is_the_same_picture(tiny, tmp_path):
    """An I;16 scan and its 8-bit version (v // 257) embed the same: it is no longer clipped to white."""
    ramp8 = np.tile(np.linspace(0, 255, 120).astype(np.uint8), (90, 1))
    scan16 = Image.fromarray(ramp8.astype(np.uint16) * 257)
    assert scan16.mode == "I;16"
    scan16.save(tmp_path / "scan16.png")
    Image.fromarray(ramp8, mode="L").save(tmp_path / "scan8.png")
    out = tmp_path / "e.npz"
    result = run(command("jev4", "encode", "--model", tiny, "--image", tmp_path / "scan16.png", "--image", tmp_path / "scan8.png", "--out", out, "--no-progress"))
    assert result.code == 0, result.stderr
    data = np.load(out)
    assert float(data["image_0"] @ data["image_1"]) > 0.999999


# --------------------------------------------------------------------------- damaged checkpoints and artifacts


def test_adapter_rank_disagrees_with_config(tiny, tmp_path):
    model = copy_tree(tiny, tmp_path / "model")
    config = model / "adapters" / "adapter_config.json"
    data = json.loads(config.read_text())
    data["r"] = 16
    config.write_text(json.dumps(data))
    result = run(command("jev4-export", "--model", model, "--adapter", "retrieval", "--out", tmp_path / "out", "--no-progress"))
    line = result.one_error()
    assert result.code == 2 and "have rank 8, but" in line and "says r=16" in line
    assert not (tmp_path / "out").exists()


def test_nan_weight_named_by_export_and_encode(tiny, tmp_path):
    model = copy_tree(tiny, tmp_path / "model")
    weights = sorted(model.glob("model*.safetensors"))[0]
    tensors = load_file(str(weights))
    name = next(n for n in sorted(tensors) if n.endswith(("mlp.up_proj.weight", "mlp.fc1.weight")))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for cmd in (
        command("jev4-export", "--model", model, "--adapter", "retrieval", "--out", tmp_path / "out", "--no-progress"),
        command("jev4", "encode", "--model", model, "--text", "x", "--out", tmp_path / "e.npz"),
    ):
        result = run(cmd)
        line = result.one_error()
        assert result.code == 2 and name in line and "non-finite" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "e.npz").exists()


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated-manifest", "deleted-file", "added-file"])
def test_damaged_merged_artifact(merged, tmp_path, damage):
    art = copy_tree(merged, tmp_path / "art")
    if damage == "flipped-byte":
        _flip_byte(art / "model.safetensors")
        expected = "model.safetensors: sha256 differs from the manifest"
    elif damage == "truncated-manifest":
        manifest = art / "jev4-manifest.json"
        manifest.write_text(manifest.read_text()[:200])
        expected = "jev4-manifest.json: not valid JSON"
    elif damage == "deleted-file":
        (art / "tokenizer.json").unlink()
        expected = "tokenizer.json: missing"
    else:
        (art / "notes.txt").write_text("x")
        expected = "notes.txt: not in the manifest"
    result = run(command("jev4", "encode", "--model", art, "--text", "x", "--out", tmp_path / "e.npz"))
    assert result.code == 2 and expected in result.one_error()
    with pytest.raises(ManifestError, match=expected.split(":")[0]):
        rt.load(art)


def test_onnx_artifact_without_manifest(onnx_artifact, tmp_path):
    art = copy_tree(onnx_artifact, tmp_path / "art")
    (art / "jev4-manifest.json").unlink()
    result = run(command("jev4", "encode", "--model", art, "--text", "x", "--out", tmp_path / "e.npz"))
    assert result.code == 2 and "looks like a jev4 ONNX artifact whose jev4-manifest.json is missing" in result.one_error()


def test_merge_temp_dir_is_not_a_model(merged, tmp_path):
    """A crashed run's temp dir can hold a complete model.safetensors: load must still refuse it."""
    leftover = copy_tree(merged, tmp_path / ".out.tmp-999999-abcd")
    (leftover / "jev4-manifest.json").unlink()
    with pytest.raises(Jev4Error, match="unfinished jev4 output"):
        rt.load(leftover)


# --------------------------------------------------------------------------- every artifact jev4 writes loads in jev4


def test_encode_runs_every_artifact_kind(tiny, merged, text_only, onnx_artifact, tmp_path):
    """jev4 encode goes through jev4.runtime.load: a checkpoint, a merge, a text-only export and an ONNX artifact agree."""
    vectors = {}
    for name, model in (("reference", tiny), ("merged", merged), ("text-only", text_only), ("onnx", onnx_artifact)):
        out = tmp_path / f"{name}.npz"
        result = run(command("jev4", "encode", "--model", model, "--text", "what is a llama?", "--text", "def f(): pass", "--out", out, "--no-progress"))
        assert result.code == 0, f"{name}: {result.stderr}"
        vectors[name] = np.load(out)
    for name in ("merged", "text-only", "onnx"):
        for key in ("text_0", "text_1"):
            assert float(vectors["reference"][key] @ vectors[name][key]) > 0.99999, (name, key)


def test_text_only_multivector_matches_reference(tiny, text_only):
    reference = rt.load(tiny)
    artifact = rt.load(text_only)
    texts = ["a short text", "def add(a, b):\n    return a + b"]
    for ref, got in zip(reference.encode_text(texts, task="retrieval", return_multivector=True), artifact.encode_text(texts, task="retrieval", return_multivector=True)):
        assert ref.shape == got.shape
        assert float((ref * got).sum(-1).min()) > 0.99999
