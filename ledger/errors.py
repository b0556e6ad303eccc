"""Every error the ledger raises, in one module, so callers can catch by kind.

The verifier maps these onto exit codes: ``UnusableInput`` and its subclasses
mean the input could not be read at all (exit 2); ``VerificationError`` and its
subclasses mean the input was read and a check failed (exit 1).
"""

from __future__ import annotations


class GradledgerError(Exception):
    """Base of every error raised by gradledger."""


class UnusableInput(GradledgerError):
    """The input cannot be used at all: missing, not a ledger, truncated, garbage."""


class EncodingError(UnusableInput):
    """Bytes are not canonical CBOR as specs/encoding.md defines it."""


class SchemaError(GradledgerError):
    """A record decoded but does not match the schema of its type."""


class KeyFileError(UnusableInput):
    """A key file is missing, malformed, or has unsafe permissions."""


class LedgerLockedError(GradledgerError):
    """Another process holds the ledger open for writing."""


class NotALedgerError(UnusableInput):
    """The path exists but holds no gradledger ledger."""


class CorruptLedgerError(UnusableInput):
    """The ledger's storage is damaged beyond reading."""


class VerificationError(GradledgerError):
    """A check failed. ``seq`` names the first failing observation when known."""

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq

    def __str__(self) -> str:
        base = super().__str__()
        return base if self.seq is None else f"observation {self.seq}: {base}"


class SignatureError(VerificationError):
    """An Ed25519 signature does not verify."""


class ChainError(VerificationError):
    """The hash chain or the sequence numbering is broken."""


class ProofError(VerificationError):
    """A Merkle inclusion or consistency proof, or a root, does not verify."""


class CredentialError(VerificationError):
    """A credential is forged, expired, revoked, outside its issuer's path, or lacks the role."""


class AuthorizationError(CredentialError):
    """A signer's role does not allow what it signed."""


class ArtifactUnavailable(VerificationError):
    """An artifact held outside a bundle (specs/bundle.md §5) cannot be used: missing from the
    artifact store, too large, unreadable, or not the bytes of its digest. Names the digest in full."""

    def __init__(self, digest: bytes, reason: str, *, seq: int | None = None) -> None:
        super().__init__(f"artifact {digest.hex()}: {reason}", seq=seq)
        self.digest = digest
        self.reason = reason


class BundleError(UnusableInput):
    """A bundle file is missing, truncated, mis-framed or inconsistent with its header."""


def exit_status(exc: Exception, prog: str) -> tuple[int, str]:
    """What a command exits with for ``exc``, and the one line it prints (never a traceback).

    1 for a failed check, 2 for input that cannot be used (and for anything unexpected, which is
    then named as an internal error so that it can be reported).
    """
    if isinstance(exc, VerificationError):
        return 1, f"{prog}: verification failed: {exc}"
    if isinstance(exc, GradledgerError):
        return 2, f"{prog}: {exc}"
    if isinstance(exc, OSError):
        return 2, f"{prog}: {exc.filename or ''}: {exc.strerror or exc}"
    return 2, f"{prog}: unusable input (internal error {type(exc).__name__}: {exc})"
