"""``jev4.runtime.load`` on jina-clip-v2: the torch reference for a checkpoint, ``ClipV2OnnxEncoder`` for an ONNX artifact.

Registered as the family's ``runtime_loader`` (``jev4.families.registry``);
``load`` hands over any local directory whose config.json says
``model_type: jina_clip``, which is true of the checkpoint and of every
artifact ``jev4-export`` writes from it.
"""

from __future__ import annotations

from pathlib import Path

from jev4.atomic import check_not_temp_dir
from jev4.errors import ManifestError, SettingsError
from jev4.export.manifest import MANIFEST_NAME, read_manifest, verify_manifest
from jev4.runtime.loader import LoadRequest, check_device, set_torch_threads, with_output_codec

__all__ = ["load"]

GRAPHS = ("text.onnx", "vision.onnx", "model.onnx")


def load(root: Path, request: LoadRequest):
    """The encoder for ``root``; options and backends this family cannot honour are refused in one line."""
    from jev4.families.jina_clip_v2.config import load_config
    from jev4.families.jina_clip_v2.encoder import ClipV2Encoder
    from jev4.families.jina_clip_v2.onnx_encoder import ClipV2OnnxEncoder, is_clip_v2_artifact

    check_not_temp_dir(root)
    if request.v4_only:
        raise SettingsError(f"{root}: is jina-clip-v2; {', '.join(request.v4_only)} apply to jina-embeddings-v4 only")
    manifest = read_manifest(root) if (root / MANIFEST_NAME).is_file() else None
    if manifest is None:
        graphs = [name for name in GRAPHS if (root / name).is_file()]
        if graphs:
            raise ManifestError(f"{root}: holds {', '.join(graphs)} but no {MANIFEST_NAME}; re-export it (without the manifest its files cannot be checked)")
        if request.backend not in ("auto", "torch"):
            raise ManifestError(f"{root}: is a jina-clip-v2 checkpoint, which backend {request.backend!r} cannot run; use backend='torch' or export it (jev4-export --model {root})")
        check_device(request.device)
        set_torch_threads(request.threads)
        encoder = ClipV2Encoder.from_pretrained(root, dtype=request.dtype, device=request.device)
        encoder.threads = request.threads
        return encoder
    if not is_clip_v2_artifact(manifest):
        raise ManifestError(f"{root}: config.json says jina-clip-v2 but the manifest is a {manifest.get('kind')!r} artifact jev4 cannot run for this family")
    if request.backend not in ("auto", "onnxruntime"):
        raise ManifestError(f"{root}: is a jina-clip-v2 ONNX artifact; backend {request.backend!r} cannot run it: use backend='onnxruntime'")
    if request.verify:
        verify_manifest(root)
    return with_output_codec(ClipV2OnnxEncoder(root, manifest, load_config(root), provider=request.provider, threads=request.threads), root)
