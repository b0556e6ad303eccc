"""Process-wide torch settings a governed run holds while it trains, each restored at the run's end.

Why: with ``torch.use_deterministic_algorithms(True)`` (which a governed run turns on, so that replay is
bit for bit) torch also fills every freshly allocated tensor with NaN (or the integer maximum) by
default (``torch.utils.deterministic.fill_uninitialized_memory``): a debugging aid that exposes a kernel
reading memory it never wrote. It costs a pass over every ``empty`` allocation: several hundred
``fill_`` calls a step on the 6-block transformer of ``bench/overhead.py``, about 3% of its step time.
It changes no value a correct kernel computes (a kernel writes its output before anything reads it),
so what is recorded and what replay computes are the same with or without it; the run turns it off.

``release_setup_memory``: a run's setup (``torch.export`` tracing, the program's round trip) allocates and
frees a few hundred MB of small Python and tensor objects; glibc keeps the freed arenas mapped, so
the process would carry them through training (about 120 MB on bench/overhead.py's transformer, a
quarter of its plain peak). Handing them back once, after setup, costs one ``gc.collect`` and changes
nothing the run computes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from typing import Iterator

import torch
import torch.utils.deterministic as _deterministic

__all__ = ["no_uninitialized_fill", "release_setup_memory", "torch_deterministic"]


@contextlib.contextmanager
def torch_deterministic() -> Iterator[None]:
    """torch's deterministic algorithms on, restored as they were on exit: replay is bit for bit."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


@contextlib.contextmanager
def no_uninitialized_fill() -> Iterator[None]:
    """``fill_uninitialized_memory`` off, restored as it was on exit."""
    saved = _deterministic.fill_uninitialized_memory
    _deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        _deterministic.fill_uninitialized_memory = saved


def _libc_trim() -> "ctypes._NamedFuncPointer | None":
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:  # not glibc, or no libc to load: nothing to trim
        return None


_TRIM = _libc_trim()


def release_setup_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere)."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
