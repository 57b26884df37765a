"""The CPU a result was computed on: torch's kernels (oneDNN, MKL, ATen's vectorized loops) pick their code path
by instruction set, so the same code, params and package versions give other float summation orders, and so
other last digits, on another CPU kind."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from pathlib import Path

import torch

from pipeline.infra.device import cuda_numerics

# The instruction-set extensions that change which kernels torch runs on x86.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def _cpuinfo(cpuinfo: str | Path) -> dict[str, str] | None:
    """The fields of ``cpuinfo`` (the last processor's), None where that file does not exist."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    return dict(
        (key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in text.splitlines()) if value
    )


def kernel_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str] | None:
    """Which of :data:`KERNEL_FLAGS` the CPU has, in that order (None where ``cpuinfo`` does not exist)."""
    fields = _cpuinfo(cpuinfo)
    if fields is None:
        return None
    flags = set(fields.get("flags", "").split())
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def cpu_kind(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """``"<model name> (<flags>)"``: the CPU's model and which of :data:`KERNEL_FLAGS` it has, read from
    ``cpuinfo`` (the platform's processor name where that file does not exist)."""
    fields, found = _cpuinfo(cpuinfo), kernel_flags(cpuinfo)
    if fields is None:
        return f"{platform.processor() or platform.machine()} (flags unknown)"
    return f"{fields.get('model name', platform.machine())} ({' '.join(found) or 'none of ' + ', '.join(KERNEL_FLAGS)})"


def environment(learner_threads: int | None = None) -> str:
    """The versions, torch thread count and CPU kind a result was computed with (the same code and params gave
    another FP model under other package versions, and on another CPU kind: README, Reproducibility), and the
    GPU with its numerics where the process used one. ``learner_threads``: the thread count the learners ran
    on where it differs from this process's (pipeline.infra.workers runs them on one)."""
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("torch", "diffusers", "numpy"))
    threads = f"{torch.get_num_threads()} torch threads"
    if learner_threads is not None:
        threads += f", the learners on {learner_threads}"
    gpu = cuda_numerics()
    return f"{versions}; {threads}; CPU {cpu_kind()}" + (f"; {gpu}" if gpu else "")
