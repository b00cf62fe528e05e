"""Child-process entries of ``jev4 bench clip``: write the random-weight source checkpoint, or measure one artifact.

Each runs in its own process so that the parent reads a peak RSS (``wait4``)
that is this step's alone, and so that a step that runs out of memory or
crashes is recorded by the parent instead of ending the run.

``write OUT --size full|tiny``: the full size is jina-clip-v2's real shape
(shared/CLIP_V2.md) in the exact upstream layout (``checkpoint.
expected_layout``, the table the reader checks against), bf16 like
upstream, streamed into ``model.safetensors`` one tensor at a time so that
the 0.87B parameters never sit in memory together. The tokenizer is the
tiny writer's XLM-R-style one (XLM-R's sentencepiece model cannot be
shipped or downloaded here): its ids are valid rows of the 250,002-row
table, and the benchmark cuts every text to an exact token count, so speed
does not depend on which tokenizer made the ids.

``measure ARTIFACT``: ``jev4.runtime.load`` (the torch ``ClipV2Encoder`` for
a checkpoint, ``ClipV2OnnxEncoder`` for an ONNX artifact), then per text
shape and for the image batch one warm-up call (whose vectors are saved for
the parent's cosines) and ``--repeats`` timed calls; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import os
import struct
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("jev4.bench.clip_worker")

__all__ = ["bench_images", "bench_texts", "full_size_config", "full_spec", "measure", "stream_safetensors", "write_full_checkpoint"]

# Text sizes that equal jina-embeddings-v3's defaults are left out of the written config.json, as upstream's
# config carries only the LoRA settings in hf_model_config_kwargs (shared/CLIP_V2.md: "the checkpoint does not
# carry these constants: upstream fetches them from jina-embeddings-v3's config").
_V3_SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
FULL_VOCAB = 250002  # XLM-R's vocabulary (shared/CLIP_V2.md)
_SAFETENSORS_DTYPE = "BF16"


def full_spec():
    """jina-clip-v2's real sizes (shared/CLIP_V2.md) as the tiny writer's spec: text 24 x 1024 (16 heads, MLP 4096),
    vision EVA02-L/14 24 x 1024 (head 64) at 512 px, LoRA rank 4 / alpha 4, Matryoshka 32..1024."""
    from jev4.families.jina_clip_v2.tiny import TinyClipSpec

    return TinyClipSpec(
        hidden_size=1024, layers=24, heads=16, intermediate_size=4096, vision_width=1024, vision_layers=24, head_width=64,
        patch_size=14, image_size=512, pt_hw_seq_len=16, lora_rank=4, lora_alpha=4.0, matryoshka_dims=(32, 64, 128, 256, 512, 768, 1024),
    )  # fmt: skip


def full_size_config() -> dict:
    """config.json of the full-size model in upstream's shape (the text sizes left to jina-embeddings-v3's defaults)."""
    from jev4.families.jina_clip_v2.tiny import tiny_config

    raw = tiny_config(full_spec(), FULL_VOCAB)
    kwargs = raw["text_config"]["hf_model_config_kwargs"]
    for key in _V3_SIZE_KEYS:
        del kwargs[key]
    return raw


def _tensor_bytes(tensor) -> bytes:
    """Raw little-endian bytes of a contiguous tensor (bf16 through an int16 view: numpy has no bfloat16)."""
    import torch

    return tensor.reshape(-1).contiguous().view(torch.int16).numpy().tobytes()


def stream_safetensors(path: Path, layout: dict[str, tuple[int, ...]], make_tensor, metadata: dict[str, str]) -> int:
    """Write a bf16 safetensors file tensor by tensor: the header (offsets) first, from ``layout``; returns bytes written.

    The format (8-byte little-endian header length, a JSON header of dtype,
    shape and byte offsets padded with spaces to 8 bytes, then the data) is
    safetensors' documented one; the result is read back with safetensors
    itself by the parent.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, shape in layout.items():
        size = 2 * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": _SAFETENSORS_DTYPE, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key, shape in layout.items():
            data = _tensor_bytes(make_tensor(key, shape))
            if len(data) != header[key]["data_offsets"][1] - header[key]["data_offsets"][0]:  # type: ignore[index]
                raise RuntimeError(f"{key}: generated {len(data)} bytes, the header says otherwise")
            handle.write(data)
    return 8 + len(encoded) + offset


def write_full_checkpoint(out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """The full-size random-weight checkpoint, atomically; values from the tiny writer's ``random_weights`` (one tensor at a time)."""
    from jev4.atomic import atomic_output_dir
    from jev4.families.jina_clip_v2.checkpoint import SAFETENSORS_NAME, expected_layout
    from jev4.families.jina_clip_v2.config import CONFIG_NAME, parse_config
    from jev4.families.jina_clip_v2.tiny import TinyClipSpec, random_weights, train_tokenizer, write_tokenizer

    raw = full_size_config()
    config = parse_config(raw, source="full-size config")  # the reader's checks, and the v3 defaults filled in
    if (config.text.vocab_size, config.text.hidden_size, config.vision.grid) != (FULL_VOCAB, 1024, 36):
        raise RuntimeError(f"the full-size config parsed to vocab {config.text.vocab_size}, hidden {config.text.hidden_size}, grid {config.vision.grid}")
    layout = expected_layout(config)
    keys = list(layout)

    def make_tensor(key: str, shape: tuple[int, ...]):
        return random_weights({key: shape}, seed * 100_003 + keys.index(key))[key]  # a distinct stream per tensor

    out = Path(out)
    with atomic_output_dir(out, force=force) as tmp:
        write_tokenizer(train_tokenizer(TinyClipSpec()), tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        started = time.perf_counter()
        size = stream_safetensors(tmp / SAFETENSORS_NAME, layout, make_tensor, {"format": "pt"})
        log.info("wrote %d tensors, %.2f GB, in %.0f s", len(layout), size / 1e9, time.perf_counter() - started)
    return out


# --------------------------------------------------------------------------- measuring


def bench_texts(batch: int, length: int) -> list[str]:
    """``batch`` distinct texts, each far longer than ``length`` tokens, so that truncation makes every row exactly ``length``."""
    words = "the llama is a domesticated south american camelid widely used as a meat and pack animal by andean cultures since".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(2 * length)) for i in range(batch)]


def bench_images(count: int, size: int = 512, seed: int = 0):
    """``count`` seeded ``size`` x ``size`` RGB images: smooth gradients plus noise (content does not change the speed)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = []
    for i in range(count):
        base = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp[::-1], ramp) / 2, np.full((size, size), 40.0 * i)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def _timed(call, repeats: int) -> tuple[object, list[float], list[float]]:
    """One warm-up call (its result returned), then ``repeats`` timed calls: wall seconds and this process's CPU seconds each.

    The CPU seconds show contention: on a machine shared with other work,
    CPU / (wall x cores) below 1 means the step did not get every core for
    the whole call, so its wall-clock speed is a lower bound.
    """
    first = call()
    seconds, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        call()
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return first, seconds, cpu


def _cpu_share(seconds: list[float], cpu: list[float]) -> float:
    """CPU seconds over wall seconds x available cores, over the timed calls."""
    return sum(cpu) / (sum(seconds) * (len(os.sched_getaffinity(0)) or 1))


def measure(artifact: str, text_shapes: list[tuple[int, int]], image_batch: int, repeats: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Load ``artifact`` and time its text shapes and image batch; returns the report and the warm-up vectors by name."""
    import torch

    import jev4.runtime as rt

    started = time.perf_counter()
    encoder = rt.load(artifact)
    report: dict = {"load_s": time.perf_counter() - started, "engine": type(encoder).__name__, "torch_threads": torch.get_num_threads(), "text": {}, "image": {}}
    if hasattr(encoder, "engine"):
        report["engine"] = encoder.engine()
    vectors: dict[str, np.ndarray] = {}
    for batch, length in text_shapes:
        name = f"{batch}x{length}"
        texts = bench_texts(batch, length)
        tokens = int(encoder.text_preprocessor(texts, length).attention_mask.sum())
        first, seconds, cpu = _timed(lambda: encoder.encode_text(texts, prompt_name="passage", batch_size=batch, max_length=length), repeats)
        median = statistics.median(seconds)
        report["text"][name] = {
            "batch": batch, "length": length, "tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "cpu_share": _cpu_share(seconds, cpu),
            "tokens_per_s": tokens / median, "texts_per_s": batch / median,
        }  # fmt: skip
        vectors[f"text-{name}"] = np.asarray(first, dtype=np.float32)
        log.info("%s text %s: %.1f tokens/s (%d tokens, median of %s s, CPU share %.2f)", artifact, name, tokens / median, tokens, [round(s, 2) for s in seconds], report["text"][name]["cpu_share"])
    images = bench_images(image_batch)
    first, seconds, cpu = _timed(lambda: encoder.encode_image(images, batch_size=image_batch), repeats)
    median = statistics.median(seconds)
    name = f"{image_batch}x512px"
    report["image"][name] = {"batch": image_batch, "pixels": 512, "seconds": seconds, "cpu_seconds": cpu, "cpu_share": _cpu_share(seconds, cpu), "images_per_s": image_batch / median}
    vectors[f"image-{name}"] = np.asarray(first, dtype=np.float32)
    log.info("%s images %s: %.3f images/s (median of %s s, CPU share %.2f)", artifact, name, image_batch / median, [round(s, 2) for s in seconds], report["image"][name]["cpu_share"])
    return report, vectors


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jev4.bench.clip_worker")
    sub = parser.add_subparsers(dest="step", required=True)
    write = sub.add_parser("write")
    write.add_argument("out")
    write.add_argument("--size", choices=["full", "tiny"], default="full")
    run = sub.add_parser("measure")
    run.add_argument("artifact")
    run.add_argument("--text-shapes", required=True, help="BxT,BxT,...")
    run.add_argument("--image-batch", type=int, required=True)
    run.add_argument("--repeats", type=int, default=2)
    run.add_argument("--report", required=True)
    run.add_argument("--vectors", required=True, help=".npz of the warm-up vectors, one array per shape")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.step == "write":
        if args.size == "tiny":
            from jev4.families.jina_clip_v2.tiny import write_tiny_checkpoint

            write_tiny_checkpoint(args.out, seed=0, force=True)
        else:
            write_full_checkpoint(args.out, seed=0, force=True)
        return 0
    report, vectors = measure(args.artifact, _shapes(args.text_shapes), args.image_batch, args.repeats)
    np.savez(args.vectors, **vectors)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

