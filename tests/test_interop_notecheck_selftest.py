"""Self-test of the Go notecheck interop helper.

Notes here are built by hand from the C2SP specs (signed-note, tlog-checkpoint,
tlog-cosignature) with PyNaCl only, not with the project's code, so this proves
the Go checker itself accepts good notes and rejects bad ones before other
tests trust it.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from pathlib import Path

import nacl.signing
import pytest
from interop.notecheck import build_notecheck, run_notecheck

ORIGIN = "example.com/log"
ROOT = bytes(range(32))
BODY = f"{ORIGIN}\n5\n{base64.b64encode(ROOT).decode()}\n"
COSIG_TIME = 1700000000
EM_DASH = "\u2014"


@pytest.fixture(scope="module")
def notecheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = build_notecheck(tmp_path_factory.mktemp("notecheck"))
    if binary is None:
        pytest.skip("go or golang.org/x/mod source (/usr/share/gocode) not available")
    return binary


def key_hash(name: str, typ: int, pub: bytes) -> bytes:
    # C2SP signed-note key ID: SHA-256(name || "\n" || type || pub)[:4].
    return hashlib.sha256(name.encode() + b"\n" + bytes([typ]) + pub).digest()[:4]


def vkey(name: str, typ: int, pub: bytes) -> str:
    return f"{name}+{key_hash(name, typ, pub).hex()}+{base64.b64encode(bytes([typ]) + pub).decode()}"


def sig_line(name: str, typ: int, pub: bytes, sig: bytes) -> str:
    return f"{EM_DASH} {name} {base64.b64encode(key_hash(name, typ, pub) + sig).decode()}\n"


def log_sig(sk: nacl.signing.SigningKey, name: str, text: str) -> str:
    pub = bytes(sk.verify_key)
    return sig_line(name, 0x01, pub, sk.sign(text.encode()).signature)


def cosig(sk: nacl.signing.SigningKey, name: str, text: str, signed_time: int, encoded_time: int) -> str:
    # tlog-cosignature/v1: Ed25519 over "cosignature/v1\ntime T\n" || note text;
    # the signature carries T as 8 bytes big-endian. The two times differ only
    # when a test forges a mismatch.
    msg = f"cosignature/v1\ntime {signed_time}\n{text}".encode()
    pub = bytes(sk.verify_key)
    return sig_line(name, 0x04, pub, struct.pack(">Q", encoded_time) + sk.sign(msg).signature)


@pytest.fixture(scope="module")
def keys() -> dict[str, nacl.signing.SigningKey]:
    return {
        "log": nacl.signing.SigningKey.generate(),
        "witness": nacl.signing.SigningKey.generate(),
        "other": nacl.signing.SigningKey.generate(),
    }


def make_note(keys: dict[str, nacl.signing.SigningKey], cosig_encoded_time: int = COSIG_TIME) -> str:
    return (
        BODY
        + "\n"
        + log_sig(keys["log"], ORIGIN, BODY)
        + cosig(keys["witness"], "witness.example", BODY, COSIG_TIME, cosig_encoded_time)
    )


def vkeys(keys: dict[str, nacl.signing.SigningKey], witness: str = "witness") -> tuple[str, list[str]]:
    return (
        vkey(ORIGIN, 0x01, bytes(keys["log"].verify_key)),
        [vkey("witness.example", 0x04, bytes(keys[witness].verify_key))],
    )


def test_good_note_verifies(notecheck: Path, keys: dict[str, nacl.signing.SigningKey]) -> None:
    log_vkey, witness_vkeys = vkeys(keys)
    rc, out = run_notecheck(notecheck, make_note(keys), log_vkey, witness_vkeys)
    assert rc == 0, out
    assert out == {
        "text": BODY,
        "verified": [ORIGIN, "witness.example"],
        "cosignature_times": {"witness.example": COSIG_TIME},
        "origin": ORIGIN,
        "size": 5,
        "root_hex": ROOT.hex(),
    }


def test_altered_text_fails(notecheck: Path, keys: dict[str, nacl.signing.SigningKey]) -> None:
    note = make_note(keys).replace("\n5\n", "\n6\n", 1)  # one character of the body
    rc, out = run_notecheck(notecheck, note, *vkeys(keys))
    assert rc == 1, out


def test_cosignature_time_mismatch_fails(notecheck: Path, keys: dict[str, nacl.signing.SigningKey]) -> None:
    # Signed over COSIG_TIME, but the signature claims COSIG_TIME + 1.
    note = make_note(keys, cosig_encoded_time=COSIG_TIME + 1)
    rc, out = run_notecheck(notecheck, note, *vkeys(keys))
    assert rc == 1, out


def test_wrong_witness_key_fails(notecheck: Path, keys: dict[str, nacl.signing.SigningKey]) -> None:
    # The log signature still verifies, so note.Open alone would accept this;
    # notecheck must insist that every given key signed.
    rc, out = run_notecheck(notecheck, make_note(keys), *vkeys(keys, witness="other"))
    assert rc == 1, out
    assert "witness.example" in out
