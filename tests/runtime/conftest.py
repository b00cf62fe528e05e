import pytest

from jev4.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def runtime_source(tmp_path_factory):
    """Tiny checkpoint the runtime tests export from; never modified."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("rt-src") / "tiny", seed=2)


@pytest.fixture(scope="session")
def runtime_reference(runtime_source):
    """The torch reference with unmerged adapters, fp32."""
    import jev4.runtime as rt

    return rt.load(runtime_source, backend="torch", dtype="fp32")


@pytest.fixture(scope="session")
def onnx_artifacts(tmp_path_factory, runtime_source):
    """fp32 ONNX artifacts (text + vision) for every task, exported once."""
    from jev4.export.onnx import OnnxExportSettings, export_onnx

    root = tmp_path_factory.mktemp("onnx")
    return {
        task: export_onnx(OnnxExportSettings(model=str(runtime_source), adapter=task, out=str(root / task)), progress=False)
        for task in ("retrieval", "text-matching", "code")
    }


def _cuda_provider_skip_reason() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider here (CPU build); runs on a GPU host with onnxruntime-gpu"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def provider(request):
    """Parity tests run on the CPU provider everywhere and on the CUDA provider where it exists."""
    if request.param == "cuda":
        reason = _cuda_provider_skip_reason()
        if reason:
            pytest.skip(reason)
        import onnxruntime

        if hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()
    return request.param
