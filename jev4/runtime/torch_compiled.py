"""A compiled, bucketed torch path: ``torch.compile`` of the merged network at a fixed set of (batch, length) shapes.

Why buckets: a compiled graph is specialised to its shapes (``dynamic=False``),
and CUDA graphs (``mode="reduce-overhead"``) replay a recorded launch
sequence only for the exact shapes recorded. Batch 1 at short lengths is
launch-bound in eager mode (~20-40 ms for 36 layers on an H100 whatever the
length up to 512, docs/benchmarks.md); a replayed graph removes that. So each
text batch is padded up to the smallest bucket that holds it, and every call
hits a graph compiled (and, on CUDA, recorded) once for that bucket:

* length padding: pad tokens after the last valid one (the tokenizer pads on
  the right), attention mask 0, pooling mask 0, position id 0 (as
  ``text_position_ids``): the valid tokens' outputs do not change;
* batch padding: extra rows of one valid pad token (a row with no valid
  token at all would give SDPA a fully masked row, i.e. NaN); their outputs
  are dropped.

The outputs are cut back to the batch's own rows and length, so an encoder
using this path returns what the eager reference returns (tests bound the
difference at 1e-5 on the tiny checkpoint in fp32).

A batch beyond the largest bucket (longer than the longest length bucket, or
more rows than the largest batch bucket) follows ``CompileSettings.overflow``:
``"eager"`` (default) runs it through the same network uncompiled, logged
once per shape and counted in ``BucketStats.eager_calls``, so an encoder
never refuses an input the reference accepts; ``"error"`` raises
``BucketOverflowError`` naming the shape and the buckets, for a service
that must never pay an eager call (or a surprise compile). Image batches
always run eagerly: their patch counts do not fall on a small grid.

``scope`` says what is compiled. ``"network"`` (default): the whole text
step (transformer, final norm, projector, both poolings) as one graph, so
inductor can fuse across every op. ``"layers"`` (regional compilation): each
decoder layer on its own; the 36 layers share one code object and one
compiled graph per bucket (their weights are graph inputs), so a bucket
compiles about as fast as one layer, at the price of no fusion across layer
boundaries and the glue between layers running eagerly. Use it where
compile time matters more (a short GPU slot, many buckets).

Compile time is reported per bucket (``BucketStats.compile_seconds``,
logged at INFO): the first call of a bucket compiles, and ``warm_up()``
compiles a list of buckets ahead, e.g. before a service takes traffic or a
benchmark starts its clock. Compiled graphs live in this process; inductor's
on-disk caches (FX graph and AOT autograd caches, on by default in torch)
shorten a later process's compile of the same shapes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from jev4.errors import EncodeError, SettingsError
from jev4.model.config import JinaV4Config
from jev4.model.encoder import TorchEncoder
from jev4.model.network import JinaEmbeddingsV4, parse_dtype
from jev4.model.pooling import multi_vector, single_vector
from jev4.model.preprocess import ModelInputs, Preprocessor, text_position_ids

log = logging.getLogger(__name__)

__all__ = [
    "COMPILE_MODES",
    "OVERFLOW_POLICIES",
    "BucketOverflowError",
    "BucketStats",
    "BucketedForward",
    "CompileSettings",
    "CompiledTorchEncoder",
    "load_compiled",
    "pad_to_bucket",
]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OVERFLOW_POLICIES = ("eager", "error")
SCOPES = ("network", "layers")
Bucket = tuple[int, int]  # (batch, length)


class BucketOverflowError(EncodeError):
    """A batch is larger than every bucket and ``CompileSettings.overflow`` is ``"error"``."""


def _positive_sorted(name: str, values: Iterable[int]) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise SettingsError(f"CompileSettings.{name} must be a non-empty tuple of integers >= 1, got {values!r}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class CompileSettings:
    """How the torch network is compiled and which (batch, length) buckets it serves; serialisable (``to_json``).

    Buckets are the product of ``batch_buckets`` and ``length_buckets``;
    each costs one compile on first use. ``mode`` None picks
    ``"reduce-overhead"`` (CUDA graphs) on CUDA and ``"default"`` elsewhere
    (CUDA graphs do not exist on CPU).
    """

    batch_buckets: tuple[int, ...] = (1, 8, 32)
    length_buckets: tuple[int, ...] = (128, 512, 2048)
    mode: str | None = None
    overflow: str = "eager"
    backend: str = "inductor"
    scope: str = "network"
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_buckets", _positive_sorted("batch_buckets", self.batch_buckets))
        object.__setattr__(self, "length_buckets", _positive_sorted("length_buckets", self.length_buckets))
        if self.mode is not None and self.mode not in COMPILE_MODES:
            raise SettingsError(f"unknown torch.compile mode {self.mode!r}; choose one of {COMPILE_MODES} or None (auto)")
        if self.overflow not in OVERFLOW_POLICIES:
            raise SettingsError(f"unknown overflow policy {self.overflow!r}; choose one of {OVERFLOW_POLICIES}")
        if self.scope not in SCOPES:
            raise SettingsError(f"unknown compile scope {self.scope!r}; choose one of {SCOPES}")

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        return tuple((b, t) for b in self.batch_buckets for t in self.length_buckets)

    def bucket_for(self, batch: int, length: int) -> Bucket | None:
        """The smallest bucket holding a ``batch`` x ``length`` batch, or None when none does."""
        b = next((x for x in self.batch_buckets if x >= batch), None)
        t = next((x for x in self.length_buckets if x >= length), None)
        return None if b is None or t is None else (b, t)

    def resolved_mode(self, device: torch.device) -> str:
        if self.mode is not None:
            return self.mode
        return "reduce-overhead" if device.type == "cuda" else "default"

    def to_json(self) -> dict:
        return {"scheme": "torch-compile-bucketed", **asdict(self), "batch_buckets": list(self.batch_buckets), "length_buckets": list(self.length_buckets)}


def pad_to_bucket(inputs: ModelInputs, bucket: Bucket, pad_token_id: int) -> ModelInputs:
    """Text ``inputs`` padded on the right to ``bucket`` (see the module docstring); its first rows are the batch's own."""
    batch, length = inputs.input_ids.shape
    rows, cols = bucket
    if rows < batch or cols < length:
        raise EncodeError(f"cannot pad a {batch} x {length} batch into bucket {rows} x {cols}: the bucket is smaller")
    ids = inputs.input_ids.new_full((rows, cols), pad_token_id)
    mask = inputs.attention_mask.new_zeros((rows, cols))
    pooling = inputs.pooling_mask.new_zeros((rows, cols))
    ids[:batch, :length] = inputs.input_ids
    mask[:batch, :length] = inputs.attention_mask
    pooling[:batch, :length] = inputs.pooling_mask
    mask[batch:, 0] = 1  # filler rows: one valid token each, so no attention row is fully masked
    pooling[batch:, 0] = 1
    return ModelInputs(ids, mask, text_position_ids(mask), pooling, lengths=list(inputs.lengths) + [1] * (rows - batch))


class _TextForward(nn.Module):
    """Forward + both poolings in one module, so the compiled graph covers the whole text step."""

    def __init__(self, network: JinaEmbeddingsV4):
        super().__init__()
        self.network = network

    def forward(self, input_ids, attention_mask, position_ids, pooling_mask) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.network(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return single_vector(out.hidden, pooling_mask), multi_vector(out.projected, attention_mask)


@dataclass
class BucketStats:
    """What the bucketed path did: compile seconds and calls per bucket, eager fall-backs."""

    compile_seconds: dict[Bucket, float] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    eager_calls: int = 0

    def to_json(self) -> dict:
        return {
            "compile_seconds": {f"{b}x{t}": s for (b, t), s in self.compile_seconds.items()},
            "calls": {f"{b}x{t}": n for (b, t), n in self.calls.items()},
            "eager_calls": self.eager_calls,
        }


class BucketedForward:
    """Runs text batches through ``torch.compile(network)`` at bucket shapes; one compile per bucket."""

    def __init__(self, network: JinaEmbeddingsV4, settings: CompileSettings, device: torch.device | str, pad_token_id: int):
        self.settings = settings
        self.device = torch.device(device)
        self.pad_token_id = int(pad_token_id)
        self.mode = settings.resolved_mode(self.device)
        self.cuda_graphs = self.device.type == "cuda" and self.mode in ("reduce-overhead", "max-autotune")
        self.eager = _TextForward(network)
        if settings.scope == "layers":
            for layer in network.model.language_model.layers:  # in place: module names and state_dict keys unchanged
                layer.compile(mode=self.mode, dynamic=False, backend=settings.backend)
            self.compiled = self.eager
        else:
            self.compiled = torch.compile(self.eager, mode=self.mode, dynamic=False, fullgraph=False, backend=settings.backend)
        self.stats = BucketStats()
        self._warned: set[tuple[int, int]] = set()
        # Each bucket is one more compiled entry of the same code objects: lift dynamo's per-code limit (default 8)
        # above the bucket count, or the later buckets would silently run eagerly.
        self._recompile_limit = max(torch._dynamo.config.recompile_limit, len(settings.buckets) + 1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _call_compiled(self, padded: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        args = (padded.input_ids.to(dev), padded.attention_mask.to(dev), padded.position_ids.to(dev), padded.pooling_mask.to(dev))
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # inference: the previous call's outputs are not read any more
        with torch._dynamo.config.patch(recompile_limit=self._recompile_limit):
            single, multi = self.compiled(*args)
        if self.cuda_graphs:  # graph outputs live in memory the next replay overwrites
            single, multi = single.clone(), multi.clone()
        return single, multi

    def _overflow(self, batch: int, length: int) -> None:
        """Refuse (``overflow="error"``) or log once per shape and count the eager call."""
        s = self.settings
        where = f"batch {batch} x length {length} is beyond the largest bucket (batch buckets {list(s.batch_buckets)}, length buckets {list(s.length_buckets)})"
        if s.overflow == "error":
            raise BucketOverflowError(f"{where}; lower batch_size/max_length or add a bucket (CompileSettings)")
        if (batch, length) not in self._warned:
            self._warned.add((batch, length))
            log.warning("%s: running it eagerly (uncompiled)", where)
        self.stats.eager_calls += 1

    def run_bucket(self, padded: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled step on an input already at a bucket's shape; times the first call of each bucket as its compile."""
        bucket = tuple(padded.input_ids.shape)
        if bucket not in self.stats.compile_seconds:
            self._sync()
            started = time.perf_counter()
            out = self._call_compiled(padded)
            if self.cuda_graphs:  # CUDA graph trees record on a later call than the compile: include it
                out = self._call_compiled(padded)
            self._sync()
            self.stats.compile_seconds[bucket] = time.perf_counter() - started
            log.info("compiled bucket %dx%d (%s) in %.1f s", bucket[0], bucket[1], self.mode, self.stats.compile_seconds[bucket])
        else:
            out = self._call_compiled(padded)
        self.stats.calls[bucket] += 1
        return out

    def __call__(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(single [B, H], multi [B, T, P]) of a text batch, as ``TorchEncoder._forward`` returns them."""
        batch, length = inputs.input_ids.shape
        bucket = self.settings.bucket_for(batch, length)
        if bucket is None:
            self._overflow(batch, length)  # raises under overflow="error"
            dev = self.device
            with torch.compiler.set_stance("force_eager"):  # "layers" scope: the layers are compiled modules; no new shape compile
                return self.eager(inputs.input_ids.to(dev), inputs.attention_mask.to(dev), inputs.position_ids.to(dev), inputs.pooling_mask.to(dev))
        single, multi = self.run_bucket(pad_to_bucket(inputs, bucket, self.pad_token_id))
        return single[:batch], multi[:batch, :length]

    def warm_up(self, buckets: Iterable[Bucket] | None = None) -> dict[Bucket, float]:
        """Compile ``buckets`` (default: all) ahead of traffic; returns the compile seconds of each."""
        wanted = tuple(buckets) if buckets is not None else self.settings.buckets
        with torch.inference_mode():
            for rows, cols in wanted:
                if (rows, cols) not in self.settings.buckets:
                    raise SettingsError(f"bucket {rows}x{cols} is not one of {self.settings.buckets}")
                mask = torch.ones(rows, cols, dtype=torch.long)
                ids = torch.full((rows, cols), self.pad_token_id, dtype=torch.long)
                self.run_bucket(ModelInputs(ids, mask, text_position_ids(mask), mask.clone()))
        return {b: self.stats.compile_seconds[b] for b in wanted}


class CompiledTorchEncoder(TorchEncoder):
    """A ``TorchEncoder`` over a merged (optionally quantized) network whose text batches run compiled, per bucket."""

    def __init__(
        self,
        network: JinaEmbeddingsV4,
        config: JinaV4Config,
        preprocessor: Preprocessor,
        device: torch.device | str,
        settings: CompileSettings,
        quantization: str | None = None,
        quantization_settings: dict | None = None,
    ):
        super().__init__(network, config, preprocessor, None, device)
        self.compile_settings = settings
        self.quantization = quantization
        self.quantization_settings = quantization_settings
        self.runner = BucketedForward(network, settings, self.device, preprocessor.tokenizer.pad_token_id)

    @property
    def stats(self) -> BucketStats:
        return self.runner.stats

    def warm_up(self, buckets: Iterable[Bucket] | None = None) -> dict[Bucket, float]:
        return self.runner.warm_up(buckets)

    @torch.inference_mode()
    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.pixel_values is not None:  # images: eager (see the module docstring), compiled layers included
            with torch.compiler.set_stance("force_eager"):
                return self.compute(inputs, tasks)
        single, multi = self.runner(inputs)
        return single.float(), multi.float()


def load_compiled(
    name_or_path: str | Path,
    settings: CompileSettings,
    task: str | None = None,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    adapter_dir: str | Path | None = None,
) -> CompiledTorchEncoder:
    """Load a checkpoint, merge ``task``, optionally quantize (``fp8``, ``fp8-torchao``, bnb), then serve it compiled per bucket.

    A compiled network serves one task: the per-sample LoRA selection of the
    unmerged reference would be one more guard (and recompile) per task mix.
    """
    from jev4.runtime.torch_quantized import check_quantization, load_merged_network, quantize_network
    from jev4.runtime.torchao_fp8 import TORCHAO_FP8, check_torchao_fp8, quantize_model_torchao_fp8

    torch_dtype = parse_dtype(dtype)
    if quantization == TORCHAO_FP8:
        check_torchao_fp8(device, torch_dtype)
    elif quantization is not None:
        check_quantization(quantization, device, torch_dtype)
    network, config, model_dir, task = load_merged_network(name_or_path, task, torch_dtype, device, adapter_dir)
    quant_json = None
    if quantization == TORCHAO_FP8:
        quant_json = quantize_model_torchao_fp8(network).to_json()
    elif quantization is not None:
        _, quant_json = quantize_network(network, quantization)
    merged = dataclasses.replace(config, merged_task=task)
    log.info("loaded %s: task %r merged, quantization %s, compiled per bucket %s (%s, %s)", model_dir, task, quantization, settings.buckets, dtype, device)
    return CompiledTorchEncoder(network, merged, Preprocessor.from_dir(model_dir, config), device, settings, quantization, quant_json)

