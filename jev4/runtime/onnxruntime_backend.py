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

from jev4.errors import EncodeError, ManifestError
from jev4.export.graphs import GraphSpec, TensorSpec
from jev4.model.config import JinaV4Config
from jev4.model.encoder import Encoder
from jev4.model.preprocess import ModelInputs, Preprocessor
from jev4.runtime.providers import check_session_providers, import_onnxruntime, provider_list

log = logging.getLogger(__name__)

ATTENTION_PEAK_FACTOR = 6  # peak bytes / (batch * heads * T^2 * 4), measured 5.2-5.4 (see _check_attention_memory)
# The fused graph's GroupQueryAttention keeps one [batch, heads, T, T] fp32 score buffer on CPU: measured 1.07 on the
# tiny model at 1 x 4096 (344 MiB peak vs 1431 MiB unfused; onnxruntime 1.32).
FUSED_ATTENTION_PEAK_FACTOR = 1.5


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc): what can be allocated without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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
        """``threads``: intra-op threads of every session (None: onnxruntime's default, one per physical core).

        With ``threads`` the sessions also run sequentially on one inter-op
        thread, so that N is the whole CPU budget of this encoder (what a
        Ray actor given N CPUs may use), not N per parallel branch.
        """
        contents = manifest["contents"]
        super().__init__(config, preprocessor, (contents["task"],))
        ort = import_onnxruntime()
        self.root = Path(root)
        self.provider = provider
        self.float_dtype = np.dtype(contents["float_dtype"])
        # What the graph computes in (fp32 / fp16 / fp8 / int8 / w-int8 / w-int4) and whether attention is fused: for reports.
        self.precision = contents.get("precision") or {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(contents["float_dtype"], contents["float_dtype"])
        self.fused = bool(contents.get("fused"))
        self.threads = threads
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
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
        text = {**(config.raw.get("text_config") or {}), **config.raw}
        self.heads = int(text.get("num_attention_heads", 1))

    @property
    def supports_images(self) -> bool:
        return "vision" in self.sessions

    def engine(self) -> str:
        """onnxruntime's version, provider and the artifact's precision (e.g. ``w-int4, fused attention``), for reports."""
        import onnxruntime

        fused = ", fused attention" if self.fused else ""
        return f"onnxruntime {onnxruntime.__version__} ({self.provider}; {self.precision}{fused})"

    def _image_embeds(self, inputs: ModelInputs) -> np.ndarray:
        from jev4.export.onnx_vision import vision_feed

        if inputs.pixel_values is None:
            return np.zeros((0, self.config.hidden_size), dtype=self.float_dtype)
        if "vision" not in self.sessions:
            raise EncodeError(f"{self.root}: a text-only artifact cannot encode images")
        feed = vision_feed(inputs.pixel_values, inputs.image_grid_thw, self.config.vision_config, self.float_dtype)
        self.specs["vision"].check_feed(feed, self.float_dtype.name)
        (embeds,) = self.sessions["vision"].run(None, feed)
        return embeds.astype(self.float_dtype, copy=False)

    def _check_attention_memory(self, batch: int, length: int) -> None:
        """Refuse a batch whose attention would not fit in memory, instead of being killed by the kernel.

        language.onnx computes attention as MatMul-Softmax-MatMul with an
        explicit mask, so one layer holds several [batch, heads, T, T] fp32
        tensors at once: measured on the tiny model (onnxruntime 1.32, CPU),
        peak memory grows by 5.2-5.4 x batch*heads*T^2*4 bytes (T = 2048,
        4096). One 32k-token text on the real model (16 heads) would need
        ~400 GB. The torch backend (SDPA) does not materialise these.
        """
        factor = FUSED_ATTENTION_PEAK_FACTOR if self.fused else ATTENTION_PEAK_FACTOR
        need = int(factor * batch * self.heads * length * length * 4)
        available = available_memory()
        if available is not None and need > available:
            raise EncodeError(
                f"{self.root}: a batch of {batch} x {length} tokens needs about {need / 2**30:.1f} GiB for language.onnx's attention "
                f"(a {length}x{length} score matrix per head; {available / 2**30:.1f} GiB available); "
                "pass a smaller max_length or batch_size, or use the torch backend"
            )

    def _forward(self, inputs: ModelInputs, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feed = language_feed(inputs)
        if self.with_images:
            feed["image_embeds"] = self._image_embeds(inputs)
        elif inputs.pixel_values is not None:
            raise EncodeError(f"{self.root}: a text-only artifact cannot encode images")
        self.specs["language"].check_feed(feed, self.float_dtype.name)
        if self.provider == "cpu":
            self._check_attention_memory(inputs.batch_size, int(inputs.input_ids.shape[1]))
        single, multi = self.sessions["language"].run(None, feed)
        return torch.from_numpy(single).float(), torch.from_numpy(multi).float()
