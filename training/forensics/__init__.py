"""Forensics: which labeling sources taught a governed model a behavior, through which bands, in which
steps (specs/forensics.md).

``trace(ledger, query)`` answers from what the ledger recorded: every batch, learning rate, routing
multiplier and clip coefficient, the checkpoints, and (format 4) every example's loss. Methods:
``replay`` (exact weights at every step, re-created by replay), ``checkpoints`` (the stored
checkpoints only, cheap, approximate) and ``loss-trace`` (recorded per-example losses only).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .lineage import Lineage, TraceDiverged, TraceError, lineage
from .methods import METHODS, checkpoints_influence, loss_trace, replay_influence, replayer
from .query import MAX_QUERY, Query, QueryError, parse_query
from .record import record_trace
from .result import influence_report, loss_trace_report
from .shares import UNATTRIBUTED, example_shares
from .validate import validate

__all__ = ["MAX_QUERY", "METHODS", "UNATTRIBUTED", "Lineage", "Query", "QueryError", "TraceDiverged", "TraceError", "example_shares",
           "lineage", "parse_query", "trace"]


def trace(ledger: Ledger, query: str | None, *, run_id: str | None = None, method: str = "replay", top: int = 10,
          self_influence: bool = False, validate_top: int = 0, record: SigningKey | None = None,
          progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Trace the behavior ``query`` (specs/forensics.md §2; JSON text or a .json path) in run ``run_id``
    (default the latest governed run) with ``method``; the ranked answer as a JSON-ready map.

    ``self_influence`` adds each training example's self-influence (replay and checkpoints): the sum
    over its steps of its weight times its own squared gradient norm, a mislabel and memorization score.
    ``validate_top`` K > 0 adds the exact counterfactual of the top K sources (validate.py): the run
    replayed without them, the measured change of the query loss against the predicted one.
    ``record``: sign the answer with this key and append it as a ForensicTrace observation (record.py;
    the ledger must be open for writing); the report's ``record`` names it.
    Raises ``QueryError`` for a query that cannot be used and ``TraceError`` for a run that cannot be traced.
    """
    if method not in METHODS:
        raise QueryError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if type(top) is not int or top < 1:
        raise QueryError(f"top {top!r} is not a positive int")
    lin = lineage(ledger, run_id)
    head: dict[str, Any] = {"run": lin.run.run_id, "method": method, "branch_without": lin.retired,
                            "recorded_steps": len(lin.run.updates)}
    if validate_top and method == "loss-trace":
        raise QueryError("--validate checks an attribution: use the replay or checkpoints method")
    if method == "loss-trace":
        mean, count = loss_trace(lin)
        out = {**head, **loss_trace_report(mean, count, fields=lin.fields, registry=ledger.registry, top=top)}
        return _recorded(ledger, out, None, lin, top, self_influence, record)
    if query is None:
        raise QueryError(f"the {method} method needs a query (--query)")
    rep = replayer(ledger, lin)
    rep.restore(ledger, lin.run.checkpoints[0][1])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        probe = rep.module(*rep.rows(torch.zeros(1, dtype=torch.int64)), rep.profiles[:1])
    q = parse_query(query, labels=rep.labels, inputs=rep.inputs, classes=int(probe.shape[-1]))
    run = replay_influence if method == "replay" else checkpoints_influence
    found = run(ledger, lin, rep, q, self_influence=self_influence, progress=progress)
    report = influence_report(found, fields=lin.fields, registry=ledger.registry, band_names=rep.bands.names, top=top)
    head["query"] = {"description": q.description, "digest": q.digest.hex(), "examples": len(q)}
    out = {**head, **report}
    if validate_top:
        out["validation"] = validate(ledger, lin, rep, q, out, validate_top, progress=progress)
    return _recorded(ledger, out, q, lin, top, self_influence, record)


def _recorded(ledger: Ledger, report: dict[str, Any], query: Query | None, lin: Lineage, top: int,
              self_influence: bool, key: SigningKey | None) -> dict[str, Any]:
    if key is None:
        return report
    sealed = record_trace(ledger, report, query, run_seq=lin.run.seq, top=top, self_influence=self_influence, key=key)
    return {**report, "record": {"seq": sealed.seq, "result_digest": sealed.body["result_digest"].hex()}}
