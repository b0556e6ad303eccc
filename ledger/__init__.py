"""gradledger.ledger: the trust substrate.

The public API is what this module exports; everything else is reachable but
may change. specs/ is the normative description of every format used here.
"""

from .credentials import Credential, CredentialRegistry, issue, issue_root
from .envelope import Sealed
from .errors import (
    AuthorizationError,
    ChainError,
    CorruptLedgerError,
    CredentialError,
    EncodingError,
    GradledgerError,
    LedgerLockedError,
    NotALedgerError,
    ProofError,
    SchemaError,
    SignatureError,
    UnusableInput,
    VerificationError,
)
from .keys import SigningKey, read_public_keys, write_public_keys
from .ledger import Ledger, VerifyReport

__all__ = [
    "AuthorizationError",
    "ChainError",
    "CorruptLedgerError",
    "Credential",
    "CredentialError",
    "CredentialRegistry",
    "EncodingError",
    "GradledgerError",
    "Ledger",
    "LedgerLockedError",
    "NotALedgerError",
    "ProofError",
    "SchemaError",
    "Sealed",
    "SignatureError",
    "SigningKey",
    "UnusableInput",
    "VerificationError",
    "VerifyReport",
    "issue",
    "issue_root",
    "read_public_keys",
    "write_public_keys",
]
