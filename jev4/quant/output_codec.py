"""An artifact's output codec: which embedding precision it serves, and the calibration behind it.

``jev4-export ... --output-precision int8`` embeds a calibration sample of
documents with the reference encoder (the same model, adapter unmerged, fp32),
calibrates one ``Calibration`` for the single vectors (full size) and one for
the multi-vector tokens, and stores both in ``output-codec.json`` inside the
artifact, where the manifest checksums it. The runtime reads the file and
quantizes with those ranges at query time, so documents indexed today and
queries encoded next month land on the same grid. Calibrating on the
reference rather than on the artifact keeps the grid independent of how the
artifact was built (fp32, fp16, fp8): the codec describes the embedding
space, not the engine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jev4.errors import EmbeddingQuantError
from jev4.quant.embeddings import Calibration, EmbeddingCodec, calibrate, check_precision

log = logging.getLogger(__name__)

OUTPUT_CODEC_NAME = "output-codec.json"
FORMAT = "jev4-output-codec"
VERSION = 1
# Precisions whose codes need a calibrated range; the others quantize without one.
NEEDS_CALIBRATION = ("int8", "uint8", "int4", "ternary")


@dataclass(frozen=True)
class OutputCodecSettings:
    """Options of ``--output-precision``; recorded in the artifact's manifest."""

    precision: str
    method: str = "minmax"
    percentile: float = 99.9
    calib_size: int = 1000
    calib_data: str | None = None  # a text file, one document per line; default: built-in stdlib-code documents
    max_length: int = 512

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.precision == "float32":
            raise EmbeddingQuantError("--output-precision float32 is what every artifact emits already; pick a smaller precision")
        if isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int) or self.calib_size < 2:
            raise EmbeddingQuantError(f"--output-calib-size must be >= 2, got {self.calib_size!r}")
        if self.calib_data is not None:
            read_calibration_documents(self.calib_data)  # a bad file fails here, before any model loads


@dataclass(frozen=True)
class OutputCodec:
    """The precision an artifact emits, with its single-vector and multi-vector calibrations (if the precision needs them)."""

    precision: str
    single: Calibration | None
    multi: Calibration | None
    settings: dict[str, Any]

    def codec(self, output: str, truncate_dim: int | None = None, precision: str | None = None) -> EmbeddingCodec:
        """The codec for ``output`` ("single" or "multi"); another ``precision`` reuses the calibration when it fits."""
        precision = check_precision(precision or self.precision)
        calibration = self.single if output == "single" else self.multi
        calibration = _compatible(calibration, precision) if precision in NEEDS_CALIBRATION else None
        return EmbeddingCodec(precision, calibration, truncate_dim)

    @classmethod
    def uncalibrated(cls) -> OutputCodec:
        """What an artifact exported without ``--output-precision`` offers: floats, and codes that need no calibration."""
        return cls("float32", None, None, {})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": VERSION,
            "precision": self.precision,
            "settings": self.settings,
            "single": self.single.to_json() if self.single else None,
            "multi": self.multi.to_json() if self.multi else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = OUTPUT_CODEC_NAME) -> OutputCodec:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EmbeddingQuantError(f"{where}: not a jev4 output codec file")
        if data.get("format_version") != VERSION:
            raise EmbeddingQuantError(f"{where}: format version {data.get('format_version')!r}, this jev4 reads {VERSION}")
        single = Calibration.from_json(data["single"]) if data.get("single") else None
        multi = Calibration.from_json(data["multi"]) if data.get("multi") else None
        return cls(check_precision(data["precision"]), single, multi, dict(data.get("settings", {})))

    def write(self, root: Path) -> Path:
        path = Path(root) / OUTPUT_CODEC_NAME
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def read(cls, root: Path) -> OutputCodec | None:
        """The artifact's codec, or None when it was exported without ``--output-precision``."""
        path = Path(root) / OUTPUT_CODEC_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EmbeddingQuantError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(data, str(path))

    def describe(self) -> dict[str, Any]:
        """What the manifest records (the arrays live in the file itself)."""
        return {
            "file": OUTPUT_CODEC_NAME,
            "precision": self.precision,
            "settings": self.settings,
            "single_dim": self.single.dim if self.single else None,
            "multi_dim": self.multi.dim if self.multi else None,
        }


def _compatible(calibration: Calibration | None, precision: str) -> Calibration:
    """int8, uint8 and int4 share one range calibration; anything else needs its own."""
    ranges = ("int8", "uint8", "int4")
    if calibration is not None and (calibration.precision == precision or {precision, calibration.precision} <= set(ranges)):
        return calibration
    have = calibration.precision if calibration else "none"
    raise EmbeddingQuantError(
        f"output precision {precision!r} needs a calibration; this artifact has one for {have!r}. "
        f"Re-export with --output-precision {precision}"
    )


def read_calibration_documents(path: str | Path) -> list[str]:
    """The non-empty lines of ``--output-calib-data``: a UTF-8 text file with at least 2 documents."""
    from jev4.datasets.files import read_text_file

    path = Path(path)
    text = read_text_file(
        path, f"--output-calib-data {path}", "calibration file", "give a text file, one document per line", EmbeddingQuantError, "give one document per line"
    )
    docs = [line for line in text.splitlines() if line.strip()]
    if not docs:
        what = "is empty" if not text else "holds only blank lines"
        raise EmbeddingQuantError(f"--output-calib-data {path}: {what}; give a text file with one document per line, at least 2")
    if len(docs) < 2:
        raise EmbeddingQuantError(f"--output-calib-data {path}: needs at least 2 non-empty lines, found {len(docs)}")
    return docs


def calibration_documents(settings: OutputCodecSettings) -> list[str]:
    """The documents the calibration embeds: the user's file (one per line), or built-in stdlib-code sources."""
    if settings.calib_data:
        return read_calibration_documents(settings.calib_data)[: settings.calib_size]
    from jev4.datasets import stdlib_code_search

    docs = stdlib_code_search().documents
    picks = np.linspace(0, len(docs) - 1, min(settings.calib_size, len(docs))).round().astype(int)
    return [docs[i] for i in picks]


def calibrate_output_codec(
    single: np.ndarray, multi: Sequence[np.ndarray] | None, settings: OutputCodecSettings, source: str = ""
) -> OutputCodec:
    """Calibrate from embeddings: single vectors [N, H] and (optionally) multi-vectors, a list of [tokens, P]."""
    needs = settings.precision in NEEDS_CALIBRATION
    kwargs = dict(method=settings.method, percentile=settings.percentile)
    single_cal = calibrate(single, settings.precision, **kwargs) if needs else None
    multi_cal = None
    if needs and multi is not None and len(multi):
        multi_cal = calibrate(np.concatenate([np.asarray(m, dtype=np.float32) for m in multi]), settings.precision, **kwargs)
    recorded = {**asdict(settings), "documents": int(len(single)), "source": source}
    return OutputCodec(settings.precision, single_cal, multi_cal, recorded)


def encode_calibration(encoder: Any, task: str, settings: OutputCodecSettings, progress: bool = True) -> OutputCodec:
    """Embed the calibration documents with ``encoder`` (passage prompt) and calibrate both outputs."""
    docs = calibration_documents(settings)
    log.info("output codec %s: calibrating on %d documents", settings.precision, len(docs))
    common = dict(task=task, prompt_name="passage", max_length=settings.max_length, progress=progress)
    single = encoder.encode_text(docs, **common).numpy()
    multi = None
    if settings.precision in NEEDS_CALIBRATION:
        multi = [m.numpy() for m in encoder.encode_text(docs, return_multivector=True, **common)]
    return calibrate_output_codec(single, multi, settings, source=settings.calib_data or "builtin:stdlib-code")
