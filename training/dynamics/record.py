"""The ``MemorizationScan`` observation's body (specs/dynamics.md §2.1), and appending it."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from gradledger.ledger.envelope import Sealed
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .memorization import METHOD, MemorizationScan, flag, scores_digest

__all__ = ["SCAN_FORMAT", "record_scan", "scan_body"]

#: The MemorizationScan body's format (§2.1).
SCAN_FORMAT = 1


def scan_body(run_seq: int, through: int, scores: Tensor, params: MemorizationScan) -> dict[str, Any]:
    """The MemorizationScan body (§2.1) of ``scores`` (every index's LT-IQR, NaN where unscored) over the
    run's steps ``0 .. through - 1``."""
    flagged = flag(scores, params.fraction)
    return {
        "format": SCAN_FORMAT, "run": run_seq, "through": through, "method": METHOD,
        "parameters": params.parameters, "scored": int((~scores.isnan()).sum()),
        "flagged": [[i, s] for i, s in flagged], "scores_digest": scores_digest(scores),
    }


def record_scan(ledger: Ledger, body: Mapping[str, Any], key: SigningKey, *, commit: bool = True) -> Sealed:
    return ledger.append("MemorizationScan", dict(body), key, commit=commit)


