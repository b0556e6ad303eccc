"""A ledger's tree heads published in C2SP form, and a witness that cosigns them (specs/release.md).

    note = signed_checkpoint(ledger, trainer_key)             # the latest TreeHead, signed by the trainer
    request = add_checkpoint_request(ledger, note, old_size)   # for a witness (tlog-witness)
    cosig = Witness(key, "witness.example", state).cosign(request, log_key_of(ledger, note))
    proof = tlog_proof(ledger, seq, note.with_signature(cosig))

The checkpoint's origin is the log's origin and its key name is that origin too, so one note key
names one log. Only a size at which the ledger recorded a signed TreeHead is published: a note
then never says more than the trainer already signed inside the log.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .credentials import CredentialRegistry
from .envelope import Sealed
from .errors import CredentialError, ProofError, UnusableInput
from .files import read_regular
from .keys import SigningKey
from .ledger import Ledger
from .note import (
    NoteError,
    AddCheckpoint,
    Checkpoint,
    NoteKey,
    NoteSignature,
    SignedNote,
    TlogProof,
    check_consistent,
    check_key_name,
    cosign,
    log_key,
    sign,
    witness_key,
)

#: A witness's state is one small JSON map; a larger file is not one.
MAX_STATE_SIZE = 16 << 20


def tree_head(ledger: Ledger, size: int | None = None) -> Sealed:
    """The TreeHead recorded at ``size`` (its seq), or the latest one."""
    if size is None:
        heads = ledger.by_type("TreeHead")
        if not heads:
            raise UnusableInput("the ledger holds no tree head yet")
        size = heads[-1]
    if not 0 <= size < ledger.size:
        raise UnusableInput(f"no tree head at size {size}: the ledger holds {ledger.size} observations")
    head = ledger.observation(size)
    if head.type != "TreeHead":
        raise UnusableInput(f"observation {size} is a {head.type}, not a TreeHead: publish a size the log signed")
    return head


def checkpoint_of(head: Sealed) -> Checkpoint:
    return Checkpoint(head.body["origin"], head.body["size"], head.body["root"])


def signed_checkpoint(ledger: Ledger, key: SigningKey, size: int | None = None) -> SignedNote:
    """The TreeHead at ``size`` as a tlog-checkpoint note signed by ``key``, which must be the
    trainer key that signed that TreeHead in the log."""
    head = tree_head(ledger, size)
    if key.key_id != head.signer:
        raise CredentialError(f"the tree head at {head.seq} was signed by another key than the one given")
    text = checkpoint_of(head).text()
    return SignedNote(text, (sign(text, key, check_key_name(head.body["origin"])),))


def log_key_of(ledger: Ledger, size: int | None = None) -> NoteKey:
    """The note key of the trainer who signed the TreeHead at ``size``."""
    head = tree_head(ledger, size)
    return log_key(head.body["origin"], ledger.credential(head.signer).public_key)


def add_checkpoint_request(ledger: Ledger, note: SignedNote, old_size: int) -> AddCheckpoint:
    """A tlog-witness add-checkpoint request: ``note`` with a consistency proof from ``old_size``
    (0: the witness has not seen this log)."""
    new = Checkpoint.parse(note.text)
    if ledger.root_at(new.size) != new.root:
        raise ProofError(f"the checkpoint's root is not the ledger's root at size {new.size}")
    if not 0 <= old_size <= new.size:
        raise UnusableInput(f"old size {old_size} is not between 0 and the checkpoint's size {new.size}")
    proof = ledger.consistency_proof(old_size, new.size) if 0 < old_size < new.size else []
    return AddCheckpoint(old_size, tuple(proof), note)


def tlog_proof(ledger: Ledger, seq: int, note: SignedNote) -> TlogProof:
    """The tlog-proof of observation ``seq`` against the (co)signed checkpoint ``note``."""
    checkpoint = Checkpoint.parse(note.text)
    if checkpoint.origin != ledger.origin or ledger.root_at(checkpoint.size) != checkpoint.root:
        raise ProofError("the checkpoint is not one of this ledger's trees")
    if not 0 <= seq < checkpoint.size:
        raise UnusableInput(f"observation {seq} is not in the checkpoint's tree of size {checkpoint.size}")
    return TlogProof(seq, tuple(ledger.inclusion_proof(seq, checkpoint.size)), note)


def witness_keys(registry: CredentialRegistry, at: int) -> dict[tuple[str, bytes], NoteKey]:
    """The cosignature keys of the witnesses whose credentials are valid at ``at``, by (name, key
    hash): a credentialed witness cosigns under its credential's subject (specs/release.md §2)."""
    out = {}
    for cred in registry.by_key_id.values():
        if cred.role != "witness":
            continue
        try:
            registry.check(cred.key_id, at, ("witness",), what="cosign tree heads")
            key = witness_key(cred.subject, cred.public_key)
        except (CredentialError, NoteError):
            continue  # expired, revoked, or a subject no note key may carry: not a witness here
        out[(key.name, key.key_hash)] = key
    return out


def check_cosigned(note: SignedNote, log: NoteKey, witnesses: dict[tuple[str, bytes], NoteKey]) -> list[str]:
    """Check every signature on ``note``: the log's, and at least one witness cosignature; a
    signature by any other key fails (an unknown witness vouches for nothing). Returns the
    witnesses' names."""
    note.verify(log)
    names = []
    for sig in note.signatures:
        if (sig.name, sig.key_hash) == (log.name, log.key_hash):
            continue
        key = witnesses.get((sig.name, sig.key_hash))
        if key is None:
            raise CredentialError(f"the checkpoint is cosigned by {sig.name!r} (key hash {sig.key_hash.hex()}), "
                                  "which is no witness credentialed in the ledger")
        note.verify(key)
        names.append(sig.name)
    if not names:
        raise CredentialError("the checkpoint carries no witness cosignature: have a witness cosign it "
                              "(gradledger witness cosign)")
    return names


@dataclass
class Witness:
    """A tlog-witness: cosigns a checkpoint only if it extends the last one it cosigned for that
    origin, so that it never cosigns two inconsistent trees of one log.

    ``state`` is a JSON file mapping each origin to the size and root last cosigned. It is
    updated under an exclusive lock and replaced atomically before the cosignature is returned:
    a crash never leaves a cosignature the state does not remember.
    """

    key: SigningKey
    name: str
    state: Path

    def cosign(self, request: AddCheckpoint, log: NoteKey, now: int) -> NoteSignature:
        check_key_name(self.name)
        request.note.verify(log)  # raises SignatureError: the log's own signature comes first
        new = Checkpoint.parse(request.note.text)
        if new.origin != log.name:
            raise ProofError(f"checkpoint origin {new.origin!r} is not the log key's name {log.name!r}")
        self.state.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.state.with_suffix(self.state.suffix + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            known = self._load()
            last = known.get(new.origin)
            if last is None:
                if request.old_size != 0:
                    raise ProofError(f"this witness has not cosigned {new.origin!r}: the request's old size "
                                     f"must be 0, not {request.old_size}")
            else:
                old = Checkpoint(new.origin, last["size"], bytes.fromhex(last["root"]))
                if request.old_size != old.size:
                    raise ProofError(f"this witness last cosigned {new.origin!r} at size {old.size}, not "
                                     f"{request.old_size}: ask again from size {old.size}")
                check_consistent(old, new, request.proof)  # equal sizes: equal roots, empty proof
            known[new.origin] = {"size": new.size, "root": new.root.hex()}
            self._store(known)
            return cosign(request.note.text, self.key, self.name, now)
        finally:
            os.close(lock)

    def _load(self) -> dict[str, dict[str, object]]:
        if not self.state.exists():
            return {}
        try:
            known = json.loads(read_regular(self.state, MAX_STATE_SIZE, "witness state"))
        except (ValueError, UnicodeDecodeError):
            raise UnusableInput(f"{self.state} is not a witness state file") from None
        if not isinstance(known, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("root"), str)
            for v in known.values()
        ):
            raise UnusableInput(f"{self.state} is not a witness state file")
        return known

    def _store(self, known: dict[str, dict[str, object]]) -> None:
        tmp = self.state.with_suffix(self.state.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(known, sort_keys=True, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state)
