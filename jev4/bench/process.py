"""Running a step in a child process and measuring its wall time and peak resident memory.

A child process gives a clean peak-RSS figure (``ru_maxrss`` of the child)
that the parent's own imports and caches do not inflate.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessMeasure:
    command: list[str]
    seconds: float
    peak_rss_gib: float
    returncode: int


def measure_child(command: list[str]) -> ProcessMeasure:
    """Run ``command``; peak RSS is the largest of this process's children (run one at a time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(command, check=False)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        peak_kib = before  # ru_maxrss is a max over all children so far; run benchmarks in a fresh parent
    return ProcessMeasure(command, seconds, peak_kib / 1024**2, proc.returncode)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def machine_summary() -> dict[str, str | int | float]:
    import os

    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
