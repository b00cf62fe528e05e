"""Running a step in a child process and measuring its wall time and peak resident memory.

A child process gives a clean peak-RSS figure (``ru_maxrss`` of the child)
that the parent's own imports and caches do not inflate.
"""

from __future__ import annotations

import os
import platform
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
    """Run ``command`` and read its own resource usage (``wait4``), so earlier children don't count."""
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ProcessMeasure(command, seconds, usage.ru_maxrss / 1024**2, proc.returncode)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def machine_summary() -> dict[str, str | int | float]:
    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
