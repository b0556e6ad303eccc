"""The standalone verifier: ``Verifier(trusted_roots, VerificationPolicy(...)).verify(bundle) -> Report``.

It imports ``gradledger.ledger`` and never ``gradledger.training``, and never unpickles.
"""

from typing import Any

from .report import Check, Report


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that `gradledger-verify` can turn a verifier that fails to import
    # (a check module missing or broken) into exit 2 with one line, never a traceback.
    if name in ("VerificationPolicy", "Verifier"):
        from . import verifier

        return getattr(verifier, name)
    raise AttributeError(name)


__all__ = ["Check", "Report", "VerificationPolicy", "Verifier"]
