"""Recorded entropy depth profiles (specs/dynamics.md §5): every DepthProfile's form, one at each
checkpoint of a run that declares them, and their values recomputed in replay from the weights.

The verifier's own reading of §5.2 (it never imports ``gradledger.training``). The driver checks the
form (``check_profiles``) before replay; a replay worker that restores or reaches a checkpoint of such
a run runs the program over the held-out inputs (``segment_profiles``), and the driver compares what
came back with what was recorded (``compare_profiles``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from gradledger.ledger.envelope import Sealed
from gradledger.ledger.program import run as run_program

from .flags import next_after
from .graph_routing import program_inputs
from .settings import monitors
from .structure import Run, Structure

__all__ = ["CHUNK", "ProfileClaim", "ProfileInvalid", "check_profiles", "compare_profiles", "entropy_profile",
           "held_out_request", "segment_profiles"]

PROFILE_FORMAT = 1
METHOD = "ncm-entropy"
#: §5.1: held-out examples are run this many at a time; chunk ``j`` under the default generator seeded ``j``.
CHUNK = 256
#: §5.1: a band's features (examples x width) at most this many values, checked before they are kept.
MAX_FEATURE_VALUES = 1 << 25
#: §5.4: how far a recomputed entropy may be from the recorded one, in bits: in exact replay (the
#: weights bit for bit) and in tolerance mode (specs/replay.md §4).
EXACT_BITS, TOLERANCE_BITS = 1e-9, 1e-4


class ProfileInvalid(Exception):
    """A DepthProfile that is malformed, missing, or does not recompute (the message says why)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class ProfileClaim:
    """One recorded profile: its seq, run, checkpoint step, and values (per band, per class; per band)."""

    seq: int
    run: int
    step: int
    entropy: list[list[float]]
    mean: list[float]
    #: per band, per slice (§5.3): empty where the run profiles classes only
    slices: list[list[float]] = field(default_factory=list)


# -- §5.2 the read-out, the verifier's twin ----------------------------------------------------


def slice_key(fields: Mapping[str, Any], paths: Sequence[str], by: str) -> str:
    """§5.3: a held-out example's slice: its review state, or the longest common prefix (whole segments)
    of its sources' credential paths, ``"*"`` when they share none."""
    if by == "review":
        return str(fields["review"])
    common: list[str] | None = None
    for path in paths:
        segs = path.split("/")
        if common is None:
            common = segs
            continue
        n = 0
        while n < len(common) and n < len(segs) and common[n] == segs[n]:
            n += 1
        common = common[:n]
    return "/".join(common or []) or "*"


def example_entropy(features: Tensor, labels: Tensor, classes: Sequence[int], temperature: float) -> Tensor:
    """§5.2 steps 1-3, step by step: centre, the unit-norm scale, each class's mean, the logits of the
    squared distances to them, softmax, entropy in bits: one value per example."""
    z = features - features.mean(dim=0)
    s2 = z.square().sum(dim=1).mean()
    mu = torch.stack([z[labels == c].mean(dim=0) for c in classes])
    # -|z - mu|^2 without the example's own |z|^2, which softmax ignores: one product, no cancellation;
    # over s2 (unit mean squared norm) and the temperature, unless every row is the same
    logits = (2.0 * (z @ mu.T) - mu.square().sum(dim=1)) / ((s2 if float(s2) > 0.0 else 1.0) * temperature)
    p = torch.softmax(logits, dim=1)
    return torch.special.entr(p).sum(dim=1) / math.log(2.0)


def entropy_profile(features: Tensor, labels: Tensor, classes: Sequence[int], temperature: float,
                    slices: Tensor | None = None, n_slices: int = 0) -> tuple[list[float], float, list[float]]:
    """§5.2 step 4 and §5.3 for one band: ``example_entropy``'s mean per class, over every example, and per
    slice (``slices`` [N]: each example's index among ``n_slices``)."""
    h = example_entropy(features, labels, classes, temperature)
    return ([float(h[labels == c].mean()) for c in classes], float(h.mean()),
            [float(h[slices == j].mean()) for j in range(n_slices)] if slices is not None else [])


def _values(node_outputs: Sequence[str | None], value: Any) -> list[tuple[str, Any]]:
    """A node's named results (as ``boundary_hook`` reads them): one value, or one per output."""
    if not isinstance(value, (tuple, list)):
        return [(node_outputs[0], value)] if len(node_outputs) == 1 and node_outputs[0] is not None else []
    return [(o, v) for o, v in zip(node_outputs, value) if o is not None]


def segment_profiles(module: Any, inputs: Sequence[Tensor], request: Mapping[str, Any]
                     ) -> tuple[list[list[float]], list[float], list[list[float]]]:
    """§5.1, §5.2 for the module's weights now: ``inputs`` the held-out examples' program inputs (one
    tensor, or parts in canonical order), ``request`` from ``held_out_request``. Band ``k >= 1`` reads
    its boundary's one value (routing.md §6.1), band 0 the program's first floating output."""
    graph, boundaries = module.program.graph, module.boundaries
    n = len(boundaries)
    want: dict[str, int] = {}
    for k in range(1, n):
        if len(boundaries[k]) != 1:
            raise ProfileInvalid(f"band {k}'s boundary yields {len(boundaries[k])} values in the program; a depth "
                                 "profile reads exactly one (specs/dynamics.md §5.1)")
        want[boundaries[k][0]] = k
    count = int(inputs[0].shape[0])
    chunks: list[list[Tensor]] = [[] for _ in range(n)]
    state = module.live_state()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for j, start in enumerate(range(0, count, CHUNK)):
            torch.default_generator.manual_seed(j)
            parts = tuple(t[start:start + CHUNK] for t in inputs)
            x = parts[0] if len(parts) == 1 else parts
            seen: dict[int, Any] = {}

            def after(node: Any, value: Any) -> Any:
                for name, v in _values(node.outputs, value):
                    if name in want:
                        seen[want[name]] = v
                return value

            outs = [o for o in run_program(graph, program_inputs(graph, x, n), state, after=after)
                    if isinstance(o, Tensor) and o.is_floating_point()]
            if not outs:
                raise ProfileInvalid("the program has no floating output: the head band's profile has no features")
            seen[0] = outs[0]
            rows = int(parts[0].shape[0])
            for k in range(n):
                f = seen.get(k)
                if not isinstance(f, Tensor) or not f.is_floating_point() or f.dim() == 0 or f.shape[0] != rows:
                    raise ProfileInvalid(f"band {k}'s boundary value is not a floating tensor with the batch first")
                width = f[0].numel() if rows else 0
                if count * width > MAX_FEATURE_VALUES:
                    raise ProfileInvalid(f"band {k}'s features would hold {count} x {width} values, more than "
                                         f"{MAX_FEATURE_VALUES} (specs/dynamics.md §5.1)")
                chunks[k].append(f.detach().reshape(rows, -1).to(torch.float64))
    labels = torch.tensor(request["labels"], dtype=torch.int64)
    classes = sorted(set(request["labels"]))
    names = sorted(set(request["slices"]))
    at = torch.tensor([names.index(k) for k in request["slices"]], dtype=torch.int64)
    entropy, mean, by_slice = [], [], []
    for c in chunks:
        per, m, sl = entropy_profile(torch.cat(c), labels, classes, request["temperature"], at, len(names))
        entropy.append(per)
        mean.append(m)
        by_slice.append(sl)
    return entropy, mean, by_slice


# -- §5.3 the records, before replay -----------------------------------------------------------


def held_out_request(st: Structure, run: Run) -> dict[str, Any] | None:
    """What a replay worker needs to recompute ``run``'s profiles (None: the run declares none, or is an
    unlearning branch, which records none): the held-out inputs' digest, labels and temperature."""
    declared = monitors(run.settings).get("profiles") if run.branch_of is None else None
    if declared is None:
        return None
    ds = st.datasets[declared["dataset"]["seq"]]
    return {"inputs": ds.data, "labels": [int(m.label) for m in ds.manifests], "temperature": declared["temperature"],
            "slices": _slices(st, ds, declared.get("slice"))}


def _slices(st: Structure, ds: Any, by: str | None) -> list[str]:
    """Each held-out example's slice (§5.3), or none where the run asks for classes only. A source's
    path is its credential's, from the registry the structural checks built."""
    if by is None:
        return []
    return [slice_key(m.fields, [st.registry.get(e["key_id"]).path for e in m.fields["sources"]], by)
            for m in ds.manifests]


def check_profiles(st: Structure) -> list[ProfileClaim]:
    """Every DepthProfile's form (§5.3) and every required one present (§5.1); the claims to recompute.
    Raises ProfileInvalid for the first that fails."""
    claims: list[ProfileClaim] = []
    held: dict[int, _Held | None] = {}
    for obs in st.observations:
        if obs.type == "DepthProfile":
            claims.append(_check(obs, st, held))
    seen = {(c.run, c.step) for c in claims}
    if len(seen) != len(claims):
        dup = next(c for c in claims if sum((d.run, d.step) == (c.run, c.step) for d in claims) > 1)
        raise ProfileInvalid(f"DepthProfile {dup.seq}: a second profile of step {dup.step} of the run", dup.seq)
    for run in st.runs.values():
        if _held_of(st, run, held) is None:
            continue
        for c in run.checkpoints:
            step = st.observations[c].body["step"]
            if (run.seq, step) not in seen:
                raise ProfileInvalid(f"Checkpoint {c} (step {step}) of run {run.run_id!r} has no DepthProfile: the "
                                     "run's settings.monitors declares one at each checkpoint (specs/dynamics.md §5.1)", c)
    return claims


def _declared(st: Structure, run: Run) -> dict[str, Any] | None:
    """A governed original run's declared profiles, its held-out dataset checked against the record."""
    if not run.governed or run.branch_of is not None:
        return None
    try:
        declared = monitors(run.settings).get("profiles")
    except ValueError as exc:
        raise ProfileInvalid(f"RunStarted {run.seq}: {exc}", run.seq) from None
    if declared is None:
        return None
    d = declared["dataset"]
    ds = st.datasets.get(d["seq"])
    if ds is None or d["seq"] > run.seq or (ds.name, ds.root, ds.count) != (d["name"], d["root"], d["count"]):
        raise ProfileInvalid(f"RunStarted {run.seq}: settings.monitors.profiles names dataset {d['name']!r} at "
                             f"{d['seq']}, which is not a DatasetCommitted before the run with that name, root and "
                             "count", run.seq)
    trained = {m.fields["example"] for m in st.datasets[run.dataset_seq or 0].manifests}
    if any(m.fields["example"] in trained for m in ds.manifests):
        raise ProfileInvalid(f"RunStarted {run.seq}: the profiles' dataset {d['name']!r} shares examples with the "
                             "training set: a depth profile reads held-out examples (specs/dynamics.md §5.1)", run.seq)
    return dict(declared)


@dataclass(frozen=True)
class _Held:
    """What every profile of one declaring run is checked against, derived once per run: the declared
    profiles, their parameters, the held-out classes and counts (and slices), and each checkpoint's seq by
    step."""

    declared: dict[str, Any]
    params: dict[str, Any]
    classes: list[int]
    counts: list[int]
    slices: dict[str, Any] | None  # {"by", "names", "counts"} where a slice is declared
    checkpoints: dict[int, int]


def _held_of(st: Structure, run: Run, cache: dict[int, _Held | None]) -> _Held | None:
    """``_declared`` and what follows from it for ``run``, computed the first time a profile asks."""
    if run.seq not in cache:
        declared = _declared(st, run)
        if declared is None:
            cache[run.seq] = None
        else:
            ds = st.datasets[declared["dataset"]["seq"]]
            labels = [int(m.label) for m in ds.manifests]
            classes = sorted(set(labels))
            slices = None
            if "slice" in declared:
                keys = _slices(st, ds, declared["slice"])
                names = sorted(set(keys))
                slices = {"by": declared["slice"], "names": names, "counts": [keys.count(k) for k in names]}
            steps: dict[int, int] = {}
            for c in run.checkpoints:
                steps.setdefault(st.observations[c].body["step"], c)
            cache[run.seq] = _Held(declared, {"temperature": declared["temperature"],
                                              **({"slice": declared["slice"]} if "slice" in declared else {})},
                                   classes, [labels.count(c) for c in classes], slices, steps)
    return cache[run.seq]


def _floats(v: Any, n: int, top: float) -> bool:
    return isinstance(v, list) and len(v) == n and all(
        type(x) is float and math.isfinite(x) and -EXACT_BITS <= x <= top + EXACT_BITS for x in v)


def _check(obs: Sealed, st: Structure, cache: dict[int, _Held | None]) -> ProfileClaim:
    body, seq = obs.body, obs.seq

    def bad(why: str) -> ProfileInvalid:
        return ProfileInvalid(f"DepthProfile {seq}: {why}", seq)

    if body["format"] != PROFILE_FORMAT:
        raise bad(f"format {body['format']!r} is not {PROFILE_FORMAT}")
    run = st.run_before(seq, body["run"])
    if run is None:
        raise bad(f"run {body['run']!r} names no governed run recorded before it")
    held = _held_of(st, run, cache)
    if held is None:
        raise bad(f"run {run.run_id!r} declares no depth profiles (settings.monitors.profiles)")
    declared = held.declared
    if obs.signer != st.observations[run.seq].signer:
        raise bad("it is not signed by the run's trainer")
    if body["dataset"] != declared["dataset"]["seq"] or body["parameters"] != held.params:
        raise bad("its dataset and parameters are not the ones the run's settings.monitors.profiles declares")
    step = body["step"]
    at = held.checkpoints.get(step) if type(step) is int else None
    if at is None or not at < seq < next_after(run.updates, at, len(st.observations)):
        raise bad(f"step {step!r} is not a checkpoint of the run recorded before it with no update between")
    classes = held.classes
    if body["classes"] != classes or body["counts"] != held.counts:
        raise bad("classes and counts are not the held-out dataset's labels and how many examples carry each")
    n_bands, top = len(run.settings["band_params"]), math.log2(len(classes)) if len(classes) > 1 else 0.0
    entropy, mean = body["entropy"], body["mean"]
    if not (isinstance(entropy, list) and len(entropy) == n_bands and all(_floats(e, len(classes), top) for e in entropy)
            and _floats(mean, n_bands, top)):
        raise bad(f"entropy is not {n_bands} bands x {len(classes)} classes, and mean {n_bands} values, each a float "
                  f"in [0, log2({len(classes)})]")
    slices: list[list[float]] = []
    if held.slices is not None:
        want = held.slices
        names = want["names"]
        got = body.get("slices")
        if not isinstance(got, dict) or set(got) != {"by", "names", "counts", "entropy"} or \
                {k: got[k] for k in ("by", "names", "counts")} != want:
            raise bad(f"slices is not the held-out examples' {declared['slice']} slices {names} with their counts")
        slices = got["entropy"]
        if not (isinstance(slices, list) and len(slices) == n_bands and all(_floats(e, len(names), top) for e in slices)):
            raise bad(f"slices.entropy is not {n_bands} bands x {len(names)} slices, each a float in [0, log2(|C|)]")
    elif "slices" in body:
        raise bad("it records slices the run's settings do not declare")
    return ProfileClaim(seq, run.seq, step, entropy, mean, slices)


# -- §5.4 recomputed against recorded ------------------------------------------------------------


def compare_profiles(claims: Sequence[ProfileClaim], found: Mapping[tuple[int, int], Any], *, exact: bool
                     ) -> tuple[int, float]:
    """Each claim whose checkpoint a replayed segment recomputed (``found``: (run, step) -> (entropy, mean,
    slices))
    within §5.4's bound; (claims recomputed, largest deviation in bits). Raises ProfileInvalid."""
    bound = EXACT_BITS if exact else TOLERANCE_BITS
    done, worst = 0, 0.0
    for c in claims:
        got = found.get((c.run, c.step))
        if got is None:
            continue
        entropy, mean, by_slice = got
        pairs = [(f"band {k} class position {i}", a, b) for k, (es, fs) in enumerate(zip(c.entropy, entropy))
                 for i, (a, b) in enumerate(zip(es, fs))] + [(f"band {k} mean", a, b) for k, (a, b) in enumerate(zip(c.mean, mean))]
        pairs += [(f"band {k} slice position {i}", a, b) for k, (es, fs) in enumerate(zip(c.slices, by_slice))
                  for i, (a, b) in enumerate(zip(es, fs))]
        if len(entropy) != len(c.entropy) or any(len(a) != len(b) for a, b in zip(c.entropy, entropy)) or \
                (c.slices and (len(by_slice) != len(c.slices) or any(len(a) != len(b) for a, b in zip(c.slices, by_slice)))):
            raise ProfileInvalid(f"DepthProfile {c.seq}: the recomputed profile has another shape", c.seq)
        for where, a, b in pairs:
            d = abs(a - b)
            if not d <= bound:
                raise ProfileInvalid(f"DepthProfile {c.seq} (step {c.step}): {where} records {a!r} bits, recomputed "
                                     f"from the checkpoint's weights it is {b!r} (specs/dynamics.md §5.4)", c.seq)
            worst = max(worst, d)
        done += 1
    return done, worst
