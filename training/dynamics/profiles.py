"""Entropy depth profiles: how sure the model is of each class at each band's boundary (specs/dynamics.md §5).

At each checkpoint a governed run declared with ``Governance(..., profiles=DepthProfiles("heldout"))``
runs the model over a held-out committed dataset, reads each band's boundary output (the head band:
the model's first floating output) and scores it with a nearest-class-mean read-out: the entropy, in
bits, of each held-out example's class evidence there, averaged per class. A deep band whose
evidence for a class stays near ``log2(C)`` has not separated that class yet: confusion at depth,
which ``gradledger feedback`` turns into annotation priorities. The body is a signed
``DepthProfile`` observation; the verifier recomputes it in replay from the checkpoint's weights
(verify/_internal/profiles.py, its twin from the spec).

The read-out needs no training and no choice from the trainer beyond a temperature: features are
centred and scaled to unit mean squared norm (so bands of any width compare), each class's mean
is taken over its held-out examples, and an example's evidence is the softmax of its negative
squared distances over the temperature. The default 0.2 was measured on the demo's final model
(nearest-class-mean accuracy 0.90 to 0.92 per band): its head reads 0.74 bits there, near the 0.79
bits of a calibrated 90%-accurate ten-class classifier (0.1 gave 0.33, 0.5 gave 1.91).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import GovernanceError

__all__ = ["CHUNK", "MAX_PROFILE_EXAMPLES", "METHOD", "PROFILE_FORMAT", "Budgets", "DepthProfiles", "ProfileJob",
           "band_features", "entropy_profile", "profile_body"]

#: §5.1: the one read-out of format 1.
METHOD = "ncm-entropy"
PROFILE_FORMAT = 1
#: §5.1: held-out examples are run this many at a time, in committed order; chunk ``j``'s forward runs
#: with the default generator seeded ``j`` (a program with dropout draws the same masks in replay).
CHUNK = 256
#: §5.1: a bound on the held-out set (its features are held per band: examples x width x 8 bytes).
MAX_PROFILE_EXAMPLES = 4096
#: §5.1: a band's features (held-out examples x width) at most this many values: the read-out holds them
#: in binary64 (256 MiB), in the trainer and in every replay worker that recomputes the profile.
MAX_FEATURE_VALUES = 1 << 25
#: §5.1: the temperature's bounds.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


@dataclass(frozen=True)
class DepthProfiles:
    """Record a ``DepthProfile`` at every checkpoint, over the committed dataset named ``dataset`` (held
    out: committed with its inputs, never trained on by the run), read out at ``temperature``."""

    dataset: str
    temperature: float = 0.2
    #: §5.3: besides each class, also average over this slice of the held-out examples: ``"authority"``
    #: (their sources' common credential path) or ``"review"`` (their review state); None: classes only.
    slice: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise GovernanceError(f"profiles dataset must be a committed dataset's name, got {self.dataset!r}")
        t = self.temperature
        if type(t) is not float or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise GovernanceError(f"profiles temperature must be a float in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                                  f"got {t!r}")
        if self.slice not in SLICES:
            raise GovernanceError(f"profiles slice must be one of {[s for s in SLICES if s]} or None, got {self.slice!r}")

    @property
    def parameters(self) -> dict[str, Any]:
        return {"temperature": self.temperature, **({"slice": self.slice} if self.slice else {})}


#: §5.3: the slices a profile may also average over (None: the classes only).
SLICES = (None, "authority", "review")


def slice_key(manifest: Any, paths: Sequence[str], by: str) -> str:
    """§5.3: a held-out example's slice: its review state, or the longest common prefix (whole segments)
    of its sources' credential paths (``"*"`` when they share none)."""
    if by == "review":
        return str(manifest["review"])
    parts = [p.split("/") for p in paths]
    common = parts[0] if parts else []
    for q in parts[1:]:
        n = 0
        while n < min(len(common), len(q)) and common[n] == q[n]:
            n += 1
        common = common[:n]
    return "/".join(common) or "*"


def example_entropy(features: Tensor, labels: Tensor, classes: Sequence[int], temperature: float) -> Tensor:
    """§5.2 steps 1-3: each example's entropy in bits of the nearest-class-mean evidence of ``features``
    ``[N, D]`` (binary64) over ``classes`` (ascending; ``labels`` ``[N]``). Each line is one step of §5.2,
    in its order: the verifier's twin must get the same bits."""
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
    """§5.2 step 4 and §5.3 for one band: the mean of ``example_entropy`` over each class in ``classes``
    (ascending), over all examples, and over each of ``n_slices`` slices (``slices`` [N]: each example's)."""
    h = example_entropy(features, labels, classes, temperature)
    return ([float(h[labels == c].mean()) for c in classes], float(h.mean()),
            [float(h[slices == j].mean()) for j in range(n_slices)] if slices is not None else [])


def _first_float(value: Any) -> Tensor | None:
    """The one floating tensor of a boundary module's output (a tensor, or a tuple/list holding one)."""
    from ..recorder import float_leaves

    leaves = float_leaves(value)
    return leaves[0] if len(leaves) == 1 else None


def band_features(gated: Any, rows: Callable[[int, int], Any], count: int) -> list[Tensor]:
    """Per band (head first), the ``[count, width]`` features of the held-out examples, in the model's
    dtype (the read-out casts them to binary64): the model run plainly (the gate's hooks are inert
    outside its forward: the identity gate's values, up to the sign of zero) on chunks of ``CHUNK``
    rows, chunk ``j`` under the default generator seeded ``j`` in a forked generator (the run's own
    draws never move). Each boundary must run once per forward, as in training."""
    from ..recorder import float_leaves

    n = len(gated.bands)
    seen: list[Tensor | None] = [None] * n
    calls = [0] * n
    handles = []
    for k in range(1, n):
        def hook(_m: Any, _i: Any, out: Any, k: int = k) -> None:
            calls[k] += 1
            seen[k] = _first_float(out)
            if seen[k] is None:
                raise GovernanceError(f"boundary {gated.layout.bands[k].boundary!r} of band {gated.bands.names[k]!r} "
                                      "does not output exactly one floating tensor: its depth profile has no "
                                      "features (specs/dynamics.md §5.1)")
        handles.append(gated.bands.boundary_modules[k].register_forward_hook(hook))
    chunks: list[list[Tensor]] = [[] for _ in range(n)]
    try:
        # Never under the caller's autocast (a checkpoint may be taken inside one): the program the
        # verifier runs for the profile has none.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.autocast("cpu", enabled=False):
            for j, start in enumerate(range(0, count, CHUNK)):
                torch.default_generator.manual_seed(j)
                x = rows(start, min(start + CHUNK, count))
                batch = gated.inputs.flatten(x)[0].shape[0]
                calls[:] = [0] * n
                out = float_leaves(gated.inputs.call_model(gated.model, x))
                if not out:
                    raise GovernanceError("the model has no floating output: its depth profile has no features")
                if any(c != 1 for c in calls[1:]):
                    raise GovernanceError("a band boundary ran other than once in the profile's forward")
                seen[0] = out[0]
                for k in range(n):
                    f = seen[k]
                    assert f is not None
                    if f.dim() == 0 or f.shape[0] != batch:
                        raise GovernanceError(f"band {gated.bands.names[k]!r}'s boundary output has shape "
                                              f"{list(f.shape)}, not the batch ({batch}) first")
                    width = f[0].numel() if batch else 0
                    if count * width > MAX_FEATURE_VALUES:
                        raise GovernanceError(
                            f"band {gated.bands.names[k]!r}'s boundary output holds {width} values an example: "
                            f"{count} held-out examples make {count * width}, more than a depth profile reads "
                            f"({MAX_FEATURE_VALUES}, specs/dynamics.md §5.1); profile a smaller held-out set")
                    chunks[k].append(f.detach().reshape(batch, -1))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(c) for c in chunks]


def profile_body(run_seq: int, step: int, dataset_seq: int, features: Sequence[Tensor], labels: Sequence[int],
                 params: DepthProfiles, slices: Sequence[str] = ()) -> dict[str, Any]:
    """The DepthProfile body (§5.3) of one checkpoint's ``features`` (``band_features``) for held-out
    examples with ``labels`` and (where ``params.slice`` asks) their ``slices`` (``slice_key``)."""
    y = torch.tensor(list(labels), dtype=torch.int64)
    classes = sorted(set(int(v) for v in labels))
    names = sorted(set(slices))
    at = torch.tensor([names.index(k) for k in slices], dtype=torch.int64)
    entropy, mean, by_slice = [], [], []
    for f in features:
        per, m, sl = entropy_profile(f.to(torch.float64), y, classes, params.temperature, at, len(names))
        entropy.append(per)
        mean.append(m)
        by_slice.append(sl)
    body = {"format": PROFILE_FORMAT, "run": run_seq, "step": step, "dataset": dataset_seq, "method": METHOD,
            "parameters": params.parameters, "classes": classes,
            "counts": [int((y == c).sum()) for c in classes], "entropy": entropy, "mean": mean}
    if params.slice is not None:
        body["slices"] = {"by": params.slice, "names": names, "counts": [int((at == j).sum()) for j in range(len(names))],
                          "entropy": by_slice}
    return body


class ProfileJob:
    """A run's depth profiles: the held-out dataset, its inputs and labels, and the parameters."""

    def __init__(self, params: DepthProfiles, dataset: Any, columns: Any, registry: Any = None) -> None:
        self.params, self.dataset, self.columns = params, dataset, columns
        self.labels = [int(m.label) for m in dataset.manifests]
        self.slices: list[str] = []
        if params.slice is not None:
            self.slices = [slice_key(m.manifest, [registry.get(e["key_id"]).path for e in m.manifest["sources"]],
                                     params.slice) for m in dataset.manifests]

    @classmethod
    def of(cls, ledger: Any, params: DepthProfiles, trained: Any, ranks: Any = None) -> "ProfileJob":
        """The held-out dataset ``params.dataset`` (the latest committed under that name), checked."""
        from ..dataset import latest_dataset, load_dataset, load_inputs

        if not isinstance(params, DepthProfiles):
            raise GovernanceError(f"profiles must be a DepthProfiles, got {type(params).__name__}")
        if ranks is not None:
            raise GovernanceError("depth profiles are not recorded over torch.distributed ranks yet: run the "
                                  "profiles with gradledger on one process, or leave profiles= unset")
        seq = latest_dataset(ledger, params.dataset)
        if seq is None:
            raise GovernanceError(f"profiles dataset {params.dataset!r} is not committed in this ledger: commit the "
                                  "held-out examples with their inputs first")
        dataset = load_dataset(ledger, seq, verify=False)  # this ledger's own record, checked at its commit
        check_held_out(dataset, trained, params.dataset)
        return cls(params, dataset, load_inputs(ledger, dataset), ledger.registry)

    @property
    def settings(self) -> dict[str, Any]:
        """``settings.monitors.profiles`` (§5.1)."""
        ds = self.dataset
        return {"dataset": {"name": ds.name, "seq": ds.seq, "root": ds.root, "count": ds.count},
                "method": METHOD, **self.params.parameters}

    def rows(self, inputs: Any) -> Callable[[int, int], Any]:
        cols = self.columns
        if isinstance(cols, Mapping):
            return lambda a, b: inputs.rebuild([cols[n][a:b] for n in inputs.parts])
        return lambda a, b: cols[a:b]

    def features(self, gated: Any) -> list[Tensor]:
        """``band_features`` of ``gated``'s weights now: what must be read before the next step moves them."""
        return band_features(gated, self.rows(gated.inputs), self.dataset.count)

    def body(self, run_seq: int, step: int, features: Sequence[Tensor]) -> dict[str, Any]:
        """The DepthProfile body of step ``step`` of run ``run_seq`` from its ``features`` (the read-out:
        the recorder thread's work, while training goes on)."""
        assert self.dataset.seq is not None
        return profile_body(run_seq, step, self.dataset.seq, features, self.labels, self.params, self.slices)


def check_held_out(dataset: Any, trained: Any, name: str) -> None:
    """A held-out set the profile can use: committed with its inputs, at most ``MAX_PROFILE_EXAMPLES``
    examples, none of them an example of the training set ``trained``."""
    if dataset.data is None:
        raise GovernanceError(f"profiles dataset {name!r} was committed without its inputs: commit it with "
                              "inputs= so that the verifier can run the model on it")
    if dataset.count > MAX_PROFILE_EXAMPLES:
        raise GovernanceError(f"profiles dataset {name!r} has {dataset.count} examples; a profile reads at most "
                              f"{MAX_PROFILE_EXAMPLES} (specs/dynamics.md §5.1)")
    shared = {m.example for m in dataset.manifests} & {m.example for m in trained.manifests}
    if shared:
        raise GovernanceError(f"profiles dataset {name!r} shares {len(shared)} example(s) with the training set "
                              f"{trained.name!r}: a depth profile reads held-out examples")


class Budgets:
    """A run's entropy budgets (specs/dynamics.md §5.5): each checkpoint's profile means against the previous
    checkpoint's give the rules suspended until the next one."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.last: Mapping[str, Any] | None = None  # the last checkpoint's profile

    @classmethod
    def of(cls, policy: Any, profiles: ProfileJob | None) -> "Budgets | None":
        """The budgets of ``policy`` (a SignedPolicy), None without any; refused without the profiles they read."""
        budgeted = [policy.compiled.rules[i].name for i in policy.compiled.budgets]
        if not budgeted:
            return None
        if profiles is None:
            raise GovernanceError(f"policy {policy.policy['name']!r} gives rule(s) {budgeted} an entropy budget, "
                                  "which reads the run's depth profiles (specs/dynamics.md §5.5): govern with "
                                  "profiles=DepthProfiles(<held-out dataset>)")
        held = set(profiles.slices)
        for i, (_, _, name) in policy.compiled.budgets.items():
            if name is not None and name not in held:
                raise GovernanceError(f"rule {policy.compiled.rules[i].name!r}'s entropy budget reads slice {name!r}, "
                                      f"which the held-out set's profiles do not hold ({sorted(held) or 'no slices'}): "
                                      "declare DepthProfiles(..., slice=...) over a held-out set with examples in it")
        return cls(policy)

    def next(self, profile: Mapping[str, Any]) -> frozenset[int]:
        """The rules a checkpoint's ``profile`` (a DepthProfile body) suspends; remembered for the next."""
        from ..policy import suspended_rules

        out = suspended_rules(self.policy.compiled, self.last, profile)
        self.last = profile
        return out

    def read_back(self, ledger: Any, run_seq: int, step: int) -> frozenset[int]:
        """On resume at ``step``: the rules its recorded profile suspends, from the run's recorded profiles."""
        bodies = [b for b in (ledger.observation(q).body for q in ledger.by_type("DepthProfile"))
                  if b["run"] == run_seq and b["step"] <= step]
        if not bodies or bodies[-1]["step"] != step:
            raise GovernanceError(f"the run's policy has entropy budgets, and the checkpoint resumed from (step {step}) "
                                  "has no recorded DepthProfile to route the next step by")
        self.last = bodies[-2] if len(bodies) > 1 else None
        return self.next(bodies[-1])
