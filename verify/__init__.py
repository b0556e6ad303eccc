"""The standalone verifier: ``Verifier(trusted_roots, VerificationPolicy(...)).verify(bundle) -> Report``.

It imports ``gradledger.ledger`` and never ``gradledger.training``, and never unpickles.
"""

from .report import Check, Report
from .verifier import VerificationPolicy, Verifier

__all__ = ["Check", "Report", "VerificationPolicy", "Verifier"]
