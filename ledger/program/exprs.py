"""Symbolic-size text and guards, recognized by grammar and never evaluated (specs/replay.md §2.2).

``torch.export.load`` hands every ``expr_str`` to ``sympy.sympify`` (an ``eval``) and runs
``guards_code`` through ``exec``. Here an ``expr_str`` must match the ``srepr`` forms torch
writes (``Symbol('s0', positive=True, integer=True)``, ``Integer(4)``, ``Mul(..)``, ``Add(..)``,
``Min(..)``, ``Max(..)``, ``FloorDiv(..)``, ``Mod(..)``), checked by a recursive-descent reader that
builds nothing; a guard must be a comparison of input sizes and integers, which ``check_inputs``
enforces with its own code. Anything else refuses the program.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ProgramError

MAX_EXPR = 4096
MAX_DEPTH = 32
_FUNCS = ("Add", "Mul", "Min", "Max", "FloorDiv", "Mod")
_SYMBOL = re.compile(r"Symbol\('[a-z][a-z0-9_]{0,63}'(?:, (?:positive|integer|nonnegative|real)=True)*\)")
_INTEGER = re.compile(r"Integer\(-?[0-9]{1,19}\)")
_FUNC = re.compile(r"(" + "|".join(_FUNCS) + r")\(")
_BARE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _expr(s: str, i: int, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise ProgramError("model program: a symbolic size is nested too deeply")
    for pat in (_SYMBOL, _INTEGER):
        m = pat.match(s, i)
        if m:
            return m.end()
    m = _FUNC.match(s, i)
    if not m:
        raise ProgramError(f"model program: symbolic size {s[:80]!r} is not one of the accepted forms")
    i = _expr(s, m.end(), depth + 1)
    while s.startswith(", ", i):
        i = _expr(s, i + 2, depth + 1)
    if not s.startswith(")", i):
        raise ProgramError(f"model program: symbolic size {s[:80]!r} is not one of the accepted forms")
    return i + 1


def check_expr(s: Any) -> None:
    """Refuse ``s`` unless it is a symbolic-size expression in torch's ``srepr`` form (or a bare symbol)."""
    if type(s) is not str or len(s) > MAX_EXPR:
        raise ProgramError("model program: a symbolic size is not a short string")
    if _BARE.fullmatch(s):
        return
    if _expr(s, 0, 0) != len(s):
        raise ProgramError(f"model program: symbolic size {s[:80]!r} is not one of the accepted forms")


def check_all_exprs(doc: Any, depth: int = 0) -> None:
    """Every ``expr_str`` anywhere in the model JSON, and every range-constraint key, by grammar."""
    stack = [doc]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "expr_str":
                    check_expr(v)
                else:
                    stack.append(v)
        elif isinstance(o, list):
            stack.extend(o)


@dataclass(frozen=True)
class Guard:
    """``left op right``; a side is ``(input name, dim)`` or an int."""

    left: tuple[str, int] | int
    op: str
    right: tuple[str, int] | int


# ``L['x'][i]`` is element ``i`` of a tuple input ``x``, which torch.export names ``x_i`` among the
# program's user inputs (a model of parts, specs/training.md §5.1).
_SIDE = (r"(?:L\['([A-Za-z_][A-Za-z0-9_]{0,63})'\](?:\[([0-9]{1,2})\])?\.size\(\)\[([0-9]{1,2})\]"
         r"|(-?[0-9]{1,19}))")
_GUARD = re.compile(_SIDE + r" (==|!=|<=|>=|<|>) " + _SIDE)


def parse_guard(s: Any) -> Guard:
    """A guard of the one kind accepted: sizes of inputs compared with each other or with ints."""
    if type(s) is not str or len(s) > 256:
        raise ProgramError("model program: a guard is not a short string")
    m = _GUARD.fullmatch(s)
    if m is None:
        raise ProgramError(f"model program: guard {s[:80]!r} is not a comparison of input sizes; refused, never run")
    a_name, a_item, a_dim, a_int, op, b_name, b_item, b_dim, b_int = m.groups()
    return Guard(_side(a_name, a_item, a_dim, a_int), op, _side(b_name, b_item, b_dim, b_int))


def _side(name: str | None, item: str | None, dim: str | None, value: str | None) -> tuple[str, int] | int:
    if name is None:
        return int(value)  # type: ignore[arg-type]
    return (name if item is None else f"{name}_{int(item)}", int(dim))  # type: ignore[arg-type]


def holds(guard: Guard, sizes: dict[str, tuple[int, ...]]) -> bool:
    def value(side: tuple[str, int] | int) -> int:
        if isinstance(side, int):
            return side
        name, dim = side
        if name not in sizes or dim >= len(sizes[name]):
            raise ProgramError(f"model program: a guard names input {name!r} dim {dim}, which it does not have")
        return sizes[name][dim]

    a, b = value(guard.left), value(guard.right)
    return {"==": a == b, "!=": a != b, "<=": a <= b, ">=": a >= b, "<": a < b, ">": a > b}[guard.op]
