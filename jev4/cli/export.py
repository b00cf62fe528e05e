"""``jev4-export``: build a deployable artifact from a jina-embeddings-v4 checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jev4.cli.common import OneLineErrorParser, common_flags, run_command
from jev4.errors import SettingsError
from jev4.families.registry import local_family

log = logging.getLogger("jev4.export")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        parents=[common_flags()],
        prog="jev4-export",
        description="Merge a task adapter into jina-embeddings-v4 and write a deployable artifact.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. jinaai/jina-embeddings-v4)")
    # Required for jina-embeddings-v4 (checked in export()); jina-clip-v2 has no task adapters.
    parser.add_argument("--adapter", help="task adapter to merge: retrieval, text-matching or code (jina-embeddings-v4; required there)")
    parser.add_argument("--adapter-dir", help="a different adapters/ directory (e.g. one tuned by jev4 qat)")
    parser.add_argument("--format", choices=["hf", "onnx", "gguf"], help="hf: merged safetensors checkpoint; onnx: language (+ vision) graphs; gguf: llama.cpp (default: hf, or onnx with --fp8/--int8)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype (hf default: the source's; onnx default: fp32)")
    parser.add_argument("--opset", type=int, help="ONNX opset (onnx format; default 18, or 19 with --fp8/--int8)")
    parser.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check right after an ONNX export")
    parser.add_argument("--text-only", action="store_true", help="drop the vision tower; write a standard Qwen2 + sentence-transformers checkpoint")
    parser.add_argument("--gguf-type", metavar="TYPE", help="--format gguf: f32, f16 (default), q8_0 or q4_0 (jev4.export.gguf); --model may also be a --text-only export")
    out = parser.add_argument_group("output embeddings (jev4.quant.embeddings)")
    out.add_argument(
        "--output-precision",
        choices=["float16", "int8", "uint8", "int4", "ternary", "binary", "ubinary"],
        help="record an embedding codec in the artifact (calibrated on the reference); the runtime then returns codes on request",
    )
    out.add_argument("--output-calib-size", type=int, help="documents embedded to calibrate the codec's ranges (default 1000)")
    out.add_argument("--output-calib-data", help="text file, one document per line (default: built-in stdlib-code sources)")
    out.add_argument("--output-calib-method", choices=["minmax", "percentile"], help="default minmax")
    quant = parser.add_argument_group("weight + activation quantization (ONNX with Q/DQ, docs/quantization.md)")
    precision = quant.add_mutually_exclusive_group()
    precision.add_argument("--fp8", action="store_true", help="FP8 E4M3 weights and activations (TensorRT explicit quantization)")
    precision.add_argument("--int8", action="store_true", help="INT8 SmoothQuant W8A8: per-channel weights, per-tensor activations")
    quant.add_argument("--calib-data", metavar="FILE", help="calibration samples: a text file (one per line) or JSONL ({\"text\": ...} / {\"image\": path}); default: built-in stdlib-code texts (+ pydoc pages)")
    quant.add_argument("--calib-size", type=int, default=64, metavar="N", help="calibration samples to run (default 64)")
    quant.add_argument(
        "--quant-exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep modules matching this fnmatch pattern in float (repeatable); '!PATTERN' drops a default exclusion, e.g. '!model.visual.*'",
    )
    quant.add_argument("--weight-granularity", choices=["per-channel", "per-tensor"], help="weight scales (default: per-tensor for fp8, per-channel for int8)")
    edge = parser.add_argument_group("CPU edge ONNX (jev4.export.onnx_edge, docs/edge.md)")
    edge.add_argument("--weights", choices=["int4", "int8"], help="weight-only quantization by onnxruntime: int4 MatMulNBits (blocks of 32) or int8 quantize_dynamic; fp32 graph")
    edge.add_argument("--fused", action="store_true", help="fused attention (GroupQueryAttention) and RMSNorm from onnxruntime-genai's builder; needs --text-only")
    parser.add_argument("--jina-onnx-signature", action="store_true", help="jina-clip-v2: one model.onnx with Jina's published inputs and outputs instead of text.onnx + vision.onnx")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(verbose=False, no_progress=False)
    return parser


def output_codec_settings(args: argparse.Namespace):
    """The settings of ``--output-precision`` (None without it); checked before any model loads."""
    given = {"method": args.output_calib_method, "calib_size": args.output_calib_size, "calib_data": args.output_calib_data}
    if args.output_precision is None:
        if any(value is not None for value in given.values()):
            raise SettingsError("--output-calib-size, --output-calib-data and --output-calib-method apply with --output-precision only")
        return None
    from jev4.quant.output_codec import OutputCodecSettings

    return OutputCodecSettings(precision=args.output_precision, **{k: v for k, v in given.items() if v is not None})


def _calibrate_output_codec(args: argparse.Namespace, settings):
    """Calibrate the output codec on the reference (adapter unmerged, fp32) before the export starts."""
    if settings is None:
        return None
    from jev4.model.encoder import TorchEncoder
    from jev4.quant.output_codec import encode_calibration

    reference = TorchEncoder.from_pretrained(args.model, adapter_dir=args.adapter_dir, progress=not args.no_progress)
    return encode_calibration(reference, args.adapter, settings, progress=not args.no_progress)


def _quant_recipe(args: argparse.Namespace):
    """The recipe of ``--fp8`` / ``--int8`` (None for a float export); bad flags fail here, before any work."""
    if not (args.fp8 or args.int8):
        if args.quant_exclude or args.calib_data or args.weight_granularity:
            raise SettingsError("--calib-data, --quant-exclude and --weight-granularity apply to --fp8 or --int8 exports only")
        return None
    from jev4.quant.recipes import make_recipe

    precision = "fp8" if args.fp8 else "int8"
    if args.format not in (None, "onnx"):
        raise SettingsError(f"--{precision} writes an ONNX artifact; drop --format {args.format} (or use --format onnx)")
    return make_recipe(precision, args.weight_granularity, args.quant_exclude)


def _edge_settings(args: argparse.Namespace):
    """``--weights`` / ``--fused`` (None without them); bad combinations fail here, before any model loads."""
    if args.weights is None and not args.fused:
        return None
    flag = "--fused" if args.fused else f"--weights {args.weights}"
    if args.fp8 or args.int8:
        raise SettingsError(f"{flag} cannot be combined with --{'fp8' if args.fp8 else 'int8'} (Q/DQ for TensorRT); choose one")
    if args.format not in (None, "onnx"):
        raise SettingsError(f"{flag} writes an ONNX artifact; drop --format {args.format} (or use --format onnx)")
    if args.fused and args.opset is not None:
        raise SettingsError("--opset does not apply to --fused: onnxruntime-genai's builder sets the opset (recorded in the manifest)")
    from jev4.export.onnx_edge import EdgeSettings
    from jev4.export.onnx_weights import WeightQuantSettings

    return EdgeSettings(fused=args.fused, weights=WeightQuantSettings(args.weights) if args.weights else None)


def _onnx_settings(args: argparse.Namespace, default_opset: int):
    """The ONNX export settings from the command line (Q/DQ graphs default to opset 19, float ones to 18)."""
    from jev4.export.onnx import OnnxExportSettings

    return OnnxExportSettings(
        model=args.model,
        adapter=args.adapter,
        out=args.out,
        dtype=args.dtype or "fp32",
        text_only=args.text_only,
        opset=args.opset or default_opset,
        adapter_dir=args.adapter_dir,
        validate=not args.no_validate,
        force=args.force,
    )


def _gguf_settings(args: argparse.Namespace):
    """``--format gguf`` (``--gguf-type`` alone is an error: it says nothing of the format); other formats' flags are refused."""
    from jev4.export.gguf import GgufSettings

    if args.format != "gguf":
        raise SettingsError(f"--gguf-type applies to --format gguf only (got --format {args.format or 'hf'})")
    given = [flag for flag, value in (("--dtype", args.dtype), ("--opset", args.opset), ("--no-validate", args.no_validate), ("--text-only", args.text_only)) if value]
    if given:
        raise SettingsError(f"{', '.join(given)}: not for --format gguf (the GGUF is text-only; its precision is --gguf-type)")
    return GgufSettings(
        model=args.model, adapter=args.adapter, out=args.out, gguf_type=args.gguf_type or "f16", adapter_dir=args.adapter_dir, force=args.force
    )


def _merge_settings(args: argparse.Namespace):
    from jev4.export.merge import MergeSettings

    if args.opset is not None or args.no_validate:
        raise SettingsError("--opset and --no-validate apply to ONNX exports (--format onnx, --fp8, --int8) only")
    return MergeSettings(
        model=args.model,
        adapter=args.adapter,
        out=args.out,
        dtype=args.dtype,
        text_only=args.text_only,
        adapter_dir=args.adapter_dir,
        force=args.force,
    )


def _run_export(args: argparse.Namespace, recipe, settings, quant, output_codec, edge=None) -> Path:
    progress = not args.no_progress
    if args.format == "gguf":
        from jev4.export.gguf import export_gguf

        return export_gguf(settings, progress=progress, output_codec=output_codec)
    if edge is not None:
        from jev4.export.onnx_edge import export_edge_onnx

        return export_edge_onnx(settings, edge, progress=progress, output_codec=output_codec)
    if recipe is not None:
        from jev4.export.onnx_qdq import export_quantized_onnx

        out = export_quantized_onnx(settings, quant, progress=progress, output_codec=output_codec)
        try:
            from jev4.export.tensorrt import build_or_hint
        except ImportError as exc:  # the engine builder is optional; the ONNX artifact is complete without it
            log.info("TensorRT engines not built (%s); the ONNX artifact runs on onnxruntime", exc)
        else:
            build_or_hint(Path(out), recipe.precision)
        return Path(out)
    if args.format == "onnx":
        from jev4.export.onnx import export_onnx

        return export_onnx(settings, progress=progress, output_codec=output_codec)
    from jev4.export.merge import merge_checkpoint

    return merge_checkpoint(settings, progress=progress, output_codec=output_codec)


def export(args: argparse.Namespace) -> int:
    """Every option is checked first; OUT is claimed (checked and locked) for the whole run, calibration included."""
    from jev4.atomic import claim_output

    family = local_family(args.model)
    if family is not None and family.exporter:
        out = family.export(args)
        log.info("artifact written: %s", out)
        print(out)
        return 0
    if args.adapter is None:
        build_parser().error("the following arguments are required: --adapter")
    if args.jina_onnx_signature:
        raise SettingsError(f"--jina-onnx-signature applies to jina-clip-v2 checkpoints only; {args.model} is jina-embeddings-v4")
    edge = _edge_settings(args)
    recipe = _quant_recipe(args)
    quant = None
    if edge is not None:
        settings = _onnx_settings(args, default_opset=18)
        edge.check(settings)
    elif recipe is not None:
        from jev4.export.onnx_qdq import QuantSettings

        quant = QuantSettings(recipe=recipe, calib_data=args.calib_data, calib_size=args.calib_size)
        settings = _onnx_settings(args, default_opset=19)
    elif args.format == "gguf" or args.gguf_type is not None:
        settings = _gguf_settings(args)
    elif args.format == "onnx":
        settings = _onnx_settings(args, default_opset=18)
    else:
        settings = _merge_settings(args)
    codec_settings = output_codec_settings(args)
    from jev4.model.checkpoint import resolve_model_dir
    from jev4.model.config import load_config

    if args.format == "gguf":
        from jev4.runtime import inspect

        inspect(args.model).config.check_task(args.adapter)  # a checkpoint or a --text-only export
    else:
        load_config(resolve_model_dir(args.model)).check_task(args.adapter)  # before the calibration loads the model
    sources = (args.model, args.adapter_dir, args.calib_data, args.output_calib_data)
    with claim_output(args.out, args.force, sources):
        output_codec = _calibrate_output_codec(args, codec_settings)
        out = _run_export(args, recipe, settings, quant, output_codec, edge)
    log.info("artifact written: %s", out)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(export, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
