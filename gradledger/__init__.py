"""gradledger: auditable model training.

Govern the training loop you already have; every optimizer step becomes a signed, Merkle-logged
GovernedUpdate that a standalone verifier replays bit for bit::

    import gradledger

    project = gradledger.Project.open("acme")          # made once by `gradledger init acme --taxonomy t.toml`
    model, optimizer, loader = gradledger.govern(model, optimizer, loader, project=project, dataset="digits")
    ...                                                 # your loop, unchanged
    model.run.close()

Packages: ``gradledger.ledger`` (the trust substrate), ``gradledger.training`` (governed training),
``gradledger.verify`` (the standalone verifier, which never imports training). The names here load
on first use, so importing ``gradledger.verify`` does not import training.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DepthProfiles", "MemorizationScan", "Project", "StepRefused", "Verifier", "VerificationPolicy", "govern"]


def __getattr__(name: str) -> Any:
    if name in ("DepthProfiles", "MemorizationScan", "Project", "StepRefused", "govern"):
        from gradledger import training

        return getattr(training, name)
    if name in ("Verifier", "VerificationPolicy"):
        from gradledger import verify

        return getattr(verify, name)
    raise AttributeError(name)
