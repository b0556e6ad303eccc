"""A recorded governed run, found in the ledger and re-stepped from its own records: the replay that
unlearning (a branch without a source) and forensics (each step's weights, re-created) share.

Replay needs nothing but the ledger: the exported program of RunStarted (``torch.export.save``, read
by the verifier's strict loader, ``gradledger.ledger.program``: nothing unpickled or executed), the
checkpoints (safetensors), the committed manifests and the committed inputs. ``Replayer.step`` is the
trainer's plain step (specs/training.md §3) on the program, returning the step's GovernedUpdate body;
its ``inspect`` hook sees the step's forward before backward, which is where forensics reads the
per-example gradients at the step's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from gradledger.ledger.ledger import Ledger
from gradledger.ledger.program import ProgramError, ProgramModule
from gradledger.ledger.program import load_program as read_program

from .bands import BandLayout, ResolvedBands
from .checkpoints import read_checkpoint, restore
from .distributed import divide_gradients, shards
from .dataset import CommittedDataset, load_inputs
from .errors import GovernanceError
from .gate import clip_bands
from .order import micro_seed
from .policy import batch_limits, load_adopted
from .privacy import PrivacyPlan, add_noise, batch_factors, mix_factors
from .recorder import float_leaves
from .registry import build_optimizer, checkpoint_skips, example_loss_function, loss_function
from .updates import RouteTables, Routes, example_loss_bytes, step_and_measure, update_body

__all__ = ["Inspect", "RecordedRun", "ReplayError", "Replayer", "governed_original", "load_program", "program_inputs",
           "recorded_run", "run_records", "runs_in", "run_extent"]


class ReplayError(GovernanceError):
    """A recorded run that cannot be found or re-stepped from the ledger (the message says why)."""


@dataclass
class RecordedRun:
    """A governed run as the ledger holds it: RunStarted (seq, id, settings, program digest), its
    GovernedUpdates and Checkpoints (seq, body), in log order."""

    seq: int
    run_id: str
    settings: dict[str, Any]
    program: bytes
    updates: list[tuple[int, dict[str, Any]]]
    checkpoints: list[tuple[int, dict[str, Any]]]


def runs_in(ledger: Ledger) -> list[tuple[int, dict[str, Any]]]:
    """Every RunStarted of the ledger: (seq, body), in log order."""
    return [(seq, ledger.observation(seq).body) for seq in ledger.by_type("RunStarted")]


def run_extent(ledger: Ledger, runs: list[tuple[int, dict[str, Any]]], seq: int) -> tuple[int, int]:
    """The seqs a run's records lie strictly between: its RunStarted and the next one (or the log's end)."""
    later = [s for s, _ in runs if s > seq]
    return seq, later[0] if later else ledger.size


def governed_original(body: Mapping[str, Any]) -> bool:
    """A governed run's RunStarted (it names a dataset) that is not an unlearning branch."""
    settings = body.get("settings")
    return isinstance(settings, dict) and "dataset" in settings and "branch" not in settings


def run_seqs(ledger: Ledger, seq: int, type_name: str) -> list[int]:
    """The seqs of every ``type_name`` record of the run started at ``seq``, in log order."""
    lo, hi = run_extent(ledger, runs_in(ledger), seq)
    return [s for s in ledger.by_type(type_name) if lo < s < hi]


def run_records(ledger: Ledger, seq: int, type_name: str) -> list[tuple[int, dict[str, Any]]]:
    """The (seq, body) of every ``type_name`` record of the run started at ``seq``, in log order."""
    return [(s, ledger.observation(s).body) for s in run_seqs(ledger, seq, type_name)]


def recorded_run(ledger: Ledger, seq: int, body: Mapping[str, Any]) -> RecordedRun:
    """The run started at ``seq`` with its updates and checkpoints; refused unless it is closed (steps
    0..n-1 in order, a step-0 checkpoint and one at step n after the last update)."""
    updates, checkpoints = run_records(ledger, seq, "GovernedUpdate"), run_records(ledger, seq, "Checkpoint")
    program = body.get("artifacts", {}).get("program")
    if program is None:
        raise ReplayError(f"run {body['run_id']!r} recorded no exported program; it cannot be replayed")
    run = RecordedRun(seq, body["run_id"], dict(body["settings"]), program, updates, checkpoints)
    steps = [u["step"] for _, u in run.updates]
    if steps != list(range(len(steps))):
        raise ReplayError(f"run {run.run_id!r}: its updates are not steps 0..{len(steps) - 1} in order")
    if not run.checkpoints or run.checkpoints[0][1]["step"] != 0:
        raise ReplayError(f"run {run.run_id!r} has no step-0 checkpoint")
    last_seq, last = run.checkpoints[-1]
    if last["step"] != len(steps) or (run.updates and run.updates[-1][0] > last_seq):
        raise ReplayError(
            f"run {run.run_id!r} is not closed: its last checkpoint is at step {last['step']}, it has {len(steps)} updates"
        )
    return run


def load_program(data: bytes) -> nn.Module:
    """The run's exported gate as a module, read by the verifier's strict loader (specs/replay.md §2).

    One loader for both sides: nothing in the archive is unpickled, executed or evaluated
    (``torch.export.load`` would exec its ``guards_code`` and sympify its sizes).
    """
    try:
        return ProgramModule(read_program(data))
    except ProgramError as exc:
        raise ReplayError(f"the run's exported program is refused: {exc.args[0]}") from None


def program_inputs(x: Tensor | Mapping[str, Tensor]) -> list[Tensor]:
    """A batch as the program takes it: ``x``, or its parts in canonical (sorted) order
    (specs/training.md §5.1)."""
    return [x[name] for name in sorted(x)] if isinstance(x, Mapping) else [x]


#: ``inspect(out, labels, index)``: called by ``Replayer.step`` after the step's forward, before its
#: backward (the graph must be kept: ``retain_graph=True``); it must not touch ``.grad``.
Inspect = Callable[[Tensor, Tensor, Tensor], None]


class Replayer:
    """The exported gate, its optimizer and a dataset's routing tables, stepping like the trainer.

    ``fields``: the manifest map of every dataset index as replay should route and label it (the
    committed manifests, or unlearning's counterfactual ones).
    """

    def __init__(self, ledger: Ledger, run: RecordedRun, dataset: CommittedDataset,
                 fields: Sequence[Mapping[str, Any]], *, freeze_flags_at: int | None = None) -> None:
        settings = run.settings
        data = ledger.artifact(run.program)
        if data is None:
            raise ReplayError(f"program artifact {run.program.hex()[:16]} is not stored in the ledger")
        self.module = load_program(data)
        inner = getattr(self.module, "model", None)
        if not isinstance(inner, nn.Module):
            raise ReplayError("the exported program has no 'model' submodule to restore checkpoints into")
        self.inner = inner
        params = dict(self.module.named_parameters())
        try:
            band_params = [tuple(params["model." + n] for n in names) for names in settings["band_params"]]
            groups = [[params["model." + n] for n in names] for names in settings["param_groups"]]
        except KeyError as exc:
            raise ReplayError(f"the exported program has no parameter {exc.args[0]!r} that the run recorded") from None
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
        self.example_loss_fn = example_loss_function(settings["loss"]["name"], loss_settings)
        # Format 4 records every example's loss (specs/training.md §3.1); replay records them as the run did.
        self.records_example_losses = settings.get("format", 1) >= 4
        self.n_bands = len(layout)
        # A run over torch.distributed ranks is replayed shard by shard, reduced as it was (specs/distributed.md §3).
        distributed = settings.get("distributed")
        self.world: int | None = distributed["world"] if isinstance(distributed, Mapping) else None
        self.policy = load_adopted(ledger, settings["policy_seq"])
        if self.policy.digest != settings["policy"]:
            raise ReplayError(f"run {run.run_id!r}: policy at seq {settings['policy_seq']} is not the recorded one")
        if self.policy.compiled.budgets:
            # §5.5 routes each step by the run's own depth profiles, which a replay without the
            # retired source does not reproduce: a later format may record a branch's profiles.
            raise ReplayError(f"run {run.run_id!r}: its policy gives rules an entropy budget (specs/dynamics.md §5.5); "
                              "replaying such a run (unlearning) is not in this format")
        #: specs/privacy.md: a branch of a run under a privacy policy clips and noises as the run did, measuring its
        #: own factors on its own weights (torch's batched autograd: the program has no layers to tap).
        self.privacy = PrivacyPlan.of(self.policy.compiled)
        self.count = dataset.count
        self.routes = Routes(RouteTables(fields, ledger.registry, self.policy.compiled), self.n_bands)
        #: The memorization flags in force at a step, where the policy routes by them (specs/dynamics.md §2.4);
        #: ``freeze_flags_at``: unlearning's branch keeps those of its rewind step.
        self.flags_at: Callable[[int], frozenset[int]] | None = None
        if self.routes.reads_flags:
            from .dynamics.flags import recorded_flags

            self.flags_at = recorded_flags(ledger, run.seq, settings, freeze_flags_at)
        self.labels = torch.tensor([f["label"] for f in fields], dtype=torch.int64)
        self.inputs = load_inputs(ledger, dataset)

    @property
    def profiles(self) -> Tensor:
        """Every dataset index's gate profile row (float32) under the flags in force."""
        return self.routes.profiles

    def route_at(self, step: int) -> None:
        """Route as the run did at ``step`` (its memorization flags then, where the policy reads them)."""
        if self.flags_at is not None:
            self.routes.use(self.flags_at(step))

    def rows(self, index: Tensor) -> list[Tensor]:
        """The program's inputs for the dataset rows ``index`` (``program_inputs``)."""
        if isinstance(self.inputs, Mapping):
            return program_inputs({name: t[index] for name, t in self.inputs.items()})
        return [self.inputs[index]]

    def restore(self, ledger: Ledger, body: Mapping[str, Any]) -> None:
        """Load a Checkpoint's model and optimizer state into the program and its optimizer."""
        data = ledger.artifact(body["artifact"])
        if data is None:
            raise ReplayError(f"checkpoint artifact {body['artifact'].hex()[:16]} is not stored in the ledger")
        tensors, scalars = read_checkpoint(data, body)
        restore(self.inner, self.optimizer, tensors, scalars)
        self.route_at(body["step"])

    def step(self, original: Mapping[str, Any], batch: list[int], inspect: Inspect | None = None) -> dict[str, Any]:
        """One governed step of ``batch`` with the original step's number, seed and optimizer settings;
        returns its GovernedUpdate body. ``inspect`` sees the forward before backward."""
        for group, recorded in zip(self.optimizer.param_groups, original["optimizer"]["groups"]):
            for k, v in recorded.items():
                group[k] = tuple(v) if k == "betas" else v
        self.route_at(original["step"])
        rules = [self.routes.rules[i] for i in batch]
        limits = batch_limits(self.policy.compiled, rules)
        self.optimizer.zero_grad(set_to_none=True)
        step = original["step"]
        if self.world is None:
            pieces = [batch]
        elif len(batch) < self.world:
            raise ReplayError(f"step {step}: {len(batch)} examples are left of its batch, fewer than the run's "
                              f"{self.world} ranks: a shard would be empty (specs/distributed.md §2); not replayable yet")
        else:
            pieces = shards(batch, self.world)
        # Each piece in order (one, or each rank's shard: specs/distributed.md §2-4): its own seed (piece 0 the
        # step's), forward, the loss undivided, backward; the gradients add up.
        losses, each = [], []
        for r, piece in enumerate(pieces):
            index = torch.tensor(piece, dtype=torch.int64)
            seed = original["seeds"]["step"] if r == 0 else micro_seed(original["seeds"]["run"], step, r)
            torch.default_generator.manual_seed(seed)
            try:
                out = self.module(*self.rows(index), self.profiles[index])
            except ProgramError as exc:
                raise ReplayError(f"step {step}: the run's program fails: {exc.args[0]}") from None
            labels = self.labels[index]
            if self.privacy is not None:
                if self.world is not None:
                    raise ReplayError(f"step {step}: a run over ranks under a privacy policy is not replayable yet")
                leaf = out if isinstance(out, Tensor) else float_leaves(out)[0]
                factors = batch_factors(leaf, labels, self.example_loss_fn, [self.routes.rules[i] for i in piece],
                                        self.bands.params, self.privacy)
                out = mix_factors(out, factors)
            if inspect is not None:
                inspect(out, labels, index)
            loss_t = self.loss_fn(out, labels)
            losses.append(float(loss_t.detach()))
            if self.records_example_losses:
                with torch.no_grad():
                    each.append(self.example_loss_fn(out.detach(), labels))
            loss_t.backward()
        if self.world is not None:  # the shards' sum, in rank order, over the world size (§3)
            divide_gradients(self.module.parameters(), self.world)
        if self.privacy is not None:  # specs/privacy.md §3: the step's noise, from the run's seed
            add_noise(self.bands.params, self.privacy, original["seeds"]["run"], step, len(batch))
        loss = losses[0] if self.world is None else math.fsum(losses) / self.world
        body = self._finish(original, batch, rules, limits, loss,
                            example_loss_bytes(each) if self.records_example_losses else None)
        if self.world is not None:
            body["recipe"] = {"ranks": [len(piece) for piece in pieces], "losses": losses}
        if self.privacy is not None:
            body["recipe"] = {"privacy": self.privacy.record(factors, len(batch) / self.count)}
        return body

    def _finish(self, original: Mapping[str, Any], batch: list[int], rules: list[int],
                limits: tuple[float | None, ...], loss: float, each: bytes | None) -> dict[str, Any]:
        """specs/training.md §3 steps 4-10 after the backward(s): band norms and clip, the optimizer's step,
        update norms; the GovernedUpdate body."""
        grad_norms = clip_bands(self.module, self.bands, limits)
        if not math.isfinite(loss) or not all(math.isfinite(n) for n in grad_norms):
            raise ReplayError(f"step {original['step']}: non-finite loss or band gradient norm on replay")
        update_norms = step_and_measure(self.optimizer, self.flat, self.snapshot, self.sizes)
        if not all(math.isfinite(n) for n in update_norms):
            raise ReplayError(f"step {original['step']}: non-finite update on replay")
        described = {"name": original["optimizer"]["name"], "groups": [dict(g) for g in original["optimizer"]["groups"]]}
        return update_body(
            original["step"], batch, rules, limits, policy=self.policy.digest, loss=loss, grad_norms=grad_norms,
            update_norms=update_norms, optimizer=described, seeds=dict(original["seeds"]),
            writes_of=self.routes.writes_of, names=self.routes.names, n_bands=self.n_bands, example_losses=each,
        )
