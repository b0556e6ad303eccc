"""The signed routing policy and its evaluation, re-implemented from specs/policy.md.

Routing is comparisons only: the first rule whose every present condition holds, on the
binary64 values as signed, else the default. ``authority_writes`` is the one piece of
arithmetic the verifier recomputes here (specs/training.md §3.1): binary64 sums in batch order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from gradledger.ledger import encoding
from gradledger.ledger import schema as s
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.errors import CredentialError, EncodingError, SchemaError, SignatureError, VerificationError
from gradledger.ledger.keys import verify_signature

from .manifests import Manifest

MAX_SIGNED_POLICY = 1 << 20
REVIEWS = ("accepted", "fixed", "rejected", "pending")
DEFAULT = -1
#: §3: a reference canary's rule index; it writes into no band, whatever the rules say.
CANARY_REFERENCE = -2


class PolicyInvalid(VerificationError):
    """A routing policy breaks specs/policy.md, or is not signed by a governance root."""


class Unroutable(VerificationError):
    """An example cannot be routed: a source without a credential path, or malformed fields."""


def _unit(value: Any, where: str) -> None:
    if type(value) is not float or not 0.0 <= value <= 1.0 or math.copysign(1.0, value) < 0:
        raise SchemaError(f"{where}: expected a float in [0.0, 1.0], not -0.0, got {value!r}")


def _limit(value: Any, where: str) -> None:
    if value is not None and (type(value) is not float or not math.isfinite(value) or not value > 0.0):
        raise SchemaError(f"{where}: expected a positive finite float or null, got {value!r}")


def _distinct(item: s.Check, most: int) -> s.Check:
    inner = s.array(item, max_items=most, min_items=1)

    def check(value: Any, where: str) -> None:
        inner(value, where)
        if len(set(value)) != len(value):
            raise SchemaError(f"{where}: entries are not distinct")
    return check


_MATCH = s.record(
    "match",
    authority=(s.path, False),
    min_confidence=(_unit, False),
    max_confidence=(_unit, False),
    min_consensus=(_unit, False),
    review=(_distinct(s.one_of(*REVIEWS), 4), False),
    aggregation=(_distinct(s.name, 64), False),
    memorized=(s.boolean, False),
)
_PROFILE = s.array(_unit, max_items=64)
_LIMITS = s.array(_limit, max_items=64)
def _bits(value: Any, where: str) -> None:
    if type(value) is not float or not math.isfinite(value) or not value > 0.0:
        raise SchemaError(f"{where}: expected a positive finite float (bits), got {value!r}")


#: specs/dynamics.md §5.5: a rule's entropy budget.
def _slice(value: Any, where: str) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise SchemaError(f"{where}: expected a slice name of 1 to 256 characters, got {value!r}")


_BUDGET = s.record("entropy_budget", band=s.name, max_change=_bits, slice=(_slice, False))
def _true(value: Any, where: str) -> None:
    if value is not True:
        raise SchemaError(f"{where}: expected true, got {value!r}")


def _delta(value: Any, where: str) -> None:
    if type(value) is not float or not 0.0 < value < 1.0:
        raise SchemaError(f"{where}: expected a float in (0, 1), got {value!r}")


_RULE = s.record("rule", name=s.name, match=_MATCH, profile=_PROFILE, limits=_LIMITS, entropy_budget=(_BUDGET, False),
                 private=(_true, False))
#: specs/privacy.md §1.
_PRIVACY = s.record("privacy", clip=_LIMITS, noise=_LIMITS, delta=_delta)
_OUTCOME = s.record("default", profile=_PROFILE, limits=_LIMITS)
_POLICY = s.record(
    "policy", v=s.one_of(1), name=s.name, bands=_distinct(s.name, 64), rules=s.array(_RULE, max_items=1024),
    default=_OUTCOME, signer=s.digest, time=s.uint,
    monitors=(s.record("monitors", memorization=(s.record("memorization", fraction=_unit, min_trace=s.uint,
                                                             method=(s.one_of("mean-loss"), False)), False)),
              False),
    privacy=(_PRIVACY, False),
)


@dataclass(frozen=True)
class Outcome:
    profile: tuple[float, ...]
    limits: tuple[float | None, ...]


@dataclass(frozen=True)
class Rule:
    name: str
    match: dict[str, Any]
    outcome: Outcome
    #: specs/dynamics.md §5.5: (band index, max_change in bits, the slice it reads or None), or None.
    budget: tuple[int, float, str | None] | None = None
    private: bool = False  # specs/privacy.md §1


@dataclass(frozen=True)
class Policy:
    fields: dict[str, Any]
    signed: bytes
    body: bytes
    signature: bytes
    bands: tuple[str, ...]
    rules: tuple[Rule, ...]
    default: Outcome

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.signed).digest()

    @property
    def name(self) -> str:
        return self.fields["name"]

    @property
    def privacy(self) -> dict[str, Any] | None:
        """specs/privacy.md §1: ``{clip, noise, delta}``, or None for a policy without private rules."""
        return self.fields.get("privacy")

    @property
    def private_rules(self) -> frozenset[int]:
        return frozenset(i for i, r in enumerate(self.rules) if r.private)

    @property
    def matches_flags(self) -> bool:
        """Whether a rule reads the memorization flags in force (specs/dynamics.md §2.4)."""
        return any("memorized" in r.match for r in self.rules)

    @property
    def budgets(self) -> dict[int, tuple[int, float, str | None]]:
        """Rule index -> (band index, max_change, slice) of the rules with an entropy budget (dynamics.md §5.5)."""
        return {i: r.budget for i, r in enumerate(self.rules) if r.budget is not None}

    def suspended(self, before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> frozenset[int]:
        """§5.5: the rules the checkpoint profile ``now`` (a DepthProfile body) suspends against the previous
        checkpoint's ``before`` (None at the first: none): the band's mean, or a slice's entropy, moved by more
        than ``max_change``; a budget whose slice either profile lacks suspends its rule."""
        if before is None:
            return frozenset()
        out = set()
        for i, (band, most, name) in self.budgets.items():
            a, b = _reading(before, band, name), _reading(now, band, name)
            if a is None or b is None or abs(b - a) > most:
                out.add(i)
        return frozenset(out)

    @property
    def monitors(self) -> dict[str, Any]:
        """What every run under the policy must record at its checkpoints (specs/policy.md §1)."""
        return dict(self.fields.get("monitors", {}))

    def rule_name(self, rule: int) -> str:
        """§3: the name of rule ``rule``, ``"default"`` for -1 and ``"canary-reference"`` for -2."""
        if rule == DEFAULT:
            return "default"
        if rule == CANARY_REFERENCE:
            return "canary-reference"
        self.outcome(rule)  # refuses an index the policy lacks
        return self.rules[rule].name

    def outcome(self, rule: int) -> Outcome:
        if rule == DEFAULT:
            return self.default
        if rule == CANARY_REFERENCE:
            n = len(self.bands)
            return Outcome((0.0,) * n, (None,) * n)
        if not 0 <= rule < len(self.rules):
            raise PolicyInvalid(f"policy {self.name!r} has no rule {rule}")
        return self.rules[rule].outcome


def _reading(profile: Mapping[str, Any], band: int, name: str | None) -> float | None:
    """§5.5: a profile's band mean, or its entropy over slice ``name`` (None where it holds no such slice)."""
    if name is None:
        return profile["mean"][band]
    slices = profile.get("slices")
    if not isinstance(slices, Mapping) or name not in slices.get("names", []):
        return None
    return slices["entropy"][band][slices["names"].index(name)]


def _outcome(where: str, o: Mapping[str, Any], n: int) -> Outcome:
    profile, limits = tuple(o["profile"]), tuple(o["limits"])
    if len(profile) != n or len(limits) != n:
        raise PolicyInvalid(f"{where}: profile and limits need one entry per band ({n})")
    if any(profile[k] > profile[k - 1] for k in range(1, n)):
        raise PolicyInvalid(f"{where}: profile grows with depth")
    return Outcome(profile, limits)


def policy_from_fields(fields: dict[str, Any], signed: bytes = b"", body: bytes = b"", signature: bytes = b"") -> Policy:
    """Check §1 (schema and the rules beyond it) and build the evaluable form."""
    try:
        _POLICY.validate(fields)
    except SchemaError as exc:
        raise PolicyInvalid(f"malformed policy: {exc}") from None
    n = len(fields["bands"])
    rules = []
    for i, r in enumerate(fields["rules"]):
        m = r["match"]
        if "min_confidence" in m and "max_confidence" in m and m["min_confidence"] > m["max_confidence"]:
            raise PolicyInvalid(f"rule {i} ({r['name']!r}) can never match: min_confidence > max_confidence")
        if "memorized" in m and "memorization" not in fields.get("monitors", {}):
            raise PolicyInvalid(f"rule {i} ({r['name']!r}) matches memorization flags, but the policy requires no "
                                "memorization scans (monitors.memorization) to flag them")
        budget = r.get("entropy_budget")
        if budget is not None and budget["band"] not in fields["bands"]:
            raise PolicyInvalid(f"rule {i} ({r['name']!r}): entropy_budget band {budget['band']!r} is not a band")
        outcome = _outcome(f"rule {i} ({r['name']!r})", r, n)
        if r.get("private"):
            privacy = fields.get("privacy")
            if privacy is None:
                raise PolicyInvalid(f"rule {i} ({r['name']!r}) is private, but the policy has no privacy section")
            if any(p != 0.0 and privacy["clip"][k] is None for k, p in enumerate(outcome.profile)
                   if k < len(privacy["clip"])):
                raise PolicyInvalid(f"rule {i} ({r['name']!r}) is private and reaches a band without clip and noise")
        rules.append(Rule(r["name"], dict(m), outcome,
                          None if budget is None else (list(fields["bands"]).index(budget["band"]), budget["max_change"],
                                                       budget.get("slice")), bool(r.get("private"))))
    if len({r.name for r in rules}) != len(rules):
        raise PolicyInvalid("rule names are not distinct")
    default = _outcome("default", fields["default"], n)
    scan = fields.get("monitors", {}).get("memorization")
    privacy = fields.get("privacy")
    if privacy is not None:
        clip, noise = privacy["clip"], privacy["noise"]
        if len(clip) != n or len(noise) != n:
            raise PolicyInvalid(f"privacy: clip and noise need one entry per band ({n})")
        if [c is None for c in clip] != [z is None for z in noise] or all(c is None for c in clip):
            raise PolicyInvalid("privacy: a band has both a clip and a noise multiplier or neither, and one has them")
        if scan is not None or any(r.budget is not None for r in rules):
            raise PolicyInvalid("privacy: not with memorization monitors or entropy budgets (specs/privacy.md §1)")
    if scan is not None and not (0.0 < scan["fraction"] <= 1.0 and 2 <= scan["min_trace"] <= 1 << 20):
        raise PolicyInvalid("monitors.memorization: fraction must be in (0, 1] and min_trace in [2, 2**20]")
    return Policy(fields, signed, body, signature, tuple(fields["bands"]), tuple(rules), default)


def parse_policy(signed: bytes) -> Policy:
    """§2 parsing: canonical at both layers, at most 1 MiB, a 64-byte signature, a valid policy."""
    try:
        outer = encoding.decode(signed, max_size=MAX_SIGNED_POLICY)
        if type(outer) is not list or len(outer) != 2 or not all(type(x) is bytes for x in outer):
            raise SchemaError("a signed policy is [policy bytes, signature]")
        if len(outer[1]) != 64:
            raise SchemaError("the policy signature is not 64 bytes")
        fields = encoding.decode(outer[0], max_size=MAX_SIGNED_POLICY)
    except (EncodingError, SchemaError) as exc:
        raise PolicyInvalid(f"malformed signed policy: {exc}") from None
    return policy_from_fields(fields, bytes(signed), outer[0], outer[1])


def verify_policy(policy: Policy, registry: CredentialRegistry) -> None:
    """§2 verification: a root credential whose chain is valid at the policy's time signed it."""
    try:
        cred = registry.check(policy.fields["signer"], policy.fields["time"], ("root",), what="sign a routing policy")
        verify_signature(cred.public_key, "policy", policy.body, policy.signature)
    except (CredentialError, SignatureError) as exc:
        raise PolicyInvalid(f"policy {policy.name!r} is not signed by the governance root: {exc}") from None


# -- §3 routing one example, §5 batch limits -----------------------------------------------


@dataclass(frozen=True)
class ExampleRouting:
    label: int
    rule: int  # -1 = default
    profile: tuple[float, ...]  # binary64 multipliers, head first
    paths: tuple[str, ...]  # sorted distinct credential paths of its listed sources
    sources: tuple[str, ...]  # its listed source names


def _below_or_at(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _number(fields: Mapping[str, Any], key: str) -> float:
    value = fields.get(key)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise Unroutable(f"manifest {key} is not a finite number: {value!r}")
    return value


def first_match(policy: Policy, fields: Mapping[str, Any], paths: Sequence[str], flagged: bool = False,
                suspended: frozenset[int] = frozenset()) -> int:
    """The index of the first rule whose every present condition holds, else -1; ``flagged``: the example
    is among the memorization flags in force (specs/dynamics.md §2.4); ``suspended``: rules an entropy
    budget suspends (§5.5), which match nothing."""
    confidence, consensus = _number(fields, "confidence"), _number(fields, "consensus")
    review, aggregation = fields.get("review"), fields.get("aggregation")
    if review not in REVIEWS or type(aggregation) is not str:
        raise Unroutable(f"manifest review {review!r} or aggregation {aggregation!r} cannot be routed")
    canary = fields.get("canary")
    if isinstance(canary, Mapping) and canary.get("role") == "reference":
        return CANARY_REFERENCE  # before every rule: a reference canary must stay unlearned
    for i, rule in enumerate(policy.rules):
        if i in suspended:
            continue
        m = rule.match
        # Conservative authority: every source, and at least one, lies at or below it.
        if "authority" in m and not (paths and all(_below_or_at(p, m["authority"]) for p in paths)):
            continue
        if "min_confidence" in m and not confidence >= m["min_confidence"]:
            continue
        if "max_confidence" in m and not confidence <= m["max_confidence"]:
            continue
        if "min_consensus" in m and not consensus >= m["min_consensus"]:
            continue
        if "review" in m and review not in m["review"]:
            continue
        if "aggregation" in m and aggregation not in m["aggregation"]:
            continue
        if "memorized" in m and m["memorized"] is not flagged:
            continue
        return i
    return DEFAULT


def route_example(policy: Policy, fields: Mapping[str, Any], path_of: Callable[[bytes], str],
                  flagged: bool = False, suspended: frozenset[int] = frozenset()) -> ExampleRouting:
    """One example's routing; every listed source must resolve to a credential path."""
    paths, names = [], []
    for entry in fields["sources"]:
        try:
            path = path_of(entry["key_id"])
        except (CredentialError, KeyError):
            raise Unroutable(f"source {entry['source']!r} has no credential to route by") from None
        paths.append(path)
        names.append(entry["source"])
    rule = first_match(policy, fields, paths, flagged, suspended)
    return ExampleRouting(fields["label"], rule, policy.outcome(rule).profile, tuple(sorted(set(paths))), tuple(names))


def route_examples(
    policy: Policy, manifests: Sequence[Manifest | Mapping[str, Any]], path_of: Callable[[bytes], str],
    flagged: bool = False,
) -> list[ExampleRouting]:
    """The routing of every manifest, in order (``path_of``: source key id -> credential path), each as
    flagged or not."""
    return [route_example(policy, m.fields if isinstance(m, Manifest) else m, path_of, flagged) for m in manifests]


def batch_limits(policy: Policy, rules: Sequence[int]) -> tuple[float | None, ...]:
    """§5: per band, the least limit of the batch's examples that write into it (multiplier > 0)."""
    out: list[float | None] = [None] * len(policy.bands)
    for rule in set(rules):
        o = policy.outcome(rule)
        for k, (mult, limit) in enumerate(zip(o.profile, o.limits)):
            if mult > 0.0 and limit is not None and (out[k] is None or limit < out[k]):
                out[k] = limit
    return tuple(out)


def authority_writes(routings: Sequence[ExampleRouting], n_bands: int) -> dict[str, list[float]]:
    """specs/training.md §3.1: per credential path, binary64 sums of multipliers in batch order."""
    writes: dict[str, list[float]] = {}
    for r in routings:
        for path in r.paths:  # distinct already: an example counts once per path
            acc = writes.setdefault(path, [0.0] * n_bands)
            for k in range(n_bands):
                acc[k] += r.profile[k]
    return writes
