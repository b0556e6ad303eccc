"""The software and hardware settings that bit-exact replay depends on (specs/training.md §6).

PyTorch only promises bit-identical results for the same version, thread count, CPU kernels
and library settings, so RunStarted records them and a verifier compares before it claims
exactness rather than tolerance.
"""

from __future__ import annotations

import platform
import re
import sys

import torch

Scalar = str | int | float | bool | None


def _library_versions() -> tuple[str | None, str | None]:
    """(MKL, oneDNN) version strings as the torch build reports them; None where absent.

    torch exposes no version getters for either, only this report, so it is parsed.
    """
    mkl = onednn = None
    for line in torch.__config__.parallel_info().splitlines():
        line = line.strip()
        if mkl is None and "Math Kernel Library" in line:
            mkl = line
        m = re.search(r"MKL-DNN (v[\w.]+)|oneDNN (v[\w.]+)", line)
        if onednn is None and m:
            onednn = m.group(1) or m.group(2)
    return mkl, onednn


def environment() -> dict[str, Scalar]:
    """The RunStarted ``environment`` map: flat, scalar values only (the ledger schema's scalar-map)."""
    mkl_version, onednn_version = _library_versions()
    return {
        "torch": str(torch.__version__),
        "torch_git": str(torch.version.git_version),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "byteorder": sys.byteorder,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "mkl_available": torch.backends.mkl.is_available(),
        "mkl_version": mkl_version,
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "mkldnn_version": onednn_version,
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = ["environment"]
