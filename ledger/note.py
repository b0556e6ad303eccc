"""C2SP signed notes: tree heads as ``tlog-checkpoint`` notes, ``tlog-cosignature`` witness
cosignatures, ``tlog-proof`` inclusion proofs and ``tlog-witness`` add-checkpoint requests.

Each rule below names the C2SP document it follows (c2sp.org/signed-note, /tlog-checkpoint,
/tlog-cosignature, /tlog-proof, /tlog-witness); specs/release.md §1-§3 is the normative text for
gradledger. A note is parsed strictly and within a size bound before anything is decoded.

Why a log key may sign raw note text although every other gradledger signature is
domain-separated (specs/signing.md): every gradledger signing input contains a 0x00 byte right
after its purpose, and note text never contains one (signed-note: no control characters but
newline), so no note can be presented as any other signed object, nor the reverse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions

from .errors import ProofError, SignatureError, UnusableInput
from .keys import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, SigningKey
from .merkle import HASH_SIZE, verify_consistency, verify_inclusion

#: signed-note: signature type 0x01, Ed25519 over the note text.
ALG_ED25519 = 0x01
#: tlog-cosignature: type 0x04, Ed25519 over "cosignature/v1\ntime T\n" || note text.
ALG_COSIGNATURE_V1 = 0x04
#: A checkpoint note is a few hundred bytes; a proof adds at most 63 hashes. 1 MiB bounds any
#: reader before it splits a line.
MAX_NOTE_SIZE = 1 << 20
#: signed-note: "a note may have at most 100 signatures" is Go's limit; readers refuse more.
MAX_SIGNATURES = 100
#: tlog-proof / tlog-witness: a proof for a tree below 2^63 has at most 63 hashes.
MAX_PROOF_HASHES = 63
PROOF_HEADER = "c2sp.org/tlog-proof@v1"
COSIGNATURE_HEADER = "cosignature/v1"
EM_DASH = "\u2014"

_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,19})")


class NoteError(UnusableInput):
    """A note, checkpoint, proof or key string is malformed (the input cannot be used)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError(f"{what} is not standard base64") from None
    if _b64(raw) != text:  # one encoding per value: no stray padding or non-canonical bits
        raise NoteError(f"{what} is not canonical base64")
    return raw


def _decimal(text: str, what: str) -> int:
    if not _DECIMAL.fullmatch(text) or int(text) >= 1 << 63:
        raise NoteError(f"{what} {text[:24]!r} is not a decimal below 2^63 without leading zeros")
    return int(text)


def _text(data: bytes | str, what: str) -> str:
    """``data`` as text, refused above MAX_NOTE_SIZE bytes before it is decoded or split."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_NOTE_SIZE:
        raise NoteError(f"a {what} of {len(raw)} bytes is larger than {MAX_NOTE_SIZE}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError(f"{what} is not UTF-8") from None


def _control(c: str) -> bool:
    """signed-note forbids control characters in notes (newline aside): C0 and DEL."""
    return ord(c) < 0x20 or ord(c) == 0x7F


def check_key_name(name: str) -> str:
    """signed-note: a key name is non-empty and holds no Unicode space and no '+'."""
    if not name or "+" in name or any(c.isspace() or _control(c) for c in name):
        raise NoteError(f"key name {name!r} is empty or holds a space or '+' (signed-note forbids them)")
    return name


def _check_text(text: str) -> None:
    """signed-note: the text is UTF-8, ends in a newline, has no blank line and no control
    character other than newline."""
    if not text.endswith("\n") or "\n\n" in text or text.startswith("\n"):
        raise NoteError("note text must be non-empty lines, each ending in a newline")
    if any(_control(c) and c != "\n" for c in text):
        raise NoteError("note text holds a control character")


# -- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteKey:
    """A verifier key: a name, a signature type and an Ed25519 public key (signed-note §keys)."""

    name: str
    alg: int
    public_key: bytes

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if self.alg not in (ALG_ED25519, ALG_COSIGNATURE_V1) or len(self.public_key) != PUBLIC_KEY_SIZE:
            raise NoteError("a note key is an Ed25519 key of type 0x01 or 0x04")

    @property
    def key_hash(self) -> bytes:
        """signed-note: the first 4 bytes of SHA-256(name || 0x0A || type || public key)."""
        return hashlib.sha256(self.name.encode() + b"\n" + bytes([self.alg]) + self.public_key).digest()[:4]

    def vkey(self) -> str:
        """The verifier key string ``name+hex(key hash)+base64(type || key)`` (signed-note)."""
        return f"{self.name}+{self.key_hash.hex()}+{_b64(bytes([self.alg]) + self.public_key)}"

    @classmethod
    def parse(cls, vkey: str) -> "NoteKey":
        parts = vkey.strip().split("+", 2)  # the name holds no "+", base64 may
        if len(parts) != 3 or len(parts[1]) != 8:
            raise NoteError(f"{vkey[:60]!r} is not a verifier key 'name+hash+base64'")
        raw = _unb64(parts[2], "verifier key")
        if len(raw) != 1 + PUBLIC_KEY_SIZE:
            raise NoteError("verifier key is not a type byte and a 32-byte Ed25519 key")
        key = cls(parts[0], raw[0], raw[1:])
        if key.key_hash.hex() != parts[1]:
            raise NoteError(f"verifier key {parts[0]!r}: its hash does not match its name and key")
        return key


def log_key(name: str, public_key: bytes) -> NoteKey:
    return NoteKey(name, ALG_ED25519, public_key)


def witness_key(name: str, public_key: bytes) -> NoteKey:
    return NoteKey(name, ALG_COSIGNATURE_V1, public_key)


# -- signed notes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_hash: bytes
    signature: bytes  # after the key hash: Ed25519 (64 bytes), or timestamp || Ed25519 (72)

    def line(self) -> str:
        return f"{EM_DASH} {self.name} {_b64(self.key_hash + self.signature)}\n"


@dataclass(frozen=True)
class SignedNote:
    text: str
    signatures: tuple[NoteSignature, ...]

    def render(self) -> str:
        """signed-note: the text, a blank line, then one line per signature."""
        return self.text + "\n" + "".join(s.line() for s in self.signatures)

    def with_signature(self, sig: NoteSignature) -> "SignedNote":
        """This note with ``sig`` added, replacing an earlier one by the same key."""
        kept = tuple(s for s in self.signatures if (s.name, s.key_hash) != (sig.name, sig.key_hash))
        return SignedNote(self.text, kept + (sig,))

    @classmethod
    def parse(cls, data: bytes | str) -> "SignedNote":
        """Parse a signed note strictly (signed-note); signatures are not checked here."""
        whole = _text(data, "note")
        split = whole.rfind("\n\n")
        if split < 0:
            raise NoteError("note has no blank line before its signatures")
        text, block = whole[: split + 1], whole[split + 2 :]
        _check_text(text)
        if not block.endswith("\n"):
            raise NoteError("note signature block does not end in a newline")
        lines = block[:-1].split("\n")
        if len(lines) > MAX_SIGNATURES:
            raise NoteError(f"note has more than {MAX_SIGNATURES} signatures")
        sigs = []
        for line in lines:
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] != EM_DASH:
                raise NoteError(f"malformed signature line {line[:60]!r}")
            raw = _unb64(parts[2], "signature")
            if len(raw) < 5:
                raise NoteError("signature is too short")
            sigs.append(NoteSignature(check_key_name(parts[1]), raw[:4], raw[4:]))
        return cls(text, tuple(sigs))

    def signatures_by(self, key: NoteKey) -> list[NoteSignature]:
        return [s for s in self.signatures if s.name == key.name and s.key_hash == key.key_hash]

    def verify(self, key: NoteKey) -> int | None:
        """Check ``key``'s signature on this note: raise ``SignatureError`` unless one verifies.

        Returns the cosignature's timestamp for a type 0x04 key, None for a log key."""
        candidates = self.signatures_by(key)
        if not candidates:
            raise SignatureError(f"the note carries no signature by {key.name!r} (key hash {key.key_hash.hex()})")
        for sig in candidates:
            if key.alg == ALG_ED25519:
                message, raw, stamp = self.text.encode(), sig.signature, None
            else:
                if len(sig.signature) != 8 + SIGNATURE_SIZE:
                    continue
                (stamp,) = struct.unpack(">Q", sig.signature[:8])
                message, raw = cosignature_message(self.text, stamp), sig.signature[8:]
            if len(raw) == SIGNATURE_SIZE and _ed25519_ok(key.public_key, message, raw):
                return stamp
        raise SignatureError(f"the signature by {key.name!r} on the note does not verify")


def _ed25519_ok(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False


def cosignature_message(text: str, timestamp: int) -> bytes:
    """tlog-cosignature v1: "cosignature/v1\\ntime <decimal seconds>\\n" || the note text."""
    return f"{COSIGNATURE_HEADER}\ntime {timestamp}\n{text}".encode()


def sign(text: str, key: SigningKey, name: str) -> NoteSignature:
    """A type 0x01 note signature of ``text`` under ``name`` (signed-note)."""
    _check_text(text)
    nk = log_key(name, key.public_key)
    return NoteSignature(name, nk.key_hash, key.sign_note(text.encode()))


def cosign(text: str, key: SigningKey, name: str, timestamp: int) -> NoteSignature:
    """A type 0x04 cosignature at ``timestamp`` (tlog-cosignature v1): the 8-byte big-endian
    timestamp, then the Ed25519 signature of the cosignature message."""
    _check_text(text)
    if not 0 <= timestamp < 1 << 63:
        raise NoteError("a cosignature timestamp is a uint64 below 2^63")
    nk = witness_key(name, key.public_key)
    return NoteSignature(name, nk.key_hash, struct.pack(">Q", timestamp) + key.sign_note(cosignature_message(text, timestamp)))


# -- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """tlog-checkpoint: origin, tree size, root hash, then optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        return "".join(f"{line}\n" for line in (self.origin, str(self.size), _b64(self.root), *self.extensions))

    @classmethod
    def parse(cls, text: str) -> "Checkpoint":
        _check_text(text)
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("a checkpoint has an origin, a size and a root line")
        origin, size, root = lines[0], _decimal(lines[1], "checkpoint size"), _unb64(lines[2], "checkpoint root")
        if not origin:
            raise NoteError("checkpoint origin is empty")
        if len(root) != HASH_SIZE:
            raise NoteError(f"checkpoint root is {len(root)} bytes, not {HASH_SIZE}")
        return cls(origin, size, root, tuple(lines[3:]))


def _hash_lines(lines: list[str], what: str) -> list[bytes]:
    if len(lines) > MAX_PROOF_HASHES:
        raise NoteError(f"{what} has more than {MAX_PROOF_HASHES} hashes")
    hashes = [_unb64(line, f"{what} hash") for line in lines]
    if any(len(h) != HASH_SIZE for h in hashes):
        raise NoteError(f"{what} hash is not {HASH_SIZE} bytes")
    return hashes


def _split_preamble(data: bytes | str, what: str) -> tuple[list[str], SignedNote]:
    """The lines before the first blank line, and the signed note after it."""
    head, sep, rest = _text(data, what).partition("\n\n")
    if not sep:
        raise NoteError(f"{what} has no blank line before its checkpoint")
    return head.split("\n"), SignedNote.parse(rest)


# -- tlog-proof ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlogProof:
    """tlog-proof v1: an entry's index, its inclusion proof and the (co)signed checkpoint."""

    index: int
    hashes: tuple[bytes, ...]
    note: SignedNote
    extra: bytes | None = None

    def render(self) -> str:
        lines = [PROOF_HEADER]
        if self.extra is not None:
            lines.append(f"extra {_b64(self.extra)}")
        lines.append(f"index {self.index}")
        lines += [_b64(h) for h in self.hashes]
        return "\n".join(lines) + "\n\n" + self.note.render()

    @classmethod
    def parse(cls, data: bytes | str) -> "TlogProof":
        lines, note = _split_preamble(data, "tlog-proof")
        if lines[0] != PROOF_HEADER:
            raise NoteError(f"tlog-proof does not start with {PROOF_HEADER!r}")
        extra, at = None, 1
        if at < len(lines) and lines[at].startswith("extra "):
            extra, at = _unb64(lines[at][6:], "tlog-proof extra"), at + 1
        if at >= len(lines) or not lines[at].startswith("index "):
            raise NoteError("tlog-proof has no index line")
        index = _decimal(lines[at][6:], "tlog-proof index")
        return cls(index, tuple(_hash_lines(lines[at + 1 :], "tlog-proof")), note, extra)

    def verify(self, leaf_hash: bytes) -> Checkpoint:
        """Check the inclusion of ``leaf_hash`` at ``index`` in the checkpoint's tree (RFC 9162
        §2.1.3.2). Signatures are the caller's to check against its own keys."""
        checkpoint = Checkpoint.parse(self.note.text)
        verify_inclusion(leaf_hash, self.index, checkpoint.size, list(self.hashes), checkpoint.root)
        return checkpoint


# -- tlog-witness add-checkpoint ----------------------------------------------------------------


@dataclass(frozen=True)
class AddCheckpoint:
    """tlog-witness add-checkpoint request body: "old <size>", a consistency proof, a blank line,
    the signed checkpoint."""

    old_size: int
    proof: tuple[bytes, ...]
    note: SignedNote

    def render(self) -> str:
        return "\n".join([f"old {self.old_size}", *(_b64(h) for h in self.proof)]) + "\n\n" + self.note.render()

    @classmethod
    def parse(cls, data: bytes | str) -> "AddCheckpoint":
        lines, note = _split_preamble(data, "add-checkpoint request")
        if not lines[0].startswith("old "):
            raise NoteError("add-checkpoint request does not start with 'old <size>'")
        return cls(_decimal(lines[0][4:], "old size"), tuple(_hash_lines(lines[1:], "consistency proof")), note)


def check_consistent(old: Checkpoint, new: Checkpoint, proof: tuple[bytes, ...] | list[bytes]) -> None:
    """Raise ``ProofError`` unless ``new`` extends ``old`` (same origin, RFC 9162 §2.1.4.2)."""
    if old.origin != new.origin:
        raise ProofError(f"checkpoints of two logs ({old.origin!r}, {new.origin!r})")
    verify_consistency(old.size, new.size, list(proof), old.root, new.root)
