"""specs/vectors/ledger-v1.json recomputed with the library, so the spec and the code cannot drift.

Every expected value in the vector file is recomputed here from the inputs the
file itself lists (seeds, values, credential fields, record bodies and times),
never read back from the generator; the rejected CBOR inputs must each raise
``EncodingError``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from gradledger.ledger import credentials as C
from gradledger.ledger import encoding, envelope, keys, merkle
from gradledger.ledger import witness as witness_module
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.errors import EncodingError, KeyFileError
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.state import LedgerState, origin_of

SPECS = Path(__file__).resolve().parents[1] / "specs"
VECTORS = json.loads((SPECS / "vectors" / "ledger-v1.json").read_text(encoding="utf-8"))
LEDGER = VECTORS["ledger"]


def untyped(node: dict[str, Any]) -> Any:
    """specs/encoding.md typed JSON notation -> Python value (independent of generate.py)."""
    ((kind, payload),) = node.items()
    if kind == "bool":
        assert type(payload) is bool
        return payload
    if kind == "null":
        assert payload is None
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
    raise AssertionError(f"unknown typed-JSON kind {kind!r}")


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types, float signs and NaN (map order is not data)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


KEYS = {entry["name"]: SigningKey.from_seed(bytes.fromhex(entry["seed"]), entry["name"]) for entry in VECTORS["keys"]}
H = bytes.fromhex


# -- constants ------------------------------------------------------------------


def test_constants() -> None:
    c = VECTORS["constants"]
    assert H(c["signing_domain_prefix"]) == keys.DOMAIN_PREFIX == b"gradledger/v1/"
    assert H(c["genesis_prev"]) == envelope.GENESIS_PREV == bytes(32)
    assert H(c["empty_root"]) == merkle.EMPTY_ROOT
    assert int(c["credential_forever"]) == C.FOREVER


# -- canonical CBOR -------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["cbor"]["accepted"], ids=lambda c: c["desc"])
def test_cbor_accepted(case: dict[str, Any]) -> None:
    value, data = untyped(case["value"]), H(case["hex"])
    assert encoding.encode(value, check=True) == data
    assert same(encoding.decode(data), value)


@pytest.mark.parametrize("case", VECTORS["cbor"]["rejected"], ids=lambda c: c["desc"])
def test_cbor_rejected(case: dict[str, Any]) -> None:
    kwargs = {"max_size": case["max_size"]} if "max_size" in case else {}
    with pytest.raises(EncodingError):
        encoding.decode(H(case["hex"]), **kwargs)
    # Records are decoded without the data-model walk (their schemas apply it):
    # the canonical-form and tag rules must hold there too.
    if case["desc"].startswith(("byte string map key", "simple value")):
        return  # left to the record's schema when check_model=False
    with pytest.raises(EncodingError):
        encoding.decode(H(case["hex"]), check_model=False, **kwargs)


def test_cbor_without_max_size_accepts_the_oversize_case() -> None:
    (case,) = [c for c in VECTORS["cbor"]["rejected"] if "max_size" in c]
    encoding.decode(H(case["hex"]))


# -- keys and signing -----------------------------------------------------------


@pytest.mark.parametrize("entry", VECTORS["keys"], ids=lambda e: e["name"])
def test_keys(entry: dict[str, Any]) -> None:
    key = KEYS[entry["name"]]
    assert key.public_key.hex() == entry["public_key"]
    assert key.key_id.hex() == entry["key_id"] == keys.key_id(H(entry["public_key"])).hex()
    assert keys.format_public_key(key.public_key, entry["name"]) == entry["trust_line"]


def test_rfc8032_public_key() -> None:
    # RFC 8032 section 7.1, TEST 1: checks the Ed25519 primitive itself.
    assert KEYS["rfc8032-test1"].public_key.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )


def test_trust_file(tmp_path: Path) -> None:
    path = tmp_path / "roots.txt"
    path.write_text("# trusted roots\n\n" + "".join(e["trust_line"] + "\n" for e in VECTORS["keys"]), encoding="utf-8")
    assert keys.read_public_keys(path) == [H(e["public_key"]) for e in VECTORS["keys"]]


def test_key_file(tmp_path: Path) -> None:
    entry = VECTORS["key_file"]
    (seed,) = [k["seed"] for k in VECTORS["keys"] if k["name"] == entry["key"]]
    key = SigningKey.from_seed(H(seed), entry["label"])
    path = key.save(tmp_path / "k.key")
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().hex() == entry["file"]
    assert SigningKey.load(path).public_key == KEYS[entry["key"]].public_key
    with pytest.raises(FileExistsError):
        key.save(path)
    path.chmod(0o640)
    with pytest.raises(KeyFileError):
        SigningKey.load(path)


@pytest.mark.parametrize("entry", VECTORS["signing"], ids=lambda e: e["purpose"])
def test_signing(entry: dict[str, Any]) -> None:
    key, purpose, message = KEYS[entry["key"]], entry["purpose"], H(entry["message"])
    assert keys.signing_input(purpose, message) == H(entry["signing_input"])
    assert H(entry["signing_input"]) == b"gradledger/v1/" + purpose.encode() + b"\x00" + message
    assert key.sign(purpose, message).hex() == entry["signature"]
    keys.verify_signature(key.public_key, purpose, message, H(entry["signature"]))


# -- credentials ----------------------------------------------------------------


@pytest.mark.parametrize("entry", VECTORS["credentials"], ids=lambda e: e["name"])
def test_credential(entry: dict[str, Any]) -> None:
    fields = untyped(entry["credential"])
    issuer, subject = KEYS[entry["issuer_key"]], KEYS[entry["subject_key"]]
    assert fields["public_key"] == subject.public_key and fields["issuer"] == issuer.key_id
    cred = C.issue(
        issuer,
        subject=fields["subject"],
        path=fields["path"],
        role=fields["role"],
        public_key=fields["public_key"],
        not_before=fields["not_before"],
        not_after=fields["not_after"],
    )
    assert encoding.encode(fields) == H(entry["credential_bytes"])
    assert cred.signed.hex() == entry["signed"]
    assert encoding.encode([H(entry["credential_bytes"]), H(entry["signature"])]) == cred.signed
    assert cred.key_id.hex() == entry["key_id"]
    keys.verify_signature(issuer.public_key, "credential", H(entry["credential_bytes"]), H(entry["signature"]))
    assert same(C.parse(H(entry["signed"])).to_map(), fields)


def test_credential_chain() -> None:
    registry = CredentialRegistry(trusted_roots=frozenset(H(r) for r in LEDGER["trusted_roots"]))
    creds = {e["name"]: H(e["signed"]) for e in VECTORS["credentials"]}
    for name in ("root", "trainer", "authority", "source", "witness"):
        registry.add(creds[name], 0 if name != "source" else int(LEDGER["records"][3]["time"]))
    source = C.parse(creds["source"])
    registry.check(source.key_id, source.not_before, ("source",))
    with pytest.raises(C.CredentialError):
        registry.check(source.key_id, source.not_after + 1, ("source",))


# -- the ledger -----------------------------------------------------------------


def _replay(path: Path) -> Ledger:
    ledger = Ledger.create(path)
    for entry in LEDGER["records"]:
        ledger.append(entry["type"], untyped(entry["body"]), KEYS[entry["signer_key"]], time=int(entry["time"]))
    ledger.commit()
    return ledger


def test_ledger_records(tmp_path: Path) -> None:
    ledger = _replay(tmp_path / "ledger")
    try:
        stored = dict(ledger.records())
        assert len(stored) == len(LEDGER["records"]) == LEDGER["final"]["size"]
        leaves = []
        prev = envelope.GENESIS_PREV
        for entry in LEDGER["records"]:
            seq, record = entry["seq"], stored[entry["seq"]]
            assert record.hex() == entry["record"]
            assert encoding.encode([H(entry["envelope"]), H(entry["signature"])]) == record
            expected_envelope = {
                "v": 1,
                "type": entry["type"],
                "seq": seq,
                "prev": prev,
                "time": int(entry["time"]),
                "body": untyped(entry["body"]),
                "signer": KEYS[entry["signer_key"]].key_id,
            }
            assert H(entry["prev"]) == prev
            assert encoding.encode(expected_envelope) == H(entry["envelope"])
            assert KEYS[entry["signer_key"]].sign("envelope", H(entry["envelope"])).hex() == entry["signature"]
            sealed = envelope.unseal(record)
            assert sealed.record_hash.hex() == entry["record_hash"]
            assert sealed.leaf_hash.hex() == entry["leaf_hash"] == merkle.leaf_hash(record).hex()
            leaves.append(sealed.leaf_hash)
            assert merkle.root_of(leaves).hex() == entry["root"]
            assert ledger.root_at(seq + 1).hex() == entry["root"]
            prev = sealed.record_hash
        assert ledger.origin == LEDGER["origin"] == origin_of(stored[0])
        assert ledger.root.hex() == LEDGER["final"]["root"]
        assert ledger.head.hex() == LEDGER["final"]["head"]
        ledger.verify(trusted_roots=[H(r) for r in LEDGER["trusted_roots"]])
    finally:
        ledger.close()


def test_ledger_admission_and_index_keys() -> None:
    state = LedgerState(registry=CredentialRegistry(trusted_roots=frozenset(H(r) for r in LEDGER["trusted_roots"])))
    for entry in LEDGER["records"]:
        admitted = state.admit_record(H(entry["record"]))
        assert list(admitted.keys.authorities) == entry["index"]["authorities"]
        assert list(admitted.keys.sources) == entry["index"]["sources"]
        assert list(admitted.keys.examples) == entry["index"]["examples"]
        assert state.tree.root().hex() == entry["root"]
    assert state.head.hex() == LEDGER["final"]["head"]
    # The same records under a different trust anchor do not admit.
    other = LedgerState(registry=CredentialRegistry(trusted_roots=frozenset({KEYS["witness"].public_key})))
    with pytest.raises(C.CredentialError):
        other.admit_record(H(LEDGER["records"][0]["record"]))


def test_ledger_tree_head_commits_to_every_earlier_record() -> None:
    last = LEDGER["records"][-1]
    body = untyped(last["body"])
    assert last["type"] == "TreeHead"
    assert body["size"] == last["seq"]
    assert body["origin"] == LEDGER["origin"]
    assert body["root"].hex() == LEDGER["records"][last["seq"] - 1]["root"]


def test_inclusion_proofs(tmp_path: Path) -> None:
    ledger = _replay(tmp_path / "ledger")
    try:
        for case in LEDGER["inclusion"]:
            i, n = case["index"], case["size"]
            assert case["leaf_hash"] == LEDGER["records"][i]["leaf_hash"]
            assert case["root"] == LEDGER["records"][n - 1]["root"]
            assert [h.hex() for h in ledger.inclusion_proof(i, n)] == case["proof"]
            merkle.verify_inclusion(H(case["leaf_hash"]), i, n, [H(h) for h in case["proof"]], H(case["root"]))
    finally:
        ledger.close()


def test_consistency_proofs(tmp_path: Path) -> None:
    ledger = _replay(tmp_path / "ledger")
    try:
        for case in LEDGER["consistency"]:
            m, n = case["size1"], case["size2"]
            assert case["root1"] == LEDGER["records"][m - 1]["root"]
            assert case["root2"] == LEDGER["records"][n - 1]["root"]
            assert [h.hex() for h in ledger.consistency_proof(m, n)] == case["proof"]
            merkle.verify_consistency(m, n, [H(h) for h in case["proof"]], H(case["root1"]), H(case["root2"]))
    finally:
        ledger.close()


def test_cosignature() -> None:
    case = LEDGER["cosignature"]
    body = untyped(case["tree_head"])
    assert same(body, untyped(LEDGER["records"][-1]["body"]))
    data = encoding.encode(body)
    assert data.hex() == case["tree_head_bytes"]
    assert keys.signing_input("cosignature", data).hex() == case["signing_input"]
    witness = KEYS[case["witness_key"]]
    assert witness.sign("cosignature", data).hex() == case["signature"]
    keys.verify_signature(witness.public_key, "cosignature", data, H(case["signature"]))

    # The witness module signs and checks exactly these bytes.
    head = envelope.unseal(H(LEDGER["records"][-1]["record"]))
    assert witness_module.head_message(head) == data
    assert witness_module.cosign(head, witness).hex() == case["signature"]
    registry = CredentialRegistry(trusted_roots=frozenset(H(r) for r in LEDGER["trusted_roots"]))
    creds = {e["name"]: H(e["signed"]) for e in VECTORS["credentials"]}
    registry.add(creds["root"], head.time)
    registry.add(creds["witness"], head.time)
    witness_module.verify_cosignature(head, witness.key_id, H(case["signature"]), registry)


def test_generator_reproduces_the_file() -> None:
    spec = importlib.util.spec_from_file_location("spec_vectors_generate", SPECS / "vectors" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render(module.build()) == (SPECS / "vectors" / "ledger-v1.json").read_text(encoding="utf-8")
