"""The user's own gradient clipping, recorded instead of silently changing the step
(specs/training.md §3.3).

``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` are how training loops clip. While a
governed run is active they are replaced, in ``torch.nn.utils`` and ``torch.nn.utils.clip_grad``,
by wrappers that call torch's own function unchanged and then tell each active run what was
clipped and how, so that the step records it and replay applies the same call. A clip reached by
another route (a name imported before the run started, a hand-written ``p.grad.mul_``) is not
seen here: the recorder then finds the gradient's version counter moved since backward and
refuses the step, naming this remedy.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Protocol

import torch
import torch.nn.utils as nn_utils
import torch.nn.utils.clip_grad as clip_grad
from torch import Tensor

__all__ = ["ClipListener", "listen", "unlisten"]

_ORIGINAL_NORM = clip_grad.clip_grad_norm_
_ORIGINAL_VALUE = clip_grad.clip_grad_value_
_LOCK = threading.Lock()
_LISTENERS: list["ClipListener"] = []


class ClipListener(Protocol):
    """What a governed run implements to hear of a clip: the tensors about to be clipped (a run over
    torch.distributed ranks reduces its gradients first, so that the clip sees the step's gradient, as under
    DDP), then the tensors clipped, the call and torch's result."""

    def clipping(self, params: list[Tensor]) -> None: ...

    def clipped(self, params: list[Tensor], call: dict[str, Any], total_norm: float | None) -> None: ...


def _before(params: list[Tensor]) -> None:
    for listener in list(_LISTENERS):
        listener.clipping(params)


def _tensors(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """torch's ``clip_grad_norm_``, then the call is reported to every active governed run."""
    params = _tensors(parameters)
    _before(params)
    total = _ORIGINAL_NORM(params, max_norm, norm_type, error_if_nonfinite, foreach)
    call = {"kind": "norm", "max_norm": float(max_norm), "norm_type": float(norm_type),
            "error_if_nonfinite": bool(error_if_nonfinite), "foreach": foreach}
    for listener in list(_LISTENERS):
        listener.clipped(params, call, float(total))
    return total


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """torch's ``clip_grad_value_``, then the call is reported to every active governed run."""
    params = _tensors(parameters)
    _before(params)
    _ORIGINAL_VALUE(params, clip_value, foreach)
    call = {"kind": "value", "clip_value": float(clip_value), "foreach": foreach}
    for listener in list(_LISTENERS):
        listener.clipped(params, call, None)


def _install(norm: Any, value: Any) -> None:
    for module in (nn_utils, clip_grad):
        module.clip_grad_norm_ = norm  # type: ignore[attr-defined]
        module.clip_grad_value_ = value  # type: ignore[attr-defined]


def listen(listener: ClipListener) -> None:
    """Report clips to ``listener`` until ``unlisten``; the first listener installs the wrappers."""
    with _LOCK:
        if not _LISTENERS:
            _install(clip_grad_norm_, clip_grad_value_)
        _LISTENERS.append(listener)


def unlisten(listener: ClipListener) -> None:
    """Stop reporting to ``listener``; the last one gone puts torch's functions back."""
    with _LOCK:
        if listener in _LISTENERS:
            _LISTENERS.remove(listener)
        if not _LISTENERS:
            _install(_ORIGINAL_NORM, _ORIGINAL_VALUE)


def replay_clip(params: list[Tensor], call: dict[str, Any]) -> float | None:
    """Apply a recorded clip with torch's own functions (the self-check and unlearning replay)."""
    with torch.no_grad():
        if call["kind"] == "norm":
            return float(_ORIGINAL_NORM(params, call["max_norm"], call["norm_type"], False, call["foreach"]))
        _ORIGINAL_VALUE(params, call["clip_value"], call["foreach"])
        return None
