"""``--validate K``: the exact counterfactual of a trace's top sources (specs/forensics.md §6).

The run is replayed from its first checkpoint on the recorded batches without the sources: every
manifest is re-aggregated without them by the unlearning dependency rule (removed when no vote remains,
relabeled otherwise; specs/unlearning.md §2), so this is the model exact unlearning of those sources
from step 0 would give. Nothing is recorded: the replay runs on a scratch copy of the program and
optimizer. The report gives the change of the mean query loss that the trace predicted (the sum of the
sources' scores: removing what lowered the loss raises it by that much, to first order) against the
change replay measures.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from gradledger.ledger.ledger import Ledger

from ..manifests import relabel_without
from ..replayer import ReplayError, Replayer, program_inputs
from ..runtime import torch_deterministic
from .lineage import Lineage, TraceError
from .methods import QUERY_SEED
from .query import Query, query_loss

__all__ = ["counterfactual_fields", "validate"]


def counterfactual_fields(fields: Sequence[Mapping[str, Any]], sources: Sequence[str]) -> tuple[list[Mapping[str, Any]], set[int]]:
    """Each manifest re-aggregated without ``sources``, and the indices left with no vote (removed)."""
    out: list[Mapping[str, Any]] = []
    removed: set[int] = set()
    for i, f in enumerate(fields):
        new: Mapping[str, Any] | None = f
        for s in sources:
            if new is not None and any(src["source"] == s for src in new["sources"]):
                new = relabel_without(new, s)
        if new is None:
            removed.add(i)
            out.append(f)  # never trained: its index stays, its batch positions are dropped
        else:
            out.append(new)
    return out, removed


def _query_loss(rep: Replayer, query: Query) -> float:
    # The query's forward under the trace's query seed (methods.QUERY_SEED), on the CPU generator only.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(QUERY_SEED)
        ones = torch.ones((len(query), rep.n_bands), dtype=torch.float32)
        out = rep.module(*program_inputs(query.inputs), ones)
        return float(query_loss(rep.example_loss_fn)(out, query.rows()).mean())


def validate(ledger: Ledger, lin: Lineage, rep: Replayer, query: Query, report: Mapping[str, Any], k: int,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Replay ``lin`` without the top ``k`` sources of ``report``; predicted against actual query-loss change.
    ``rep``: the trace's replayer, which evaluates the run's final checkpoint."""
    ranked = [s for s in report["sources"] if s["path"] is not None][:k]
    if len(ranked) < k:
        raise TraceError(f"--validate {k}: the trace ranks only {len(ranked)} credentialed sources (use --top >= {k})")
    names = [s["source"] for s in ranked]
    if any("recipe" in u for _, u in lin.run.updates):
        raise TraceError("--validate replays plain steps only; this run records a recipe (accumulation, clip, autocast)")
    fields, removed = counterfactual_fields(lin.fields, names)
    relabeled = sum(1 for a, b in zip(lin.fields, fields) if a is not b)  # removed ones keep their own map
    try:
        rep.restore(ledger, lin.run.checkpoints[-1][1])
        before = _query_loss(rep, query)
        without = Replayer(ledger, lin.run, lin.dataset, fields)
        with torch_deterministic():
            without.restore(ledger, lin.run.checkpoints[0][1])
            for _, u in lin.run.updates:
                batch = [i for i in u["batch"] if i not in removed]
                if batch:
                    without.step(u, batch)
                if progress is not None:
                    progress(u["step"])
        after = _query_loss(without, query)
    except ReplayError as exc:
        raise TraceError(str(exc)) from None
    return {"sources": names, "removed": len(removed), "relabeled": relabeled,
            "predicted_change": sum(s["score"] for s in ranked), "actual_change": after - before,
            "query_loss": before, "query_loss_without": after}
