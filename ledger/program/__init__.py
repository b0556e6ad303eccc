"""The model program (a ``torch.export.save`` archive), read by a strict parser of our own.

Never ``torch.export.load``, ``torch.load``, pickle, ``exec``, ``eval`` or ``sympy``: the
archive is opened with every size bounded before it is read (archive), its model JSON parsed
into a small typed graph whose every operator is on an allowlist (parse, ops), its raw weights
read into exactly the tensors their metadata describes (weights), and the graph run by a small
interpreter of ``torch.ops.aten`` calls (interpret). specs/replay.md §2 is normative. ::

    graph = parse_program(data)              # the checked graph, weights not read
    module = ProgramModule(load_program(data))
    out = module(x, profiles)                # or run(graph, inputs, state, after=hook)
"""

from .errors import ProgramError
from .graph import Graph, InputSpec, Node, OutputSpec, Ref
from .interpret import After, run
from .module import Program, ProgramModule, check_inputs, load_program, parse_program
from .ops import ATEN_OPS, SYM_OPS

__all__ = [
    "ATEN_OPS", "After", "Graph", "InputSpec", "Node", "OutputSpec", "Program", "ProgramError", "ProgramModule",
    "Ref", "SYM_OPS", "check_inputs", "load_program", "parse_program", "run",
]
