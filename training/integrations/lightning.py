"""``GovernedLightning``: PyTorch Lightning's automatic optimization with every optimizer step governed.

An existing Lightning script adds the governance to its ``Trainer`` and hands it its loader
(specs/api.md §4.3)::

    governed = GovernedLightning(project="acme", dataset="digits")
    trainer = L.Trainer(max_steps=500, **governed.trainer_options())
    trainer.fit(module, governed.loader(train_loader))   # each optimizer step a signed GovernedUpdate

The user's ``LightningModule`` and its ``training_step`` stay as written: ``x, y = batch`` unpacks the
drawn batch (the labels are the committed manifests'), ``self(x)`` runs the module's forward behind
the depth gate, and the loss is the user's. Lightning's own loop, counters (``max_steps``), logging,
``accumulate_grad_batches``, ``gradient_clip_val`` (torch's ``clip_grad_norm_``, recorded), LR
schedulers from ``configure_optimizers`` and ``precision="bf16-mixed"`` (autocast around the
training step, recorded) work as they do without governance.

Three things are arranged so that the ledger records what is done:

- **The optimizer step runs without a closure.** Lightning hands ``optimizer.step`` a closure that
  runs the training step and backward inside it; a governed step must see the gradients before it
  steps. The precision plugin runs the closure first (training step, backward, Lightning's
  ``on_before_optimizer_step`` and clipping), then steps: the same sequence for every optimizer
  that evaluates its closure once (LBFGS, which does not, is not in the optimizer registry).
- **Batches are drawn when their turn comes.** Lightning fetches the next batch before the current
  one runs; the loader yields the sampler's indices and the batch is drawn from the run as it
  reaches the module (``on_after_batch_transfer``), after the previous batch's backward.
- **The forward goes through the gate.** The module's ``forward`` is routed through the governed
  model (the module's own forward, called as recorded), so ``self(x)`` in ``training_step`` is the
  governed forward; outside training it is the plain forward.

Refused, naming the option: more than one optimizer, manual optimization, a device other than the
CPU or more than one device or process, precisions other than ``32-true`` and ``bf16-mixed``, and
``accumulate_grad_batches`` that does not divide an epoch's batches (Lightning divides a partial
last window's loss by the full count).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator, Sequence
from typing import Any, Callable

import torch
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import Precision
except ImportError as exc:  # the optional extra, named in the message
    raise ImportError("gradledger's Lightning integration needs lightning: pip install 'gradledger[lightning]'") from exc

from ..api import govern
from ..dynamics.memorization import MemorizationScan
from ..dynamics.profiles import DepthProfiles
from ..errors import GovernanceError
from ..project import Project
from ..trainer import Governance
from ._pending import PendingBatch, pending_epoch

__all__ = ["GovernedLightning"]

PRECISIONS = ("32-true", "bf16-mixed")


class _Forward(nn.Module):
    """The LightningModule's own forward as the governed model: the gate calls this, which calls the
    module's class ``forward`` (the instance's is routed through the gate)."""

    def __init__(self, module: "pl.LightningModule") -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


class _Loader:
    """The user's loader as Lightning iterates it: one epoch of the sampler's batches, as indices."""

    def __init__(self, owner: "GovernedLightning", loader: Any) -> None:
        self.owner, self.user_loader = owner, loader

    def __len__(self) -> int:
        return len(self.user_loader)

    def __iter__(self) -> Iterator[PendingBatch]:
        # A generator: Lightning calls iter() before its callback starts the run; the run is read at the
        # first batch.
        run = self.owner.run
        if run is None:
            raise GovernanceError("the governed loader runs only under a Trainer given "
                                  "GovernedLightning.trainer_options() (its callback starts the run)")
        yield from pending_epoch(run)


class _Precision(Precision):
    """Runs the closure, then the optimizer step without it; autocast in the training step under bf16."""

    def __init__(self, precision: str) -> None:
        super().__init__()
        self.precision = precision  # type: ignore[assignment]

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        result = self._wrap_closure(model, optimizer, closure)
        if result is None and model.automatic_optimization:
            return None  # training_step returned None: Lightning skips the step, and so nothing is recorded
        return optimizer.step(**kwargs)

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        if self.precision == "bf16-mixed":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            yield


class GovernedLightning(pl.Callback):
    """Governs a Lightning ``Trainer``'s run of a ``LightningModule`` on ``project``'s ``dataset``.

    ``project``: a ``gradledger.Project`` or its directory (opened when training starts, closed when
    it ends). ``run_id``, ``checkpoint_every``, ``layout``, ``memorization`` and ``profiles`` are ``govern``'s; ``precision`` is
    ``"32-true"`` or ``"bf16-mixed"`` (given here, not to the Trainer). After ``fit`` the run is closed
    and is ``governed.run``.
    """

    def __init__(self, project: Project | str | os.PathLike[str], dataset: str, *, run_id: str = "run",
                 checkpoint_every: int = 100, layout: Any = None, precision: str = "32-true",
                 memorization: MemorizationScan | None = None, profiles: DepthProfiles | None = None) -> None:
        if precision not in PRECISIONS:
            raise GovernanceError(f"GovernedLightning cannot govern precision {precision!r}: one of "
                                  f"{', '.join(PRECISIONS)} (16-mixed's loss scaler rescales gradients and "
                                  "skips steps, which no GovernedUpdate records)")
        self._project = project
        self._opened: Project | None = None
        self._governing: dict[str, Any] = {"dataset": dataset, "run_id": run_id, "checkpoint_every": checkpoint_every,
                                           "layout": layout, "memorization": memorization, "profiles": profiles}
        self._precision = _Precision(precision)
        self._loader: _Loader | None = None
        self.run: Governance | None = None

    def trainer_options(self, *, callbacks: Sequence[Any] = (), plugins: Sequence[Any] = ()) -> dict[str, Any]:
        """What the ``Trainer`` needs: this callback (after the script's own ``callbacks``), the precision
        plugin (beside the script's other ``plugins``), and one CPU device."""
        return {"callbacks": [*callbacks, self], "plugins": [*plugins, self._precision], "accelerator": "cpu",
                "devices": 1}

    def loader(self, loader: Any) -> _Loader:
        """The loader to hand ``trainer.fit``: the user's (a DataLoader with a batch size), drawn through
        the run in its own sampler's order."""
        if self._loader is not None:
            raise GovernanceError("GovernedLightning governs one loader; make another for another run")
        self._loader = _Loader(self, loader)
        return self._loader

    # -- the run --------------------------------------------------------------------------------

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        why = _refusal(trainer, pl_module, self)
        if why is not None:
            raise GovernanceError(f"GovernedLightning cannot govern {why}")
        project = self._project
        if not isinstance(project, Project):
            project = self._opened = Project.open(project)
        optimizer = trainer.optimizers[0]
        gated, _, _ = govern(_Forward(pl_module), optimizer, self._loader.user_loader, project=project,  # type: ignore[union-attr]
                             order="loader", **self._governing)
        self.run = run = gated.run

        def forward(*args: Any, **kwargs: Any) -> Any:
            # Training: the governed forward of the batch just drawn; otherwise the module's own.
            if pl_module.training and not run.closed:
                return gated(*args, **kwargs)
            return type(pl_module).forward(pl_module, *args, **kwargs)

        original = pl_module.on_after_batch_transfer

        def on_after_batch_transfer(batch: Any, dataloader_idx: int) -> Any:
            if not isinstance(batch, PendingBatch):
                return original(batch, dataloader_idx)
            if run.micro_batches == 0:
                # Lightning zeroes the gradients inside the closure, between the step's first forward and
                # its backward; the recorder checks them before that forward. Zeroing here, before it,
                # leaves every gradient as Lightning's order would (no forward reads them).
                optimizer.zero_grad(set_to_none=True)
            return run.draw(batch.indices)

        # Instance attributes, undone at the end: the module's class is the user's, unchanged.
        pl_module.forward = forward  # type: ignore[method-assign]
        pl_module.on_after_batch_transfer = on_after_batch_transfer  # type: ignore[method-assign]
        self._module = pl_module

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish(None)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._finish(exception)

    def _finish(self, exc: BaseException | None) -> None:
        try:
            if self.run is not None and not self.run.closed:
                if exc is None:
                    self.run.close()
                else:
                    self.run.__exit__(type(exc), exc, exc.__traceback__)
        finally:
            module = getattr(self, "_module", None)
            if module is not None:
                module.__dict__.pop("forward", None)
                module.__dict__.pop("on_after_batch_transfer", None)
            if self._opened is not None:
                self._opened.close()
                self._opened = None


def _refusal(trainer: "pl.Trainer", module: "pl.LightningModule", governed: GovernedLightning) -> str | None:
    """Why this Trainer and module cannot be governed, or None (specs/api.md §4.3)."""
    if governed._loader is None:
        return "a loader it was not given: pass GovernedLightning.loader(train_loader) to trainer.fit"
    if not module.automatic_optimization:
        return ("manual optimization: its optimizer steps are the module's own calls; use automatic "
                "optimization, or govern(...) in a plain loop")
    if len(trainer.optimizers) != 1:
        return f"{len(trainer.optimizers)} optimizers: a governed run steps one"
    if trainer.world_size > 1 or trainer.num_devices > 1:
        return "more than one process or device: a governed run trains in one process"
    k, per_epoch = trainer.accumulate_grad_batches, len(governed._loader)
    if k > 1 and per_epoch % k:
        return (f"accumulate_grad_batches={k} over {per_epoch} batches an epoch: Lightning divides the loss of the "
                f"epoch's last, partial window ({per_epoch % k} batches) by {k} as well, which no GovernedUpdate "
                f"records; make the batches an epoch a multiple of {k} (drop_last=True, or another batch size)")
    if not isinstance(trainer.precision_plugin, _Precision):
        return "a Trainer without GovernedLightning.trainer_options(): its precision plugin steps with a closure"
    if trainer.accelerator is not None and type(trainer.accelerator).__name__ != "CPUAccelerator":
        return f"accelerator {type(trainer.accelerator).__name__}: governed Lightning runs train on the CPU"
    return None
