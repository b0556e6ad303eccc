"""Whether this machine may claim bit-exact replay of a run (specs/training.md §7).

PyTorch promises bit-identical results only for the same version, thread count, CPU kernels and
math-library settings. The verifier sets the thread count and deterministic mode it controls,
then compares the rest with the run's recorded environment.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

#: The recorded keys that must be equal for an exact claim (specs/training.md §7).
EXACT_KEYS = (
    "torch", "num_threads", "cpu_capability", "deterministic_algorithms", "mkl_version", "mkldnn_enabled",
    "mkldnn_version", "float32_matmul_precision",
)


def _library_versions() -> tuple[str | None, str | None]:
    mkl = onednn = None
    for line in torch.__config__.parallel_info().splitlines():
        line = line.strip()
        if mkl is None and "Math Kernel Library" in line:
            mkl = line
        m = re.search(r"MKL-DNN (v[\w.]+)|oneDNN (v[\w.]+)", line)
        if onednn is None and m:
            onednn = m.group(1) or m.group(2)
    return mkl, onednn


def set_deterministic(mode: bool) -> None:
    """ATen's deterministic-algorithms flag, what ``torch.are_deterministic_algorithms_enabled`` reads.

    Why not ``torch.use_deterministic_algorithms``: it also sets ``torch._inductor.config.deterministic``,
    and importing that imports inductor and dynamo (about 2 s and 100 MB here, once per process: in a
    replay worker it was a third of a short run's replay time, and code no replay uses). Replay runs
    the program's ATen calls, never compiled code, so ATen's flag is the one that decides its bits.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # a torch without the private setter: the public call, at its cost
        torch.use_deterministic_algorithms(mode)
    else:
        setter(mode, warn_only=False)


def prepare(recorded: Mapping[str, Any]) -> None:
    """Match what the verifier controls: threads as recorded, deterministic algorithms on."""
    threads = recorded.get("num_threads")
    if type(threads) is int and 1 <= threads <= 1024 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    set_deterministic(True)


def current() -> dict[str, Any]:
    mkl, onednn = _library_versions()
    return {
        "torch": str(torch.__version__),
        "num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkl_version": mkl,
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "mkldnn_version": onednn,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def differences(recorded: Mapping[str, Any]) -> list[str]:
    """The exact-replay keys whose recorded value differs from this machine's, as 'key: a != b'."""
    now = current()
    return [f"{k}: recorded {recorded.get(k)!r}, here {now[k]!r}" for k in EXACT_KEYS if recorded.get(k) != now[k]]
