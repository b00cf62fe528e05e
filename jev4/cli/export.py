"""``jev4-export``: build a deployable artifact from a jina-embeddings-v4 checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys

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
    parser.add_argument("--format", choices=["hf"], default="hf", help="hf: merged safetensors checkpoint")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="storage dtype of the merged weights (default: the source's)")
    parser.add_argument("--text-only", action="store_true", help="drop the vision tower; write a standard Qwen2 + sentence-transformers checkpoint")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def export(args: argparse.Namespace) -> int:
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
    out = merge_checkpoint(settings, progress=not args.no_progress)
    log.info("artifact written: %s", out)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(export, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
