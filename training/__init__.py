"""gradledger.training: governed training of the user's own model, optimizer and loader.

Start a project once (``gradledger init DIR --taxonomy FILE``, or ``Project.init``), label a
dataset (``project.label``), then govern the loop you already have::

    from gradledger.training import Project, govern

    project = Project.open("acme")
    model, optimizer, loader = govern(model, optimizer, loader, project=project, dataset="digits")
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()          # recorded as a signed GovernedUpdate, or refused with the cause
    model.run.close()

What a step may do (accumulation, ``loss / k``, schedulers, clipping, autocast, the loader's own
order) and how each is recorded: specs/training.md §3 and specs/api.md. The names below are the
public API; the modules behind them may change.
"""

from .api import govern
from .bands import Band, BandLayout, sequential_bands, transformer_bands
from .dataset import CommittedDataset, commit_dataset
from .dynamics import DepthProfiles, MemorizationScan, scan
from .errors import BandError, DatasetError, GovernanceError, ManifestError, PolicyError, ProjectError
from .layouts import default_layout, describe_layout
from .policy import SignedPolicy, sign_policy
from .project import Project
from .recorder import StepRefused
from .runtime import torch_deterministic
from .trainer import Governance, Trainer

__all__ = [
    "Band",
    "BandError",
    "BandLayout",
    "CommittedDataset",
    "DatasetError",
    "DepthProfiles",
    "Governance",
    "GovernanceError",
    "ManifestError",
    "MemorizationScan",
    "PolicyError",
    "Project",
    "ProjectError",
    "SignedPolicy",
    "StepRefused",
    "Trainer",
    "commit_dataset",
    "default_layout",
    "describe_layout",
    "govern",
    "scan",
    "sequential_bands",
    "sign_policy",
    "torch_deterministic",
    "transformer_bands",
]
