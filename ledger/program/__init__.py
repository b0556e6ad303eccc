"""The model program (a ``torch.export.save`` archive), read by a strict parser of our own.

Never ``torch.export.load``, ``torch.load``, pickle, ``exec``, ``eval`` or ``sympy``: the
archive is opened with every size bounded before decompression, its model JSON parsed into a
small typed graph whose every operator is on an allowlist, and the graph run by a small
interpreter of ``torch.ops.aten`` calls. specs/replay.md §2 is normative.

    from gradledger.ledger.program import parse_program, run, ProgramModule
"""

from .graph import Graph, InputSpec, Node, OutputSpec, Ref

__all__ = ["Graph", "InputSpec", "Node", "OutputSpec", "Ref"]
