"""The reference for jev4's torch image backend: what transformers' real fast Qwen2-VL processor outputs.

Upstream loads its image processor with ``use_fast=True`` (transformers'
torchvision backend); ``jev4.model.image_resize`` reproduces it without
torchvision. This script runs the real one on a fixed set of images and
writes ``tests/model/data/fast_processor_reference.npz``, which
``tests/model/test_image_resize.py`` compares jev4's output against.

torchvision does not import beside jev4's torch, so run it in an environment
of its own (torch 2.14.1 and torchvision 0.29.1 install together):

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 pillow numpy
    .venv/bin/jev4 make-tiny /tmp/tiny
    /tmp/tvenv/bin/python scripts/make_fast_processor_fixture.py --model /tmp/tiny \\
        --out tests/model/data/fast_processor_reference.npz

Images are generated here, deterministically, in many sizes (below
min_pixels, odd, non-multiples of 28, already a multiple, aspect ratios up to
the limit of 200, over a max_pixels given per call) and PIL modes, then
decoded by ``jev4.model.images.decode_image`` (only numpy and PIL needed): the
fixture stores the decoded RGB input, so the test exercises resize, normalise
and patching alone. The npz holds, per case i: ``input_i`` (uint8 H x W x 3),
``pixel_values_i`` (float32), ``grid_i`` (int64), ``max_pixels_i`` (0: the
checkpoint's); one batched call (``batch_*``); and ``meta`` (JSON: case names,
library versions, the preprocessor_config.json used).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# jev4 is not installed in the torchvision venv: import its (numpy and PIL only) image decoder from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jev4.model.images import decode_image

log = logging.getLogger("make_fast_processor_fixture")


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[np.random.RandomState], Image.Image]
    max_pixels: int | None = None  # the per-call override Preprocessor.image_inputs passes; None: the checkpoint's


def noise_rgb(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """Smooth gradients plus noise: both what resizing blurs and what it aliases."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) * 255 / max(height + width - 2, 1)], -1)
    return np.clip(base + rng.randint(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)


def rgb(height: int, width: int) -> Callable[[np.random.RandomState], Image.Image]:
    return lambda rng: Image.fromarray(noise_rgb(rng, height, width))


def gray(height: int, width: int) -> Callable[[np.random.RandomState], Image.Image]:
    return lambda rng: Image.fromarray(noise_rgb(rng, height, width)[..., 0])


def rgba(rng: np.random.RandomState) -> Image.Image:
    pixels = noise_rgb(rng, 100, 45)
    alpha = np.tile(np.linspace(0, 255, 45).astype(np.uint8), (100, 1))
    return Image.fromarray(np.dstack([pixels, alpha]))  # RGBA


def palette_transparent(rng: np.random.RandomState) -> Image.Image:
    img = Image.fromarray(noise_rgb(rng, 50, 80)).quantize(colors=16, dither=Image.Dither.NONE)
    img.info["transparency"] = 3
    return img


def sixteen_bit(rng: np.random.RandomState) -> Image.Image:
    x = np.mgrid[0:70, 0:70][1]
    values = (x * 65535 // 69 + rng.randint(0, 300, (70, 70))).clip(0, 65535).astype(np.uint16)
    return Image.fromarray(values)  # mode I;16


def la(rng: np.random.RandomState) -> Image.Image:
    pixels = noise_rgb(rng, 45, 45)
    return Image.fromarray(np.dstack([pixels[..., 1], pixels[..., 0]]))  # LA


def cmyk(rng: np.random.RandomState) -> Image.Image:
    return Image.fromarray(noise_rgb(rng, 48, 64)).convert("CMYK")


def bilevel(rng: np.random.RandomState) -> Image.Image:
    return Image.fromarray(noise_rgb(rng, 33, 29)[..., 0]).convert("1")


def float_image(rng: np.random.RandomState) -> Image.Image:
    return Image.fromarray(noise_rgb(rng, 40, 60)[..., 2].astype(np.float32) / 255.0)  # F


CASES = [
    Case("rgb_28x28_upscaled_to_min_pixels", rgb(28, 28)),
    Case("rgb_37x53_odd", rgb(37, 53)),
    Case("rgb_56x84_no_resize", rgb(56, 84)),
    Case("l_61x90", gray(61, 90)),
    Case("rgba_100x45", rgba),
    Case("p_transparency_50x80", palette_transparent),
    Case("i16_70x70_round_half_even", sixteen_bit),
    Case("la_45x45", la),
    Case("cmyk_48x64", cmyk),
    Case("bilevel_33x29", bilevel),
    Case("float_40x60", float_image),
    Case("rgb_8x160_wide", rgb(8, 160)),
    Case("l_100x5_tall", gray(100, 5)),
    Case("rgb_2x400_aspect_200", rgb(2, 400)),
    Case("rgb_100x75_over_max_pixels", rgb(100, 75), max_pixels=56 * 56 * 3 // 2),
]
# One call with several images: two of one shape (transformers resizes them stacked) and one other.
BATCH = (rgb(28, 28), rgb(28, 28), rgb(37, 53))


def versions() -> dict[str, str]:
    import PIL
    import torch
    import torchvision
    import transformers

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def load_fast_processor(model_dir: Path):
    """The processor upstream loads: AutoImageProcessor with use_fast=True, the torchvision backend.

    transformers 5.23 warns that ``use_fast`` is deprecated (its new spelling
    is ``backend="torchvision"``); upstream's spelling is kept on purpose.
    """
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(model_dir), use_fast=True)
    if getattr(processor, "backend", None) != "torchvision":
        raise SystemExit(f"expected transformers' torchvision image processor, got {type(processor).__name__} ({processor.backend})")
    return processor


def run(processor, images: list[Image.Image], max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    kwargs = {} if max_pixels is None else {"size": {**dict(processor.size), "longest_edge": max_pixels}}
    out = processor(images=images, return_tensors="pt", **kwargs)
    return out["pixel_values"].numpy().astype(np.float32), out["image_grid_thw"].numpy().astype(np.int64)


def build(model_dir: Path) -> dict[str, np.ndarray]:
    processor = load_fast_processor(model_dir)
    rng = np.random.RandomState(2024)
    arrays: dict[str, np.ndarray] = {}
    for i, case in enumerate(CASES):
        image = decode_image(case.make(rng))
        arrays[f"input_{i}"] = np.array(image)
        arrays[f"pixel_values_{i}"], arrays[f"grid_{i}"] = run(processor, [image], case.max_pixels)
        arrays[f"max_pixels_{i}"] = np.int64(case.max_pixels or 0)
        log.info("%s: grid %s", case.name, arrays[f"grid_{i}"].tolist())
    batch = [decode_image(make(rng)) for make in BATCH]
    for j, image in enumerate(batch):
        arrays[f"batch_input_{j}"] = np.array(image)
    arrays["batch_pixel_values"], arrays["batch_grid"] = run(processor, batch, None)
    meta = {
        "cases": [case.name for case in CASES],
        "batch_size": len(batch),
        "versions": versions(),
        "processor": type(processor).__name__,
        "preprocessor_config": json.loads((model_dir / "preprocessor_config.json").read_text()),
    }
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint dir with preprocessor_config.json (jev4 make-tiny)")
    parser.add_argument("--out", type=Path, default=Path("tests/model/data/fast_processor_reference.npz"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arrays = build(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    patches = sum(v.shape[0] for k, v in arrays.items() if k.startswith(("pixel_values", "batch_pixel_values")))
    log.info("wrote %s: %d patches, %.0f KB", args.out, patches, args.out.stat().st_size / 1024)


if __name__ == "__main__":
    main()
