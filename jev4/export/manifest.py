"""``jev4-manifest.json``: what an artifact is, how it was made, and checksums of every file.

The manifest is written last, over the finished files, so a complete
manifest means a complete artifact; ``verify_manifest`` detects a file that
was changed, truncated, added or removed since.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jev4.atomic import TEMP_MARKER
from jev4.errors import ManifestError

MANIFEST_NAME = "jev4-manifest.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions that decide whether an artifact reproduces: jev4, python, and the libraries it ran."""
    from importlib.metadata import PackageNotFoundError, version

    import jev4

    found = {"jev4": jev4.__version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "tokenizers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@dataclass
class Manifest:
    """The artifact's identity card. ``settings`` holds the exact options that produced it."""

    kind: str
    source: str
    settings: dict[str, Any]
    contents: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    format_version: int = MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "jev4-artifact",
            "format_version": self.format_version,
            "kind": self.kind,
            "source": self.source,
            "settings": self.settings,
            "contents": self.contents,
            "versions": self.versions,
            "created": self.created,
            "files": self.files,
        }


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Checksum every file under ``root`` (except the manifest) and write the manifest."""
    root = Path(root)
    manifest.files = {
        path.relative_to(root).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in (MANIFEST_NAME, TEMP_MARKER)
    }
    target = root / MANIFEST_NAME
    target.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return target


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: not found; is {root} a jev4 artifact?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if data.get("format") != "jev4-artifact":
        raise ManifestError(f"{path}: not a jev4 manifest (format={data.get('format')!r})")
    return data


def verify_manifest(root: Path) -> dict[str, Any]:
    """Check every listed file's size and sha256, and that no file was added; return the manifest."""
    root = Path(root)
    data = read_manifest(root)
    problems = []
    listed = data.get("files", {})
    for rel, entry in listed.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_NAME and p.relative_to(root).as_posix() not in listed
    ]
    problems += [f"{rel}: not in the manifest" for rel in sorted(extra)]
    if problems:
        raise ManifestError(f"{root}: files do not match {MANIFEST_NAME}: " + "; ".join(problems))
    return data
