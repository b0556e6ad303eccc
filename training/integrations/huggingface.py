"""``GovernedTrainer``: HuggingFace ``transformers.Trainer`` with every optimizer step governed.

An existing Trainer script changes one name and passes the project (specs/api.md §4.1)::

    trainer = GovernedTrainer(model=model, args=args, train_dataset=train, project="acme", dataset="tokens")
    trainer.train()        # each optimizer step a signed GovernedUpdate; the run closed at the end

What the Trainer does is what the run records, through ``govern``'s rules (specs/api.md §2): its
optimizer (and the decay / no-decay parameter groups it builds), its LR scheduler, ``max_grad_norm``
(a recorded clip), ``gradient_accumulation_steps`` (micro-batches and the loss divisor the Trainer
applies), ``bf16`` (autocast around the forward, recorded) and ``label_smoothing_factor`` (the run's
loss setting). The batches follow the Trainer's own sampler, recorded as drawn. What the ledger
cannot reproduce is refused when the Trainer is made, naming the option: ``fp16`` (its loss scaler
rewrites gradients), more than one process or device, DeepSpeed and FSDP, a ``compute_loss_func``
(the run's loss is its registered one) and resuming from a Trainer checkpoint.

Three things differ from a plain Trainer, each because the ledger needs it:

- Batches are collated with torch's ``default_collate`` from the dataset's own tensors (the inputs
  the dataset commitment names), not by ``data_collator``: pad in the dataset (``padding="max_length"``).
  A collator that could change the inputs is refused; the default ones are not used for training.
- The labels are the committed manifests' (the dataset's label columns are dropped); the loss is
  the run's registered loss of the model's ``logits``.
- The Trainer prefetches the micro-batches of an accumulated step before their forwards; a governed
  run draws a batch only after the previous one went through backward, so each batch is drawn from
  the run when its forward comes.

Evaluation and prediction run the plain model, as in any Trainer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

try:
    import transformers
    from transformers.data.data_collator import DataCollatorWithPadding, default_data_collator
except ImportError as exc:  # the optional extra, named in the message
    raise ImportError("gradledger's HuggingFace integration needs transformers and accelerate: "
                      "pip install 'gradledger[hf]'") from exc

from ..api import govern
from ..dynamics.memorization import MemorizationScan
from ..dynamics.profiles import DepthProfiles
from ..errors import GovernanceError
from ..project import Project
from ..trainer import Governance
from ._pending import PendingBatch, pending_epoch

__all__ = ["GovernedTrainer"]

#: The label columns a HuggingFace dataset item may carry; the run's labels are the manifests'.
LABEL_KEYS = ("labels", "label", "label_ids")


class _Inputs(Dataset):
    """The training set as the run reads it: each item's input parts, its label columns dropped."""

    def __init__(self, data: Any, label_keys: frozenset[str]) -> None:
        self.data = data
        self.label_keys = label_keys

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        item = self.data[i]
        if isinstance(item, Mapping):
            # A ``datasets.Dataset`` without a torch format yields lists: tensors as torch.as_tensor makes
            # them (Python ints to int64), the form a project labels them in.
            return {k: v if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in item.items()
                    if k not in self.label_keys}
        return item


class _PendingLoader:
    """One epoch of the sampler's batches per iteration, as pending batches."""

    def __init__(self, run: Governance) -> None:
        self.run = run

    def __len__(self) -> int:
        return self.run.steps_per_epoch

    def __iter__(self) -> Iterator[PendingBatch]:
        return pending_epoch(self.run)


def _logits(outputs: Any) -> Tensor:
    """The output the loss is of: a ModelOutput's (or dict's) ``logits``, a tuple's first, or the tensor."""
    if isinstance(outputs, Mapping):
        if "logits" not in outputs:
            raise GovernanceError(f"the model returned {sorted(outputs)} and no 'logits': the run's loss is of logits")
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def _refusal_of_args(args: Any) -> str | None:
    """Why these TrainingArguments cannot be governed, or None (specs/api.md §4.1)."""
    if args.fp16:
        return ("fp16: its loss scaler rescales gradients and may skip steps, which no GovernedUpdate records; "
                "use bf16=True (autocast, recorded) or full precision")
    if args.world_size > 1 or args.n_gpu > 1 or args.deepspeed or args.fsdp:
        return "more than one process or device (DDP, DeepSpeed, FSDP): a governed run trains in one process"
    if getattr(args, "torch_compile", False):
        return "torch_compile: the run's program is exported and replayed as recorded; drop torch_compile"
    return None


def _refusal_of_trainer(trainer: "transformers.Trainer") -> str | None:
    """Why the Trainer's own loss or collator cannot be governed, or None (specs/api.md §4.1)."""
    if trainer.compute_loss_func is not None:
        return ("compute_loss_func: the run's loss is its registered loss of the logits (cross-entropy, "
                "label_smoothing_factor for smoothing); drop compute_loss_func")
    collator = trainer.data_collator
    if collator is not default_data_collator and not isinstance(collator, DataCollatorWithPadding):
        return ("data_collator: a governed run collates the dataset's own tensors with default_collate, the "
                "inputs its commitment names; pad in the dataset (padding='max_length') and drop the collator")
    return None


class GovernedTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training run is governed by ``project`` on ``dataset``.

    ``project`` is a ``gradledger.Project`` (keys, adopted policy, ledger), or its directory, which
    the trainer opens when training starts and closes when it ends; ``dataset`` the name of a
    dataset it committed (``project.label``) whose examples are ``train_dataset``'s items without
    their label columns, in the same order. ``run_id``, ``checkpoint_every``, ``layout``, ``memorization`` and
    ``profiles`` are ``govern``'s. After ``train()`` the run is closed (final checkpoint and tree head) and is
    ``trainer.run``; ``trainer.run`` is None before training starts.
    """

    def __init__(self, *args: Any, project: Project | str | os.PathLike[str], dataset: str, run_id: str = "run",
                 checkpoint_every: int = 100, layout: Any = None, memorization: MemorizationScan | None = None,
                 profiles: DepthProfiles | None = None, **kwargs: Any) -> None:
        given = kwargs.get("args", args[1] if len(args) > 1 else None)
        why = _refusal_of_args(given) if given is not None else None
        if why is None:
            super().__init__(*args, **kwargs)
            why = _refusal_of_trainer(self)
        if why is not None:
            raise GovernanceError(f"GovernedTrainer cannot govern {why}")
        self._project = project
        self._opened: Project | None = None  # a project this trainer opened from a path, closed after train()
        self._governing: dict[str, Any] = {"dataset": dataset, "run_id": run_id, "checkpoint_every": checkpoint_every,
                                           "layout": layout, "memorization": memorization, "profiles": profiles}
        self.run: Governance | None = None

    # -- the run's data, model and optimizer --------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's sampler and batch size over the dataset's input parts, collated by default_collate."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        keys = frozenset(LABEL_KEYS) | frozenset(self.args.label_names or ())
        data = self.train_dataset
        if _is_hf_dataset(data):
            # The Trainer's own rule: columns the model's forward does not take (raw text...) are dropped.
            data = self._remove_unused_columns(data, description="training")
        return DataLoader(_Inputs(data, keys), batch_size=self._train_batch_size,
                          sampler=self._get_train_sampler(), drop_last=self.args.dataloader_drop_last)

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any,
                              resume_from_checkpoint: Any) -> tuple[nn.Module, Any]:
        if self.run is not None:
            raise GovernanceError("this GovernedTrainer already trained its run; make a new one for another")
        model, _ = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if model is not self.model:
            raise GovernanceError(f"the Trainer wrapped the model in {type(model).__name__}; a governed run "
                                  "trains the model itself")
        # accelerate's bf16 patches model.forward with an autocast the gate would not see; the governed
        # forward runs under the same autocast where the recorder sees it (compute_loss).
        original = model.__dict__.pop("_original_forward", None)
        if original is not None:
            model.forward = original
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper steps this one
        smoothing = float(self.args.label_smoothing_factor)
        project = self._project
        if not isinstance(project, Project):
            project = self._opened = Project.open(project)
        gated, _, _ = govern(model, optimizer, train_dataloader, project=project, order="loader",
                             loss_settings={"label_smoothing": smoothing} if smoothing else None, **self._governing)
        self.run = gated.run
        return gated, _PendingLoader(self.run)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Train as the Trainer does, then close the run; on an exception the run records nothing more."""
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume not in (None, False):
            raise GovernanceError("GovernedTrainer cannot resume from a Trainer checkpoint: the restored "
                                  "optimizer and sampler state would not continue the ledger's run; start a new run")
        try:
            try:
                out = super().train(*args, **kwargs)
            except BaseException as exc:
                if self.run is not None and not self.run.closed:
                    self.run.__exit__(type(exc), exc, exc.__traceback__)
                raise
            if self.run is not None:
                self.run.close()
            return out
        finally:
            if self._opened is not None:
                self._opened.close()
                self._opened = None

    # -- one micro-batch ------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not isinstance(inputs, PendingBatch):  # evaluation and prediction: the plain Trainer's
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        assert self.run is not None
        batch = inputs.batch = self.run.draw(inputs.indices)
        with self._autocast():
            outputs = model(batch)
            loss = self.run.criterion(_logits(outputs), batch.labels)
        return (loss, outputs) if return_outputs else loss

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.args.bf16:
            return torch.autocast(self.args.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        # accelerate clips with its own norm arithmetic (DTensor-aware), which no recorded clip names;
        # torch's clip_grad_norm_ is the call the run records and replay repeats (specs/api.md §2).
        return torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def floating_point_ops(self, inputs: Any) -> int:
        return super().floating_point_ops(_drawn_inputs(inputs))

    def _track_num_input_tokens(self, inputs: Any) -> None:
        super()._track_num_input_tokens(_drawn_inputs(inputs))


def _is_hf_dataset(data: Any) -> bool:
    """A ``datasets.Dataset`` (the library need not be installed for a torch Dataset)."""
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, datasets.Dataset)


def _drawn_inputs(inputs: Any) -> Any:
    """A pending batch's drawn inputs as the Trainer's bookkeeping reads them (a dict of parts)."""
    if isinstance(inputs, PendingBatch):
        drawn = inputs.batch.inputs if inputs.batch is not None else None
        return drawn if isinstance(drawn, Mapping) else {}
    return inputs
