"""Recorded traces: each ForensicTrace's form, always; its recomputation with ``--check-traces``
(specs/forensics.md §7).

The verifier's own reading of the spec (it never imports ``gradledger.training``). Form: the format,
the traced run, the parameters, the query's digest over its canonical map and the result's digest over
the recorded result. Recomputation: ``loss-trace`` from the recorded per-example losses, here;
``replay`` and ``checkpoints`` by the replay workers (attribution.py), every segment of the traced
lineage computing its terms as it replays; then sources, authorities, bands, step ranges and examples
as §3-§5 define them, each recorded entry compared within the tolerance §7.3 declares for its method.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import torch

from gradledger.ledger import encoding
from gradledger.ledger.envelope import Sealed

from .attribution import MAX_QUERY, Probe
from .example_losses import ExampleLossesInvalid, decode_example_losses
from .replay import Segment
from .settings import training_format
from .manifests import relabel_without
from .structure import Run, Structure

__all__ = ["TraceClaim", "TraceInvalid", "UNATTRIBUTED", "compare_traces", "read_traces", "trace_jobs"]

TRACE_FORMAT = 1
METHODS = ("replay", "checkpoints", "loss-trace")
#: §3: influence no vote for the label carries.
UNATTRIBUTED = "(no source voted for the label)"
#: §5: at most this many step ranges.
STEP_RANGES = 20
#: §7.3: a recomputed score ``r`` matches a recorded ``x`` when ``|x - r| <= rtol * |r| + atol * scale``,
#: ``scale`` the largest recomputed magnitude of its kind; per method.
TOLERANCE = {"replay": (1e-3, 1e-4), "checkpoints": (1e-3, 1e-4), "loss-trace": (1e-9, 1e-12)}
_QUERY_FIELDS = {"description", "inputs", "target", "file"}


class TraceInvalid(Exception):
    """A ForensicTrace that is malformed or does not recompute (the message says why)."""

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass
class TraceClaim:
    """One recorded trace, read: its observation, the lineage's run, each dataset index's manifest map as
    that run trained it, and (influence methods) the probe the replay workers compute."""

    sealed: Sealed
    run: Run
    fields: list[Mapping[str, Any]]
    probe: Probe | None
    #: (RunStarted seq, segment index) of every segment of the lineage, in step order (influence methods).
    segments: list[tuple[int, int]] = field(default_factory=list)

    @property
    def seq(self) -> int:
        return self.sealed.seq

    @property
    def method(self) -> str:
        return str(self.sealed.body["method"])


def _digest(obj: Any) -> bytes:
    return hashlib.sha256(encoding.encode(obj)).digest()


def read_traces(structure: Structure, plan: Mapping[int, Sequence[Segment]] | None,
                input_names: Callable[[Run], list[str]]) -> list[TraceClaim]:
    """Every ForensicTrace, its form checked (§7.1); ``plan``: the replay plan's segments per run (None when
    it could not be made). Raises TraceInvalid for the first one that is malformed."""
    out = []
    for obs in structure.observations:
        if obs.type == "ForensicTrace":
            out.append(_read(obs, structure, plan, input_names))
    return out


def _read(obs: Sealed, st: Structure, plan: Mapping[int, Sequence[Segment]] | None,
          input_names: Callable[[Run], list[str]]) -> TraceClaim:
    body, seq = obs.body, obs.seq

    def bad(why: str) -> TraceInvalid:
        return TraceInvalid(f"ForensicTrace {seq}: {why}", seq)

    if body["format"] != TRACE_FORMAT:
        raise bad(f"format {body['format']!r} is not {TRACE_FORMAT}")
    run = st.run_before(seq, body["run"])
    if run is None:
        raise bad(f"run {body['run']!r} names no governed run recorded before it")
    params = body["parameters"]
    if not isinstance(params, dict) or set(params) != {"top", "self_influence"} or type(params["top"]) is not int \
            or params["top"] < 1 or type(params["self_influence"]) is not bool:
        raise bad("parameters is not {top: positive int, self_influence: bool}")
    method = body["method"]
    if (method == "loss-trace") != ("query" not in body) or ("query" in body) != ("query_digest" in body):
        raise bad("a query (with its digest) is recorded for the replay and checkpoints methods, and only for them")
    if _digest(body["result"]) != body["result_digest"]:
        raise bad("result_digest is not the SHA-256 of the recorded result")
    fields = _lineage_fields(st, run)
    probe = None
    if method != "loss-trace":
        if _digest(body["query"]) != body["query_digest"]:
            raise bad("query_digest is not the SHA-256 of the recorded query")
        try:
            probe = _probe(seq, method, body["query"], [f["label"] for f in fields], input_names(run),
                           params["self_influence"])
        except ValueError as exc:
            raise bad(f"query {exc}") from None
    _check_result_form(body["result"], method, params, len(st.datasets[run.dataset_seq].manifests), bad)  # type: ignore[index]
    claim = TraceClaim(obs, run, fields, probe)
    if probe is not None and plan is not None:
        claim.segments = _lineage_segments(st, run, plan)
    return claim


def _lineage_fields(st: Structure, run: Run) -> list[Mapping[str, Any]]:
    """§1: each index's manifest map as the run trained it (a branch's re-aggregated without the retired
    source; an example left without a vote keeps its committed map, and was never trained)."""
    manifests = st.datasets[run.dataset_seq].manifests  # type: ignore[index]
    if run.retired is None:
        return [m.fields for m in manifests]
    return [relabel_without(m.fields, run.retired) or m.fields for m in manifests]


def _lineage_segments(st: Structure, run: Run, plan: Mapping[int, Sequence[Segment]]) -> list[tuple[int, int]]:
    """§1: an original run's segments; a branch's: the original's before its rewind, then its own."""
    own = [(run.seq, s.index) for s in plan.get(run.seq, ())]
    if run.branch_of is None:
        return own
    before = [(run.branch_of, s.index) for s in plan.get(run.branch_of, ()) if s.start["step"] < run.rewind_step]
    return before + own


def _probe(seq: int, method: str, query: Any, labels: list[int], names: list[str], self_influence: bool) -> Probe:
    """§2: the recorded query map, resolved against the lineage's labels (ValueError naming the field)."""
    if not isinstance(query, dict) or not _QUERY_FIELDS <= set(query) <= _QUERY_FIELDS | {"against"}:
        raise ValueError(f"is not a map of {sorted(_QUERY_FIELDS)} and optionally against")
    if not isinstance(query["description"], str) or len(query["description"]) > 1024:
        raise ValueError("description is not a text of at most 1024 characters")
    spec, file, n = query["inputs"], query["file"], len(labels)
    indices: list[int] | None
    if not isinstance(spec, dict):
        raise ValueError("inputs is not a map")
    if set(spec) == {"indices"}:
        idx = spec["indices"]
        if not isinstance(idx, list) or not 1 <= len(idx) <= MAX_QUERY or any(
                type(i) is not int or not 0 <= i < n for i in idx):
            raise ValueError(f"inputs.indices is not 1 to {MAX_QUERY} indices of the dataset's {n} rows")
        indices = list(idx)
    elif "label" in spec and set(spec) <= {"label", "limit"}:
        limit = spec.get("limit", MAX_QUERY)
        if type(spec["label"]) is not int or type(limit) is not int or not 1 <= limit <= MAX_QUERY:
            raise ValueError(f"inputs.label is not a class with a limit in [1, {MAX_QUERY}]")
        indices = [i for i, c in enumerate(labels) if c == spec["label"]][:limit]
        if not indices:
            raise ValueError(f"inputs.label {spec['label']} is the label of no row of the dataset")
    elif set(spec) == {"file"}:
        indices = None
        if not isinstance(file, bytes) or len(file) != 32:
            raise ValueError("file is not the 32-byte SHA-256 of the query file")
    else:
        raise ValueError(f"inputs {sorted(spec)} is not one of {{indices}}, {{label[, limit]}}, {{file}}")
    if indices is not None and file != b"":
        raise ValueError("file is not empty for dataset inputs")

    def classes(value: Any, what: str) -> int | list[int]:
        if value == "label":
            if indices is None:
                raise ValueError(f"{what} \"label\" needs dataset inputs")
            return [labels[i] for i in indices]
        if type(value) is int or (isinstance(value, list) and all(type(c) is int for c in value)):
            return value  # type: ignore[no-any-return]
        raise ValueError(f"{what} is not a class, a list of classes or \"label\"")

    inputs = {"indices": indices} if indices is not None else {"file": file, "names": names}
    against = classes(query["against"], "against") if "against" in query else None
    return Probe(seq, method, inputs, classes(query["target"], "target"), against, self_influence)


def _pairs(value: Any, key: Callable[[Any], bool], width: int = 2) -> bool:
    return isinstance(value, list) and all(
        isinstance(e, list) and len(e) == width and key(e[0]) and all(_num(v) for v in e[width - 1:]) for e in value)


def _num(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _check_result_form(result: Any, method: str, params: Mapping[str, Any], n: int,
                       bad: Callable[[str], TraceInvalid]) -> None:
    keys = {"sources", "examples"}
    if method != "loss-trace":
        keys |= {"authorities", "bands", "steps", "predicted_change"} | ({"self_influence"} if params["self_influence"]
                                                                         else set())
    if not isinstance(result, dict) or set(result) != keys:
        raise bad(f"result is not a map of exactly {sorted(keys)}")
    index = lambda v: type(v) is int and 0 <= v < n  # noqa: E731
    text = lambda v: isinstance(v, str)  # noqa: E731
    ok = _pairs(result["sources"], text) and _pairs(result["examples"], index)
    if method != "loss-trace":
        ok &= _pairs(result["authorities"], text) and isinstance(result["bands"], list) \
            and all(_num(v) for v in result["bands"]) and _num(result["predicted_change"]) \
            and isinstance(result["steps"], list) and all(
                isinstance(r, list) and len(r) == 3 and type(r[0]) is int and type(r[1]) is int and _num(r[2])
                for r in result["steps"])
        if params["self_influence"]:
            ok &= _pairs(result["self_influence"], index)
    if not ok:
        raise bad("result's entries are not [name or index, finite score] lists")


def trace_jobs(claims: Sequence[TraceClaim]) -> dict[tuple[int, int], list[Probe]]:
    """Per segment (RunStarted seq, segment index), the probes it computes."""
    out: dict[tuple[int, int], list[Probe]] = {}
    for c in claims:
        if c.probe is not None:
            for key in c.segments:
                out.setdefault(key, []).append(c.probe)
    return out


# -- recomputation -------------------------------------------------------------------------------


def example_shares(manifest: Mapping[str, Any]) -> dict[str, float]:
    """§3: each source's share of the example: the confidences of its votes equal to the label over all such
    votes' (each counting 1 when they add up to 0), exact, rounded once; no such vote: UNATTRIBUTED."""
    label = manifest["label"]
    weights: dict[str, Fraction] = {}
    for s in manifest["sources"]:
        if s["vote"] == label:
            weights[s["source"]] = weights.get(s["source"], Fraction(0)) + Fraction(s["confidence"])
    if not weights:
        return {UNATTRIBUTED: 1.0}
    total = sum(weights.values(), Fraction(0))
    if total == 0:
        return {name: float(Fraction(1, len(weights))) for name in weights}
    return {name: float(w / total) for name, w in weights.items()}


def _sources(claim: TraceClaim, st: Structure) -> tuple[list[str], dict[str, str], torch.Tensor]:
    """The lineage's source names (sorted, UNATTRIBUTED last where any), each one's authority path, and the
    share matrix ``[sources, examples]``."""
    paths: dict[str, str] = {}
    for m in claim.fields:
        for s in m["sources"]:
            if s["source"] not in paths:
                paths[s["source"]] = st.registry.get(s["key_id"]).path
    shares = [example_shares(m) for m in claim.fields]
    names = sorted(paths) + ([UNATTRIBUTED] if any(UNATTRIBUTED in s for s in shares) else [])
    paths[UNATTRIBUTED] = UNATTRIBUTED
    col = {name: i for i, name in enumerate(names)}
    matrix = torch.zeros((len(names), len(shares)), dtype=torch.float64)
    for z, row in enumerate(shares):
        for name, share in row.items():
            matrix[col[name], z] = share
    return names, paths, matrix


def lineage_updates(st: Structure, run: Run) -> list[int]:
    """§1: the GovernedUpdate seqs of the lineage, in step order (a branch: the original's before its rewind)."""
    if run.branch_of is None:
        return list(run.updates)
    before = [s for s in st.runs[run.branch_of].updates if st.observations[s].body["step"] < run.rewind_step]
    return before + list(run.updates)


def step_ranges(totals: Sequence[float]) -> list[tuple[int, int, float]]:
    """§5: the per-step totals in at most ``STEP_RANGES`` equal ranges ``(from, to, score)``, the last short."""
    n = len(totals)
    width = max(1, -(-n // STEP_RANGES))
    return [(lo, min(n, lo + width) - 1, math.fsum(totals[lo: lo + width])) for lo in range(0, n, width)]


def recompute_loss_trace(claim: TraceClaim, st: Structure) -> dict[str, dict[Any, float]]:
    """§4.3 from the lineage's recorded per-example losses: examples by mean loss, sources by the
    share-weighted mean over their examples."""
    if training_format(claim.run.settings) < 4:
        raise TraceInvalid("the loss-trace method needs training format 4 or later (per-example losses)", claim.seq)
    seqs = lineage_updates(st, claim.run)
    n = len(claim.fields)
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for s in seqs:
        u = st.observations[s].body
        try:
            values = decode_example_losses(u["example_losses"])
        except (KeyError, ExampleLossesInvalid):
            raise TraceInvalid(f"GovernedUpdate {s} records no per-example losses",
                               claim.seq) from None
        index = torch.tensor(u["batch"], dtype=torch.int64)
        total.index_add_(0, index, torch.tensor(values, dtype=torch.float64))
        count.index_add_(0, index, torch.ones(len(values), dtype=torch.float64))
    seen = count > 0
    mean = torch.where(seen, total / count.clamp(min=1), torch.zeros_like(total))
    names, _, shares = _sources(claim, st)
    shares = shares * seen
    mass = shares.sum(1)
    s_mean = torch.where(mass > 0, (shares @ mean) / mass.clamp(min=1e-300), torch.zeros_like(mass))
    return {"sources": dict(zip(names, s_mean.tolist())),
            "examples": {int(z): float(mean[z]) for z in torch.nonzero(seen).flatten().tolist()}}


def recompute_influence(claim: TraceClaim, st: Structure, terms: Sequence[Mapping[str, Any]],
                        n_bands: int) -> dict[str, Any]:
    """§3-§5 from the segments' terms (attribution.Terms.to_obj, one per lineage segment, already checked
    for form): per kind, key -> score."""
    n = len(claim.fields)
    examples = torch.zeros((n, n_bands), dtype=torch.float64)
    own = torch.zeros(n, dtype=torch.float64)
    steps: dict[int, float] = {}
    for t in terms:
        for z, per_band in t["examples"]:
            examples[z] += torch.tensor(per_band, dtype=torch.float64)
        for s, v in t["steps"]:
            steps[s] = steps.get(s, 0.0) + v
        for z, v in t.get("self", ()):
            own[z] += v
    scores = examples.sum(1)
    names, paths, shares = _sources(claim, st)
    per_source = shares @ scores
    by_path: dict[str, float] = {}
    for name, v in zip(names, per_source.tolist()):
        by_path[paths[name]] = by_path.get(paths[name], 0.0) + v
    seqs = lineage_updates(st, claim.run)
    n_steps = 1 + max((st.observations[s].body["step"] for s in seqs), default=0)
    ranges = step_ranges([steps.get(s, 0.0) for s in range(n_steps)])
    out: dict[str, Any] = {
        "sources": dict(zip(names, per_source.tolist())), "authorities": by_path,
        "examples": dict(enumerate(scores.tolist())), "bands": examples.sum(0).tolist(), "steps": ranges,
        "predicted_change": -float(scores.sum()), "scale_change": float(scores.abs().sum()),
    }
    if claim.sealed.body["parameters"]["self_influence"]:
        out["self_influence"] = dict(enumerate(own.tolist()))
    return out


class _Comparison:
    """§7.3's comparison of one trace, keeping its largest deviation as a fraction of the tolerance."""

    def __init__(self, method: str) -> None:
        self.rtol, self.atol = TOLERANCE[method]
        self.worst = 0.0

    def close(self, recorded: float, value: float, scale: float) -> bool:
        bound = self.rtol * abs(value) + self.atol * scale
        diff = abs(recorded - value)
        if diff > 0:
            self.worst = max(self.worst, diff / bound if bound > 0 else math.inf)
        return diff <= bound

    def ranked(self, kind: str, recorded: list[list[Any]], values: Mapping[Any, float], top: int) -> str | None:
        """One ranking: as many entries as ``top`` allows, each known with its score within tolerance, in
        non-increasing order, and nothing left out that ranks above the last."""
        scale = max((abs(v) for v in values.values()), default=0.0)
        if len(recorded) != min(top, len(values)):
            return f"{kind}: {len(recorded)} entries recorded, the top {min(top, len(values))} recomputed"
        keys = [e[0] for e in recorded]
        if len(set(keys)) != len(keys):
            return f"{kind}: an entry is recorded twice"
        for (key, score), prev in zip(recorded, [None, *recorded]):
            if key not in values:
                return f"{kind}: {key!r} is not in the traced run"
            if not self.close(score, values[key], scale):
                return f"{kind}: {key!r} scores {score!r} recorded, {values[key]!r} recomputed"
            if prev is not None and score > prev[1]:
                return f"{kind}: {key!r} is ranked below an entry it outscores"
        if recorded:
            floor = min(values[k] for k in keys)
            listed = set(keys)
            left = [(v, k) for k, v in values.items() if k not in listed]
            if left:
                v, k = max(left)
                if v > floor and not self.close(floor, v, scale):
                    return f"{kind}: {k!r} (recomputed {v!r}) ranks above the recorded last entry and is left out"
        return None


def _ranked(kind: str, recorded: list[list[Any]], values: Mapping[Any, float], top: int, method: str) -> str | None:
    return _Comparison(method).ranked(kind, recorded, values, top)


def compare_traces(claim: TraceClaim, found: Mapping[str, Any]) -> tuple[str | None, float]:
    """The first difference between the recorded result and ``found`` (the recomputation), or None; and the
    largest deviation seen, as a fraction of the tolerance."""
    result, method = claim.sealed.body["result"], claim.method
    top = claim.sealed.body["parameters"]["top"]
    cmp = _Comparison(method)
    return _compare(cmp, result, found, top, method), cmp.worst


def _compare(cmp: _Comparison, result: Mapping[str, Any], found: Mapping[str, Any], top: int,
             method: str) -> str | None:
    for kind in ("sources", "authorities", "examples", "self_influence"):
        if kind in result:
            why = cmp.ranked(kind, result[kind], found[kind], top)
            if why is not None:
                return why
    if method == "loss-trace":
        return None
    bands = found["bands"]
    scale = max((abs(v) for v in bands), default=0.0)
    if len(result["bands"]) != len(bands):
        return f"bands: {len(result['bands'])} recorded, the run has {len(bands)}"
    for k, (a, b) in enumerate(zip(result["bands"], bands)):
        if not cmp.close(a, b, scale):
            return f"bands: band {k} scores {a!r} recorded, {b!r} recomputed"
    ranges = found["steps"]
    scale = max((abs(r[2]) for r in ranges), default=0.0)
    if [r[:2] for r in result["steps"]] != [list(r[:2]) for r in ranges]:
        return "steps: the recorded step ranges are not the run's"
    for got, want in zip(result["steps"], ranges):
        if not cmp.close(got[2], want[2], scale):
            return f"steps: {got[0]}-{got[1]} scores {got[2]!r} recorded, {want[2]!r} recomputed"
    if not cmp.close(result["predicted_change"], found["predicted_change"], found["scale_change"]):
        return f"predicted_change {result['predicted_change']!r} recorded, {found['predicted_change']!r} recomputed"
    return None


def check_terms(terms: Any, n: int, n_bands: int, self_influence: bool) -> str | None:
    """The form of a worker's answer for one probe (it comes from behind the sandbox)."""
    if not isinstance(terms, dict):
        return "not a map"
    if "error" in terms:
        return str(terms["error"])[:300]
    want = {"trace", "examples", "steps"} | ({"self"} if self_influence else set())
    if set(terms) != want:
        return "malformed terms"
    ok = all(isinstance(e, list) and len(e) == 2 and type(e[0]) is int and 0 <= e[0] < n and isinstance(e[1], list)
             and len(e[1]) == n_bands and all(_num(v) for v in e[1]) for e in terms["examples"])
    ok &= all(isinstance(e, list) and len(e) == 2 and type(e[0]) is int and _num(e[1]) for e in terms["steps"])
    if self_influence:
        ok &= all(isinstance(e, list) and len(e) == 2 and type(e[0]) is int and 0 <= e[0] < n and _num(e[1])
                  for e in terms["self"])
    return None if ok else "malformed terms"
