"""A memorization scan as a signed ``MemorizationScan`` observation (specs/dynamics.md §2).

Two ways in: the governed run scans its own traces at each checkpoint when it was started with a
``MemorizationScan`` (``Governance(..., memorization=...)``; the run's settings declare it, so a
checkpoint without its scan fails verification), and ``gradledger scan LEDGER`` scans a recorded run
on demand. Both record the same body; the verifier recomputes every scan from the recorded losses.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from ..errors import GovernanceError
from ..forensics.lineage import Lineage, lineage
from ..updates import example_loss_values
from .canaries import exposure_bits, scanned_sets
from .memorization import LossTraces, MemorizationScan
from .record import record_scan, scan_body

__all__ = ["ScanError", "memorized_routing", "recorded_traces", "scan"]


class ScanError(GovernanceError):
    """A run that cannot be scanned (the message says why)."""


def recorded_traces(ledger: Ledger, run_id: str | None, error: type[GovernanceError] = GovernanceError,
                    through: int | None = None) -> tuple[Lineage, LossTraces, int]:
    """Run ``run_id``'s lineage (default: the latest governed run or branch) and every example's recorded
    losses over its steps before ``through`` (default: all); ``error`` for a run that records none."""
    try:
        lin = lineage(ledger, run_id, inputs=False)
    except GovernanceError as exc:
        raise error(str(exc)) from None
    fmt = lin.run.settings.get("format", 1)
    if fmt < 4:
        raise error(f"run {lin.run.run_id!r} is training format {fmt}, which records no per-example losses "
                    "(format 4 and later)")
    steps = len(lin.run.updates)
    through = steps if through is None else through
    if type(through) is not int or not 1 <= through <= steps:
        raise error(f"through {through!r} is not a step count in 1..{steps} (the run recorded {steps} steps)")
    traces = LossTraces(lin.dataset.count)
    for _, u in lin.run.updates[:through]:
        traces.add(u["batch"], example_loss_values(u["example_losses"]))
    return lin, traces, through


def scan(ledger: Ledger, *, run_id: str | None = None, params: MemorizationScan | None = None,
         through: int | None = None, record: SigningKey | None = None) -> dict[str, Any]:
    """Scan run ``run_id`` (default: the latest governed run or branch) over its steps before ``through``
    (default: all of them); the report as a JSON-ready map, with ``record`` when ``record`` signed and
    appended it (the ledger must be open for writing)."""
    params = params or MemorizationScan()
    lin, traces, through = recorded_traces(ledger, run_id, ScanError, through)
    sets = scanned_sets(lin.dataset.manifests, lin.dataset.name, ScanError)
    body = scan_body(lin.run.seq, through, traces, params, sets)
    report: dict[str, Any] = {
        "run": lin.run.run_id, "branch_without": lin.retired, "through": through, "method": params.method,
        "parameters": params.parameters, "scored": body["scored"], "examples": lin.dataset.count,
        "scores_digest": body["scores_digest"].hex(),
        "flagged": [_describe(i, s, lin.fields[i]) for i, s in body["flagged"]],
        "memorized_routing": memorized_routing(ledger, lin.run.settings, lin.run.updates[:through]),
    }
    if "canaries" in body:
        report["canaries"] = [_exposure(c) for c in body["canaries"]]
    if record is not None:
        sealed = record_scan(ledger, body, record)
        report["record"] = {"seq": sealed.seq}
    return report


def memorized_routing(ledger: Ledger, settings: Mapping[str, Any], updates: Sequence[tuple[int, Mapping[str, Any]]]
                      ) -> dict[str, Any] | None:
    """Under a policy that routes by the memorization flags (specs/dynamics.md §2.4): the rules that match
    them, and how many distinct examples ``updates`` routed by one of them and how many times; None for a
    policy without such a rule."""
    from ..policy import load_adopted

    policy = load_adopted(ledger, settings["policy_seq"]).policy
    rules = {i: r["name"] for i, r in enumerate(policy["rules"]) if "memorized" in r["match"]}
    if not rules:
        return None
    hits = [i for _, u in updates for i, r in zip(u["batch"], u["routing"]["rules"]) if r in rules]
    return {"rules": sorted(rules.values()), "examples": len(set(hits)), "trainings": len(hits)}


def _exposure(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A set's ranks with each canary's exposure in bits, and the bound ``log2(references + 1)``."""
    n = entry["references"]
    bits = [None if r is None or n == 0 else exposure_bits(r, n) for _, r in entry["inserted"]]
    known = [b for b in bits if b is not None]
    return {"set": entry["set"], "references": n, "bound_bits": exposure_bits(1, n) if n else None,
            "mean_exposure_bits": sum(known) / len(known) if known else None,
            "inserted": [{"index": i, "rank": r, "exposure_bits": b} for (i, r), b in zip(entry["inserted"], bits)]}


def _describe(index: int, score: float, manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {"index": index, "score": score, "label": manifest["label"],
            "sources": sorted({s["source"] for s in manifest["sources"]})}
