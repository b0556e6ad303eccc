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
from .checker import CheckReport, check_records
from .ledger import Ledger

__all__ = [
    "CheckReport",
    "check_records",
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
    "issue",
    "issue_root",
    "read_public_keys",
    "write_public_keys",
]
