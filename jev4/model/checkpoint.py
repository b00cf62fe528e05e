"""Finding, checking and reading a checkpoint's safetensors files.

Why our own reader instead of ``from_pretrained``: jev4 must accept both key
layouts that exist on disk, account for every tensor (a tensor that maps to
nothing is an error that names it), never unpickle anything, and stream shard
by shard so that a merge or export never holds the whole model twice. The
safetensors header is checked against the file size before any tensor is
read, so a corrupt or truncated shard is reported by name instead of
surfacing as a crash deep inside a load.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from jev4.errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_DIR = "adapters"
# Files a model download needs; nothing executable (jev4 never runs remote code).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja", "adapters/*")

# Tensor-name mapping as data: the older on-disk layout (what save_pretrained
# writes) -> the module names in memory. Names already in the current layout
# match no rule and pass through unchanged.
KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
    (re.compile(r"^visual\."), "model.visual."),
)
# The reverse, for writing the layout upstream's save_pretrained writes.
OLD_LAYOUT_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
)


def canonical_name(name: str) -> str:
    """Map a checkpoint tensor name in either layout to the name in memory."""
    for pattern, replacement in KEY_RULES:
        if pattern.search(name):
            return pattern.sub(replacement, name, count=1)
    return name


def old_layout_name(name: str) -> str:
    """Map an in-memory name to the older on-disk layout."""
    for pattern, replacement in OLD_LAYOUT_RULES:
        if pattern.search(name):
            return pattern.sub(replacement, name, count=1)
    return name


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id downloaded through huggingface_hub.

    Only data files are downloaded (``HUB_PATTERNS``); upstream's Python files are
    not needed because jev4 has its own modelling code.
    """
    if not str(name_or_path).strip():
        raise CheckpointError("the model path is empty; give a checkpoint directory or a hub id (owner/name)")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file, expected a checkpoint directory")
        return path
    text = str(name_or_path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: no such directory (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a core dependency
        raise CheckpointError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from exc
    try:
        local = snapshot_download(text, revision=revision, allow_patterns=list(HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{text}: not in the local cache and the hub cannot be reached (offline?); "
            "download it elsewhere and pass the local directory"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{text}: could not download from the hub: {exc}") from exc
    return Path(local)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading any tensor data.

    Raises a ``CheckpointError`` naming the file when the header is not valid
    JSON, when it points outside the file, or when the file is shorter than the
    header says (a truncated download or copy).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100_000_000:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (claims {header_len} header bytes in a {size}-byte file)"
                )
            header_bytes = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(name, entry["dtype"], tuple(int(d) for d in entry["shape"]), 8 + header_len + start, 8 + header_len + end)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from exc
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.dtype!r}")
        expected = math.prod(info.shape) * dtype.itemsize
        if end < start or end - start != expected:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: {name!r} {info.dtype}{list(info.shape)} needs {expected} bytes, "
                f"offsets give {end - start}"
            )
        infos[name] = info
        end_max = max(end_max, end)
    if end_max > data_len:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {end_max} data bytes, the file holds {data_len}"
        )
    return infos


@dataclass(frozen=True)
class CheckpointFiles:
    """The weight files of a checkpoint and the tensors each one holds (by on-disk name)."""

    model_dir: Path
    shards: tuple[tuple[Path, tuple[str, ...]], ...]

    @property
    def tensor_count(self) -> int:
        return sum(len(names) for _, names in self.shards)


def list_checkpoint_files(model_dir: Path) -> CheckpointFiles:
    """Find the weight shards (sharded with an index, or one file) and check their headers."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such checkpoint directory")
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and isinstance(filename, str) and filename for name, filename in weight_map.items()
        ):
            raise CheckpointError(
                f"{index_path}: 'weight_map' must map tensor names to shard file names, got {type(weight_map).__name__}"
            )
        by_file: dict[str, list[str]] = {}
        for name, filename in weight_map.items():
            by_file.setdefault(filename, []).append(name)
        shards = []
        for filename in sorted(by_file):
            path = model_dir / filename
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
            header = read_safetensors_header(path)
            listed = set(by_file[filename])
            if listed != set(header):
                missing = sorted(listed - set(header))[:5]
                extra = sorted(set(header) - listed)[:5]
                raise CheckpointError(
                    f"{path}: does not match {INDEX_NAME} (in index, not in file: {missing}; in file, not in index: {extra})"
                )
            shards.append((path, tuple(sorted(header))))
        return CheckpointFiles(model_dir, tuple(shards))
    single = model_dir / SINGLE_NAME
    if single.is_file():
        header = read_safetensors_header(single)
        return CheckpointFiles(model_dir, ((single, tuple(sorted(header))),))
    raise CheckpointError(f"{model_dir}: no {INDEX_NAME} or {SINGLE_NAME} found")


def all_finite(tensor: torch.Tensor) -> bool:
    """True when a tensor holds no NaN or inf (integer and bool tensors always do).

    One fused min/max reduction rather than ``torch.isfinite(t).all()``:
    ``torch.aminmax`` propagates NaN (documented) and an inf shows up as the
    min or the max.
    Measured on a 151936x2048 bf16 tensor (the embedding matrix, 622 MB),
    2 CPU threads, torch 2.13: 0.05-0.11 s, against 1.1-4.1 s for
    ``isfinite().all()`` (which allocates a bool tensor and is ~25x slower)
    and 0.36-0.43 s to read the tensor from the page cache; so checking
    adds ~10-25% to reading, and every weight can be checked on every load.
    fp8 has no CPU min/max kernels and is checked through a wider copy
    (``_comparable``).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(_comparable(tensor))
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _comparable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or for 1-byte floats (fp8) an exact copy in the narrowest dtype with CPU kernels that holds their range."""
    if tensor.dtype.itemsize > 1:
        return tensor
    wide = torch.float16 if torch.finfo(tensor.dtype).max <= torch.finfo(torch.float16).max else torch.float32
    return tensor.to(wide)  # NaN and inf stay NaN and inf


def describe_nonfinite(tensor: torch.Tensor) -> str:
    """How many values are NaN/inf and where the first is: for an error message, so only on the failure path."""
    values = _comparable(tensor)
    bad = ~torch.isfinite(values)
    kinds = " or ".join(kind for kind, mask in (("NaN", values.isnan()), ("inf", values.isinf())) if bool(mask.any()))
    first = int(bad.reshape(-1).to(torch.uint8).argmax())  # argmax returns the first of equal maxima
    where = [int(i) for i in torch.unravel_index(torch.tensor(first), tuple(tensor.shape))] if tensor.ndim else []
    return f"{int(bad.sum())} of {tensor.numel()} values are {kinds}, the first at {where}"


def iter_shard_tensors(path: Path, names: tuple[str, ...] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(on-disk name, tensor)`` from one safetensors file, one tensor at a time.

    Tensors are read with plain file reads into fresh buffers rather than
    through a memory map: a merge touching a 4 GB shard through mmap would
    count all of it as resident memory. Nothing is unpickled.

    Every floating tensor is checked for NaN/inf here, as it is read: a
    non-finite weight would otherwise load, merge and export without a word
    and surface only as NaN embeddings (see ``all_finite`` for the cost).
    """
    header = read_safetensors_header(path)
    wanted = names if names is not None else tuple(header)
    try:
        with Path(path).open("rb") as handle:
            for name in wanted:
                if name not in header:
                    raise CheckpointError(f"{path}: has no tensor {name!r}")
                info = header[name]
                handle.seek(info.start)
                data = bytearray(info.end - info.start)
                if handle.readinto(data) != len(data):
                    raise CheckpointError(f"{path}: truncated while reading {name!r}")
                dtype = SAFETENSORS_DTYPES[info.dtype]
                tensor = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(info.shape)
                if not all_finite(tensor):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} {info.dtype}{list(info.shape)} holds non-finite values "
                        f"({describe_nonfinite(tensor)}); the file is corrupt or was saved from a diverged model"
                    )
                yield name, tensor
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({exc})") from exc


def check_accounting(found: set[str], expected: set[str], where: str) -> None:
    """Every expected tensor present and nothing else: name what is wrong."""
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} unexpected tensor(s) that map to nothing in the model, "
            f"e.g. {unexpected[:5]}"
        )
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} missing tensor(s), e.g. {missing[:5]}")
