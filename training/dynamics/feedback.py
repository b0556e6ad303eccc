"""What to annotate or review next (specs/dynamics.md §3): every trained example of a run ranked by
the evidence the ledger holds that its label needs a second look, with the reasons, and the
labeling sources and classes those examples come from.

Reasons, each a strength in [0, 1]:

- ``loss``: the percentile of the example's mean recorded loss among the trained examples (format 4's
  ``example_losses``); a label the model keeps disagreeing with is the commonest sign of a wrong one.
- ``memorized``: the percentile of its LT-IQR (memorization.py) among the scored examples; counted as a
  reason where the example is in the flagged top fraction.
- ``disagreement``: the share of its votes' confidence that went to another class than its label.
- ``influence``: it is among the examples a recorded ForensicTrace of the run found teaching the
  traced (unwanted) behavior.
- ``confusion``: confusion at depth (§5). Where the run recorded DepthProfiles, the entropy of the
  example's label's class at the head band of the run's last profile, over ``log2`` of the number of
  classes (0 with one class); every example whose label is one of the profile's classes has it.

The priority is ``0.6 loss + 0.2 disagreement + 0.2 influence`` (in [0, 1], no cap, so no ties forced
at a ceiling). A memorization flag is given as a reason but weighs nothing: slow-to-fit examples with
right labels have wide traces too, and bench/feedback_gain.py measured a 0.2 weight displacing
flipped labels from the top 5% in every seed (precision 0.93 against 0.97 without it). It is there
for the privacy review, which wants exactly those examples. ``confusion`` weighs nothing too, for
now: it is a property of the label's class, not of the example (every example of a class gets the same
strength), and its effect on bench/feedback_gain.py's gain was not measured; it is given so that a
reviewer sees which classes the model has not separated, and its weight is a later decision, to be
taken on that benchmark. A run without profiles gets no ``confusion`` reason and the same priorities.

The report's ``depth`` section (``depth_report``) gives, for the last profile, each class's entropy
per band, most confused at the head first, and ``confused_from``: the band nearest the head (the
smallest band index) at which the class's entropy is still above half of ``log2`` of the number of
classes, None where no band's is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from gradledger.ledger.ledger import Ledger

from ..errors import GovernanceError
from ..forensics.lineage import Lineage
from .memorization import LT_IQR, MemorizationScan, flag
from .scan import recorded_traces

__all__ = ["WEIGHTS", "FeedbackError", "Priority", "confusion", "depth_report", "last_profile", "priorities",
           "summarize"]

#: §3.1: the weights of the reasons in the priority (they add up to 1). ``memorized`` and ``confusion``
#: are reasons shown, not weighed (the module's docstring says why).
WEIGHTS = {"loss": 0.6, "memorized": 0.0, "disagreement": 0.2, "influence": 0.2, "confusion": 0.0}


class FeedbackError(GovernanceError):
    """A run that cannot give feedback (the message says why)."""


@dataclass
class Priority:
    """One training example's place in the feedback: its index, example id, committed label and sources,
    its priority and the reasons (name -> strength) behind it."""

    index: int
    example: bytes
    label: int
    sources: list[str]
    priority: float
    reasons: dict[str, float] = field(default_factory=dict)
    mean_loss: float = math.nan


def _percentile(values: Tensor, valid: Tensor) -> Tensor:
    """Each valid value's rank among the valid ones, scaled to [0, 1] (ties share their mean rank)."""
    out = torch.zeros_like(values, dtype=torch.float64)
    idx = torch.nonzero(valid).flatten()
    n = idx.numel()
    if n == 0:
        return out
    v = values[idx].to(torch.float64)
    order = torch.argsort(v, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    # ties: the mean rank of each distinct value
    uniq, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones(n, dtype=torch.float64))
    ranks = (sums / counts)[inverse]
    out[idx] = ranks / max(n - 1, 1)
    return out


def disagreement(manifest: Mapping[str, Any]) -> float:
    """The share of the votes' confidence (each vote 1 when all are 0) that is not on the label."""
    votes = manifest["sources"]
    weights = [float(s["confidence"]) for s in votes]
    if not votes:
        return 0.0
    if sum(weights) == 0:
        weights = [1.0] * len(votes)
    on = sum(w for s, w in zip(votes, weights) if s["vote"] == manifest["label"])
    return max(0.0, 1.0 - on / sum(weights))


def _influenced(ledger: Ledger, run_seq: int) -> set[int]:
    """Examples a recorded ForensicTrace of the run ranks as teaching its behavior (positive score)."""
    out: set[int] = set()
    for seq in ledger.by_type("ForensicTrace"):
        body = ledger.observation(seq).body
        if body["run"] == run_seq and body["method"] != "loss-trace":
            out.update(int(i) for i, s in body["result"].get("examples", []) if s > 0)
    return out


def run_profiles(ledger: Ledger, lin: Lineage) -> list[dict[str, Any]]:
    """The run's DepthProfile bodies (§5.3) by step. A branch records none (§5.1): its original's profiles at
    steps up to the rewind are read, the last of them profiling the very weights the branch starts from
    (later ones read weights the retired source trained)."""
    branch = lin.run.settings.get("branch")
    run_seq = lin.run.seq if branch is None else branch["of"]
    found = [b for b in (ledger.observation(q).body for q in ledger.by_type("DepthProfile"))
             if b.get("run") == run_seq and (lin.rewind_step is None or b["step"] <= lin.rewind_step)]
    return sorted(found, key=lambda b: b["step"])


def last_profile(ledger: Ledger, lin: Lineage) -> dict[str, Any] | None:
    """The run's last DepthProfile body (``run_profiles``); None where it recorded none."""
    found = run_profiles(ledger, lin)
    return found[-1] if found else None


def _top_bits(profile: Mapping[str, Any]) -> float:
    """``log2 |C|``: the most bits a profile's entropy holds (0 with one class)."""
    n = len(profile["classes"])
    return math.log2(n) if n > 1 else 0.0


def confusion(profile: Mapping[str, Any]) -> dict[int, float]:
    """§3.1's ``confusion`` strength of each of the profile's classes: its head-band (band 0) entropy over
    ``log2 |C|``, in [0, 1]; 0 for every class when there is one."""
    top = _top_bits(profile)
    return {int(c): (min(1.0, max(0.0, h / top)) if top > 0 else 0.0)
            for c, h in zip(profile["classes"], profile["entropy"][0])}


def depth_report(ledger: Ledger, lin: Lineage) -> dict[str, Any] | None:
    """The report's ``depth`` section (§3.1) from the run's last profile, None without one: its step, the
    bands' names (the run's settings, else ``band k``), ``log2 |C|``, and per class, most confused at the
    head first (ties: lower class first), its entropy per band (head first) and ``confused_from``: the
    smallest band index whose entropy is above half of ``log2 |C|`` (None where none is)."""
    profile = last_profile(ledger, lin)
    if profile is None:
        return None
    entropy = profile["entropy"]
    named = lin.run.settings.get("bands")
    names = [b.get("name") for b in named.get("bands", [])] if isinstance(named, Mapping) else []
    if len(names) != len(entropy) or not all(isinstance(n, str) for n in names):
        names = [f"band {k}" for k in range(len(entropy))]
    half = _top_bits(profile) / 2
    rows = []
    for i, c in enumerate(profile["classes"]):
        bits = [float(band[i]) for band in entropy]
        rows.append({"class": int(c), "entropy": bits,
                     "confused_from": next((k for k, h in enumerate(bits) if h > half), None)})
    rows.sort(key=lambda r: (-r["entropy"][0], r["class"]))
    return {"step": profile["step"], "bands": names, "max_bits": _top_bits(profile), "classes": rows}


def priorities(ledger: Ledger, *, run_id: str | None = None, memorization: MemorizationScan | None = None) -> tuple[
        Lineage, list[Priority]]:
    """Every trained example of run ``run_id`` (default: the latest governed run or branch), highest
    priority first (ties: lower index first); with the lineage read."""
    lin, traces, _ = recorded_traces(ledger, run_id, FeedbackError)
    mean, count = traces.mean()
    # LT-IQR unless asked otherwise: the mean loss is a reason of its own here (the "loss" percentile), and
    # bench/feedback_gain.py measured the two reasons side by side.
    params = memorization or MemorizationScan(method=LT_IQR)
    memo = traces.scores(params.min_trace, params.method)
    flagged = {i for i, _ in flag(memo, params.fraction)}
    # Canaries (§4) carry random labels on purpose: never a relabeling priority, nor in its percentiles.
    canary = torch.tensor(["canary" in m for m in lin.fields], dtype=torch.bool)
    trained = (count > 0) & ~canary
    loss_pct = _percentile(torch.nan_to_num(mean, nan=0.0), trained)
    mem_pct = _percentile(torch.nan_to_num(memo, nan=0.0), ~memo.isnan())
    influenced = _influenced(ledger, lin.run.seq)
    profile = last_profile(ledger, lin)
    confused = confusion(profile) if profile is not None else {}
    out = []
    for z in torch.nonzero(trained).flatten().tolist():
        m = lin.fields[z]
        reasons = {"loss": float(loss_pct[z])}
        if z in flagged:
            reasons["memorized"] = float(mem_pct[z])
        d = disagreement(m)
        if d > 0:
            reasons["disagreement"] = d
        if z in influenced:
            reasons["influence"] = 1.0
        if int(m["label"]) in confused:
            reasons["confusion"] = confused[int(m["label"])]
        p = sum(WEIGHTS[k] * v for k, v in reasons.items())
        out.append(Priority(z, lin.dataset.manifests[z].example, int(m["label"]),
                            sorted({s["source"] for s in m["sources"]}), p, reasons, float(mean[z])))
    out.sort(key=lambda e: (-e.priority, e.index))
    return lin, out


def summarize(items: Sequence[Priority], top: int, depth: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where the top ``top`` examples come from: per source and per class, how many of them, and the
    share of that source's or class's trained examples that is; and ``depth``, the run's
    ``depth_report`` (None: the run recorded no profile)."""
    def table(key: Any) -> list[dict[str, Any]]:
        total: dict[Any, int] = {}
        hit: dict[Any, int] = {}
        for rank, e in enumerate(items):
            for k in key(e):
                total[k] = total.get(k, 0) + 1
                if rank < top:
                    hit[k] = hit.get(k, 0) + 1
        rows = [{"name": k, "prioritized": hit.get(k, 0), "trained": n, "share": hit.get(k, 0) / n}
                for k, n in total.items()]
        rows.sort(key=lambda r: (-r["share"], -r["prioritized"], str(r["name"])))
        return rows
    return {"sources": table(lambda e: e.sources), "classes": table(lambda e: [e.label]),
            "depth": None if depth is None else dict(depth)}
