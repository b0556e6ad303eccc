"""The typed graph of a model program: what the strict parser yields (specs/replay.md §2).

Frozen dataclasses only; nothing here refers back to the archive's text. A ``Ref`` names a value
produced by a graph input or by a node output; symbolic integers (a batch size read with
``aten.sym_size.int``) are values too and are referred to by ``Ref`` as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Ref:
    """A value produced by a graph input or a node output."""

    name: str


@dataclass(frozen=True)
class InputSpec:
    """One graph input. ``kind``: ``parameter``, ``buffer``, ``constant`` or ``user_input``.

    ``target`` is the state name (``model.0.weight``) for parameters, buffers and constants,
    ``None`` for user inputs.
    """

    name: str
    kind: str
    target: str | None


@dataclass(frozen=True)
class OutputSpec:
    """One graph output. ``kind``: ``user_output`` or ``buffer_mutation`` (``target`` the buffer).

    ``name`` is the value returned (``None`` for a constant ``None`` user output).
    """

    name: str | None
    kind: str
    target: str | None


@dataclass(frozen=True)
class Node:
    """One operator call. ``op`` is an allowlisted name such as ``aten.linear.default``.

    ``args`` and ``kwargs`` hold ``Ref``, ``None``, ``bool``, ``int``, ``float``, ``str``,
    ``torch.dtype``, ``torch.device``, ``torch.layout``, ``torch.memory_format`` or tuples of
    those. ``outputs`` names the values the call produces, in the op's return order (a list
    return is flattened); ``None`` where the result is not given a name.
    ``module_stack`` holds the dotted module paths the call ran in, outermost first.
    """

    name: str
    op: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    outputs: tuple[str | None, ...]
    module_stack: tuple[str, ...]


@dataclass(frozen=True)
class Graph:
    inputs: tuple[InputSpec, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[OutputSpec, ...]

    @property
    def user_inputs(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs if i.kind == "user_input")
