"""What a trace walks: a run's recorded steps and checkpoints, and the dataset as that run saw it
(specs/forensics.md §1).

For an original governed run that is its own updates and checkpoints and the committed manifests.
For an unlearning branch it is the original run's steps before the branch's rewind checkpoint (which
the retired source never reached: the rewind precedes its first contribution), then the branch's own
steps from its rewind checkpoint on, with the manifests re-aggregated without the retired source
(specs/unlearning.md §2). So a trace of a branch is a trace of the model the branch shipped, and the
retired source appears in none of its manifests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from gradledger.ledger.errors import VerificationError
from gradledger.ledger.ledger import Ledger

from ..dataset import CommittedDataset, load_dataset
from ..errors import GovernanceError
from ..replayer import RecordedRun, ReplayError, recorded_run, run_records, runs_in
from ..retirement import dependents

__all__ = ["Lineage", "TraceDiverged", "TraceError", "lineage"]


class TraceError(GovernanceError):
    """A run that cannot be traced (the message says why)."""


class TraceDiverged(VerificationError):
    """Replay of the run does not give what its records say (the step and the values): the ledger's run
    is not reproduced here, so no influence at its weights can be claimed."""


@dataclass
class Lineage:
    """The run traced: its RecordedRun (for a branch, the original's steps before the rewind followed by
    the branch's), the dataset, each index's manifest map as the run trained it, and the branch's facts."""

    run: RecordedRun
    dataset: CommittedDataset
    fields: list[Mapping[str, Any]]
    retired: str | None = None  # the branch's retired source
    rewind_step: int | None = None  # the branch's first step: replay restores the branch's own checkpoint there


def lineage(ledger: Ledger, run_id: str | None, *, inputs: bool = True) -> Lineage:
    """The lineage of run ``run_id`` (default: the ledger's latest governed run or branch); ``inputs``:
    refuse a dataset committed without its inputs (what reads only the records passes False)."""
    runs = [(s, b) for s, b in runs_in(ledger) if isinstance(b.get("settings"), dict) and "dataset" in b["settings"]]
    if run_id is not None:
        runs = [(s, b) for s, b in runs if b["run_id"] == run_id]
        if not runs:
            raise TraceError(f"no governed run {run_id!r} in the ledger")
    if not runs:
        raise TraceError("the ledger holds no governed run")
    seq, body = runs[-1]
    branch = body["settings"].get("branch")
    try:
        if branch is None:
            run = recorded_run(ledger, seq, body)
            dataset = _dataset(ledger, run, inputs)
            return Lineage(run, dataset, [m.manifest for m in dataset.manifests])
        return _branch(ledger, seq, body, branch, inputs)
    except ReplayError as exc:
        raise TraceError(str(exc)) from None


def _dataset(ledger: Ledger, run: RecordedRun, inputs: bool) -> CommittedDataset:
    ds = run.settings["dataset"]
    dataset = load_dataset(ledger, ds["seq"], verify=False)
    if dataset.root != ds["root"]:
        raise TraceError(f"run {run.run_id!r}: the dataset at seq {ds['seq']} is not the one it trained on")
    if inputs and dataset.data is None:
        raise TraceError(f"dataset {dataset.name!r} was committed without its inputs; a trace needs them")
    return dataset


def _branch(ledger: Ledger, seq: int, body: Mapping[str, Any], branch: Mapping[str, Any], inputs: bool) -> Lineage:
    of = ledger.observation(branch["of"]).body
    original = recorded_run(ledger, branch["of"], of)
    retired = ledger.observation(branch["retired"]).body["source"]
    rewind = ledger.observation(branch["rewind"]).body
    updates, checkpoints = run_records(ledger, seq, "GovernedUpdate"), run_records(ledger, seq, "Checkpoint")
    if not checkpoints or checkpoints[0][1]["digest"] != rewind["digest"]:
        raise TraceError(f"branch {body['run_id']!r} does not start from its rewind checkpoint")
    if not run_records(ledger, seq, "UnlearningCertificate"):
        raise TraceError(f"branch {body['run_id']!r} has no UnlearningCertificate: it was interrupted")
    step = rewind["step"]
    run = RecordedRun(seq, body["run_id"], dict(body["settings"]), original.program,
                      [u for u in original.updates if u[1]["step"] < step] + updates,
                      [c for c in original.checkpoints if c[1]["step"] < step] + checkpoints)
    dataset = _dataset(ledger, run, inputs)
    deps = dependents(dataset, retired)
    fields = [deps.relabeled.get(i, m.manifest) for i, m in enumerate(dataset.manifests)]
    return Lineage(run, dataset, fields, retired=retired, rewind_step=step)
