"""Load a run's model program with the strict loader of ``gradledger.ledger.program`` (specs/replay.md §2).

The same loader serves ``gradledger unlearn``: one loader, the safe one. It never calls
``torch.export.load``, which would run the archive's ``guards_code`` through ``exec`` when it
builds the module and hand symbolic sizes to ``sympy.sympify``; nothing from the archive is
executed or evaluated, and every member is bounded before it is read.
"""

from __future__ import annotations

from gradledger.ledger.program import ProgramError, ProgramModule
from gradledger.ledger.program import load_program as _load

__all__ = ["ProgramError", "load_program"]


def load_program(data: bytes) -> ProgramModule:
    """The program as a module: ``module(x, profiles)`` (or ``module(x)`` for a plain program)."""
    return ProgramModule(_load(data))
