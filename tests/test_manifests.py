"""Manifests: aggregation properties, signing round trips, tampering and the vote rule (specs/manifests.md §4)."""

from __future__ import annotations

import hashlib
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.ledger import encoding
from gradledger.ledger import credentials as C
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.keys import SigningKey
from gradledger.training.errors import DatasetError, ManifestError
from gradledger.training.manifests import (
    aggregate,
    example_id,
    label_example,
    parse_manifest,
    relabel_without,
    sign_manifest,
    source_entry,
    verify_manifest,
)
from helpers import make_world

WORLD = make_world()
EXAMPLE = example_id(np.arange(12, dtype=np.float32).reshape(3, 4))


def _key(i: int, label: str) -> SigningKey:
    return SigningKey.from_seed(bytes([77, i]) * 16, label)


LF_B, LF_C = _key(1, "lf-b"), _key(2, "lf-c")
OTHER_AUTHORITY = _key(3, "other")
LF_B_CRED = C.issue(WORLD.authority, subject="lf-b", path="acme/radiology/lf-b", role="source", public_key=LF_B.public_key)
LF_C_CRED = C.issue(WORLD.authority, subject="lf-c", path="acme/radiology/lf-c", role="source", public_key=LF_C.public_key)
OTHER_CRED = C.issue(WORLD.root, subject="other", path="acme/other", role="authority", public_key=OTHER_AUTHORITY.public_key)


def registry() -> CredentialRegistry:
    reg = CredentialRegistry(trusted_roots=frozenset({WORLD.root.public_key}))
    for cred in (WORLD.root_cred, WORLD.trainer_cred, WORLD.authority_cred, WORLD.source_cred, LF_B_CRED, LF_C_CRED, OTHER_CRED):
        reg.add(cred.signed, 0)
    return reg


def two_source_manifest(key: SigningKey, time: int = 100, **overrides: Any) -> Any:
    fields: dict[str, Any] = dict(
        example=EXAMPLE,
        sources=[source_entry(WORLD.source_cred, 1, 0.9), source_entry(LF_B_CRED, 1, 0.6)],
        aggregation="majority",
        ontology="chest-xray/v3",
        review="accepted",
        key=key,
        time=time,
    )
    fields.update(overrides)
    return label_example(**fields)


# -- aggregation ------------------------------------------------------------

confidences = st.one_of(st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0))
source_lists = st.lists(
    st.tuples(st.integers(-1, 4), confidences), min_size=1, max_size=9
).filter(lambda xs: any(v != -1 for v, _ in xs))


def as_sources(pairs: list[tuple[int, float]]) -> list[dict[str, Any]]:
    return [{"source": f"s{i}", "key_id": bytes([i]) * 32, "vote": v, "confidence": c + 0.0} for i, (v, c) in enumerate(pairs)]


def reference_majority(pairs: list[tuple[int, float]]) -> tuple[int, float, float]:
    votes = [(v, Fraction(c)) for v, c in pairs if v != -1]
    total = sum((c for _, c in votes), Fraction(0))
    classes = sorted({v for v, _ in votes})
    if total == 0:
        score = {k: Fraction(sum(1 for v, _ in votes if v == k)) for k in classes}
    else:
        score = {k: sum((c for v, c in votes if v == k), Fraction(0)) for k in classes}
    best = max(score.values())
    label = min(k for k in classes if score[k] == best)
    confidence = 0.0 if total == 0 else float(score[label] / total)
    return label, sum(1 for v, _ in votes if v == label) / len(votes), confidence


@settings(max_examples=300, deadline=None)
@given(source_lists, st.randoms(use_true_random=False))
def test_majority_matches_reference_and_ignores_order(pairs: list[tuple[int, float]], rnd: Any) -> None:
    sources = as_sources(pairs)
    first = aggregate(sources, "majority")
    assert first == aggregate(sources, "majority")
    shuffled = list(sources)
    rnd.shuffle(shuffled)
    assert aggregate(shuffled, "majority") == first
    label, consensus, confidence = first
    assert 0.0 <= consensus <= 1.0 and 0.0 <= confidence <= 1.0
    assert first == reference_majority(pairs)


@settings(max_examples=200, deadline=None)
@given(source_lists, st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5), st.randoms(use_true_random=False))
def test_label_model_argmax_first_and_order_free(pairs: list[tuple[int, float]], probs: list[float], rnd: Any) -> None:
    sources = as_sources(pairs)
    label, consensus, confidence = aggregate(sources, "label-model", probs)
    assert label == min(i for i, p in enumerate(probs) if p == max(probs))
    assert confidence == probs[label] and 0.0 <= consensus <= 1.0
    rnd.shuffle(sources)
    assert aggregate(sources, "label-model", probs) == (label, consensus, confidence)


def test_majority_tie_goes_to_smallest_class() -> None:
    assert aggregate(as_sources([(3, 0.5), (1, 0.5)]), "majority") == (1, 0.5, 0.5)
    assert aggregate(as_sources([(2, 0.0), (0, 0.0), (2, 0.0)]), "majority") == (2, 2 / 3, 0.0)


def test_single_rule_needs_exactly_one_voter() -> None:
    assert aggregate(as_sources([(4, 0.7), (-1, 1.0)]), "single") == (4, 1.0, 0.7)
    with pytest.raises(ManifestError, match="exactly one"):
        aggregate(as_sources([(4, 0.7), (4, 1.0)]), "single")
    with pytest.raises(ManifestError, match="every source abstains"):
        aggregate(as_sources([(-1, 0.7)]), "majority")
    with pytest.raises(ManifestError, match="probabilities"):
        aggregate(as_sources([(1, 0.7)]), "label-model")
    with pytest.raises(ManifestError, match="unknown aggregation"):
        aggregate(as_sources([(1, 0.7)]), "vibes")
    with pytest.raises(ManifestError, match="confidence"):
        aggregate(as_sources([(1, 1.5)]), "majority")


# -- signing, parsing, tampering --------------------------------------------


def test_sign_parse_round_trip() -> None:
    m = two_source_manifest(WORLD.authority, prelabel=None)
    again = parse_manifest(m.signed)
    assert again == m
    assert m.digest == hashlib.sha256(m.signed).digest()
    assert m.manifest["label"] == 1 and m.manifest["consensus"] == 1.0 and m.manifest["confidence"] == 1.0
    assert m.signer == WORLD.authority.key_id and m.time == 100
    keys = [src["key_id"] for src in m.manifest["sources"]]
    assert keys == sorted(keys)
    verify_manifest(m, registry())


def test_prelabel_and_label_model_round_trip() -> None:
    m = label_example(
        example=EXAMPLE, sources=[source_entry(WORLD.source_cred, 2, 0.8)], aggregation="label-model",
        probs=[0.1, 0.2, 0.7], ontology="v1", review="pending", key=WORLD.source, time=5,
        prelabel={"run": "run-7", "checkpoint": b"\x01" * 32},
    )
    assert parse_manifest(m.signed).manifest["prelabel"] == {"run": "run-7", "checkpoint": b"\x01" * 32}
    assert (m.label, m.manifest["confidence"]) == (2, 0.7)
    verify_manifest(m, registry())


def test_inconsistent_fields_are_refused() -> None:
    common = dict(example=EXAMPLE, sources=[source_entry(WORLD.source_cred, 1, 0.9)], aggregation="single",
                  ontology="v1", key=WORLD.source, time=1)
    with pytest.raises(ManifestError, match="give"):
        sign_manifest(label=0, consensus=1.0, confidence=0.9, review="accepted", **common)
    # A reviewer's fix may change the label; consensus then shows the disagreement.
    fixed = sign_manifest(label=0, consensus=0.0, confidence=1.0, review="fixed", **common)
    assert fixed.label == 0
    with pytest.raises(ManifestError, match="malformed"):
        sign_manifest(label=1, consensus=1.0, confidence=0.9, review="approved", **common)
    with pytest.raises(ManifestError, match="sorted by key id"):
        body = dict(parse_manifest(two_source_manifest(WORLD.authority).signed).manifest)
        body["sources"] = list(reversed(body["sources"]))
        data = encoding.encode(body)
        parse_manifest(encoding.encode([data, WORLD.authority.sign("manifest", data)]))


def test_tampered_body_fails_signature() -> None:
    m = two_source_manifest(WORLD.authority)
    body = dict(m.manifest, ontology="chest-xray/v4")
    forged = encoding.encode([encoding.encode(body), m.signature])
    with pytest.raises(ManifestError, match="signature does not verify"):
        verify_manifest(parse_manifest(forged), registry())


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_rejected(data: st.DataObject) -> None:
    m = two_source_manifest(WORLD.authority)
    pos = data.draw(st.integers(0, len(m.signed) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(m.signed)
    damaged[pos] ^= 1 << bit
    with pytest.raises(ManifestError):
        verify_manifest(parse_manifest(bytes(damaged)), registry())


def test_not_canonical_or_not_a_pair_is_rejected() -> None:
    m = two_source_manifest(WORLD.authority)
    for bad in (m.signed + b"\x00", encoding.encode([m.body]), encoding.encode(m.body), b""):
        with pytest.raises(ManifestError, match="malformed"):
            parse_manifest(bad)


# -- the vote rule and credential validity ----------------------------------


def one_source_manifest(key: SigningKey, cred: C.Credential = WORLD.source_cred, time: int = 100) -> Any:
    return label_example(example=EXAMPLE, sources=[source_entry(cred, 1, 0.9)], aggregation="single",
                         ontology="chest-xray/v3", review="accepted", key=key, time=time)


def test_votes_signed_by_their_source_or_an_authority_over_it() -> None:
    reg = registry()
    # specs/manifests.md §4: the authority and the root above both sources attest both votes...
    for key in (WORLD.authority, WORLD.root):
        m = two_source_manifest(key)
        assert [src["attested_by"] for src in m.manifest["sources"]] == [key.key_id] * 2
        verify_manifest(m, reg)
    # ...and a source signs its own vote, with nothing to attest.
    for key, cred in ((WORLD.source, WORLD.source_cred), (LF_B, LF_B_CRED)):
        m = one_source_manifest(key, cred)
        assert "attested_by" not in m.manifest["sources"][0]
        verify_manifest(m, reg)


def test_a_source_may_not_sign_another_sources_vote() -> None:
    # Issue 10.8: one listed source used to be enough to sign every listed vote.
    reg = registry()
    for key, other in ((WORLD.source, "'lf-b'"), (LF_B, "'dr-a'")):
        with pytest.raises(ManifestError, match=f"the vote of source {other} is signed by"):
            verify_manifest(two_source_manifest(key), reg)


def test_unrelated_authority_source_or_trainer_is_refused() -> None:
    reg = registry()
    for key, who in ((OTHER_AUTHORITY, "'other'"), (LF_C, "'lf-c'"), (WORLD.trainer, "'trainer-1'")):
        with pytest.raises(ManifestError, match=f"signed by {who} .*neither that source nor an authority"):
            verify_manifest(two_source_manifest(key), reg)


def test_unknown_signer_is_refused() -> None:
    with pytest.raises(ManifestError, match="no recorded credential"):
        verify_manifest(two_source_manifest(_key(9, "stranger")), registry())


def test_revoked_source_signer_refused_naming_it() -> None:
    reg = registry()
    reg.revoke(WORLD.source_cred.key_id, 50, WORLD.authority.key_id)
    verify_manifest(one_source_manifest(WORLD.source, time=49), reg)  # signed before revocation
    with pytest.raises(ManifestError, match="source 'dr-a' .*revoked at time 50"):
        verify_manifest(one_source_manifest(WORLD.source, time=50), reg)
    # Even when someone else signs, a listed source that was revoked is refused.
    with pytest.raises(ManifestError, match="source 'dr-a' .*revoked"):
        verify_manifest(two_source_manifest(WORLD.authority, time=60), reg)


def test_revoked_authority_signer_refused() -> None:
    reg = registry()
    reg.revoke(WORLD.authority_cred.key_id, 50, WORLD.root.key_id)
    with pytest.raises(ManifestError, match="'radiology' was revoked"):
        verify_manifest(two_source_manifest(WORLD.authority, time=70), reg)


def test_out_of_window_source_refused_naming_it() -> None:
    temp = _key(5, "temp")
    cred = C.issue(WORLD.authority, subject="temp-annotator", path="acme/radiology/temp", role="source",
                   public_key=temp.public_key, not_before=100, not_after=200)
    reg = registry()
    reg.add(cred.signed, 150)
    sources = [source_entry(cred, 3, 1.0)]
    ok = label_example(example=EXAMPLE, sources=sources, aggregation="single", ontology="v1", review="accepted", key=temp, time=150)
    verify_manifest(ok, reg)
    for t in (99, 201):
        late = label_example(example=EXAMPLE, sources=sources, aggregation="single", ontology="v1", review="accepted", key=temp, time=t)
        with pytest.raises(ManifestError, match=f"source 'temp-annotator' is not valid at time {t}"):
            verify_manifest(late, reg)


def test_source_name_must_match_credential() -> None:
    entry = dict(source_entry(LF_B_CRED, 1, 1.0), source="dr-a")
    m = label_example(example=EXAMPLE, sources=[entry], aggregation="single", ontology="v1", review="accepted",
                      key=WORLD.authority, time=1)
    with pytest.raises(ManifestError, match="credentialed to 'lf-b'"):
        verify_manifest(m, registry())


# -- relabelling without a retired source -----------------------------------


@settings(max_examples=200, deadline=None)
@given(source_lists, st.integers(0, 8))
def test_relabel_without_is_aggregate_over_the_rest(pairs: list[tuple[int, float]], drop: int) -> None:
    sources = as_sources(pairs)
    fields = {"example": EXAMPLE, "sources": sources, "aggregation": "majority", "ontology": "v1", "review": "accepted"}
    fields.update(zip(("label", "consensus", "confidence"), aggregate(sources, "majority")))
    name = f"s{drop}"
    out = relabel_without(fields, name)
    rest = [src for src in sources if src["source"] != name]
    if not any(src["vote"] != -1 for src in rest):
        assert out is None
        return
    assert out is not None and out["sources"] == rest
    assert (out["label"], out["consensus"], out["confidence"]) == aggregate(rest, "majority")
    assert relabel_without(fields, name) == out  # pure


def test_relabel_without_signs_and_handles_rules() -> None:
    m = two_source_manifest(WORLD.authority)
    out = relabel_without(m, "dr-a")
    assert out is not None and [s["source"] for s in out["sources"]] == ["lf-b"]
    again = sign_manifest(**out, key=WORLD.authority, time=200)
    assert (again.label, again.manifest["confidence"]) == (1, 1.0)
    verify_manifest(again, registry())
    assert relabel_without(m, "nobody") == {k: v for k, v in m.manifest.items() if k not in ("v", "signer", "time")}

    single = label_example(example=EXAMPLE, sources=[source_entry(WORLD.source_cred, 1, 0.9)], aggregation="single",
                           ontology="v1", review="accepted", key=WORLD.source, time=1)
    assert relabel_without(single, "dr-a") is None

    lm = two_source_manifest(WORLD.authority, sources=[source_entry(WORLD.source_cred, 0, 0.9), source_entry(LF_B_CRED, 2, 0.6)],
                             aggregation="label-model", probs=[0.5, 0.1, 0.4])
    fallback = relabel_without(lm, "dr-a")
    assert fallback is not None and fallback["aggregation"] == "majority" and "probs" not in fallback and fallback["label"] == 2
    refit = relabel_without(lm, "dr-a", probs=[0.2, 0.1, 0.7])
    assert refit is not None and refit["aggregation"] == "label-model" and refit["label"] == 2
    sign_manifest(**refit, key=WORLD.authority, time=2)

    fixed = sign_manifest(example=EXAMPLE, sources=[source_entry(WORLD.source_cred, 1, 0.9), source_entry(LF_B_CRED, 0, 0.6)],
                          aggregation="majority", label=3, consensus=0.0, confidence=1.0, ontology="v1", review="fixed",
                          key=WORLD.authority, time=3)
    kept = relabel_without(fixed, "lf-b")
    assert kept is not None and (kept["label"], kept["confidence"], kept["consensus"]) == (3, 1.0, 0.0)


# -- example ids ------------------------------------------------------------


def test_example_id_is_the_specified_canonical_bytes() -> None:
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    expected = hashlib.sha256(encoding.encode(["gradledger/example/v1", "int16", [2, 3], a.astype("<i2").tobytes()])).digest()
    assert example_id(a) == expected
    assert example_id(a.astype(">i2")) == expected  # byte order is normalized
    assert example_id(np.asfortranarray(a)) == expected  # so is memory layout
    assert example_id(torch.arange(6, dtype=torch.int16).reshape(2, 3)) == expected
    assert example_id(torch.arange(12, dtype=torch.int16).reshape(2, 6)[:, ::2]) == example_id(np.arange(12, dtype=np.int16).reshape(2, 6)[:, ::2])
    assert example_id(b"abc") == hashlib.sha256(encoding.encode(["gradledger/example/v1", "bytes", [3], b"abc"])).digest()


def test_example_id_separates_dtype_and_shape() -> None:
    a = np.zeros(4, dtype=np.float32)
    ids = {example_id(a), example_id(a.reshape(2, 2)), example_id(a.view(np.int32)), example_id(a.tobytes())}
    assert len(ids) == 4
    assert example_id(np.float64(1.5)) == example_id(np.array(1.5))
    assert len(example_id(torch.ones(3, dtype=torch.bfloat16))) == 32


def test_example_id_refuses_unknown_types() -> None:
    with pytest.raises(DatasetError, match="list"):
        example_id([1, 2, 3])
    with pytest.raises(DatasetError, match="canonical byte form"):
        example_id(np.array(["a", "b"]))


def test_example_id_vectors_of_the_spec() -> None:
    # specs/manifests.md §2 lists these; a change here is a format change.
    assert example_id(np.arange(6, dtype=np.int16).reshape(2, 3)).hex() == "f8f22f38bbde501594df9a6d1119da8255d44204edb132efc5f6fccc0022204c"
    assert example_id(b"abc").hex() == "6caf6ebaa6eadbe67680236262b31bb71822a521a47d92649e30e4effd4f8fe1"
    assert example_id(np.array(1.5, dtype=np.float32)).hex() == "29b0d6caeda9fe89791a3d58053bc4e924b0c48f48f77cf9ca2f2a5382b0ff62"
    assert example_id(bytearray(b"abc")) == example_id(memoryview(b"abc")) == example_id(b"abc")
