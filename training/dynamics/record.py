"""The ``MemorizationScan`` observation's body (specs/dynamics.md §2.1), and appending it."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from gradledger.ledger.envelope import Sealed
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .canaries import CanarySet, canary_exposure
from .memorization import LossTraces, MemorizationScan, flag, scores_digest

__all__ = ["CANARY_SCAN_FORMAT", "SCAN_FORMAT", "record_scan", "scan_body"]

#: The MemorizationScan body's format (§2.1); format 2 adds the canaries' ranks (§4.2), and is the one
#: recorded exactly when the run's dataset holds canaries.
SCAN_FORMAT = 1
CANARY_SCAN_FORMAT = 2


def scan_body(run_seq: int, through: int, traces: LossTraces, params: MemorizationScan,
              canaries: Sequence[CanarySet] = ()) -> dict[str, Any]:
    """The MemorizationScan body (§2.1) of ``traces`` (every example's losses over the run's steps
    ``0 .. through - 1``): its method's scores and flags, and the exposure ranks of the dataset's ``canaries``."""
    scores = traces.scores(params.min_trace, params.method)
    flagged = flag(scores, params.fraction)
    body: dict[str, Any] = {
        "format": CANARY_SCAN_FORMAT if canaries else SCAN_FORMAT, "run": run_seq, "through": through,
        "method": params.method, "parameters": params.parameters, "scored": int((~scores.isnan()).sum()),
        "flagged": [[i, s] for i, s in flagged], "scores_digest": scores_digest(scores),
    }
    if canaries:
        body["canaries"] = canary_exposure(traces.last(), canaries)
    return body


def record_scan(ledger: Ledger, body: Mapping[str, Any], key: SigningKey, *, commit: bool = True) -> Sealed:
    return ledger.append("MemorizationScan", dict(body), key, commit=commit)


