"""Exact unlearning of a retired source: rewind to the last checkpoint before its first contribution,
replay the recorded batches without it, record the branch and an UnlearningCertificate
(specs/unlearning.md is the normative twin).

Replay needs nothing but the ledger: the exported program of RunStarted (``torch.export.save``,
read by the verifier's strict loader, ``gradledger.ledger.program``: nothing unpickled or
executed), the rewind checkpoint (safetensors), the committed manifests and the committed inputs. With the same software and hardware the branch equals, bit for bit, a
governed run from scratch on the recorded order without the source (tests/test_unlearning.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.program import ProgramError, ProgramModule
from gradledger.ledger.program import load_program as read_program

from .bands import BandLayout, ResolvedBands
from .checkpoints import checkpoint_digest, flatten_state, make_checkpoint, read_checkpoint, restore, tensor_digest
from .dataset import CommittedDataset, load_dataset, load_inputs
from .environment import environment
from .errors import GovernanceError
from .gate import clip_bands
from .policy import batch_limits, load_adopted, profiles_tensor
from .registry import build_optimizer, checkpoint_skips, example_loss_function, loss_function
from .retirement import Dependents, dependents, relabeled_artifact, removed_artifact, retirements
from .runtime import torch_deterministic
from .updates import example_loss_bytes, route_examples, step_and_measure, update_body

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


@dataclass
class _Run:
    seq: int
    run_id: str
    settings: dict[str, Any]
    program: bytes
    updates: list[tuple[int, dict[str, Any]]]
    checkpoints: list[tuple[int, dict[str, Any]]]


def branch_id(run_id: str, source: str) -> str:
    return f"{run_id}/without-{source}"


# -- finding what to replay ----------------------------------------------------------------


def _runs(ledger: Ledger) -> list[tuple[int, dict[str, Any]]]:
    return [(seq, ledger.observation(seq).body) for seq in ledger.by_type("RunStarted")]


def _extent(ledger: Ledger, runs: list[tuple[int, dict[str, Any]]], seq: int) -> tuple[int, int]:
    later = [s for s, _ in runs if s > seq]
    return seq, later[0] if later else ledger.size


def _governed(body: Mapping[str, Any]) -> bool:
    settings = body.get("settings")
    return isinstance(settings, dict) and "dataset" in settings and "branch" not in settings


def _find_run(ledger: Ledger, source: str, run_id: str | None) -> _Run:
    runs = _runs(ledger)
    if run_id is not None:
        named = [(s, b) for s, b in runs if b["run_id"] == run_id]
        if not named:
            raise UnlearningError(f"no run {run_id!r} in the ledger")
        seq, body = named[-1]
        if not _governed(body):
            what = "an unlearning branch" if "branch" in (body.get("settings") or {}) else "not a governed run"
            raise UnlearningError(f"run {run_id!r} is {what}; unlearning replays an original governed run")
    else:
        contributed = set(ledger.by_source(source)) & set(ledger.by_type("GovernedUpdate"))
        candidates = []
        for seq, body in runs:
            lo, hi = _extent(ledger, runs, seq)
            if _governed(body) and any(lo < s < hi for s in contributed):
                candidates.append((seq, body))
        if not candidates:
            raise UnlearningError(f"source {source!r} contributed to no update of any governed run; nothing to unlearn")
        seq, body = candidates[-1]
    lo, hi = _extent(ledger, runs, seq)
    updates = [(s, ledger.observation(s).body) for s in ledger.by_type("GovernedUpdate") if lo < s < hi]
    checkpoints = [(s, ledger.observation(s).body) for s in ledger.by_type("Checkpoint") if lo < s < hi]
    program = body.get("artifacts", {}).get("program")
    if program is None:
        raise UnlearningError(f"run {body['run_id']!r} recorded no exported program; it cannot be replayed")
    run = _Run(seq, body["run_id"], body["settings"], program, updates, checkpoints)
    _check_closed(run)
    return run


def _check_closed(run: _Run) -> None:
    steps = [u["step"] for _, u in run.updates]
    if steps != list(range(len(steps))):
        raise UnlearningError(f"run {run.run_id!r}: its updates are not steps 0..{len(steps) - 1} in order")
    if not run.checkpoints or run.checkpoints[0][1]["step"] != 0:
        raise UnlearningError(f"run {run.run_id!r} has no step-0 checkpoint")
    last_seq, last = run.checkpoints[-1]
    if last["step"] != len(steps) or (run.updates and run.updates[-1][0] > last_seq):
        raise UnlearningError(
            f"run {run.run_id!r} is not closed: its last checkpoint is at step {last['step']}, it has {len(steps)} updates"
        )


def _certified_branches(ledger: Ledger, new_id: str) -> list[int]:
    """Certificates closing a branch named ``new_id``. A branch without one was interrupted: abandoned."""
    runs = _runs(ledger)
    certs = ledger.by_type("UnlearningCertificate")
    out = []
    for seq, body in runs:
        if body["run_id"] == new_id:
            lo, hi = _extent(ledger, runs, seq)
            out.extend(c for c in certs if lo < c < hi)
    return out


def first_affected_update(ledger: Ledger, run: _Run, source: str, affected: set[int]) -> tuple[int, dict[str, Any]] | None:
    """The run's first GovernedUpdate that names ``source`` or holds an affected index (both indexes)."""
    in_run = {seq: body for seq, body in run.updates}
    hits = set(ledger.by_source(source)) & set(in_run)
    for i in affected:
        hits.update(s for s in ledger.by_example(i) if s in in_run)
    if not hits:
        return None
    first = min(hits)
    return first, in_run[first]


# -- replay -----------------------------------------------------------------------------------


def load_program(data: bytes) -> nn.Module:
    """The run's exported gate as a module, read by the verifier's strict loader (specs/replay.md §2).

    One loader for both sides: nothing in the archive is unpickled, executed or evaluated
    (``torch.export.load`` would exec its ``guards_code`` and sympify its sizes).
    """
    try:
        return ProgramModule(read_program(data))
    except ProgramError as exc:
        raise UnlearningError(f"the run's exported program is refused: {exc.args[0]}") from None


class _Replayer:
    """The exported gate, its optimizer and the branch's routing tables, stepping like the trainer."""

    def __init__(self, ledger: Ledger, run: _Run, dataset: CommittedDataset, deps: Dependents) -> None:
        settings = run.settings
        data = ledger.artifact(run.program)
        if data is None:
            raise UnlearningError(f"program artifact {run.program.hex()[:16]} is not stored in the ledger")
        self.module = load_program(data)
        inner = getattr(self.module, "model", None)
        if not isinstance(inner, nn.Module):
            raise UnlearningError("the exported program has no 'model' submodule to restore checkpoints into")
        self.inner = inner
        params = dict(self.module.named_parameters())
        try:
            band_params = [tuple(params["model." + n] for n in names) for names in settings["band_params"]]
            groups = [[params["model." + n] for n in names] for names in settings["param_groups"]]
        except KeyError as exc:
            raise UnlearningError(f"the exported program has no parameter {exc.args[0]!r} that the run recorded") from None
        layout = BandLayout.from_obj(settings["bands"])
        self.bands = ResolvedBands(layout, tuple(tuple(ns) for ns in settings["band_params"]), tuple(band_params),
                                   (None,) * len(layout))
        self.flat = [p for ps in band_params for p in ps]
        self.sizes = [len(ps) for ps in band_params]
        self.snapshot = [torch.empty_like(p) for p in self.flat]
        self.optimizer = build_optimizer(settings["optimizer"], groups)
        # Format 2 checkpoints leave out the per-step hyper-parameters (specs/training.md §4).
        self.skips = checkpoint_skips(self.optimizer) if settings.get("format", 1) >= 2 else frozenset()
        self.loss_fn, loss_settings = loss_function(settings["loss"]["name"], settings["loss"]["settings"])
        # Format 4 records every example's loss (specs/training.md §3.1); the branch records them as the run did.
        self.example_loss_fn = (example_loss_function(settings["loss"]["name"], loss_settings)
                                if settings.get("format", 1) >= 4 else None)
        self.n_bands = len(layout)
        # The counterfactual dataset: relabeled manifests' labels and routing, the rest unchanged.
        self.policy = load_adopted(ledger, settings["policy_seq"])
        if self.policy.digest != settings["policy"]:
            raise UnlearningError(f"run {run.run_id!r}: policy at seq {settings['policy_seq']} is not the recorded one")
        fields = [deps.relabeled.get(i, m.manifest) for i, m in enumerate(dataset.manifests)]
        routed = route_examples(fields, ledger.registry, self.policy.compiled)
        self.rules, self.names = routed.rules, routed.names
        self.writes_of = [(routed.paths[i], tuple(routed.profiles[i])) for i in range(len(fields))]
        self.profiles = profiles_tensor(routed.profiles, self.n_bands)
        self.labels = torch.tensor([f["label"] for f in fields], dtype=torch.int64)
        self.inputs = load_inputs(ledger, dataset)

    def restore(self, ledger: Ledger, body: Mapping[str, Any]) -> None:
        data = ledger.artifact(body["artifact"])
        if data is None:
            raise UnlearningError(f"checkpoint artifact {body['artifact'].hex()[:16]} is not stored in the ledger")
        tensors, scalars = read_checkpoint(data, body)
        restore(self.inner, self.optimizer, tensors, scalars)

    def step(self, original: Mapping[str, Any], batch: list[int]) -> dict[str, Any]:
        """One governed step of ``batch`` with the original step's number, seed and optimizer settings."""
        for group, recorded in zip(self.optimizer.param_groups, original["optimizer"]["groups"]):
            for k, v in recorded.items():
                group[k] = tuple(v) if k == "betas" else v
        index = torch.tensor(batch, dtype=torch.int64)
        rules = [self.rules[i] for i in batch]
        limits = batch_limits(self.policy.compiled, rules)
        self.optimizer.zero_grad(set_to_none=True)
        torch.default_generator.manual_seed(original["seeds"]["step"])
        try:
            out = self.module(*_rows(self.inputs, index), self.profiles[index])
        except ProgramError as exc:
            raise UnlearningError(f"step {original['step']}: the run's program fails: {exc.args[0]}") from None
        loss_t = self.loss_fn(out, self.labels[index])
        loss = float(loss_t.detach())
        each = None
        if self.example_loss_fn is not None:
            with torch.no_grad():
                each = example_loss_bytes([self.example_loss_fn(out.detach(), self.labels[index])])
        loss_t.backward()
        grad_norms = clip_bands(self.module, self.bands, limits)
        if not math.isfinite(loss) or not all(math.isfinite(n) for n in grad_norms):
            raise UnlearningError(f"step {original['step']}: non-finite loss or band gradient norm on the branch")
        update_norms = step_and_measure(self.optimizer, self.flat, self.snapshot, self.sizes)
        if not all(math.isfinite(n) for n in update_norms):
            raise UnlearningError(f"step {original['step']}: non-finite update on the branch")
        described = {"name": original["optimizer"]["name"], "groups": [dict(g) for g in original["optimizer"]["groups"]]}
        return update_body(
            original["step"], batch, rules, limits, policy=self.policy.digest, loss=loss, grad_norms=grad_norms,
            update_norms=update_norms, optimizer=described, seeds=dict(original["seeds"]),
            writes_of=self.writes_of, names=self.names, n_bands=self.n_bands, example_losses=each,
        )


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
    recipes = [b["step"] for _, b in run.updates if b["step"] >= rewind["step"] and "recipe" in b]
    if recipes:
        # specs/training.md §8: the branch replays plain steps only (no accumulation, clip or autocast yet).
        raise UnlearningError(f"run {run.run_id!r}: step {recipes[0]} records a recipe (accumulation, clip, "
                              "autocast...), which exact unlearning does not replay yet")
    original_head = run.checkpoints[-1][1]["digest"]
    removed = set(deps.removed)

    ledger.commit()  # the caller's pending records are theirs: a failure below discards only the branch's
    # The ledger's own commit policy: from here on it commits only at the branch's tree heads, and a
    # failure discards back to the last one (which follows a checkpoint, or precedes the branch's
    # RunStarted), so a failed unlearning leaves no half-recorded segment behind.
    with torch_deterministic(), ledger.deferred():
        replayer = _Replayer(ledger, run, dataset, deps)
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
                ledger.append("GovernedUpdate", replayer.step(original, batch), key)
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


__all__ = ["MODES", "UnlearningError", "UnlearningResult", "branch_id", "first_affected_update", "load_program", "unlearn"]


def _rows(inputs: Any, index: Tensor) -> list[Tensor]:
    """The program's inputs for the rows ``index`` of the stored inputs: ``x``, or the parts in canonical
    (sorted) order, as the program takes them (specs/training.md §5.1)."""
    if isinstance(inputs, Mapping):
        return [inputs[name][index] for name in sorted(inputs)]
    return [inputs[index]]
