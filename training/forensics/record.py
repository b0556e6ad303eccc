"""A trace as a signed ``ForensicTrace`` observation (specs/forensics.md §7).

The record holds what a verifier needs to recompute the trace and compare: the traced run, the method,
the query (its canonical map, with a file query's bytes stored as a ledger artifact), the parameters,
and the ranked result in its recorded form (names or indices with their scores). Uncertainties,
shares and the validation are not recorded: they are derived from the scores, or (validation) from a
counterfactual that nothing commits.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from gradledger.ledger import encoding
from gradledger.ledger.envelope import Sealed
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .query import Query

__all__ = ["TRACE_FORMAT", "record_trace", "recorded_result", "result_digest"]

#: The ForensicTrace body's format (specs/forensics.md §7.1).
TRACE_FORMAT = 1


def recorded_result(report: Mapping[str, Any]) -> dict[str, Any]:
    """The ranked answer as a ForensicTrace records it (§7.1): per kind, the report's entries in order,
    each its name (source, authority path) or index (example, step range) with its score."""
    out: dict[str, Any] = {
        "sources": [[s["source"], s["score"]] for s in report["sources"]],
        "examples": [[e["index"], e["score"]] for e in report["examples"]],
    }
    if "query" in report:  # the influence methods
        out["authorities"] = [[a["path"], a["score"]] for a in report["authorities"]]
        out["bands"] = [b["score"] for b in report["bands"]]
        out["steps"] = [[r["from"], r["to"], r["score"]] for r in report["steps"]]
        out["predicted_change"] = report["predicted_change"]
        if "self_influence" in report:
            out["self_influence"] = [[e["index"], e["score"]] for e in report["self_influence"]]
    return out


def result_digest(result: Mapping[str, Any]) -> bytes:
    """SHA-256 of the recorded result's canonical CBOR (§7.1)."""
    return hashlib.sha256(encoding.encode(dict(result))).digest()


def record_trace(ledger: Ledger, report: Mapping[str, Any], query: Query | None, *, run_seq: int, top: int,
                 self_influence: bool, key: SigningKey) -> Sealed:
    """Append and commit the ForensicTrace of ``report`` (what ``trace`` returned for ``query``), signed by
    ``key``; a file query's bytes are stored first, as the artifact its digest names."""
    result = recorded_result(report)
    body: dict[str, Any] = {
        "format": TRACE_FORMAT, "run": run_seq, "method": report["method"],
        "parameters": {"top": top, "self_influence": self_influence},
        "result": result, "result_digest": result_digest(result),
    }
    if query is not None:
        if query.file_data is not None:
            ledger.put_artifact(query.file_data)
        body["query"] = query.canonical
        body["query_digest"] = query.digest
    return ledger.append("ForensicTrace", body, key, commit=True)
