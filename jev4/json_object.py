"""Reading a small JSON settings file (config.json, adapter_config.json) that must hold one object.

One reader, so that every such file fails the same way: a missing file, a
file that is not JSON (or not UTF-8) and a file that holds something other
than an object are each one error of the caller's class, naming the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jev4.errors import Jev4Error


def read_json_object(path: Path, error: type[Jev4Error], missing: str, expected: str = "expected a JSON object") -> dict[str, Any]:
    """The object in ``path``; ``missing`` and ``expected`` complete the messages (``{path}: {missing}``, ``{path}: {expected}, got list``)."""
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise error(f"{path}: {expected}, got {type(raw).__name__}")
    return raw
