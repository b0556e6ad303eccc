"""Load a run's model program with the strict loader of ``gradledger.ledger.program`` (specs/replay.md §2).

The same loader serves ``gradledger unlearn``: one loader, the safe one. It never calls
``torch.export.load``, which would run the archive's ``guards_code`` through ``exec`` when it
builds the module and hand symbolic sizes to ``sympy.sympify``; nothing from the archive is
executed or evaluated, and every member is bounded before it is read.

Replay never runs the program as the trainer wrapped it: ``load_routed`` returns it inside the
verifier's own routing (specs/routing.md §6), whatever gate the program carries or lacks.
"""

from __future__ import annotations

from typing import Any, Mapping

from gradledger.ledger.program import ProgramError
from gradledger.ledger.program import load_program as _load

from .routed import RoutedModule

__all__ = ["ProgramError", "load_routed"]


def load_routed(data: bytes, settings: Mapping[str, Any]) -> RoutedModule:
    """The program as replay runs it: ``module(x, profiles)`` routed by the verifier (RunStarted ``settings``).

    Raises ``ProgramError`` for an archive the loader refuses and ``RoutingNotProven`` when the
    recorded layout's cut cannot be proved on the program's graph.
    """
    return RoutedModule(_load(data), settings)
