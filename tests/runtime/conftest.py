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
