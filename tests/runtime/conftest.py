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


class ParityBound:
    """How close an fp32 artifact must stay to the fp32 torch reference: cosine per row and max |difference|.

    ``check`` asserts both over [N, D] vectors (or a list of [T, D] multi-vectors),
    naming the bound and the measured values on failure.
    """

    def __init__(self, name: str, cos_min: float, max_abs: float | None, token_cos_min: float | None = None):
        self.name, self.cos_min, self.max_abs = name, cos_min, max_abs
        self.token_cos_min = cos_min if token_cos_min is None else token_cos_min

    def check(self, got, ref, what: str = "") -> None:
        import torch

        multi = isinstance(ref, list)
        pairs = list(zip(got, ref, strict=True)) if multi else [(got, ref)]
        bar = self.token_cos_min if multi else self.cos_min
        for g, r in pairs:
            assert tuple(g.shape) == tuple(r.shape), f"{what}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
        cos = min(torch.nn.functional.cosine_similarity(g.double(), r.double(), dim=-1).min().item() for g, r in pairs)
        diff = max((g.double() - r.double()).abs().max().item() for g, r in pairs)
        assert cos >= bar, f"{what}: min cosine 1 - {1 - cos:.3g} < {self.name} bound 1 - {1 - bar:.3g} (max |diff| {diff:.3g})"
        if self.max_abs is not None:
            assert diff <= self.max_abs, f"{what}: max |diff| {diff:.3g} > {self.name} bound {self.max_abs:g} (min cosine 1 - {1 - cos:.3g})"


# fp32 ONNX on onnxruntime's CPU provider vs the fp32 torch reference (unmerged adapters): measured on the
# tiny checkpoint 1 - cos <= 1e-12 per vector and per token, max |diff| <= 6e-7. A 1% error in the LoRA
# scale of the export gives 1 - cos ~5e-5 (single) / 2e-4 (tokens) and max |diff| ~3e-3: far outside.
CPU_FP32 = ParityBound("cpu-fp32", cos_min=1 - 1e-9, max_abs=1e-5)
# The CUDA provider (GPU-only tests): cuDNN/cuBLAS kernels, TF32 where allowed, other reduction orders.
CUDA_FP32 = ParityBound("cuda-fp32", cos_min=0.9999, max_abs=None, token_cos_min=0.999)


@pytest.fixture
def fp32_bound(provider):
    """The parity bound for an fp32 artifact on ``provider``: tight on CPU, looser on CUDA."""
    return CPU_FP32 if provider == "cpu" else CUDA_FP32


@pytest.fixture
def cpu_fp32_bound():
    """The CPU fp32 bound, for tests that run on the CPU provider only."""
    return CPU_FP32
