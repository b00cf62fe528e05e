"""Declarative specs of the exported graphs: names, dtypes and axes of every input and output.

One spec per graph, read by the exporter (input/output names, dynamic axes),
written into the manifest, and used by the runtime to check what it feeds a
session ("expected X, got Y") in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from jev4.errors import EncodeError


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: ``shape`` holds ints for fixed axes and names for dynamic ones."""

    name: str
    dtype: str  # numpy dtype name; "float" means the graph's float dtype
    shape: tuple[int | str, ...]

    def check(self, value: np.ndarray, float_dtype: str, where: str) -> None:
        want = float_dtype if self.dtype == "float" else self.dtype
        if value.dtype != np.dtype(want):
            raise EncodeError(f"{where}: input {self.name!r} expected dtype {want}, got {value.dtype}")
        if value.ndim != len(self.shape):
            raise EncodeError(f"{where}: input {self.name!r} expected {len(self.shape)} dims {self.shape}, got shape {value.shape}")
        for axis, (want_dim, got_dim) in enumerate(zip(self.shape, value.shape)):
            if isinstance(want_dim, int) and want_dim != got_dim:
                raise EncodeError(f"{where}: input {self.name!r} axis {axis} expected {want_dim}, got {got_dim}")


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_feed(self, feed: dict[str, np.ndarray], float_dtype: str) -> None:
        missing = set(self.input_names()) - set(feed)
        extra = set(feed) - set(self.input_names())
        if missing or extra:
            raise EncodeError(f"{self.name} graph: expected inputs {self.input_names()}, got {sorted(feed)}")
        for spec in self.inputs:
            spec.check(feed[spec.name], float_dtype, f"{self.name} graph")

    def to_json(self) -> dict:
        return asdict(self)


def language_graph_spec(hidden: int, multi_dim: int, with_images: bool) -> GraphSpec:
    """The language model: token ids (+ image token embeddings) -> pooled single vector and multi-vectors."""
    inputs = [
        TensorSpec("input_ids", "int64", ("batch", "seq")),
        TensorSpec("attention_mask", "int64", ("batch", "seq")),
        TensorSpec("position_ids", "int64", (3, "batch", "seq")),
        TensorSpec("pooling_mask", "int64", ("batch", "seq")),
    ]
    if with_images:
        inputs.append(TensorSpec("image_embeds", "float", ("image_tokens", hidden)))
    return GraphSpec(
        name="language",
        file="language.onnx",
        inputs=tuple(inputs),
        outputs=(
            TensorSpec("single_vector", "float32", ("batch", hidden)),
            TensorSpec("multi_vector", "float32", ("batch", "seq", multi_dim)),
        ),
    )
