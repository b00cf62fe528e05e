"""Artifacts the reliability suite breaks (copies of them) and the helpers it needs.

Session artifacts are read-only: a test that damages one copies it first.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from jev4.model.tiny import write_tiny_checkpoint

from harness import command, run  # noqa: F401  (tests/reliability is on sys.path via rootdir conftest)

# A checkpoint big enough that writing its merge takes a moment (about 100M parameters, 190 MB in bf16,
# 390 MB merged in fp32): a run can be stopped while it writes. Two layers keep the ONNX export quick.
MID_SPEC = dict(hidden_size=1024, layers=2, heads=8, kv_heads=2, intermediate_size=4096, mrope_section=(16, 24, 24), matryoshka_dims=(128, 256, 512))
MID_VOCAB = 65536


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("rel-tiny") / "tiny", seed=5)


@pytest.fixture(scope="session")
def merged(tmp_path_factory, tiny) -> Path:
    out = tmp_path_factory.mktemp("rel-merged") / "merged"
    result = run(command("jev4-export", "--model", tiny, "--adapter", "retrieval", "--dtype", "fp32", "--out", out, "--no-progress"))
    assert result.code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def text_only(tmp_path_factory, tiny) -> Path:
    out = tmp_path_factory.mktemp("rel-text") / "text-only"
    result = run(command("jev4-export", "--model", tiny, "--adapter", "retrieval", "--dtype", "fp32", "--text-only", "--out", out, "--no-progress"))
    assert result.code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def onnx_artifact(tmp_path_factory, tiny) -> Path:
    from jev4.export.onnx import OnnxExportSettings, export_onnx

    out = tmp_path_factory.mktemp("rel-onnx") / "onnx"
    return export_onnx(OnnxExportSettings(model=str(tiny), adapter="retrieval", out=str(out)), progress=False)


@pytest.fixture(scope="session")
def mid(tmp_path_factory) -> Path:
    from jev4.model.synthetic import write_random_checkpoint
    from jev4.model.tiny import TinySpec

    out = tmp_path_factory.mktemp("rel-mid") / "mid"
    return write_random_checkpoint(out, spec=TinySpec(**MID_SPEC), vocab_size=MID_VOCAB, dtype="bf16", progress=False)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file's bytes (small trees) or size+mtime (large files): enough to show a tree is as it was."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            out[path.relative_to(root).as_posix()] = path.read_bytes() if stat.st_size < 4_000_000 else f"{stat.st_size}:{stat.st_mtime_ns}".encode()
    return out


@pytest.fixture
def small_fs(tmp_path):
    """A directory on a tiny tmpfs (a full disk on demand): needs root and mount; skipped otherwise."""
    mounted = []

    def make(size: str = "300k", read_only: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
