"""Errors of governed training. They extend the ledger's typed errors so one
``except GradledgerError`` covers both layers and the CLI maps them to exit codes."""

from __future__ import annotations

from gradledger.ledger.errors import GradledgerError, UnusableInput


class GovernanceError(GradledgerError):
    """Training input violates governance: bad manifest, policy, bands or dataset; raised before any step runs."""


class ManifestError(GovernanceError):
    """A manifest is malformed, unsigned, signed by a revoked/out-of-window credential, or not committed."""


class PolicyError(GovernanceError):
    """A routing policy is malformed, not signed by the governance root, or not adopted."""


class BandError(GovernanceError):
    """The band layout does not partition the model's trainable parameters."""


class DatasetError(UnusableInput):
    """Dataset input is unusable: missing examples, shapes, or a label matrix that does not fit."""


class ProjectError(UnusableInput):
    """A project cannot be made or opened: a bad taxonomy file, an existing directory, missing or
    mismatched project files, or a name the project does not know. Unusable input: exit 2."""
