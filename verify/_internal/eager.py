"""An eager-only stand-in for ``torch._dynamo`` inside a replay worker.

Why: torch's optimizers call two dynamo entry points on every use, ``torch._dynamo.disable`` (when a
param group is added) and ``torch._dynamo.graph_break`` (in ``step``), and importing dynamo for
them costs about 2 s of a worker's start here (more than torch itself), for markers that do
nothing outside a compiled region. A worker never compiles: it runs the recorded steps eagerly. In
eager mode ``disable(fn)`` calls ``fn`` unchanged and ``graph_break()`` does nothing, so serving
those two here changes no bit of a replay (the bit-exact replay tests check it). Any other use
loads the real ``torch._dynamo`` on first access and is served by it from then on.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Callable

NAME = "torch._dynamo"


class _EagerDynamo(types.ModuleType):
    @staticmethod
    def disable(fn: Callable[..., Any] | None = None, recursive: bool = True, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    @staticmethod
    def graph_break(*_: Any, **__: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(_real(), name)


_STANDIN = _EagerDynamo(NAME)


def _real() -> types.ModuleType:
    import torch

    if sys.modules.get(NAME) is _STANDIN:
        del sys.modules[NAME]
    if torch.__dict__.get("_dynamo") is _STANDIN:
        del torch.__dict__["_dynamo"]
    return importlib.import_module(NAME)


def install() -> None:
    """Serve ``torch._dynamo`` eagerly until something needs the real one (before its first import)."""
    import torch

    if NAME not in sys.modules:
        sys.modules[NAME] = _STANDIN
        torch._dynamo = _STANDIN  # type: ignore[attr-defined]
