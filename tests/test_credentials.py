"""Credential rules (ledger/credentials.py) and signer authorization (ledger/state.py).

Every rule is exercised twice where it can be: directly on a ``CredentialRegistry``
and through ``Ledger.append``, which must refuse exactly as a verifier would and
leave the ledger as it was (size, root, head) and usable. Key files
(ledger/keys.py) are at the end.

The taxonomy comes from ``helpers.make_world``: root ``acme``, trainer
``acme/training``, authority ``acme/radiology``, source ``acme/radiology/attending``.
Ledger times are explicit (``time=``) because ``Ledger.append`` never lets time
run backwards: a time before the last one is silently raised to it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradledger.ledger import credentials as C
from gradledger.ledger import encoding
from gradledger.ledger.credentials import FOREVER, MAY_ISSUE, ROLES, CredentialRegistry
from gradledger.ledger.errors import AuthorizationError, CredentialError, KeyFileError, VerificationError
from gradledger.ledger.keys import SigningKey, read_public_keys, write_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.observations import TYPES

from helpers import World, make_world, update_body

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 100  # genesis time of the ledgers built here


def key(n: int, label: str = "") -> SigningKey:
    """Keys disjoint from make_world's (whose seeds are two alternating bytes)."""
    return SigningKey.from_seed(bytes([0x80 + n]) * 32, label or f"k{n}")


def world_registry(world: World, trusted: frozenset[bytes] | None = None, at: int = T0) -> CredentialRegistry:
    registry = CredentialRegistry(trusted_roots=trusted)
    for cred in (world.root_cred, world.trainer_cred, world.authority_cred, world.source_cred):
        registry.add(cred.signed, at)
    return registry


def forge(signer: SigningKey, *, issuer_id: bytes, purpose: str = "credential", **fields) -> bytes:
    """A signed credential whose ``issuer`` field and signature may disagree."""
    body = {"v": C.CREDENTIAL_VERSION, "not_before": 0, "not_after": FOREVER, "issuer": issuer_id, **fields}
    data = encoding.encode(body)
    return encoding.encode([data, signer.sign(purpose, data)])


# -- ledgers -------------------------------------------------------------------


def new_ledger(path: Path, world: World, t: int = T0) -> Ledger:
    ledger = Ledger.create(path)
    ledger.append("CredentialIssued", {"credential": world.root_cred.signed}, world.root, time=t)
    ledger.append("CredentialIssued", {"credential": world.trainer_cred.signed}, world.root, time=t)
    ledger.append("CredentialIssued", {"credential": world.authority_cred.signed}, world.root, time=t)
    ledger.append("CredentialIssued", {"credential": world.source_cred.signed}, world.authority, time=t)
    ledger.append(
        "RunStarted", {"run_id": "run-1", "environment": {}, "artifacts": {}, "settings": {}}, world.trainer,
        time=t, commit=True,
    )
    return ledger


def state(ledger: Ledger) -> tuple[int, bytes, bytes]:
    return ledger.size, ledger.root, ledger.head


def refused(ledger: Ledger, error: type[Exception], type_name: str, body: dict, signer: SigningKey, time: int):
    """``append`` refuses with exactly ``error`` (or a subclass) and changes nothing."""
    before = state(ledger)
    with pytest.raises(error) as info:
        ledger.append(type_name, body, signer, time=time, commit=True)
    assert state(ledger) == before
    return info.value


def still_usable(ledger: Ledger, world: World, time: int, step: int = 0) -> None:
    size = ledger.size
    ledger.append("GovernedUpdate", update_body(step), world.trainer, time=time, commit=True)
    assert ledger.size == size + 1
    assert ledger.verify(trusted_roots=[world.root.public_key]).size == size + 1


def issued(cred: C.Credential) -> dict:
    return {"credential": cred.signed}


@pytest.fixture
def world() -> World:
    return make_world(7)


@pytest.fixture
def ledger(tmp_path, world):
    led = new_ledger(tmp_path / "ledger", world)
    yield led
    led.close()


# -- issuing: paths --------------------------------------------------------------


ALLOWED_BELOW_RADIOLOGY = ["acme/radiology/x", "acme/radiology/x/y", "acme/radiology/2", "acme/radiology/radiology"]
REFUSED_FOR_RADIOLOGY = [
    "acme/radiology",  # equal
    "acme",  # upward
    "acme/cardiology",  # sideways
    "acme/cardiology/x",  # sideways, below a sibling
    "acme/radiology2",  # prefix but not a child
    "acme/radiology2/x",
    "acme/radiolog",
    "acme/radiology-x",
    "acme/training/x",
    "other/radiology/x",
    "radiology/x",
]


@pytest.mark.parametrize("path", ALLOWED_BELOW_RADIOLOGY)
def test_authority_may_issue_strictly_below_its_path(world, path):
    registry = world_registry(world)
    cred = C.issue(world.authority, subject="s", path=path, role="source", public_key=key(1).public_key)
    assert registry.add(cred.signed, T0).path == path


@pytest.mark.parametrize("path", REFUSED_FOR_RADIOLOGY)
@pytest.mark.parametrize("role", ["source", "authority"])
def test_authority_may_not_issue_outside_strictly_below(world, path, role):
    registry = world_registry(world)
    cred = C.issue(world.authority, subject="s", path=path, role=role, public_key=key(1).public_key)
    with pytest.raises(CredentialError):
        registry.add(cred.signed, T0)
    assert cred.key_id not in registry.by_key_id


@pytest.mark.parametrize("path", ["acme", "acmecorp/x", "acm/x", "other", "other/acme"])
def test_root_may_not_issue_outside_strictly_below(world, path):
    registry = world_registry(world)
    cred = C.issue(world.root, subject="a", path=path, role="authority", public_key=key(1).public_key)
    with pytest.raises(CredentialError):
        registry.add(cred.signed, T0)


segments = st.lists(st.sampled_from(["a", "b", "ab", "a0", "b.c"]), min_size=1, max_size=4)


@SETTINGS
@given(segments, segments, st.booleans())
def test_issuing_path_rule_against_an_independent_check(parent_segs, child_segs, under_root):
    root, authority = key(1, "root"), key(2, "authority")
    registry = CredentialRegistry()
    registry.add(C.issue_root(root, subject="root", path="r").signed, 0)
    parent = "r/" + "/".join(parent_segs)
    registry.add(C.issue(root, subject="auth", path=parent, role="authority", public_key=authority.public_key).signed, 0)
    child = ("r/" if under_root else "") + "/".join(child_segs)
    cred = C.issue(authority, subject="child", path=child, role="source", public_key=key(3).public_key)
    p, c = parent.split("/"), child.split("/")
    strictly_below = len(c) > len(p) and c[: len(p)] == p
    if strictly_below:
        registry.add(cred.signed, 0)
    else:
        with pytest.raises(CredentialError):
            registry.add(cred.signed, 0)


@pytest.mark.parametrize("path", ["acme/radiology", "acme", "acme/cardiology/x", "acme/radiology2", "acme/radiology2/x"])
def test_ledger_refuses_a_credential_outside_its_issuers_path(ledger, world, path):
    cred = C.issue(world.authority, subject="s", path=path, role="source", public_key=key(1).public_key)
    refused(ledger, CredentialError, "CredentialIssued", issued(cred), world.authority, T0 + 1)
    with pytest.raises(CredentialError):
        ledger.credential(cred.key_id)
    still_usable(ledger, world, T0 + 2)


# -- issuing: roles ----------------------------------------------------------------


def test_may_issue_matches_the_design():
    # design.md roles: the root credentials authorities, trainers, witnesses (and
    # sources); authorities credential sources (and sub-authorities); nobody else issues.
    assert MAY_ISSUE["root"] == {"authority", "source", "trainer", "witness"}
    assert MAY_ISSUE["authority"] == {"authority", "source"}
    assert MAY_ISSUE["source"] == MAY_ISSUE["trainer"] == MAY_ISSUE["witness"] == frozenset()
    assert set(MAY_ISSUE) == set(ROLES)


@pytest.mark.parametrize("issuer_role", ["root", "authority", "source", "trainer", "witness"])
@pytest.mark.parametrize("role", ROLES)
def test_role_rules(issuer_role, role):
    root, issuer, subject = key(1, "root"), key(2, "issuer"), key(3, "subject")
    registry = CredentialRegistry()
    registry.add(C.issue_root(root, subject="root", path="r").signed, 0)
    if issuer_role == "root":
        issuer, issuer_path = root, "r"
    else:
        issuer_path = "r/issuer"
        registry.add(
            C.issue(root, subject="issuer", path=issuer_path, role=issuer_role, public_key=issuer.public_key).signed, 0
        )
    cred = C.issue(issuer, subject="subject", path=issuer_path + "/sub", role=role, public_key=subject.public_key)
    if role in MAY_ISSUE[issuer_role]:
        assert registry.add(cred.signed, 0).role == role
    else:
        with pytest.raises(CredentialError):
            registry.add(cred.signed, 0)
        assert subject.key_id not in registry.by_key_id


@pytest.mark.parametrize(
    "issuer_name, role",
    [("source", "source"), ("source", "authority"), ("trainer", "source"), ("trainer", "trainer"),
     ("authority", "trainer"), ("authority", "witness"), ("authority", "root")],
)
def test_ledger_refuses_credentials_the_issuers_role_may_not_issue(ledger, world, issuer_name, role):
    issuer = getattr(world, issuer_name)
    issuer_path = getattr(world, f"{issuer_name}_cred").path
    cred = C.issue(issuer, subject="x", path=issuer_path + "/x", role=role, public_key=key(1).public_key)
    # Recorded by someone allowed to record CredentialIssued: the credential itself is what is wrong.
    recorder = world.authority if issuer_name == "authority" else world.root
    refused(ledger, CredentialError, "CredentialIssued", issued(cred), recorder, T0 + 1)
    still_usable(ledger, world, T0 + 2)


# -- issuing: signatures and roots ------------------------------------------------


def test_forged_credential_signature_refused(world):
    registry = world_registry(world)
    mallory = key(9, "mallory")
    fields = dict(subject="evil", path="acme/radiology/evil", role="source", public_key=key(1).public_key)
    # Claims the authority as issuer, signed by mallory.
    with pytest.raises(CredentialError, match="forged"):
        registry.add(forge(mallory, issuer_id=world.authority.key_id, **fields), T0)
    # Right key, wrong signing domain.
    with pytest.raises(CredentialError):
        registry.add(forge(world.authority, issuer_id=world.authority.key_id, purpose="envelope", **fields), T0)
    # A genuine credential whose body was edited after signing.
    genuine = C.issue(world.authority, public_key=key(1).public_key, **{k: v for k, v in fields.items() if k != "public_key"})
    data, sig = encoding.decode(genuine.signed)
    edited = encoding.decode(data)
    edited["path"] = "acme/radiology/other"
    with pytest.raises(CredentialError):
        registry.add(encoding.encode([encoding.encode(edited), sig]), T0)
    # The genuine one is fine.
    registry.add(genuine.signed, T0)


def test_ledger_refuses_a_forged_credential(ledger, world):
    forged = forge(
        key(9), issuer_id=world.authority.key_id, subject="evil", path="acme/radiology/evil", role="source",
        public_key=key(1).public_key,
    )
    refused(ledger, CredentialError, "CredentialIssued", {"credential": forged}, world.authority, T0 + 1)
    still_usable(ledger, world, T0 + 2)


def test_issuer_must_be_known(world):
    registry = CredentialRegistry()
    registry.add(world.root_cred.signed, 0)
    with pytest.raises(CredentialError):
        registry.add(world.source_cred.signed, 0)  # its issuer (the authority) is not recorded


@pytest.mark.parametrize("role", ["authority", "source", "trainer", "witness"])
def test_self_signed_non_root_refused(role, tmp_path):
    k = key(4)
    cred = C.issue(k, subject="me", path="me", role=role, public_key=k.public_key)
    with pytest.raises(CredentialError):
        CredentialRegistry().add(cred.signed, 0)
    with Ledger.create(tmp_path / "l") as led:
        refused(led, CredentialError, "CredentialIssued", issued(cred), k, T0)
        assert led.size == 0


def test_root_issued_by_another_root_refused(world):
    registry = world_registry(world)
    other = key(5)
    cred = C.issue(world.root, subject="sub-root", path="acme/sub", role="root", public_key=other.public_key)
    with pytest.raises(CredentialError):
        registry.add(cred.signed, T0)


def test_untrusted_root_refused_when_trusted_roots_given(world):
    with pytest.raises(CredentialError, match="trusted"):
        CredentialRegistry(trusted_roots=frozenset({key(1).public_key})).add(world.root_cred.signed, 0)
    with pytest.raises(CredentialError):
        CredentialRegistry(trusted_roots=frozenset()).add(world.root_cred.signed, 0)
    trusted = frozenset({key(1).public_key, world.root.public_key})
    assert world_registry(world, trusted).get(world.source.key_id).subject == "dr-a"


def test_verify_with_trusted_roots_refuses_an_untrusted_root(ledger, world):
    ledger.verify(trusted_roots=[world.root.public_key])
    with pytest.raises(CredentialError) as info:
        ledger.verify(trusted_roots=[key(1).public_key])
    assert info.value.seq == 0


def test_a_key_is_credentialed_once(world):
    registry = world_registry(world)
    again = C.issue(world.root, subject="dr-a-again", path="acme/x", role="source", public_key=world.source.public_key)
    with pytest.raises(CredentialError, match="already"):
        registry.add(again.signed, T0)


def test_recording_the_same_credential_twice_is_consistent(ledger, world):
    path = ledger.path
    try:
        ledger.append("CredentialIssued", issued(world.source_cred), world.authority, time=T0 + 1, commit=True)
    except CredentialError:
        return  # refusing the duplicate is a fine answer
    ledger.close()
    with Ledger.open(path) as reopened:  # ... and so is accepting it, if the ledger stays openable
        reopened.verify()


def test_malformed_credentials_refused(world):
    registry = world_registry(world)
    for junk in (b"", b"\x80", encoding.encode([b"x"]), encoding.encode([b"x", b"y"]), encoding.encode({"a": 1})):
        with pytest.raises(CredentialError):
            registry.add(junk, T0)
    empty_window = C.issue
    with pytest.raises(CredentialError, match="window"):
        empty_window(world.root, subject="w", path="acme/w", role="source", public_key=key(1).public_key,
                     not_before=10, not_after=9)


# -- validity windows -------------------------------------------------------------


windows = st.tuples(st.integers(0, 60), st.integers(0, 60)).map(lambda w: (min(w), max(w)))


@SETTINGS
@given(windows, windows, windows, st.integers(0, 60), st.integers(0, 60))
def test_windows_apply_along_the_whole_chain(root_w, auth_w, source_w, add_at, at):
    root, authority, source = key(1), key(2), key(3)
    registry = CredentialRegistry()
    registry.add(C.issue_root(root, subject="root", path="r", not_before=root_w[0], not_after=root_w[1]).signed, root_w[0])
    registry.add(
        C.issue(root, subject="auth", path="r/a", role="authority", public_key=authority.public_key,
                not_before=auth_w[0], not_after=auth_w[1]).signed,
        root_w[0],
    )
    cred = C.issue(authority, subject="src", path="r/a/s", role="source", public_key=source.public_key,
                   not_before=source_w[0], not_after=source_w[1])

    def inside(w, t):
        return w[0] <= t <= w[1]

    # Issuing needs the issuer (and every issuer above it) valid at the time of recording.
    if inside(root_w, add_at) and inside(auth_w, add_at):
        registry.add(cred.signed, add_at)
    else:
        with pytest.raises(CredentialError):
            registry.add(cred.signed, add_at)
        return
    # Using a credential needs it and its whole chain valid then.
    if inside(root_w, at) and inside(auth_w, at) and inside(source_w, at):
        assert registry.check(source.key_id, at, ("source",)).subject == "src"
    else:
        with pytest.raises(CredentialError):
            registry.check(source.key_id, at, ("source",))


def test_trainer_used_before_not_before_or_after_not_after(tmp_path):
    world = make_world(8)
    trainer = key(6, "trainer-2")
    cred = C.issue(world.root, subject="trainer-2", path="acme/training2", role="trainer",
                   public_key=trainer.public_key, not_before=1_000, not_after=2_000)
    with new_ledger(tmp_path / "l", world) as led:
        led.append("CredentialIssued", issued(cred), world.root, time=T0 + 1, commit=True)
        refused(led, CredentialError, "GovernedUpdate", update_body(0), trainer, 999)
        led.append("GovernedUpdate", update_body(1), trainer, time=1_000, commit=True)
        led.append("GovernedUpdate", update_body(2), trainer, time=2_000, commit=True)
        refused(led, CredentialError, "GovernedUpdate", update_body(3), trainer, 2_001)
        still_usable(led, world, 2_002)


def test_credential_recorded_outside_its_issuers_window_refused(tmp_path):
    world = make_world(9)
    authority = key(7, "late")
    auth_cred = C.issue(world.root, subject="late", path="acme/late", role="authority",
                        public_key=authority.public_key, not_before=500, not_after=600)
    source_cred = C.issue(authority, subject="s", path="acme/late/s", role="source", public_key=key(8).public_key)
    with new_ledger(tmp_path / "l", world) as led:
        led.append("CredentialIssued", issued(auth_cred), world.root, time=T0 + 1, commit=True)
        refused(led, CredentialError, "CredentialIssued", issued(source_cred), world.root, 400)
        led.append("CredentialIssued", issued(source_cred), world.root, time=550, commit=True)
        led.verify()


# -- revocation ---------------------------------------------------------------------


def revoke_body(cred: C.Credential, reason: str = "test") -> dict:
    return {"key_id": cred.key_id, "reason": reason}


def test_registry_revocation_rights(world):
    cardiology = key(1, "cardiology")
    registry = world_registry(world)
    card = C.issue(world.root, subject="cardiology", path="acme/cardiology", role="authority",
                   public_key=cardiology.public_key)
    registry.add(card.signed, T0)
    # Another authority may not revoke radiology's source.
    with pytest.raises(CredentialError):
        registry.revoke(world.source.key_id, T0 + 1, cardiology.key_id)
    # Trainers and sources may not revoke at all.
    with pytest.raises(AuthorizationError):
        registry.revoke(world.source.key_id, T0 + 1, world.trainer.key_id)
    with pytest.raises(AuthorizationError):
        registry.revoke(world.source.key_id, T0 + 1, world.source.key_id)
    # An authority may not revoke its sibling authority (only the root may).
    with pytest.raises(CredentialError):
        registry.revoke(cardiology.key_id, T0 + 1, world.authority.key_id)
    assert registry.revoked_at == {}
    # The issuing authority may.
    registry.revoke(world.source.key_id, T0 + 1, world.authority.key_id)
    with pytest.raises(CredentialError, match="already"):
        registry.revoke(world.source.key_id, T0 + 2, world.root.key_id)
    # The root may revoke anything.
    registry.revoke(cardiology.key_id, T0 + 3, world.root.key_id)
    assert registry.revoked_at == {world.source.key_id: T0 + 1, cardiology.key_id: T0 + 3}


@SETTINGS
@given(st.integers(0, 100), st.integers(0, 100), st.booleans())
def test_revoked_authority_invalidates_its_sources_from_then_on(revoked, at, revoke_source_instead):
    world = make_world(10)
    registry = world_registry(world, at=0)
    target = world.source if revoke_source_instead else world.authority
    registry.revoke(target.key_id, revoked, world.root.key_id)
    if at < revoked:
        assert registry.check(world.source.key_id, at, ("source",)).subject == "dr-a"
    else:
        with pytest.raises(CredentialError, match="revoked"):
            registry.check(world.source.key_id, at, ("source",))
    # The root and the trainer are untouched either way.
    registry.check(world.trainer.key_id, at, ("trainer",))


def test_revoked_trainer_refused_after_but_earlier_records_verify(ledger, world):
    ledger.append("GovernedUpdate", update_body(0), world.trainer, time=200, commit=True)
    ledger.append("CredentialRevoked", revoke_body(world.trainer_cred), world.root, time=300, commit=True)
    refused(ledger, CredentialError, "GovernedUpdate", update_body(1), world.trainer, 300)
    refused(ledger, CredentialError, "GovernedUpdate", update_body(1), world.trainer, 10_000)
    report = ledger.verify(trusted_roots=[world.root.public_key])
    assert report.counts["GovernedUpdate"] == 1 and report.counts["CredentialRevoked"] == 1


def test_only_root_or_issuing_authority_may_revoke_through_the_ledger(ledger, world):
    cardiology = key(1, "cardiology")
    card = C.issue(world.root, subject="cardiology", path="acme/cardiology", role="authority",
                   public_key=cardiology.public_key)
    ledger.append("CredentialIssued", issued(card), world.root, time=T0 + 1, commit=True)
    refused(ledger, CredentialError, "CredentialRevoked", revoke_body(world.source_cred), cardiology, T0 + 2)
    refused(ledger, CredentialError, "CredentialRevoked", revoke_body(card), world.authority, T0 + 2)
    refused(ledger, AuthorizationError, "CredentialRevoked", revoke_body(world.source_cred), world.trainer, T0 + 2)
    refused(ledger, AuthorizationError, "CredentialRevoked", revoke_body(world.source_cred), world.source, T0 + 2)
    still_usable(ledger, world, T0 + 3)
    ledger.append("CredentialRevoked", revoke_body(world.source_cred), world.authority, time=T0 + 4, commit=True)
    refused(ledger, CredentialError, "CredentialRevoked", revoke_body(world.source_cred), world.root, T0 + 5)
    ledger.verify()


def test_revoked_authority_cannot_act_nor_its_sub_authorities(ledger, world):
    sub = key(2, "sub")
    sub_cred = C.issue(world.authority, subject="sub", path="acme/radiology/sub", role="authority",
                       public_key=sub.public_key)
    ledger.append("CredentialIssued", issued(sub_cred), world.authority, time=200, commit=True)
    early = C.issue(sub, subject="early", path="acme/radiology/sub/early", role="source", public_key=key(3).public_key)
    ledger.append("CredentialIssued", issued(early), sub, time=250, commit=True)
    ledger.append("CredentialRevoked", revoke_body(world.authority_cred), world.root, time=300, commit=True)

    late = C.issue(sub, subject="late", path="acme/radiology/sub/late", role="source", public_key=key(4).public_key)
    refused(ledger, CredentialError, "CredentialIssued", issued(late), sub, 300)  # sub's chain is revoked
    refused(ledger, CredentialError, "CredentialIssued", issued(late), world.root, 300)  # the issuer is invalid
    direct = C.issue(world.authority, subject="d", path="acme/radiology/d", role="source", public_key=key(5).public_key)
    refused(ledger, CredentialError, "CredentialIssued", issued(direct), world.root, 400)
    refused(ledger, CredentialError, "CredentialRevoked", revoke_body(world.source_cred), world.authority, 400)
    assert ledger.registry.check(world.source.key_id, 299, ("source",))
    with pytest.raises(CredentialError):
        ledger.registry.check(world.source.key_id, 300, ("source",))
    with pytest.raises(CredentialError):
        ledger.registry.check(key(3).key_id, 300, ("source",))
    still_usable(ledger, world, 500)  # the earlier records by the authority and sub still verify


# -- signer authorization per observation type -------------------------------------


def bodies(world: World) -> dict[str, dict]:
    return {
        "RunStarted": {"run_id": "r", "environment": {}, "artifacts": {}, "settings": {}},
        "CredentialIssued": issued(C.issue(world.root, subject="n", path="acme/n", role="source",
                                           public_key=key(1).public_key)),
        "CredentialRevoked": revoke_body(world.source_cred),
        "PolicyAdopted": {"policy": b"policy", "digest": hashlib.sha256(b"policy").digest()},
        "DatasetCommitted": {"name": "ds", "root": b"r" * 32, "count": 10, "manifests": b"m" * 32},
        "GovernedUpdate": update_body(0),
        "Checkpoint": {"step": 0, "digest": b"c" * 32, "tensors": {}, "artifact": b"a" * 32},
        "TreeHead": {"origin": "o", "size": 5, "root": b"t" * 32},
        "SourceRetired": {"source": "dr-a", "key_id": world.source.key_id, "reason": "r"},
        "UnlearningCertificate": {
            "source": "dr-a", "mode": "exact", "rewind_checkpoint": b"1" * 32, "original_head": b"2" * 32,
            "new_head": b"3" * 32, "removed": b"4" * 32, "relabeled": b"5" * 32,
        },
        "ForensicTrace": {
            "format": 1, "run": 0, "method": "loss-trace", "parameters": {"top": 3, "self_influence": False},
            "result": {"sources": [], "examples": []}, "result_digest": b"6" * 32,
        },
        "MemorizationScan": {
            "format": 1, "run": 0, "through": 1, "method": "lt-iqr", "parameters": {"fraction": 0.01, "min_trace": 4},
            "scored": 0, "flagged": [], "scores_digest": b"7" * 32,
        },
        "DepthProfile": {
            "format": 1, "run": 0, "step": 0, "dataset": 0, "method": "ncm-entropy", "parameters": {"temperature": 0.2},
            "classes": [0, 1], "counts": [1, 1], "entropy": [[0.5, 0.5]], "mean": [0.5],
        },
        "PrivacySpent": {
            "format": 1, "run": 0, "step": 4, "accountant": "rdp", "delta": 1e-5, "epsilon": 1.5, "bands": [1.5, None],
            "rules": [None, 1.5], "prv": 1.4,
        },
    }


def test_every_type_has_a_body_here(world):
    assert set(bodies(world)) == set(TYPES)


def test_signer_roles_match_the_design():
    assert TYPES["GovernedUpdate"].signers == {"trainer"}
    assert TYPES["PolicyAdopted"].signers == {"root"}
    assert "trainer" not in TYPES["CredentialRevoked"].signers
    assert "trainer" not in TYPES["SourceRetired"].signers
    for kind in TYPES.values():
        assert not kind.signers & {"source", "witness"}, kind.name


FORBIDDEN_SIGNERS = [
    (type_name, role)
    for type_name in sorted(TYPES)
    for role in ("root", "authority", "source", "trainer", "witness")
    if role not in TYPES[type_name].signers  # allowed pairs are tested with their own rules
]


@pytest.mark.parametrize(("type_name", "role"), FORBIDDEN_SIGNERS)
def test_signer_must_hold_a_role_allowed_for_the_type(tmp_path, type_name, role):
    world = make_world(11)
    with new_ledger(tmp_path / "l", world) as led:
        witness = key(3, "witness")
        led.append("CredentialIssued", issued(C.issue(world.root, subject="w", path="acme/witness", role="witness",
                                                      public_key=witness.public_key)), world.root, time=T0, commit=True)
        signer = {"root": world.root, "authority": world.authority, "source": world.source,
                  "trainer": world.trainer, "witness": witness}[role]
        refused(led, AuthorizationError, type_name, bodies(world)[type_name], signer, T0 + 1)
        still_usable(led, world, T0 + 2)


def test_uncredentialed_signer_refused(ledger, world):
    refused(ledger, CredentialError, "GovernedUpdate", update_body(0), key(9), T0 + 1)
    still_usable(ledger, world, T0 + 2)


def test_allowed_signers_are_accepted(ledger, world):
    b = bodies(world)
    ledger.append("PolicyAdopted", b["PolicyAdopted"], world.root, time=T0 + 1)
    ledger.append("DatasetCommitted", b["DatasetCommitted"], world.trainer, time=T0 + 1)
    ledger.append("CredentialIssued", b["CredentialIssued"], world.trainer, time=T0 + 1)
    ledger.append("Checkpoint", b["Checkpoint"], world.trainer, time=T0 + 1, commit=True)
    ledger.tree_head(world.trainer)
    ledger.verify(trusted_roots=[world.root.public_key])


# -- SourceRetired ------------------------------------------------------------------


def retire_body(world: World, source: str = "dr-a", kid: bytes | None = None) -> dict:
    return {"source": source, "key_id": world.source.key_id if kid is None else kid, "reason": "bad heuristic"}


@pytest.mark.parametrize("who", ["root", "authority"])
def test_source_retired_by_root_or_its_issuing_authority(ledger, world, who):
    ledger.append("SourceRetired", retire_body(world), getattr(world, who), time=T0 + 1, commit=True)
    assert ledger.by_source("dr-a")[-1] == ledger.size - 1
    ledger.verify(trusted_roots=[world.root.public_key])


def test_source_retired_refusals(ledger, world):
    cardiology = key(1, "cardiology")
    ledger.append("CredentialIssued", issued(C.issue(world.root, subject="cardiology", path="acme/cardiology",
                                                     role="authority", public_key=cardiology.public_key)),
                  world.root, time=T0 + 1, commit=True)
    # Another authority: not the issuer, not a root.
    refused(ledger, AuthorizationError, "SourceRetired", retire_body(world), cardiology, T0 + 2)
    # Roles that may not sign SourceRetired at all.
    refused(ledger, AuthorizationError, "SourceRetired", retire_body(world), world.trainer, T0 + 2)
    refused(ledger, AuthorizationError, "SourceRetired", retire_body(world), world.source, T0 + 2)
    # The body must name the source credential it retires.
    refused(ledger, CredentialError, "SourceRetired", retire_body(world, source="dr-b"), world.root, T0 + 2)
    refused(ledger, CredentialError, "SourceRetired", retire_body(world, kid=world.trainer.key_id), world.root, T0 + 2)
    refused(ledger, CredentialError, "SourceRetired", retire_body(world, kid=key(9).key_id), world.root, T0 + 2)
    still_usable(ledger, world, T0 + 3)


# -- refusals leave pending work intact ------------------------------------------------


def test_refused_append_does_not_leak_into_pending_state(ledger, world):
    ledger.append("GovernedUpdate", update_body(0), world.trainer, time=T0 + 1)  # pending, not committed
    rogue = key(9, "rogue")
    rogue_root = C.issue_root(rogue, subject="rogue", path="rogue", not_before=1_000)
    refused(ledger, CredentialError, "CredentialIssued", issued(rogue_root), rogue, T0 + 2)
    with pytest.raises(CredentialError):
        ledger.append("PolicyAdopted", {"policy": b"p", "digest": b"d" * 32}, rogue, time=2_000)
    ledger.commit()
    ledger.verify()


def test_refusal_with_pending_records_keeps_them(ledger, world):
    size = ledger.size
    ledger.append("GovernedUpdate", update_body(0), world.trainer, time=T0 + 1)
    refused(ledger, AuthorizationError, "GovernedUpdate", update_body(1), world.root, T0 + 1)
    refused(ledger, CredentialError, "GovernedUpdate", update_body(1), key(9), T0 + 1)
    ledger.append("GovernedUpdate", update_body(2), world.trainer, time=T0 + 1, commit=True)
    assert ledger.size == size + 2
    assert ledger.verify().counts["GovernedUpdate"] == 2


# -- key files -----------------------------------------------------------------------


def test_save_creates_an_owner_only_file_whatever_the_umask(tmp_path):
    k = key(1, "alice")
    old = os.umask(0)
    try:
        path = k.save(tmp_path / "alice.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SigningKey.load(path)
    assert loaded.public_key == k.public_key and loaded.label == "alice"
    sig = loaded.sign("manifest", b"m")
    assert sig == k.sign("manifest", b"m")


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k.key"
    path.write_bytes(b"precious")
    with pytest.raises((FileExistsError, KeyFileError)):
        key(1).save(path)
    assert path.read_bytes() == b"precious"
    key(2).save(tmp_path / "k2.key")
    with pytest.raises((FileExistsError, KeyFileError)):
        key(3).save(tmp_path / "k2.key")
    assert SigningKey.load(tmp_path / "k2.key").public_key == key(2).public_key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620, 0o602, 0o610, 0o601, 0o666, 0o777])
def test_load_refuses_a_file_others_can_access(tmp_path, mode):
    path = key(1).save(tmp_path / "k.key")
    path.chmod(mode)
    with pytest.raises(KeyFileError):
        SigningKey.load(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_owner_only_modes(tmp_path, mode):
    path = key(1).save(tmp_path / "k.key")
    path.chmod(mode)
    assert SigningKey.load(path).public_key == key(1).public_key


@pytest.mark.parametrize(
    "content",
    [
        b"", b"garbage", encoding.encode({"kind": "other", "label": "", "seed": bytes(32)}),
        encoding.encode({"kind": "gradledger-ed25519-private-key", "label": "", "seed": bytes(31)}),
        encoding.encode({"kind": "gradledger-ed25519-private-key", "label": 5, "seed": bytes(32)}),
        encoding.encode({"kind": "gradledger-ed25519-private-key", "seed": bytes(32)}),
        encoding.encode([1, 2]), b"\x00" * 5000,
    ],
)
def test_load_refuses_malformed_key_files(tmp_path, content):
    path = tmp_path / "k.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        SigningKey.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(KeyFileError):
        SigningKey.load(tmp_path / "absent.key")


@SETTINGS
@given(st.binary(min_size=32, max_size=32), st.text(max_size=20))
def test_repr_never_shows_the_secret(seed, label):
    k = SigningKey.from_seed(seed, label)
    for shown in (repr(k), str(k), f"{k}", f"{k!r}", repr([k]), repr({"k": k})):
        assert seed.hex() not in shown.lower()
        assert seed.hex().upper() not in shown
        assert repr(seed) not in shown


comments = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\x85"), max_size=20
)


@SETTINGS
@given(st.lists(st.tuples(st.binary(min_size=32, max_size=32), comments), min_size=1, max_size=6))
def test_public_key_files_round_trip(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("pk") / "trusted.pub"
    write_public_keys(path, entries)
    assert read_public_keys(path) == [k for k, _ in entries]


def test_public_key_files_ignore_comments_and_blank_lines(tmp_path):
    a, b = key(1).public_key, key(2).public_key
    path = tmp_path / "t.pub"
    path.write_text(f"# roots\n\n  ed25519:{a.hex()}  acme root\n\t\n# ed25519:zz\ned25519:{b.hex()}\n")
    assert read_public_keys(path) == [a, b]


@pytest.mark.parametrize(
    "line",
    [
        "ed25519:" + "ab" * 31,  # short
        "ed25519:" + "ab" * 33,  # long
        "ed25519:" + "zz" * 32,  # not hex
        "ed25519:" + "ab" * 31 + "a",  # odd length
        "ed25519: " + "ab" * 32,  # space after the colon
        "ED25519:" + "ab" * 32,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB",
        "ab" * 32,
        "ed25519",
        "x ed25519:" + "ab" * 32,
    ],
)
def test_public_key_files_reject_malformed_lines(tmp_path, line):
    path = tmp_path / "t.pub"
    path.write_text(f"ed25519:{key(1).public_key.hex()}\n{line}\n")
    with pytest.raises(KeyFileError, match=":2:"):
        read_public_keys(path)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"# only a comment\n", b"\xff\xfe not utf-8"])
def test_public_key_files_need_a_key(tmp_path, content):
    path = tmp_path / "t.pub"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        read_public_keys(path)
    with pytest.raises(KeyFileError):
        read_public_keys(tmp_path / "absent.pub")


@pytest.mark.parametrize("comment", ["acme\nroot", "acme\rroot", "acme\x85root", "acme\u2028root"])
def test_public_key_file_comment_with_a_line_break(tmp_path, comment):
    path = tmp_path / "t.pub"
    k = key(1).public_key
    try:
        write_public_keys(path, [(k, comment)])
    except (KeyFileError, ValueError):
        return  # refusing to write it is a fine answer
    assert read_public_keys(path) == [k]


def test_policy_digest_must_match_the_policy(ledger, world):
    size = ledger.size
    with pytest.raises(VerificationError, match="SHA-256 of the policy"):
        ledger.append("PolicyAdopted", {"policy": b"policy", "digest": b"d" * 32}, world.root)
    assert ledger.size == size


def test_a_root_may_revoke_only_in_its_own_tree():
    from gradledger.ledger.credentials import CredentialRegistry, issue, issue_root
    from gradledger.ledger.keys import SigningKey

    acme, other = SigningKey.generate(), SigningKey.generate()
    worker = SigningKey.generate()
    registry = CredentialRegistry()
    registry.add(issue_root(acme, subject="acme", path="acme").signed, 1)
    registry.add(issue_root(other, subject="other", path="other").signed, 1)
    cred = registry.add(issue(acme, subject="w", path="acme/w", role="source", public_key=worker.public_key).signed, 1)
    with pytest.raises(CredentialError):
        registry.revoke(cred.key_id, 2, other.key_id)
    registry.revoke(cred.key_id, 2, acme.key_id)
    assert registry.revoked_at[cred.key_id] == 2


def test_names_and_index_keys_are_bounded(ledger, world):
    from helpers import update_body

    size = ledger.size
    for bad in ({"authority_writes": {"acme/" + "a" * 300: [1.0, 1.0, 0.0]}},
                {"authority_writes": {"Not A Path": [1.0, 1.0, 0.0]}},
                {"sources": ["x" * 300]},
                {"sources": ["bad\x00name"]},
                {"lr": 2**70}):
        with pytest.raises(VerificationError):
            ledger.append("GovernedUpdate", {**update_body(0), **bad}, world.trainer)
    assert ledger.size == size
