"""Credentials: who may sign what, under which authority path, and when.

A credential binds a public key to a subject, a role and a path in the
customer's authority taxonomy, and is signed by its issuer. Chains end at a
self-signed root credential whose key the verifier was told to trust
(specs/credentials.md has the schema and every rule enforced here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable

from . import encoding, schema
from .errors import AuthorizationError, CredentialError, EncodingError, SchemaError, SignatureError
from .keys import SigningKey, key_id, verify_signature

CREDENTIAL_VERSION = 1
ROLES = ("root", "authority", "source", "trainer", "witness")
FOREVER = (1 << 63) - 1

#: Which roles a holder of each role may issue. Paths must also lie strictly
#: below the issuer's own path, so an authority cannot reach sideways or up.
MAY_ISSUE: dict[str, frozenset[str]] = {
    "root": frozenset({"authority", "source", "trainer", "witness"}),
    "authority": frozenset({"authority", "source"}),
    "source": frozenset(),
    "trainer": frozenset(),
    "witness": frozenset(),
}

CREDENTIAL_SCHEMA = schema.record(
    "credential",
    v=schema.one_of(CREDENTIAL_VERSION),
    subject=schema.name,
    path=schema.path,
    role=schema.one_of(*ROLES),
    public_key=schema.bstr(32),
    issuer=schema.digest,
    not_before=schema.uint,
    not_after=schema.uint,
)


@dataclass(frozen=True)
class Credential:
    subject: str
    path: str
    role: str
    public_key: bytes
    issuer: bytes
    not_before: int
    not_after: int
    signed: bytes  # canonical CBOR [credential_bytes, signature], as recorded

    @cached_property
    def key_id(self) -> bytes:
        return key_id(self.public_key)

    @property
    def self_signed(self) -> bool:
        return self.issuer == self.key_id

    def in_window(self, at: int) -> bool:
        return self.not_before <= at <= self.not_after

    def to_map(self) -> dict:
        return {
            "v": CREDENTIAL_VERSION,
            "subject": self.subject,
            "path": self.path,
            "role": self.role,
            "public_key": self.public_key,
            "issuer": self.issuer,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }


def issue(
    issuer: SigningKey,
    *,
    subject: str,
    path: str,
    role: str,
    public_key: bytes,
    not_before: int = 0,
    not_after: int = FOREVER,
) -> Credential:
    """Sign a credential with ``issuer``. A root credential is issued by its own key."""
    body = {
        "v": CREDENTIAL_VERSION,
        "subject": subject,
        "path": path,
        "role": role,
        "public_key": public_key,
        "issuer": issuer.key_id,
        "not_before": not_before,
        "not_after": not_after,
    }
    CREDENTIAL_SCHEMA.validate(body)
    data = encoding.encode(body)
    signed = encoding.encode([data, issuer.sign("credential", data)])
    return parse(signed)


def issue_root(key: SigningKey, *, subject: str, path: str, **window: int) -> Credential:
    return issue(key, subject=subject, path=path, role="root", public_key=key.public_key, **window)


def parse(signed: bytes) -> Credential:
    """Decode and schema-check a signed credential; does not check its signature."""
    try:
        outer = encoding.decode(signed, max_size=4096)
        if type(outer) is not list or len(outer) != 2 or not all(type(x) is bytes for x in outer):
            raise SchemaError("signed credential must be [credential bytes, signature]")
        body = encoding.decode(outer[0], max_size=4096)
        CREDENTIAL_SCHEMA.validate(body)
    except (EncodingError, SchemaError) as exc:
        raise CredentialError(f"malformed credential: {exc}") from None
    if body["not_before"] > body["not_after"]:
        raise CredentialError("credential validity window is empty")
    return Credential(
        subject=body["subject"],
        path=body["path"],
        role=body["role"],
        public_key=body["public_key"],
        issuer=body["issuer"],
        not_before=body["not_before"],
        not_after=body["not_after"],
        signed=signed,
    )


def _signature_parts(cred: Credential) -> tuple[bytes, bytes]:
    data, signature = encoding.decode(cred.signed, max_size=4096)
    return data, signature


def is_below(child: str, parent: str) -> bool:
    return child.startswith(parent + "/")


@dataclass
class CredentialRegistry:
    """The credentials and revocations a ledger has recorded, and the checks on them.

    ``trusted_roots`` are raw public keys. When it is ``None`` the registry
    trusts the self-signed roots it meets (a ledger checking its own
    structure); a verifier always passes the roots it was given.
    """

    trusted_roots: frozenset[bytes] | None = None
    by_key_id: dict[bytes, Credential] = field(default_factory=dict)
    revoked_at: dict[bytes, int] = field(default_factory=dict)

    def copy(self) -> "CredentialRegistry":
        return CredentialRegistry(self.trusted_roots, dict(self.by_key_id), dict(self.revoked_at))

    def get(self, kid: bytes) -> Credential:
        cred = self.by_key_id.get(kid)
        if cred is None:
            raise CredentialError(f"no credential recorded for key {kid.hex()[:16]}")
        return cred

    def add(self, signed: bytes, at: int) -> Credential:
        """Admit a credential recorded at time ``at`` after checking its issuer and rules."""
        cred = parse(signed)
        if cred.key_id in self.by_key_id:
            raise CredentialError(f"key {cred.key_id.hex()[:16]} is already credentialed")
        data, signature = _signature_parts(cred)
        if cred.self_signed:
            if cred.role != "root":
                raise CredentialError(f"self-signed credential for {cred.subject!r} is not a root")
            if self.trusted_roots is not None and cred.public_key not in self.trusted_roots:
                raise CredentialError(f"root {cred.subject!r} is not among the trusted roots")
            issuer_key = cred.public_key
        else:
            issuer = self.check(cred.issuer, at, MAY_ISSUE.keys(), what="issue a credential")
            if cred.role not in MAY_ISSUE[issuer.role]:
                raise CredentialError(
                    f"{issuer.role} {issuer.subject!r} may not issue a {cred.role} credential"
                )
            if not is_below(cred.path, issuer.path):
                raise CredentialError(
                    f"credential path {cred.path!r} is not below issuer path {issuer.path!r}"
                )
            issuer_key = issuer.public_key
        try:
            verify_signature(issuer_key, "credential", data, signature)
        except SignatureError:
            raise CredentialError(f"credential for {cred.subject!r} has a forged signature") from None
        self.by_key_id[cred.key_id] = cred
        return cred

    def revoke(self, kid: bytes, at: int, revoker: bytes) -> Credential:
        """Record that ``kid`` is revoked from ``at`` on; only a root or its issuer may."""
        cred = self.get(kid)
        by = self.check(revoker, at, ("root", "authority"), what="revoke")
        # A root governs its own tree only; an authority, what it issued.
        allowed = cred.issuer == revoker or (by.role == "root" and is_below(cred.path, by.path))
        if not allowed:
            raise CredentialError(
                f"{by.subject!r} neither issued {cred.subject!r} nor is the root above it, so may not revoke it"
            )
        if kid in self.revoked_at:
            raise CredentialError(f"credential {cred.subject!r} is already revoked")
        self.revoked_at[kid] = at
        return cred

    def check(self, kid: bytes, at: int, roles: Iterable[str], what: str = "sign") -> Credential:
        """The credential of ``kid`` if it and every issuer above it is valid at ``at`` and its role is in ``roles``."""
        cred = self.get(kid)
        if cred.role not in roles:
            raise AuthorizationError(f"{cred.role} {cred.subject!r} may not {what}")
        link = cred
        for _ in range(32):
            if not link.in_window(at):
                raise CredentialError(f"credential {link.subject!r} is not valid at time {at}")
            revoked = self.revoked_at.get(link.key_id)
            if revoked is not None and at >= revoked:
                raise CredentialError(f"credential {link.subject!r} was revoked at time {revoked}")
            if link.self_signed:
                return cred
            link = self.get(link.issuer)
        raise CredentialError(f"credential chain of {cred.subject!r} is too long")
