"""``jev4-export`` and ``jev4 validate`` on jina-clip-v2: the family's hooks into the shared commands.

The commands parse every option once (``jev4.cli``); a jina-clip-v2
checkpoint is handed here (``jev4.families.registry.local_family``), where
the options that apply to jina-embeddings-v4 only are refused in one line
before any model loads, and the family's own export and validation run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jev4.errors import SettingsError

log = logging.getLogger(__name__)

__all__ = ["export", "validate"]

# jev4-export options of jina-embeddings-v4 only: flag -> the parsed attribute.
V4_EXPORT_OPTIONS = {
    "--adapter-dir": "adapter_dir", "--text-only": "text_only", "--gguf-type": "gguf_type", "--fp8": "fp8", "--int8": "int8",
    "--calib-data": "calib_data", "--quant-exclude": "quant_exclude", "--weight-granularity": "weight_granularity", "--fused": "fused",
}


def export_settings(args: argparse.Namespace):
    """The ONNX export settings from ``jev4-export``'s options; every v4-only option is refused in one line."""
    from jev4.families.jina_clip_v2.onnx_export import ClipV2OnnxSettings

    if args.adapter not in (None, "none"):
        raise SettingsError(f"--adapter {args.adapter}: {args.model} is jina-clip-v2, which has no task adapters (its one LoRA is merged into every export); drop --adapter")
    given = [flag for flag, dest in V4_EXPORT_OPTIONS.items() if getattr(args, dest)]
    if given:
        raise SettingsError(f"{', '.join(given)}: not for jina-clip-v2 ({args.model}); its exports are --format onnx with --dtype fp32|fp16, --weights int8, --jina-onnx-signature")
    if args.format not in (None, "onnx"):
        raise SettingsError(f"--format {args.format}: jina-clip-v2 exports ONNX only; drop --format (or use --format onnx)")
    return ClipV2OnnxSettings(
        model=args.model, out=args.out, dtype=args.dtype or "fp32", opset=args.opset or 18, jina_signature=args.jina_onnx_signature,
        weights=args.weights, validate=not args.no_validate, force=args.force,
    )


def calibrate_codec(model: str, settings):
    """The output codec of ``--output-precision``, calibrated on the fp32 reference's document vectors."""
    import numpy as np

    from jev4.families.jina_clip_v2.encoder import ClipV2Encoder
    from jev4.quant.output_codec import NEEDS_CALIBRATION, calibrate_output_codec, calibration_documents

    if settings is None:
        return None
    if settings.precision not in NEEDS_CALIBRATION:
        return calibrate_output_codec(np.zeros((0, 1), dtype=np.float32), None, settings, source="none (no calibration needed)")
    docs = calibration_documents(settings)
    single = ClipV2Encoder.from_pretrained(model).encode_text(docs, prompt_name="passage", max_length=settings.max_length).numpy()
    return calibrate_output_codec(single, None, settings, source=settings.calib_data or "builtin:stdlib-code")


def export(args: argparse.Namespace) -> Path:
    """``jev4-export --model CLIP_DIR``: text.onnx + vision.onnx (or the Jina-signature model.onnx), OUT claimed for the whole run."""
    from jev4.atomic import claim_output
    from jev4.cli.export import output_codec_settings
    from jev4.families.jina_clip_v2.onnx_export import export_clip_v2_onnx

    settings = export_settings(args)
    codec_settings = output_codec_settings(args)
    with claim_output(args.out, args.force, (args.model, args.output_calib_data)):
        output_codec = calibrate_codec(args.model, codec_settings)
        return export_clip_v2_onnx(settings, progress=not args.no_progress, output_codec=output_codec)


def validate(args: argparse.Namespace):
    """``jev4 validate --reference CLIP_DIR``: no adapter, its own data and thresholds (``jev4.validate.clip_validate``)."""
    from jev4.cli.main import V4_VALIDATE_OPTIONS, VALIDATE_MAX_QUERIES
    from jev4.validate.clip_retrieval import ClipRetrievalSettings
    from jev4.validate.clip_validate import ClipValidateSettings, validate_clip

    if args.adapter is not None:
        raise SettingsError(f"--adapter {args.adapter}: {args.reference} is jina-clip-v2, which has no task adapters (its one LoRA is merged at load); drop --adapter")
    given = [flag for dest, flag in V4_VALIDATE_OPTIONS.items() if getattr(args, dest) not in (None, False, [])]
    if args.backend not in ("auto", "onnxruntime"):
        given.append(f"--backend {args.backend}")
    if given:
        raise SettingsError(f"{', '.join(given)}: not for jina-clip-v2 ({args.reference}); it is validated on multilingual-names and pydoc-pages (text->text, text->image, image->image)")
    retrieval = ClipRetrievalSettings(
        text_queries=getattr(args, "max_queries", VALIDATE_MAX_QUERIES),
        text_docs=getattr(args, "max_docs", None),  # all 257 English names unless --max-docs cuts them
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    return validate_clip(
        ClipValidateSettings(
            reference=args.reference, artifact=args.artifact, out=args.out, thresholds=args.thresholds, precision=args.precision,
            provider=args.provider, threads=args.threads, retrieval=retrieval, force=args.force,
        )
    )
