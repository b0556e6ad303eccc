"""The program loader's guards (specs/replay.md §2.2): integer expressions of input sizes, parsed by
the loader's own grammar and evaluated by its own arithmetic, never by ``exec``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.ledger.program import ProgramError
from gradledger.ledger.program.exprs import MAX_GUARD, Arith, Guard, Size, holds, parse_guard

SIZES = {"x": (6, 4), "x_0": (6, 12), "x_1": (6, 12), "profiles": (6, 3)}
OPS = ["+", "-", "*", "//", "%"]
CMPS = ["==", "!=", "<=", ">=", "<", ">"]


def _render(t: Any) -> str:
    """A term as torch's guards_code writes it: sizes as ``L['x'].size()[d]`` (tuple parts as
    ``L['x'][j]``), binary operations parenthesized."""
    if isinstance(t, int):
        return str(t)
    if isinstance(t, Size):
        base, _, item = t.name.partition("_")
        return f"L['{base}']" + (f"[{item}]" if item else "") + f".size()[{t.dim}]"
    return f"({_render(t.left)} {t.op} {_render(t.right)})"


def _value(t: Any) -> int | None:
    """Python's own arithmetic on the same tree (None where a divisor is 0)."""
    if isinstance(t, int):
        return t
    if isinstance(t, Size):
        return SIZES[t.name][t.dim]
    a, b = _value(t.left), _value(t.right)
    if a is None or b is None or (t.op in ("//", "%") and b == 0):
        return None
    return {"+": a + b, "-": a - b, "*": a * b, "//": a // b if b else 0, "%": a % b if b else 0}[t.op]


sizes = st.sampled_from([Size(n, d) for n, shape in SIZES.items() for d in range(len(shape))])
terms = st.recursive(sizes | st.integers(0, 10**6),
                     lambda inner: st.builds(Arith, st.sampled_from(OPS), inner, inner), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(terms, st.sampled_from(CMPS), terms)
def test_rendered_guards_parse_back_and_evaluate_as_python_does(left: Any, op: str, right: Any) -> None:
    text = f"{_render(left)} {op} {_render(right)}"
    if len(text) > MAX_GUARD:  # bounded before it is read: a longer guard is refused whatever it says
        with pytest.raises(ProgramError, match="not a short string"):
            parse_guard(text)
        return
    guard = parse_guard(text)
    assert guard == Guard(left, op, right)
    a, b = _value(left), _value(right)
    if a is None or b is None:
        with pytest.raises(ProgramError, match="divides by zero"):
            holds(guard, SIZES)
    else:
        assert holds(guard, SIZES) == {"==": a == b, "!=": a != b, "<=": a <= b, ">=": a >= b,
                                       "<": a < b, ">": a > b}[op]


def test_what_torch_writes_for_a_decoder_of_parts_is_accepted() -> None:
    # GPT-2's sequence classification, exported with input_ids and attention_mask: a divisibility guard.
    guard = parse_guard("((12*L['x'][0].size()[0]) % L['x'][1].size()[0]) == 0")
    assert holds(guard, SIZES)
    assert not holds(guard, {"x_0": (5, 12), "x_1": (7, 12)})


@pytest.mark.parametrize("text", [
    "__import__('os').system('true') == 0",
    "L['x'].size()[0] ** 2 == 36",
    "L['x'].size()[0] == 6 == 6",
    "(L['x'].size()[0] == 6",
    "L['x'].size()[0] == ",
    "L['x'].shape[0] == 6",
    "L['x'].size()[0] == 6 and True",
    "len(L['x']) == 6",
    "L['x'].size()[0] == 6; open('f', 'w')",
    "(" * 40 + "1" + ")" * 40 + " == 1",
    "1 == " + " + ".join(["1"] * 200),
])
def test_anything_else_is_refused_never_run(text: str) -> None:
    with pytest.raises(ProgramError):
        parse_guard(text)


@given(st.text(max_size=120))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_parses_or_is_refused_with_a_program_error(text: str) -> None:
    try:
        guard = parse_guard(text)
    except ProgramError:
        return
    assert isinstance(guard, Guard)
