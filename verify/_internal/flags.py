"""The memorization flags in force at each step of a run (specs/dynamics.md §2.4), read from its scans;
and the rules its entropy budgets suspend (§5.5), read from its depth profiles.

A policy rule may match ``memorized``: the example is among the flags of the scan recorded at the run's
last Checkpoint after step 0 at or before the step. The flags are read here from the scan records; the
scans check recomputes every one of them from the recorded losses, so a routing check that reads a
forged flag list still ends in a failed report (the scans check is never skipped where a policy reads
flags: such a policy requires the scans, and a run under it declares them or fails its settings).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Sequence

from gradledger.ledger.envelope import Sealed

from .settings import monitors

__all__ = ["FlagSchedule", "FlagsMissing", "flag_schedule", "frozen_at", "next_after", "suspension_schedule"]


class FlagsMissing(Exception):
    """The flags a step's routing reads are not recorded (or not readable); the message says where."""

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class FlagSchedule:
    """From each ``starts[j]`` on, the dataset indices ``flags[j]`` are flagged (none before the first)."""

    starts: tuple[int, ...]
    flags: tuple[frozenset[int], ...]

    def at(self, step: int) -> frozenset[int]:
        j = bisect_right(self.starts, step)
        return self.flags[j - 1] if j else frozenset()


def flag_schedule(observations: Sequence[Sealed], run_seq: int, updates: Sequence[int], checkpoints: Sequence[int],
                  count: int) -> FlagSchedule:
    """§2.4 for an original run: each Checkpoint after step 0 puts in force, from its step on, the flags of
    the first MemorizationScan after it by the run's trainer, of the run, ``through`` its step and with the
    declared parameters; the scan must come before the run's next GovernedUpdate."""
    started = observations[run_seq]
    declared = monitors(started.body["settings"], lambda why: FlagsMissing(f"RunStarted {run_seq}: {why}", run_seq))
    params = declared.get("memorization")
    if params is None:
        raise FlagsMissing(f"RunStarted {run_seq}: its policy routes by memorization flags, but the run declares no "
                           "memorization scans (settings.monitors)", run_seq)
    starts: list[int] = []
    flags: list[frozenset[int]] = []
    for c in checkpoints:
        step = observations[c].body["step"]
        if step == 0:
            continue
        end = next_after(updates, c, len(observations))
        scan = next((o for o in observations[c + 1 : end] if _scan_of(o, run_seq, step, params, started.signer)), None)
        if scan is None:
            if end == len(observations):
                continue  # the run's last checkpoint: no step reads its flags (the scans check requires it)
            raise FlagsMissing(f"Checkpoint {c} (step {step}): no MemorizationScan of the run through step {step} "
                               "before its next step, whose routing reads the flags (specs/dynamics.md §2.4)", c)
        flags.append(_indices(scan, count))
        starts.append(step)
    return FlagSchedule(tuple(starts), tuple(flags))


def next_after(seqs: Sequence[int], seq: int, default: int) -> int:
    """The first of the ascending ``seqs`` after ``seq`` (a run's next GovernedUpdate after a Checkpoint), else
    ``default``: a bisection, so a run's checkpoints cost O(log n) each, not a walk of its updates."""
    j = bisect_right(seqs, seq)
    return seqs[j] if j < len(seqs) else default


def frozen_at(schedule: FlagSchedule, rewind_step: int) -> FlagSchedule:
    """An unlearning branch's flags: those in force at its rewind step, for every step it records (§2.4)."""
    return FlagSchedule((0,), (schedule.at(rewind_step),))


def _scan_of(obs: Sealed, run: int, through: int, params: Any, trainer: bytes) -> bool:
    b = obs.body
    return obs.type == "MemorizationScan" and obs.signer == trainer and b.get("run") == run \
        and b.get("through") == through and b.get("parameters") == params


def _indices(scan: Sealed, count: int) -> frozenset[int]:
    entries = scan.body.get("flagged")
    out: set[int] = set()
    for e in entries if isinstance(entries, list) else [None]:
        if not (isinstance(e, list) and len(e) == 2 and type(e[0]) is int and 0 <= e[0] < count):
            raise FlagsMissing(f"MemorizationScan {scan.seq}: flagged entry {e!r} names no dataset index", scan.seq)
        out.add(e[0])
    return frozenset(out)


# -- §5.5 the entropy budgets' suspended rules ------------------------------------------------------


def suspension_schedule(observations: Sequence[Sealed], run_seq: int, updates: Sequence[int],
                        checkpoints: Sequence[int], policy: Any) -> FlagSchedule:
    """§5.5 for an original run under a policy with entropy budgets: from each Checkpoint's step on, the rules
    its DepthProfile (the run trainer's, of that step, before the run's next GovernedUpdate) suspends against
    the previous checkpoint's. The values are read from the records here; the profiles check recomputes
    them from the weights (a forged mean that spares a rule fails there)."""
    started = observations[run_seq]
    declared = monitors(started.body["settings"], lambda why: FlagsMissing(f"RunStarted {run_seq}: {why}", run_seq))
    if "profiles" not in declared:
        raise FlagsMissing(f"RunStarted {run_seq}: its policy gives rules an entropy budget, but the run declares no "
                           "depth profiles (settings.monitors.profiles, specs/dynamics.md §5.5)", run_seq)
    n_bands = len(policy.bands)
    starts: list[int] = []
    sets: list[frozenset[int]] = []
    before: Any = None  # the previous checkpoint's DepthProfile body
    for c in checkpoints:
        step = observations[c].body["step"]
        end = next_after(updates, c, len(observations))
        found = next((o for o in observations[c + 1:end] if o.type == "DepthProfile" and o.signer == started.signer
                      and o.body["run"] == run_seq and o.body["step"] == step), None)
        if found is None:
            if end == len(observations):
                continue  # the run's last checkpoint: no step reads it (the profiles check requires it)
            raise FlagsMissing(f"Checkpoint {c} (step {step}): no DepthProfile of the run at step {step} before its "
                               "next step, whose routing its entropy budgets read (specs/dynamics.md §5.5)", c)
        now = found.body
        if not _readable(now, n_bands):
            raise FlagsMissing(f"DepthProfile {found.seq}: mean (or slices.entropy) is not one list of finite floats "
                               f"per band ({n_bands})", found.seq)
        starts.append(step)
        sets.append(policy.suspended(before, now))
        before = now
    return FlagSchedule(tuple(starts), tuple(sets))


def _floats(v: Any, n: int | None = None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(type(x) is float and math.isfinite(x) for x in v)


def _readable(body: Any, n_bands: int) -> bool:
    """What §5.5 reads of a profile is there and finite: ``mean`` per band, and any ``slices`` well formed
    (the profiles check holds every value to the weights)."""
    if not isinstance(body, dict) or not _floats(body.get("mean"), n_bands):
        return False
    sl = body.get("slices")
    if sl is None:
        return True
    return isinstance(sl, dict) and isinstance(sl.get("names"), list) and isinstance(sl.get("entropy"), list) \
        and len(sl["entropy"]) == n_bands and all(_floats(e, len(sl["names"])) for e in sl["entropy"])
