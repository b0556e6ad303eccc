"""A run's model program, run with the verifier's own routing (specs/routing.md §6).

``RoutedModule`` is the program as replay uses it: ``module(x, profiles)`` returns the routed
output, gradients flow into its parameters as specs/routing.md §3.4 defines them, and nothing of
the routing comes from the program. The cut is proved once, when the module is built; batch
independence once per input shape, before the first forward of that shape.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from gradledger.ledger.program import Program, ProgramModule, check_inputs

from .batch_rows import check_batch_independent
from .graph_routing import RoutingNotProven, plan_routing, program_inputs, routed_forward

__all__ = ["RoutedModule"]


class RoutedModule(ProgramModule):
    """``ProgramModule`` whose ``forward(x, profiles)`` applies the verifier's routing.

    ``settings``: RunStarted ``settings`` (``bands`` and ``band_params`` are read). Raises
    ``RoutingNotProven`` (a ``VerificationError``) when the cut (at construction) or batch
    independence (at a forward) cannot be proved.
    """

    def __init__(self, program: Program, settings: Mapping[str, Any]) -> None:
        super().__init__(program)
        self.boundaries = plan_routing(program.graph, settings)
        self.n_bands = len(self.boundaries)
        self._proved: set[Any] = set()

    def forward(self, x: Tensor | tuple[Tensor, ...], profiles: Tensor) -> Any:  # type: ignore[override]
        """``x``: the batch's input, or its parts in canonical order (specs/training.md §5.1)."""
        graph = self.program.graph
        parts = x if isinstance(x, tuple) else (x,)
        batch = parts[0].shape[0] if parts and parts[0].dim() else -1
        if profiles.dim() != 2 or profiles.shape[1] != self.n_bands or profiles.shape[0] != batch:
            raise RoutingNotProven(f"profiles of shape {list(profiles.shape)} for a batch of {batch} "
                                   f"and {self.n_bands} bands")
        state = self.live_state()
        inputs = program_inputs(graph, x, self.n_bands, profiles.dtype)
        check_inputs(self.program, inputs)  # what the exported module would check, by our own code
        keys = tuple((tuple(t.shape), t.dtype) for t in parts)
        key = keys[0] if len(keys) == 1 else keys  # one tensor: its (shape, dtype); parts: one per part
        if key not in self._proved:
            check_batch_independent(graph, inputs, state, self.boundaries)
            self._proved.add(key)
        out = routed_forward(graph, x, state, profiles, self.boundaries)
        return out[0] if len(out) == 1 else out
