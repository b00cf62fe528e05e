"""``jev4 encode --corpus``: a whole corpus into Parquet shards (``jev4.encode``), in this process or on Ray.

``--text``/``--image`` (a few inputs into one .npz) stays in
``jev4.cli.main._encode``; that handler hands over here when ``--corpus`` or
one of the corpus-only flags is given.
"""

from __future__ import annotations

import argparse
import logging

from jev4.errors import SettingsError

log = logging.getLogger("jev4")

CORPUS_ONLY = (("ray", "--ray"), ("workers", "--workers"), ("gpus_per_worker", "--gpus-per-worker"), ("output_precision", "--output-precision"), ("shard_size", "--shard-size"))


def wants_corpus(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a corpus encode (``--corpus``, or a flag that only makes sense with one)."""
    return getattr(args, "corpus", None) is not None or any(getattr(args, name, None) is not None for name, _ in CORPUS_ONLY)


def settings_from_args(args: argparse.Namespace):
    """The settings of a corpus encode, every conflict named before the corpus is read or a model loads."""
    from jev4.encode.settings import CorpusEncodeSettings

    if args.corpus is None:
        given = [flag for name, flag in CORPUS_ONLY if getattr(args, name, None) is not None]
        raise SettingsError(f"{', '.join(given)} apply with --corpus only")
    if args.text or args.image:
        raise SettingsError("jev4 encode: give --corpus, or --text/--image, not both")
    if args.ray is None and (args.workers is not None or args.gpus_per_worker is not None):
        raise SettingsError("--workers and --gpus-per-worker apply with --ray only")
    return CorpusEncodeSettings(
        model=args.model,
        corpus=args.corpus,
        out=args.out,
        task=args.task,
        prompt=args.prompt or "passage",
        truncate_dim=args.truncate_dim,
        multivector=args.multivector,
        output_precision=args.output_precision,
        max_length=args.max_length if args.max_length is not None else CorpusEncodeSettings.max_length,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        provider=args.provider,
        threads=getattr(args, "threads", None),
        ray=args.ray,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        force=args.force,
        progress=not getattr(args, "no_progress", False),
    )


def run_encode_corpus(args: argparse.Namespace) -> int:
    from jev4.encode.job import encode_corpus

    out = encode_corpus(settings_from_args(args))
    print(out)
    return 0
