"""The console scripts: exit codes, one-line errors, the demo's verdict."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jev4.cli.export import main as export_main
from jev4.cli.main import main as jev4_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert jev4_main(["make-tiny", str(out), "--seed", "3"]) == 0
    return out


def test_make_tiny_refuses_existing_out(tiny, caplog):
    assert jev4_main(["make-tiny", str(tiny)]) == 2
    assert "--force" in caplog.text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "summarize"], "unknown task 'summarize'"),
        (["--model", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ],
)
def test_export_bad_input_exit_2(tiny, tmp_path, caplog, args, message):
    base = {"--model": str(tiny), "--adapter": "retrieval", "--out": str(tmp_path / "out")}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = [x for kv in base.items() for x in kv] + ["--no-progress"]
    assert export_main(argv) == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_export_and_encode_roundtrip(tiny, tmp_path):
    out = tmp_path / "merged"
    assert export_main(["--model", str(tiny), "--adapter", "code", "--dtype", "fp32", "--out", str(out), "--no-progress"]) == 0
    emb_ref, emb_merged = tmp_path / "ref.npz", tmp_path / "merged.npz"
    common = ["--task", "code", "--text", "def f(): pass", "--text", "hello", "--truncate-dim", "16"]
    assert jev4_main(["encode", "--model", str(tiny), *common, "--out", str(emb_ref)]) == 0
    assert jev4_main(["encode", "--model", str(out), *common, "--out", str(emb_merged)]) == 0
    a, b = np.load(emb_ref), np.load(emb_merged)
    assert sorted(a.files) == ["text_0", "text_1"]
    for key in a.files:
        assert a[key].shape == (16,)
        assert float(a[key] @ b[key]) > 0.99999


def test_console_scripts_installed():
    """pyproject declares both entry points; `jev4-export --help` runs as a real process."""
    result = subprocess.run([sys.executable, "-m", "jev4.cli.export", "--help"], capture_output=True, text=True, check=True)
    assert "--adapter" in result.stdout and "--text-only" in result.stdout
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("jev4.")}
    assert {"jev4", "jev4-export"} <= names


def test_demo_passes(tmp_path, capsys):
    assert jev4_main(["demo", "--workdir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out
    assert out.count("yes") == 5
    manifest = json.loads((tmp_path / "demo" / "merged-retrieval" / "jev4-manifest.json").read_text())
    assert manifest["settings"]["adapter"] == "retrieval"
