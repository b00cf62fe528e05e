"""What every jev4 command shares: logging setup and turning jev4 errors into exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from jev4.errors import Jev4Error

log = logging.getLogger("jev4")

EXIT_BAD_INPUT = 2


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # transformers and huggingface_hub are chatty about things jev4 already handles.
    for name in ("transformers", "huggingface_hub", "sentence_transformers", "onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; a ``Jev4Error`` (bad input) becomes one clear line and exit code 2."""
    setup_logging(getattr(args, "verbose", False))
    try:
        return handler(args)
    except Jev4Error as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
