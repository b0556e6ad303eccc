"""A vote is signed by its own source, or by an authority over that source on its behalf
(specs/manifests.md §1 and §4, issue 10.8).

Both implementations (training/manifests.py and the verifier's re-implementation) are held to
the rule: on hand-made version-1 manifests, on version-2 manifests whose attestation fields are
edited and re-signed, over random credential trees and signers (hypothesis), and end to end on
a bundle that a hostile trainer rebuilt around a worker-signed manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.ledger import credentials as C
from gradledger.ledger import encoding
from gradledger.ledger.credentials import Credential, CredentialRegistry
from gradledger.ledger.keys import SigningKey
from gradledger.training import manifests as TM
from gradledger.training.dataset import encode_manifests
from gradledger.training.errors import ManifestError
from gradledger.verify._internal import manifests as VM
from gradledger.ledger.merkle import leaf_hash, root_of
from helpers import CROWD_KEY, WORKER_KEYS, make_world
from test_trainer import MANIFESTS, WORKER_CREDS
from test_verify_structure import Item, ListSource, first_failure, honest, items_of, reseal, seq_of, verify

__all__ = ["honest"]  # the honest digits run of test_verify_structure, used as a fixture here

WORLD = make_world()
EXAMPLE = bytes(range(32))


def _key(i: int, label: str) -> SigningKey:
    return SigningKey.from_seed(bytes([113, i]) * 16, label)


# A tree: root -> {a1 -> {s1, s2, a11 -> {s3}}, a2 -> {s4}}, and a trainer beside them.
A1, A2, A11 = _key(1, "a1"), _key(2, "a2"), _key(3, "a11")
S = {name: _key(10 + i, name) for i, name in enumerate(("s1", "s2", "s3", "s4"))}
CRED: dict[str, Credential] = {
    "a1": C.issue(WORLD.root, subject="a1", path="acme/a1", role="authority", public_key=A1.public_key),
    "a2": C.issue(WORLD.root, subject="a2", path="acme/a2", role="authority", public_key=A2.public_key),
    "a11": C.issue(A1, subject="a11", path="acme/a1/a11", role="authority", public_key=A11.public_key),
    "s1": C.issue(A1, subject="s1", path="acme/a1/s1", role="source", public_key=S["s1"].public_key),
    "s2": C.issue(A1, subject="s2", path="acme/a1/s2", role="source", public_key=S["s2"].public_key),
    "s3": C.issue(A11, subject="s3", path="acme/a1/a11/s3", role="source", public_key=S["s3"].public_key),
    "s4": C.issue(A2, subject="s4", path="acme/a2/s4", role="source", public_key=S["s4"].public_key),
}
SIGNERS: dict[str, SigningKey] = {"root": WORLD.root, "trainer": WORLD.trainer, "a1": A1, "a2": A2, "a11": A11, **S}
#: Who is above whom: the reference the implementations are compared with.
ABOVE = {"s1": {"a1", "root"}, "s2": {"a1", "root"}, "s3": {"a11", "a1", "root"}, "s4": {"a2", "root"}}


def registry() -> CredentialRegistry:
    reg = CredentialRegistry(trusted_roots=frozenset({WORLD.root.public_key}))
    for cred in (WORLD.root_cred, WORLD.trainer_cred, CRED["a1"], CRED["a2"], CRED["a11"],
                 *(CRED[s] for s in sorted(S))):
        reg.add(cred.signed, 0)
    return reg


REGISTRY = registry()


def _signed(body: dict[str, Any], key: SigningKey) -> bytes:
    data = encoding.encode(body)
    return encoding.encode([data, key.sign("manifest", data)])


def _body(names: list[str], key: SigningKey, version: int, votes: list[int] | None = None) -> dict[str, Any]:
    """A consistent majority manifest over ``names``; version 2 with the attestations sign_manifest writes."""
    votes = votes or [1] * len(names)
    sources = [TM.source_entry(CRED[n], v, 0.5) for n, v in zip(names, votes)]
    m = TM.label_example(example=EXAMPLE, sources=sources, aggregation="majority", ontology="o",
                         review="accepted", key=key, time=5)
    body = encoding.decode(m.body)
    if version == 1:
        body["v"] = 1
        for src in body["sources"]:
            src.pop("attested_by", None)
    return body


def _verdicts(signed: bytes) -> tuple[str | None, str | None]:
    """(training, verifier): None if valid, else the error text."""
    out: list[str | None] = []
    for parse, check, errors in ((TM.parse_manifest, TM.verify_manifest, ManifestError),
                                 (VM.parse_manifest, VM.verify_manifest, VM.ManifestInvalid)):
        try:
            check(parse(signed), REGISTRY)
            out.append(None)
        except errors as exc:
            out.append(str(exc))
    return out[0], out[1]


# -- version 2: the authority's attestation is recorded and bound -------------------------------


def test_an_authority_signs_on_behalf_of_its_sources_and_says_so() -> None:
    m = TM.parse_manifest(_signed(_body(["s1", "s2", "s3"], A1, 2), A1))
    assert m.manifest["v"] == 2
    assert [src.get("attested_by") for src in m.manifest["sources"]] == [A1.key_id] * 3
    assert _verdicts(m.signed) == (None, None)
    # The root is above every source, so it may attest all of them too.
    assert _verdicts(_signed(_body(["s1", "s3", "s4"], WORLD.root, 2), WORLD.root)) == (None, None)


def test_a_source_signs_its_own_vote_without_attestation() -> None:
    m = TM.parse_manifest(_signed(_body(["s2"], S["s2"], 2), S["s2"]))
    assert "attested_by" not in m.manifest["sources"][0]
    assert _verdicts(m.signed) == (None, None)


@pytest.mark.parametrize("signer", ["s1", "a2", "trainer"])
def test_a_signer_not_over_every_source_is_refused_naming_the_source(signer: str) -> None:
    # s1 may sign its own vote, not s2's; a2 is over none of them; a trainer signs no manifest.
    trainer_msg, verifier_msg = _verdicts(_signed(_body(["s1", "s2"], SIGNERS[signer], 2), SIGNERS[signer]))
    assert trainer_msg is not None and verifier_msg is not None
    who = "'s2'" if signer == "s1" else "'s(1|2)'"
    import re

    assert re.search(f"source {who}", trainer_msg) and re.search(f"source {who}", verifier_msg)


@pytest.mark.parametrize("tamper", ["drop", "other", "on-own-entry"])
def test_attestation_fields_are_bound_to_the_signer(tamper: str) -> None:
    body = _body(["s1", "s2"], A1, 2) if tamper != "on-own-entry" else _body(["s1"], S["s1"], 2)
    src = body["sources"][0]
    if tamper == "drop":
        del src["attested_by"]
    elif tamper == "other":
        src["attested_by"] = WORLD.root.key_id
    else:
        src["attested_by"] = S["s1"].key_id
    key = S["s1"] if tamper == "on-own-entry" else A1
    trainer_msg, verifier_msg = _verdicts(_signed(body, key))
    assert trainer_msg is not None and "attested_by" in trainer_msg
    assert verifier_msg is not None and "attested_by" in verifier_msg


# -- version 1: still read, held to the same rule ----------------------------------------------


def test_version_1_single_source_and_authority_signed_manifests_stay_valid() -> None:
    assert _verdicts(_signed(_body(["s3"], S["s3"], 1), S["s3"])) == (None, None)
    assert _verdicts(_signed(_body(["s3"], A11, 1), A11)) == (None, None)
    assert _verdicts(_signed(_body(["s1", "s2", "s3"], A1, 1), A1)) == (None, None)


def test_version_1_multi_source_signed_by_one_source_is_refused() -> None:
    trainer_msg, verifier_msg = _verdicts(_signed(_body(["s1", "s2"], S["s1"], 1), S["s1"]))
    assert trainer_msg is not None and "'s2'" in trainer_msg
    assert verifier_msg is not None and "'s2'" in verifier_msg


def test_version_1_cannot_carry_attestations_nor_version_3_be_read() -> None:
    body = _body(["s1", "s2"], A1, 2)
    body["v"] = 1
    assert all(msg is not None and "attested_by" in msg for msg in _verdicts(_signed(body, A1)))
    body["v"] = 3
    assert all(msg is not None for msg in _verdicts(_signed(body, A1)))


# -- the two implementations agree with the rule over random manifests ----------------------------


@settings(max_examples=250, deadline=None)
@given(names=st.lists(st.sampled_from(sorted(S)), min_size=1, max_size=4, unique=True),
       signer=st.sampled_from(sorted(SIGNERS)), version=st.sampled_from([1, 2]),
       tamper=st.sampled_from([None, None, "drop", "swap"]), votes=st.lists(st.integers(-1, 2), min_size=4, max_size=4))
def test_trainer_and_verifier_agree_with_the_rule(
    names: list[str], signer: str, version: int, tamper: str | None, votes: list[int]
) -> None:
    if all(v == -1 for v in votes[: len(names)]):
        votes = [0, *votes[1:]]
    key = SIGNERS[signer]
    body = _body(names, key, version, votes[: len(names)])
    tampered = False
    if tamper and version == 2:
        attested = [s for s in body["sources"] if "attested_by" in s]
        if attested and tamper == "drop":
            del attested[0]["attested_by"]
            tampered = True
        elif attested:
            attested[0]["attested_by"] = hashlib.sha256(attested[0]["attested_by"]).digest()
            tampered = True
    rule = all(signer == n or signer in ABOVE[n] for n in names) and signer != "trainer"
    trainer_msg, verifier_msg = _verdicts(_signed(body, key))
    assert (trainer_msg is None) == (verifier_msg is None) == (rule and not tampered), (trainer_msg, verifier_msg)


# -- end to end: a hostile trainer's bundle around a worker-signed manifest -----------------------


def _crowd_index() -> int:
    crowd = {"worker-0", "worker-1"}
    return next(i for i, m in enumerate(MANIFESTS) if {s["source"] for s in m.manifest["sources"]} == crowd)


def _forged_bundle(honest: ListSource, forged: bytes, i: int) -> tuple[ListSource, int]:
    """Manifest ``i`` replaced; the artifact, root, DatasetCommitted and RunStarted rebuilt and
    every record re-signed with the keys that signed them (the trainer's, for these)."""
    signed = [m.signed for m in MANIFESTS]
    signed[i] = forged
    return _rebuilt(honest, signed)


def _rebuilt(honest: ListSource, signed: list[bytes]) -> tuple[ListSource, int]:
    items = items_of(honest.recs)
    k = seq_of(items, "DatasetCommitted")
    artifact = encoding.encode(signed)
    digest = hashlib.sha256(artifact).digest()
    root = root_of([leaf_hash(x) for x in signed])
    items[k] = Item(items[k].type, items[k].time, {**items[k].body, "manifests": digest, "root": root}, items[k].signer)
    for j, it in enumerate(items):
        if it.type == "RunStarted" and "dataset" in it.body["settings"]:
            settings = {**it.body["settings"], "dataset": {**it.body["settings"]["dataset"], "root": root}}
            items[j] = Item(it.type, it.time, {**it.body, "settings": settings}, it.signer)
    return ListSource(reseal(items), {**honest.arts, digest: artifact}), k


@pytest.mark.parametrize("version", [1, 2])
def test_a_worker_who_signs_other_sources_votes_fails_naming_manifest_and_source(
    honest: ListSource, version: int
) -> None:
    i = _crowd_index()
    m = MANIFESTS[i].manifest
    # worker-0 claims that worker-1 and the radiologist dr-a voted with it.
    sources = [TM.source_entry(WORKER_CREDS[0], m["label"], 0.9), TM.source_entry(WORKER_CREDS[1], m["label"], 0.9),
               TM.source_entry(WORLD.source_cred, m["label"], 0.9)]
    one = TM.label_example(example=m["example"], sources=sources, aggregation="majority", ontology=m["ontology"],
                           review="accepted", key=WORKER_KEYS[0], time=m["time"])
    body = encoding.decode(one.body)
    if version == 1:
        body["v"] = 1
        for src in body["sources"]:
            src.pop("attested_by", None)
    source, k = _forged_bundle(honest, _signed(body, WORKER_KEYS[0]), i)
    name, seq, detail = first_failure(source)
    assert (name, seq) == ("dataset", k), detail
    assert f"manifest {i}:" in detail and ("'worker-1'" in detail or "'dr-a'" in detail)


def test_the_crowd_authority_signing_for_its_workers_verifies(honest: ListSource) -> None:
    i = _crowd_index()
    assert [s["attested_by"] for s in MANIFESTS[i].manifest["sources"]] == [CROWD_KEY.key_id] * 2
    report, structure = verify(honest)
    assert structure is not None and report.first_failure is None, report.render()
    # The same rebuild with the honest manifest changes nothing: the forgery above is what fails.
    source, _ = _forged_bundle(honest, MANIFESTS[i].signed, i)
    report, structure = verify(source)
    assert structure is not None and report.first_failure is None, report.render()
    assert encode_manifests(MANIFESTS) == encoding.encode([m.signed for m in MANIFESTS])


# -- the shared vectors: both implementations walk specs/vectors/manifests-v2.json ------------------

VECTORS = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "manifests-v2.json"


def _vector_registry(vectors: dict[str, Any]) -> CredentialRegistry:
    creds = [bytes.fromhex(c["signed"]) for c in vectors["credentials"]]
    root = C.parse(creds[0])
    reg = CredentialRegistry(trusted_roots=frozenset({root.public_key}))
    for signed in creds:
        reg.add(signed, 0)
    return reg


def test_the_vector_file_is_current_and_both_implementations_agree_with_it() -> None:
    import subprocess
    import sys

    generator = VECTORS.parent / "generate_manifests.py"
    assert subprocess.run([sys.executable, str(generator), "--check"], capture_output=True).returncode == 0
    vectors = json.loads(VECTORS.read_text())
    reg = _vector_registry(vectors)
    assert len(vectors["cases"]) >= 10
    for case in vectors["cases"]:
        signed = bytes.fromhex(case["signed"])
        assert hashlib.sha256(signed).hexdigest() == case["digest"]
        for parse, check, errors in ((TM.parse_manifest, TM.verify_manifest, ManifestError),
                                     (VM.parse_manifest, VM.verify_manifest, VM.ManifestInvalid)):
            stage = "parse"
            try:
                m = parse(signed)
                stage = "verify"
                check(m, reg)
            except errors as exc:
                assert not case["valid"], (case["desc"], str(exc))
                assert stage == case["stage"] and case["names"] in str(exc), (case["desc"], stage, str(exc))
            else:
                assert case["valid"], case["desc"]


def test_an_old_ledger_of_version_1_manifests_still_verifies(honest: ListSource) -> None:
    # The same dataset as the reference trainer wrote it before version 2: no attested_by, v 1,
    # signed by the same keys (the radiologist for its own labels, the crowd authority for two
    # workers). specs/manifests.md §7: these stay valid.
    keys = {k.key_id: k for k in (WORLD.source, CROWD_KEY)}
    old = []
    for m in MANIFESTS:
        body = encoding.decode(m.body)
        body["v"] = 1
        for src in body["sources"]:
            src.pop("attested_by", None)
        old.append(_signed(body, keys[m.signer]))
    source, _ = _rebuilt(honest, old)
    report, structure = verify(source)
    assert structure is not None and report.first_failure is None, report.render()
    dataset = structure.datasets[seq_of(items_of(source.recs), "DatasetCommitted")]
    assert all(m.fields["v"] == 1 for m in dataset.manifests)
