"""The encode API (``encode_text`` / ``encode_image``) and the torch reference behind it.

``Encoder`` owns everything that is the same for every backend: prompts,
per-sample tasks, length bucketing, Matryoshka truncation and output
shapes. A backend only implements ``_forward`` (one padded batch in, full
single vectors and masked multi-vectors out), so switching backend cannot
change semantics. Input checks (texts that are not valid Unicode) and output
checks (a NaN/inf vector, named by its input) live here too, so every backend
gets them.
"""

from __future__ import annotations

import logging
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol
from pathlib import Path

import torch
from PIL import Image

from jev4.errors import AdapterError, EncodeError, TaskError
from jev4.model.adapters import adapter_dir_of, load_adapters
from jev4.model.checkpoint import list_checkpoint_files, resolve_model_dir
from jev4.model.config import JinaV4Config, load_config
from jev4.model.lora import TaskSelector
from jev4.model.network import JinaEmbeddingsV4, attach_adapters, build_network, load_base_weights, parse_dtype
from jev4.model.pooling import multi_vector, single_vector, truncate
from jev4.model.preprocess import DEFAULT_MAX_LENGTH, ModelInputs, Preprocessor, load_image, text_prefix

log = logging.getLogger(__name__)

TaskArg = str | Sequence[str]
SHORT_TEXT = 40  # characters of a text quoted in an error message


def describe_text(index: int, text: str) -> str:
    """``text #3 'its first forty characters'...``: enough to find the input again, short enough for one line."""
    return f"text #{index} {text[:SHORT_TEXT]!r}" + ("..." if len(text) > SHORT_TEXT else "")


def describe_image(index: int, item: Image.Image | str | Path) -> str:
    """``image #2 photos/cat.png``, or the size of an in-memory image (it has no name)."""
    if isinstance(item, (str, Path)):
        return f"image #{index} {item}"
    source = getattr(item, "filename", "")  # set by Image.open
    return f"image #{index} {source}" if source else f"image #{index} (PIL image {item.width}x{item.height})"


def check_texts(texts: list[object]) -> None:
    """Each item a str that is valid Unicode, else one EncodeError naming the input.

    A lone surrogate (``'\\ud800'``) is what Python makes of invalid UTF-8
    bytes read with ``surrogateescape`` (``sys.argv``, ``os.fsdecode``); the
    tokenizer would otherwise fail on it with a traceback far from the input.
    """
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise EncodeError(
                f"text #{index} is of type {type(text).__name__}, not str; encode_text takes strings (use encode_image for images)"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodeError(
                f"text #{index} is not valid Unicode: lone surrogate {text[exc.start]!r} at position {exc.start}; "
                "decode your input as UTF-8 (invalid bytes?)"
            ) from None


def _type_name(value: object) -> str:
    return type(value).__name__


def _as_list(value: object, what: str, single: tuple[type, ...], expected: str) -> list:
    """``value`` as a list of inputs: one ``single`` item, or an iterable of them; anything else names ``what``."""
    if isinstance(value, single):
        return [value]
    if value is None or isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise EncodeError(f"{what} must be {expected}, got {_type_name(value)}")
    return list(value)


def check_encode_args(
    task: object, truncate_dim: object, return_multivector: bool, batch_size: object, multi_vector_dim: int, max_length: object = 1
) -> int | None:
    """The arguments every encode call shares, checked before any work; returns ``truncate_dim`` as an int (or None)."""
    if task is None or not (isinstance(task, str) or (isinstance(task, Iterable) and not isinstance(task, (bytes, bytearray, Mapping)))):
        raise EncodeError(f"task must be a task name or a sequence of names (one per input), got {_type_name(task)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise EncodeError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
        raise EncodeError(f"max_length must be an integer >= 1 (tokens), got {max_length!r}")
    if truncate_dim is not None:
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, numbers.Integral):
            raise EncodeError(f"truncate_dim must be an integer or None, got {truncate_dim!r}")
        truncate_dim = int(truncate_dim)
        if return_multivector:
            raise EncodeError(
                f"truncate_dim applies to single vectors (Matryoshka); multi-vectors keep their {multi_vector_dim} dims: "
                f"pass truncate_dim=None with return_multivector=True"
            )
    return truncate_dim


class OutputCodecLike(Protocol):
    """What an encoder needs of an output codec (jev4.quant.output_codec.OutputCodec); the model layer imports no quant code."""

    def codec(self, output: str, truncate_dim: int | None = None, precision: str | None = None) -> Any: ...


class Encoder(ABC):
    """Upstream's encode semantics over any backend."""

    def __init__(self, config: JinaV4Config, preprocessor: Preprocessor, tasks: Sequence[str]):
        self.config = config
        self.preprocessor = preprocessor
        self.tasks = tuple(tasks)
        # Set by jev4.runtime.load from the artifact's output-codec.json (jev4.quant.output_codec.OutputCodec):
        # the object that turns float outputs into codes when encode_* is asked for an output_precision.
        self.output_codec: OutputCodecLike | None = None
        # The CPU threads the engine was told to use (jev4.runtime.load(threads=)); None: the engine's own default.
        # Readable so that a caller (a Ray actor, a report) can tell what this encoder runs with.
        self.threads: int | None = None

    @property
    def supports_images(self) -> bool:
        """Whether ``encode_image`` can run (a text-only export or a text-only server cannot)."""
        return True

    @property
    def supports_multivector(self) -> bool:
        """Whether ``return_multivector=True`` can be answered (a server's pooled-vector endpoint cannot)."""
        return True

    def engine(self) -> str:
        """What computes the embeddings, for reports: jev4 in this process, or a named server and its version."""
        return f"jev4 in-process ({type(self).__name__})"

    def _quantize_output(self, vectors, precision: str | None, truncate_dim: int | None, multivector: bool):
        """Floats unchanged (``precision`` None or float32), else the artifact's codes: an array, or a list for multi-vectors."""
        if precision in (None, "float32"):
            return vectors
        if self.output_codec is None:
            raise EncodeError(
                f"output_precision={precision!r} needs the artifact's output codec; load the encoder with jev4.runtime.load"
            )
        if multivector:
            return self.output_codec.codec("multi", None, precision).encode_multi([v.numpy() for v in vectors])
        dim = truncate_dim if truncate_dim is not None else self.config.truncate_dim
        return self.output_codec.codec("single", dim, precision).encode(vectors.numpy())

    @abstractmethod
    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded batch -> (single [B, H] normalised, multi [B, T, P] normalised and masked), fp32."""

    def _task_labels(self, task: TaskArg, count: int) -> list[str]:
        labels = [task] * count if isinstance(task, str) else list(task)
        if len(labels) != count:
            raise EncodeError(f"got {len(labels)} task labels for {count} inputs")
        for label in labels:
            if not isinstance(label, str):
                raise EncodeError(f"task labels must be strings, got {_type_name(label)} ({label!r})")
        unknown = sorted({t for t in labels if t not in self.tasks})
        if unknown:
            raise TaskError(f"unknown task(s) {unknown}; this model has {list(self.tasks)}")
        return labels

    def _run(
        self,
        order: list[int],
        build: Callable[[list[int]], ModelInputs],
        describe: Callable[[int], str],
        labels: list[str],
        truncate_dim: int | None,
        return_multivector: bool,
        batch_size: int,
        progress: bool,
        desc: str,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the inputs at ``order`` in batches (``build`` makes one from indices) and return them in index order.

        A NaN/inf in a returned vector (an fp16 overflow, non-finite weights,
        an input that drives the network to NaN) is an EncodeError naming the
        input through ``describe``; it would otherwise reach an index unseen.
        """
        batch_size = int(batch_size)
        if batch_size < 1:
            raise EncodeError(f"batch_size must be >= 1, got {batch_size}")
        dim = self.config.check_truncate_dim(truncate_dim if truncate_dim is not None else self.config.truncate_dim)
        results: dict[int, torch.Tensor] = {}
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=desc, unit="batch")
        for batch in batches:
            inputs = build(batch)
            single, multi = self._forward(inputs, [labels[i] for i in batch])
            self._check_finite(single, multi, inputs.attention_mask, return_multivector, lambda row: describe(batch[row]))
            for row, index in enumerate(batch):
                if return_multivector:
                    results[index] = multi[row, inputs.attention_mask[row].bool()].cpu()
                else:
                    results[index] = truncate(single[row], dim).cpu()
        ordered = [results[i] for i in range(len(order))]
        if return_multivector:
            return ordered
        if not ordered:
            return torch.empty(0, dim or self.config.hidden_size)
        return torch.stack(ordered)

    @staticmethod
    def _check_finite(
        single: torch.Tensor, multi: torch.Tensor, attention_mask: torch.Tensor, multivector: bool, describe_row: Callable[[int], str]
    ) -> None:
        """Raise naming the first batch row whose returned output holds a NaN/inf.

        Only what is returned is checked: multi-vectors at valid (unmasked)
        tokens, or the full single vector (before Matryoshka truncation: a NaN
        in any dimension means the forward pass broke).
        """
        if multivector:
            valid = attention_mask.to(multi.device).bool()
            finite = (torch.isfinite(multi).all(dim=-1) | ~valid).all(dim=-1)
        else:
            finite = torch.isfinite(single).all(dim=-1)
        bad = [row for row, ok in enumerate(finite.tolist()) if not ok]
        if bad:
            more = f" (and {len(bad) - 1} more input(s) of the same batch)" if len(bad) > 1 else ""
            raise EncodeError(
                f"{describe_row(bad[0])}{more}: the model produced a non-finite {'multi-vector' if multivector else 'vector'} "
                "(NaN or inf); an overflow in fp16 or another reduced precision, non-finite weights, "
                "or an invalid config.json value would do this"
            )

    def encode_text(
        self,
        texts: str | Sequence[str],
        task: TaskArg = "retrieval",
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        return_multivector: bool = False,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 8,
        progress: bool = False,
        output_precision: str | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Embed texts: [N, dim] single vectors, or a list of [tokens, P] multi-vectors.

        ``task`` is one name or one per text. Texts are sorted by length into
        batches (less padding) and returned in input order. ``output_precision``
        (int8, binary, ...) returns numpy codes from the artifact's output codec
        instead of floats.
        """
        texts = _as_list(texts, "texts", (str,), "a string or a sequence of strings")
        truncate_dim = check_encode_args(task, truncate_dim, return_multivector, batch_size, self.config.multi_vector_dim, max_length)
        max_length = int(max_length)
        check_texts(texts)
        labels = self._task_labels(task, len(texts))
        prompted = [text_prefix(t, prompt_name) + text for t, text in zip(labels, texts)]
        lengths = self.preprocessor.token_lengths(prompted, max_length) if prompted else []
        order = sorted(range(len(prompted)), key=lambda i: -lengths[i])
        vectors = self._run(
            order,
            lambda batch: self.preprocessor.text_inputs([prompted[i] for i in batch], max_length),
            lambda i: describe_text(i, texts[i]),
            labels,
            truncate_dim,
            return_multivector,
            batch_size,
            progress,
            "encoding texts",
        )
        return self._quantize_output(vectors, output_precision, truncate_dim, return_multivector)

    def encode_image(
        self,
        images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
        task: TaskArg = "retrieval",
        truncate_dim: int | None = None,
        return_multivector: bool = False,
        max_pixels: int | None = None,
        batch_size: int = 8,
        progress: bool = False,
        output_precision: str | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Embed images (PIL images or paths) with the fixed image prompt; pooled over the vision span."""
        items = _as_list(images, "images", (Image.Image, str, Path), "a PIL image, a path, or a sequence of them")
        truncate_dim = check_encode_args(task, truncate_dim, return_multivector, batch_size, self.config.multi_vector_dim)
        loaded = [load_image(item, index) for index, item in enumerate(items)]
        labels = self._task_labels(task, len(loaded))
        order = sorted(range(len(loaded)), key=lambda i: -(loaded[i].width * loaded[i].height))
        vectors = self._run(
            order,
            lambda batch: self.preprocessor.image_inputs([loaded[i] for i in batch], max_pixels),
            lambda i: describe_image(i, items[i]),
            labels,
            truncate_dim,
            return_multivector,
            batch_size,
            progress,
            "encoding images",
        )
        return self._quantize_output(vectors, output_precision, truncate_dim, return_multivector)


class TorchEncoder(Encoder):
    """The reference: transformers' Qwen2.5-VL with the task LoRA applied unmerged (or a merged checkpoint)."""

    def __init__(
        self,
        network: JinaEmbeddingsV4,
        config: JinaV4Config,
        preprocessor: Preprocessor,
        selector: TaskSelector | None,
        device: torch.device | str = "cpu",
    ):
        tasks = selector.tasks if selector is not None else (config.merged_task,)
        super().__init__(config, preprocessor, tasks)
        self.network = network
        self.selector = selector
        self.device = torch.device(device)
        self.dtype = network.model.get_input_embeddings().weight.dtype

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device = "cpu",
        adapter_dir: str | Path | None = None,
        progress: bool = False,
    ) -> TorchEncoder:
        """Load a checkpoint dir (or hub id): base weights, then its ``adapters/`` unless the adapter is merged."""
        model_dir = resolve_model_dir(name_or_path)
        config = load_config(model_dir)
        files = list_checkpoint_files(model_dir)
        network = build_network(config, parse_dtype(dtype), device)
        load_base_weights(network, files, progress=progress)
        selector = None
        if config.merged_task is None or adapter_dir is not None:
            adapters = load_adapters(Path(adapter_dir) if adapter_dir else adapter_dir_of(model_dir), config.task_names)
            selector = attach_adapters(network, adapters)
        elif (model_dir / "adapters").exists():
            raise AdapterError(f"{model_dir}: has {config.merged_task!r} merged in and an adapters/ dir: ambiguous")
        log.info("loaded %s (%s, tasks %s)", model_dir, dtype, selector.tasks if selector else config.merged_task)
        return cls(network, config, Preprocessor.from_dir(model_dir, config), selector, device)

    @torch.inference_mode()
    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compute(inputs, tasks)

    def compute(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``_forward`` with autograd on: what training (``jev4 qat``) differentiates through."""
        dev = self.device
        kwargs = dict(
            input_ids=inputs.input_ids.to(dev),
            attention_mask=inputs.attention_mask.to(dev),
            position_ids=inputs.position_ids.to(dev),
        )
        if inputs.pixel_values is not None:
            kwargs["pixel_values"] = inputs.pixel_values.to(dev, self.dtype)
            kwargs["image_grid_thw"] = inputs.image_grid_thw.to(dev)
        if self.selector is not None:
            with self.selector.select(tasks, dev):
                out = self.network(**kwargs)
        else:
            out = self.network(**kwargs)
        single = single_vector(out.hidden, inputs.pooling_mask.to(dev))
        multi = multi_vector(out.projected, inputs.attention_mask.to(dev))
        return single.float(), multi.float()
