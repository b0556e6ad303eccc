"""The project taxonomy file (specs/project.md): who may label, under which authority, and the
routing policy template the governance root signs when a project is made.

Setting up a governed run by hand takes a root key, a trainer credential, one credential per
authority and per source, each issued by the right key on the right path, and a policy whose
rules name those paths. A taxonomy file says the same in a few lines of TOML; this module reads it
strictly (every table is closed, so a typo is an error and never a silently ignored key) into a
``Taxonomy``, with no keys and no files: ``training.project`` makes those. ``Taxonomy.to_mapping``
gives the canonical form, which this parser reads back to the same ``Taxonomy``: a project stores
it (``project.json``) so that reopening needs nothing but the project's directory.

Every error is a ``ProjectError`` that names the offending key (``taxonomy: authorities.crowd.
sources[2]: ...``), so ``gradledger init`` can print it as its one line.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from gradledger.ledger import schema as s
from gradledger.ledger.errors import SchemaError, UnusableInput
from gradledger.ledger.files import read_regular

from .errors import PolicyError, ProjectError
from .policy import REVIEW_STATES, validate_policy

#: A taxonomy is a few dozen lines; a megabyte is far beyond any real one, and bounds hostile input.
MAX_TAXONOMY_FILE = 1 << 20
MAX_AUTHORITIES = 1024
#: A manifest holds at most 4096 sources; a taxonomy of more is not one a project bootstraps.
MAX_SOURCES = 4096
MAX_CLASSES = 1 << 16
MAX_ONTOLOGY = 128
#: The names of the default three-band layouts (``training.layouts.default_layout(model)``): a
#: policy made from the template then fits such a layout as it is. ``sequential_bands`` names its
#: deepest band ``embedding`` unless given ``names``; a taxonomy may name its bands so.
DEFAULT_BANDS = ("head", "mid", "deep")
DEFAULT_EXCLUDE = ("rejected",)
#: The rule that ``exclude_review`` adds first: such labels reach no band at all.
EXCLUDE_RULE = "excluded"
#: Names become key file names and authority path segments, so they are both: one path segment.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,62}$")
MATCH_KEYS = ("min_confidence", "max_confidence", "min_consensus", "review", "aggregation", "memorized")


def _show(value: Any) -> str:
    """A short repr for a message: a hostile value (a huge int, a deep table) must not break it."""
    try:
        text = reprlib.repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text


def _key(value: Any) -> str:
    """A table key as it appears in a message's location."""
    plain = type(value) is str and re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", value)
    return value if plain else _show(value)  # quoted when odd: a newline must not split the one line


def _fail(where: str, message: str) -> ProjectError:
    return ProjectError(f"taxonomy: {where}: {message}")


def _table(value: Any, where: str, allowed: Sequence[str], required: Sequence[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected a table, got {type(value).__name__}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise _fail(where, f"unknown key {_show(unknown[0])} (allowed: {', '.join(allowed)})")
    missing = [k for k in required if k not in value]
    if missing:
        raise _fail(where, f"missing key {_show(missing[0])}")
    return value


def _name(value: Any, where: str) -> str:
    if type(value) is not str or not NAME_RE.match(value):
        raise _fail(where, f"a name is 1..63 of a-z 0-9 _ . - starting with a letter or digit, got {_show(value)}")
    return value


def _text(value: Any, where: str, limit: int = 255) -> str:
    try:
        s.name(value, where)
    except SchemaError as exc:
        raise ProjectError(f"taxonomy: {exc}") from None
    if len(value) > limit:
        raise _fail(where, f"at most {limit} characters")
    return value


def _relative_path(value: Any, where: str) -> str:
    """A path below its parent: one or more segments, each a name."""
    if type(value) is not str or not value:
        raise _fail(where, f"expected a relative path like 'vendors/acme', got {_show(value)}")
    for segment in value.split("/"):
        if not NAME_RE.match(segment):
            raise _fail(where, f"path segment {_show(segment)} of {_show(value)} is not 1..63 of a-z 0-9 _ . -")
    return value


def _full_path(value: str, where: str) -> str:
    try:
        s.path(value, where)
    except SchemaError as exc:
        raise ProjectError(f"taxonomy: {exc}") from None
    return value


def _number(value: Any, where: str) -> float:
    # bool is an int in Python and a different thing in TOML: refused, like every non-number.
    if type(value) is int and abs(value) <= 1 << 63:
        return float(value)
    if type(value) is not float or not math.isfinite(value):
        raise _fail(where, f"expected a finite number, got {_show(value)}")
    return float(value) + 0.0  # + 0.0 folds -0.0, which the signed formats refuse


def _unit(value: Any, where: str) -> float:
    x = _number(value, where)
    if not 0.0 <= x <= 1.0:
        raise _fail(where, f"expected a number in [0, 1], got {_show(value)}")
    return x


def _array(value: Any, where: str, max_items: int) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _fail(where, f"expected an array, got {type(value).__name__}")
    if len(value) > max_items:
        raise _fail(where, f"at most {max_items} entries")
    return list(value)


def _distinct(items: Sequence[Any], where: str) -> None:
    if len(set(items)) != len(items):
        raise _fail(where, "entries must be distinct")


# -- the parsed form ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    name: str
    authority: str  # the authority's name
    path: str  # full authority path of its credential
    relative: str  # ``path`` below the authority's
    confidence: float | None  # its labels' default confidence, if the taxonomy gives one


@dataclass(frozen=True)
class AuthoritySpec:
    name: str
    path: str  # full authority path
    relative: str  # ``path`` below the root's
    confidence: float | None
    sources: tuple[str, ...]


@dataclass(frozen=True)
class PolicyTemplate:
    """The ``[policy]`` table, resolved: rules and default with profiles as arrays (head first)
    and limits as a table band -> limit (a band not named is unlimited)."""

    name: str
    bands: tuple[str, ...]
    exclude_review: tuple[str, ...]
    rules: tuple[Mapping[str, Any], ...]  # canonical rule tables (authority by name)
    default: Mapping[str, Any]
    #: What every run under the policy records at its checkpoints (specs/policy.md §1): {} or
    #: {"memorization": {"fraction", "min_trace", ? "method"}} (specs/dynamics.md §1.1).
    monitors: Mapping[str, Any] = field(default_factory=dict)
    #: specs/privacy.md §1: {} or {"clip": band -> C, "noise": band -> sigma, "delta"}; rules say ``private``.
    privacy: Mapping[str, Any] = field(default_factory=dict)

    def fields(self, authorities: Mapping[str, AuthoritySpec], bands: Sequence[str] | None = None) -> dict[str, Any]:
        """Policy fields for ``sign_policy``; with ``bands`` (as many as the template's), the same
        profiles and limits by position under other band names."""
        names = tuple(self.bands if bands is None else bands)
        if len(names) != len(self.bands):
            raise ProjectError(
                f"the policy template has {len(self.bands)} bands ({', '.join(self.bands)}); for {len(names)} "
                "bands give the rules too")

        def outcome(t: Mapping[str, Any]) -> dict[str, Any]:
            return {"profile": list(t["profile"]), "limits": [t["limits"].get(b) for b in self.bands]}

        rules: list[dict[str, Any]] = []
        if self.exclude_review:
            zero = {"profile": [0.0] * len(names), "limits": [None] * len(names)}
            rules.append({"name": EXCLUDE_RULE, "match": {"review": list(self.exclude_review)}, **zero})
        for rule in self.rules:
            match: dict[str, Any] = {}
            if "authority" in rule:
                match["authority"] = authorities[rule["authority"]].path
            for key in MATCH_KEYS:
                if key in rule:
                    match[key] = list(rule[key]) if isinstance(rule[key], (list, tuple)) else rule[key]
            rules.append({"name": rule["name"], "match": match, **outcome(rule),
                          **({"private": True} if rule.get("private") else {})})
        out = {"name": self.name, "bands": list(names), "rules": rules, "default": outcome(self.default)}
        if self.monitors:
            out["monitors"] = {k: dict(v) for k, v in self.monitors.items()}
        if self.privacy:
            out["privacy"] = {"clip": [self.privacy["clip"].get(b) for b in self.bands],
                              "noise": [self.privacy["noise"].get(b) for b in self.bands], "delta": self.privacy["delta"]}
        return out

    def to_mapping(self) -> dict[str, Any]:
        def plain(t: Mapping[str, Any]) -> dict[str, Any]:
            out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in t.items() if k != "limits"}
            out["limits"] = dict(t["limits"])
            return out

        out = {"name": self.name, "bands": list(self.bands), "exclude_review": list(self.exclude_review),
               "default": plain(self.default), "rules": [plain(r) for r in self.rules]}
        if self.monitors:
            out["monitors"] = {k: dict(v) for k, v in self.monitors.items()}
        if self.privacy:
            out["privacy"] = {"clip": dict(self.privacy["clip"]), "noise": dict(self.privacy["noise"]),
                              "delta": self.privacy["delta"]}
        return out


@dataclass(frozen=True)
class Taxonomy:
    """A parsed taxonomy file: names, paths, default confidences and the policy template."""

    root_name: str
    root_path: str
    trainer_name: str
    trainer_path: str
    trainer_relative: str
    ontology: str | None
    classes: int | tuple[str, ...] | None
    authorities: Mapping[str, AuthoritySpec]
    sources: Mapping[str, SourceSpec]
    policy: PolicyTemplate

    @property
    def class_count(self) -> int | None:
        return self.classes if isinstance(self.classes, int) or self.classes is None else len(self.classes)

    def policy_fields(self, bands: Sequence[str] | None = None) -> dict[str, Any]:
        return self.policy.fields(self.authorities, bands)

    def confidence(self, source: str) -> float:
        """A source's default label confidence: its own, else its authority's, else 1.0."""
        spec = self.sources[source]
        if spec.confidence is not None:
            return spec.confidence
        own = self.authorities[spec.authority].confidence
        return 1.0 if own is None else own

    def to_mapping(self) -> dict[str, Any]:
        """The canonical taxonomy: every default spelled out; ``parse_taxonomy`` reads it back."""
        out: dict[str, Any] = {
            "root": {"name": self.root_name, "path": self.root_path},
            "trainer": {"name": self.trainer_name, "path": self.trainer_relative},
        }
        if self.ontology is not None:
            onto: dict[str, Any] = {"name": self.ontology}
            if self.classes is not None:
                onto["classes"] = self.classes if isinstance(self.classes, int) else list(self.classes)
            out["ontology"] = onto
        authorities: dict[str, Any] = {}
        for name, a in self.authorities.items():
            entry: dict[str, Any] = {"path": a.relative}
            if a.confidence is not None:
                entry["confidence"] = a.confidence
            sources: dict[str, Any] = {}
            for src in a.sources:
                spec = self.sources[src]
                sources[src] = {"path": spec.relative}
                if spec.confidence is not None:
                    sources[src]["confidence"] = spec.confidence
            entry["sources"] = sources
            authorities[name] = entry
        out["authorities"] = authorities
        out["policy"] = self.policy.to_mapping()
        return out


# -- parsing -------------------------------------------------------------------------------------


def _sources(value: Any, where: str) -> list[tuple[str, Mapping[str, Any]]]:
    """``sources = ["a", "b"]`` or a table ``name -> {path?, confidence?}``."""
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = [(name, {}) for name in _array(value, where, MAX_SOURCES)]
    if len(items) > MAX_SOURCES:
        raise _fail(where, f"at most {MAX_SOURCES} sources")
    out = []
    for i, (name, entry) in enumerate(items):
        at = f"{where}.{_key(name)}" if isinstance(value, Mapping) else f"{where}[{i}]"
        out.append((_name(name, at), _table(entry, at, ("path", "confidence"))))
    return out


def _profile(value: Any, bands: Sequence[str], where: str) -> list[float]:
    """An array (one multiplier per band, head first) or a table band -> multiplier (others 0)."""
    if isinstance(value, Mapping):
        _table(value, where, bands)
        profile = [_unit(value[b], f"{where}.{b}") if b in value else 0.0 for b in bands]
    else:
        items = _array(value, where, len(bands))
        if len(items) != len(bands):
            raise _fail(where, f"expected one multiplier per band ({len(bands)}: {', '.join(bands)}), got {len(items)}")
        profile = [_unit(x, f"{where}[{k}]") for k, x in enumerate(items)]
    for k in range(1, len(profile)):
        if profile[k] > profile[k - 1]:
            # specs/policy.md §1: the gate's boundary scaling compounds, so depth may only take less.
            raise _fail(where, f"band {_show(bands[k])} ({profile[k]}) exceeds band {_show(bands[k - 1])} "
                        f"({profile[k - 1]}); profiles must not grow from the head down")
    return profile


def _limits(value: Any, bands: Sequence[str], where: str) -> dict[str, float]:
    """A table band -> largest gradient L2 norm (a positive number); a band not named is unlimited."""
    _table(value, where, bands)
    out = {}
    for b in bands:
        if b in value:
            x = _number(value[b], f"{where}.{b}")
            if not x > 0.0:
                raise _fail(f"{where}.{b}", f"a limit must be positive, got {_show(value[b])}")
            out[b] = x
    return out


def _outcome(value: Any, bands: Sequence[str], where: str, allowed: Sequence[str]) -> dict[str, Any]:
    t = _table(value, where, allowed, ("profile",))
    return {"profile": _profile(t["profile"], bands, f"{where}.profile"),
            "limits": _limits(t.get("limits", {}), bands, f"{where}.limits")}


def parse_policy_template(value: Any, authorities: Mapping[str, Any], root_name: str,
                          bands: Sequence[str] | None = None, where: str = "policy") -> PolicyTemplate:
    """The ``[policy]`` table (or a mapping in its format) against ``authorities`` (by name).

    ``bands``, when given, replaces the table's own ``bands`` (``Project.policy_for``)."""
    t = _table(value, where, ("name", "bands", "exclude_review", "default", "rules", "monitors", "privacy"))
    name = _text(t.get("name", f"{root_name}-routing"), f"{where}.name")
    if bands is None:
        raw_bands = t.get("bands", list(DEFAULT_BANDS))
    else:
        raw_bands = list(bands)
    band_list = _array(raw_bands, f"{where}.bands", 64)
    if not band_list:
        raise _fail(f"{where}.bands", "at least one band")
    band_names = tuple(_text(b, f"{where}.bands[{k}]") for k, b in enumerate(band_list))
    _distinct(band_names, f"{where}.bands")
    exclude = _array(t.get("exclude_review", list(DEFAULT_EXCLUDE)), f"{where}.exclude_review", len(REVIEW_STATES))
    for k, state in enumerate(exclude):
        if state not in REVIEW_STATES:
            raise _fail(f"{where}.exclude_review[{k}]",
                        f"expected one of {', '.join(REVIEW_STATES)}, got {_show(state)}")
    _distinct(exclude, f"{where}.exclude_review")
    n = len(band_names)
    head_only = {"profile": [1.0] + [0.0] * (n - 1), "limits": {}}
    default = _outcome(t["default"], band_names, f"{where}.default", ("profile", "limits")) if "default" in t \
        else head_only
    rules: list[dict[str, Any]] = []
    names: set[str] = {EXCLUDE_RULE} if exclude else set()
    allowed = ("name", "authority", *MATCH_KEYS, "profile", "limits", "private")
    for i, raw in enumerate(_array(t.get("rules", []), f"{where}.rules", 1023)):
        at = f"{where}.rules[{i}]"
        rt = _table(raw, at, allowed, ("profile",))
        rule: dict[str, Any] = {}
        if "authority" in rt:
            auth = rt["authority"]
            if type(auth) is not str or auth not in authorities:
                raise _fail(f"{at}.authority", f"{_show(auth)} is not an authority of this taxonomy "
                            f"({', '.join(authorities) or 'none'})")
            rule["authority"] = auth
        rule_name = _text(rt.get("name", rule.get("authority", f"rule-{i}")), f"{at}.name")
        if rule_name in names:
            raise _fail(f"{at}.name", f"rule name {_show(rule_name)} is used twice; give each rule its own name")
        names.add(rule_name)
        rule = {"name": rule_name, **rule}
        for key in ("min_confidence", "max_confidence", "min_consensus"):
            if key in rt:
                rule[key] = _unit(rt[key], f"{at}.{key}")
        if rule.get("min_confidence", 0.0) > rule.get("max_confidence", 1.0):
            raise _fail(at, "min_confidence exceeds max_confidence: the rule could never match")
        if "review" in rt:
            states = _array(rt["review"], f"{at}.review", len(REVIEW_STATES))
            for k, state in enumerate(states):
                if state not in REVIEW_STATES:
                    raise _fail(f"{at}.review[{k}]", f"expected one of {', '.join(REVIEW_STATES)}, got {_show(state)}")
            if not states:
                raise _fail(f"{at}.review", "at least one review state")
            _distinct(states, f"{at}.review")
            rule["review"] = states
        if "aggregation" in rt:
            rules_ = _array(rt["aggregation"], f"{at}.aggregation", 64)
            if not rules_:
                raise _fail(f"{at}.aggregation", "at least one aggregation rule")
            rule["aggregation"] = [_text(a, f"{at}.aggregation[{k}]") for k, a in enumerate(rules_)]
            _distinct(rule["aggregation"], f"{at}.aggregation")
        if "memorized" in rt:  # the memorization flags in force (specs/dynamics.md §2.4)
            if type(rt["memorized"]) is not bool:
                raise _fail(f"{at}.memorized", f"expected true or false, got {_show(rt['memorized'])}")
            rule["memorized"] = rt["memorized"]
        rule.update(_outcome({k: rt[k] for k in ("profile", "limits") if k in rt}, band_names, at,
                             ("profile", "limits")))
        if "private" in rt:  # specs/privacy.md §1: its examples are clipped and noised
            if rt["private"] is not True:
                raise _fail(f"{at}.private", f"expected true (leave it out for a rule that is not private), got "
                            f"{_show(rt['private'])}")
            rule["private"] = True
        rules.append(rule)
    monitors = _monitors(t.get("monitors", {}), f"{where}.monitors")
    if any("memorized" in r for r in rules) and "memorization" not in monitors:
        raise _fail(f"{where}.monitors", "a rule matches memorized, so the policy must require the scans that flag "
                    "(monitors.memorization = { fraction = 0.01, min_trace = 4 })")
    privacy = _privacy(t["privacy"], band_names, f"{where}.privacy") if "privacy" in t else {}
    if any(r.get("private") for r in rules) and not privacy:
        raise _fail(f"{where}.privacy", "a rule is private, so the policy must give the clip and noise of the bands "
                    "it reaches (privacy = { clip = { head = 1.0 }, noise = { head = 1.1 }, delta = 1e-5 })")
    return PolicyTemplate(name, band_names, tuple(exclude), tuple(rules), default, monitors, privacy)


def _privacy(value: Any, bands: Sequence[str], where: str) -> dict[str, Any]:
    """``[policy.privacy]``: ``clip`` and ``noise`` as tables band -> positive number (a band not named: no private
    example may reach it), ``delta`` in (0, 1) (specs/privacy.md §1; the signed policy's own checks follow)."""
    t = _table(value, where, ("clip", "noise", "delta"), ("clip", "noise", "delta"))
    clip, noise = _limits(t["clip"], bands, f"{where}.clip"), _limits(t["noise"], bands, f"{where}.noise")
    delta = _number(t["delta"], f"{where}.delta")
    if not 0.0 < delta < 1.0:
        raise _fail(f"{where}.delta", f"expected a number in (0, 1), got {_show(t['delta'])}")
    return {"clip": clip, "noise": noise, "delta": delta}


def _monitors(value: Any, where: str) -> dict[str, Any]:
    """``[policy.monitors]``: ``memorization = { fraction, min_trace, method }`` (specs/dynamics.md §1.1; ``method``
    ``"mean-loss"`` or ``"lt-iqr"``), or nothing. Without ``method`` it is LT-IQR, as in every recorded form
    of the parameters: a project written before the method existed reads back to the policy it signed."""
    from .dynamics.memorization import LT_IQR, MAX_MIN_TRACE, METHODS, MemorizationScan

    t = _table(value, where, ("memorization",))
    if "memorization" not in t:
        return {}
    m = _table(t["memorization"], f"{where}.memorization", ("fraction", "min_trace", "method"), ("fraction", "min_trace"))
    method = m.get("method", LT_IQR)
    if method not in METHODS:
        raise _fail(f"{where}.memorization.method", f"expected one of {', '.join(map(repr, METHODS))}, got {_show(method)}")
    fraction, min_trace = m["fraction"], m["min_trace"]
    if type(fraction) not in (int, float) or not 0.0 < fraction <= 1.0:
        raise _fail(f"{where}.memorization.fraction", f"expected a number in (0, 1], got {_show(fraction)}")
    if type(min_trace) is not int or not 2 <= min_trace <= MAX_MIN_TRACE:
        raise _fail(f"{where}.memorization.min_trace", f"expected an integer in [2, {MAX_MIN_TRACE}], "
                    f"got {_show(min_trace)}")
    return {"memorization": MemorizationScan(float(fraction), min_trace, method).parameters}


def parse_taxonomy(value: Any) -> Taxonomy:
    """A ``Taxonomy`` from a parsed TOML document (or any mapping in its form); ``ProjectError`` else."""
    t = _table(value, "document", ("root", "trainer", "ontology", "authorities", "policy"), ("root", "authorities"))
    root = _table(t["root"], "root", ("name", "path"), ("name", "path"))
    root_name = _name(root["name"], "root.name")
    root_path = _full_path(root["path"], "root.path")
    trainer = _table(t.get("trainer", {}), "trainer", ("name", "path"))
    trainer_name = _name(trainer.get("name", "trainer"), "trainer.name")
    trainer_rel = _relative_path(trainer.get("path", "training"), "trainer.path")
    trainer_path = _full_path(f"{root_path}/{trainer_rel}", "trainer.path")

    ontology: str | None = None
    classes: int | tuple[str, ...] | None = None
    if "ontology" in t:
        onto = _table(t["ontology"], "ontology", ("name", "classes"), ("name",))
        ontology = onto["name"]
        if type(ontology) is not str or not 1 <= len(ontology) <= MAX_ONTOLOGY:
            raise _fail("ontology.name", f"expected 1..{MAX_ONTOLOGY} characters of text, got {_show(ontology)}")
        if "classes" in onto:
            raw = onto["classes"]
            if type(raw) is int:
                if not 1 <= raw <= MAX_CLASSES:
                    raise _fail("ontology.classes", f"expected 1..{MAX_CLASSES} classes, got {raw}")
                classes = raw
            else:
                items = _array(raw, "ontology.classes", MAX_CLASSES)
                if not items:
                    raise _fail("ontology.classes", "at least one class")
                classes = tuple(_text(c, f"ontology.classes[{k}]") for k, c in enumerate(items))
                _distinct(classes, "ontology.classes")

    raw_auth = t["authorities"]
    if not isinstance(raw_auth, Mapping) or not raw_auth:
        raise _fail("authorities", "expected a table of at least one authority ([authorities.NAME])")
    if len(raw_auth) > MAX_AUTHORITIES:
        raise _fail("authorities", f"at most {MAX_AUTHORITIES} authorities")
    # One namespace for every principal: credential(name) and the key files resolve names alone.
    taken: dict[str, str] = {root_name: "root.name"}
    if trainer_name in taken:
        raise _fail("trainer.name", f"{_show(trainer_name)} is already the root's name")
    taken[trainer_name] = "trainer.name"
    authorities: dict[str, AuthoritySpec] = {}
    sources: dict[str, SourceSpec] = {}
    paths: dict[str, str] = {trainer_path: "trainer"}
    for name, entry in raw_auth.items():
        where = f"authorities.{_key(name)}"
        _name(name, where)
        if name in taken:
            raise _fail(where, f"{_show(name)} is already used by {taken[name]}; every name must be distinct")
        taken[name] = where
        a = _table(entry, where, ("path", "confidence", "sources"), ("sources",))
        rel = _relative_path(a.get("path", name), f"{where}.path")
        path = _full_path(f"{root_path}/{rel}", f"{where}.path")
        if path in paths:
            raise _fail(f"{where}.path", f"{_show(path)} is already the path of {paths[path]}")
        paths[path] = where
        conf = _unit(a["confidence"], f"{where}.confidence") if "confidence" in a else None
        members = []
        for src, spec in _sources(a["sources"], f"{where}.sources"):
            at = f"{where}.sources.{src}"
            if src in taken:
                raise _fail(at, f"{_show(src)} is already used by {taken[src]}; every name must be distinct")
            taken[src] = at
            src_rel = _relative_path(spec.get("path", src), f"{at}.path")
            src_path = _full_path(f"{path}/{src_rel}", f"{at}.path")
            src_conf = _unit(spec["confidence"], f"{at}.confidence") if "confidence" in spec else None
            sources[src] = SourceSpec(src, name, src_path, src_rel, src_conf)
            members.append(src)
        authorities[name] = AuthoritySpec(name, path, rel, conf, tuple(members))
    if not sources:
        raise _fail("authorities", "no authority lists a source: a project needs at least one to label with")
    if len(sources) > MAX_SOURCES:
        raise _fail("authorities", f"at most {MAX_SOURCES} sources in all")

    template = parse_policy_template(t.get("policy", {}), authorities, root_name)
    tax = Taxonomy(root_name, root_path, trainer_name, trainer_path, trainer_rel, ontology, classes,
                   authorities, sources, template)
    check_policy_fields(tax.policy_fields())
    return tax


def check_policy_fields(fields: Mapping[str, Any]) -> None:
    """The policy module's own check, as the signer will run it (a placeholder signer and time)."""
    try:
        validate_policy({"v": 1, **fields, "signer": bytes(32), "time": 0})
    except PolicyError as exc:
        raise ProjectError(f"taxonomy: policy: {exc}") from None


def read_taxonomy_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The parsed TOML document of a taxonomy file (bounded, strict UTF-8)."""
    try:
        data = read_regular(path, MAX_TAXONOMY_FILE, "taxonomy", ProjectError)
    except UnusableInput as exc:
        raise ProjectError(str(exc)) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProjectError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ProjectError(f"{path}: not a taxonomy: nested too deeply") from None


def load_taxonomy(taxonomy: str | os.PathLike[str] | Mapping[str, Any]) -> Taxonomy:
    """A ``Taxonomy`` from a TOML file's path or an already-parsed mapping."""
    if isinstance(taxonomy, Mapping):
        return parse_taxonomy(taxonomy)
    if isinstance(taxonomy, (str, os.PathLike)):
        return parse_taxonomy(read_taxonomy_file(taxonomy))
    raise ProjectError(f"a taxonomy is a TOML file's path or a mapping, got {type(taxonomy).__name__}")


__all__ = [
    "AuthoritySpec",
    "DEFAULT_BANDS",
    "PolicyTemplate",
    "SourceSpec",
    "Taxonomy",
    "load_taxonomy",
    "parse_policy_template",
    "parse_taxonomy",
    "read_taxonomy_file",
]
