"""Inputs for jina-clip-v2: tokenised texts (query prefix, XLM-R tokenizer) and normalised square images.

Images follow upstream's eval transform (jina-ai/openclip ``src/open_clip/
transform.py``, ``image_transform`` with ``resize_mode='shortest'``):
``Resize(image_size, BICUBIC)`` on the shortest edge, ``CenterCrop(image_size)``,
RGB, ``ToTensor`` (to [0, 1]), ``Normalize`` with OpenAI CLIP's mean and std
(``constants.py`` ``OPENAI_DATASET_MEAN``/``STD``). That runs torchvision on a
PIL image, i.e. PIL's bicubic resize; here it is torch alone (torchvision does
not install beside jev4's CPU torch): ``interpolate(mode="bicubic",
antialias=True)`` on a uint8 tensor, whose CPU kernel keeps uint8 between its
passes as PIL does (see ``jev4/model/image_resize.py``). The output size is
torchvision's ``_compute_resized_output_size`` (long side truncated, not
rounded) and the crop offset torchvision's ``center_crop`` (``int(round(...))``).
One known difference: upstream resizes before converting to RGB, which only
matters for images with an alpha channel (PIL resizes RGBA premultiplied);
``load_image`` flattens to 8-bit RGB first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jev4.errors import CheckpointError, EncodeError
from jev4.families.jina_clip_v2.config import ClipV2Config
from jev4.families.jina_clip_v2.network import text_attention_mask

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_LENGTH",
    "QUERY_PREFIX",
    "TOKENIZER_NAME",
    "ImagePreprocessor",
    "TextPreprocessor",
    "text_prefix",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The instruction for the always-on "retrieval.query" adaptation; documents get none (shared/CLIP_V2.md).
QUERY_PREFIX = "Represent the query for retrieving evidence documents: "
PROMPTS = {"query": QUERY_PREFIX, "passage": ""}
DEFAULT_MAX_LENGTH = 512  # upstream's tokenizer default (8192 supported): shared/CLIP_V2.md
TOKENIZER_NAME = "tokenizer.json"


def text_prefix(prompt_name: str | None) -> str:
    """The prefix for ``prompt_name``: ``query`` gets the instruction, ``passage`` and None get nothing."""
    if prompt_name is None:
        return ""
    if prompt_name not in PROMPTS:
        raise EncodeError(f"prompt_name={prompt_name!r} is unknown; jina-clip-v2 has {sorted(PROMPTS)} (or None)")
    return PROMPTS[prompt_name]


@dataclass(frozen=True)
class TextBatch:
    """One padded batch: ``input_ids`` and ``attention_mask`` (1 where ``input_ids != pad``), both ``[B, T]`` int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class TextPreprocessor:
    """The checkpoint's ``tokenizer.json`` (XLM-RoBERTa: ``<s> text </s>``, right padding with the pad id)."""

    def __init__(self, tokenizer, pad_token_id: int):
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: ClipV2Config) -> TextPreprocessor:
        """Load ``tokenizer.json`` with the tokenizers library and check it against config.json's vocabulary and pad id."""
        from tokenizers import Tokenizer

        path = Path(model_dir) / TOKENIZER_NAME
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (jina-clip-v2 ships its XLM-RoBERTa tokenizer as tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
            raise CheckpointError(f"{path}: not a readable tokenizer ({exc})") from exc
        text = config.text
        if tokenizer.get_vocab_size() > text.vocab_size:
            raise CheckpointError(f"{path}: has {tokenizer.get_vocab_size()} tokens, more than config.json's vocab_size {text.vocab_size}")
        pad = tokenizer.id_to_token(text.pad_token_id)
        if pad is None:
            raise CheckpointError(f"{path}: has no token with config.json's pad_token_id {text.pad_token_id}")
        tokenizer.no_truncation()
        tokenizer.enable_padding(direction="right", pad_id=text.pad_token_id, pad_token=pad)
        return cls(tokenizer, text.pad_token_id)

    def __call__(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> TextBatch:
        """Tokenise, truncate to ``max_length`` tokens (specials included), pad to the longest."""
        self.tokenizer.enable_truncation(max_length)
        encodings = self.tokenizer.encode_batch(list(texts))
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        return TextBatch(input_ids, text_attention_mask(input_ids, self.pad_token_id))


@dataclass(frozen=True)
class ImagePreprocessor:
    """Shortest-edge bicubic resize to ``size``, centre crop, [0, 1], CLIP mean/std (see the module doc)."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) with the short side ``size`` and the long side ``int(size * long / short)``."""
        short, long = min(height, width), max(height, width)
        if short == self.size:
            return height, width
        new_long = int(self.size * long / short)
        return (self.size, new_long) if height <= width else (new_long, self.size)

    def resize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, H, W]`` -> uint8 ``[3, h, w]`` (``resized_shape``), bicubic with antialiasing."""
        height, width = self.resized_shape(*pixels.shape[-2:])
        if (height, width) == tuple(pixels.shape[-2:]):
            return pixels
        return F.interpolate(pixels[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]

    def center_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """The central ``size x size`` window; offsets ``int(round((H - size) / 2))`` as torchvision."""
        height, width = pixels.shape[-2:]
        top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
        return pixels[:, top : top + self.size, left : left + self.size]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 ``(v / 255 - mean) / std`` per channel."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels.to(torch.float32) / 255.0 - mean) / std

    def one(self, image: Image.Image) -> torch.Tensor:
        """An 8-bit RGB PIL image -> ``[3, size, size]`` float32."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        return self.normalize(self.center_crop(self.resize(pixels)))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, size, size]`` float32."""
        return torch.stack([self.one(image) for image in images])
