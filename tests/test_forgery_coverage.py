"""Forgery coverage in CI (issue 10, "Systematic coverage"): a subset of bench/forgery.py's catalogue.

One honest demo bundle (training/demo.py's stages, 6 steps, retirement and exact unlearning) is
decoded by tests/forging.py and forged as a hostile trainer would (trainer key only; every
trainer record re-signed, chain, tree heads and bundle rebuilt; artifacts' digests re-derived
and the records naming them rewritten). Each forgery must be refused by the verifier with
``--replay full``: a failed check (exit 1) or unusable input (exit 2), never VERIFIED and never
an unexpected exception. The subset spans every record type and artifact kind of the bundle.

Forgeries the issues report as accepted today are marked ``xfail(strict=True)``: the mark turns
into a failure when the fix lands, telling whoever landed it to remove the mark.
"""

from __future__ import annotations

from typing import Any

import pytest

import forging as F
from gradledger.ledger.bundle import Bundle
from gradledger.ledger.keys import read_public_keys
from gradledger.verify import VerificationPolicy, Verifier


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("forgery")
    d = F.build_demo(base / "demo", steps=6, checkpoint_every=3, trace=True)
    forge = F.Forge.from_bundle(d.bundle)
    # --check-traces: the bundle's ForensicTrace is recomputed, so a forged answer is caught.
    verifier = Verifier(read_public_keys(d.roots), VerificationPolicy(replay="full", check_traces=True))
    return {"demo": d, "forge": forge, "verifier": verifier, "work": base,
            "catalogue": {f.name: f for f in F.catalogue(forge)}}


def _xfail_if_known(name: str) -> Any:
    """The mark for a forgery an issue lists as accepted today (forging.py ``KNOWN_ACCEPTED``)."""
    issue = KNOWN.get(name)
    if issue is None:
        return name
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"issue {issue}, fix in progress"))


#: QUICK_NAMES entries that an issue reports as accepted today, with the issue item.
KNOWN: dict[str, str] = {}


def test_the_honest_round_trip_is_byte_identical_and_verifies(demo: dict[str, Any]) -> None:
    """Decoding and rebuilding with no change gives the honest bundle back, so a forgery fails for its change."""
    forge = demo["forge"]
    with Bundle.open(demo["demo"].bundle) as b:
        honest = [bytes(r) for _, r in b.records()]
    assert forge.clone().sealed() == honest
    assert forge.clone().bundle_bytes() == demo["demo"].bundle.read_bytes()
    outcome = F.verify_forgery(F.Forgery("round trip", "all", lambda g: None), forge, demo["verifier"], demo["work"])
    assert outcome.verdict == "accepted", outcome.detail


def test_a_re_signed_honest_change_still_verifies(demo: dict[str, Any]) -> None:
    """The forger's re-signing is sound: records re-chained and re-signed after a no-op re-encoding of a
    trainer record (a later time stamp, which admission allows) still verify."""
    forge = demo["forge"].clone()
    k = forge.seqs("UnlearningCertificate")[0]
    forge.recs[k].time += 1  # every later trainer record is re-signed and the tree heads recomputed
    assert forge.sealed()[k] != demo["forge"].sealed()[k]
    outcome = F.verify_forgery(F.Forgery("re-signed", "all", lambda g: None), forge, demo["verifier"], demo["work"])
    assert outcome.verdict == "accepted", outcome.detail


def test_a_manifest_re_signed_by_the_workers_authority_still_verifies(demo: dict[str, Any]) -> None:
    """The control of the colluding-source forgery (issue 10.8): the same votes attested by the crowd
    authority, which may sign on its workers' behalf, verify; so the forgery fails for its signer."""
    forge = demo["forge"].clone()
    F._colluding_manifest(forge, forge.first("DatasetCommitted"), 2, signer="crowd")
    outcome = F.verify_forgery(F.Forgery("control", "all", lambda g: None), forge, demo["verifier"], demo["work"])
    assert outcome.verdict == "accepted", outcome.detail


def test_the_subset_spans_every_record_type_and_artifact_kind(demo: dict[str, Any]) -> None:
    subset = F.quick(list(demo["catalogue"].values()) + F.lr_catalogue(demo["forge"])
                     + F.ungated_catalogue(demo["forge"]))
    present = {r.type for r in demo["forge"].recs}
    targets = {f.target for f in subset}
    assert present <= targets, present - targets
    assert {"artifact:program", "artifact:manifests", "artifact:inputs", "artifact:checkpoint",
            "artifact:removed", "header"} <= targets
    assert set(KNOWN) <= set(F.QUICK_NAMES)
    # The marks follow the catalogue's own record of which issue item reports each as accepted.
    assert {n: demo["catalogue"][n].issue for n in KNOWN} == {n: i.split(" ")[0] if i[0] != "9" else "9.header"
                                                             for n, i in KNOWN.items()}


OTHER_BASES = ("trained at", "an ungated")


@pytest.mark.parametrize("name", [_xfail_if_known(n) for n in F.QUICK_NAMES if not n.startswith(OTHER_BASES)])
def test_a_forgery_is_refused(demo: dict[str, Any], name: str) -> None:
    forgery = demo["catalogue"][name]
    outcome = F.verify_forgery(forgery, demo["forge"], demo["verifier"], demo["work"])
    assert outcome.verdict == "rejected", f"{name}: {outcome.verdict}: {outcome.detail}"


def test_a_run_trained_at_another_lr_recorded_as_the_advertised_one_is_refused(demo: dict[str, Any]) -> None:
    """Issue 10.6: trained at lr 0.05, every recorded lr (settings, steps, checkpoint state) says 0.01."""
    d = F.build_demo(demo["work"] / "lr", steps=3, checkpoint_every=3, lr=0.05)
    forge = F.Forge.from_bundle(d.bundle)
    verifier = Verifier(read_public_keys(d.roots), VerificationPolicy(replay="full"))
    (disguise, _) = F.lr_catalogue(forge)
    outcome = F.verify_forgery(disguise, forge, verifier, demo["work"])
    assert outcome.verdict == "rejected", outcome.detail


def test_an_ungated_run_with_honest_routing_records_is_refused(demo: dict[str, Any]) -> None:
    """Issue 10.1: trained and exported with the gate off; crowd examples write into the embedding band."""
    d = F.build_demo(demo["work"] / "ungated", steps=3, checkpoint_every=3, ungated=True)
    forge = F.Forge.from_bundle(d.bundle)
    verifier = Verifier(read_public_keys(d.roots), VerificationPolicy(replay="full"))
    (ungated,) = F.ungated_catalogue(forge)
    outcome = F.verify_forgery(ungated, forge, verifier, demo["work"])
    assert outcome.verdict == "rejected", outcome.detail
