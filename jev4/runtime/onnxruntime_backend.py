"""The onnxruntime backend: an ``Encoder`` over the graphs of a jev4 ONNX artifact.

Preprocessing (prompts, tokenizer, image processor, M-RoPE ids) is the
shared ``Preprocessor``; this class only feeds sessions. Images run the
vision graph first; its token embeddings go into the language graph, which
places them at the ``<|image_pad|>`` positions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from jev4.errors import ManifestError
from jev4.export.graphs import GraphSpec, TensorSpec
from jev4.model.config import JinaV4Config
from jev4.model.encoder import Encoder
from jev4.model.preprocess import ModelInputs, Preprocessor
from jev4.runtime.providers import check_session_providers, import_onnxruntime, provider_list

log = logging.getLogger(__name__)


def _spec(data: dict) -> GraphSpec:
    return GraphSpec(
        name=data["name"],
        file=data["file"],
        inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
        outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
    )


def language_feed(inputs: ModelInputs) -> dict[str, np.ndarray]:
    """The token inputs of ``language.onnx`` for one padded batch (every graph backend feeds these)."""
    return {
        "input_ids": inputs.input_ids.numpy().astype(np.int64),
        "attention_mask": inputs.attention_mask.numpy().astype(np.int64),
        "position_ids": inputs.position_ids.numpy().astype(np.int64),
        "pooling_mask": inputs.pooling_mask.numpy().astype(np.int64),
    }


class OnnxRuntimeEncoder(Encoder):
    """Runs ``language.onnx`` (and ``vision.onnx`` for images) with the chosen execution provider."""

    def __init__(self, root: Path, manifest: dict, config: JinaV4Config, preprocessor: Preprocessor, provider: str = "cpu", threads: int | None = None):
        contents = manifest["contents"]
        super().__init__(config, preprocessor, (contents["task"],))
        ort = import_onnxruntime()
        self.root = Path(root)
        self.provider = provider
        self.float_dtype = np.dtype(contents["float_dtype"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = provider_list(provider)
        self.specs = {name: _spec(data) for name, data in contents["graphs"].items()}
        if "language" not in self.specs:
            raise ManifestError(f"{root}: the manifest lists no language graph")
        self.sessions = {}
        for name, spec in self.specs.items():
            session = ort.InferenceSession(str(self.root / spec.file), sess_options=options, providers=providers)
            check_session_providers(session, provider, f"{root}/{spec.file}")
            self.sessions[name] = session
        self.with_images = any(t.name == "image_embeds" for t in self.specs["language"].inputs)

    def _image_embeds(self, inputs: ModelInputs) -> np.ndarray:
        from jev4.export.onnx_vision import vision_feed

        if inputs.pixel_values is None:
            return np.zeros((0, self.config.hidden_size), dtype=self.float_dtype)
        if "vision" not in self.sessions:
            from jev4.errors import EncodeError

            raise EncodeError(f"{self.root}: a text-only artifact cannot encode images")
        feed = vision_feed(inputs.pixel_values, inputs.image_grid_thw, self.config.vision_config, self.float_dtype)
        self.specs["vision"].check_feed(feed, self.float_dtype.name)
        (embeds,) = self.sessions["vision"].run(None, feed)
        return embeds.astype(self.float_dtype, copy=False)

    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feed = language_feed(inputs)
        if self.with_images:
            feed["image_embeds"] = self._image_embeds(inputs)
        elif inputs.pixel_values is not None:
            from jev4.errors import EncodeError

            raise EncodeError(f"{self.root}: a text-only artifact cannot encode images")
        self.specs["language"].check_feed(feed, self.float_dtype.name)
        single, multi = self.sessions["language"].run(None, feed)
        return torch.from_numpy(single).float(), torch.from_numpy(multi).float()
