"""Governed training: wrap a user's model, optimizer and loader so that every step is routed by the
signed policy and recorded in the ledger (specs/training.md is the normative twin).

A few lines govern an existing loop, the way Opacus's ``make_private`` does::

    engine = Governance(ledger, trainer_key, dataset=ds, policy=sp, layout=layout, run_id="r1")
    model, optimizer, loader = engine.make_governed(model, optimizer, loader)
    for batch in loader:
        optimizer.zero_grad()
        loss = engine.criterion(model(batch), batch.labels)
        loss.backward()
        optimizer.step()          # clip per band, step, measure, append one GovernedUpdate
    engine.close()                # final checkpoint and signed tree head
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset, default_collate

from gradledger.ledger import encoding
from gradledger.ledger.errors import CredentialError
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .bands import BandLayout, ResolvedBands, resolve_bands
from .checkpoints import CheckpointData, make_checkpoint, read_checkpoint, restore
from .dataset import CommittedDataset, check_batch
from .environment import environment
from .errors import DatasetError, GovernanceError, ManifestError, PolicyError
from .gate import GatedModel, _l2_of_norms, batch_statistics_module, check_routing, clip_bands, export_gated, routing_ratios, validate_profiles
from .manifests import example_id
from .policy import SignedPolicy, adopt_policy, batch_limits, latest_adopted, profiles_tensor, route, verify_policy
from .registry import describe_optimizer, loss_function, optimizer_name

ORDER_DOMAIN = "gradledger/order/v1"
STEP_SEED_DOMAIN = "gradledger/step-seed/v1"
#: Observations stay pending between checkpoints, so a crash leaves the log at a checkpoint.
_NO_AUTOCOMMIT = 1 << 62


# -- the recorded, seeded data order and per-step seeds -------------------------------------


def step_seed(seed: int, step: int) -> int:
    """The torch seed set before step ``step``'s forward: first 8 bytes (big-endian) of
    SHA-256(CBOR ["gradledger/step-seed/v1", seed, step])."""
    return int.from_bytes(hashlib.sha256(encoding.encode([STEP_SEED_DOMAIN, seed, step])).digest()[:8], "big")


def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    """Indices 0..count-1 sorted by SHA-256(CBOR ["gradledger/order/v1", seed, epoch, i]).

    A hash sort rather than torch.randperm: any verifier reproduces it without torch.
    """
    prefix = encoding.encode([ORDER_DOMAIN, seed, epoch, 0])[:-1]  # CBOR of the list without its last item
    sha256 = hashlib.sha256
    keys = [sha256(prefix + item).digest() for item in _uint_encodings(count)]
    return sorted(range(count), key=keys.__getitem__)


_UINT_CBOR: list[bytes] = []


def _uint_encodings(count: int) -> list[bytes]:
    """CBOR of 0 .. count-1, computed once per index for the process (every epoch needs them)."""
    if len(_UINT_CBOR) < count:
        _UINT_CBOR.extend(encoding.encode(i) for i in range(len(_UINT_CBOR), count))
    return _UINT_CBOR[:count] if len(_UINT_CBOR) > count else _UINT_CBOR


@dataclass(frozen=True)
class Batch:
    """One governed batch: inputs from the user's dataset, labels and routing from the manifests."""

    step: int
    indices: list[int]
    inputs: Any
    labels: Tensor
    profiles: Tensor  # [B, n_bands] float32, what the gate takes
    rules: list[int]  # per example, the policy rule index (-1: default)
    limits: tuple[float | None, ...]  # per band, the batch's norm limit

    def __len__(self) -> int:
        return len(self.indices)


def _input_of(item: Any) -> Any:
    # (x, y) pairs are common; the label half is ignored: labels come from the manifests.
    return item[0] if isinstance(item, (tuple, list)) else item


# -- the wrappers ------------------------------------------------------------------------


class GovernedModel(GatedModel):
    """The gate, bound to an engine: ``model(batch)`` or ``model(batch.inputs, batch.profiles)``.

    In training mode a forward needs the batch just drawn from the governed loader, and sets
    the step's torch seed first so dropout replays. In eval mode it is the plain gate.
    """

    def __init__(self, model: nn.Module, bands: ResolvedBands, engine: "Governance") -> None:
        super().__init__(model, bands)
        object.__setattr__(self, "_engine", engine)  # not a submodule, not in state_dict

    def train(self, mode: bool = True) -> "GovernedModel":
        """Training mode puts every module of the model back in the mode the program was exported
        with (a BatchNorm kept in eval mode stays there): replay runs that program."""
        super().train(mode)
        if mode:
            for name, m in self.model.named_modules():
                m.training = self._engine.exported_modes.get(name, m.training)
        return self

    def forward(self, x: Any, profiles: Tensor | None = None) -> Any:
        batch = None
        if isinstance(x, Batch):
            if profiles is not None:
                raise GovernanceError("pass either a Batch or (inputs, profiles), not both")
            batch, x, profiles = x, x.inputs, x.profiles
        if profiles is None:
            raise GovernanceError("the governed model needs the batch's routing profiles")
        if self.training:
            # The batch's profiles are rows of the table validated at setup (checked equal here),
            # so the gate takes the precomputed ratio rows instead of validating per forward.
            ratios = self._engine._before_forward(x, profiles, batch)
            n = len(self.bands)
            if profiles.dim() != 2 or profiles.shape[1] != n:
                raise GovernanceError(f"profiles must have shape [batch, {n}], got {list(profiles.shape)}")
            out = self._run(x, ratios)
            self._engine._output = out
            return out
        return super().forward(x, profiles)


class GovernedOptimizer:
    """Wraps the user's optimizer; ``step()`` clips per band, steps, measures and records."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine: "Governance") -> None:
        self.original = optimizer
        self._engine = engine

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            # A closure re-evaluates the loss inside step(): one governed step is one forward.
            raise GovernanceError("governed optimizers take no closure")
        self._engine._step()

    def state_dict(self) -> dict[str, Any]:
        return self.original.state_dict()


class GovernedLoader:
    """Yields the committed data order as Batches, one epoch per iteration, from the engine's step."""

    def __init__(self, engine: "Governance") -> None:
        self._engine = engine

    def __len__(self) -> int:
        return self._engine.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        engine = self._engine
        epoch = engine.step // engine.steps_per_epoch
        last: Batch | None = None
        while not engine.closed and engine.step // engine.steps_per_epoch == epoch:
            if last is not None and last.step == engine.step:
                raise GovernanceError(f"batch for step {last.step} drawn twice: call optimizer.step() once per batch")
            last = engine._draw()
            yield last


# -- the engine --------------------------------------------------------------------------


class Governance:
    """Governs one training run in ``ledger`` under ``policy``, signing with the trainer ``key``."""

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
        check_examples: bool = True,
        description: str | None = None,
    ) -> None:
        if type(checkpoint_every) is not int or checkpoint_every < 1:
            raise GovernanceError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
        if type(seed) is not int or not 0 <= seed < 1 << 64:
            raise GovernanceError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.ledger, self.key = ledger, key
        self.dataset, self.policy, self.layout = dataset, policy, layout
        self.run_id, self.description = run_id, description
        self.loss_name = loss
        self.loss_fn, self.loss_settings = loss_function(loss, loss_settings)
        self.checkpoint_every, self.seed = checkpoint_every, seed
        self.root_key = root_key
        self.batches = [list(b) for b in batches] if batches is not None else None
        self.check_examples = check_examples
        self.step = 0
        self.closed = False
        self.started = False
        self.last_checkpoint: CheckpointData | None = None
        self.run_seq: int | None = None
        self.policy_seq: int | None = None
        self._gated: GovernedModel | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._drawn: Batch | None = None
        self._output: Any = None
        self._loss_value: float | None = None
        self._order: tuple[int, list[int]] | None = None
        self._saved: tuple[bool, bool, int] | None = None
        self._run_optimizer: dict[str, Any] | None = None  # RunStarted settings.optimizer
        #: Module name -> training flag when the program was exported; every step runs in these.
        self.exported_modes: dict[str, bool] = {}

    # -- setup -----------------------------------------------------------------------

    def make_governed(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
    ) -> tuple[GovernedModel, GovernedOptimizer, GovernedLoader]:
        """Check everything, then record RunStarted and the step-0 checkpoint; return the wrappers.

        Every refusal (policy, bands, dataset, routing) is raised before anything is appended.
        """
        self._require_fresh()
        gated = self._prepare(model, optimizer, loader)
        probe = self._batch(0)
        check_routing(gated, probe.inputs)
        adopted = self._adopted_seq()
        program = self._export(model, probe)  # may fail: still before any append
        self._begin()
        try:
            self.policy_seq = adopted if adopted is not None else self._adopt()
            artifact = self.ledger.put_artifact(program)
            body: dict[str, Any] = {
                "run_id": self.run_id,
                "environment": environment(),
                "artifacts": {"program": artifact},
                "settings": self._settings(optimizer, probe),
            }
            self._run_optimizer = body["settings"]["optimizer"]
            if self.description is not None:
                body["description"] = self.description
            self.run_seq = self.ledger.append("RunStarted", body, self.key).seq
            self._checkpoint()
        except BaseException:
            self._end()
            raise
        return gated, GovernedOptimizer(optimizer, self), GovernedLoader(self)

    def resume(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
    ) -> tuple[GovernedModel, GovernedOptimizer, GovernedLoader]:
        """Continue run ``run_id`` from its last Checkpoint: same settings, restored state, same chain."""
        self._require_fresh()
        run_seq, settings = self._find_run()
        ckpt_seq = self._last_checkpoint_seq(run_seq)
        gated = self._prepare(model, optimizer, loader)
        self._compare_settings(settings, optimizer)
        body = self.ledger.observation(ckpt_seq).body
        data = self.ledger.artifact(body["artifact"])
        if data is None:
            raise GovernanceError(f"checkpoint artifact {body['artifact'].hex()[:16]} is not stored in the ledger")
        tensors, scalars = read_checkpoint(data, body)
        restore(model, optimizer, tensors, scalars)
        self.step = body["step"]
        check_routing(gated, self._batch(self.step).inputs)
        self.run_seq, self.policy_seq = run_seq, settings.get("policy_seq")
        self._run_optimizer = settings["optimizer"]
        self.last_checkpoint = CheckpointData(body["step"], tensors, dict(body["tensors"]), body["digest"], data)
        self._begin()
        return gated, GovernedOptimizer(optimizer, self), GovernedLoader(self)

    def _require_fresh(self) -> None:
        if self.started or self.closed:
            raise GovernanceError("this Governance already governs a run; make a new one")

    def _prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any) -> GovernedModel:
        optimizer_name(optimizer)  # in the registry, or replay could not rebuild it
        if (bn := batch_statistics_module(model)) is not None:
            raise GovernanceError(
                f"module {bn!r} is a BatchNorm using batch statistics (training mode, or no running stats): "
                "examples share them, so no routing holds and replay would refuse the program; put it in eval "
                "mode before make_governed (model.train() then the BatchNorm's .eval()), or use GroupNorm or "
                "LayerNorm")
        # The modes the program is exported with (dropout on, BatchNorm off...): every step must run in them.
        self.exported_modes = {n: m.training for n, m in model.named_modules()}
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
        self._flat_params = [p for ps in bands.params for p in ps]
        self._band_sizes = [len(ps) for ps in bands.params]
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
        self.batch_size = int(batch_size) if batch_size else 0
        self.drop_last = bool(getattr(loader, "drop_last", False))
        if self.batches is not None:
            if not self.batches or any(not b for b in self.batches):
                raise GovernanceError("explicit batches must be non-empty")
            self.batches = [check_batch(self.dataset, b) for b in self.batches]
            self.steps_per_epoch = len(self.batches)
        else:
            n, b = self.dataset.count, self.batch_size
            self.steps_per_epoch = n // b if self.drop_last else -(-n // b)
            if self.steps_per_epoch == 0:
                raise GovernanceError(f"batch size {b} with drop_last leaves no batch of {n} examples")
        if self.check_examples:
            for i, m in enumerate(self.dataset.manifests):
                if example_id(_input_of(data[i])) != m.example:
                    raise ManifestError(
                        f"dataset item {i} is not the example its manifest names ({m.example.hex()[:16]}): "
                        "the loader's dataset must be in committed order"
                    )

    def _route_all(self) -> None:
        # Routing is a pure function of manifest and policy: once per index, at setup, so an
        # unroutable example stops the run before its first step.
        routed = route_examples([m.manifest for m in self.dataset.manifests], self.ledger.registry, self.policy.compiled)
        rules, profiles, paths, names = routed.rules, routed.profiles, routed.paths, routed.names
        self._rules, self._profiles, self._paths, self._names = rules, profiles, paths, names
        n = len(self.layout)
        self._profile_table = profiles_tensor(profiles, n)
        # Validated once here; a batch's profiles and ratios are rows of these tables (row-wise
        # elementwise ops, so a row of the table's ratios equals the ratios of the row).
        validate_profiles(self._profile_table, n)
        self._ratio_table = routing_ratios(self._profile_table)
        self._label_table = torch.tensor([m.label for m in self.dataset.manifests], dtype=torch.int64)
        # Per index, what the example adds to authority_writes: (its paths, its float64 profile).
        self._writes_of = [(paths[i], tuple(profiles[i])) for i in range(len(profiles))]
        self._snapshot: list[Tensor] | None = None

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
        plain = GatedModel(model, self._gated.bands if self._gated else self.layout)
        try:
            with torch.random.fork_rng(devices=[]):
                program = export_gated(plain, probe.inputs, probe.profiles, dynamic_batch=len(probe) >= 2)
        finally:
            plain.remove_hooks()
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return buf.getvalue()

    def _settings(self, optimizer: torch.optim.Optimizer, probe: Batch) -> dict[str, Any]:
        assert self._gated is not None
        ds = self.dataset
        x = probe.inputs
        return {
            "seed": self.seed,
            "seed_rule": STEP_SEED_DOMAIN,
            "order": "explicit" if self.batches is not None else ORDER_DOMAIN,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "steps_per_epoch": self.steps_per_epoch,
            "checkpoint_every": self.checkpoint_every,
            "loss": {"name": self.loss_name, "settings": dict(self.loss_settings)},
            "optimizer": describe_optimizer(optimizer),
            "bands": self.layout.to_obj(),
            "band_params": [list(ns) for ns in self._gated.bands.param_names],
            "param_groups": self._group_names(optimizer),
            "policy": self.policy.digest,
            "policy_seq": self.policy_seq,
            "dataset": {"name": ds.name, "seq": ds.seq, "root": ds.root, "count": ds.count},
            "program": {
                "format": "torch.export.save",
                "inputs": ["x", "profiles"],
                "x_dtype": str(x.dtype).removeprefix("torch.") if isinstance(x, Tensor) else None,
                "x_shape": list(x.shape[1:]) if isinstance(x, Tensor) else None,
            },
        }

    def _group_names(self, optimizer: torch.optim.Optimizer) -> list[list[str]]:
        # Optimizer state is numbered by position in param_groups; replay needs the names.
        assert self._gated is not None
        name_of = {id(p): n for n, p in self._gated.model.named_parameters()}
        return [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]

    _COMPARED = ("seed", "seed_rule", "order", "batch_size", "drop_last", "steps_per_epoch", "checkpoint_every",
                 "loss", "bands", "policy", "dataset")

    def _compare_settings(self, recorded: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        assert self._gated is not None
        now = self._settings(optimizer, self._batch(0))
        for key in self._COMPARED:
            if recorded.get(key) != now[key]:
                raise GovernanceError(f"cannot resume run {self.run_id!r}: {key} was {recorded.get(key)!r}, now {now[key]!r}")
        if recorded["optimizer"]["name"] != now["optimizer"]["name"]:
            raise GovernanceError(f"cannot resume run {self.run_id!r}: the optimizer was {recorded['optimizer']['name']}")

    def _find_run(self) -> tuple[int, dict[str, Any]]:
        for seq in reversed(self.ledger.by_type("RunStarted")):
            body = self.ledger.observation(seq).body
            if body["run_id"] == self.run_id:
                return seq, body["settings"]
        raise GovernanceError(f"no RunStarted for run {self.run_id!r} in the ledger")

    def _last_checkpoint_seq(self, run_seq: int) -> int:
        later_runs = [s for s in self.ledger.by_type("RunStarted") if s > run_seq]
        end = later_runs[0] if later_runs else self.ledger.size
        ckpts = [s for s in self.ledger.by_type("Checkpoint") if run_seq < s < end]
        if not ckpts:
            raise GovernanceError(f"run {self.run_id!r} has no checkpoint to resume from")
        updates = [s for s in self.ledger.by_type("GovernedUpdate") if ckpts[-1] < s < end]
        if updates:
            # Their state was never checkpointed; continuing would fork the recorded chain.
            raise GovernanceError(
                f"run {self.run_id!r} has {len(updates)} updates after its last checkpoint; it cannot be resumed"
            )
        return ckpts[-1]

    def _begin(self) -> None:
        self._saved = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            self.ledger.group,
        )
        torch.use_deterministic_algorithms(True)
        self.ledger.group = _NO_AUTOCOMMIT
        self.started = True

    def _end(self) -> None:
        if self._saved is not None:
            det, warn_only, group = self._saved
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            self.ledger.group = group
            self._saved = None

    # -- batches ---------------------------------------------------------------------

    def _indices(self, step: int) -> list[int]:
        if self.batches is not None:
            return self.batches[step % len(self.batches)]
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, self.dataset.count))
        b = self.batch_size
        return self._order[1][pos * b : (pos + 1) * b]

    def _batch(self, step: int) -> Batch:
        indices = self._indices(step)
        index = torch.tensor(indices, dtype=torch.int64)
        if isinstance(self._data, TensorDataset):
            inputs = self._data.tensors[0][index]  # what default_collate would stack, without per-item calls
        else:
            inputs = default_collate([_input_of(self._data[i]) for i in indices])
        labels = self._label_table[index]
        rules = [self._rules[i] for i in indices]
        profiles = self._profile_table[index]
        limits = batch_limits(self.policy.compiled, rules)
        return Batch(step, list(indices), inputs, labels, profiles, rules, limits)

    def _draw(self) -> Batch:
        if not self.started or self.closed:
            raise GovernanceError("the run is not active")
        self._drawn = batch = self._batch(self.step)
        self._drawn_ratios = self._ratio_table[torch.tensor(batch.indices, dtype=torch.int64)]
        self._step_seed = step_seed(self.seed, batch.step)
        self._output, self._loss_value = None, None
        return batch

    # -- the step ----------------------------------------------------------------------

    def criterion(self, output: Tensor, labels: Tensor) -> Tensor:
        """The run's registered loss; its value is what the step records."""
        loss = self.loss_fn(output, labels)
        self._loss_value = float(loss.detach())
        return loss

    def _before_forward(self, x: Any, profiles: Tensor, batch: Batch | None) -> Tensor:
        """Check the forward is of the drawn batch, seed the step; return the batch's mixing ratios."""
        drawn = self._drawn
        if drawn is None or drawn.step != self.step:
            raise GovernanceError("a training forward needs a batch drawn from the governed loader")
        if (batch is not None and batch is not drawn) or not _same(x, drawn.inputs) or not _same(profiles, drawn.profiles):
            raise GovernanceError(f"the forward's inputs or profiles are not those of the batch for step {self.step}")
        if self._gated is not None:
            modes = self.exported_modes
            moved = [n for n, m in self._gated.model.named_modules() if modes.get(n, m.training) != m.training]
            if moved:
                name, now = moved[0] or "the model", "eval" if modes[moved[0]] else "training"
                raise GovernanceError(
                    f"step {self.step}: module {name!r} is in {now} "
                    "mode, but the program was exported with it in the other: replay runs the exported program; "
                    "set every module's mode before make_governed (the governed model's train() restores them); "
                    "step refused")
        _seed_all(self._step_seed)  # dropout and friends replay from this
        return self._drawn_ratios

    def _step(self) -> None:
        batch, gated, optimizer = self._drawn, self._gated, self._optimizer
        if batch is None or batch.step != self.step or self._output is None or gated is None or optimizer is None:
            raise GovernanceError("optimizer.step() needs a forward of the current batch through the governed model")
        if self._loss_value is None:
            with torch.no_grad():
                self._loss_value = float(self.loss_fn(_detach(self._output), batch.labels))
        loss = self._loss_value
        grad_norms = clip_bands(gated, gated.bands, batch.limits)  # routed, pre-clip norms
        if not math.isfinite(loss) or not all(math.isfinite(n) for n in grad_norms):
            raise GovernanceError(f"step {self.step}: non-finite loss or band gradient norm; step refused")
        self._check_hyperparameters(optimizer)
        params = self._flat_params
        if self._snapshot is None:
            # Reused step to step (no allocation, no page faults); dropped at checkpoints.
            self._snapshot = [torch.empty_like(p) for p in params]
        update_norms = step_and_measure(optimizer, params, self._snapshot, self._band_sizes)
        if not all(math.isfinite(n) for n in update_norms):
            raise GovernanceError(f"step {self.step}: non-finite update; the run cannot continue")
        self.ledger.append("GovernedUpdate", self._record(batch, loss, grad_norms, update_norms, optimizer), self.key)
        self.step += 1
        self._drawn, self._output, self._loss_value = None, None, None
        if self.step % self.checkpoint_every == 0:
            self._checkpoint()

    def _check_hyperparameters(self, optimizer: torch.optim.Optimizer) -> None:
        # specs/training.md §6: a run's hyper-parameters are its RunStarted's; a change mid-run
        # (a scheduler, a hand edit of param_groups) is refused before the step, not recorded.
        recorded = self._run_optimizer
        now = describe_optimizer(optimizer)
        if recorded is not None and encoding.encode(now) != encoding.encode(recorded):
            raise GovernanceError(
                f"step {self.step}: the optimizer's hyper-parameters are {now['groups']}, but the run recorded "
                f"{recorded['groups']} at RunStarted; they are fixed for a run (specs/training.md §6)")

    def _record(
        self, batch: Batch, loss: float, grad_norms: list[float], update_norms: list[float],
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any]:
        return update_body(
            batch.step, batch.indices, batch.rules, batch.limits, policy=self.policy.digest, loss=loss,
            grad_norms=grad_norms, update_norms=update_norms, optimizer=describe_optimizer(optimizer),
            seeds={"run": self.seed, "step": self._step_seed}, writes_of=self._writes_of, names=self._names,
            n_bands=len(self.layout),
        )

    # -- checkpoints and close -----------------------------------------------------------

    def _checkpoint(self) -> CheckpointData:
        assert self._gated is not None and self._optimizer is not None
        self._snapshot = None  # not held through the checkpoint's own copies
        made = make_checkpoint(self.step, self._gated.model, self._optimizer)
        artifact = self.ledger.put_artifact(made.data)
        self.ledger.append("Checkpoint", made.body(artifact), self.key)
        self.ledger.tree_head(self.key)  # commits the whole group: the log now ends at this checkpoint
        # Its bytes are in the ledger now; the run keeps only a way to read them back.
        ledger = self.ledger
        ckpt = CheckpointData(made.step, None, made.digests, made.digest, lambda: ledger.artifact(artifact))
        self.last_checkpoint = ckpt
        return ckpt

    def close(self) -> CheckpointData | None:
        """Final checkpoint (unless the last step was just checkpointed) and tree head; restore torch flags."""
        if self.closed:
            return self.last_checkpoint
        try:
            if self.started and (self.last_checkpoint is None or self.last_checkpoint.step != self.step):
                self._checkpoint()
        finally:
            self.closed = True
            self._end()
        return self.last_checkpoint


class Trainer:
    """The common loop over a governed model, optimizer and loader."""

    def __init__(self, engine: Governance) -> None:
        self.engine = engine

    def fit(
        self, model: GovernedModel, optimizer: GovernedOptimizer, loader: GovernedLoader, steps: int, *, close: bool = True
    ) -> list[float]:
        """Train until the run has taken ``steps`` steps in all; return this call's losses."""
        engine, losses = self.engine, []
        model.train()
        while engine.step < steps:
            if engine.closed:
                raise GovernanceError("the run is closed")
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = engine.criterion(model(batch), batch.labels)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if engine.step >= steps:
                    break
        if close:
            engine.close()
        return losses


# -- shared with unlearning: routing tables, the step's update, its record -------------------


@dataclass(frozen=True)
class RoutedExamples:
    """Per dataset index: policy rule, binary64 profile, sorted distinct source paths, source names."""

    rules: list[int]
    profiles: list[tuple[float, ...]]
    paths: list[tuple[str, ...]]
    names: list[tuple[str, ...]]


def route_examples(manifests: Sequence[Mapping[str, Any]], registry: Any, compiled: Any) -> RoutedExamples:
    """Route every manifest (a manifest map) under ``compiled``, resolving source paths in ``registry``."""
    rules, profiles, paths, names = [], [], [], []
    for i, m in enumerate(manifests):
        try:
            src_paths = {s["source"]: registry.get(s["key_id"]).path for s in m["sources"]}
        except CredentialError as exc:
            raise ManifestError(f"manifest {i}: a source has no credential in the ledger: {exc}") from None
        r = route(compiled, m, src_paths)
        rules.append(r.rule)
        profiles.append(r.profile)
        paths.append(tuple(sorted(set(src_paths.values()))))
        names.append(tuple(src_paths))
    return RoutedExamples(rules, profiles, paths, names)


def step_and_measure(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], snapshot: list[Tensor], band_sizes: Sequence[int]
) -> list[float]:
    """Snapshot ``params`` into ``snapshot``, ``optimizer.step()``, return the per-band update norms."""
    with torch.no_grad():
        torch._foreach_copy_(snapshot, list(params))
        optimizer.step()
        return _delta_norms(params, snapshot, band_sizes)


def update_body(
    step: int,
    indices: Sequence[int],
    rules: Sequence[int],
    limits: Sequence[float | None],
    *,
    policy: bytes,
    loss: float,
    grad_norms: list[float],
    update_norms: list[float],
    optimizer: dict[str, Any],
    seeds: dict[str, int],
    writes_of: Sequence[tuple[tuple[str, ...], tuple[float, ...]]],
    names: Sequence[tuple[str, ...]],
    n_bands: int,
) -> dict[str, Any]:
    """The GovernedUpdate body of one step (specs/training.md §3.1); ``optimizer`` as described."""
    writes: dict[str, list[float]] = {}
    sources: set[str] = set()
    zero = (0.0,) * n_bands
    for i in indices:
        # The policy's float64 multipliers (not the float32 gate copy), added in batch order.
        paths, profile = writes_of[i]
        for path in paths:
            writes[path] = [a + b for a, b in zip(writes.get(path, zero), profile)]
        sources.update(names[i])
    return {
        "step": step,
        "batch": list(indices),
        "policy": policy,
        "lr": float(optimizer["groups"][0]["lr"]),
        "loss": loss,
        "band_grad_norms": grad_norms,
        "band_update_norms": update_norms,
        "authority_writes": writes,
        "sources": sorted(sources),
        "optimizer": optimizer,
        "seeds": seeds,
        "routing": {"rules": list(rules), "limits": list(limits)},
    }


# -- helpers -------------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    # torch.manual_seed also walks every accelerator backend (about 1 ms a call); the CPU
    # generator plus any CUDA device already in use is the same effect for a governed step.
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    return False


def _detach(obj: Any) -> Any:
    return obj.detach() if isinstance(obj, Tensor) else obj


def _delta_norms(params: Sequence[Tensor], before: list[Tensor], sizes: Sequence[int]) -> list[float]:
    # The band-norm rule of specs/routing.md §5 applied to (before - after), band by band
    # (``sizes`` parameters each, in order): per-parameter L2 in the parameter's dtype, then the
    # L2 of those in float64. ``before`` is overwritten with the differences.
    if not params:
        return [0.0] * len(sizes)
    torch._foreach_sub_(before, list(params))
    norms = torch._foreach_norm(before, 2)
    out: list[Tensor] = []
    pos = 0
    for size in sizes:
        out.append(_l2_of_norms(norms[pos : pos + size]) if size else torch.zeros((), dtype=torch.float64))
        pos += size
    return torch.stack(out).tolist()


__all__ = [
    "Batch",
    "Governance",
    "GovernedLoader",
    "GovernedModel",
    "GovernedOptimizer",
    "RoutedExamples",
    "Trainer",
    "epoch_order",
    "route_examples",
    "step_and_measure",
    "step_seed",
    "update_body",
]
