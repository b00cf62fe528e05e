"""jina-clip-v2 on onnxruntime: ``ClipV2Encoder``'s API over the graphs of a jev4 clip-v2 ONNX artifact.

The encode methods are ``ClipV2Encoder``'s own (inherited): the same argument
checks, query prefix, batching, non-finite check, Matryoshka truncation then
L2 normalisation. Only the towers differ: here each is a callable that feeds
an onnxruntime session (``text.onnx`` / ``vision.onnx``, or the Jina-signature
``model.onnx`` with an empty batch for the side not asked for). The tokenizer
and image preprocessing are the family's (``preprocess.py``), read from the
artifact, which carries config.json and tokenizer.json.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from jev4.errors import EncodeError, ManifestError
from jev4.export.graphs import GraphSpec, TensorSpec
from jev4.export.manifest import read_manifest, verify_manifest
from jev4.families.jina_clip_v2.config import ClipV2Config, load_config
from jev4.families.jina_clip_v2.encoder import ClipV2Encoder, ImageInput
from jev4.families.jina_clip_v2.onnx_export import FAMILY
from jev4.families.jina_clip_v2.preprocess import DEFAULT_MAX_LENGTH, ImagePreprocessor, TextPreprocessor
from jev4.runtime.providers import check_session_providers, import_onnxruntime, provider_list

log = logging.getLogger(__name__)

__all__ = ["ClipV2OnnxEncoder", "is_clip_v2_artifact"]


def is_clip_v2_artifact(manifest: dict | None) -> bool:
    """Whether a jev4 manifest is a jina-clip-v2 ONNX artifact (``contents.family``, set by the export)."""
    return bool(manifest) and manifest.get("kind") == "onnx" and (manifest.get("contents") or {}).get("family") == FAMILY


def _spec(data: dict) -> GraphSpec:
    return GraphSpec(
        name=data["name"],
        file=data["file"],
        inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
        outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
    )


class _GraphTower:
    """One tower as ``ClipV2Encoder`` calls it (tensors in, pooled float32 tensor out), run by a session.

    ``build_feed`` turns the tower's arguments into the graph's feed;
    ``output`` picks the pooled vector among the graph's outputs. Each feed
    is checked against the graph's spec first, so a wrong input is one
    "expected X, got Y" line, not an onnxruntime trace.
    """

    def __init__(self, session, spec: GraphSpec, build_feed, output: str):
        self.session, self.spec, self.build_feed, self.output = session, spec, build_feed, output

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        feed = self.build_feed(*args)
        self.spec.check_feed(feed, "float32")
        (value,) = self.session.run([self.output], feed)
        return torch.from_numpy(value).float()


class ClipV2OnnxEncoder(ClipV2Encoder):
    """``encode_text`` / ``encode_image`` of a jina-clip-v2 ONNX artifact, on onnxruntime (CPU by default)."""

    def __init__(self, root: Path, manifest: dict, config: ClipV2Config, provider: str = "cpu", threads: int | None = None):
        """``threads``: intra-op threads of each session (None: onnxruntime's default); with it, one inter-op thread, sequential."""
        # Not ClipV2Encoder.__init__: that one takes torch towers; here the towers are session callables.
        ort = import_onnxruntime()
        self.root = Path(root)
        self.config = config
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # what the graphs take and give, at every precision
        self.provider, self.threads = provider, threads
        contents = manifest["contents"]
        self.precision = contents.get("precision", "fp32")
        self.output_codec = None  # set by jev4.runtime.load (the artifact's output-codec.json)
        self.text_preprocessor = TextPreprocessor.from_dir(self.root, config)
        self.image_preprocessor = ImagePreprocessor(config.vision.image_size)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        specs = {name: _spec(data) for name, data in (contents.get("graphs") or {}).items()}
        if not ({"text", "vision"} <= set(specs) or "jina" in specs):
            raise ManifestError(f"{self.root}: the manifest lists graphs {sorted(specs)}; a jina-clip-v2 artifact has text and vision, or jina")
        sessions = {}
        for name, spec in specs.items():
            path = self.root / spec.file
            if not path.is_file():
                raise ManifestError(f"{path}: the {name} graph named in the manifest is missing")
            session = ort.InferenceSession(str(path), sess_options=options, providers=provider_list(provider))
            check_session_providers(session, provider, str(path))
            sessions[name] = session
        size, hidden = config.vision.image_size, config.hidden_size
        if "jina" in specs:
            spec, session = specs["jina"], sessions["jina"]
            no_images = np.zeros((0, 3, size, size), dtype=np.float32)
            no_texts = np.zeros((0, 1), dtype=np.int64)
            self.text_tower = _GraphTower(session, spec, lambda ids, mask: {"input_ids": ids.numpy().astype(np.int64), "pixel_values": no_images}, "text_embeddings")
            self.vision_tower = _GraphTower(session, spec, lambda pixels: {"input_ids": no_texts, "pixel_values": pixels.numpy().astype(np.float32)}, "image_embeddings")
        else:
            self.text_tower = _GraphTower(
                sessions["text"], specs["text"], lambda ids, mask: {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}, "text_embeds"
            )
            self.vision_tower = _GraphTower(sessions["vision"], specs["vision"], lambda pixels: {"pixel_values": pixels.numpy().astype(np.float32)}, "image_embeds")
        log.info("loaded jina-clip-v2 ONNX artifact %s (%s, %s, hidden %d)", self.root, self.precision, provider, hidden)

    @classmethod
    def from_pretrained(cls, root: str | Path, provider: str = "cpu", threads: int | None = None, verify: bool = True) -> ClipV2OnnxEncoder:
        """Open the artifact at ``root``: its manifest (checksums verified unless ``verify`` is False), config and graphs."""
        root = Path(root)
        manifest = verify_manifest(root) if verify else read_manifest(root)
        if not is_clip_v2_artifact(manifest):
            raise ManifestError(f"{root}: is not a jina-clip-v2 ONNX artifact (manifest kind {manifest.get('kind')!r}, family {(manifest.get('contents') or {}).get('family')!r})")
        return cls(root, manifest, load_config(root), provider=provider, threads=threads)

    def engine(self) -> str:
        """onnxruntime's version, provider and the artifact's precision, for reports."""
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} ({self.provider}; {self.precision})"

    def encode_text(
        self,
        texts: str | Sequence[str],
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        batch_size: int = 8,
        max_length: int = DEFAULT_MAX_LENGTH,
        output_precision: str | None = None,
    ):
        """``ClipV2Encoder.encode_text``; ``output_precision`` (e.g. ``binary``) returns the artifact's output codes instead of floats."""
        vectors = super().encode_text(texts, prompt_name=prompt_name, truncate_dim=truncate_dim, batch_size=batch_size, max_length=max_length)
        return self._codes(vectors, output_precision, truncate_dim)

    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        truncate_dim: int | None = None,
        batch_size: int = 8,
        output_precision: str | None = None,
    ):
        """``ClipV2Encoder.encode_image``; ``output_precision`` as for ``encode_text``."""
        vectors = super().encode_image(images, truncate_dim=truncate_dim, batch_size=batch_size)
        return self._codes(vectors, output_precision, truncate_dim)

    def _codes(self, vectors: torch.Tensor, precision: str | None, truncate_dim: int | None):
        """Floats unchanged (``precision`` None or float32), else the output codec's codes (``jev4.quant.output_codec``)."""
        if precision in (None, "float32"):
            return vectors
        if self.output_codec is None:
            raise EncodeError(f"output_precision={precision!r} needs the artifact's output codec; load the encoder with jev4.runtime.load")
        dim = self._truncate_dim(truncate_dim)
        return self.output_codec.codec("single", dim, precision).encode(vectors.numpy())
