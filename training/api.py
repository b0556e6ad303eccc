"""``govern``: one call that puts a user's own model, optimizer and loader under governance
(specs/api.md), in the spirit of Opacus's ``make_private``::

    project = gradledger.Project.open("acme")
    model, optimizer, loader = gradledger.govern(model, optimizer, loader, project=project, dataset="digits")
    for x, y in loader:                      # the user's loop, unchanged
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()                     # recorded as one signed GovernedUpdate, or refused
    model.run.close()                        # final checkpoint and signed tree head

The optimizer returned is the user's own object, observed by hooks; the model is the user's model
behind the depth gate; the loader yields ``(inputs, labels)`` in the loader's own order, the labels
being the committed manifests'. Everything else (bands, policy, keys) comes from the project.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .bands import BandLayout
from .dataset import CommittedDataset
from .distributed import RankGroup
from .dynamics.memorization import MemorizationScan
from .errors import GovernanceError
from .layouts import default_layout
from .policy import SignedPolicy
from .dynamics.profiles import DepthProfiles
from .trainer import Governance, GovernedLoader, GovernedModel

__all__ = ["govern"]


def govern(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    *,
    dataset: CommittedDataset | str,
    project: Any = None,
    ledger: Ledger | None = None,
    key: SigningKey | None = None,
    policy: SignedPolicy | None = None,
    layout: BandLayout | None = None,
    run_id: str = "run",
    loss: str = "cross_entropy",
    loss_settings: dict[str, Any] | None = None,
    order: str | None = None,
    checkpoint_every: int = 100,
    seed: int = 0,
    root_key: SigningKey | None = None,
    description: str | None = None,
    call: str = "spread",
    memorization: MemorizationScan | None = None,
    profiles: DepthProfiles | None = None,
) -> tuple[GovernedModel, torch.optim.Optimizer, GovernedLoader]:
    """Govern the user's three objects; return them ready for the user's own loop.

    ``project`` (a ``Project``) supplies the ledger, the trainer and root keys and the adopted policy;
    without one pass ``ledger``, ``key`` and ``policy``. ``dataset`` is a ``CommittedDataset`` or the
    name of one the project committed (``project.label``). ``layout`` defaults to the architecture's
    default bands (``layouts.default_layout``) named as the policy's bands. ``loss`` is the loss the
    run records; the loop may compute it any way with the same gradient. ``order="loader"`` records
    the loader's own order (``shuffle=True`` included); ``"committed"`` uses the seeded order fixed
    before training (the default, and the only order, under torch.distributed: every rank then trains its
    shard of each batch, rank 0 records, the gradients are reduced in rank order; specs/distributed.md). A dataset whose inputs are dicts or tuples of tensors (``input_ids``,
    ``attention_mask``...) is a model of parts: ``call="spread"`` calls the model as ``model(**x)`` /
    ``model(*x)`` (a HuggingFace model's way), ``"whole"`` as ``model(x)``. The run is ``model.run``
    (also ``loader.run``): ``model.run.close()`` at the end. ``memorization``: also record a signed
    memorization scan (every example's LT-IQR, specs/dynamics.md) at each checkpoint. ``profiles``:
    also record a signed entropy depth profile over a held-out committed dataset at each checkpoint
    (``DepthProfiles("heldout")``, specs/dynamics.md §5).
    """
    if project is not None:
        ledger = ledger if ledger is not None else project.ledger
        key = key if key is not None else project.trainer_key
        root_key = root_key if root_key is not None else project.root_key
        policy = policy if policy is not None else project.policy
        if isinstance(dataset, str):
            dataset = project.dataset(dataset)
    if ledger is None or key is None or policy is None:
        raise GovernanceError("govern needs project=..., or ledger=, key= and policy=")
    if not isinstance(dataset, CommittedDataset):
        raise GovernanceError("dataset must be a CommittedDataset, or the name of one with project=...")
    if order is None:  # the loader's own order, except over torch.distributed ranks (specs/distributed.md §2)
        order = "committed" if RankGroup.current() is not None else "loader"
    if layout is None:
        layout = default_layout(model, n_bands=len(policy.bands), names=tuple(policy.bands))
    run = Governance(ledger, key, dataset=dataset, policy=policy, layout=layout, run_id=run_id, loss=loss,
                     loss_settings=loss_settings, checkpoint_every=checkpoint_every, seed=seed, root_key=root_key,
                     order=order, description=description, call=call, memorization=memorization,
                     profiles=profiles)
    return run.make_governed(model, optimizer, loader)
