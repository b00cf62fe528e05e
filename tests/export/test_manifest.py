"""verify_manifest against an independent verifier: missing, added and same-size corrupted files.

Every other artifact in the suite has files under 1 MB, so these tests build
one with a 9 MiB file (past sha256_file's 4 MiB read chunk) and check the
manifest with a pure-Python verifier that hashes whole files with hashlib.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from jev4.errors import ManifestError
from jev4.export.manifest import MANIFEST_NAME, Manifest, sha256_file, verify_manifest, write_manifest

BIG = 9 * (1 << 20)  # 9 MiB: spans three 4 MiB chunks


def reference_problems(root: Path) -> list[str]:
    """An independent verifier: read the manifest JSON, hash each whole file in one go, list the files on disk."""
    files = json.loads((root / MANIFEST_NAME).read_text())["files"]
    problems = []
    for rel, entry in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        data = path.read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{rel}: differs")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    problems += [f"{rel}: added" for rel in sorted(on_disk - set(files))]
    return problems


@pytest.fixture
def artifact(tmp_path):
    root = tmp_path / "art"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    (root / "big.bin").write_bytes(rng.integers(0, 256, BIG, dtype=np.uint8).tobytes())
    (root / "config.json").write_text('{"a": 1}\n')
    (root / "sub" / "small.bin").write_bytes(b"\x00\x01\x02")
    write_manifest(root, Manifest(kind="test", source="generated", settings={}, versions={}))
    return root


def test_recorded_checksums_hash_whole_files(artifact):
    files = json.loads((artifact / MANIFEST_NAME).read_text())["files"]
    assert set(files) == {"big.bin", "config.json", "sub/small.bin"}
    for rel, entry in files.items():
        data = (artifact / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, rel
    assert sha256_file(artifact / "big.bin") == hashlib.sha256((artifact / "big.bin").read_bytes()).hexdigest()
    assert reference_problems(artifact) == []
    assert verify_manifest(artifact)["kind"] == "test"


@pytest.mark.parametrize("offset", [BIG - 1, (1 << 22) + 17, 8 * (1 << 20) + 5])
def test_same_size_corruption_past_4_mib(artifact, offset):
    big = artifact / "big.bin"
    data = bytearray(big.read_bytes())
    data[offset] ^= 0xFF
    big.write_bytes(bytes(data))
    assert big.stat().st_size == BIG
    assert reference_problems(artifact) == ["big.bin: differs"]
    with pytest.raises(ManifestError, match=r"big\.bin: sha256 differs from the manifest"):
        verify_manifest(artifact)


def test_missing_file(artifact):
    (artifact / "sub" / "small.bin").unlink()
    assert reference_problems(artifact) == ["sub/small.bin: missing"]
    with pytest.raises(ManifestError, match=r"sub/small\.bin: missing"):
        verify_manifest(artifact)


def test_added_file(artifact):
    (artifact / "sub" / "extra.txt").write_text("not listed")
    assert reference_problems(artifact) == ["sub/extra.txt: added"]
    with pytest.raises(ManifestError, match=r"sub/extra\.txt: not in the manifest"):
        verify_manifest(artifact)


def test_every_problem_is_listed(artifact):
    (artifact / "config.json").unlink()
    (artifact / "new.bin").write_bytes(b"x")
    (artifact / "sub" / "small.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ManifestError) as info:
        verify_manifest(artifact)
    message = str(info.value)
    assert "config.json: missing" in message
    assert "new.bin: not in the manifest" in message
    assert "sub/small.bin: 2 bytes, manifest says 3" in message
