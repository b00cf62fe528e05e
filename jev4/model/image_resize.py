"""Qwen2-VL's "fast" image processor (transformers' torchvision backend), in plain torch ops.

Upstream loads its image processor with ``use_fast=True``: transformers'
``Qwen2VLImageProcessor`` on the torchvision backend. torchvision does not
install beside the CPU torch jev4 runs on, so this module reproduces that
pipeline with torch alone, step for step (transformers 5.23,
``models/qwen2_vl/image_processing_qwen2_vl.py`` and
``image_processing_backends.py``; torchvision 0.29,
``transforms/v2/functional/_geometry.py`` and ``_misc.py``):

1. The RGB uint8 image as a (3, H, W) tensor.
2. ``smart_resize`` picks (h, w): multiples of patch_size x merge_size (28),
   h * w within [min_pixels, max_pixels], aspect kept as nearly as possible.
3. Resize: torchvision's ``resize`` on a uint8 tensor on the CPU passes it
   straight to ``torch.nn.functional.interpolate(mode="bicubic",
   antialias=True, align_corners=False)`` (``_do_native_uint8_resize_on_cpu``
   is true for bicubic). That uint8 kernel uses fixed-point weights and keeps
   a uint8 image between its horizontal and vertical passes, as PIL does.
   Only off the CPU does torchvision convert to float32, interpolate, clamp
   and round; upstream's processor runs on the CPU, and that float path
   differs from it by up to 15 levels on noisy images. No resize when (h, w)
   is already the size.
4. Rescale and normalise, fused as transformers does it: the mean and std
   become float32 tensors times ``1 / rescale_factor``, then
   ``(float32(image) - mean) / std``, so a value is
   ``(v - 255 * mean) / (255 * std)`` rounded the way that arithmetic rounds.
5. Patches: (grid_h * grid_w, 3 * temporal_patch_size * 14 * 14) per image,
   the image repeated temporal_patch_size times, patches ordered by 2 x 2
   merge group; ``image_grid_thw`` = (1, grid_h, grid_w).

``tests/model/test_image_resize.py`` checks this against a fixture made by
the real processor (``scripts/make_fast_processor_fixture.py``): equal to
within 1e-6 (bit-equal when it was made: torch 2.13 here, 2.14.1 there).
Checkpoint settings come from ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jev4.errors import CheckpointError, EncodeError
from jev4.model.images import MAX_ASPECT_RATIO

__all__ = ["BICUBIC", "Qwen2VLImageSettings", "TorchImageProcessor", "smart_resize"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the "resample" value in preprocessor_config.json


@dataclass(frozen=True)
class Qwen2VLImageSettings:
    """The image processor's settings, as transformers' ``Qwen2VLImageProcessor`` reads ``preprocessor_config.json``.

    Defaults are that class's defaults. ``min_pixels`` / ``max_pixels`` are
    the bounds of the resized image's area (the config's ``size``
    ``shortest_edge`` / ``longest_edge``, overridden by top-level
    ``min_pixels`` / ``max_pixels`` when present, as transformers does).
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise CheckpointError(f"image processor: need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(self.image_std):
            raise CheckpointError(f"image processor: need three means and three non-zero stds, got {self.image_mean} and {self.image_std}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_config(cls, config: Mapping, source: str = "preprocessor_config.json") -> Qwen2VLImageSettings:
        """Settings from a parsed ``preprocessor_config.json``; what this module does not reproduce is refused."""
        if not config.get("do_resize", True):
            raise CheckpointError(f"{source}: do_resize=false is not supported by the torch image backend; use image_backend='pil'")
        if config.get("resample", BICUBIC) != BICUBIC:
            raise CheckpointError(
                f"{source}: resample={config['resample']} but the torch image backend reproduces bicubic ({BICUBIC}) only; "
                "use image_backend='pil'"
            )
        size = dict(config.get("size") or {})
        defaults = cls()
        min_pixels = config.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or defaults.min_pixels
        max_pixels = config.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or defaults.max_pixels
        return cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(config.get("patch_size", defaults.patch_size)),
            temporal_patch_size=int(config.get("temporal_patch_size", defaults.temporal_patch_size)),
            merge_size=int(config.get("merge_size", defaults.merge_size)),
            image_mean=tuple(float(v) for v in config.get("image_mean", defaults.image_mean)),
            image_std=tuple(float(v) for v in config.get("image_std", defaults.image_std)),
            rescale_factor=float(config.get("rescale_factor", defaults.rescale_factor)),
            do_rescale=bool(config.get("do_rescale", True)),
            do_normalize=bool(config.get("do_normalize", True)),
        )

    @classmethod
    def from_file(cls, path: Path) -> Qwen2VLImageSettings:
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable preprocessor config ({exc})") from exc
        return cls.from_config(config, str(path))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, source: str = "image") -> tuple[int, int]:
    """Qwen2-VL's target (height, width), the rule of transformers' ``smart_resize`` (same rounding, same limit).

    Each side rounds to a multiple of ``factor``; if the area is then over
    ``max_pixels`` both sides shrink by sqrt(area / max_pixels) and round
    down (never below ``factor``), if under ``min_pixels`` both grow and round
    up. An aspect ratio over 200 is refused, as upstream refuses it, but as an
    ``EncodeError`` naming ``source``.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise EncodeError(
            f"{source}: aspect ratio {ratio:g} ({width}x{height} pixels) is over the limit of {MAX_ASPECT_RATIO:g} "
            "(Qwen2-VL's smart_resize refuses over 200); crop or pad the image"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class TorchImageProcessor:
    """The fast Qwen2-VL image processor without torchvision; called like transformers' (see ``__call__``).

    ``size`` mirrors transformers' attribute ({"shortest_edge": min_pixels,
    "longest_edge": max_pixels}) so that callers can override the pixel
    bounds per call the same way on either backend.
    """

    backend = "torch"

    def __init__(self, settings: Qwen2VLImageSettings):
        self.settings = settings
        # transformers' fused rescale + normalise: float32 tensors, scaled by 1 / rescale_factor in float32.
        mean = torch.tensor(settings.image_mean)
        std = torch.tensor(settings.image_std)
        if settings.do_rescale and settings.do_normalize:
            mean, std = mean * (1.0 / settings.rescale_factor), std * (1.0 / settings.rescale_factor)
        self._mean = mean.view(-1, 1, 1)
        self._std = std.view(-1, 1, 1)

    @classmethod
    def from_pretrained(cls, model_dir: Path) -> TorchImageProcessor:
        return cls(Qwen2VLImageSettings.from_file(Path(model_dir) / "preprocessor_config.json"))

    @property
    def size(self) -> dict[str, int]:
        return {"shortest_edge": self.settings.min_pixels, "longest_edge": self.settings.max_pixels}

    def __call__(
        self,
        images: Sequence[Image.Image | np.ndarray],
        size: Mapping[str, int] | None = None,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        """``pixel_values`` [sum of patches, 3 * t * p * p] float32 and ``image_grid_thw`` [n, 3] int64.

        ``images``: RGB PIL images or uint8 (H, W, 3) arrays, already decoded
        (``jev4.model.images.decode_image``). ``size`` overrides the pixel
        bounds, transformers' way.
        """
        if return_tensors != "pt":
            raise EncodeError(f"the torch image processor returns torch tensors only (return_tensors='pt'), got {return_tensors!r}")
        bounds = {**self.size, **(size or {})}
        patches, grids = [], []
        for index, image in enumerate(images):
            pixels = self.to_tensor(image, index)
            height, width = smart_resize(
                pixels.shape[-2], pixels.shape[-1], self.settings.factor, bounds["shortest_edge"], bounds["longest_edge"], f"image {index}"
            )
            flat, grid_h, grid_w = self.patchify(self.normalize(self.resize(pixels, height, width)))
            patches.append(flat)
            grids.append([1, grid_h, grid_w])
        if not patches:
            raise EncodeError("no images to process")
        return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    @staticmethod
    def to_tensor(image: Image.Image | np.ndarray, index: int = 0) -> torch.Tensor:
        """(3, H, W) uint8, contiguous, from an RGB PIL image or a uint8 (H, W, 3) array."""
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                raise EncodeError(f"image {index}: mode {image.mode!r}, expected RGB (decode it with jev4.model.images.decode_image)")
            array = np.array(image)
        else:
            array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise EncodeError(f"image {index}: expected uint8 (H, W, 3), got {array.dtype} {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()

    @staticmethod
    def resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """torchvision's CPU bicubic resize of a uint8 tensor: native uint8 interpolate, antialiased (module doc)."""
        if tuple(pixels.shape[-2:]) == (height, width):
            return pixels
        out = torch.nn.functional.interpolate(
            pixels.unsqueeze(0), size=[height, width], mode="bicubic", align_corners=False, antialias=True
        )
        return out[0]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """transformers' ``rescale_and_normalize`` with its fused arithmetic (module doc)."""
        settings = self.settings
        image = pixels.to(torch.float32)
        if settings.do_normalize:
            return image.sub_(self._mean).div_(self._std)
        if settings.do_rescale:
            return image * settings.rescale_factor
        return pixels  # neither: transformers hands on the uint8 values

    def patchify(self, image: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(C, H, W) -> (grid_h * grid_w, C * t * p * p), patches grouped by merge block, as transformers orders them."""
        s = self.settings
        channels, height, width = image.shape
        p, m, t = s.patch_size, s.merge_size, s.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        patches = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        # [grid_h/m, grid_w/m, m, m, channel, patch, patch], then the frame repeated t times after the channel
        patches = patches.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
        return patches.reshape(grid_h * grid_w, channels * t * p * p), grid_h, grid_w
