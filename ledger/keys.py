"""Ed25519 keys (pynacl), key ids, domain-separated signing, and key files.

Every signature in gradledger covers ``DOMAIN_PREFIX + purpose + 0x00 + message``
so that a signature made for one kind of object (an envelope, a credential, a
manifest...) can never be replayed as another kind (specs/signing.md).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

from . import encoding
from .errors import EncodingError, KeyFileError, SignatureError
from .files import read_regular

DOMAIN_PREFIX = b"gradledger/v1/"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
KEY_FILE_KIND = "gradledger-ed25519-private-key"
PUBLIC_LINE_PREFIX = "ed25519:"
#: A private key file is one small CBOR map; the decoder's own bound is the same.
MAX_KEY_FILE_SIZE = 4096
#: A trust file of public keys: 16 MiB is some 150 000 keys with comments, far beyond any taxonomy.
MAX_TRUST_FILE_SIZE = 16 << 20

#: Signing purposes; each is a distinct domain (specs/signing.md).
PURPOSES = frozenset(
    {"envelope", "credential", "cosignature", "manifest", "policy", "retirement"}
)


def key_id(public_key: bytes) -> bytes:
    """The 32-byte id of a public key: SHA-256 of its raw 32 bytes."""
    return hashlib.sha256(public_key).digest()


def signing_input(purpose: str, message: bytes) -> bytes:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown signing purpose {purpose!r}")
    return DOMAIN_PREFIX + purpose.encode() + b"\x00" + message


def verify_signature(public_key: bytes, purpose: str, message: bytes, signature: bytes) -> None:
    """Raise ``SignatureError`` unless ``signature`` is ``public_key``'s over (purpose, message)."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise SignatureError("malformed public key or signature")
    try:
        # The binding directly: a VerifyKey object per check costs ~15% more.
        nacl.bindings.crypto_sign_open(signature + signing_input(purpose, message), public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        raise SignatureError(f"bad {purpose} signature") from None


@dataclass(frozen=True, eq=False)
class SigningKey:
    """A private Ed25519 key. Its repr never shows the secret."""

    _key: nacl.signing.SigningKey
    label: str = ""

    @classmethod
    def generate(cls, label: str = "") -> "SigningKey":
        return cls(nacl.signing.SigningKey.generate(), label)

    @classmethod
    def from_seed(cls, seed: bytes, label: str = "") -> "SigningKey":
        if len(seed) != 32:
            raise KeyFileError("an Ed25519 seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed), label)

    @cached_property
    def public_key(self) -> bytes:
        return bytes(self._key.verify_key)

    @cached_property
    def key_id(self) -> bytes:
        return key_id(self.public_key)

    def sign(self, purpose: str, message: bytes) -> bytes:
        return self._key.sign(signing_input(purpose, message)).signature

    def sign_note(self, text: bytes) -> bytes:
        """Ed25519 over raw C2SP note text (ledger/note.py). Such text never holds a 0x00 byte and
        every domain-separated signing input does, so the two can never be confused."""
        if b"\x00" in text:
            raise ValueError("note text never holds a 0x00 byte")
        return self._key.sign(text).signature

    def __repr__(self) -> str:
        return f"SigningKey(label={self.label!r}, key_id={self.key_id.hex()[:16]}...)"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the key to a new file readable by its owner only (0600); never overwrite."""
        path = Path(path)
        data = encoding.encode(
            {"kind": KEY_FILE_KIND, "label": self.label, "seed": bytes(self._key)}
        )
        # O_EXCL + mode at creation: the secret is never briefly world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SigningKey":
        path = Path(path)
        # A key file is a few dozen bytes: anything else (/dev/zero, a FIFO, a huge file) is refused unread.
        data = read_regular(path, MAX_KEY_FILE_SIZE, "private key", KeyFileError)
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"key file {path} is accessible by others; chmod 600 it")
        try:
            record = encoding.decode(data, max_size=4096)
        except EncodingError:
            raise KeyFileError(f"{path} is not a gradledger private key file") from None
        if (
            not isinstance(record, dict)
            or set(record) != {"kind", "label", "seed"}
            or record.get("kind") != KEY_FILE_KIND
            or not isinstance(record.get("seed"), bytes)
            or not isinstance(record.get("label"), str)
        ):
            raise KeyFileError(f"{path} is not a gradledger private key file")
        return cls.from_seed(record["seed"], record["label"])


def format_public_key(public_key: bytes, comment: str = "") -> str:
    line = PUBLIC_LINE_PREFIX + public_key.hex()
    comment = " ".join(comment.split())  # one line per key, whatever the comment holds
    return f"{line}  {comment}".rstrip() if comment else line


def read_public_keys(path: str | os.PathLike[str]) -> list[bytes]:
    """Read a trust file: one ``ed25519:<64 hex>`` per line, optional comment after it; '#' lines ignored."""
    path = Path(path)
    data = read_regular(path, MAX_TRUST_FILE_SIZE, "trusted public keys", KeyFileError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"cannot read public keys from {path}: {exc}") from None
    keys: list[bytes] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        try:
            if not token.startswith(PUBLIC_LINE_PREFIX):
                raise ValueError
            digits = token[len(PUBLIC_LINE_PREFIX):]
            key = bytes.fromhex(digits)
            if len(key) != PUBLIC_KEY_SIZE or digits != digits.lower():
                raise ValueError
        except ValueError:
            raise KeyFileError(f"{path}:{number}: expected 'ed25519:<64 hex digits>'") from None
        keys.append(key)
    if not keys:
        raise KeyFileError(f"{path} holds no public keys")
    return keys


def write_public_keys(path: str | os.PathLike[str], keys: list[tuple[bytes, str]]) -> Path:
    path = Path(path)
    path.write_text("".join(format_public_key(k, c) + "\n" for k, c in keys), encoding="utf-8")
    return path
