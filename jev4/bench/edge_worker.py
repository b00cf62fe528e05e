"""Child-process entry of ``jev4 bench edge``: load one artifact, time encodes at each batch x length, save the last batch's vectors.

Run in its own process so that its peak RSS (read by the parent through
``wait4``) is this format's alone. Every text is longer than the measured
length and cut to it (``max_length``), so a batch is exactly batch x length
tokens, the prompt included.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np

import jev4.runtime as rt

log = logging.getLogger("jev4.bench.edge_worker")


def _texts(batch: int, length: int) -> list[str]:
    words = "the llama is a domesticated south american camelid widely used as a meat and pack animal by andean cultures since".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(2 * length)) for i in range(batch)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--shapes", required=True, help="BxT,BxT,...")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--report", required=True)
    parser.add_argument("--vectors", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    encoder = rt.load(args.artifact, dtype=args.dtype)
    load_s = time.perf_counter() - started
    task = encoder.tasks[0]
    speeds, last = {}, None
    for shape in args.shapes.split(","):
        batch, length = (int(v) for v in shape.split("x"))
        texts = _texts(batch, length)
        run = dict(task=task, prompt_name="passage", max_length=length, batch_size=batch, progress=False)
        last = encoder.encode_text(texts, **run)  # warm-up (and the vectors compared across formats)
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            encoder.encode_text(texts, **run)
            seconds.append(time.perf_counter() - t0)
        speeds[shape] = batch * length / statistics.median(seconds)
        log.info("%s %s: %.1f tokens/s", args.artifact, shape, speeds[shape])
    np.save(args.vectors, np.asarray(last, dtype=np.float32))
    with open(args.report, "w") as handle:
        json.dump({"load_s": load_s, "tokens_per_s": speeds}, handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
