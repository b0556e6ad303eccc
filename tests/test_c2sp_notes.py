"""C2SP signed notes, checkpoints, cosignatures, tlog-proofs and the witness (ledger/note.py,
ledger/publish.py, specs/release.md §1-§3)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from helpers import build_ledger
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.ledger import credentials
from gradledger.ledger.errors import CredentialError, ProofError, SignatureError
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.merkle import leaf_hash
from gradledger.ledger.note import (
    AddCheckpoint,
    Checkpoint,
    NoteError,
    NoteKey,
    SignedNote,
    TlogProof,
    cosign,
    log_key,
    sign,
    witness_key,
)
from gradledger.ledger.publish import (
    Witness,
    add_checkpoint_request,
    log_key_of,
    signed_checkpoint,
    tlog_proof,
)

NOW = 1_780_000_000
KEY = SigningKey.from_seed(bytes(range(32)))
names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FFF, blacklist_characters="+\u2014\x7f"),
                min_size=1, max_size=20).filter(lambda s: not any(c.isspace() for c in s))


def test_key_hash_and_vkey_follow_signed_note() -> None:
    # signed-note: hash = SHA-256(name || "\n" || type || key)[:4]; vkey = name+hex(hash)+b64(type||key).
    import hashlib

    key = log_key("example.com/log", KEY.public_key)
    want = hashlib.sha256(b"example.com/log\n\x01" + KEY.public_key).digest()[:4]
    assert key.key_hash == want
    typed = base64.b64encode(bytes([1]) + KEY.public_key).decode()
    assert key.vkey() == f"example.com/log+{want.hex()}+{typed}"
    assert NoteKey.parse(key.vkey()) == key
    with pytest.raises(NoteError):
        NoteKey.parse(key.vkey().replace(want.hex(), "00000000"))
    assert witness_key("w", KEY.public_key).key_hash != log_key("w", KEY.public_key).key_hash


@settings(max_examples=60, deadline=None)
@given(origin=names, size=st.integers(0, (1 << 63) - 1), root=st.binary(min_size=32, max_size=32),
       ext=st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30),
                    max_size=3),
       stamp=st.integers(0, (1 << 63) - 1))
def test_checkpoint_round_trip_and_signatures(origin: str, size: int, root: bytes, ext: list[str], stamp: int) -> None:
    cp = Checkpoint(origin, size, root, tuple(ext))
    text = cp.text()
    assert Checkpoint.parse(text) == cp
    witness = SigningKey.from_seed(bytes(32))
    note = SignedNote(text, (sign(text, KEY, origin),)).with_signature(cosign(text, witness, "w1", stamp))
    parsed = SignedNote.parse(note.render().encode())
    assert parsed == note
    assert parsed.verify(log_key(origin, KEY.public_key)) is None
    assert parsed.verify(witness_key("w1", witness.public_key)) == stamp


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_changed_byte_fails_the_note(data: st.DataObject) -> None:
    # Tamper detection: one byte of the rendered note changed, the note is either refused as
    # malformed or fails both signature checks (a changed name or hash finds no signature).
    cp = Checkpoint("example.com/log", 12, bytes(range(32)))
    witness = SigningKey.from_seed(bytes(32))
    note = SignedNote(cp.text(), (sign(cp.text(), KEY, cp.origin),)).with_signature(cosign(cp.text(), witness, "w", 5))
    raw = bytearray(note.render().encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    try:
        parsed = SignedNote.parse(bytes(raw))
    except NoteError:
        return
    failures = 0
    for key in (log_key(cp.origin, KEY.public_key), witness_key("w", witness.public_key)):
        try:
            parsed.verify(key)
        except SignatureError:
            failures += 1
    assert failures >= 1


@pytest.mark.parametrize("bad", [
    "example.com/log\n12\nAAAA\n\n\u2014 x AAAAAAAA\n",            # root of 3 bytes
    "example.com/log\n012\n" + "A" * 43 + "=\n\n\u2014 x AAAAAAAA\n",  # leading zero
    "example.com/log\n12\n" + "A" * 43 + "=\n",                      # no signature block
    "example.com/log\n\n12\n" + "A" * 43 + "=\n\n\u2014 x AAAAAAAA\n",  # blank line inside the text
    "example.com/log\n12\n" + "A" * 43 + "=\n\n- x AAAAAAAA\n",     # hyphen, not an em dash
    "exa\x00mple\n12\n" + "A" * 43 + "=\n\n\u2014 x AAAAAAAA\n",    # control character
])
def test_malformed_notes_are_refused(bad: str) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(SignedNote.parse(bad).text)


@pytest.mark.parametrize("name", ["", "two words", "a+b", "tab\there", "del\x7f"])
def test_key_names_signed_note_forbids_are_refused(name: str) -> None:
    with pytest.raises(NoteError):
        log_key(name, KEY.public_key)


def test_note_signatures_never_collide_with_domain_separated_ones() -> None:
    with pytest.raises(ValueError):
        KEY.sign_note(b"gradledger/v1/envelope\x00anything")


def _ledger_with_witness(tmp_path: Path):  # type: ignore[no-untyped-def]
    ledger, world = build_ledger(tmp_path / "l", updates=10, tree_head_every=5)
    wkey = SigningKey.generate("witness")
    ledger.append("CredentialIssued", {"credential": credentials.issue(
        world.root, subject="notary.example", path="acme/witnesses", role="witness",
        public_key=wkey.public_key).signed}, world.root)
    ledger.tree_head(world.trainer)
    return ledger, world, wkey


def test_witness_cosigns_a_growing_log_and_refuses_a_fork(tmp_path: Path) -> None:
    ledger, world, wkey = _ledger_with_witness(tmp_path)
    heads = ledger.by_type("TreeHead")
    witness = Witness(wkey, "notary.example", tmp_path / "w" / "state.json")
    log = log_key_of(ledger)

    first = signed_checkpoint(ledger, world.trainer, heads[0])
    sig1 = witness.cosign(add_checkpoint_request(ledger, first, 0), log, NOW)
    assert first.with_signature(sig1).verify(witness_key("notary.example", wkey.public_key)) == NOW

    latest = signed_checkpoint(ledger, world.trainer)
    # The witness remembers size heads[0]: a request from another old size is refused...
    with pytest.raises(ProofError, match="last cosigned"):
        witness.cosign(add_checkpoint_request(ledger, latest, 0), log, NOW)
    # ...and one from its size, with the ledger's consistency proof, is cosigned.
    witness.cosign(add_checkpoint_request(ledger, latest, heads[0]), log, NOW + 1)

    # A hostile trainer (trainer key, not the root key) signs a forked tree of the same size:
    # the witness refuses it, and keeps its state.
    forked = Checkpoint.parse(latest.text)
    forked_text = Checkpoint(forked.origin, forked.size, bytes(32)).text()
    fork = SignedNote(forked_text, (sign(forked_text, world.trainer, forked.origin),))
    with pytest.raises(ProofError):
        witness.cosign(AddCheckpoint(forked.size, (), fork), log, NOW + 2)
    # Nor does a note signed by another key pass as the log's.
    stranger = SignedNote(latest.text, (sign(latest.text, SigningKey.generate(), forked.origin),))
    with pytest.raises(SignatureError):
        witness.cosign(AddCheckpoint(forked.size, (), stranger), log, NOW + 2)
    assert '"size": %d' % forked.size in (tmp_path / "w" / "state.json").read_text()
    ledger.close()


def test_checkpoint_needs_the_tree_heads_own_signer(tmp_path: Path) -> None:
    ledger, world, wkey = _ledger_with_witness(tmp_path)
    with pytest.raises(CredentialError):
        signed_checkpoint(ledger, wkey)
    ledger.close()


def test_tlog_proof_round_trip_and_tamper(tmp_path: Path) -> None:
    ledger, world, wkey = _ledger_with_witness(tmp_path)
    note = signed_checkpoint(ledger, world.trainer)
    size = Checkpoint.parse(note.text).size
    for seq in (0, 3, size - 1):
        proof = TlogProof.parse(tlog_proof(ledger, seq, note).render())
        assert proof.verify(leaf_hash(ledger.record(seq))).size == size
        assert proof.note.verify(log_key_of(ledger)) is None
        with pytest.raises(ProofError):
            proof.verify(leaf_hash(ledger.record((seq + 1) % size)))
    text = tlog_proof(ledger, 3, note).render()
    assert text.startswith("c2sp.org/tlog-proof@v1\nindex 3\n")
    with pytest.raises(NoteError):
        TlogProof.parse(text.replace("index 3", "index 03"))
    ledger.close()


@settings(max_examples=60, deadline=None)
@given(leaves=st.lists(st.binary(max_size=16), min_size=1, max_size=40), data=st.data())
def test_tlog_proofs_and_witness_requests_round_trip_and_check(leaves: list[bytes], data: st.DataObject) -> None:
    # Proofs over random trees: rendered, parsed back byte for byte, and checked against the root;
    # a consistency proof in an add-checkpoint request leads from the old root to the new one.
    from gradledger.ledger.merkle import consistency_proof, inclusion_proof, node_hash, root_of
    from gradledger.ledger.note import check_consistent

    hashes = [leaf_hash(x) for x in leaves]
    levels = [hashes]
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([node_hash(prev[i], prev[i + 1]) for i in range(0, len(prev) - 1, 2)])

    def node(level: int, index: int) -> bytes:
        return levels[level][index]

    n = len(leaves)
    cp = Checkpoint("example.com/log", n, root_of(hashes))
    note = SignedNote(cp.text(), (sign(cp.text(), KEY, cp.origin),))
    i = data.draw(st.integers(0, n - 1))
    extra = data.draw(st.none() | st.binary(min_size=1, max_size=8))
    proof = TlogProof(i, tuple(inclusion_proof(i, n, node)), note, extra)
    parsed = TlogProof.parse(proof.render().encode())
    assert parsed == proof and parsed.render() == proof.render()
    assert parsed.verify(hashes[i]) == cp
    m = data.draw(st.integers(1, n))
    old = Checkpoint("example.com/log", m, root_of(hashes[:m]))
    request = AddCheckpoint(m, tuple(consistency_proof(m, n, node)), note)
    again = AddCheckpoint.parse(request.render())
    assert again == request
    check_consistent(old, cp, again.proof)
    if m < n:
        with pytest.raises(ProofError):
            check_consistent(Checkpoint("example.com/log", m, bytes(32)), cp, again.proof)
