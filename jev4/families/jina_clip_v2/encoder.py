"""The torch reference encoder for jina-clip-v2: ``encode_text`` / ``encode_image``.

The same spirit as ``jev4.model.encoder`` (same argument names, inputs
checked before any work, NaN/inf named by its input), but only what
jina-clip-v2 has: no tasks (its one LoRA is merged at load), no
multi-vectors. Output: truncate to the Matryoshka dim first, then
L2-normalise (shared/CLIP_V2.md), float32 on the CPU.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from jev4.errors import EncodeError
from jev4.families.jina_clip_v2.checkpoint import read_checkpoint
from jev4.families.jina_clip_v2.config import ClipV2Config, load_config
from jev4.families.jina_clip_v2.network import ClipV2TextTower, EvaVisionTower
from jev4.families.jina_clip_v2.preprocess import DEFAULT_MAX_LENGTH, ImagePreprocessor, TextPreprocessor, text_prefix
from jev4.model.encoder import check_texts, describe_image, describe_text
from jev4.model.network import parse_dtype
from jev4.model.preprocess import load_image

log = logging.getLogger(__name__)

__all__ = ["ClipV2Encoder"]

ImageInput = Image.Image | str | Path


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise EncodeError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _as_list(value: object, what: str, single: tuple[type, ...]) -> list:
    if isinstance(value, single):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise EncodeError(f"{what} must be one item or a list/tuple of them, got {type(value).__name__}")


class ClipV2Encoder:
    """Both towers in one dtype on one device, with their preprocessors."""

    def __init__(
        self,
        config: ClipV2Config,
        text_tower: ClipV2TextTower,
        vision_tower: EvaVisionTower,
        text_preprocessor: TextPreprocessor,
        image_preprocessor: ImagePreprocessor,
        device: torch.device | str = "cpu",
    ):
        self.config = config
        self.text_tower = text_tower
        self.vision_tower = vision_tower
        self.text_preprocessor = text_preprocessor
        self.image_preprocessor = image_preprocessor
        self.device = torch.device(device)
        self.dtype = vision_tower.cls_token.dtype

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu") -> ClipV2Encoder:
        """Read config.json, model.safetensors (LoRA merged in fp32) and tokenizer.json from a local directory."""
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        weights = read_checkpoint(model_dir, config)
        torch_dtype = parse_dtype(dtype)
        text = ClipV2TextTower(config.text)
        text.load_converted(weights.text)
        vision = EvaVisionTower(config.vision)
        vision.load_state_dict(weights.vision, strict=True)
        text.to(device=device, dtype=torch_dtype).eval()
        vision.to(device=device, dtype=torch_dtype).eval()
        vision.rope_cos, vision.rope_sin = vision.rope_cos.float(), vision.rope_sin.float()  # tables stay fp32, cast at use
        log.info("loaded jina-clip-v2 %s (%s on %s)", model_dir, dtype, device)
        return cls(
            config, text, vision, TextPreprocessor.from_dir(model_dir, config), ImagePreprocessor(config.vision.image_size), device
        )

    def _finish(self, vectors: torch.Tensor, truncate_dim: int | None, describe: Callable[[int], str], offset: int) -> torch.Tensor:
        """Check finiteness (naming the input), truncate, then L2-normalise."""
        vectors = vectors.float().cpu()
        bad = (~torch.isfinite(vectors).all(dim=-1)).nonzero().flatten().tolist()
        if bad:
            raise EncodeError(f"{describe(offset + bad[0])}: the model produced a non-finite vector (NaN or inf)")
        if truncate_dim is not None:
            vectors = vectors[:, :truncate_dim]
        return F.normalize(vectors, p=2, dim=-1)

    def _truncate_dim(self, truncate_dim: object) -> int | None:
        return self.config.check_truncate_dim(truncate_dim if truncate_dim is not None else self.config.truncate_dim)

    @torch.inference_mode()
    def encode_text(
        self,
        texts: str | Sequence[str],
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        batch_size: int = 8,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> torch.Tensor:
        """Embed texts: ``[N, dim]`` unit vectors. ``prompt_name="query"`` adds the query instruction; documents use None or "passage"."""
        items = _as_list(texts, "texts", (str,))
        dim = self._truncate_dim(truncate_dim)
        batch_size, max_length = _check_positive_int("batch_size", batch_size), _check_positive_int("max_length", max_length)
        check_texts(items)
        prefix = text_prefix(prompt_name)
        outputs = []
        for start in range(0, len(items), batch_size):
            batch = self.text_preprocessor([prefix + t for t in items[start : start + batch_size]], max_length)
            pooled = self.text_tower(batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
            outputs.append(self._finish(pooled, dim, lambda i: describe_text(i, items[i]), start))
        return torch.cat(outputs) if outputs else torch.empty(0, dim or self.config.hidden_size)

    @torch.inference_mode()
    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        truncate_dim: int | None = None,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Embed images (PIL images or paths): ``[N, dim]`` unit vectors of the CLS token."""
        items = _as_list(images, "images", (Image.Image, str, Path))
        dim = self._truncate_dim(truncate_dim)
        batch_size = _check_positive_int("batch_size", batch_size)
        loaded = [load_image(item, index) for index, item in enumerate(items)]
        outputs = []
        for start in range(0, len(loaded), batch_size):
            pixels = self.image_preprocessor(loaded[start : start + batch_size]).to(self.device, self.dtype)
            outputs.append(self._finish(self.vision_tower(pixels), dim, lambda i: describe_image(i, items[i]), start))
        return torch.cat(outputs) if outputs else torch.empty(0, dim or self.config.hidden_size)
