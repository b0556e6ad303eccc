"""Process-wide torch settings a governed run holds while it trains, each restored at the run's end.

Why: with ``torch.use_deterministic_algorithms(True)`` (which a governed run turns on, so that replay is
bit for bit) torch also fills every freshly allocated tensor with NaN (or the integer maximum) by
default (``torch.utils.deterministic.fill_uninitialized_memory``): a debugging aid that exposes a kernel
reading memory it never wrote. It costs a pass over every ``empty`` allocation: several hundred
``fill_`` calls a step on the 6-block transformer of ``bench/overhead.py``, about 3% of its step time.
It changes no value a correct kernel computes (a kernel writes its output before anything reads it),
so what is recorded and what replay computes are the same with or without it; the run turns it off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.utils.deterministic as _deterministic

__all__ = ["no_uninitialized_fill"]


@contextlib.contextmanager
def no_uninitialized_fill() -> Iterator[None]:
    """``fill_uninitialized_memory`` off, restored as it was on exit."""
    saved = _deterministic.fill_uninitialized_memory
    _deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        _deterministic.fill_uninitialized_memory = saved
