"""The signed routing policy (training/policy.py, specs/policy.md).

Routing is checked against ``reference_route``, a naive re-reading of the spec
written here independently of the module: rules in order, every present
condition must hold, bounds inclusive, authority holds only when every source
lies at or below the prefix. The signing tests use ``helpers.make_world``:
root ``acme``, trainer ``acme/training``, authority ``acme/radiology``, source
``acme/radiology/attending``.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradledger.ledger import credentials as C
from gradledger.ledger import encoding
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.training.errors import ManifestError, PolicyError
from gradledger.training.policy import (
    REVIEW_STATES,
    Routing,
    SignedPolicy,
    adopt_policy,
    batch_limits,
    latest_adopted,
    load_adopted,
    parse_policy,
    profiles_tensor,
    route,
    route_batch,
    sign_policy,
    verify_policy,
)

from helpers import World, make_world

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T = 1_000  # policy time

WORLD = make_world()

#: Source name -> credential path. Chosen so that prefixes hit every case:
#: equal, strictly below, a sibling sharing a textual prefix, unrelated.
SOURCE_PATHS = {
    "dr-a": "acme/radiology/attending",
    "radiology-board": "acme/radiology",
    "rad2-vendor": "acme/radiology2",
    "crowd-1": "acme/crowd/mturk",
    "crowd-2": "acme/crowd/mturk",
    "lf-keywords": "acme/lf",
    "root-itself": "acme",
}
PREFIXES = ["acme", "acme/radiology", "acme/radiology/attending", "acme/radiology2", "acme/crowd", "acme/lf", "other"]
AGGREGATIONS = ["single", "majority", "label-model", "other"]
BAND_NAMES = ["head", "mid", "embedding", "deep"]
#: Grid values make the inclusive boundaries likely to be hit exactly.
GRID = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]


def good_fields() -> dict[str, Any]:
    return {
        "name": "radiology-routing",
        "bands": ["head", "mid", "embedding"],
        "rules": [
            {
                "name": "expert-reviewed",
                "match": {"authority": "acme/radiology", "min_confidence": 0.9, "review": ["accepted", "fixed"]},
                "profile": [1.0, 1.0, 1.0],
                "limits": [None, 5.0, 1.0],
            },
            {
                "name": "crowd-consensus",
                "match": {"authority": "acme/crowd", "min_consensus": 0.75, "aggregation": ["majority"]},
                "profile": [1.0, 0.5, 0.0],
                "limits": [10.0, 2.0, None],
            },
            {
                "name": "rejected",
                "match": {"review": ["rejected"]},
                "profile": [0.0, 0.0, 0.0],
                "limits": [None, None, None],
            },
        ],
        "default": {"profile": [1.0, 0.0, 0.0], "limits": [10.0, None, None]},
    }


def manifest(
    sources: list[str],
    *,
    confidence: float = 0.95,
    consensus: float = 1.0,
    review: str = "accepted",
    aggregation: str = "single",
) -> dict[str, Any]:
    """The fields of a manifest that routing reads, plus enough of the rest to look like one."""
    return {
        "example": b"\x01" * 32,
        "label": 1,
        "sources": [{"source": s, "key_id": b"\x02" * 32, "vote": 1, "confidence": confidence} for s in sources],
        "aggregation": aggregation,
        "consensus": consensus,
        "confidence": confidence,
        "ontology": "v1",
        "review": review,
        "signer": b"\x03" * 32,
        "time": 5,
    }


# -- the reference -------------------------------------------------------------


def reference_matches(match: dict[str, Any], m: dict[str, Any], paths: dict[str, str]) -> bool:
    if "authority" in match:
        prefix = match["authority"]
        source_paths = [paths[s["source"]] for s in m["sources"]]
        if not source_paths:
            return False
        for p in source_paths:
            if not (p == prefix or p.startswith(prefix + "/")):
                return False
    if "min_confidence" in match and m["confidence"] < match["min_confidence"]:
        return False
    if "max_confidence" in match and m["confidence"] > match["max_confidence"]:
        return False
    if "min_consensus" in match and m["consensus"] < match["min_consensus"]:
        return False
    if "review" in match and m["review"] not in match["review"]:
        return False
    if "aggregation" in match and m["aggregation"] not in match["aggregation"]:
        return False
    return True


def reference_route(policy: dict[str, Any], m: dict[str, Any], paths: dict[str, str]) -> tuple:
    for i, rule in enumerate(policy["rules"]):
        if reference_matches(rule["match"], m, paths):
            return i, rule["name"], tuple(rule["profile"]), tuple(rule["limits"])
    d = policy["default"]
    return -1, "default", tuple(d["profile"]), tuple(d["limits"])


def reference_batch_limits(profiles: list[tuple], limits: list[tuple], n: int) -> tuple:
    out = []
    for k in range(n):
        candidates = [lim[k] for prof, lim in zip(profiles, limits) if prof[k] > 0 and lim[k] is not None]
        out.append(min(candidates) if candidates else None)
    return tuple(out)


# -- strategies ----------------------------------------------------------------

unit = st.one_of(st.sampled_from(GRID), st.floats(0.0, 1.0)).map(lambda x: x + 0.0)  # folds -0.0


@st.composite
def profiles(draw: st.DrawFn, n: int) -> list[float]:
    return sorted((draw(unit) for _ in range(n)), reverse=True)


@st.composite
def limit_lists(draw: st.DrawFn, n: int) -> list[float | None]:
    return [draw(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0]), st.floats(1e-6, 1e6)))
            for _ in range(n)]


@st.composite
def matches(draw: st.DrawFn) -> dict[str, Any]:
    match: dict[str, Any] = {}
    if draw(st.booleans()):
        match["authority"] = draw(st.sampled_from(PREFIXES))
    low = draw(st.none() | unit)
    high = draw(st.none() | unit)
    if low is not None and high is not None and low > high:
        low, high = high, low
    if low is not None:
        match["min_confidence"] = low
    if high is not None:
        match["max_confidence"] = high
    if draw(st.booleans()):
        match["min_consensus"] = draw(unit)
    if draw(st.booleans()):
        match["review"] = draw(st.lists(st.sampled_from(REVIEW_STATES), min_size=1, max_size=4, unique=True))
    if draw(st.booleans()):
        match["aggregation"] = draw(st.lists(st.sampled_from(AGGREGATIONS), min_size=1, max_size=3, unique=True))
    return match


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    rules = [
        {"name": f"rule-{i}", "match": draw(matches()), "profile": draw(profiles(n)), "limits": draw(limit_lists(n))}
        for i in range(draw(st.integers(0, 6)))
    ]
    return {
        "name": "random",
        "bands": BAND_NAMES[:n],
        "rules": rules,
        "default": {"profile": draw(profiles(n)), "limits": draw(limit_lists(n))},
    }


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    return manifest(
        draw(st.lists(st.sampled_from(sorted(SOURCE_PATHS)), min_size=0, max_size=3)),
        confidence=draw(unit),
        consensus=draw(unit),
        review=draw(st.sampled_from(REVIEW_STATES)),
        aggregation=draw(st.sampled_from(AGGREGATIONS)),
    )


# -- evaluation ----------------------------------------------------------------


@SETTINGS
@given(policies(), st.lists(manifests(), min_size=1, max_size=8))
def test_route_is_the_first_matching_rule(fields: dict[str, Any], batch: list[dict[str, Any]]) -> None:
    sp = sign_policy(fields, WORLD.root, T)
    reparsed = parse_policy(sp.signed)
    for m in batch:
        got = route(sp, m, SOURCE_PATHS)
        assert isinstance(got, Routing)
        assert tuple(got) == reference_route(sp.policy, m, SOURCE_PATHS)
        # Pure and deterministic: same answer again, from the re-parsed bytes, and from the plain map.
        assert route(sp, m, SOURCE_PATHS) == got
        assert route(reparsed, copy.deepcopy(m), dict(SOURCE_PATHS)) == got
        assert route(copy.deepcopy(sp.policy), m, SOURCE_PATHS) == got
        # First: the chosen rule matches and no earlier one does; default only when none does.
        rules = sp.policy["rules"]
        upto = len(rules) if got.rule == -1 else got.rule
        assert not any(reference_matches(r["match"], m, SOURCE_PATHS) for r in rules[:upto])
        if got.rule >= 0:
            assert reference_matches(rules[got.rule]["match"], m, SOURCE_PATHS)
    profs, idx = route_batch(sp, batch, SOURCE_PATHS)
    singles = [route(sp, m, SOURCE_PATHS) for m in batch]
    assert profs == [r.profile for r in singles]
    assert idx == [r.rule for r in singles]


@pytest.mark.parametrize(
    "prefix, paths, expected",
    [
        ("acme/radiology", ["acme/radiology/attending"], True),
        ("acme/radiology", ["acme/radiology"], True),
        ("acme/radiology", ["acme/radiology2"], False),
        ("acme/radiology", ["acme"], False),
        ("acme", ["acme/radiology2", "acme/crowd/mturk"], True),
        ("acme/radiology", ["acme/radiology/attending", "acme/radiology"], True),
        # Conservative: one crowd source among experts makes the label not "expert".
        ("acme/radiology", ["acme/radiology/attending", "acme/crowd/mturk"], False),
        ("acme/radiology", ["acme/crowd/mturk", "acme/radiology/attending"], False),
        ("acme/radiology/attending", ["acme/radiology/attending/resident"], True),
        ("acme/radiology/attending", ["acme/radiology/attendings"], False),
        # No sources prove no authority.
        ("acme", [], False),
    ],
)
def test_authority_prefix(prefix: str, paths: list[str], expected: bool) -> None:
    fields = good_fields()
    fields["rules"] = [{"name": "auth", "match": {"authority": prefix}, "profile": [1, 1, 1], "limits": [None] * 3}]
    names = [f"s{i}" for i in range(len(paths))]
    got = route(sign_policy(fields, WORLD.root, T), manifest(names), dict(zip(names, paths)))
    assert (got.rule == 0) is expected
    assert got.name == ("auth" if expected else "default")


def test_bounds_are_inclusive_and_review_aggregation_are_sets() -> None:
    fields = good_fields()
    fields["rules"] = [
        {
            "name": "band",
            "match": {"min_confidence": 0.5, "max_confidence": 0.75, "min_consensus": 0.25,
                      "review": ["accepted", "fixed"], "aggregation": ["majority", "label-model"]},
            "profile": [1, 0.5, 0.25],
            "limits": [1, 2, 3],
        }
    ]
    sp = sign_policy(fields, WORLD.root, T)
    paths = {"dr-a": "acme/radiology/attending"}

    def rule(**kw: Any) -> int:
        base = {"confidence": 0.5, "consensus": 0.25, "review": "fixed", "aggregation": "majority"}
        return route(sp, manifest(["dr-a"], **{**base, **kw}), paths).rule

    assert rule() == 0
    assert rule(confidence=0.75) == 0
    assert rule(confidence=math.nextafter(0.5, 0)) == -1
    assert rule(confidence=math.nextafter(0.75, 1)) == -1
    assert rule(consensus=math.nextafter(0.25, 0)) == -1
    assert rule(review="pending") == -1
    assert rule(aggregation="single") == -1
    assert rule(aggregation="label-model") == 0
    assert route(sp, manifest(["dr-a"], confidence=0.6, consensus=0.3, review="accepted",
                              aggregation="majority"), paths) == Routing(0, "band", (1.0, 0.5, 0.25), (1.0, 2.0, 3.0))


def test_worked_example_from_the_spec() -> None:
    """The table in specs/policy.md §4, so spec and code cannot drift."""
    sp = sign_policy(good_fields(), WORLD.root, T)
    cases = [
        (manifest(["dr-a"], confidence=0.95, review="accepted"), 0),
        (manifest(["dr-a"], confidence=0.9, review="fixed"), 0),
        (manifest(["dr-a", "crowd-1"], confidence=0.95, review="accepted"), -1),
        (manifest(["crowd-1", "crowd-2"], consensus=0.75, aggregation="majority"), 1),
        (manifest(["crowd-1", "crowd-2"], consensus=0.5, aggregation="majority"), -1),
        (manifest(["rad2-vendor"], confidence=0.99), -1),
        (manifest(["dr-a"], confidence=0.95, review="rejected"), 2),
    ]
    for m, expected in cases:
        assert route(sp, m, SOURCE_PATHS).rule == expected
    _, rules = route_batch(sp, [m for m, _ in cases], SOURCE_PATHS)
    assert batch_limits(sp, rules) == (10.0, 2.0, 1.0)


def test_route_refuses_unroutable_manifests() -> None:
    sp = sign_policy(good_fields(), WORLD.root, T)
    with pytest.raises(ManifestError, match="no credential path"):
        route(sp, manifest(["unknown-annotator"]), SOURCE_PATHS)
    for bad in ({"confidence": math.nan}, {"confidence": None}, {"consensus": math.inf}, {"review": "maybe"},
                {"aggregation": 3}, {"sources": None}, {"confidence": True}):
        with pytest.raises(ManifestError):
            route(sp, {**manifest(["dr-a"]), **bad}, SOURCE_PATHS)


# -- batch limits and the gate's tensor -----------------------------------------


def test_batch_limit_rule() -> None:
    fields = {
        "name": "limits",
        "bands": ["head", "mid", "embedding"],
        "rules": [
            {"name": "deep", "match": {"review": ["accepted"]}, "profile": [1, 1, 1], "limits": [4, 3, None]},
            {"name": "shallow", "match": {"review": ["fixed"]}, "profile": [1, 0, 0], "limits": [2, 0.5, 0.1]},
        ],
        "default": {"profile": [0, 0, 0], "limits": [0.01, 0.01, 0.01]},
    }
    sp = sign_policy(fields, WORLD.root, T)
    assert batch_limits(sp, [0]) == (4.0, 3.0, None)
    # 'shallow' does not write into mid or embedding, so its tiny limits there do not bind.
    assert batch_limits(sp, [0, 1]) == (2.0, 3.0, None)
    assert batch_limits(sp, [1, 1]) == (2.0, None, None)
    # The default writes nowhere: it constrains nothing.
    assert batch_limits(sp, [-1, 0]) == (4.0, 3.0, None)
    assert batch_limits(sp, []) == (None, None, None)
    with pytest.raises(PolicyError):
        batch_limits(sp, [2])


@SETTINGS
@given(policies(), st.lists(manifests(), min_size=0, max_size=10))
def test_batch_limits_match_reference(fields: dict[str, Any], batch: list[dict[str, Any]]) -> None:
    sp = sign_policy(fields, WORLD.root, T)
    routings = [route(sp, m, SOURCE_PATHS) for m in batch]
    profs, rules = route_batch(sp, batch, SOURCE_PATHS)
    expected = reference_batch_limits(profs, [r.limits for r in routings], len(fields["bands"]))
    assert batch_limits(sp, rules) == expected
    assert batch_limits(sp, list(reversed(rules))) == expected


def test_profiles_tensor() -> None:
    t = profiles_tensor([(1.0, 0.5, 0.1), (1.0, 0.0, 0.0)])
    assert t.dtype == torch.float32 and t.shape == (2, 3)
    assert t[0, 2].item() == torch.tensor(0.1, dtype=torch.float32).item()
    assert profiles_tensor([], n_bands=3).shape == (0, 3)
    with pytest.raises(PolicyError):
        profiles_tensor([])
    with pytest.raises(PolicyError):
        profiles_tensor([(1.0, 0.5), (1.0,)])
    with pytest.raises(PolicyError):
        profiles_tensor([(1.0, 0.5)], n_bands=3)


# -- validation at sign and parse time ------------------------------------------


def _set(path: tuple, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(fields: dict[str, Any]) -> None:
        target: Any = fields
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()
R0 = ("rules", 0)

BAD: dict[str, Callable[[dict[str, Any]], None]] = {
    "increasing profile": _set((*R0, "profile"), [0.5, 1.0, 0.0]),
    "increasing default": _set(("default", "profile"), [0.0, 0.0, 0.5]),
    "multiplier above 1": _set((*R0, "profile"), [1.5, 1.0, 1.0]),
    "negative multiplier": _set((*R0, "profile"), [1.0, 0.5, -0.5]),
    "NaN multiplier": _set((*R0, "profile"), [1.0, math.nan, 0.0]),
    "inf multiplier": _set((*R0, "profile"), [math.inf, 1.0, 0.0]),
    "short profile": _set((*R0, "profile"), [1.0, 1.0]),
    "long profile": _set(("default", "profile"), [1.0, 0.0, 0.0, 0.0]),
    "short limits": _set((*R0, "limits"), [None, 1.0]),
    "zero limit": _set((*R0, "limits"), [0.0, None, None]),
    "negative limit": _set((*R0, "limits"), [-1.0, None, None]),
    "NaN limit": _set((*R0, "limits"), [math.nan, None, None]),
    "inf limit": _set((*R0, "limits"), [math.inf, None, None]),
    "text limit": _set((*R0, "limits"), ["1", None, None]),
    "no bands": _set(("bands",), []),
    "duplicate bands": _set(("bands",), ["head", "head", "mid"]),
    "duplicate rule names": _set(("rules", 1, "name"), "expert-reviewed"),
    "unknown policy field": _set(("extra",), 1),
    "unknown rule field": _set((*R0, "priority"), 1),
    "unknown match field": _set((*R0, "match", "max_consensus"), 0.5),
    "unknown review state": _set((*R0, "match", "review"), ["approved"]),
    "empty review list": _set((*R0, "match", "review"), []),
    "duplicate review": _set((*R0, "match", "review"), ["fixed", "fixed"]),
    "empty aggregation list": _set((*R0, "match", "aggregation"), []),
    "min above max": _set((*R0, "match", "max_confidence"), 0.5),
    "bound above 1": _set((*R0, "match", "min_consensus"), 1.5),
    "NaN bound": _set((*R0, "match", "min_confidence"), math.nan),
    "bad authority path": _set((*R0, "match", "authority"), "Acme/Radiology"),
    "null authority": _set((*R0, "match", "authority"), None),
    "missing default": _set(("default",), _DELETE),
    "missing limits": _set((*R0, "limits"), _DELETE),
    "version 2": _set(("v",), 2),
    "bool multiplier": _set((*R0, "profile"), [True, 1.0, 1.0]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_policy_refused_at_sign_time(case: str) -> None:
    fields = good_fields()
    BAD[case](fields)
    with pytest.raises(PolicyError):
        sign_policy(fields, WORLD.root, T)


def sign_raw(body: dict[str, Any], key: SigningKey = WORLD.root) -> bytes:
    """Signed bytes of ``body`` exactly as given: no normalization, no checks."""
    data = encoding.encode(body)
    return encoding.encode([data, key.sign("policy", data)])


def full(fields: dict[str, Any]) -> dict[str, Any]:
    return {"v": 1, **fields, "signer": WORLD.root.key_id, "time": T}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_policy_refused_at_parse_time(case: str) -> None:
    body = full(sign_policy(good_fields(), WORLD.root, T).policy)
    BAD[case](body)
    with pytest.raises(PolicyError):
        parse_policy(sign_raw(body))


@pytest.mark.parametrize(
    "mutate",
    [
        _set((*R0, "profile"), [1, 1, 1]),  # ints: the signed form carries floats only
        _set((*R0, "limits"), [None, 5, 1.0]),
        _set((*R0, "match", "min_confidence"), 1),
        _set((*R0, "profile"), [1.0, 0.0, -0.0]),  # -0.0 has its own encoding; refused
    ],
)
def test_parse_refuses_non_canonical_numbers(mutate: Callable[[dict[str, Any]], None]) -> None:
    body = full(sign_policy(good_fields(), WORLD.root, T).policy)
    mutate(body)
    with pytest.raises(PolicyError):
        parse_policy(sign_raw(body))


def test_sign_normalizes_ints_and_negative_zero() -> None:
    fields = good_fields()
    fields["rules"][0]["profile"] = [1, 1, -0.0]
    fields["rules"][0]["limits"] = [None, 5, 1]
    sp = sign_policy(fields, WORLD.root, T)
    rule = sp.policy["rules"][0]
    assert rule["profile"] == [1.0, 1.0, 0.0] and all(type(x) is float for x in rule["profile"])
    assert math.copysign(1.0, rule["profile"][2]) == 1.0
    assert rule["limits"] == [None, 5.0, 1.0] and type(rule["limits"][1]) is float


@FEW
@given(st.integers(2, 4).flatmap(lambda n: st.tuples(st.just(n), st.lists(unit, min_size=n, max_size=n))))
def test_profiles_must_be_non_increasing(case: tuple[int, list[float]]) -> None:
    n, profile = case
    fields = {"name": "p", "bands": BAND_NAMES[:n], "rules": [],
              "default": {"profile": profile, "limits": [None] * n}}
    monotone = all(profile[k] <= profile[k - 1] for k in range(1, n))
    if monotone:
        sp = sign_policy(fields, WORLD.root, T)
        assert parse_policy(sp.signed).policy == sp.policy
    else:
        with pytest.raises(PolicyError, match="non-increasing"):
            sign_policy(fields, WORLD.root, T)
        with pytest.raises(PolicyError, match="non-increasing"):
            parse_policy(sign_raw(full(fields)))


def test_sign_refuses_conflicting_signer_or_time() -> None:
    with pytest.raises(PolicyError):
        sign_policy({**good_fields(), "time": T + 1}, WORLD.root, T)
    with pytest.raises(PolicyError):
        sign_policy({**good_fields(), "signer": WORLD.trainer.key_id}, WORLD.root, T)
    # Re-signing a parsed policy's own map is fine: the fields agree.
    sp = sign_policy(good_fields(), WORLD.root, T)
    assert sign_policy(sp.policy, WORLD.root, T).signed == sp.signed


# -- the signed form -------------------------------------------------------------


def registry_of(world: World, *, root_cred: C.Credential | None = None) -> CredentialRegistry:
    registry = CredentialRegistry(trusted_roots=frozenset({world.root.public_key}))
    for cred in (root_cred or world.root_cred, world.trainer_cred, world.authority_cred, world.source_cred):
        registry.add(cred.signed, 0)
    return registry


REGISTRY = registry_of(WORLD)


@FEW
@given(policies(), st.integers(0, (1 << 63) - 1))
def test_sign_parse_round_trip_is_byte_identical(fields: dict[str, Any], time: int) -> None:
    sp = sign_policy(fields, WORLD.root, time)
    again = parse_policy(sp.signed)
    assert again.signed == sp.signed and again.policy == sp.policy and again.digest == sp.digest
    assert sp.digest == hashlib.sha256(sp.signed).digest()
    data, signature = encoding.decode(sp.signed)
    assert encoding.encode(again.policy) == data and len(signature) == 64
    # Ed25519 is deterministic and the encoding canonical: signing again gives the same bytes.
    assert sign_policy(fields, WORLD.root, time).signed == sp.signed
    assert sp.signer == WORLD.root.key_id and sp.time == time and sp.bands == tuple(fields["bands"])
    verify_policy(again, REGISTRY)


@FEW
@given(st.data())
def test_tampering_is_refused(data: st.DataObject) -> None:
    sp = sign_policy(good_fields(), WORLD.root, T)
    position = data.draw(st.integers(0, len(sp.signed) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(sp.signed)
    tampered[position] ^= flip
    with pytest.raises(PolicyError):
        verify_policy(parse_policy(bytes(tampered)), REGISTRY)


def test_valid_policy_bytes_under_another_signature_refused() -> None:
    one = sign_policy(good_fields(), WORLD.root, T)
    other_fields = good_fields()
    other_fields["default"]["profile"] = [1.0, 1.0, 1.0]  # the edit an insider would want
    other = sign_policy(other_fields, WORLD.root, T)
    data, _ = encoding.decode(other.signed)
    _, signature = encoding.decode(one.signed)
    spliced = parse_policy(encoding.encode([data, signature]))
    with pytest.raises(PolicyError, match="not signed by the governance root"):
        verify_policy(spliced, REGISTRY)


@pytest.mark.parametrize("who", ["authority", "trainer", "source"])
def test_policy_signed_by_non_root_refused(who: str) -> None:
    sp = sign_policy(good_fields(), getattr(WORLD, who), T)
    with pytest.raises(PolicyError, match="not signed by the governance root"):
        verify_policy(sp, REGISTRY)


def test_policy_signed_by_unknown_or_expired_root_refused() -> None:
    stranger = SigningKey.from_seed(b"\x99" * 32, "stranger")
    with pytest.raises(PolicyError, match="not signed by the governance root"):
        verify_policy(sign_policy(good_fields(), stranger, T), REGISTRY)
    short_root = C.issue_root(WORLD.root, subject="acme-root", path="acme", not_before=0, not_after=T - 1)
    registry = CredentialRegistry()
    registry.add(short_root.signed, 0)
    with pytest.raises(PolicyError, match="not signed by the governance root"):
        verify_policy(sign_policy(good_fields(), WORLD.root, T), registry)
    verify_policy(sign_policy(good_fields(), WORLD.root, T - 1), registry)


def test_parse_refuses_garbage() -> None:
    sp = sign_policy(good_fields(), WORLD.root, T)
    data, signature = encoding.decode(sp.signed)
    for bad in (b"", b"\x80", encoding.encode([data]), encoding.encode([data, signature[:63]]),
                encoding.encode([data, signature, b""]), encoding.encode({"policy": data}),
                encoding.encode([encoding.encode([1, 2]), signature]), sp.signed + b"\x00"):
        with pytest.raises(PolicyError):
            parse_policy(bad)


# -- adoption into a ledger -------------------------------------------------------


def genesis_ledger(path: Path) -> tuple[Ledger, World]:
    from helpers import genesis

    ledger = Ledger.create(path)
    genesis(ledger, WORLD)
    return ledger, WORLD


def test_adopt_and_load(tmp_path: Path) -> None:
    ledger, world = genesis_ledger(tmp_path / "ledger")
    assert latest_adopted(ledger) is None
    sp = sign_policy(good_fields(), world.root, T)
    seq = adopt_policy(ledger, sp, world.root)
    assert seq == ledger.size - 1
    body = ledger.observation(seq).body
    assert body == {"policy": sp.signed, "digest": hashlib.sha256(sp.signed).digest()}
    ledger.verify()
    ledger.verify(trusted_roots=[world.root.public_key])
    loaded = load_adopted(ledger, seq)
    assert isinstance(loaded, SignedPolicy) and loaded.digest == sp.digest and loaded.signed == sp.signed
    assert latest_adopted(ledger) == (seq, loaded)
    with pytest.raises(PolicyError, match="not a PolicyAdopted"):
        load_adopted(ledger, 0)
    with pytest.raises(PolicyError):
        load_adopted(ledger, ledger.size + 5)
    ledger.close()
    reader = Ledger.open(tmp_path / "ledger")
    try:
        assert load_adopted(reader, seq).digest == sp.digest
        reader.verify(trusted_roots=[world.root.public_key])
    finally:
        reader.close()


def test_adoption_refused_unless_root(tmp_path: Path) -> None:
    ledger, world = genesis_ledger(tmp_path / "ledger")
    size, root = ledger.size, ledger.root
    with pytest.raises(PolicyError, match="not signed by the governance root"):
        adopt_policy(ledger, sign_policy(good_fields(), world.authority, T), world.authority)
    with pytest.raises(PolicyError, match="not signed by the governance root"):
        adopt_policy(ledger, sign_policy(good_fields(), world.trainer, T), world.root)
    with pytest.raises(PolicyError, match="governance root"):
        adopt_policy(ledger, sign_policy(good_fields(), world.root, T), world.trainer)
    assert (ledger.size, ledger.root) == (size, root)
    # The ledger is still usable after the refusals.
    seq = adopt_policy(ledger, sign_policy(good_fields(), world.root, T), world.root)
    ledger.verify()
    assert load_adopted(ledger, seq).signer == world.root.key_id
    ledger.close()
