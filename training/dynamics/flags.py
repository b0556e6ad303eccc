"""The memorization flags in force at a recorded run's steps (specs/dynamics.md §2.4), for replaying it.

While a run trains, the trainer puts each checkpoint's flags in force itself (``Governance``). A run
replayed later (unlearning, forensics) reads them back: from each Checkpoint after step 0 on, the flags
of the MemorizationScan the run recorded at it. An unlearning branch keeps the flags in force at its
rewind step for every step it records.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable, Mapping

from gradledger.ledger.ledger import Ledger

from ..errors import GovernanceError
from ..replayer import run_records, run_seqs

__all__ = ["FlagsAt", "recorded_flags"]

#: step -> the dataset indices flagged at it.
FlagsAt = Callable[[int], frozenset[int]]


def recorded_flags(ledger: Ledger, run_seq: int, settings: Mapping[str, Any], freeze_at: int | None = None) -> FlagsAt:
    """The flags in force at each step of the run started at ``run_seq`` (an unlearning branch: of the run it
    branches from, frozen at its rewind step); ``freeze_at``: a step from which they stay as they are there
    (unlearning replays the original's steps from its rewind step as a branch)."""
    branch = settings.get("branch")
    if isinstance(branch, Mapping):
        run_seq = branch["of"]
        settings = ledger.observation(run_seq).body["settings"]
        freeze_at = ledger.observation(branch["rewind"]).body["step"]
    params = (settings.get("monitors") or {}).get("memorization")
    if params is None:
        raise GovernanceError(f"run at seq {run_seq} declares no memorization scans, yet its policy routes by them")
    trainer = ledger.observation(run_seq).signer  # the scans §2.2 requires are the run's trainer's
    by_through: dict[Any, list[tuple[int, Mapping[str, Any]]]] = {}  # the run's own scans, in log order
    for s in run_seqs(ledger, run_seq, "MemorizationScan"):
        obs = ledger.observation(s)
        if obs.signer == trainer and obs.body["run"] == run_seq and obs.body["parameters"] == params:
            by_through.setdefault(obs.body["through"], []).append((s, obs.body))
    starts: list[int] = []
    flags: list[frozenset[int]] = []
    for seq, body in run_records(ledger, run_seq, "Checkpoint"):
        step = body["step"]
        found = next((b for s, b in by_through.get(step, ()) if s > seq), None)
        if step == 0 or found is None:
            continue  # the verifier requires the scan before the next step; a run that ends here reads none
        starts.append(step)
        flags.append(frozenset(i for i, _ in found["flagged"]))

    def at(step: int) -> frozenset[int]:
        if freeze_at is not None:
            step = min(step, freeze_at)
        j = bisect_right(starts, step)
        return flags[j - 1] if j else frozenset()
    return at
