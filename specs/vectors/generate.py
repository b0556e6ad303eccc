#!/usr/bin/env python3
"""Regenerate specs/vectors/ledger-v1.json, the gradledger ledger-layer test vectors.

    python specs/vectors/generate.py            # rewrite the JSON file beside this script
    python specs/vectors/generate.py --check    # exit 1 if the file on disk differs

Everything here is deterministic: keys come from fixed seeds, every time is
given explicitly, Ed25519 (RFC 8032) signatures are deterministic, and the
temporary ledger directory never appears in the output. The JSON layout is
described in specs/README.md ("Test vectors"); values use the typed JSON
notation of specs/encoding.md section "Typed JSON notation".
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from gradledger.ledger import credentials as C
from gradledger.ledger import encoding, keys, merkle
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.state import LedgerState, origin_of

OUT = Path(__file__).resolve().parent / "ledger-v1.json"
#: 2023-11-14T22:13:20Z in unix nanoseconds; record i is written at T0 + i seconds.
T0 = 1_700_000_000_000_000_000
SECOND = 1_000_000_000


# -- typed JSON notation (specs/encoding.md) ------------------------------------


def typed(value: Any) -> Any:
    """A CBOR data-model value as unambiguous JSON."""
    kind = type(value)
    if kind is bool:
        return {"bool": value}
    if value is None:
        return {"null": None}
    if kind is int:
        return {"int": str(value)}
    if kind is float:
        return {"float": struct.pack(">d", value).hex()}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is str:
        return {"text": value}
    if kind is list:
        return {"array": [typed(v) for v in value]}
    if kind is dict:
        return {"map": [[k, typed(v)] for k, v in value.items()]}
    raise TypeError(f"{kind.__name__} is not in the data model")


def untyped(node: dict[str, Any]) -> Any:
    """The inverse of ``typed``."""
    ((kind, payload),) = node.items()
    if kind == "bool":
        return bool(payload)
    if kind == "null":
        return None
    if kind == "int":
        return int(payload)
    if kind == "float":
        return struct.unpack(">d", bytes.fromhex(payload))[0]
    if kind == "bytes":
        return bytes.fromhex(payload)
    if kind == "text":
        return payload
    if kind == "array":
        return [untyped(v) for v in payload]
    if kind == "map":
        return {k: untyped(v) for k, v in payload}
    raise ValueError(f"unknown typed-JSON kind {kind!r}")


def f64(x: float) -> dict[str, str]:
    return typed(float(x))


# -- canonical CBOR -------------------------------------------------------------

ACCEPTED: list[tuple[str, Any]] = [
    ("0", 0),
    ("23", 23),
    ("24: one-byte argument", 24),
    ("255", 255),
    ("256: two-byte argument", 256),
    ("65535", 65535),
    ("65536: four-byte argument", 65536),
    ("4294967295", 4294967295),
    ("4294967296: eight-byte argument", 4294967296),
    ("18446744073709551615: largest uint", (1 << 64) - 1),
    ("-1", -1),
    ("-24", -24),
    ("-25", -25),
    ("-18446744073709551616: smallest nint", -(1 << 64)),
    ("1.0 stays a float, half precision", 1.0),
    ("1.5", 1.5),
    ("-0.0", -0.0),
    ("65504.0: largest half", 65504.0),
    ("5.960464477539063e-08: half subnormal", 5.960464477539063e-08),
    ("100000.0: single precision", 100000.0),
    ("3.4028234663852886e+38: largest single", 3.4028234663852886e38),
    ("0.1: double precision", 0.1),
    ("1e+300", 1e300),
    ("Infinity", math.inf),
    ("-Infinity", -math.inf),
    ("NaN: canonical quiet NaN", math.nan),
    ("false", False),
    ("true", True),
    ("null", None),
    ("empty byte string", b""),
    ("byte string", b"\x01\x02\x03\x04"),
    ("empty text", ""),
    ("text", "a"),
    ("non-ASCII text", "\u00fc\u6c34"),
    ("24-byte text: one-byte length", "x" * 24),
    ("empty array", []),
    ("nested arrays", [1, [2, 3], [4, [5]]]),
    ("empty map", {}),
    (
        "map keys are sorted bytewise by their encoded form (insertion order here is not)",
        {"z": 1, "aa": 2, "a": 3, "": 4, "b": 5, "y" * 24: 6, "\u00e9": 7},
    ),
    (
        "an envelope-shaped map",
        {"v": 1, "type": "Example", "seq": 0, "prev": bytes(32), "time": T0, "body": {"x": [1.5, -2]}, "signer": bytes(32)},
    ),
]

# (description, hex, decode() max_size or None)
REJECTED: list[tuple[str, str, int | None]] = [
    ("empty input", "", None),
    ("integer 23 in a one-byte argument: not shortest", "1817", None),
    ("integer 1 in a two-byte argument: not shortest", "190001", None),
    ("text length 1 in a one-byte argument: not shortest", "780161", None),
    ("float 1.0 as single precision: not the shortest exact float", "fa3f800000", None),
    ("float 1.0 as double precision: not the shortest exact float", "fb3ff0000000000000", None),
    ("NaN with a payload: only f97e00 is canonical", "f97e01", None),
    ("NaN as single precision", "fa7fc00000", None),
    ("indefinite-length array", "9f01ff", None),
    ("indefinite-length text", "7f616161ff", None),
    ("indefinite-length map", "bf616101ff", None),
    ("duplicate map key", "a2616101616102", None),
    ("map keys not in bytewise order", "a2616201616102", None),
    ("map keys ordered 'aa' before 'b'", "a262616101616202", None),
    ("integer map key", "a10102", None),
    ("byte string map key", "a1410102", None),
    ("array map key", "a1810102", None),
    ("trailing byte after a complete item", "0000", None),
    ("truncated array", "8201", None),
    ("truncated byte string", "4301", None),
    ("invalid UTF-8 in text", "62c328", None),
    ("tag 1 (epoch time)", "c11a514b67b0", None),
    ("tag 2 (bignum) for 2**64", "c249010000000000000000", None),
    ("tag 24 (embedded CBOR)", "d81840", None),
    ("tag 100 (days since epoch)", "d86401", None),
    ("tag 55799 (self-described CBOR)", "d9d9f700", None),
    ("tag 4096 (unassigned)", "d9100000", None),
    ("simple value undefined", "f7", None),
    ("simple value 16", "f0", None),
    ("simple value 32", "f820", None),
    ("reserved additional information 28", "1c", None),
    ("lone break code", "ff", None),
    ("an item enclosed in 33 arrays (deeper than 32)", "81" * 33 + "00", None),
    ("an empty map enclosed in 33 maps (deeper than 32)", "a16161" * 33 + "a0", None),
    ("input larger than the caller's size limit", "83010203", 3),
]

# Accepted at the nesting limit, to pin the depth rule from both sides.
DEPTH_LIMIT_ACCEPTED = ["81" * 32 + "00", "81" * 32 + "80"]


def cbor_vectors() -> dict[str, Any]:
    accepted = [{"desc": d, "value": typed(v), "hex": encoding.encode(v).hex()} for d, v in ACCEPTED]
    for h in DEPTH_LIMIT_ACCEPTED:
        value = encoding.decode(bytes.fromhex(h))
        accepted.append({"desc": "nesting at the limit (32 enclosing arrays)", "value": typed(value), "hex": h})
    rejected = []
    for desc, h, limit in REJECTED:
        entry: dict[str, Any] = {"desc": desc, "hex": h}
        if limit is not None:
            entry["max_size"] = limit
        rejected.append(entry)
    return {"accepted": accepted, "rejected": rejected}


# -- keys and signing -----------------------------------------------------------

SEEDS = {
    "rfc8032-test1": bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"),
    "root": bytes(range(0, 32)),
    "trainer": bytes(range(32, 64)),
    "authority": bytes(range(64, 96)),
    "source": bytes(range(96, 128)),
    "witness": bytes(range(128, 160)),
}


def signing_key(name: str) -> SigningKey:
    return SigningKey.from_seed(SEEDS[name], name)


def key_vectors() -> list[dict[str, Any]]:
    out = []
    for name, seed in SEEDS.items():
        key = signing_key(name)
        out.append(
            {
                "name": name,
                "seed": seed.hex(),
                "public_key": key.public_key.hex(),
                "key_id": key.key_id.hex(),
                "trust_line": keys.format_public_key(key.public_key, name),
            }
        )
    return out


def key_file_vector() -> dict[str, Any]:
    key = signing_key("root")
    with tempfile.TemporaryDirectory() as tmp:
        data = key.save(Path(tmp) / "root.key").read_bytes()
    return {"key": "root", "label": "root", "file": data.hex()}


SIGNING = [
    ("root", "envelope", b"gradledger test message"),
    ("root", "credential", b"gradledger test message"),
    ("witness", "cosignature", b""),
    ("trainer", "manifest", bytes(range(16))),
]


def signing_vectors() -> list[dict[str, Any]]:
    out = []
    for name, purpose, message in SIGNING:
        key = signing_key(name)
        out.append(
            {
                "key": name,
                "purpose": purpose,
                "message": message.hex(),
                "signing_input": keys.signing_input(purpose, message).hex(),
                "signature": key.sign(purpose, message).hex(),
            }
        )
    return out


# -- credentials ----------------------------------------------------------------

# name, issuer key, subject key, subject, path, role, not_before, not_after
CREDENTIALS = [
    ("root", "root", "root", "acme-root", "acme", "root", 0, C.FOREVER),
    ("trainer", "root", "trainer", "trainer-1", "acme/training", "trainer", 0, C.FOREVER),
    ("authority", "root", "authority", "radiology", "acme/radiology", "authority", 0, C.FOREVER),
    ("source", "authority", "source", "dr-a", "acme/radiology/attending", "source", T0, T0 + 86_400 * SECOND),
    ("witness", "root", "witness", "witness-1", "acme/witness", "witness", 0, C.FOREVER),
]


def make_credentials() -> dict[str, C.Credential]:
    out = {}
    for name, issuer, subject_key, subject, path, role, nb, na in CREDENTIALS:
        out[name] = C.issue(
            signing_key(issuer),
            subject=subject,
            path=path,
            role=role,
            public_key=signing_key(subject_key).public_key,
            not_before=nb,
            not_after=na,
        )
    return out


def credential_vectors(creds: dict[str, C.Credential]) -> list[dict[str, Any]]:
    out = []
    for name, issuer, subject_key, *_ in CREDENTIALS:
        cred = creds[name]
        body_bytes, signature = encoding.decode(cred.signed)
        out.append(
            {
                "name": name,
                "issuer_key": issuer,
                "subject_key": subject_key,
                "credential": typed(cred.to_map()),
                "credential_bytes": body_bytes.hex(),
                "signature": signature.hex(),
                "signed": cred.signed.hex(),
                "key_id": cred.key_id.hex(),
            }
        )
    return out


# -- a short ledger -------------------------------------------------------------


def digest(label: bytes) -> bytes:
    return hashlib.sha256(label).digest()


def ledger_script(creds: dict[str, C.Credential]) -> list[tuple[str, str, dict[str, Any]]]:
    """(type, signer key, body) for records 0..6; record 7 is the TreeHead."""
    return [
        ("CredentialIssued", "root", {"credential": creds["root"].signed}),
        ("CredentialIssued", "root", {"credential": creds["trainer"].signed}),
        ("CredentialIssued", "root", {"credential": creds["authority"].signed}),
        ("CredentialIssued", "authority", {"credential": creds["source"].signed}),
        (
            "RunStarted",
            "trainer",
            {
                "run_id": "run-1",
                "description": "gradledger spec vectors",
                "environment": {"torch": "2.4.0", "threads": 1, "deterministic": True},
                "artifacts": {"model_program": digest(b"model program")},
                "settings": {"optimizer": "sgd", "lr": 0.125, "bands": ["head", "mid", "embedding"]},
            },
        ),
        (
            "GovernedUpdate",
            "trainer",
            {
                "step": 0,
                "batch": [0, 1, 2, 3],
                "policy": digest(b"policy v1"),
                "lr": 0.125,
                "loss": 0.6931471805599453,
                "band_grad_norms": [1.5, 0.75, 0.25],
                "band_update_norms": [0.1875, 0.09375, 0.0],
                "authority_writes": {"acme/radiology/attending": [4.0, 4.0, 0.0]},
                "sources": ["dr-a"],
            },
        ),
        (
            "GovernedUpdate",
            "trainer",
            {
                "step": 1,
                "batch": [4, 5, 6, 7],
                "policy": digest(b"policy v1"),
                "lr": 0.125,
                "loss": 0.5,
                "band_grad_norms": [1.25, 0.5, 0.125],
                "band_update_norms": [0.15625, 0.0625, 0.0],
                "authority_writes": {"acme/radiology/attending": [2.0, 2.0, 0.0]},
                "sources": ["dr-a"],
            },
        ),
    ]


INCLUSION = [(0, 8), (5, 8), (2, 7), (6, 7)]
CONSISTENCY = [(3, 8), (4, 7), (1, 8), (7, 8)]


def ledger_vectors(creds: dict[str, C.Credential]) -> dict[str, Any]:
    script = ledger_script(creds)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger.create(Path(tmp) / "ledger")
        try:
            for i, (type_name, signer, body) in enumerate(script):
                ledger.append(type_name, body, signing_key(signer), time=T0 + i * SECOND)
            ledger.commit()
            head = {"origin": ledger.origin, "size": ledger.size, "root": ledger.root}
            script.append(("TreeHead", "trainer", head))
            ledger.append("TreeHead", head, signing_key("trainer"), time=T0 + 7 * SECOND, commit=True)
            records = [record for _, record in ledger.records()]
            inclusion = [
                {"index": i, "size": n, "leaf_hash": merkle.leaf_hash(records[i]).hex(),
                 "root": ledger.root_at(n).hex(), "proof": [h.hex() for h in ledger.inclusion_proof(i, n)]}
                for i, n in INCLUSION
            ]
            consistency = [
                {"size1": m, "size2": n, "root1": ledger.root_at(m).hex(), "root2": ledger.root_at(n).hex(),
                 "proof": [h.hex() for h in ledger.consistency_proof(m, n)]}
                for m, n in CONSISTENCY
            ]
            stored_head = ledger.head
        finally:
            ledger.close()

    # Re-admit from scratch with the root as the only trust anchor: the
    # structural check of specs/observations.md, which also yields index keys.
    state = LedgerState(registry=CredentialRegistry(trusted_roots=frozenset({signing_key("root").public_key})))
    entries = []
    for seq, ((type_name, signer, body), record) in enumerate(zip(script, records)):
        admitted = state.admit_record(record)
        sealed = admitted.sealed
        assert sealed.body == body and sealed.type == type_name
        entries.append(
            {
                "seq": seq,
                "type": type_name,
                "signer_key": signer,
                "time": str(sealed.time),
                "body": typed(body),
                "prev": sealed.prev.hex(),
                "envelope": sealed.envelope_bytes.hex(),
                "signature": sealed.signature.hex(),
                "record": record.hex(),
                "record_hash": sealed.record_hash.hex(),
                "leaf_hash": sealed.leaf_hash.hex(),
                "root": state.tree.root().hex(),
                "index": {
                    "authorities": list(admitted.keys.authorities),
                    "sources": list(admitted.keys.sources),
                    "examples": list(admitted.keys.examples),
                },
            }
        )
    assert state.head == stored_head
    tree_head = script[-1][2]
    witness = signing_key("witness")
    cosigned = encoding.encode(tree_head)
    return {
        "trusted_roots": [signing_key("root").public_key.hex()],
        "origin": origin_of(records[0]),
        "records": entries,
        "final": {"size": len(records), "root": state.tree.root().hex(), "head": state.head.hex()},
        "inclusion": inclusion,
        "consistency": consistency,
        "cosignature": {
            "witness_key": "witness",
            "tree_head": typed(tree_head),
            "tree_head_bytes": cosigned.hex(),
            "signing_input": keys.signing_input("cosignature", cosigned).hex(),
            "signature": witness.sign("cosignature", cosigned).hex(),
        },
    }


def build() -> dict[str, Any]:
    creds = make_credentials()
    return {
        "format": "gradledger-ledger-vectors/1",
        "note": "Generated by specs/vectors/generate.py; see specs/README.md. All byte strings are lowercase hex.",
        "constants": {
            "signing_domain_prefix": keys.DOMAIN_PREFIX.hex(),
            "genesis_prev": bytes(32).hex(),
            "empty_root": merkle.EMPTY_ROOT.hex(),
            "credential_forever": str(C.FOREVER),
        },
        "cbor": cbor_vectors(),
        "keys": key_vectors(),
        "key_file": key_file_vector(),
        "signing": signing_vectors(),
        "credentials": credential_vectors(creds),
        "ledger": ledger_vectors(creds),
    }


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render(build())
    if "--check" in argv:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
