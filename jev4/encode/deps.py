"""The optional packages corpus encoding needs, imported when first used, with the pip command when absent.

``import jev4`` and ``import jev4.encode`` need neither: the core install
(``pip install jev4``) has no pyarrow and no Ray.
"""

from __future__ import annotations

from types import ModuleType

from jev4.errors import MissingDependencyError

RAY_HINT = "pip install 'jev4[ray]' (ray[data]==2.60.0, which brings pyarrow)"
PYARROW_HINT = "pip install pyarrow, or pip install 'jev4[ray]' (which brings it)"


def pyarrow() -> ModuleType:
    """``pyarrow`` (shards are Parquet files, written and read through it)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401  (the submodule is what writes and reads)
    except ImportError as exc:
        raise MissingDependencyError(f"corpus encoding writes Parquet and needs pyarrow ({exc}): {PYARROW_HINT}") from None
    return pa


def ray() -> ModuleType:
    """``ray`` with Ray Data (``--ray``)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"--ray needs Ray Data ({exc}): {RAY_HINT}") from None
    return ray
