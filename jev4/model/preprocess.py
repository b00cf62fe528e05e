"""Turning texts and images into model inputs, shared by every backend.

Prompts, the image chat template, tokenisation, the Qwen2.5-VL image
processor, pooling masks and 3-D M-RoPE position ids are computed here once,
so that the torch reference and any exported graph see identical inputs.

Images are first read as a viewer shows them (``jev4.model.images``: any PIL
mode to 8-bit RGB, EXIF orientation, alpha on white, size limits), then go
through one of two image processor backends, chosen by ``image_backend``:

- ``"torch"`` (the default): ``jev4.model.image_resize``, transformers'
  torchvision ("fast") Qwen2-VL processor reproduced with torch ops. Upstream
  loads the fast processor (``use_fast=True``), so this is upstream's
  preprocessing; a fixture from the real one pins it to within 1e-6.
  torchvision itself does not install beside the CPU torch jev4 uses.
- ``"pil"``: transformers' ``Qwen2VLImageProcessorPil``, jev4's processor
  before the torch one. It resizes with PIL's bicubic filter, which differs
  from the fast processor's at a few pixels by one or two 8-bit levels (on
  the fixture: at most 2), so its image embeddings are close to upstream's,
  not equal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

from jev4.errors import CheckpointError, EncodeError
from jev4.model.config import JinaV4Config
from jev4.model.image_resize import TorchImageProcessor
from jev4.model.images import decode_image

log = logging.getLogger(__name__)

PREFIXES = {"query": "Query: ", "passage": "Passage: "}
DEFAULT_PROMPT = "query"
# Upstream's documented rule: text-matching is symmetric and always uses the query prefix.
QUERY_ONLY_TASKS = ("text-matching",)
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
IMAGE_PAD = "<|image_pad|>"
DEFAULT_MAX_LENGTH = 32768
ImageBackend = Literal["torch", "pil"]
IMAGE_BACKENDS: tuple[str, ...] = get_args(ImageBackend)
DEFAULT_IMAGE_BACKEND: ImageBackend = "torch"


def text_prefix(task: str, prompt_name: str | None) -> str:
    """The prefix upstream documents: ``Query: `` / ``Passage: ``; text-matching always ``Query: ``.

    Upstream's code reads the prefix from the model's ``task`` attribute
    instead of the ``task=`` argument, so ``task='text-matching',
    prompt_name='passage'`` gets ``Passage: `` there; jev4 follows the
    documented rule.
    """
    name = DEFAULT_PROMPT if prompt_name is None else prompt_name
    if name not in PREFIXES:
        raise EncodeError(f"unknown prompt_name {prompt_name!r}; choose one of {sorted(PREFIXES)}")
    if task in QUERY_ONLY_TASKS:
        name = "query"
    return PREFIXES[name]


@dataclass
class ModelInputs:
    """One padded batch, as every backend consumes it.

    ``pooling_mask`` marks the tokens the single vector averages over: all
    valid tokens for text, the ``<|vision_start|>``..``<|vision_end|>`` span
    for images. ``position_ids`` are the 3-D M-RoPE ids, shape [3, B, T].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pooling_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    lengths: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])


def missing_tokenizer_files(model_dir: Path) -> list[str]:
    """The tokenizer files ``model_dir`` lacks; empty when it can build a tokenizer.

    ``Qwen2Tokenizer`` needs ``tokenizer.json``, or else both ``vocab.json``
    and ``merges.txt``. Given neither, transformers 5 does not fail: it builds
    an empty BPE that encodes every text to zero tokens, and the first sign of
    it is a reshape error deep inside attention. So the files are checked here.
    """
    directory = Path(model_dir)
    if (directory / "tokenizer.json").is_file():
        return []
    pair = ("vocab.json", "merges.txt")
    if all((directory / name).is_file() for name in pair):
        return []
    return [name for name in ("tokenizer.json", *pair) if not (directory / name).is_file()]


def load_tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer, right-padded; no remote code.

    jina-embeddings-v4 ships a ``Qwen2Tokenizer``; naming the class directly
    (not AutoTokenizer) keeps transformers from parsing config.json again.
    Raises ``CheckpointError`` when the directory has no tokenizer files
    (see ``missing_tokenizer_files``) instead of returning an empty tokenizer.
    """
    from transformers import Qwen2Tokenizer

    directory = Path(model_dir)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory, expected a checkpoint directory with tokenizer files")
    missing = missing_tokenizer_files(directory)
    if missing:
        raise CheckpointError(
            f"{directory}: no tokenizer files (missing {', '.join(missing)}; need tokenizer.json, or vocab.json and merges.txt, "
            "plus tokenizer_config.json for the special tokens). Copy them from the upstream checkpoint "
            "(huggingface-cli download jinaai/jina-embeddings-v4 tokenizer.json tokenizer_config.json vocab.json merges.txt "
            f"--local-dir {directory}), or rewrite a random checkpoint with python -m jev4.bench.write_full_size, which writes them"
        )
    tokenizer = Qwen2Tokenizer.from_pretrained(str(directory))
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        raise EncodeError(f"{model_dir}: the tokenizer has no pad token")
    return tokenizer


def load_image_processor(model_dir: Path, backend: ImageBackend = DEFAULT_IMAGE_BACKEND):
    """The Qwen2-VL image processor from ``preprocessor_config.json``, or None without one (see module doc).

    ``backend`` "torch" (default) is upstream's fast processor reproduced in
    torch; "pil" is transformers' PIL processor.
    """
    if backend not in IMAGE_BACKENDS:
        raise EncodeError(f"unknown image_backend {backend!r}; choose one of {list(IMAGE_BACKENDS)}")
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return None
    if backend == "torch":
        return TorchImageProcessor.from_pretrained(model_dir)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """For text the three M-RoPE sections share one id: ``cumsum(mask) - 1``, shape [3, B, T]."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos.unsqueeze(0).expand(3, -1, -1).contiguous()


def mrope_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
) -> torch.Tensor:
    """3-D M-RoPE ids for text with images, as Qwen2.5-VL's ``get_rope_index`` computes them.

    Text tokens advance all three sections together; the ``t*h*w`` image
    tokens of one image get (t, row, col) offsets from the position where the
    image starts; the text after an image resumes at the largest id + 1.
    Padding positions get 0 (they are masked everywhere).
    """
    batch, length = input_ids.shape
    ids = input_ids.cpu().numpy()
    mask = attention_mask.cpu().numpy().astype(bool)
    grids = [] if image_grid_thw is None else image_grid_thw.cpu().tolist()
    out = np.zeros((3, batch, length), dtype=np.int64)
    next_image = 0
    for row in range(batch):
        valid = np.flatnonzero(mask[row])
        tokens = ids[row, valid]
        pos = np.zeros((3, len(tokens)), dtype=np.int64)
        i, start = 0, 0
        while i < len(tokens):
            if tokens[i] != image_token_id:
                pos[:, i] = start
                start += 1
                i += 1
                continue
            if next_image >= len(grids):
                raise EncodeError("more image placeholders in input_ids than images in image_grid_thw")
            t, h, w = grids[next_image]
            next_image += 1
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            count = t * gh * gw
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pos[:, i : i + count] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start
            start = int(pos[:, i : i + count].max()) + 1
            i += count
        out[:, row, valid] = pos
    if next_image != len(grids):
        raise EncodeError(f"{len(grids)} images but {next_image} image placeholders in input_ids")
    return torch.from_numpy(out)


class Preprocessor:
    """Builds ``ModelInputs`` for texts and images from one checkpoint's tokenizer and image processor."""

    def __init__(self, config: JinaV4Config, tokenizer, image_processor=None):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        vision = config.vision_config
        self.spatial_merge_size = int(vision.get("spatial_merge_size", 2))

    @classmethod
    def from_dir(cls, model_dir: Path, config: JinaV4Config, image_backend: ImageBackend = DEFAULT_IMAGE_BACKEND) -> Preprocessor:
        return cls(config, load_tokenizer(model_dir), load_image_processor(model_dir, image_backend))

    def token_lengths(self, texts: Sequence[str], max_length: int) -> list[int]:
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def text_inputs(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> ModelInputs:
        """Texts that already carry their prefix."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        mask = enc["attention_mask"]
        return ModelInputs(
            input_ids=enc["input_ids"],
            attention_mask=mask,
            position_ids=text_position_ids(mask),
            pooling_mask=mask.clone(),
            lengths=mask.sum(-1).tolist(),
        )

    def image_inputs(self, images: Sequence[Image.Image], max_pixels: int | None = None) -> ModelInputs:
        """Images in the fixed chat template; one ``<|image_pad|>`` per merged patch.

        Each image is read as a viewer shows it first (``decode_image``: a
        no-op for RGB images without EXIF rotation), whichever backend runs.
        """
        if self.image_processor is None:
            raise EncodeError("this model has no image processor (no preprocessor_config.json; a text-only export?): it cannot encode images")
        kwargs = {}
        if max_pixels is not None:
            size = dict(self.image_processor.size)
            if max_pixels < size.get("shortest_edge", 0):
                raise EncodeError(f"max_pixels={max_pixels} is below the processor's minimum of {size['shortest_edge']} pixels")
            kwargs["size"] = {**size, "longest_edge": int(max_pixels)}
        rgb = [decode_image(image, index=index) for index, image in enumerate(images)]
        processed = self.image_processor(images=rgb, return_tensors="pt", **kwargs)
        grid = processed["image_grid_thw"]
        merge = self.spatial_merge_size**2
        prompts = [IMAGE_PROMPT.replace(IMAGE_PAD, IMAGE_PAD * (int(g.prod()) // merge)) for g in grid]
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        special = self.config.special_tokens
        return ModelInputs(
            input_ids=ids,
            attention_mask=mask,
            position_ids=mrope_position_ids(ids, mask, grid, special.image_token_id, self.spatial_merge_size),
            pooling_mask=vision_span_mask(ids, special.vision_start_token_id, special.vision_end_token_id),
            pixel_values=processed["pixel_values"],
            image_grid_thw=grid,
            lengths=mask.sum(-1).tolist(),
        )


def vision_span_mask(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """1 from ``<|vision_start|>`` to ``<|vision_end|>`` inclusive, per row (as upstream and vLLM pool images)."""
    starts = (input_ids == start_id).long()
    ends = (input_ids == end_id).long()
    if not torch.equal(starts.sum(-1), torch.ones_like(starts.sum(-1))) or not torch.equal(
        ends.sum(-1), torch.ones_like(ends.sum(-1))
    ):
        raise EncodeError("each image row must hold exactly one <|vision_start|> and one <|vision_end|>")
    inside = starts.cumsum(-1) - ends.cumsum(-1) + ends
    return inside.clamp(0, 1).to(torch.long)


def load_image(item: Image.Image | str | Path, index: int | None = None) -> Image.Image:
    """An 8-bit RGB PIL image of a path or an image, as a viewer shows it; bad input is an ``EncodeError`` naming it.

    ``index`` (the input's position) names in-memory images in errors. See
    ``jev4.model.images.decode_image`` (the limits, the per-mode rules).
    """
    return decode_image(item, index=index)
