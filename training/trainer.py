"""Governed training: the user's model, optimizer and loader, governed so that every optimizer step is
routed by the signed policy and recorded in the ledger (specs/training.md is the normative twin).

The user's loop runs as written, the way it does after Opacus's ``make_private``::

    engine = Governance(ledger, trainer_key, dataset=ds, policy=sp, layout=layout, run_id="r1")
    model, optimizer, loader = engine.make_governed(model, optimizer, loader)
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()          # the optimizer's own step, observed by hooks: recorded or refused
    engine.close()                # final checkpoint and signed tree head

``optimizer`` is the user's own object (an LR scheduler built on it works); ``model`` routes each
example's gradient by depth; ``loader`` yields the committed batches as ``(inputs, labels)``, the
labels being the manifests'. What a step did (its micro-batches, loss scaling, clip, autocast,
hyper-parameters) is found by ``recorder.StepRecorder``; the first step of each new recipe is
replayed from the exported program by ``self_check``; the routing tables and the update body,
which unlearning shares, are in ``updates``. This module holds the run: its plan (data, routing
tables), its records and its checkpoints.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset, default_collate

from gradledger.ledger import encoding
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.program import Program, ProgramError, load_program

from .bands import BandLayout, ResolvedBands, resolve_bands
from .checkpoints import (CheckpointData, LiveCheckpoint, checkpoint_digest, read_checkpoint, restore,
                          start_checkpoint, tensor_digest)
from .dataset import CommittedDataset, check_batch
from .distributed import RankGroup, RankRefused, shard_sizes, shards
from .dynamics.memorization import LossTraces, MemorizationScan, flag
from .dynamics.canaries import scanned_sets
from .dynamics.record import record_scan, scan_body
from .dynamics.profiles import Budgets, DepthProfiles, ProfileJob
from .environment import environment
from .errors import DatasetError, GovernanceError, ManifestError, PolicyError
from .gate import GatedModel, batch_statistics_module, check_routing, export_gated
from .inputs import InputStructure, program_settings
from .manifests import example_id
from .order import MICRO_SEED_DOMAIN, ORDER_DOMAIN, STEP_SEED_DOMAIN, epoch_order, micro_seed, step_seed
from .policy import SignedPolicy, adopt_policy, batch_limits, latest_adopted, verify_policy
from .record_thread import RecordingFailed, RecordWriter
from .recorder import Micro, StepRecorder, StepRefused
from .privacy import PrivacyPlan, Spent, require_accountant
from .registry import (LOSSES, VARYING, checkpoint_skips, describe_optimizer, example_loss_function, loss_function,
                       optimizer_name)
from .runtime import no_uninitialized_fill, release_setup_memory, torch_deterministic
from .self_check import replay_gradients
from .updates import RouteTables, Routes, example_loss_bytes, example_loss_values, update_body

#: The training format this trainer writes (specs/training.md §5): 2 adds gradient accumulation,
#: loss scaling, the user's clip, autocast, per-step hyper-parameters and the loader's own order;
#: 3 models of parts; 4 every example's loss in each GovernedUpdate, for a model of one tensor or of parts;
#: 5 the frozen parameters (a LoRA's base model) committed by digest in RunStarted; 6 the monitors the
#: run records at its checkpoints (``settings.monitors``, specs/dynamics.md §2.2); 7 runs over torch.distributed
#: ranks (``settings.distributed``, a step's ``recipe.ranks``: specs/distributed.md); 8 depth profiles among the
#: monitors (``settings.monitors.profiles``, specs/dynamics.md §5); 9 privacy (``recipe.privacy`` under a policy
#: with private rules, specs/privacy.md); 10 the memorization monitor's method (``"mean-loss"``, dynamics.md §1.1).
FORMAT = 10
#: Orders a run may follow (specs/training.md §2): committed before training (the seeded hash
#: order, or explicit batches), or the user loader's sampler, recorded step by step.
ORDERS = (ORDER_DOMAIN, "explicit", "loader")


@dataclass(frozen=True)
class Batch:
    """One governed batch: inputs from the user's dataset, labels and routing from the manifests.

    Unpacks as ``x, y = batch`` (inputs, labels), so a loop written for ``(x, y)`` batches runs as is.
    """

    step: int
    indices: list[int]
    inputs: Any
    labels: Tensor
    profiles: Tensor  # [B, n_bands] float32, what the gate takes
    rules: list[int]  # per example, the policy rule index (-1: default)
    limits: tuple[float | None, ...]  # per band, the batch's norm limit

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.inputs, self.labels))


def _input_of(item: Any) -> Any:
    # (x, y) pairs are common; the label half is ignored: labels come from the manifests.
    return item[0] if isinstance(item, (tuple, list)) else item


# -- the user's model and loader, governed ---------------------------------------------------


class GovernedModel(GatedModel):
    """The gate around the user's model, bound to a run.

    In training mode each forward must be of the batch the governed loader drew last: ``model(x)``
    (or ``model(batch)``); the routing profiles come from that batch. In eval mode it is the plain
    model (``model(x)``) or the gate (``model(x, profiles)``).
    """

    def __init__(self, model: nn.Module, bands: ResolvedBands, run: "Governance") -> None:
        super().__init__(model, bands, inputs=run.inputs)
        object.__setattr__(self, "run", run)  # not a submodule, not in state_dict

    def train(self, mode: bool = True) -> "GovernedModel":
        """Training mode puts every module of the model back in the mode the program was exported
        with (a BatchNorm kept in eval mode stays there): replay runs that program."""
        super().train(mode)
        if mode:
            self.run.restore_modes()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(x)``, ``model(x, profiles)`` or ``model(batch)``; for a model of parts also the call the
        model itself takes (``model(**x)``, ``model(*x)``)."""
        x, profiles = self.run.inputs_of(args, kwargs)
        if not self.training:
            if isinstance(x, Batch):
                x, profiles = x.inputs, x.profiles
            return self.inputs.call_model(self.model, x) if profiles is None else super().forward(x, profiles)
        micro = self.run.forward_of(x, profiles)
        recorder = self.run.recorder
        recorder.before_forward(micro)
        out = self._run(micro.batch.inputs, self.run.ratios_of(micro.batch))
        return recorder.after_forward(micro, out)


class GovernedLoader:
    """Yields the run's batches as ``Batch`` (``x, y = batch``), one epoch per iteration."""

    def __init__(self, run: "Governance") -> None:
        self.run = run

    def __len__(self) -> int:
        return self.run.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        run = self.run
        if run.order == "loader":
            for indices in run.sampler_epoch():
                yield run.draw(indices)
            return
        epoch = run.drawn // run.steps_per_epoch
        while not run.closed and run.drawn // run.steps_per_epoch == epoch:
            yield run.draw()


# -- the run ------------------------------------------------------------------------------


class Governance:
    """Governs one training run in ``ledger`` under ``policy``, signing with the trainer ``key``.

    ``loss`` names the loss the run records (specs/training.md §6); the user's loop may compute it
    any way that gives the same gradient (``F.cross_entropy``, ``nn.CrossEntropyLoss()``, divided
    by the number of accumulated micro-batches). ``order``: ``"committed"`` (the seeded hash order,
    fixed before training), ``"loader"`` (the loader's own sampler, e.g. ``shuffle=True``, recorded
    step by step), or given ``batches``.
    """

    def __init__(
        self,
        ledger: Ledger,
        key: SigningKey,
        *,
        dataset: CommittedDataset,
        policy: SignedPolicy,
        layout: BandLayout,
        run_id: str,
        loss: str = "cross_entropy",
        loss_settings: dict[str, Any] | None = None,
        checkpoint_every: int = 100,
        seed: int = 0,
        root_key: SigningKey | None = None,
        batches: Sequence[Sequence[int]] | None = None,
        order: str = "committed",
        check_examples: bool = True,
        description: str | None = None,
        call: str = "spread",
        memorization: MemorizationScan | None = None,
        profiles: DepthProfiles | None = None,
    ) -> None:
        if type(checkpoint_every) is not int or checkpoint_every < 1:
            raise GovernanceError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
        if type(seed) is not int or not 0 <= seed < 1 << 64:
            raise GovernanceError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if order not in ("committed", "loader"):
            raise GovernanceError(f"order must be 'committed' or 'loader', got {order!r}")
        if memorization is not None and not isinstance(memorization, MemorizationScan):
            raise GovernanceError(f"memorization must be a MemorizationScan, got {type(memorization).__name__}")
        required = policy.monitors.get("memorization")
        if required is not None:  # the root's policy makes every run under it scan (specs/dynamics.md §2.2)
            if memorization is None:
                memorization = MemorizationScan.from_parameters(required)
            elif memorization.parameters != required:
                raise GovernanceError(f"policy {policy.policy['name']!r} requires memorization scans with {required}; "
                                      f"the run asks for {memorization.parameters}: leave memorization= unset")
        #: The torch.distributed ranks of the run (None: one process); rank 0 alone writes (specs/distributed.md).
        self.ranks = RankGroup.current()
        #: specs/dynamics.md §5: the depth profile recorded at every checkpoint, over a held-out dataset.
        self.profiles = None if profiles is None else ProfileJob.of(ledger, profiles, dataset, self.ranks)
        #: §5.5: the policy's entropy budgets, read from each checkpoint's profile (None: no budget).
        self.budgets = Budgets.of(policy, self.profiles)
        #: specs/privacy.md: the clip and noise of the policy's private examples (None: no private rule).
        self.privacy = PrivacyPlan.of(policy.compiled)
        if self.privacy is not None and self.ranks is not None:
            raise GovernanceError("a run under a privacy policy over torch.distributed ranks is not recorded yet "
                                  "(specs/privacy.md §8): train it on one process")
        if self.privacy is not None:
            require_accountant()  # at the start, not at the first checkpoint
        #: §5.1: the sample rates spent so far, recorded as epsilon at every checkpoint after step 0.
        self._spent = Spent(self.privacy) if self.privacy is not None else None
        self.ledger, self.key = ledger, key
        self.dataset, self.policy, self.layout = dataset, policy, layout
        self.run_id, self.description = run_id, description
        self.loss_name = loss
        self.loss_fn, self.loss_settings = loss_function(loss, loss_settings)
        self.example_loss_fn = example_loss_function(loss, self.loss_settings)
        self.loss_names = tuple(LOSSES)
        self.checkpoint_every, self.seed = checkpoint_every, seed
        self.root_key = root_key
        self.batches = [list(b) for b in batches] if batches is not None else None
        self.order = "explicit" if batches is not None else ORDER_DOMAIN if order == "committed" else "loader"
        self.check_examples = check_examples
        self.call = call  # checked by InputStructure.of, when the loader's data is bound
        #: The memorization scan recorded at each checkpoint after step 0, over every loss so far.
        self.memorization = memorization
        self._traces = LossTraces(dataset.count) if memorization is not None else None
        # specs/dynamics.md §4: the dataset's canary sets, whose ranks every scan of the run records.
        self._canaries = (scanned_sets(dataset.manifests, dataset.name, GovernanceError)
                          if memorization is not None else [])
        #: How the user's model takes a batch's inputs (set from the dataset's first item).
        self.inputs = InputStructure("tensor")
        self.step = 0
        self.drawn = 0  # batches drawn in the run, micro-batches included
        #: Over torch.distributed ranks: the whole batch of the step being drawn (this rank trains its shard).
        self.step_indices: list[int] = []
        self.gather_group: Any = None
        self.closed = False
        self.started = False
        self.last_checkpoint: CheckpointData | None = None
        self._checkpointed: int | None = None  # the step of the last checkpoint taken (maybe not yet stored)
        self.run_seq: int | None = None
        self.policy_seq: int | None = None
        self.recorder: StepRecorder | None = None  # set once the run starts
        self._writer: RecordWriter | None = None  # the recorder thread, from the run's start to its end
        self._described: dict[str, Any] | None = None  # the optimizer as checked before this step
        self._recorded_fixed: tuple[dict[str, Any], bytes] | None = None
        self._gated: GovernedModel | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._run_optimizer: dict[str, Any] | None = None  # RunStarted settings.optimizer
        self._program: bytes | None = None  # the program artifact's digest
        self._checked_program: Program | None = None  # parsed once, weights not read (the self-check's)
        self._reading: LiveCheckpoint | None = None  # a checkpoint still reading the live state
        self._order: tuple[int, list[int]] | None = None
        self._sampler: Any = None
        self._stack = contextlib.ExitStack()
        #: (name, module, training flag) when the program was exported; every step runs in these.
        self.exported_modes: list[tuple[str, nn.Module, bool]] = []

    # -- setup -----------------------------------------------------------------------

    def make_governed(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
    ) -> tuple[GovernedModel, torch.optim.Optimizer, GovernedLoader]:
        """Check everything, then record RunStarted and the step-0 checkpoint; return the governed
        model, the user's own optimizer (now observed by the run's hooks) and the governed loader.

        Every refusal (policy, bands, dataset, routing, export) is raised before anything is appended.
        """
        self._require_fresh()
        if self.ranks is not None:
            return self._make_distributed(model, optimizer, loader)
        gated = self._prepare(model, optimizer, loader)
        probe = self._batch(0, self._probe_indices())
        check_routing(gated, probe.inputs)
        return self._start(gated, model, optimizer, probe, loader)

    def _start(self, gated: GovernedModel, model: nn.Module, optimizer: torch.optim.Optimizer, probe: Batch,
               loader: Any) -> tuple[GovernedModel, torch.optim.Optimizer, GovernedLoader]:
        """The writer's start: export, RunStarted and the step-0 checkpoint (nothing appended before a refusal)."""
        adopted = self._adopted_seq()
        program = self._export(model, probe)  # may fail: still before any append
        checked = self._parse_program(program)  # so may this: the verifier's loader must read it back
        self._begin(gated, optimizer)
        try:
            self.policy_seq = adopted if adopted is not None else self._adopt()
            self._program = self.ledger.put_artifact(program)
            self._checked_program = checked
            body: dict[str, Any] = {
                "run_id": self.run_id,
                "environment": environment(),
                "artifacts": {"program": self._program},
                "settings": self._settings(optimizer, probe),
            }
            self._run_optimizer = body["settings"]["optimizer"]
            if self.description is not None:
                body["description"] = self.description
            self.run_seq = self.ledger.append("RunStarted", body, self.key).seq
            # Appended, not committed: the run is committed with its first checkpoint after an update
            # (specs/training.md §1), so a run that ends before it leaves nothing, not a lone checkpoint.
            self._checkpoint(commit=False)
            self._drain()
        except BaseException:
            self._end()
            raise
        release_setup_memory()  # the export's garbage, before training's peak (runtime.py says why)
        return gated, optimizer, GovernedLoader(self)

    def _make_distributed(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
                          ) -> tuple[GovernedModel, torch.optim.Optimizer, GovernedLoader]:
        """Every rank: the same checks, rank 0's state broadcast, the same settings agreed; then rank 0 starts
        the run in the ledger while the others wait for its word (specs/distributed.md §1)."""
        ranks = self.ranks
        assert ranks is not None
        why: str | None = None
        try:
            gated = self._prepare(model, optimizer, loader)
            probe = self._batch(0, self._probe_indices())
            check_routing(gated, probe.inputs)
        except GovernanceError as exc:
            why = str(exc)
        ranks.agree(why, "governing the run")
        ranks.broadcast_state(model)
        self.gather_group = ranks.new_group()  # the gradients' gathers (distributed.GradientGather)
        ranks.same(self._shared_settings(optimizer), "the run's settings")
        why, started = None, None
        if ranks.writer:
            try:
                started = self._start(gated, model, optimizer, probe, loader)
            except GovernanceError as exc:
                why = str(exc)
        else:
            self._run_optimizer = describe_optimizer(optimizer)
            self._begin(gated, optimizer)
        try:
            ranks.agree(why, "starting the run")
        except RankRefused:
            if started is not None or not ranks.writer:
                self.closed = True
                self._end(GovernanceError("another rank refused the run's start"))
            raise
        return started or (gated, optimizer, GovernedLoader(self))

    def _shared_settings(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # What every rank must hold alike before the first step (the settings but the ledger's own facts).
        assert self._gated is not None
        return {"seed": self.seed, "order": self.order, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "checkpoint_every": self.checkpoint_every, "loss": [self.loss_name, dict(self.loss_settings)],
                "optimizer": describe_optimizer(optimizer), "bands": self.layout.to_obj(),
                "band_params": [list(ns) for ns in self._gated.bands.param_names], "policy": self.policy.digest,
                "dataset": [self.dataset.name, self.dataset.root, self.dataset.count], "run_id": self.run_id,
                "monitors": self._monitors()}

    def resume(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
    ) -> tuple[GovernedModel, torch.optim.Optimizer, GovernedLoader]:
        """Continue run ``run_id`` from its last Checkpoint: same settings, restored state, same chain.

        Over torch.distributed ranks every rank restores the same checkpoint from the ledger (rank 0's,
        opened read-only on the others) and the ranks agree on it before rank 0 goes on writing
        (specs/distributed.md §5)."""
        self._require_fresh()
        why: str | None = None
        try:
            gated, run_seq, run_body, ckpt_seq = self._restore_last(model, optimizer, loader)
        except GovernanceError as exc:
            if self.ranks is None:
                raise
            why = str(exc)
        if self.ranks is not None:
            ranks = self.ranks
            ranks.agree(why, "resuming the run")
            assert self.last_checkpoint is not None
            # The same checkpoint on every rank: a rank reading a stale copy of the ledger would fork the run.
            ranks.same([run_seq, self.last_checkpoint.digest, self.step, self.drawn], "the checkpoint resumed from")
            self.gather_group = ranks.new_group()  # the gradients' gathers, as at the start
            ranks.same(self._shared_settings(optimizer), "the run's settings")
        if self._traces is not None and (self.ranks is None or self.ranks.writer):
            self._read_back_traces(run_seq, ckpt_seq)
        if self.ranks is not None and self._routes.reads_flags and self.step > 0:
            self._use_flags(self._rank0_flags(self._routes.flags))  # what rank 0 read back
        if self.budgets is not None:  # §5.5: the rules the resume checkpoint's recorded profile suspends
            self._use_suspended(self.budgets.read_back(self.ledger, run_seq, self.step))
        if self._spent is not None:  # specs/privacy.md §5.1: the steps before the resume are spent too
            self._spent.read_back([self.ledger.observation(seq).body for seq in self.ledger.by_type("GovernedUpdate")
                                   if run_seq < seq < ckpt_seq])
        self.run_seq, self.policy_seq = run_seq, run_body["settings"].get("policy_seq")
        self._run_optimizer = run_body["settings"]["optimizer"]
        self._program = run_body["artifacts"]["program"]
        stored = self.ledger.artifact(self._program)
        if stored is None:
            raise GovernanceError(f"the run's program artifact {self._program.hex()[:16]} is not stored in the ledger")
        self._checked_program = self._parse_program(stored)
        del stored
        self._begin(gated, optimizer)
        return gated, optimizer, GovernedLoader(self)

    def _restore_last(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
                      ) -> tuple[GovernedModel, int, dict[str, Any], int]:
        """The run's last Checkpoint restored into ``model`` and ``optimizer`` after the setup checks and the
        settings compared: (governed model, RunStarted seq and body, the checkpoint's seq)."""
        run_seq, run_body = self._find_run()
        settings = run_body["settings"]
        ckpt_seq, drawn = self._last_checkpoint_seq(run_seq)
        gated = self._prepare(model, optimizer, loader)
        self._compare_settings(settings, optimizer)
        body = self.ledger.observation(ckpt_seq).body
        data = self.ledger.artifact(body["artifact"])
        if data is None:
            raise GovernanceError(f"checkpoint artifact {body['artifact'].hex()[:16]} is not stored in the ledger")
        tensors, scalars = read_checkpoint(data, body)
        restore(model, optimizer, tensors, scalars)
        self.step, self.drawn = body["step"], drawn
        check_routing(gated, self._batch(self.step, self._probe_indices()).inputs)
        self.last_checkpoint = CheckpointData(body["step"], tensors, dict(body["tensors"]), body["digest"], data)
        self._checkpointed = body["step"]
        return gated, run_seq, run_body, ckpt_seq

    def _read_back_traces(self, run_seq: int, ckpt_seq: int) -> None:
        """The losses recorded before the resume, so that the scans after it cover those steps too; and
        where the policy routes by the flags, the flags of the resume checkpoint's scan (dynamics.md §2.4)."""
        assert self._traces is not None and self.memorization is not None
        for seq in self.ledger.by_type("GovernedUpdate"):
            if run_seq < seq < ckpt_seq:
                u = self.ledger.observation(seq).body
                self._traces.add(u["batch"], example_loss_values(u["example_losses"]))
        if self._routes.reads_flags and self.step > 0:
            params = self.memorization
            found = flag(self._traces.scores(params.min_trace, params.method), params.fraction)
            self._use_flags(frozenset(i for i, _ in found))

    def _require_fresh(self) -> None:
        if self.started or self.closed:
            raise GovernanceError("this Governance already governs a run; make a new one")

    def _prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any) -> GovernedModel:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise GovernanceError("govern the model itself, not DistributedDataParallel(model): over torch.distributed "
                                  "ranks the governed optimizer reduces the gradients itself, in rank order, so that one "
                                  "process can replay the run bit for bit (specs/distributed.md §3)")
        optimizer_name(optimizer)  # in the registry, or replay could not rebuild it
        if (bn := batch_statistics_module(model)) is not None:
            raise GovernanceError(
                f"module {bn!r} is a BatchNorm using batch statistics (training mode, or no running stats): "
                "examples share them, so no routing holds and replay would refuse the program; put it in eval "
                "mode before governing (model.train() then the BatchNorm's .eval()), or use GroupNorm or "
                "LayerNorm")
        # The modes the program is exported with (dropout on, BatchNorm off...): every step must run in them.
        # Walked at every forward: a list, not named_modules()'s recursive generator (~0.6 ms a step on a ViT).
        self.exported_modes = [(n, m, m.training) for n, m in model.named_modules()]
        verify_policy(self.policy, self.ledger.registry)
        if tuple(self.policy.bands) != self.layout.names:
            raise PolicyError(f"policy bands {list(self.policy.bands)} differ from the layout's {list(self.layout.names)}")
        bands = resolve_bands(model, self.layout)
        owned = {id(p) for ps in bands.params for p in ps}
        stray = [i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) not in owned]
        if stray:
            raise GovernanceError("the optimizer holds parameters that are in no band of the model")
        self._check_commitment()
        self._bind_data(loader)
        self._route_all()
        self._gated = GovernedModel(model, bands, self)
        self._optimizer = optimizer
        self._names = {id(p): n for n, p in model.named_parameters()}
        return self._gated

    def _check_commitment(self) -> None:
        ds = self.dataset
        if ds.seq is None:
            raise DatasetError(f"dataset {ds.name!r} has no DatasetCommitted observation in this ledger")
        obs = self.ledger.observation_of_type(ds.seq, "DatasetCommitted", DatasetError)
        if obs.body["root"] != ds.root or obs.body["count"] != ds.count:
            raise DatasetError(f"dataset {ds.name!r} is not committed in this ledger at seq {ds.seq}")

    def _bind_data(self, loader: Any) -> None:
        data = getattr(loader, "dataset", None)
        batch_size = getattr(loader, "batch_size", None)
        if data is None or (self.batches is None and not batch_size):
            raise GovernanceError("the loader needs .dataset and an int .batch_size (or pass explicit batches)")
        if len(data) != self.dataset.count:
            raise ManifestError(
                f"the loader's dataset has {len(data)} examples, committed dataset {self.dataset.name!r} "
                f"has {self.dataset.count} manifests"
            )
        self._data = data
        self.inputs = InputStructure.of(_input_of(data[0]), self.call) if len(data) else InputStructure("tensor")
        if self.inputs.kind == "dict" and self.inputs.call == "spread" and "profiles" in self.inputs.names:
            raise GovernanceError("an input part named 'profiles' would be taken for the gate's routing profiles; "
                                  "rename it")
        self.batch_size = int(batch_size) if batch_size else 0
        if self.ranks is not None:
            # Each rank's loader gives its own (per-rank) batch size, as under DDP; the run's batch is all ranks'.
            self.batch_size *= self.ranks.world
        self.drop_last = bool(getattr(loader, "drop_last", False))
        if self.batches is not None:
            if not self.batches or any(not b for b in self.batches):
                raise GovernanceError("explicit batches must be non-empty")
            self.batches = [check_batch(self.dataset, b) for b in self.batches]
            self.steps_per_epoch = len(self.batches)
        elif self.order == "loader":
            self._sampler = getattr(loader, "batch_sampler", None)
            if self._sampler is None:
                raise GovernanceError("order='loader' needs a DataLoader with a batch_sampler (a batch_size)")
            self.steps_per_epoch = len(self._sampler)
        else:
            n, b = self.dataset.count, self.batch_size
            self.steps_per_epoch = n // b if self.drop_last else -(-n // b)
        if self.steps_per_epoch == 0:
            raise GovernanceError(f"batch size {self.batch_size} with drop_last leaves no batch of "
                                  f"{self.dataset.count} examples")
        if self.check_examples:
            for i, m in enumerate(self.dataset.manifests):
                if example_id(_input_of(data[i])) != m.example:
                    raise ManifestError(
                        f"dataset item {i} is not the example its manifest names ({m.example.hex()[:16]}): "
                        "the loader's dataset must be in committed order"
                    )

    def _route_all(self) -> None:
        # Routing is a pure function of manifest, policy and (where a rule matches them) the memorization
        # flags in force: once per index at setup, flagged and not, so an unroutable example stops the run
        # before its first step and a checkpoint's new flags only pick rows.
        tables = RouteTables([m.manifest for m in self.dataset.manifests], self.ledger.registry,
                                   self.policy.compiled)
        self._routes = Routes(tables, len(self.layout), ratios=True)
        self._label_table = torch.tensor([m.label for m in self.dataset.manifests], dtype=torch.int64)

    def _rank0_flags(self, flags: frozenset[int] | None) -> frozenset[int]:
        """Over ranks, rank 0's ``flags`` on every rank: it alone holds the losses they come from
        (specs/dynamics.md §2.4, distributed.md §1). Every rank calls it at the same point of the run."""
        if self.ranks is None:
            return flags or frozenset()
        sent = sorted(flags) if self.ranks.writer and flags is not None else None
        return frozenset(self.ranks.exchange(sent)[0] or ())

    def _use_flags(self, flags: frozenset[int]) -> None:
        """Route from now on with ``flags`` the memorization flags in force (specs/dynamics.md §2.4)."""
        if self.recorder is not None and self.recorder.pending:
            # Its batches were routed by the flags before this checkpoint: recording them would not be
            # what the verifier recomputes for the step.
            raise GovernanceError("a batch of the next step was drawn before the checkpoint that changed the "
                                  "memorization flags its routing reads: draw each step's batches after the "
                                  "previous optimizer.step()")
        self._routes.use(flags)

    def _use_suspended(self, suspended: frozenset[int]) -> None:
        """Route from now on with ``suspended`` the rules whose entropy budget the last profile exceeded
        (specs/dynamics.md §5.5)."""
        if suspended != self._routes.suspended and self.recorder is not None and self.recorder.pending:
            raise GovernanceError("a batch of the next step was drawn before the checkpoint whose depth profile "
                                  "changed the rules its routing reads: draw each step's batches after the previous "
                                  "optimizer.step()")
        self._routes.use(self._routes.flags or frozenset(), suspended)

    def _adopted_seq(self) -> int | None:
        latest = latest_adopted(self.ledger)
        if latest is not None and latest[1].digest == self.policy.digest:
            return latest[0]
        if self.root_key is None:
            raise PolicyError(
                f"policy {self.policy.policy['name']!r} is not the ledger's adopted policy; "
                "adopt it first or pass root_key"
            )
        return None

    def _adopt(self) -> int:
        assert self.root_key is not None
        return adopt_policy(self.ledger, self.policy, self.root_key)

    def _export(self, model: nn.Module, probe: Batch) -> bytes:
        plain = GatedModel(model, self._gated.bands if self._gated else self.layout, inputs=self.inputs)
        try:
            # Traced without autocast: a step under autocast replays the same program under the
            # recorded autocast state (specs/training.md §3.2).
            with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False):
                program = export_gated(plain, probe.inputs, probe.profiles, dynamic_batch=len(probe) >= 2)
        finally:
            plain.remove_hooks()
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return buf.getvalue()

    def _settings(self, optimizer: torch.optim.Optimizer, probe: Batch) -> dict[str, Any]:
        assert self._gated is not None
        ds = self.dataset
        return {
            "format": FORMAT,
            "seed": self.seed,
            "seed_rule": STEP_SEED_DOMAIN,
            "order": self.order,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "steps_per_epoch": self.steps_per_epoch,
            "checkpoint_every": self.checkpoint_every,
            "loss": {"name": self.loss_name, "settings": dict(self.loss_settings)},
            "optimizer": describe_optimizer(optimizer),
            "bands": self.layout.to_obj(),
            "band_params": [list(ns) for ns in self._gated.bands.param_names],
            "param_groups": self._group_names(optimizer),
            "parameters": [n for n, p in self._gated.model.named_parameters() if p.requires_grad],
            "frozen": frozen_settings(self._gated.model),
            "policy": self.policy.digest,
            "policy_seq": self.policy_seq,
            "dataset": {"name": ds.name, "seq": ds.seq, "root": ds.root, "count": ds.count},
            "program": program_settings(self.inputs, probe.inputs),
            "monitors": self._monitors(),
            **({"distributed": self.ranks.settings()} if self.ranks is not None else {}),
        }

    def _monitors(self) -> dict[str, Any]:
        # settings.monitors (format 6): what the run records at each checkpoint; the verifier then
        # requires it there (specs/dynamics.md §2.2).
        found: dict[str, Any] = {} if self.memorization is None else {"memorization": self.memorization.parameters}
        if self.profiles is not None:
            found["profiles"] = self.profiles.settings
        return found

    def _group_names(self, optimizer: torch.optim.Optimizer) -> list[list[str]]:
        # Optimizer state is numbered by position in param_groups; replay needs the names.
        assert self._gated is not None
        name_of = {id(p): n for n, p in self._gated.model.named_parameters()}
        return [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]

    _COMPARED = ("format", "seed", "seed_rule", "order", "batch_size", "drop_last", "steps_per_epoch",
                 "checkpoint_every", "loss", "bands", "policy", "dataset", "monitors")

    def _compare_settings(self, recorded: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        assert self._gated is not None
        now = self._settings(optimizer, self._batch(0, self._probe_indices()))
        if recorded.get("format", 1) != FORMAT:
            raise GovernanceError(f"cannot resume run {self.run_id!r}: it was recorded in training format "
                                  f"{recorded.get('format', 1)}, this trainer writes format {FORMAT}")
        for key in self._COMPARED:
            if recorded.get(key) != now[key]:
                raise GovernanceError(f"cannot resume run {self.run_id!r}: {key} was {recorded.get(key)!r}, now {now[key]!r}")
        if recorded["optimizer"]["name"] != now["optimizer"]["name"]:
            raise GovernanceError(f"cannot resume run {self.run_id!r}: the optimizer was {recorded['optimizer']['name']}")
        if recorded.get("distributed") != now.get("distributed"):
            # The shards of every later step are cut by the world size (specs/distributed.md §2).
            was, is_ = (s.get("distributed", {}).get("world", 1) for s in (recorded, now))
            raise GovernanceError(f"cannot resume run {self.run_id!r}: it was recorded over {was} rank(s) "
                                  f"({recorded.get('distributed')!r}); resume it over the same, now {is_}")

    def _find_run(self) -> tuple[int, dict[str, Any]]:
        for seq in reversed(self.ledger.by_type("RunStarted")):
            body = self.ledger.observation(seq).body
            if body["run_id"] == self.run_id:
                return seq, body
        raise GovernanceError(f"no RunStarted for run {self.run_id!r} in the ledger")

    def _last_checkpoint_seq(self, run_seq: int) -> tuple[int, int]:
        """The last checkpoint's seq, and the batches drawn up to it (micro-batches included)."""
        later_runs = [s for s in self.ledger.by_type("RunStarted") if s > run_seq]
        end = later_runs[0] if later_runs else self.ledger.size
        ckpts = [s for s in self.ledger.by_type("Checkpoint") if run_seq < s < end]
        if not ckpts:
            raise GovernanceError(f"run {self.run_id!r} has no checkpoint to resume from")
        updates = [s for s in self.ledger.by_type("GovernedUpdate") if run_seq < s < end]
        if any(s > ckpts[-1] for s in updates):
            # Their state was never checkpointed; continuing would fork the recorded chain.
            raise GovernanceError(
                f"run {self.run_id!r} has {sum(s > ckpts[-1] for s in updates)} updates after its last checkpoint; "
                "it cannot be resumed"
            )
        drawn = sum(len(self.ledger.observation(s).body.get("recipe", {}).get("micro", [0])) for s in updates)
        return ckpts[-1], drawn

    def _begin(self, gated: GovernedModel, optimizer: torch.optim.Optimizer) -> None:
        self._stack.enter_context(torch_deterministic())
        self._stack.enter_context(no_uninitialized_fill())  # a NaN fill of every allocation: runtime.py
        writes = self.ranks is None or self.ranks.writer
        if writes:
            # Between checkpoints nothing is committed: a crash leaves the log at a checkpoint.
            self._stack.enter_context(self.ledger.deferred())
            # Closing the ledger (or the project) under an open run closes the run first: its final
            # checkpoint is committed, never the updates after the last one alone (which replay rejects).
            self._stack.callback(self.ledger.attach_appender(self._ledger_closing))
        order = [p for p in gated.model.parameters() if p.requires_grad]
        self.recorder = StepRecorder(self, gated, gated.bands, optimizer, self.loss_fn, order)
        self._stack.callback(self.recorder.detach)
        if writes:  # the other ranks of a distributed run never write (specs/distributed.md §1)
            self._writer = RecordWriter(self.ledger, self.key)
            self._stack.push(self._writer_exit)
        self.started = True

    def _ledger_closing(self, discard: bool) -> None:
        if self.closed:
            return
        if discard:  # the ledger drops its pending records: the run ends with them, as after a crash
            self.closed = True
            self._end(GovernanceError("the ledger discarded the run's pending records"))
        elif self.ranks is not None:
            # Rank 0's ledger closing under a run still open is no moment the other ranks share (close() is
            # collective): the run ends as after a crash, with what its checkpoints committed.
            self.closed = True
            self._end(GovernanceError("the ledger was closed under a run over ranks that was not closed"))
        else:
            self.close()

    def _writer_exit(self, kind: Any, exc: Any, tb: Any) -> bool:
        # Joined first at the run's end; on an exception what is still queued is dropped (it is discarded).
        if self._writer is not None:
            self._writer.close(discard=kind is not None)
        return False

    def _end(self, exc: BaseException | None = None) -> None:
        # Unwinds the recorder thread (joined first: pushed last), the hooks, the ledger's deferred
        # mode and deterministic algorithms. With ``exc`` the deferred records are discarded.
        if exc is None:
            self._stack.close()
        else:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
            self._stack = contextlib.ExitStack()

    # -- batches ---------------------------------------------------------------------

    def _probe_indices(self) -> list[int]:
        # Any batch of the run's shape traces the program (its batch size is symbolic): the first
        # one the order gives, or the first examples when the loader's sampler decides the order.
        if self.order == "loader":
            return list(range(min(max(self.batch_size, 2), self.dataset.count)))
        return self._indices(0)

    def _indices(self, drawn: int) -> list[int]:
        if self.batches is not None:
            return self.batches[drawn % len(self.batches)]
        epoch, pos = divmod(drawn, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, self.dataset.count))
        b = self.batch_size
        return self._order[1][pos * b : (pos + 1) * b]

    def _batch(self, step: int, indices: Sequence[int], limits: tuple[float | None, ...] | None = None) -> Batch:
        """The batch of ``indices``; ``limits``: the step's band limits when the batch is one rank's shard of it."""
        index = torch.tensor(indices, dtype=torch.int64)
        if isinstance(self._data, TensorDataset):
            inputs = self._data.tensors[0][index]  # what default_collate would stack, without per-item calls
        else:
            inputs = default_collate([_input_of(self._data[i]) for i in indices])
        labels = self._label_table[index]
        rules = [self._routes.rules[i] for i in indices]
        profiles = self._routes.profiles[index]
        if limits is None:
            limits = batch_limits(self.policy.compiled, rules)
        return Batch(step, list(indices), inputs, labels, profiles, rules, limits)

    def shard_batch(self, step: int, shard: Sequence[int], limits: tuple[float | None, ...]) -> Batch:
        """One rank's shard (its indices) of step ``step``, with the whole batch's band ``limits``."""
        return self._batch(step, shard, limits)

    def sampler_epoch(self) -> Iterator[list[int]]:
        """One epoch of the user loader's batch sampler (order ``"loader"``), each batch checked; it ends
        early when the run closes (a loop may close it mid-epoch)."""
        for indices in self._sampler:
            if self.closed:
                return
            yield check_batch(self.dataset, indices)

    def draw(self, indices: Sequence[int] | None = None) -> Batch:
        """The next batch of the run (the loader's, under order ``"loader"``), told to the recorder."""
        if not self.started or self.closed or self.recorder is None:
            raise GovernanceError("the run is not active")
        chosen = self._indices(self.drawn) if indices is None else indices
        if self.ranks is not None:
            if self.order == "loader":
                chosen = self._ranks_drew(chosen)
            self.step_indices = list(chosen)  # the whole batch: every rank knows every shard
            limits = batch_limits(self.policy.compiled, [self._routes.rules[i] for i in chosen])
            batch = self.shard_batch(self.step, shards(chosen, self.ranks.world)[self.ranks.rank], limits)
        else:
            batch = self._batch(self.step, chosen)
        self.recorder.drew(batch)
        self.drawn += 1
        return batch

    def _ranks_drew(self, mine: Sequence[int]) -> list[int]:
        """specs/distributed.md §2: under order ``"loader"`` over ranks, the step's batch is every rank's own
        draw in rank order, which must be the shards the shard rule cuts from it (every rank draws as
        many, a DistributedSampler's padding included); otherwise every rank refuses the step."""
        assert self.ranks is not None
        drawn = self.ranks.exchange(list(mine))
        sizes = [len(d) for d in drawn]
        if sum(sizes) < self.ranks.world or sizes != shard_sizes(sum(sizes), self.ranks.world):
            raise GovernanceError(
                f"step {self.step}: the ranks' loaders drew {sizes} examples (rank order); a run over ranks "
                "records one batch cut into shards whose sizes differ by at most one, the larger first: give "
                "every rank's loader the same batch size and a sampler that gives every rank as many examples "
                "(DistributedSampler does, padding with repeated examples; or drop_last=True)")
        return [i for d in drawn for i in d]

    @property
    def micro_batches(self) -> int:
        """Batches drawn since the last optimizer step: 0 when the next draw starts a step."""
        return 0 if self.recorder is None else len(self.recorder.pending)

    def ratios_of(self, batch: Batch) -> Tensor:
        """The batch's gate ratios: rows of the table validated at setup."""
        ratios = self._routes.ratios
        assert ratios is not None
        return ratios[torch.tensor(batch.indices, dtype=torch.int64)]

    def limits(self, micros: Sequence[Micro]) -> tuple[float | None, ...]:
        """The step's band limits: the policy's batch limits over every example of the step."""
        if len(micros) == 1:
            return micros[0].batch.limits
        return batch_limits(self.policy.compiled, [r for m in micros for r in m.batch.rules])

    def name_of(self, p: Tensor) -> str:
        return self._names.get(id(p), "?")

    # -- the forward -------------------------------------------------------------------

    def inputs_of(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(x, profiles)`` of a call of the governed model (a ``Batch`` passes through as ``x``)."""
        if len(args) == 1 and not kwargs and isinstance(args[0], Batch):
            return args[0], None
        return self.inputs.split_call(args, kwargs)

    def forward_of(self, x: Any, profiles: Tensor | None) -> Micro:
        """The micro-batch a training forward of ``x`` is, after checking it is the one just drawn."""
        if self.recorder is None:
            raise GovernanceError("a training forward needs a batch drawn from the governed loader")
        micro = self.recorder.current()
        drawn = micro.batch
        if isinstance(x, Batch):
            if profiles is not None:
                raise GovernanceError("pass either a Batch or (inputs, profiles), not both")
            if x is not drawn:
                raise GovernanceError(f"the forward's batch is not the one drawn for step {self.step}")
        elif not _same(x, drawn.inputs) or (profiles is not None and not _same(profiles, drawn.profiles)):
            raise GovernanceError(f"the forward's inputs or profiles are not those of the batch for step {self.step}")
        moved = [(n, want) for n, m, want in self.exported_modes if m.training != want]
        if moved:
            name, want = moved[0]
            raise StepRefused(
                f"step {self.step}: module {name or 'the model'!r} is in {'eval' if want else 'training'} "
                "mode, but the program was exported with it in the other: replay runs the exported program; "
                "set every module's mode before make_governed (the governed model's train() restores them); "
                "step refused")
        return micro

    def restore_modes(self) -> None:
        """Each module back in the mode the program was exported with. The exported modules, not a
        walk of the model by name: Trainers call ``train()`` every step (2 ms a step on a GPT-2 LoRA)."""
        for _, m, training in self.exported_modes:
            m.training = training

    def criterion(self, output: Tensor, labels: Tensor) -> Tensor:
        """The run's registered loss of ``output`` and ``labels``."""
        return self.loss_fn(output, labels)

    # -- the step, as the recorder hands it over -------------------------------------------

    def check_hyperparameters(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer as this step records it (lr, momentum and betas included); refused if it changed
        what may not change."""
        # specs/training.md §6: lr, momentum and betas may change step to step (a scheduler); every
        # other hyper-parameter is the RunStarted's, and a change is refused before the step.
        recorded = self._run_optimizer
        # The param groups' values, cheap to compare: unchanged since the last step that passed, that
        # step's description and check stand (describing and encoding cost tens of microseconds a step).
        # Only immutable values are compared so: a tensor lr or a list can change in place under the same
        # object, and a tuple compares its items by identity first; with one of those it is described anew.
        key = tuple(tuple((k, _exact(v)) for k, v in g.items() if k != "params") for g in optimizer.param_groups)
        cacheable = all(_immutable(v) for g in key for _, v in g)
        last = getattr(self, "_checked_groups", None)
        if cacheable and last is not None and last[0] is recorded and last[1] == key:
            self._described = last[2]
            return last[2]
        now = describe_optimizer(optimizer)
        # What this step records (step() changes no hyper-parameter; a scheduler changes them after it).
        self._described = now
        if recorded is None:
            return now
        fixed = [[{k: v for k, v in g.items() if k not in VARYING} for g in d["groups"]] for d in (now, recorded)]
        if self._recorded_fixed is None or self._recorded_fixed[0] is not recorded:
            self._recorded_fixed = (recorded, encoding.encode(fixed[1]))  # the RunStarted's: encoded once
        if len(now["groups"]) != len(recorded["groups"]) or encoding.encode(fixed[0]) != self._recorded_fixed[1]:
            raise StepRefused(
                f"step {self.step}: the optimizer's hyper-parameters are {fixed[0]}, but the run recorded "
                f"{fixed[1]} at RunStarted; only {', '.join(sorted(VARYING))} may change during a run "
                "(specs/training.md §6)")
        self._checked_groups = (recorded, key, now) if cacheable else None
        return now

    def self_check(self, micros: Sequence[Micro], recipe: Mapping[str, Any]) -> None:
        """``_self_check``, then its program copy and replayed graph handed back to the OS: it runs once per
        new recipe, so without that the process would carry them through training (runtime.py)."""
        try:
            self._self_check(micros, recipe)
        finally:
            release_setup_memory()

    @staticmethod
    def _parse_program(data: bytes) -> Program:
        # The stored program, read back by the strict loader the verifier uses, without its weights:
        # the self-check runs it on the live ones (no second copy of the model at a step).
        try:
            return load_program(data, weights=False)
        except ProgramError as exc:
            raise GovernanceError(f"the run's exported program cannot be read back: {exc.args[0]}") from None

    def _self_check(self, micros: Sequence[Micro], recipe: Mapping[str, Any]) -> None:
        assert self._gated is not None and self._checked_program is not None
        replay_gradients(self._checked_program, self._gated, micros, recipe, step=self.step, inputs=self.inputs,
                         loss_fn=self.loss_fn, trainable=self._trainable_names())

    def _trainable_names(self) -> list[str]:
        assert self._gated is not None
        return [n for n, p in self._gated.model.named_parameters() if p.requires_grad]

    def record_step(self, micros: Sequence[Micro], recipe: Mapping[str, Any], loss: float, grad_norms: list[float],
                    update_norms: list[float], optimizer: torch.optim.Optimizer) -> None:
        """Hand the step's GovernedUpdate (specs/training.md §3.1) to the recorder thread; checkpoint when due.

        Only plain Python values cross to the thread (the step's indices, rules, limits, norms, the
        optimizer's settings as they are now: a scheduler may change them before the next step), so
        the user's loop goes on while the record is built, encoded, signed and admitted.
        """
        step = self.step
        if self._writer is None:  # another rank than 0 of a distributed run: rank 0 records the step
            self.step += 1
            if self._routes.reads_flags and self.step % self.checkpoint_every == 0:
                self._use_flags(self._rank0_flags(None))  # rank 0's scan at this checkpoint (_scan_job)
            return
        indices = [i for m in micros for i in m.batch.indices]
        rules = [r for m in micros for r in m.batch.rules]
        limits = self.limits(micros)
        described, self._described = self._described or describe_optimizer(optimizer), None
        recipe = dict(recipe)
        each = [m.example_losses for m in micros]
        # The tables as they route this step: a checkpoint's new flags replace them before build() runs.
        writes_of, names = self._routes.writes_of, self._routes.names
        if self._traces is not None and all(t is not None for t in each):
            self._traces.add(indices, torch.cat([t.detach().reshape(-1) for t in each]))  # type: ignore[union-attr]
        if self._spent is not None:
            self._spent.add(recipe["privacy"]["sample_rate"])

        def build() -> dict[str, Any]:
            body = update_body(
                step, indices, rules, limits, policy=self.policy.digest, loss=loss,
                grad_norms=grad_norms, update_norms=update_norms, optimizer=described,
                seeds={"run": self.seed, "step": step_seed(self.seed, step)}, writes_of=writes_of,
                names=names, n_bands=len(self.layout), example_losses=example_loss_bytes(each),
            )
            if recipe:
                body["recipe"] = recipe
            return body

        assert self._writer is not None
        try:
            self._writer.submit(f"the GovernedUpdate of step {step}", "GovernedUpdate", build)
        except RecordingFailed as exc:
            # An earlier record failed since this step's pre-step check: the run ends here, as in _drain.
            self.closed = True
            self._end(exc)
            raise
        self.step += 1
        if self.step % self.checkpoint_every == 0:
            self._checkpoint()

    def await_checkpoint_read(self) -> None:
        """Block until the last checkpoint has read the live state (before anything steps it again)."""
        live, self._reading = self._reading, None
        if live is not None:
            live.released.wait()

    def check_recording(self) -> None:
        """Raise the recorder thread's failure (at the next optimizer.step()): the run then ends, its
        uncommitted records discarded, so the committed log ends at its last checkpoint."""
        writer = self._writer
        if writer is not None and writer.failed:
            self._drain()

    def _drain(self) -> None:
        # Wait for every job submitted (records, checkpoints) to be appended and committed; a failure
        # ends the run here: nothing after it is committed (the deferred records are discarded).
        if self._writer is None:
            return
        try:
            self._writer.drain()
        except RecordingFailed as exc:
            self.closed = True
            self._end(exc)
            raise

    # -- checkpoints and close -----------------------------------------------------------

    def _checkpoint(self, *, commit: bool = True) -> None:
        """Hash, store and (``commit``) commit the state of this step on the recorder thread, after the
        updates before it and while training goes on (specs/training.md §1: the checkpoint's tree head
        commits exactly the steps before it). The state is read in place (``LiveCheckpoint``): the
        next optimizer step waits until it has been read (``await_checkpoint_read``)."""
        assert self._gated is not None and self._optimizer is not None and self._writer is not None
        skips = checkpoint_skips(self._optimizer)
        live = LiveCheckpoint.start(self.step, self._gated.model, self._optimizer, skip_group_keys=skips)
        pending = None
        if live is None:  # a dtype outside safetensors' layout table: copied now
            if self.recorder is not None:
                self.recorder.drop_snapshot()  # not held beside the checkpoint's copy of the state
            pending = start_checkpoint(self.step, self._gated.model, self._optimizer, skip_group_keys=skips)
        self._checkpointed = self.step
        ledger, key = self.ledger, self.key
        scan = self._scan_job()
        # The profile's forward reads the weights of this step now, before the next optimizer step moves
        # them; its read-out runs on the recorder thread.
        profile, features, body = None, None, None
        if self.profiles is not None and self.run_seq is not None:
            profile, features = self.profiles, self.profiles.features(self._gated)
            if self.budgets is not None:
                # The budgets route the next step by this profile (specs/dynamics.md §5.5): read it out now.
                body = profile.body(self.run_seq, self.step, features)
                self._use_suspended(self.budgets.next(body))
        run_seq, step = self.run_seq, self.step
        spent = self._spent.job(run_seq, step) if self._spent is not None and step > 0 and run_seq is not None else None

        def store() -> None:
            if live is not None:
                try:
                    artifact = ledger.put_artifact_pieces(live.pieces())
                finally:
                    live.release()
                made = live.finished(lambda: ledger.artifact(artifact))
            else:
                assert pending is not None
                made = pending.finish()
                artifact = ledger.put_artifact(made.data)
                pending.data = b""  # the copy is in the ledger now; the run keeps only a way to read it back
            ledger.append("Checkpoint", made.body(artifact), key)
            if scan is not None:
                record_scan(ledger, scan(), key, commit=False)
            if profile is not None and features is not None and run_seq is not None:
                ledger.append("DepthProfile", body or profile.body(run_seq, step, features), key, commit=False)
            if spent is not None:
                ledger.append("PrivacySpent", spent(), key, commit=False)
            if commit:
                ledger.tree_head(key)  # commits the whole group: the log now ends at this checkpoint
            self.last_checkpoint = CheckpointData(made.step, None, made.digests, made.digest,
                                                  lambda: ledger.artifact(artifact))

        try:
            submit = self._writer.submit_commit if commit else self._writer.submit_call
            submit(f"the Checkpoint of step {self.step}", store, None if live is None else live.release)
            self._reading = live
        except RecordingFailed as exc:
            if live is not None:
                live.release()  # never queued: nothing will read the state
            self.closed = True
            self._end(exc)
            raise

    def _scan_job(self) -> Any:
        """The MemorizationScan of the checkpoint being taken (specs/dynamics.md §2.2): a function for the
        recorder thread, over the traces as they stand now (the list is copied: training goes on). Where
        the policy routes by the flags (§2.4), they are computed here, before the next step is drawn."""
        if self._traces is None or self.step == 0 or self.memorization is None or self.run_seq is None:
            return None
        step, params, run_seq, sets = self.step, self.memorization, self.run_seq, self._canaries
        if self._routes.reads_flags:
            body = scan_body(run_seq, step, self._traces, params, sets)
            self._use_flags(self._rank0_flags(frozenset(i for i, _ in body["flagged"])))
            return lambda: body
        traces = self._traces.copy()
        return lambda: scan_body(run_seq, step, traces, params, sets)

    def __enter__(self) -> "Governance":
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:
            # A failed loop records nothing more: the committed log ends at the last checkpoint, as
            # after a crash, and the run can be resumed from it. The exception reaches the ledger's
            # deferred() too, which discards the steps since that checkpoint (a later ledger.close()
            # would otherwise commit them).
            self.closed = True
            self._end(exc if isinstance(exc, BaseException) else None)

    def close(self) -> CheckpointData | None:
        """Final checkpoint (unless the last step was just checkpointed) and tree head; remove the hooks."""
        if self.closed:
            return self.last_checkpoint
        if self.started and self._writer is None:  # a rank that does not write: rank 0 closes the run
            self.closed = True
            self._end()
            if self.ranks is not None and self.step > 0:
                self.ranks.agree(None, "closing the run")  # returns once rank 0 has committed the run's end
            return None
        if self.started and self.step == 0:
            # No update was made: nothing of the run is committed, and nothing is (specs/training.md §1).
            self.closed = True
            self._end(GovernanceError("the run was closed before its first step; it records nothing"))
            self.last_checkpoint = None
            return None
        failure: BaseException | None = None
        try:
            if self.started and self._checkpointed != self.step:
                self._checkpoint()
            self._drain()  # the last checkpoint is committed before close returns it
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.closed = True
            self._end()
            if self.ranks is not None and self.started:
                # Every rank leaves close together, after the run's end is committed (or with its failure):
                # no rank tears the process group down under another (specs/distributed.md §1).
                self.ranks.agree(None if failure is None else str(failure), "closing the run")
        return self.last_checkpoint


class Trainer:
    """The common loop over a governed model, optimizer and loader."""

    def __init__(self, engine: Governance) -> None:
        self.engine = engine

    def fit(
        self, model: GovernedModel, optimizer: torch.optim.Optimizer, loader: GovernedLoader, steps: int, *,
        close: bool = True,
    ) -> list[float]:
        """Train until the run has taken ``steps`` steps in all; return this call's losses."""
        engine, losses = self.engine, []
        model.train()
        while engine.step < steps:
            if engine.closed:
                raise GovernanceError("the run is closed")
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = engine.criterion(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if engine.step >= steps:
                    break
        if close:
            engine.close()
        return losses


# -- helpers -------------------------------------------------------------------------------


def frozen_settings(model: nn.Module) -> dict[str, Any]:
    """Format 5 ``settings.frozen`` (specs/training.md §5): the model's parameters that do not train (a
    LoRA's base model) by name and tensor digest, and the checkpoint digest of that map."""
    tensors = {n: tensor_digest(p.detach()) for n, p in model.named_parameters() if not p.requires_grad}
    return {"digest": checkpoint_digest(tensors), "tensors": tensors}


def _exact(value: Any) -> Any:
    # Compared exactly: 1 == True == 1.0 and 0.0 == -0.0 in Python, but each records differently.
    if type(value) is float:
        return ("float", value.hex())
    if type(value) is tuple:
        return tuple(_exact(v) for v in value)
    return (type(value).__name__, value) if type(value) in (bool, int) else value


def _immutable(value: Any) -> bool:
    # A value that cannot change while the optimizer keeps the same object (check_hyperparameters).
    if value is None or type(value) in (bool, int, float, str):
        return True
    return type(value) is tuple and all(_immutable(v) for v in value)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return False


__all__ = [
    "FORMAT",
    "MICRO_SEED_DOMAIN",
    "ORDER_DOMAIN",
    "STEP_SEED_DOMAIN",
    "Batch",
    "Governance",
    "GovernedLoader",
    "GovernedModel",
    "StepRefused",
    "Trainer",
    "epoch_order",
    "micro_seed",
    "step_seed",
]
