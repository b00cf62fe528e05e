"""Choosing onnxruntime execution providers, with errors that list what is available.

onnxruntime silently falls back to the CPU when a requested provider cannot
load its libraries (e.g. CUDA without cuBLAS), so the providers a session
really got are checked after it is created.
"""

from __future__ import annotations

import logging

from jev4.errors import MissingDependencyError, ProviderError

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
INSTALL_HINT = {
    "cpu": "pip install 'jev4[onnx]'",
    "cuda": "pip uninstall onnxruntime && pip install 'jev4[gpu]' (onnxruntime-gpu, CUDA 12/13 and cuDNN 9)",
    "tensorrt": "install onnxruntime-gpu and TensorRT (pip install 'jev4[gpu,tensorrt]')",
}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(f"the onnxruntime backend needs onnxruntime: {INSTALL_HINT['cpu']}") from exc
    return onnxruntime


def provider_list(provider: str) -> list[str]:
    """The onnxruntime provider chain for ``cpu``, ``cuda`` or ``tensorrt``; a missing one is an error."""
    ort = import_onnxruntime()
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise ProviderError(
            f"execution provider {wanted} is not available in this onnxruntime build "
            f"(available: {available}); {INSTALL_HINT[provider]}"
        )
    return PROVIDERS[provider]


def check_session_providers(session, provider: str, where: str) -> None:
    """Fail if onnxruntime quietly dropped the requested provider when building the session."""
    wanted = PROVIDERS[provider][0]
    got = session.get_providers()
    if wanted not in got:
        raise ProviderError(f"{where}: asked for {wanted} but the session runs on {got} (its libraries failed to load?)")
