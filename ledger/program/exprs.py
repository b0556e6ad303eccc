"""Symbolic-size text and guards, recognized by grammar and never evaluated (specs/replay.md §2.2).

``torch.export.load`` hands every ``expr_str`` to ``sympy.sympify`` (an ``eval``) and runs
``guards_code`` through ``exec``. Here an ``expr_str`` must match the ``srepr`` forms torch
writes (``Symbol('s0', positive=True, integer=True)``, ``Integer(4)``, ``Mul(..)``, ``Add(..)``,
``Min(..)``, ``Max(..)``, ``FloorDiv(..)``, ``Mod(..)``), checked by a recursive-descent reader that
builds nothing; a guard must be a comparison of two integer expressions (``+ - * // %``, parentheses)
of input sizes and integers, which ``check_inputs`` enforces with its own code. Anything else refuses the program.
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
class Size:
    """``L['name'].size()[dim]``: dim ``dim`` of the program's user input ``name``."""

    name: str
    dim: int


@dataclass(frozen=True)
class Arith:
    """``(left op right)`` with ``op`` one of ``+ - * // %``, on sizes and integers."""

    op: str
    left: "Term"
    right: "Term"


Term = Size | Arith | int


@dataclass(frozen=True)
class Guard:
    """``left op right``, ``op`` a comparison; each side an integer expression of input sizes."""

    left: Term
    op: str
    right: Term

    def sizes(self) -> list[Size]:
        """Every input size the guard reads."""
        out: list[Size] = []
        stack: list[Term] = [self.left, self.right]
        while stack:
            t = stack.pop()
            if isinstance(t, Size):
                out.append(t)
            elif isinstance(t, Arith):
                stack += [t.left, t.right]
        return out


MAX_GUARD = 256
# ``L['x'][i]`` is element ``i`` of a tuple input ``x``, which torch.export names ``x_i`` among the
# program's user inputs (a model of parts, specs/training.md §5.1).
_TOKEN = re.compile(
    r" *(?:(?P<size>L\['(?P<name>[A-Za-z_][A-Za-z0-9_]{0,63})'\](?:\[(?P<item>[0-9]{1,2})\])?\.size\(\)"
    r"\[(?P<dim>[0-9]{1,2})\])|(?P<int>-?[0-9]{1,19})|(?P<cmp>==|!=|<=|>=|<|>)|(?P<op>//|[-+*%])|(?P<paren>[()]))")
_COMPARE = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<=": lambda a, b: a <= b,
            ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def _tokens(s: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(s):
        m = _TOKEN.match(s, i)
        if m is None or m.end() == i:
            raise ProgramError(f"model program: guard {s[:80]!r} is not a comparison of input sizes; refused, never run")
        i = m.end()
        if m["size"]:
            item = m["item"]
            out.append(("term", Size(m["name"] if item is None else f"{m['name']}_{int(item)}", int(m["dim"]))))
        elif m["int"]:
            out.append(("term", int(m["int"])))
        else:
            kind = next(k for k in ("cmp", "op", "paren") if m[k])
            out.append((kind, m[kind]))
    return out


class _Reader:
    """Recursive descent over ``expr := term (("+"|"-") term)*``, ``term := atom (("*"|"//"|"%") atom)*``,
    ``atom := size | int | "(" expr ")"``: builds the tree, evaluates nothing."""

    def __init__(self, s: str) -> None:
        self.s, self.toks, self.i = s, _tokens(s), 0

    def refuse(self) -> ProgramError:
        return ProgramError(f"model program: guard {self.s[:80]!r} is not a comparison of input sizes; refused, never run")

    def peek(self) -> tuple[str, Any] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, Any]:
        tok = self.peek()
        if tok is None:
            raise self.refuse()
        self.i += 1
        return tok

    def expr(self, depth: int, ops: tuple[str, ...] = ("+", "-")) -> Term:
        if depth > MAX_DEPTH:
            raise self.refuse()
        sub = (lambda: self.expr(depth + 1, ("*", "//", "%"))) if ops == ("+", "-") else (lambda: self.atom(depth + 1))
        left = sub()
        while (tok := self.peek()) is not None and tok[0] == "op" and tok[1] in ops:
            self.i += 1
            left = Arith(tok[1], left, sub())
        return left

    def atom(self, depth: int) -> Term:
        kind, value = self.take()
        if kind == "term":
            return value
        if (kind, value) != ("paren", "("):
            raise self.refuse()
        inner = self.expr(depth + 1)
        if self.take() != ("paren", ")"):
            raise self.refuse()
        return inner


def parse_guard(s: Any) -> Guard:
    """A guard of the one kind accepted: two integer expressions of input sizes, compared."""
    if type(s) is not str or len(s) > MAX_GUARD:
        raise ProgramError("model program: a guard is not a short string")
    r = _Reader(s)
    left = r.expr(0)
    kind, op = r.take()
    if kind != "cmp":
        raise r.refuse()
    right = r.expr(0)
    if r.peek() is not None:
        raise r.refuse()
    return Guard(left, op, right)


def holds(guard: Guard, sizes: dict[str, tuple[int, ...]]) -> bool:
    """The guard on these input sizes, by this module's own arithmetic (``//`` and ``%`` floor, as
    sympy's ``FloorDiv`` and ``Mod``; by zero the guard fails)."""
    def value(t: Term) -> int:
        if isinstance(t, int):
            return t
        if isinstance(t, Size):
            if t.name not in sizes or t.dim >= len(sizes[t.name]):
                raise ProgramError(f"model program: a guard names input {t.name!r} dim {t.dim}, which it does not have")
            return sizes[t.name][t.dim]
        a, b = value(t.left), value(t.right)
        if t.op in ("//", "%") and b == 0:
            raise ProgramError(f"model program: guard {guard} divides by zero")
        return {"+": a + b, "-": a - b, "*": a * b}[t.op] if t.op in "+-*" else (a // b if t.op == "//" else a % b)

    return _COMPARE[guard.op](value(guard.left), value(guard.right))
