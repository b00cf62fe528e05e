"""Calibration: which inputs to run, and the activation ranges they produce at every quantized Linear.

Data (:func:`calibration_items`): the user's file, or a built-in default.

- A text file: one sample per non-empty line.
- A JSONL file (``.jsonl``): one object per line, ``{"text": ...}`` or
  ``{"image": "path"}`` (relative paths are relative to the file).
- Built-in (no file): texts from the ``stdlib-code`` validation set
  (a docstring summary, then its function's source, for pairs spread
  evenly over the set) and, when the vision tower is exported, pages from the
  ``pydoc-pages`` set (one image per eight samples). Both ship with Python,
  so calibration works offline and is deterministic.

Texts are prompted the way the model sees them at run time: alternating
``Query:`` / ``Passage:`` prefixes for the task (``text-matching`` always
``Query:``).

Statistics (:func:`collect_input_absmax`): forward pre-hooks on the named
``nn.Linear`` modules record the per-input-channel maximum of ``|x|`` over
every real token (padding positions are masked out; the mask is taken from
the network's ``attention_mask`` argument by a pre-hook on the root
module). Per-tensor ``amax`` is the max over channels; SmoothQuant needs the
per-channel vector. The forward passes are the caller's ``forward_loop(model)``
(ModelOpt's convention), :func:`make_forward_loop` builds one over items.

Why not ModelOpt (``mtq.quantize(model, FP8_DEFAULT_CFG, forward_loop)``)?
It installs easily (``pip install nvidia-modelopt requests``: 2 MB wheel plus
PuLP, ninja, omegaconf, nvidia-ml-py) and its max calibration on CPU works,
but what jev4 needs from it is only the max-calibrated ``amax`` of each
Linear input, ~40 lines here. Its ONNX path is the part that would matter,
and it does not fit: ModelOpt exports its own fake-quant modules through the
TorchScript exporter and converts weight Q/DQ to DQ-only afterwards, while
jev4's graphs come from the dynamo exporter (dynamic axes, in-graph image
placement, vision side inputs) and need Q/DQ placed per module name. So jev4
calibrates itself and writes the Q/DQ nodes into its own exported graph
(:mod:`jev4.export.onnx_qdq`): no extra dependency, deterministic, CPU-testable,
and the same ``amax`` rule (max over calibration tokens) ModelOpt's default
uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from jev4.datasets.files import read_text_file
from jev4.errors import Jev4Error
from jev4.model.preprocess import Preprocessor, load_image, text_prefix

log = logging.getLogger(__name__)

__all__ = [
    "CalibrationError",
    "CalibrationSet",
    "calibration_items",
    "collect_input_absmax",
    "make_forward_loop",
]

DEFAULT_CALIB_SIZE = 64
DEFAULT_MAX_LENGTH = 512
IMAGE_EVERY = 8  # built-in set: one image per this many samples when images are calibrated too

CalibItem = str | Image.Image


class CalibrationError(Jev4Error):
    """Calibration data that cannot be used (missing file, bad line, no samples, no statistics)."""


@dataclass(frozen=True)
class CalibrationSet:
    """The samples to calibrate on and where they came from (recorded in the manifest)."""

    items: tuple[CalibItem, ...]
    source: str

    @property
    def texts(self) -> int:
        return sum(isinstance(i, str) for i in self.items)

    @property
    def images(self) -> int:
        return len(self.items) - self.texts

    def describe(self) -> dict:
        return {"source": self.source, "samples": len(self.items), "texts": self.texts, "images": self.images}


def _spread(n: int, m: int) -> list[int]:
    """``m`` indices spread evenly over ``range(n)`` (all of them when m >= n)."""
    if m >= n:
        return list(range(n))
    return [i * n // m for i in range(m)]


def builtin_items(size: int, with_images: bool) -> CalibrationSet:
    """The default set: stdlib-code texts (queries and code, alternating), plus pydoc pages when ``with_images``."""
    from jev4.datasets import rendered_pages, stdlib_code_search

    n_images = max(1, size // IMAGE_EVERY) if with_images and size > 1 else 0
    n_texts = size - n_images
    data = stdlib_code_search()
    pairs = _spread(len(data.queries), (n_texts + 1) // 2)  # each chosen pair gives its docstring summary and its code
    texts = [t for p in pairs for t in (data.queries[p], data.documents[_relevant_doc(data, p)])][:n_texts]
    images = list(rendered_pages(max_pages=n_images).documents) if n_images else []
    # Interleave so that every batch of texts meets an image now and then.
    items: list[CalibItem] = []
    step = max(1, len(texts) // max(1, len(images))) if images else len(texts) + 1
    for i, text in enumerate(texts):
        if images and i % step == 0:
            items.append(images.pop(0))
        items.append(text)
    items.extend(images)
    source = "builtin:stdlib-code" + ("+pydoc-pages" if n_images else "")
    return CalibrationSet(tuple(items), source)


def _relevant_doc(data, query: int) -> int:
    """The document judged relevant to ``query`` (stdlib-code has exactly one per query)."""
    return next(iter(data.qrels[query]))


def _load_jsonl(path: Path, text: str) -> list[CalibItem]:
    items: list[CalibItem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not (isinstance(record.get("text"), str) or isinstance(record.get("image"), str)):
            raise CalibrationError(f'{path}:{number}: expected {{"text": "..."}} or {{"image": "path"}}, got {line[:80]!r}')
        if isinstance(record.get("text"), str):
            items.append(record["text"])
        else:
            image = Path(record["image"])
            try:
                items.append(load_image(image if image.is_absolute() else path.parent / image))
            except Jev4Error as exc:
                raise CalibrationError(f"{path}:{number}: {exc}") from exc
    return items


def load_calibration_file(path: str | Path) -> list[CalibItem]:
    """Samples from a text file (one per non-empty line) or a ``.jsonl`` file (text / image records)."""
    path = Path(path)
    jsonl = path.suffix.lower() == ".jsonl"
    encoding = "give one JSON object per line" if jsonl else "give one text per line, or JSONL"
    text = read_text_file(path, str(path), "calibration file", "give a calibration file (one text per line, or JSONL)", CalibrationError, encoding)
    if jsonl:
        items = _load_jsonl(path, text)
    else:
        items = [line for line in text.splitlines() if line.strip()]
    if not items:
        raise CalibrationError(f"{path}: no calibration samples in the file")
    return items


def calibration_items(path: str | Path | None, size: int, with_images: bool) -> CalibrationSet:
    """The user's file (its first ``size`` samples) or the built-in set of ``size`` samples."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CalibrationError(f"--calib-size must be a positive integer, got {size!r}")
    if path is None:
        return builtin_items(size, with_images)
    items = load_calibration_file(path)[:size]
    if not with_images and any(isinstance(i, Image.Image) for i in items):
        raise CalibrationError(f"{path}: holds images, but this export has no vision tower (--text-only); give texts only")
    return CalibrationSet(tuple(items), f"file:{Path(path)}")


def make_forward_loop(
    preprocessor: Preprocessor,
    items: Sequence[CalibItem],
    task: str,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = False,
) -> Callable[[nn.Module], None]:
    """A ``forward_loop(network)`` running ``items`` through a ``JinaEmbeddingsV4`` network in batches.

    Texts get the task's query/passage prefixes (alternating); images the
    fixed image prompt. Texts and images go in separate batches.
    """
    plain = [item for item in items if isinstance(item, str)]
    texts = [text_prefix(task, "query" if k % 2 == 0 else "passage") + text for k, text in enumerate(plain)]
    images = [item for item in items if isinstance(item, Image.Image)]
    builders = [lambda chunk=texts[s : s + batch_size]: preprocessor.text_inputs(chunk, max_length) for s in range(0, len(texts), batch_size)]
    builders += [lambda chunk=images[s : s + batch_size]: preprocessor.image_inputs(chunk) for s in range(0, len(images), batch_size)]

    def forward_loop(network: nn.Module) -> None:
        batches = builders
        if progress:
            from tqdm import tqdm

            batches = tqdm(builders, desc="calibrating", unit="batch")
        param = next(network.parameters())
        with torch.inference_mode():
            for build in batches:
                inputs = build()
                kwargs = dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids)
                if inputs.pixel_values is not None:
                    kwargs.update(pixel_values=inputs.pixel_values.to(param.dtype), image_grid_thw=inputs.image_grid_thw)
                network(**kwargs)

    return forward_loop


def collect_input_absmax(network: nn.Module, module_names: Sequence[str], forward_loop: Callable[[nn.Module], None]) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` (fp32, shape ``[in_features]``) seen by each named ``nn.Linear``.

    Token-major inputs ``[B, T, C]`` whose ``(B, T)`` match the current
    ``attention_mask`` keep only the real tokens; other inputs (the vision
    tower's ``[patches, C]``) are taken whole. Every named module must see
    at least one input, else the calibration data did not reach it (e.g.
    vision modules with a text-only set) and this raises.
    """
    absmax: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []

    def capture_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state["mask"] = mask.bool() if isinstance(mask, torch.Tensor) else None

    def hook_for(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = state["mask"]
            if x.dim() == 3 and mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] == 0:
                return
            seen = x.abs().amax(dim=0).float()
            absmax[name] = seen if name not in absmax else torch.maximum(absmax[name], seen)

        return hook

    try:
        handles.append(network.register_forward_pre_hook(capture_mask, with_kwargs=True))
        for name in module_names:
            module = network.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise CalibrationError(f"{name}: is a {type(module).__name__}, not an nn.Linear; only Linear inputs are calibrated")
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        forward_loop(network)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [n for n in module_names if n not in absmax]
    if unseen:
        raise CalibrationError(
            f"calibration never reached {len(unseen)} quantized module(s), e.g. {unseen[:3]}; "
            "give calibration data that exercises them (images for vision modules) or exclude them"
        )
    bad = [n for n, v in absmax.items() if not torch.isfinite(v).all()]
    if bad:
        raise CalibrationError(f"non-finite activations during calibration at {bad[:3]}; the model overflows in this dtype")
    return absmax
