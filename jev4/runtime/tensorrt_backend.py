"""The TensorRT backend: an ``Encoder`` over the engines ``jev4 build-engine`` added to an ONNX artifact.

Preprocessing, the graphs' feeds and pooling (in the graph) are the same as
the onnxruntime backend's; only how a graph runs differs:

- engines are refused when the manifest says they were built with another
  TensorRT version or on another GPU model (``check_engine_host``), before
  TensorRT is asked to deserialize them;
- every call is checked against the engine's optimization profile first, so
  a batch or sequence outside it fails with the range and the flag to widen,
  not with a TensorRT log line;
- I/O buffers are torch tensors on the CUDA device
  (``set_tensor_address(name, tensor.data_ptr())``), run on torch's current
  stream, so results stay ordered with torch work without extra syncs;
- the context's scratch memory is sized for each call's shapes
  (``USER_MANAGED`` + ``update_device_memory_size_for_shapes``) instead of
  the profile's maximum, so a wide ``--seq`` range costs memory only when a
  long batch really comes;
- images are packed into vision-engine calls that fit its profile (images
  are independent: the tower's attention is block-diagonal per image).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jev4.errors import EncodeError, ManifestError, ProviderError, TensorRTError
from jev4.export.graphs import GraphSpec
from jev4.export.tensorrt import AXIS_FLAGS, EngineHost, ProfileShapes, check_engine_host, current_host, import_tensorrt, spec_from_json
from jev4.model.config import JinaV4Config
from jev4.model.encoder import Encoder
from jev4.model.preprocess import ModelInputs, Preprocessor
from jev4.runtime.onnxruntime_backend import language_feed

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
    "FP8": torch.float8_e4m3fn,
}
# What a user can change at encode time when a call falls outside the profile.
AXIS_ADVICE = {"batch": "a smaller batch_size", "seq": "a smaller max_length", "merged_tokens": "a smaller max_pixels", "patches": "a smaller max_pixels"}


def torch_dtype(trt_dtype: Any, where: str) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TORCH_DTYPES:
        raise TensorRTError(f"{where}: engine I/O type {name} has no torch equivalent here")
    return TORCH_DTYPES[name]


def profile_from_json(data: Mapping[str, Mapping[str, Sequence[int]]]) -> dict[str, ProfileShapes]:
    return {name: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])) for name, s in data.items()}


def check_profile(shapes: Mapping[str, tuple[int, ...]], profile: Mapping[str, ProfileShapes], spec: GraphSpec, where: str) -> None:
    """Refuse a call whose input shapes fall outside the engine's profile, naming the axis, its range and the fix."""
    for tensor in spec.inputs:
        shape = tuple(shapes[tensor.name])
        low, _, high = profile[tensor.name]
        if len(shape) != len(low):
            raise EncodeError(f"{where}: input {tensor.name!r} has shape {shape}; the engine expects {len(low)} dims {tensor.shape}")
        for axis, (size, lo, hi, axis_name) in enumerate(zip(shape, low, high, tensor.shape)):
            if lo <= size <= hi:
                continue
            label = f"{axis_name!r} (axis {axis})" if isinstance(axis_name, str) else f"axis {axis}"
            fixes = []
            if axis_name in AXIS_ADVICE:
                fixes.append(f"use {AXIS_ADVICE[axis_name]}")
            if axis_name in AXIS_FLAGS:
                fixes.append(f"rebuild with a wider {AXIS_FLAGS[axis_name]} (jev4 build-engine)")
            hint = f": {' or '.join(fixes)}" if fixes else ""
            raise EncodeError(f"{where}: input {tensor.name!r} {label} is {size}, outside the engine's profile range [{lo}, {hi}]{hint}")


def group_images(grid_thw: torch.Tensor, merge_unit: int, max_tokens: int, max_images: int) -> list[slice]:
    """Consecutive runs of images with at most ``max_tokens`` merged tokens and ``max_images`` images each."""
    tokens = (torch.as_tensor(grid_thw).prod(-1) // merge_unit).tolist()
    groups: list[slice] = []
    start, total = 0, 0
    for index, count in enumerate(tokens):
        if count > max_tokens:
            raise EncodeError(
                f"image {index} has {count} merged tokens; the vision engine takes at most {max_tokens} per call: "
                "use a smaller max_pixels or rebuild with a wider --image-tokens (jev4 build-engine)"
            )
        if index > start and (total + count > max_tokens or index - start >= max_images):
            groups.append(slice(start, index))
            start, total = index, 0
        total += count
    if tokens:
        groups.append(slice(start, len(tokens)))
    return groups


def axis_limits(spec: GraphSpec, profile: Mapping[str, ProfileShapes], axis_name: str) -> tuple[int, int]:
    """(min, max) of a named dynamic axis in an engine's profile."""
    for tensor in spec.inputs:
        if axis_name in tensor.shape:
            axis = tensor.shape.index(axis_name)
            low, _, high = profile[tensor.name]
            return low[axis], high[axis]
    raise TensorRTError(f"{spec.file}: no input has an axis named {axis_name!r}")


class EngineRunner:
    """One deserialized engine, run with torch tensors as its I/O buffers."""

    def __init__(self, trt: Any, engine: Any, spec: GraphSpec, profile: Mapping[str, ProfileShapes], device: torch.device, where: str):
        self.trt = trt
        self.engine = engine
        self.spec = spec
        self.profile = dict(profile)
        self.device = torch.device(device)
        self.where = where
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self.inputs) != sorted(spec.input_names()) or sorted(self.outputs) != sorted(spec.output_names()):
            raise TensorRTError(
                f"{where}: engine I/O (inputs {self.inputs}, outputs {self.outputs}) differs from the graph spec "
                f"(inputs {spec.input_names()}, outputs {spec.output_names()}); rebuild it with jev4 build-engine"
            )
        if sorted(self.profile) != sorted(self.inputs):
            raise ManifestError(f"{where}: the manifest's profile covers {sorted(self.profile)}, the engine has inputs {sorted(self.inputs)}")
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n), f"{where}: {n}") for n in names}
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        self.user_memory = strategy is not None
        self.context = engine.create_execution_context(strategy) if self.user_memory else engine.create_execution_context()
        if self.context is None:
            raise TensorRTError(f"{where}: TensorRT could not create an execution context (out of GPU memory?)")
        self._scratch: torch.Tensor | None = None
        # enqueueV3 wants a non-null address for every tensor, empty ones included.
        self._placeholder = torch.empty(256, dtype=torch.uint8, device=self.device)

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        address = tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()
        if not self.context.set_tensor_address(name, address):
            raise TensorRTError(f"{self.where}: TensorRT refused the buffer of {name!r}")

    def _scratch_memory(self) -> None:
        """Size the context's scratch memory for the shapes just set; grow, never shrink."""
        need = max(int(self.context.update_device_memory_size_for_shapes()), 256)
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8, device=self.device)
            self.context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())

    def run(self, feed: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs (numpy or torch, any device) -> outputs as torch tensors on the engine's device."""
        missing = sorted(set(self.inputs) - set(feed))
        if missing:
            raise EncodeError(f"{self.where}: missing inputs {missing}; the engine takes {self.inputs}")
        tensors = {}
        for name in self.inputs:
            value = feed[name]
            value = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            tensors[name] = value.to(device=self.device, dtype=self.dtypes[name]).contiguous()
        check_profile({n: tuple(t.shape) for n, t in tensors.items()}, self.profile, self.spec, self.where)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            for name, tensor in tensors.items():
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise TensorRTError(f"{self.where}: TensorRT refused shape {tuple(tensor.shape)} for input {name!r}")
                self._bind(name, tensor)
            outputs = {}
            for name in self.outputs:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise TensorRTError(f"{self.where}: output {name!r} has unresolved shape {shape} after setting the inputs")
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self._bind(name, outputs[name])
            if self.user_memory:
                self._scratch_memory()
            stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
            if not self.context.execute_async_v3(stream):
                raise TensorRTError(f"{self.where}: execute_async_v3 failed (see TensorRT's log above)")
        return outputs


def tensorrt_record(root: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``contents.tensorrt`` (what the engines were built with), or an error saying how to build them."""
    record = manifest.get("contents", {}).get("tensorrt")
    if not record or not record.get("engines"):
        raise ManifestError(f"{root}: has no TensorRT engines; build them on this GPU host with `jev4 build-engine {root} --force`")
    return record


def load_runners(trt: Any, runtime: Any, root: Path, manifest: Mapping[str, Any], device: torch.device) -> dict[str, EngineRunner]:
    """Deserialize every engine the manifest lists into a runner."""
    record = tensorrt_record(root, manifest)
    graphs = manifest["contents"].get("graphs", {})
    runners = {}
    for name, entry in record["engines"].items():
        if name not in graphs:
            raise ManifestError(f"{root}: engine {name!r} has no graph spec in the manifest")
        path = Path(root) / entry["file"]
        if not path.is_file():
            raise ManifestError(f"{path}: engine file listed in the manifest is missing")
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise TensorRTError(f"{path}: TensorRT could not deserialize the engine (see its log above)")
        runners[name] = EngineRunner(trt, engine, spec_from_json(graphs[name]), profile_from_json(entry["profile"]), device, str(path))
    if "language" not in runners:
        raise ManifestError(f"{root}: the TensorRT record lists no language engine")
    return runners


class TensorRTEncoder(Encoder):
    """Runs ``language.plan`` (and ``vision.plan`` for images); build them with ``jev4 build-engine``."""

    def __init__(
        self,
        root: Path,
        manifest: Mapping[str, Any],
        config: JinaV4Config,
        preprocessor: Preprocessor,
        runners: Mapping[str, EngineRunner],
        keep_alive: Sequence[Any] = (),
    ):
        super().__init__(config, preprocessor, (manifest["contents"]["task"],))
        self.root = Path(root)
        self.runners = dict(runners)
        self._keep_alive = tuple(keep_alive)  # the TensorRT runtime and logger must outlive the engines
        if "language" not in self.runners:
            raise ManifestError(f"{root}: no language engine")
        self.with_images = "image_embeds" in self.runners["language"].inputs
        self.merge_unit = int(config.vision_config.get("spatial_merge_size", 2)) ** 2

    @classmethod
    def open(
        cls, root: str | Path, manifest: Mapping[str, Any], config: JinaV4Config, preprocessor: Preprocessor, device: str | torch.device = "cuda"
    ) -> TensorRTEncoder:
        """Check the engines fit this host, deserialize them and return the encoder."""
        root = Path(root)
        record = tensorrt_record(root, manifest)
        trt = import_tensorrt()
        device = torch.device(device)
        if device.type != "cuda":
            raise ProviderError(f"TensorRT engines run on a CUDA device, not {device}")
        if not torch.cuda.is_available():
            raise ProviderError("TensorRT engines need a CUDA GPU; torch sees none on this host")
        check_engine_host(EngineHost.from_json(record), current_host(trt, device.index if device.index is not None else 0), root)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        with torch.cuda.device(device):
            runners = load_runners(trt, runtime, root, manifest, device)
        log.info("loaded %s engines %s (%s)", root, sorted(runners), record.get("precision"))
        return cls(root, manifest, config, preprocessor, runners, keep_alive=(logger, runtime))

    def _image_embeds(self, inputs: ModelInputs) -> torch.Tensor:
        from jev4.export.onnx_vision import vision_feed

        language = self.runners["language"]
        if inputs.pixel_values is None:
            return torch.zeros((0, self.config.hidden_size), dtype=language.dtypes["image_embeds"], device=language.device)
        if "vision" not in self.runners:
            raise EncodeError(f"{self.root}: has no vision engine; it cannot encode images")
        vision = self.runners["vision"]
        _, max_tokens = axis_limits(vision.spec, vision.profile, "merged_tokens")
        _, max_segments = axis_limits(vision.spec, vision.profile, "segments_plus_1")
        grid = torch.as_tensor(inputs.image_grid_thw, dtype=torch.int64)
        offsets = [0, *torch.cumsum(grid.prod(-1), 0).tolist()]
        chunks = []
        for group in group_images(grid, self.merge_unit, max_tokens, max_segments - 1):
            pixels = inputs.pixel_values[offsets[group.start] : offsets[group.stop]]
            feed = vision_feed(pixels, grid[group], self.config.vision_config)
            chunks.append(vision.run(feed)["image_embeds"])
        return torch.cat(chunks)

    @property
    def supports_images(self) -> bool:
        return self.with_images

    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feed: dict[str, Any] = dict(language_feed(inputs))
        if self.with_images:
            feed["image_embeds"] = self._image_embeds(inputs)
        elif inputs.pixel_values is not None:
            raise EncodeError(f"{self.root}: a text-only artifact cannot encode images")
        out = self.runners["language"].run(feed)
        return out["single_vector"].float().cpu(), out["multi_vector"].float().cpu()
