"""The signed routing policy and its deterministic evaluation (specs/policy.md).

A policy maps an example's manifest (who labeled it, under which authority,
how confidently, with what review) to a depth profile: one gradient multiplier
per band, head first, plus per-band gradient-norm limits. The governance root
signs it; the ledger records its adoption; the trainer routes by it; and the
verifier recomputes every routing from the manifests and the spec, without
importing this module. Hence evaluation is a pure function of (policy,
manifest, source paths) with no floating-point arithmetic at all: only
comparisons of the float64 values as they were signed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

from gradledger.ledger import encoding
from gradledger.ledger import schema as s
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.errors import (
    CredentialError,
    EncodingError,
    SchemaError,
    SignatureError,
)
from gradledger.ledger.keys import SIGNATURE_SIZE, SigningKey, verify_signature
from gradledger.ledger.ledger import Ledger

from .errors import ManifestError, PolicyError

if TYPE_CHECKING:  # torch is only needed to build the gate's input tensor
    import torch

POLICY_VERSION = 1
#: The signed form is what PolicyAdopted carries, and that field is capped at 1 MiB.
MAX_SIGNED_POLICY = 1 << 20
#: GovernedUpdate norm arrays hold at most 64 entries, one per band.
MAX_BANDS = 64
MAX_RULES = 1024
MAX_AGGREGATIONS = 64
REVIEW_STATES = ("accepted", "fixed", "rejected", "pending")
#: The name a Routing carries when no rule matched (its index is -1).
DEFAULT_NAME = "default"
DEFAULT_INDEX = -1
#: specs/policy.md §3: a reference canary's routing, whatever the rules say (it writes into no band).
CANARY_REFERENCE_NAME = "canary-reference"
CANARY_REFERENCE_INDEX = -2

Profile = tuple[float, ...]
Limits = tuple[float | None, ...]


# -- schema ------------------------------------------------------------------


def _unit(value: Any, where: str) -> None:
    # Floats only, and never -0.0: one value, one encoding, so two policies
    # that mean the same thing cannot differ in bytes through 1 vs 1.0.
    if type(value) is not float or not 0.0 <= value <= 1.0 or math.copysign(1.0, value) < 0:
        raise SchemaError(f"{where}: expected a float in [0.0, 1.0] (not -0.0), got {value!r}")


def _limit(value: Any, where: str) -> None:
    if value is None:
        return
    if type(value) is not float or not math.isfinite(value) or not value > 0.0:
        raise SchemaError(f"{where}: expected a positive finite float or null, got {value!r}")


def _distinct(item: s.Check, max_items: int) -> s.Check:
    inner = s.array(item, max_items=max_items, min_items=1)

    def check(value: Any, where: str) -> None:
        inner(value, where)
        if len(set(value)) != len(value):
            raise SchemaError(f"{where}: entries must be distinct")

    return check


MATCH_SCHEMA = s.record(
    "match",
    authority=(s.path, False),
    min_confidence=(_unit, False),
    max_confidence=(_unit, False),
    min_consensus=(_unit, False),
    review=(_distinct(s.one_of(*REVIEW_STATES), len(REVIEW_STATES)), False),
    aggregation=(_distinct(s.name, MAX_AGGREGATIONS), False),
    memorized=(s.boolean, False),
)
_PROFILE = s.array(_unit, max_items=MAX_BANDS)
_LIMITS = s.array(_limit, max_items=MAX_BANDS)
def _budget_bits(value: Any, where: str) -> None:
    if type(value) is not float or not math.isfinite(value) or not value > 0.0:
        raise SchemaError(f"{where}: expected a positive finite float (bits), got {value!r}")


#: specs/dynamics.md §5.5: a rule's entropy budget, the most its band's mean profile may move between checkpoints.
def _slice_name(value: Any, where: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise SchemaError(f"{where}: expected a slice name of 1 to 256 characters, got {value!r}")


def _true(value: Any, where: str) -> None:
    # Present only as true: one meaning, one encoding (absent is not private).
    if value is not True:
        raise SchemaError(f"{where}: expected true (omit the field for a rule that is not private), got {value!r}")


BUDGET_SCHEMA = s.record("entropy_budget", band=s.name, max_change=_budget_bits, slice=(_slice_name, False))
RULE_SCHEMA = s.record("rule", name=s.name, match=MATCH_SCHEMA, profile=_PROFILE, limits=_LIMITS,
                       entropy_budget=(BUDGET_SCHEMA, False), private=(_true, False))


def _delta(value: Any, where: str) -> None:
    if type(value) is not float or not 0.0 < value < 1.0:
        raise SchemaError(f"{where}: expected a float in (0, 1), got {value!r}")


#: specs/privacy.md §1: per band, the clip norm and noise multiplier of private examples (null: none reach it).
PRIVACY_SCHEMA = s.record("privacy", clip=_LIMITS, noise=_LIMITS, delta=_delta)
DEFAULT_SCHEMA = s.record("default", profile=_PROFILE, limits=_LIMITS)
POLICY_SCHEMA = s.record(
    "policy",
    v=s.one_of(POLICY_VERSION),
    name=s.name,
    bands=_distinct(s.name, MAX_BANDS),
    rules=s.array(RULE_SCHEMA, max_items=MAX_RULES),
    default=DEFAULT_SCHEMA,
    signer=s.digest,
    time=s.uint,
    monitors=(s.record("monitors", memorization=(s.record("memorization", fraction=_unit, min_trace=s.uint,
                                                             method=(s.one_of("mean-loss"), False)), False)),
              False),
    privacy=(PRIVACY_SCHEMA, False),
)


def _check_semantics(policy: Mapping[str, Any]) -> None:
    """The rules CDDL cannot say: lengths agree with the bands, profiles never grow with depth; a required
    memorization scan's parameters in range (specs/dynamics.md §1.1)."""
    scan = policy.get("monitors", {}).get("memorization")
    if scan is not None:
        from .dynamics.memorization import MAX_MIN_TRACE

        if not 0.0 < scan["fraction"] <= 1.0 or not 2 <= scan["min_trace"] <= MAX_MIN_TRACE:
            raise SchemaError(f"policy.monitors.memorization: fraction must be in (0, 1] and min_trace in "
                              f"[2, {MAX_MIN_TRACE}], got {scan['fraction']!r}, {scan['min_trace']!r}")
    n = len(policy["bands"])
    privacy = policy.get("privacy")
    if privacy is not None:
        clip, noise = privacy["clip"], privacy["noise"]
        if len(clip) != n or len(noise) != n:
            raise SchemaError(f"policy.privacy: clip and noise need one entry per band ({n})")
        if [c is None for c in clip] != [z is None for z in noise] or all(c is None for c in clip):
            raise SchemaError("policy.privacy: a band has both a clip and a noise multiplier or neither, and at "
                              "least one band has them")
        if scan is not None or any("entropy_budget" in r for r in policy["rules"]):
            # A rule that stops matching would hand a private example to the next rule (budgets, flags).
            raise SchemaError("policy.privacy: not with memorization monitors or entropy budgets "
                              "(specs/privacy.md §1): a private example's rule must not change under it")
    names: set[str] = set()
    outcomes = [(f"policy.rules[{i}]", rule) for i, rule in enumerate(policy["rules"])]
    outcomes.append(("policy.default", policy["default"]))
    for where, outcome in outcomes:
        profile, limits = outcome["profile"], outcome["limits"]
        if len(profile) != n or len(limits) != n:
            raise SchemaError(f"{where}: profile and limits need one entry per band ({n})")
        for k in range(1, n):
            if profile[k] > profile[k - 1]:
                # A deeper band may never learn more from an example than a
                # shallower one: the gate's boundary scaling compounds that way.
                raise SchemaError(
                    f"{where}.profile: band {k} ({profile[k]}) exceeds band {k - 1} ({profile[k - 1]});"
                    " profiles must be non-increasing from the head"
                )
        if "match" in outcome:
            match = outcome["match"]
            if outcome["name"] in names:
                raise SchemaError(f"{where}: rule name {outcome['name']!r} is used twice")
            names.add(outcome["name"])
            low, high = match.get("min_confidence"), match.get("max_confidence")
            if low is not None and high is not None and low > high:
                # Such a rule can never match; it is a mistake, not a policy.
                raise SchemaError(f"{where}.match: min_confidence {low} exceeds max_confidence {high}")
            budget = outcome.get("entropy_budget")
            if budget is not None and budget["band"] not in policy["bands"]:
                raise SchemaError(f"{where}.entropy_budget: band {budget['band']!r} is not one of the policy's bands")
            if outcome.get("private"):
                if privacy is None:
                    raise SchemaError(f"{where}.private: needs policy.privacy, the clip and noise of each band")
                reach = [k for k in range(n) if profile[k] != 0.0 and privacy["clip"][k] is None]
                if reach:
                    raise SchemaError(f"{where}: a private rule reaches band {reach[0]}, which has no clip and noise "
                                      "in policy.privacy")
            if "memorized" in match and scan is None:
                # The flags it matches are the ones the required scans record (specs/dynamics.md §2.4):
                # without the requirement a run could decide alone whether to flag anything.
                raise SchemaError(f"{where}.match: memorized needs monitors.memorization, the scans that flag")


def validate_policy(policy: Any) -> None:
    """Raise ``PolicyError`` unless ``policy`` is a well-formed policy map (specs/policy.md §1)."""
    try:
        POLICY_SCHEMA.validate(policy)
        _check_semantics(policy)
    except SchemaError as exc:
        raise PolicyError(f"malformed routing policy: {exc}") from None


def _floats(value: Any) -> Any:
    """Ints in numeric positions become floats, so callers may write ``[1, 0.5, 0]``."""
    if type(value) is int:
        return float(value)
    if type(value) is float and value == 0.0:
        return 0.0  # folds -0.0, which the format refuses
    return value


def normalize_policy(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` with numeric entries as floats; nothing else is touched or checked."""
    out = dict(fields)

    def outcome(o: Any) -> Any:
        if not isinstance(o, Mapping):
            return o
        o = dict(o)
        for key in ("profile", "limits"):
            if isinstance(o.get(key), (list, tuple)):
                o[key] = [_floats(x) for x in o[key]]
        if isinstance(o.get("match"), Mapping):
            match = dict(o["match"])
            for key in ("min_confidence", "max_confidence", "min_consensus"):
                if key in match:
                    match[key] = _floats(match[key])
            for key in ("review", "aggregation"):
                if isinstance(match.get(key), tuple):
                    match[key] = list(match[key])
            o["match"] = match
        if isinstance(o.get("entropy_budget"), Mapping) and "max_change" in o["entropy_budget"]:
            o["entropy_budget"] = {**o["entropy_budget"], "max_change": _floats(o["entropy_budget"]["max_change"])}
        return o

    if isinstance(out.get("rules"), (list, tuple)):
        out["rules"] = [outcome(r) for r in out["rules"]]
    if "default" in out:
        out["default"] = outcome(out["default"])
    scan = out.get("monitors", {}).get("memorization") if isinstance(out.get("monitors"), Mapping) else None
    if isinstance(scan, Mapping) and "fraction" in scan:
        out["monitors"] = {**out["monitors"], "memorization": {**scan, "fraction": _floats(scan["fraction"])}}
    if isinstance(out.get("privacy"), Mapping):
        privacy = dict(out["privacy"])
        for key in ("clip", "noise"):
            if isinstance(privacy.get(key), (list, tuple)):
                privacy[key] = [_floats(x) for x in privacy[key]]
        out["privacy"] = privacy
    if isinstance(out.get("bands"), tuple):
        out["bands"] = list(out["bands"])
    return out


# -- compiled form -------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    index: int
    name: str
    authority: str | None
    min_confidence: float | None
    max_confidence: float | None
    min_consensus: float | None
    review: frozenset[str] | None
    aggregation: frozenset[str] | None
    memorized: bool | None
    profile: Profile
    limits: Limits
    #: specs/dynamics.md §5.5: (band index, max_change in bits, the slice it reads or None), or None.
    budget: tuple[int, float, str | None] | None = None
    #: specs/privacy.md §1: its examples are clipped and noised.
    private: bool = False


class Routing(NamedTuple):
    """Where one example's gradient may go: the rule that decided it and what it gives."""

    rule: int  # index into policy.rules, -1 for the default, -2 for a reference canary
    name: str  # the rule's name, "default" or "canary-reference"
    profile: Profile  # one multiplier per band, head first
    limits: Limits  # one max gradient L2 norm per band, None for none


class CompiledPolicy:
    """A validated policy in the shape evaluation needs; immutable once built."""

    def __init__(self, policy: Mapping[str, Any]) -> None:
        validate_policy(policy)
        self.bands: tuple[str, ...] = tuple(policy["bands"])
        rules: list[_Rule] = []
        for i, rule in enumerate(policy["rules"]):
            m = rule["match"]
            rules.append(
                _Rule(
                    index=i,
                    name=rule["name"],
                    authority=m.get("authority"),
                    min_confidence=m.get("min_confidence"),
                    max_confidence=m.get("max_confidence"),
                    min_consensus=m.get("min_consensus"),
                    review=frozenset(m["review"]) if "review" in m else None,
                    aggregation=frozenset(m["aggregation"]) if "aggregation" in m else None,
                    memorized=m.get("memorized"),
                    profile=tuple(rule["profile"]),
                    limits=tuple(rule["limits"]),
                    budget=None if "entropy_budget" not in rule else (
                        list(policy["bands"]).index(rule["entropy_budget"]["band"]),
                        rule["entropy_budget"]["max_change"], rule["entropy_budget"].get("slice")),
                    private=rule.get("private", False),
                )
            )
        self.rules: tuple[_Rule, ...] = tuple(rules)
        default = policy["default"]
        self.default = Routing(DEFAULT_INDEX, DEFAULT_NAME, tuple(default["profile"]), tuple(default["limits"]))
        self.routings: tuple[Routing, ...] = tuple(Routing(r.index, r.name, r.profile, r.limits) for r in rules)
        n = len(self.bands)
        self.canary_reference = Routing(CANARY_REFERENCE_INDEX, CANARY_REFERENCE_NAME, (0.0,) * n, (None,) * n)
        #: Whether routing reads the memorization flags in force (specs/dynamics.md §2.4).
        self.matches_flags = any(r.memorized is not None for r in rules)
        #: specs/dynamics.md §5.5: rule index -> (band index, max_change, slice) of the rules with an entropy budget.
        self.budgets: dict[int, tuple[int, float, str | None]] = {r.index: r.budget for r in rules
                                                                  if r.budget is not None}
        #: specs/privacy.md §1: the policy's privacy section (clip, noise, delta) and its private rules' indices.
        self.privacy: dict[str, Any] | None = dict(policy["privacy"]) if "privacy" in policy else None
        self.private_rules: frozenset[int] = frozenset(r.index for r in rules if r.private)

    def routing_of(self, rule: int) -> Routing:
        """The outcome of rule ``rule`` (-1: the default; -2: a reference canary's)."""
        if rule == DEFAULT_INDEX:
            return self.default
        if rule == CANARY_REFERENCE_INDEX:
            return self.canary_reference
        if not 0 <= rule < len(self.routings):
            raise PolicyError(f"policy has no rule {rule}")
        return self.routings[rule]


# -- signed form ---------------------------------------------------------------


@dataclass(frozen=True)
class SignedPolicy:
    """A parsed signed policy. ``policy`` is the decoded map; do not mutate it."""

    policy: dict[str, Any]
    signed: bytes  # canonical CBOR [policy_bytes, signature]
    digest: bytes  # SHA-256(signed): what PolicyAdopted and GovernedUpdate name

    @cached_property
    def compiled(self) -> CompiledPolicy:
        return CompiledPolicy(self.policy)

    @property
    def bands(self) -> tuple[str, ...]:
        return self.compiled.bands

    @property
    def monitors(self) -> dict[str, Any]:
        """What every run under this policy must record at its checkpoints (specs/policy.md §1)."""
        return dict(self.policy.get("monitors", {}))

    @property
    def signer(self) -> bytes:
        return self.policy["signer"]

    @property
    def time(self) -> int:
        return self.policy["time"]


def sign_policy(policy_fields: Mapping[str, Any], root_key: SigningKey, time: int) -> SignedPolicy:
    """Complete ``policy_fields`` (name, bands, rules, default) with v, signer and time, check and sign it.

    Numbers may be given as ints; they are signed as floats. ``signer`` and
    ``time`` are set here; if the fields carry them they must agree.
    """
    fields = normalize_policy(policy_fields)
    for key, value in (("v", POLICY_VERSION), ("signer", root_key.key_id), ("time", time)):
        if key in fields and fields[key] != value:
            raise PolicyError(f"policy field {key!r} is {fields[key]!r}, but sign_policy sets it to {value!r}")
        fields[key] = value
    validate_policy(fields)
    data = encoding.encode(fields)
    signed = encoding.encode([data, root_key.sign("policy", data)])
    if len(signed) > MAX_SIGNED_POLICY:
        raise PolicyError(f"signed policy is {len(signed)} bytes, limit is {MAX_SIGNED_POLICY}")
    return parse_policy(signed)


def _parts(signed: bytes) -> tuple[bytes, bytes]:
    outer = encoding.decode(signed, max_size=MAX_SIGNED_POLICY)
    if type(outer) is not list or len(outer) != 2 or not all(type(x) is bytes for x in outer):
        raise SchemaError("signed policy must be [policy bytes, signature]")
    if len(outer[1]) != SIGNATURE_SIZE:
        raise SchemaError(f"policy signature must be {SIGNATURE_SIZE} bytes")
    return outer[0], outer[1]


def parse_policy(signed: bytes) -> SignedPolicy:
    """Decode and fully check a signed policy's form; the signature is checked by ``verify_policy``."""
    if type(signed) is not bytes:
        raise PolicyError("a signed policy is a byte string")
    try:
        data, _ = _parts(signed)
        policy = encoding.decode(data, max_size=MAX_SIGNED_POLICY)
    except (EncodingError, SchemaError) as exc:
        raise PolicyError(f"malformed signed policy: {exc}") from None
    sp = SignedPolicy(policy, signed, hashlib.sha256(signed).digest())
    sp.compiled  # validates, and leaves the compiled form ready for routing
    return sp


def verify_policy(sp: SignedPolicy, registry: CredentialRegistry) -> None:
    """Raise ``PolicyError`` unless a root credential valid at the policy's time signed it."""
    try:
        cred = registry.check(sp.signer, sp.time, ("root",), what="sign a routing policy")
    except CredentialError as exc:
        raise PolicyError(f"policy {sp.policy['name']!r} is not signed by the governance root: {exc}") from None
    data, signature = _parts(sp.signed)
    try:
        verify_signature(cred.public_key, "policy", data, signature)
    except SignatureError:
        raise PolicyError(
            f"policy {sp.policy['name']!r} is not signed by the governance root: bad signature"
        ) from None


# -- ledger --------------------------------------------------------------------


def adopt_policy(ledger: Ledger, sp: SignedPolicy, root_key: SigningKey, *, time: int | None = None) -> int:
    """Record (and commit) a PolicyAdopted observation for ``sp`` signed by ``root_key``; return its seq.

    The policy is verified against the ledger's credentials first, so a policy
    that the verifier would refuse never enters the log.
    """
    verify_policy(sp, ledger.registry)
    body = {"policy": sp.signed, "digest": hashlib.sha256(sp.signed).digest()}
    try:
        sealed = ledger.append("PolicyAdopted", body, root_key, time=time, commit=True)
    except CredentialError as exc:
        raise PolicyError(f"only the governance root may adopt a policy: {exc}") from None
    return sealed.seq


def load_adopted(ledger: Ledger, seq: int, registry: CredentialRegistry | None = None) -> SignedPolicy:
    """The policy adopted at ``seq``, parsed and verified (against ``registry``, default the ledger's)."""
    sealed = ledger.observation_of_type(seq, "PolicyAdopted", PolicyError)
    sp = parse_policy(sealed.body["policy"])
    if sp.digest != sealed.body["digest"]:
        raise PolicyError(f"observation {seq}: policy digest does not match the policy")
    verify_policy(sp, ledger.registry if registry is None else registry)
    return sp


def latest_adopted(ledger: Ledger) -> tuple[int, SignedPolicy] | None:
    """The most recently adopted policy and its seq, or None if none was adopted."""
    seqs = ledger.by_type("PolicyAdopted")
    if not seqs:
        return None
    return seqs[-1], load_adopted(ledger, seqs[-1])


# -- evaluation ----------------------------------------------------------------


def _compiled(policy: SignedPolicy | CompiledPolicy | Mapping[str, Any]) -> CompiledPolicy:
    if isinstance(policy, SignedPolicy):
        return policy.compiled
    if isinstance(policy, CompiledPolicy):
        return policy
    if not isinstance(policy, Mapping):
        raise PolicyError(f"expected a policy, got {type(policy).__name__}")
    return CompiledPolicy(normalize_policy(policy))


def _fraction(manifest: Mapping[str, Any], key: str) -> float | int:
    value = manifest.get(key)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ManifestError(f"manifest {key} must be a finite number, got {value!r}")
    return value


def _facts(
    manifest: Mapping[str, Any], source_paths: Mapping[str, str]
) -> tuple[tuple[str, ...], float | int, float | int, str, str]:
    """The manifest fields routing reads, checked: paths, confidence, consensus, review, aggregation."""
    if not isinstance(manifest, Mapping):
        raise ManifestError("a manifest is a map")
    sources = manifest.get("sources")
    if type(sources) is not list:
        raise ManifestError("manifest sources must be an array")
    paths: list[str] = []
    for entry in sources:
        name = entry.get("source") if isinstance(entry, Mapping) else None
        if type(name) is not str:
            raise ManifestError("manifest source entries must name their source")
        path = source_paths.get(name)
        if type(path) is not str:
            # Not "no match": an unresolved source could otherwise fall to a
            # default more permissive than the rule it should have hit.
            raise ManifestError(f"source {name!r} has no credential path to route by")
        paths.append(path)
    review, aggregation = manifest.get("review"), manifest.get("aggregation")
    if review not in REVIEW_STATES:
        raise ManifestError(f"manifest review must be one of {', '.join(REVIEW_STATES)}, got {review!r}")
    if type(aggregation) is not str:
        raise ManifestError(f"manifest aggregation must be text, got {aggregation!r}")
    return tuple(paths), _fraction(manifest, "confidence"), _fraction(manifest, "consensus"), review, aggregation


def is_reference_canary(manifest: Mapping[str, Any]) -> bool:
    canary = manifest.get("canary")
    return isinstance(canary, Mapping) and canary.get("role") == "reference"


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def route(
    policy: SignedPolicy | CompiledPolicy | Mapping[str, Any],
    manifest: Mapping[str, Any],
    source_paths: Mapping[str, str],
    flagged: bool = False,
    suspended: frozenset[int] = frozenset(),
) -> Routing:
    """The routing of one example: the first rule whose every condition holds, else the default.

    ``source_paths`` maps each source name in the manifest to its credential's
    authority path (the caller resolves names through the registry); ``flagged``:
    whether the example is among the memorization flags in force at the step
    (specs/dynamics.md §2.4), read only by a rule's ``memorized`` condition. A reference canary
    (specs/dynamics.md §4) writes into no band whatever the rules say: its recorded losses are those of
    an example the model never learned. ``suspended``: the rules whose entropy budget the last checkpoint's
    depth profile exceeded (specs/dynamics.md §5.5, ``suspended_rules``): they match nothing.
    """
    compiled = _compiled(policy)
    paths, confidence, consensus, review, aggregation = _facts(manifest, source_paths)
    if is_reference_canary(manifest):
        return compiled.canary_reference
    for rule in compiled.rules:
        if rule.index in suspended:
            continue
        # Authority is all-sources: a mixed expert + crowd label is not expert.
        # No sources at all proves no authority.
        if rule.authority is not None and not (paths and all(_under(p, rule.authority) for p in paths)):
            continue
        if rule.min_confidence is not None and not confidence >= rule.min_confidence:
            continue
        if rule.max_confidence is not None and not confidence <= rule.max_confidence:
            continue
        if rule.min_consensus is not None and not consensus >= rule.min_consensus:
            continue
        if rule.review is not None and review not in rule.review:
            continue
        if rule.aggregation is not None and aggregation not in rule.aggregation:
            continue
        if rule.memorized is not None and rule.memorized != flagged:
            continue
        return compiled.routings[rule.index]
    return compiled.default


def profile_reading(profile: Mapping[str, Any], band: int, slice_name: str | None) -> float | None:
    """specs/dynamics.md §5.5: what a budget reads of a DepthProfile body: band ``band``'s ``mean``, or its
    entropy over slice ``slice_name``; None where the profile holds no such slice."""
    if slice_name is None:
        return profile["mean"][band]
    slices = profile.get("slices") or {}
    names = slices.get("names", [])
    return slices["entropy"][band][names.index(slice_name)] if slice_name in names else None


def suspended_rules(policy: SignedPolicy | CompiledPolicy | Mapping[str, Any], before: Mapping[str, Any] | None,
                    now: Mapping[str, Any]) -> frozenset[int]:
    """specs/dynamics.md §5.5: the rules whose entropy budget a checkpoint's depth profile ``now`` exceeds: what
    the budget reads (``profile_reading``) moved by more than ``max_change`` bits since the previous
    checkpoint's profile ``before`` (None at the first checkpoint, where nothing is suspended). A budget
    whose slice a profile lacks suspends its rule: a budget that cannot be read is not kept."""
    if before is None:
        return frozenset()
    out = set()
    for i, (band, most, slice_name) in _compiled(policy).budgets.items():
        a, b = profile_reading(before, band, slice_name), profile_reading(now, band, slice_name)
        if a is None or b is None or abs(b - a) > most:
            out.add(i)
    return frozenset(out)


def route_batch(
    policy: SignedPolicy | CompiledPolicy | Mapping[str, Any],
    manifests: Iterable[Mapping[str, Any]],
    source_paths: Mapping[str, str],
) -> tuple[list[Profile], list[int]]:
    """``route`` over a batch: per example its profile and its rule index (-1: default)."""
    compiled = _compiled(policy)
    routings = [route(compiled, m, source_paths) for m in manifests]
    return [r.profile for r in routings], [r.rule for r in routings]


def batch_limits(policy: SignedPolicy | CompiledPolicy | Mapping[str, Any], rules: Sequence[int]) -> Limits:
    """The per-band norm limits of a batch whose examples were routed by ``rules``.

    Band k is limited by the smallest limit among the examples that write into
    it (multiplier > 0); an example that does not write into band k cannot
    constrain it, and a null limit constrains nothing. None where unconstrained.
    """
    compiled = _compiled(policy)
    out: list[float | None] = [None] * len(compiled.bands)
    for index in dict.fromkeys(rules):  # each distinct rule once; the minimum does not care about order
        routing = compiled.routing_of(index)
        for k, (multiplier, limit) in enumerate(zip(routing.profile, routing.limits)):
            if multiplier > 0.0 and limit is not None and (out[k] is None or limit < out[k]):
                out[k] = limit
    return tuple(out)


def profiles_tensor(profiles: Sequence[Sequence[float]], n_bands: int | None = None) -> "torch.Tensor":
    """Profiles as a float32 tensor [B, n_bands] for the gate (each float64 rounded to nearest float32).

    ``n_bands`` gives the width of an empty batch and is checked otherwise.
    """
    import torch

    width = len(profiles[0]) if profiles else n_bands
    if width is None:
        raise PolicyError("an empty batch needs n_bands to shape its profile tensor")
    if (n_bands is not None and width != n_bands) or any(len(p) != width for p in profiles):
        raise PolicyError(f"every profile must have {n_bands if n_bands is not None else width} bands")
    if not profiles:
        return torch.zeros((0, width), dtype=torch.float32)
    return torch.tensor([list(p) for p in profiles], dtype=torch.float32)


__all__ = [
    "CompiledPolicy",
    "CANARY_REFERENCE_INDEX",
    "DEFAULT_INDEX",
    "DEFAULT_NAME",
    "MAX_SIGNED_POLICY",
    "POLICY_VERSION",
    "REVIEW_STATES",
    "Routing",
    "SignedPolicy",
    "adopt_policy",
    "batch_limits",
    "latest_adopted",
    "load_adopted",
    "normalize_policy",
    "parse_policy",
    "profiles_tensor",
    "route",
    "route_batch",
    "sign_policy",
    "validate_policy",
]
