"""The verifier's routing, policy and manifest rules agree with the trainer's on random inputs.

The verifier re-implements specs/policy.md and specs/manifests.md without importing the
training package; these properties check that the two implementations agree, and the
specification's own worked examples and vectors pin both.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.training import manifests as TM
from gradledger.training import policy as TP
from gradledger.training.errors import ManifestError
from gradledger.verify._internal import manifests as VM
from gradledger.verify._internal import routing as VR
from helpers import make_world

WORLD = make_world()
UNITS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]
unit = st.one_of(st.sampled_from(UNITS), st.floats(0.0, 1.0).map(lambda x: x + 0.0))
PATHS = ["acme", "acme/crowd", "acme/crowd/mturk", "acme/radiology", "acme/radiology/attending", "acme/radiology2"]
SOURCES = {f"s{i}": PATHS[i % len(PATHS)] for i in range(8)}
KID = {name: hashlib.sha256(name.encode()).digest() for name in SOURCES}
PATH_OF_KID = {KID[n]: p for n, p in SOURCES.items()}


@st.composite
def outcomes(draw: st.DrawFn, n: int) -> dict[str, Any]:
    profile = sorted(draw(st.lists(unit, min_size=n, max_size=n)), reverse=True)
    limits = draw(st.lists(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0, 10.0]),
                                     st.floats(1e-3, 1e3)), min_size=n, max_size=n))
    return {"profile": profile, "limits": limits}


@st.composite
def matches(draw: st.DrawFn) -> dict[str, Any]:
    m: dict[str, Any] = {}
    if draw(st.booleans()):
        m["authority"] = draw(st.sampled_from(PATHS + ["acme/radio", "other"]))
    for key in ("min_confidence", "max_confidence", "min_consensus"):
        if draw(st.booleans()):
            m[key] = draw(unit)
    if "min_confidence" in m and "max_confidence" in m and m["min_confidence"] > m["max_confidence"]:
        m["min_confidence"], m["max_confidence"] = m["max_confidence"], m["min_confidence"]
    if draw(st.booleans()):
        m["review"] = draw(st.lists(st.sampled_from(VR.REVIEWS), min_size=1, max_size=4, unique=True))
    if draw(st.booleans()):
        m["aggregation"] = draw(st.lists(st.sampled_from(["single", "majority", "label-model", "typo"]),
                                         min_size=1, max_size=3, unique=True))
    if draw(st.booleans()):
        m["memorized"] = draw(st.booleans())  # specs/dynamics.md §2.4
    return m


@st.composite
def policies(draw: st.DrawFn) -> TP.SignedPolicy:
    n = draw(st.integers(1, 4))
    rules = [{"name": f"r{i}", "match": draw(matches()), **draw(outcomes(n))} for i in range(draw(st.integers(0, 6)))]
    fields = {"name": "p", "bands": [f"b{k}" for k in range(n)], "rules": rules, "default": draw(outcomes(n))}
    if any("memorized" in r["match"] for r in rules):  # a rule on the flags needs the scans that flag
        fields["monitors"] = {"memorization": {"fraction": 0.1, "min_trace": 2}}
    return TP.sign_policy(fields, WORLD.root, 5)


@st.composite
def routable(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(SOURCES)), min_size=1, max_size=4, unique=True))
    return {
        "label": draw(st.integers(0, 3)),
        "sources": [{"source": n, "key_id": KID[n], "vote": 0, "confidence": 1.0} for n in names],
        "confidence": draw(unit),
        "consensus": draw(unit),
        "review": draw(st.sampled_from(VR.REVIEWS)),
        "aggregation": draw(st.sampled_from(["single", "majority", "label-model"])),
    }


@settings(max_examples=120, deadline=None)
@given(sp=policies(), batch=st.lists(st.tuples(routable(), st.booleans()), min_size=0, max_size=12))
def test_routing_and_batch_limits_equal_the_trainers(sp: TP.SignedPolicy, batch: list[tuple[dict[str, Any], bool]]
                                                     ) -> None:
    policy = VR.parse_policy(sp.signed)
    assert policy.digest == sp.digest and policy.bands == sp.bands
    assert policy.matches_flags == sp.compiled.matches_flags
    mine = [VR.route_example(policy, m, PATH_OF_KID.__getitem__, flagged) for m, flagged in batch]
    for (m, flagged), r in zip(batch, mine):
        want = TP.route(sp, m, {s["source"]: SOURCES[s["source"]] for s in m["sources"]}, flagged)
        assert (r.rule, r.profile) == (want.rule, want.profile)
        assert r.paths == tuple(sorted({SOURCES[s["source"]] for s in m["sources"]}))
        assert r.sources == tuple(s["source"] for s in m["sources"])
    rules = [r.rule for r in mine]
    assert VR.batch_limits(policy, rules) == TP.batch_limits(sp, rules)


@settings(max_examples=50, deadline=None)
@given(sp=policies(), rules=st.lists(st.integers(-1, 5), max_size=20))
def test_batch_limits_of_any_rule_set(sp: TP.SignedPolicy, rules: list[int]) -> None:
    policy = VR.parse_policy(sp.signed)
    rules = [r for r in rules if r < len(policy.rules)]
    assert VR.batch_limits(policy, rules) == TP.batch_limits(sp, rules)


def test_policy_signature_and_role_are_verified() -> None:
    from gradledger.ledger.credentials import CredentialRegistry

    fields = {"name": "p", "bands": ["head"], "rules": [], "default": {"profile": [1.0], "limits": [None]}}
    registry = CredentialRegistry(trusted_roots=frozenset({WORLD.root.public_key}))
    for cred in (WORLD.root_cred, WORLD.authority_cred):
        registry.add(cred.signed, 0)
    VR.verify_policy(VR.parse_policy(TP.sign_policy(fields, WORLD.root, 5).signed), registry)
    with pytest.raises(VR.PolicyInvalid, match="governance root"):
        VR.verify_policy(VR.parse_policy(TP.sign_policy(fields, WORLD.authority, 5).signed), registry)
    signed = TP.sign_policy(fields, WORLD.root, 5).signed
    data, sig = TM.encoding.decode(signed)
    forged = TM.encoding.encode([data, bytes(64)])
    with pytest.raises(VR.PolicyInvalid, match="governance root"):
        VR.verify_policy(VR.parse_policy(forged), registry)
    # A profile that grows with depth is refused by both parsers.
    grows = dict(fields, bands=["head", "deep"], default={"profile": [0.5, 1.0], "limits": [None, None]},
                 signer=WORLD.root.key_id, time=5, v=1)
    raw = TM.encoding.encode(grows)
    bad = TM.encoding.encode([raw, WORLD.root.sign("policy", raw)])
    with pytest.raises(VR.PolicyInvalid, match="grows"):
        VR.parse_policy(bad)
    with pytest.raises(TP.PolicyError):
        TP.parse_policy(bad)


def test_worked_example_of_the_policy_spec() -> None:
    # specs/policy.md §6.
    rules = [
        {"name": "expert-reviewed", "match": {"authority": "acme/radiology", "min_confidence": 0.9,
                                              "review": ["accepted", "fixed"]},
         "profile": [1.0, 1.0, 1.0], "limits": [None, 5.0, 1.0]},
        {"name": "crowd-consensus", "match": {"authority": "acme/crowd", "min_consensus": 0.75,
                                              "aggregation": ["majority"]},
         "profile": [1.0, 0.5, 0.0], "limits": [10.0, 2.0, None]},
        {"name": "rejected", "match": {"review": ["rejected"]}, "profile": [0.0, 0.0, 0.0], "limits": [None] * 3},
    ]
    fields = {"name": "w", "bands": ["head", "mid", "embedding"], "rules": rules,
              "default": {"profile": [1.0, 0.0, 0.0], "limits": [10.0, None, None]}}
    policy = VR.parse_policy(TP.sign_policy(fields, WORLD.root, 5).signed)
    paths = {"dr-a": "acme/radiology/attending", "crowd-1": "acme/crowd/mturk", "crowd-2": "acme/crowd/mturk",
             "rad2-vendor": "acme/radiology2"}
    table = [
        (["dr-a"], 0.95, 1.0, "accepted", "single", 0),
        (["dr-a"], 0.9, 1.0, "fixed", "single", 0),
        (["dr-a", "crowd-1"], 0.95, 1.0, "accepted", "single", -1),
        (["crowd-1", "crowd-2"], 0.95, 0.75, "accepted", "majority", 1),
        (["crowd-1", "crowd-2"], 0.95, 0.5, "accepted", "majority", -1),
        (["rad2-vendor"], 0.99, 1.0, "accepted", "single", -1),
        (["dr-a"], 0.95, 1.0, "rejected", "single", 2),
    ]
    batch = [{"label": 0, "sources": [{"source": n, "key_id": n.encode()} for n in names], "confidence": c,
              "consensus": k, "review": rv, "aggregation": ag} for names, c, k, rv, ag, _ in table]
    routed = VR.route_examples(policy, batch, lambda kid: paths[kid.decode()])
    assert [r.rule for r in routed] == [row[-1] for row in table]
    assert VR.batch_limits(policy, [r.rule for r in routed]) == (10.0, 2.0, 1.0)
    with pytest.raises(VR.Unroutable):
        VR.route_examples(policy, batch, lambda kid: {}[kid])


# -- manifests -------------------------------------------------------------------------------------


votes_of = st.lists(st.tuples(st.integers(-1, 3), unit), min_size=1, max_size=6)


def _sources(votes: list[tuple[int, float]]) -> list[dict[str, Any]]:
    names = sorted(SOURCES)
    out = [{"source": names[i], "key_id": KID[names[i]], "vote": v, "confidence": c} for i, (v, c) in enumerate(votes)]
    return sorted(out, key=lambda s: s["key_id"])


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        label, consensus, confidence = fn(*args)
    except (ManifestError, VM.ManifestInvalid):
        return "refused"
    return label, np.float64(consensus).tobytes(), np.float64(confidence).tobytes()


@settings(max_examples=250, deadline=None)
@given(votes=votes_of, rule=st.sampled_from(["single", "majority", "label-model"]),
       probs=st.one_of(st.none(), st.lists(unit, min_size=1, max_size=5)))
def test_aggregation_equals_the_trainers(votes: list[tuple[int, float]], rule: str, probs: list[float] | None) -> None:
    sources = _sources(votes)
    p = probs if rule == "label-model" else None
    assert _outcome(VM.aggregate, sources, rule, p) == _outcome(TM.aggregate, sources, rule, p)


@settings(max_examples=200, deadline=None)
@given(votes=votes_of, rule=st.sampled_from(["single", "majority", "label-model"]),
       probs=st.lists(unit, min_size=4, max_size=5), review=st.sampled_from(VR.REVIEWS),
       nudge=st.sampled_from([None, "label", "consensus", "confidence"]), drop=st.sampled_from(sorted(SOURCES)))
def test_consistency_and_relabel_equal_the_trainers(
    votes: list[tuple[int, float]], rule: str, probs: list[float], review: str, nudge: str | None, drop: str,
) -> None:
    sources = _sources(votes)
    p = probs if rule == "label-model" else None
    try:
        label, consensus, confidence = TM.aggregate(sources, rule, p)
    except ManifestError:
        label, consensus, confidence = 0, 1.0, 1.0
    fields: dict[str, Any] = {"example": bytes(32), "label": label, "sources": sources, "aggregation": rule,
                              "consensus": consensus, "confidence": confidence, "ontology": "o", "review": review}
    if p is not None:
        fields["probs"] = p
    if nudge == "label":
        fields["label"] = (label + 1) % 4
    elif nudge is not None:
        fields[nudge] = math.nextafter(fields[nudge], 0.0 if fields[nudge] > 0 else 1.0)

    def verdict(check: Any) -> bool:
        try:
            check(fields)
        except (ManifestError, VM.ManifestInvalid):
            return False
        return True

    consistent = verdict(VM.check_consistent)
    assert consistent == verdict(TM.check_consistent)
    if consistent:
        assert VM.relabel_without(fields, drop) == TM.relabel_without(fields, drop)
        refit = [0.1, 0.7, 0.2, 0.0]
        assert VM.relabel_without(fields, drop, refit) == TM.relabel_without(fields, drop, refit)


def test_parse_and_verify_signed_manifests() -> None:
    from gradledger.ledger.credentials import CredentialRegistry

    registry = CredentialRegistry(trusted_roots=frozenset({WORLD.root.public_key}))
    for cred in (WORLD.root_cred, WORLD.authority_cred, WORLD.source_cred):
        registry.add(cred.signed, 0)
    src = [TM.source_entry(WORLD.source_cred, 2, 0.9)]
    for key in (WORLD.source, WORLD.authority, WORLD.root):
        m = TM.label_example(example=bytes(32), sources=src, aggregation="single", ontology="o", review="accepted",
                             key=key, time=3)
        parsed = VM.parse_manifest(m.signed)
        assert parsed.fields == m.manifest and parsed.digest == m.digest
        VM.verify_manifest(parsed, registry)
    m = TM.label_example(example=bytes(32), sources=src, aggregation="single", ontology="o", review="accepted",
                         key=WORLD.trainer, time=3)
    registry.add(WORLD.trainer_cred.signed, 0)
    with pytest.raises(VM.ManifestInvalid, match="neither"):
        VM.verify_manifest(VM.parse_manifest(m.signed), registry)
    registry.revoke(WORLD.source_cred.key_id, 3, WORLD.authority.key_id)
    m = TM.label_example(example=bytes(32), sources=src, aggregation="single", ontology="o", review="accepted",
                         key=WORLD.source, time=3)
    with pytest.raises(VM.ManifestInvalid, match="revoked"):
        VM.verify_manifest(VM.parse_manifest(m.signed), registry)
    assert VM.revoked_by(registry, WORLD.source_cred.key_id, 3) is not None
    assert VM.revoked_by(registry, WORLD.source_cred.key_id, 2) is None


def test_example_ids_match_the_spec_vectors_and_the_trainer() -> None:
    assert VM.example_id(np.arange(6, dtype=np.int16).reshape(2, 3)).hex() == (
        "f8f22f38bbde501594df9a6d1119da8255d44204edb132efc5f6fccc0022204c")
    assert VM.bytes_example_id(b"abc").hex() == "6caf6ebaa6eadbe67680236262b31bb71822a521a47d92649e30e4effd4f8fe1"
    assert VM.example_id(np.array(1.5, dtype=np.float32)).hex() == (
        "29b0d6caeda9fe89791a3d58053bc4e924b0c48f48f77cf9ca2f2a5382b0ff62")
    rng = np.random.default_rng(0)
    for dtype in ("bool", "uint8", "int32", "int64", "float16", "float32", "float64", "complex64"):
        a = (rng.standard_normal((3, 4)) * 5).astype(dtype)
        assert VM.example_id(a) == TM.example_id(a)
        assert VM.example_id(a.astype(a.dtype.newbyteorder(">"))) == TM.example_id(a)
        assert VM.example_id(np.asfortranarray(a)) == TM.example_id(a)


def test_inputs_artifact_in_bfloat16_is_read_without_torch_dtypes() -> None:
    import torch
    from safetensors.torch import save

    x = torch.randn(4, 3).to(torch.bfloat16)
    ids = [TM.example_id(x[i]) for i in range(4)]
    VM.check_inputs(save({"x": x}), ids)
    with pytest.raises(VM.ManifestInvalid, match="row 2"):
        VM.check_inputs(save({"x": x}), ids[:2] + [bytes(32)] + ids[3:])
    with pytest.raises(VM.ManifestInvalid, match="rows"):
        VM.check_inputs(save({"x": x}), ids[:3])
    with pytest.raises(VM.ManifestInvalid, match="safetensors"):
        VM.check_inputs(b"not a safetensors file", ids)
    with pytest.raises(VM.ManifestInvalid, match="exactly one tensor"):
        VM.check_inputs(save({"x": x, "y": x.clone()}), ids)
