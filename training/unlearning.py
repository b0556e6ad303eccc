"""Exact unlearning of a retired source: rewind to the last checkpoint before its first contribution,
replay the recorded batches without it, record the branch and an UnlearningCertificate
(specs/unlearning.md is the normative twin).

Replay needs nothing but the ledger: the exported program of RunStarted (``torch.export.save``,
read by the verifier's strict loader, ``gradledger.ledger.program``: nothing unpickled or
executed), the rewind checkpoint (safetensors), the committed manifests and the committed inputs. With the same software and hardware the branch equals, bit for bit, a
governed run from scratch on the recorded order without the source (tests/test_unlearning.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .checkpoints import checkpoint_digest, flatten_state, make_checkpoint, tensor_digest
from .dataset import load_dataset
from .environment import environment
from .errors import GovernanceError
from .replayer import RecordedRun, Replayer, ReplayError, governed_original, recorded_run, run_extent, runs_in
from .retirement import dependents, relabeled_artifact, removed_artifact, retirements
from .runtime import torch_deterministic

MODES = ("exact",)


class UnlearningError(GovernanceError):
    """Unlearning cannot run: no retirement, no run the source contributed to, a run that cannot be replayed."""


@dataclass
class UnlearningResult:
    """What one unlearning recorded."""

    source: str
    mode: str
    run_id: str
    branch_run_id: str
    retired_seq: int
    run_seq: int
    branch_seq: int
    first_step: int  # the first original step whose batch held an affected example
    rewind_step: int
    rewind_seq: int  # the original run's Checkpoint rewound to
    original_head: bytes
    new_head: bytes
    certificate_seq: int
    removed: list[int] = field(default_factory=list)
    relabeled: dict[int, int] = field(default_factory=dict)
    replayed_steps: int = 0  # original steps from the rewind on, skipped ones included
    skipped_steps: list[int] = field(default_factory=list)  # steps whose batch lost every example
    total_steps: int = 0


def branch_id(run_id: str, source: str) -> str:
    return f"{run_id}/without-{source}"


# -- finding what to replay ----------------------------------------------------------------


def _find_run(ledger: Ledger, source: str, run_id: str | None) -> RecordedRun:
    runs = runs_in(ledger)
    if run_id is not None:
        named = [(s, b) for s, b in runs if b["run_id"] == run_id]
        if not named:
            raise UnlearningError(f"no run {run_id!r} in the ledger")
        seq, body = named[-1]
        if not governed_original(body):
            what = "an unlearning branch" if "branch" in (body.get("settings") or {}) else "not a governed run"
            raise UnlearningError(f"run {run_id!r} is {what}; unlearning replays an original governed run")
    else:
        contributed = set(ledger.by_source(source)) & set(ledger.by_type("GovernedUpdate"))
        candidates = []
        for seq, body in runs:
            lo, hi = run_extent(ledger, runs, seq)
            if governed_original(body) and any(lo < s < hi for s in contributed):
                candidates.append((seq, body))
        if not candidates:
            raise UnlearningError(f"source {source!r} contributed to no update of any governed run; nothing to unlearn")
        seq, body = candidates[-1]
    with _as_unlearning():
        return recorded_run(ledger, seq, body)


@contextlib.contextmanager
def _as_unlearning() -> Iterator[None]:
    # The shared replay's refusals, told as unlearning's (the command and its callers catch those).
    try:
        yield
    except ReplayError as exc:
        raise UnlearningError(str(exc)) from None


def _certified_branches(ledger: Ledger, new_id: str) -> list[int]:
    """Certificates closing a branch named ``new_id``. A branch without one was interrupted: abandoned."""
    runs = runs_in(ledger)
    certs = ledger.by_type("UnlearningCertificate")
    out = []
    for seq, body in runs:
        if body["run_id"] == new_id:
            lo, hi = run_extent(ledger, runs, seq)
            out.extend(c for c in certs if lo < c < hi)
    return out


def first_affected_update(ledger: Ledger, run: RecordedRun, source: str, affected: set[int]) -> tuple[int, dict[str, Any]] | None:
    """The run's first GovernedUpdate that names ``source`` or holds an affected index (both indexes)."""
    in_run = {seq: body for seq, body in run.updates}
    hits = set(ledger.by_source(source)) & set(in_run)
    for i in affected:
        hits.update(s for s in ledger.by_example(i) if s in in_run)
    if not hits:
        return None
    first = min(hits)
    return first, in_run[first]


# -- the command ------------------------------------------------------------------------------


def unlearn(
    ledger: Ledger,
    source: str,
    key: SigningKey,
    run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    mode: str = "exact",
) -> UnlearningResult:
    """Exactly unlearn retired ``source`` from run ``run_id`` (default: the latest run it contributed to).

    Every refusal happens before anything is appended. ``progress(step)`` is called once per
    original step replayed (skipped steps included). Records are committed only at tree heads.
    """
    if mode not in MODES:
        raise UnlearningError(f"unlearning mode {mode!r} is not implemented (modes: {', '.join(MODES)})")
    retired = retirements(ledger, source)
    if not retired:
        raise UnlearningError(f"source {source!r} has no SourceRetired in the ledger; retire it first")
    retired_seq = retired[-1][0]
    run = _find_run(ledger, source, run_id)
    new_id = branch_id(run.run_id, source)
    done = _certified_branches(ledger, new_id)
    if done:
        raise UnlearningError(f"run {run.run_id!r} was already unlearned without {source!r} (certificate at seq {done[0]})")
    settings = run.settings
    # The artifact is re-checked against the committed root; its manifests' signatures were checked
    # before the DatasetCommitted was appended (commit_dataset), and the verifier checks them again.
    dataset = load_dataset(ledger, settings["dataset"]["seq"], verify=False)
    if dataset.root != settings["dataset"]["root"] or dataset.data is None:
        why = "its root differs from the run's" if dataset.root != settings["dataset"]["root"] else \
            "it was committed without its inputs (commit_dataset(..., inputs=X)); replay needs them"
        raise UnlearningError(f"dataset {dataset.name!r} cannot be replayed: {why}")
    deps = dependents(dataset, source)
    first = first_affected_update(ledger, run, source, deps.affected)
    if first is None:
        raise UnlearningError(f"source {source!r} contributed to no update of run {run.run_id!r}; nothing to unlearn")
    first_step = first[1]["step"]
    rewind_seq, rewind = [(s, b) for s, b in run.checkpoints if b["step"] <= first_step][-1]
    # A step over ranks records only its shards (specs/distributed.md §4), which the branch replays alike.
    # A private step's recipe is its clip factors, which the branch measures again (specs/privacy.md §2).
    recipes = [b["step"] for _, b in run.updates if b["step"] >= rewind["step"] and "recipe" in b
               and set(b["recipe"]) not in ({"ranks", "losses"}, {"privacy"})]
    if recipes:
        # specs/training.md §8: the branch replays plain steps only (no accumulation, clip or autocast yet).
        raise UnlearningError(f"run {run.run_id!r}: step {recipes[0]} records a recipe (accumulation, clip, "
                              "autocast...), which exact unlearning does not replay yet")
    original_head = run.checkpoints[-1][1]["digest"]
    removed = set(deps.removed)
    world = (settings.get("distributed") or {}).get("world")
    if world is not None:  # specs/distributed.md §6: every kept batch must cut into non-empty shards
        for _, b in run.updates:
            kept = sum(1 for i in b["batch"] if i not in removed)
            if b["step"] >= rewind["step"] and 0 < kept < world:
                raise UnlearningError(f"run {run.run_id!r}: step {b['step']} keeps {kept} examples, fewer than its "
                                      f"{world} ranks; its shards cannot all be non-empty (specs/distributed.md §6)")

    ledger.commit()  # the caller's pending records are theirs: a failure below discards only the branch's
    # The ledger's own commit policy: from here on it commits only at the branch's tree heads, and a
    # failure discards back to the last one (which follows a checkpoint, or precedes the branch's
    # RunStarted), so a failed unlearning leaves no half-recorded segment behind.
    with torch_deterministic(), ledger.deferred():
        # The counterfactual dataset: relabeled manifests' labels and routing, the rest unchanged.
        fields = [deps.relabeled.get(i, m.manifest) for i, m in enumerate(dataset.manifests)]
        with _as_unlearning():
            # The branch routes by the memorization flags in force at its rewind step (specs/dynamics.md §2.4).
            replayer = Replayer(ledger, run, dataset, fields, freeze_flags_at=rewind["step"])
        with _as_unlearning():
            replayer.restore(ledger, rewind)
        # Digested in place, not serialized: the branch re-records the rewind checkpoint's own artifact.
        state, _ = flatten_state(replayer.inner, replayer.optimizer, copy=False, skip_group_keys=replayer.skips)
        if checkpoint_digest({n: tensor_digest(t) for n, t in state.items()}) != rewind["digest"]:
            raise UnlearningError(f"the rewind checkpoint (seq {rewind_seq}) does not restore to its own digest")
        removed_digest = ledger.put_artifact(removed_artifact(deps.removed))
        relabeled_digest = ledger.put_artifact(relabeled_artifact(deps.labels()))
        branch = {"of": run.seq, "rewind": rewind_seq, "retired": retired_seq, "removed": removed_digest,
                  "relabeled": relabeled_digest}
        body = {"run_id": new_id, "environment": environment(), "artifacts": {"program": run.program},
                "settings": {**settings, "branch": branch}}
        branch_seq = ledger.append("RunStarted", body, key).seq

        def checkpoint(step: int) -> bytes:
            made = make_checkpoint(step, replayer.inner, replayer.optimizer, skip_group_keys=replayer.skips)
            ledger.append("Checkpoint", made.body(ledger.put_artifact(made.data)), key)
            ledger.tree_head(key)
            return made.digest

        del state
        # The branch starts from the rewind state itself: the same body and the artifact already stored.
        ledger.append("Checkpoint", dict(rewind), key)
        ledger.tree_head(key)
        head = rewind["digest"]
        pending = [b["step"] for _, b in run.checkpoints if b["step"] > rewind["step"]]
        skipped: list[int] = []
        replayed = 0
        for _, original in run.updates:
            s = original["step"]
            if s < rewind["step"]:
                continue
            while pending and pending[0] <= s:
                head = checkpoint(pending.pop(0))
            batch = [i for i in original["batch"] if i not in removed]
            if batch:
                with _as_unlearning():
                    update = replayer.step(original, batch)
                ledger.append("GovernedUpdate", update, key)
            else:
                skipped.append(s)  # a batch that lost every example is no update at all
            replayed += 1
            if progress is not None:
                progress(s)
        while pending:
            head = checkpoint(pending.pop(0))
        cert = {"source": source, "mode": mode, "rewind_checkpoint": rewind["digest"], "original_head": original_head,
                "new_head": head, "removed": removed_digest, "relabeled": relabeled_digest}
        cert_seq = ledger.append("UnlearningCertificate", cert, key).seq
        ledger.tree_head(key)
    return UnlearningResult(
        source=source, mode=mode, run_id=run.run_id, branch_run_id=new_id, retired_seq=retired_seq, run_seq=run.seq,
        branch_seq=branch_seq, first_step=first_step, rewind_step=rewind["step"], rewind_seq=rewind_seq,
        original_head=original_head, new_head=head, certificate_seq=cert_seq, removed=sorted(removed),
        relabeled=deps.labels(), replayed_steps=replayed, skipped_steps=skipped, total_steps=len(run.updates),
    )


__all__ = ["MODES", "UnlearningError", "UnlearningResult", "branch_id", "first_affected_update", "unlearn"]
