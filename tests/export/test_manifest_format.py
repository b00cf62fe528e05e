"""The manifest as a file format: its exact fields and bytes, its errors, and the versions it records.

Readers outside jev4 (a deploy script, the runtime of another version) rely
on the field names and on the file being plain indented JSON, so the bytes
are pinned against a dict built here, with checksums computed by hashlib.
Mutation testing (docs/testing.md) found every one of these unpinned.
"""

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version

import pytest

import jev4
from jev4.errors import ManifestError
from jev4.export.manifest import MANIFEST_NAME, Manifest, package_versions, read_manifest, verify_manifest, write_manifest


def _artifact(root):
    (root / "sub").mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"graph bytes")
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 3)
    return root


def test_the_manifest_file_is_exactly_the_documented_json(tmp_path):
    root = _artifact(tmp_path / "art")
    manifest = Manifest(kind="onnx", source="/src", settings={"adapter": "retrieval"}, contents={"precision": "fp32"}, versions={"jev4": "9.9"}, created="2026-11-30T00:00:00+00:00")
    path = write_manifest(root, manifest)
    expected = {
        "format": "jev4-artifact",
        "format_version": 1,
        "kind": "onnx",
        "source": "/src",
        "settings": {"adapter": "retrieval"},
        "contents": {"precision": "fp32"},
        "versions": {"jev4": "9.9"},
        "created": "2026-11-30T00:00:00+00:00",
        "files": {
            "model.onnx": {"sha256": hashlib.sha256(b"graph bytes").hexdigest(), "bytes": 11},
            "sub/weights.bin": {"sha256": hashlib.sha256(bytes(range(256)) * 3).hexdigest(), "bytes": 768},
        },
    }
    assert path == root / MANIFEST_NAME
    assert path.read_text() == json.dumps(expected, indent=2) + "\n"  # field names, order and layout: plain indented JSON
    assert read_manifest(root) == expected == verify_manifest(root)


def test_read_errors_name_the_file_and_the_problem(tmp_path):
    root = tmp_path / "art"
    root.mkdir()
    with pytest.raises(ManifestError, match=rf"{MANIFEST_NAME}: not found; is .*art a jev4 artifact\?"):
        read_manifest(root)
    (root / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match=rf"{MANIFEST_NAME}: not valid JSON \(Expecting property name"):
        read_manifest(root)
    (root / MANIFEST_NAME).write_text(json.dumps({"format": "other-tool"}))
    with pytest.raises(ManifestError, match=rf"{MANIFEST_NAME}: not a jev4 manifest \(format='other-tool'\)"):
        read_manifest(root)


def test_a_manifest_without_a_file_list_reports_every_file_as_unlisted(tmp_path):
    root = _artifact(tmp_path / "art")
    (root / MANIFEST_NAME).write_text(json.dumps({"format": "jev4-artifact"}))
    with pytest.raises(ManifestError, match=r"files do not match jev4-manifest.json: model.onnx: not in the manifest; sub/weights.bin: not in the manifest$"):
        verify_manifest(root)


def test_problems_are_listed_together(tmp_path):
    root = _artifact(tmp_path / "art")
    write_manifest(root, Manifest(kind="onnx", source="s", settings={}))
    (root / "model.onnx").unlink()
    (root / "extra.txt").write_text("x")
    with pytest.raises(ManifestError, match=r": model.onnx: missing; extra.txt: not in the manifest$"):
        verify_manifest(root)


def test_package_versions_are_what_is_installed():
    found = package_versions()
    assert found["jev4"] == jev4.__version__ and found["python"] == platform.python_version()
    for name in ("torch", "transformers", "safetensors", "tokenizers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            installed = version(name)
        except PackageNotFoundError:
            assert name not in found  # absent packages are left out, not recorded as None
        else:
            assert found[name] == installed
    assert set(found) <= {"jev4", "python", "torch", "transformers", "safetensors", "tokenizers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"}
    assert {"torch", "onnx"} <= set(found)  # this suite always runs with both


def test_a_file_named_like_the_manifest_below_the_root_is_an_added_file(tmp_path):
    root = _artifact(tmp_path / "art")
    write_manifest(root, Manifest(kind="onnx", source="s", settings={}))
    (root / "sub" / MANIFEST_NAME).write_text("{}")  # only the root's manifest is exempt from the file list
    with pytest.raises(ManifestError, match=rf": sub/{MANIFEST_NAME}: not in the manifest$"):
        verify_manifest(root)
