"""``jev4-export``: build a deployable artifact from a jina-embeddings-v4 checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jev4.cli.common import run_command

log = logging.getLogger("jev4.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jev4-export",
        description="Merge a task adapter into jina-embeddings-v4 and write a deployable artifact.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. jinaai/jina-embeddings-v4)")
    parser.add_argument("--adapter", required=True, help="task adapter to merge: retrieval, text-matching or code")
    parser.add_argument("--adapter-dir", help="a different adapters/ directory (e.g. one tuned by jev4 qat)")
    parser.add_argument("--format", choices=["hf", "onnx"], default="hf", help="hf: merged safetensors checkpoint; onnx: language (+ vision) graphs")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype (hf default: the source's; onnx default: fp32)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (onnx format)")
    parser.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check right after an ONNX export")
    parser.add_argument("--text-only", action="store_true", help="drop the vision tower; write a standard Qwen2 + sentence-transformers checkpoint")
    out = parser.add_argument_group("output embeddings (jev4.quant.embeddings)")
    out.add_argument(
        "--output-precision",
        choices=["float16", "int8", "uint8", "int4", "ternary", "binary", "ubinary"],
        help="record an embedding codec in the artifact (calibrated on the reference); the runtime then returns codes on request",
    )
    out.add_argument("--output-calib-size", type=int, default=1000, help="documents embedded to calibrate the codec's ranges")
    out.add_argument("--output-calib-data", help="text file, one document per line (default: built-in stdlib-code sources)")
    out.add_argument("--output-calib-method", choices=["minmax", "percentile"], default="minmax")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _output_codec(args: argparse.Namespace):
    """Calibrate the output codec on the reference (adapter unmerged, fp32) before the export starts."""
    if args.output_precision is None:
        return None
    from jev4.atomic import check_output_path
    from jev4.model.encoder import TorchEncoder
    from jev4.quant.output_codec import OutputCodecSettings, encode_calibration

    settings = OutputCodecSettings(
        precision=args.output_precision,
        method=args.output_calib_method,
        calib_size=args.output_calib_size,
        calib_data=args.output_calib_data,
    )
    check_output_path(Path(args.out), args.force)  # fail before the (long) calibration, not after
    reference = TorchEncoder.from_pretrained(args.model, adapter_dir=args.adapter_dir, progress=not args.no_progress)
    return encode_calibration(reference, args.adapter, settings, progress=not args.no_progress)


def export(args: argparse.Namespace) -> int:
    output_codec = _output_codec(args)
    if args.format == "onnx":
        from jev4.export.onnx import OnnxExportSettings, export_onnx

        out = export_onnx(
            OnnxExportSettings(
                model=args.model,
                adapter=args.adapter,
                out=args.out,
                dtype=args.dtype or "fp32",
                text_only=args.text_only,
                opset=args.opset,
                adapter_dir=args.adapter_dir,
                validate=not args.no_validate,
                force=args.force,
            ),
            progress=not args.no_progress,
            output_codec=output_codec,
        )
        log.info("artifact written: %s", out)
        print(out)
        return 0
    from jev4.export.merge import MergeSettings, merge_checkpoint

    settings = MergeSettings(
        model=args.model,
        adapter=args.adapter,
        out=args.out,
        dtype=args.dtype,
        text_only=args.text_only,
        adapter_dir=args.adapter_dir,
        force=args.force,
    )
    out = merge_checkpoint(settings, progress=not args.no_progress, output_codec=output_codec)
    log.info("artifact written: %s", out)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(export, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
