"""From training examples to the labeling sources that taught them (specs/forensics.md §3).

An example teaches the model its committed label; the sources whose votes made that label carry
it, each in proportion to its weight in the label aggregation the manifest records
(specs/manifests.md §3): the confidences of the votes equal to the label, or each such vote
counting 1 when those confidences add up to 0. A source that abstained or voted for another class
taught nothing through that example. An example whose label no vote gave (a reviewer's fix, a label
model's pick no source voted for) is attributed to ``UNATTRIBUTED``: the trace says so rather than
spreading it over sources that disagreed.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence

__all__ = ["UNATTRIBUTED", "SourceInfo", "example_shares", "source_table"]

#: The name under which influence with no voting source is reported.
UNATTRIBUTED = "(no source voted for the label)"


@dataclass(frozen=True)
class SourceInfo:
    """A labeling source as the ledger credits it: name, credential key id and authority path."""

    name: str
    key_id: bytes
    path: str


def example_shares(manifest: Mapping[str, Any]) -> dict[str, float]:
    """Source name -> its share of the example (shares add up to 1), by the rule above."""
    label = manifest["label"]
    votes = [s for s in manifest["sources"] if s["vote"] == label]
    if not votes:
        return {UNATTRIBUTED: 1.0}
    # Exact sums (every confidence is a binary64), divided once: the same shares in any order.
    weights: dict[str, Fraction] = {}
    for s in votes:
        weights[s["source"]] = weights.get(s["source"], Fraction(0)) + Fraction(s["confidence"])
    total = sum(weights.values(), Fraction(0))
    if total == 0:
        weights = {name: Fraction(1) for name in weights}
        total = Fraction(len(weights))
    return {name: float(w / total) for name, w in weights.items()}


def source_table(manifests: Sequence[Mapping[str, Any]], registry: Any) -> dict[str, SourceInfo]:
    """Every source named in ``manifests`` with its credential key id and authority path."""
    out: dict[str, SourceInfo] = {}
    for m in manifests:
        for s in m["sources"]:
            if s["source"] not in out:
                out[s["source"]] = SourceInfo(s["source"], s["key_id"], registry.get(s["key_id"]).path)
    return out
