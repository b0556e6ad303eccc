"""Memorization (issue 16): do the ledger's memorization flags find the examples LiRA finds most vulnerable,
and what does scanning at every checkpoint cost?

    python bench/dynamics.py [--shadows N] [--epochs E] [--seed S] [--timing-runs R] [--quick]

The reference is the LT-IQR paper's (Pollock, Shilov et al. 2024, "Free Record-Level Privacy Risk
Evaluation Through Artifact-Based Methods", arXiv 2411.05743): an example is *vulnerable* when LiRA
(Carlini et al. 2022, "Membership Inference Attacks From First Principles") identifies it confidently
and correctly at a false-positive rate of 1e-3, and a score is judged by its precision at finding the
most vulnerable 1% of the training set. Here, on sklearn's bundled digits:

**Data and models.** The pool is all 1797 digits (8x8, inputs /16 as binary32). ``M = N + 1`` models
(N shadows, default 16, and the target) share one recipe: a 64-256-256-10 ReLU MLP, SGD (lr 0.01,
momentum 0.9), batch 32, shuffled, E epochs (default 60; --quick 20, a check of the pipeline, not a
measurement: 20 epochs do not fit the training set). The recipe was chosen to fit the
training set (train accuracy >= 0.998 for every model, reported: the two or so examples a model misses
are ambiguous digits, and the target must fit to memorize) and to run well past fitting, the overfitting
regime that memorization needs, with a trace of E recorded losses per example; plain SGD at lr 0.1 for
60 epochs left some models at 0.97-0.98. Membership follows LiRA's reference code: each pool example is a
member of exactly ``M // 2`` or ``M - M // 2`` of the M models (a random choice of which, then a random
subset of models of that size), so every model trains on a random ~half of the pool and every example
has a balanced number of IN and OUT models (never none of either, whichever model is the target).
Model 0 is the target: a **governed run** of the user's own loop (``Governance(...).make_governed``)
over a committed dataset of its members only, each with a signed, credentialed manifest (the
credentials and manifests of bench/forensics.py, its flat policy: every example trains every band), a
checkpoint every 100 steps (the library's default) and ``memorization=MemorizationScan()`` (fraction
0.01, min_trace 4: the library's defaults), so that the run records its own scan at each checkpoint.
The shadows are trained in plain torch (the same recipe, their own seeds and members: speed), never
governed, each keeping its per-example losses as a governed run records them (the loss of every example
of the batch in the step's own forward pass).

**LiRA (online, leave-one-out).** For every model m and pool example i, the logit-scaled confidence
``phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j`` (from the logits in binary64, stably).
Each model in turn is the attacked one and the other M - 1 its shadows: per example, Gaussians are
fitted to the shadows' phi where it was IN and where it was OUT (means per example; with so few shadows
the variance is global, as LiRA does below 64 shadows: the pooled within-example variance of the IN
values and, separately, of the OUT values), and the score of model m on example i is the log-likelihood
ratio ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)``. One global threshold is set so that 0.1%
of all (model, non-member) pairs exceed it (``floor(1e-3 * pairs)`` of them); ``lira_tpr_at_0_1pct_fpr``
is the share of (model, member) pairs above it (``lira_auc`` over all pairs too). An example's
vulnerability is the share of the models that trained on it where its score is above that threshold
(its TPR at FPR 1e-3: "confidently and correctly identified"), ties broken by its mean score over those
models.

**Precision.** The population is the target's members (the governed run's dataset), k = ceil(1% of
them). The *vulnerable set* is the k members of highest vulnerability. ``mem_precision_at_1pct`` is
|the ledger's flags ∩ vulnerable set| / k, the flags being ``scan(ledger)``'s (the top ceil(1% of the
scored examples) by the library's default method, the mean recorded loss (specs/dynamics.md §1.1; LT-IQR
until this benchmark chose the mean); every member is scored, so that is k).
``mem_precision_at_1pct_by_score`` sets the candidates side by side on the same run, each the top k of
the members by its score over the recorded traces (ties: lower index first, the ledger's flag rule):
``lt_iqr`` (interquartile range of the trace), ``mean_loss``, ``final_loss`` (the trace's last value, the
example's loss at the last step that trained it) and ``cumulative_loss`` (the trace's sum; every member
is seen once an epoch, so every trace holds E values and the sum ranks as the mean does: it is reported
because the literature proposes it, not because it can differ here), ``early_loss`` (the mean of the
trace's first quarter: how hard the example was before it was fitted), ``max_loss``, ``late_mean_loss``
(the mean of its second half), and ``lt_iqr_class`` / ``mean_loss_class`` (each less its class's median,
over its class's IQR: a shadow-free difficulty calibration). k is small (9 for ~900 members),
so one run's precision moves in steps of 1/k: ``mem_precision_at_1pct_mean_over_models`` is each
candidate's precision averaged over all M models in turn as the target (each against the vulnerable
set of its own members, the shadows' traces standing for the ones a governed run of theirs would
record), the steadier comparison, and ``mem_best_score`` is chosen by it.
``members_at_or_above_kth_tpr`` says how many members tie at or above the k-th vulnerable one's TPR
(more than k: the mean score decided); ``mem_precision_at_1pct_ties_included`` counts a flag as a hit
when it is any of those tied members (a reading beside the headline, never in its place). ``random_baseline`` = k / members is the expected precision of
k random flags. ``lira_split_half_agreement_at_1pct`` (and ``_mean_over_models``) asks how reproducible the
reference itself is: the models cut into two disjoint halves (even and odd model numbers, each half as many
models as a 16-shadow benchmark when --shadows is 33), LiRA run within each half alone, and each model's
most vulnerable 1% by one half set against the other's; it is reported from 16 models (--shadows 15) on.

**Cost.** The monitors are the memorization scan and the depth profile (specs/dynamics.md §5) over a
held-out set, the target's non-members (~900 digits, committed with their inputs before the timer
starts). ``monitor_overhead``: the governed target run timed with both monitors and, over the
same seed (same batches), without it, ``--timing-runs`` times each in ABBA order after an untimed
warm-up run; median(with) / median(without) - 1 on wall time (``monitor_overhead_cpu``: the same on the
process's CPU time, all threads). Both are differences of ~10 s runs, at the mercy of whatever else the
machine runs. The scan itself runs on the run's recorder thread, so on an idle multi-core machine it
hides behind training; ``monitor_overhead_direct`` measures the monitor's own work instead, redone on
this thread: appending each step's losses to the traces (``monitor_append_us_per_step``) and each
checkpoint's scan job (a copy of the traces, the score of every index, the flags and the scores digest:
what ``Governance`` hands its recorder, ``scan_s_per_checkpoint_median``) and each checkpoint's profile
(the held-out forward and the read-out, ``profile_s_per_checkpoint_median``), over the training time of
the steps since the previous checkpoint (the run without the scan, per step), median over checkpoints.
``recorded_scans_match`` checks that the scan the run recorded at its last checkpoint flags what
``scan(ledger)`` recomputes. A third variant of the same run, timed in the same ABBA rounds, is governed
by ``ROUTED_POLICY``, whose ``memorized`` rule routes each flagged example to the head only from the
checkpoint that flags it on (specs/dynamics.md §2.4): there the scan runs on the training thread before
the next step is drawn. ``monitor_overhead_routed`` is its median wall time over the run's without a
scan, minus 1; ``routed_flagged_examples`` and ``routed_flagged_trainings`` count the examples the rule
moved and how often they were trained so; ``routed_train_accuracy`` / ``routed_test_accuracy`` sit
beside ``target_train_accuracy`` / ``target_test_accuracy`` (the cost of keeping memorized examples out
of the deeper bands).

**Feedback value.** ``bench/feedback_gain.py``'s ``measure`` (its docstring has the protocol):
``feedback_gain`` is the accuracy gain of relabeling the top 5% ``gradledger feedback`` prioritizes over
the gain of relabeling 5% at random, same retraining budget; its figures are copied here with a
``feedback_`` prefix (``--feedback-seeds 0`` skips it).

The last stdout line is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import forensics as FB  # noqa: E402  (its world, credentials, manifests, flat policy and data)

from gradledger.ledger.ledger import Ledger  # noqa: E402
from gradledger.training.bands import sequential_bands  # noqa: E402
from gradledger.training.dataset import commit_dataset, load_dataset  # noqa: E402
from gradledger.training.dynamics import LT_IQR, DepthProfiles, LossTraces, MemorizationScan, scan, scan_body  # noqa: E402
from gradledger.training.forensics import lineage  # noqa: E402
from gradledger.training.policy import sign_policy  # noqa: E402
from gradledger.training.trainer import Governance  # noqa: E402
from gradledger.training.updates import example_loss_values  # noqa: E402

HIDDEN = 256
LR = 0.01
MOMENTUM = 0.9
BATCH = 32
EPOCHS = 60
QUICK_EPOCHS = 20
EVERY = 100  # checkpoint_every: the library's default
PARAMS = MemorizationScan()  # fraction 0.01, min_trace 4, the mean loss: the library's defaults
#: The flat policy with detection made governance (specs/dynamics.md §2.4): a flagged example tunes the head only.
ROUTED_POLICY = sign_policy({
    "name": "flat-memorized", "bands": ["head", "mid", "embedding"],
    "rules": [{"name": "memorized", "match": {"memorized": True}, "profile": [1, 0, 0], "limits": [None, None, None]}],
    "default": {"profile": [1, 1, 1], "limits": [None, None, None]}, "monitors": {"memorization": PARAMS.parameters},
}, FB.WORLD.root, FB.T)
FPR = 1e-3
log = FB.log

#: One training run's recorded per-example losses, step by step: (dataset indices, binary32 losses).
Steps = list[tuple[list[int], Tensor]]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def loader(*tensors: Tensor, seed: int) -> DataLoader:
    # The batch order depends on the seed only: the shadows' loader (which also yields the indices)
    # draws the same permutations as a loader over (x, y) would.
    return DataLoader(TensorDataset(*tensors), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def membership(models: int, pool: int, seed: int) -> Tensor:
    """``keep[m, i]``: whether model m trains on example i. Every example is IN for exactly ``models // 2``
    or ``models - models // 2`` models (LiRA's reference design, balanced per example), so each model
    gets a random ~half of the pool."""
    g = torch.Generator().manual_seed(seed)
    ins = torch.where(torch.rand(pool, generator=g) < 0.5, models // 2, models - models // 2)
    rank = torch.argsort(torch.rand(models, pool, generator=g), dim=0).argsort(dim=0)  # a random permutation per column
    return rank < ins


# -- training -----------------------------------------------------------------------------------------


def train_shadow(x: Tensor, y: Tensor, seed: int, epochs: int) -> tuple[nn.Module, Steps]:
    """A shadow: the target's recipe in plain torch (not governed: speed), keeping each step's per-example
    losses from the step's own forward pass, as a governed run records them (its ``example_losses``)."""
    model = make_model(seed)
    opt = make_optimizer(model)
    dl = loader(x, y, torch.arange(len(x)), seed=seed)  # one loader iterated every epoch, as the target's loop
    steps: Steps = []
    for _ in range(epochs):
        for xb, yb, ib in dl:
            opt.zero_grad()
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            losses.mean().backward()
            opt.step()
            steps.append((ib.tolist(), losses.detach().to(torch.float32)))
    return model, steps


def governed(path: Path, x: Tensor, labels: list[int], *, epochs: int, seed: int,
             memorization: MemorizationScan | None, policy: Any = FB.FLAT_POLICY,
             held_out: tuple[Tensor, list[int]] | None = None) -> tuple[Ledger, nn.Module, float, float, int]:
    """The target: a governed run of the user's own loop over a committed dataset of ``x`` (the members);
    with ``held_out`` (inputs, labels) also a depth profile over them at every checkpoint (committed
    before the timer starts). (ledger, model, training wall seconds, training CPU seconds of the process,
    steps)."""
    led = FB.new_ledger(path)
    owner = [FB.SOURCES[i % len(FB.SOURCES)] for i in range(len(labels))]
    ds = commit_dataset(led, FB.manifests(x, labels, owner), "digits", FB.WORLD.trainer, inputs=x)
    profiles = None
    if held_out is not None:
        hx, hy = held_out
        commit_dataset(led, FB.manifests(hx, hy, [FB.SOURCES[0]] * len(hy)), "heldout", FB.WORLD.trainer, inputs=hx)
        profiles = DepthProfiles("heldout")
    model = make_model(seed)
    opt = make_optimizer(model)
    y = torch.tensor(labels, dtype=torch.int64)
    t0, c0 = time.perf_counter(), time.process_time()
    run = Governance(led, FB.WORLD.trainer, dataset=ds, policy=policy, layout=sequential_bands(model),
                     run_id="bench-dynamics", checkpoint_every=EVERY, seed=seed, root_key=FB.WORLD.root,
                     order="loader", memorization=memorization, profiles=profiles)
    gm, gopt, gl = run.make_governed(model, opt, loader(x, y, seed=seed))
    for _ in range(epochs):
        for xb, yb in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(xb), yb).backward()
            gopt.step()
    run.close()  # the last checkpoint (and its scan) is committed before close returns
    return led, model, time.perf_counter() - t0, time.process_time() - c0, run.step


def routed_figures(led: Ledger, model: nn.Module, x: Tensor, y: Tensor, members: Tensor, held: Tensor
                   ) -> dict[str, Any]:
    """What routing by the flags did in the run under ROUTED_POLICY: how many flagged examples it trained
    head-only and how often, and the model's accuracy next to the plain run's."""
    hits = [i for s in led.by_type("GovernedUpdate") for i, r in
            zip(led.observation(s).body["batch"], led.observation(s).body["routing"]["rules"]) if r == 0]
    return {"routed_flagged_examples": len(set(hits)), "routed_flagged_trainings": len(hits),
            "routed_train_accuracy": accuracy(model, x[members], y[members]),
            "routed_test_accuracy": accuracy(model, x[held], y[held])}


# -- LiRA ---------------------------------------------------------------------------------------------


def confidence(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """LiRA's logit-scaled confidence log(p_y / (1 - p_y)) = z_y - logsumexp of the other logits (binary64)."""
    with torch.no_grad():
        z = model(x).to(torch.float64)
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf)
    return zy - torch.logsumexp(others, 1)


def lira(phi: Tensor, keep: Tensor) -> Tensor:
    """Online LiRA, leave-one-out: ``score[m, i]``, the log-likelihood ratio IN/OUT of model m on example
    i, its Gaussians fitted on the other models (per-example means, global pooled variances)."""
    models = phi.shape[0]
    kin, kout = keep.to(torch.float64), (~keep).to(torch.float64)
    out = torch.empty_like(phi)
    for m in range(models):
        w_in, w_out = kin.clone(), kout.clone()
        w_in[m] = 0.0
        w_out[m] = 0.0
        n_in, n_out = w_in.sum(0), w_out.sum(0)  # >= models // 2 - 1 >= 1 each, by the balanced design
        mu_in, mu_out = (w_in * phi).sum(0) / n_in, (w_out * phi).sum(0) / n_out
        # The pooled within-example variance, one for IN and one for OUT: global, as LiRA does with few
        # shadows (a per-example variance from ~8 values is too noisy for a test at FPR 1e-3).
        var_in = float((w_in * (phi - mu_in) ** 2).sum() / (n_in - 1).sum())
        var_out = float((w_out * (phi - mu_out) ** 2).sum() / (n_out - 1).sum())
        x = phi[m]
        log_in = -0.5 * (x - mu_in) ** 2 / var_in - 0.5 * math.log(var_in)
        log_out = -0.5 * (x - mu_out) ** 2 / var_out - 0.5 * math.log(var_out)
        out[m] = log_in - log_out
    return out


def threshold_at(nonmember: Tensor, fpr: float) -> float:
    """The score above which ``floor(fpr * len)`` of the non-member scores lie (the largest FPR <= fpr)."""
    ranked = torch.sort(nonmember, descending=True).values
    return float(ranked[int(math.floor(fpr * ranked.numel()))])


def auc(member: Tensor, nonmember: Tensor) -> float:
    both = torch.cat([member, nonmember])
    ranks = torch.empty_like(both)
    ranks[torch.argsort(both)] = torch.arange(1, both.numel() + 1, dtype=both.dtype)
    n1, n0 = member.numel(), nonmember.numel()
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def vulnerability(score: Tensor, keep: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Each example's TPR at ``threshold`` (LiRA ``score`` above it) over the models that trained on it, and
    its mean score over them: the reference the precision reads."""
    kf = keep.to(torch.float64)
    hits = ((score > threshold) & keep).to(torch.float64)
    return hits.sum(0) / kf.sum(0), (score * kf).sum(0) / kf.sum(0)


def lira_reference(phi: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """LiRA over these models alone, one global threshold at FPR 1e-3 over their non-member scores:
    ``vulnerability``'s TPR and mean score per example."""
    score = lira(phi, keep)
    return vulnerability(score, keep, threshold_at(score[~keep], FPR))


def split_half_agreement(phi: Tensor, keep: Tensor) -> dict[str, Any]:
    """How far LiRA agrees with itself: the models cut into two disjoint halves (even and odd model
    numbers, the target in the first), LiRA run within each half alone, and each model's members'
    most vulnerable 1% by one half set against the other's (|A ∩ B| / k). A shadow-free score judged
    against one half's reference cannot be expected to find it more reliably than the other half's
    reference, with as many shadows, does: this is the ceiling the benchmark's noise puts on precision.
    Examples without two IN and two OUT models in each half are left out of that model's population."""
    halves = [torch.arange(0, phi.shape[0], 2), torch.arange(1, phi.shape[0], 2)]
    usable = torch.ones(phi.shape[1], dtype=torch.bool)
    for h in halves:
        n_in = keep[h].sum(0)
        usable &= (n_in >= 2) & (len(h) - n_in >= 2)
    phi, keep = phi[:, usable], keep[:, usable]
    refs = [lira_reference(phi[h], keep[h]) for h in halves]
    agreement = []
    for m in range(phi.shape[0]):
        rows = torch.nonzero(keep[m]).flatten()
        k = math.ceil(PARAMS.fraction * len(rows))
        a, b = (most_vulnerable(rows, tpr, mean_in, k) for tpr, mean_in in refs)
        agreement.append(len(a & b) / k)
    return {"lira_split_half_agreement_at_1pct": agreement[0],
            "lira_split_half_agreement_at_1pct_mean_over_models": statistics.fmean(agreement),
            "lira_split_half_models": [len(h) for h in halves],
            "lira_split_half_examples_left_out": int((~usable).sum())}


def most_vulnerable(members: Tensor, tpr: Tensor, mean_in: Tensor, k: int) -> set[int]:
    """The k members (as positions in ``members``) of highest TPR at FPR 1e-3, ties by the higher mean
    score over the models that trained on them (a lexicographic sort: by mean score, then stably by TPR)."""
    order = torch.argsort(-mean_in[members], stable=True)
    order = order[torch.argsort(-tpr[members][order], stable=True)]
    return set(order[:k].tolist())


# -- scores from loss traces ----------------------------------------------------------------------------


def top_k(scores: Tensor, k: int) -> list[int]:
    """The k highest scores' positions, ties to the lower position (the ledger's flag rule, §1.3)."""
    order = torch.argsort(-scores, stable=True)
    return order[:k].tolist()


def recorded_steps(led: Ledger) -> tuple[Steps, list[int], int]:
    """The run's per-example losses as its GovernedUpdates record them, the checkpoint steps and the
    run's seq."""
    lin = lineage(led, None, inputs=False)
    steps = [(list(u["batch"]), torch.tensor(example_loss_values(u["example_losses"]), dtype=torch.float32))
             for _, u in lin.run.updates]
    return steps, sorted(c["step"] for _, c in lin.run.checkpoints), lin.run.seq


def _class_calibrated(score: Tensor, labels: Tensor) -> Tensor:
    """``score`` less its class's median, over its class's interquartile range: an example atypical for its
    own class, not merely of a hard class (a shadow-free difficulty calibration)."""
    out = torch.full_like(score, math.nan)
    for c in labels.unique().tolist():
        rows = labels == c
        v = score[rows]
        q = torch.nanquantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype))
        out[rows] = (v - q[1]) / max(float(q[2] - q[0]), 1e-12)
    return out


def candidates(steps: Steps, count: int, labels: Tensor | None = None) -> dict[str, Tensor]:
    """Every candidate score of every index, from its loss trace (higher: flagged first); with ``labels``
    also the class-calibrated LT-IQR and mean loss."""
    traces = LossTraces(count)
    total = torch.zeros(count, dtype=torch.float64)
    seen = torch.zeros(count, dtype=torch.float64)
    final = torch.full((count,), math.nan, dtype=torch.float64)
    for batch, values in steps:
        traces.add(batch, values)
        b, v = torch.tensor(batch), values.to(torch.float64)
        total.index_add_(0, b, v)
        seen.index_add_(0, b, torch.ones_like(v))
        final[b] = v  # a batch holds an index once: the later step overwrites
    per: list[list[float]] = [[] for _ in range(count)]
    for batch, values in steps:
        for i, v in zip(batch, values.tolist()):
            per[i].append(v)
    nan = math.nan

    def early(t: list[float]) -> float:  # the mean over the first quarter: how hard before it was fitted
        q = max(1, len(t) // 4)
        return sum(t[:q]) / q if t else nan
    lt = traces.scores(PARAMS.min_trace, LT_IQR)
    calibrated = {} if labels is None else {"lt_iqr_class": _class_calibrated(lt, labels),
                                            "mean_loss_class": _class_calibrated(total / seen, labels)}
    return {"lt_iqr": lt, "mean_loss": total / seen, "final_loss": final, "cumulative_loss": total, **calibrated,
            "early_loss": torch.tensor([early(t) for t in per], dtype=torch.float64),
            "max_loss": torch.tensor([max(t) if t else nan for t in per], dtype=torch.float64),
            "late_mean_loss": torch.tensor([sum(t[len(t) // 2:]) / max(1, len(t) - len(t) // 2) if t else nan
                                            for t in per], dtype=torch.float64)}


def monitor_costs(steps: Steps, checkpoints: list[int], run_seq: int, count: int) -> list[tuple[int, float, float]]:
    """The memorization monitor's work, redone here on this thread: per step, ``Governance`` appending the
    step's losses to its traces; per checkpoint, the scan job it hands its recorder (a copy of the
    traces, the score of every index, the flags and the digest). (steps since the previous checkpoint,
    seconds appending over them, seconds scanning.)"""
    traces = LossTraces(count)
    out, prev = [], 0
    for c in checkpoints:
        if c == 0:
            continue
        t0 = time.perf_counter()
        for batch, values in steps[prev:c]:
            traces.add(batch, torch.cat([values.reshape(-1)]))  # as Governance.record_step does
        appended = time.perf_counter() - t0
        t0 = time.perf_counter()
        scan_body(run_seq, c, traces.copy(), PARAMS)
        out.append((c - prev, appended, time.perf_counter() - t0))
        prev = c
    return out


def profile_cost(led: Ledger, model: nn.Module, rounds: int = 5) -> float:
    """The depth profile's work at one checkpoint, redone here on one thread: the held-out forward through
    the gate (``Governance`` runs it on the training thread) and the read-out of every band (on its
    recorder thread); median seconds."""
    from gradledger.training.dynamics.profiles import ProfileJob
    from gradledger.training.gate import GatedModel

    job = ProfileJob.of(led, DepthProfiles("heldout"), load_dataset(led, led.by_type("DatasetCommitted")[0]))
    gated = GatedModel(model, sequential_bands(model))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        job.body(0, 0, job.features(gated))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- the benchmark --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shadows", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} ({QUICK_EPOCHS} with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-runs", type=int, default=None,
                    help="governed runs timed with and without the scan, each (default 3, 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help=f"a sanity run: {QUICK_EPOCHS} epochs, one timing pair")
    ap.add_argument("--feedback-seeds", type=int, default=5,
                    help="data seeds of the feedback benchmark (bench/feedback_gain.py; 0 skips it)")
    args = ap.parse_args()
    if args.shadows < 3:
        ap.error("--shadows must be at least 3 (leave-one-out LiRA needs IN and OUT shadows for every example)")
    epochs = args.epochs if args.epochs is not None else QUICK_EPOCHS if args.quick else EPOCHS
    timing_runs = args.timing_runs if args.timing_runs is not None else 1 if args.quick else 3
    if epochs < PARAMS.min_trace or timing_runs < 1:
        ap.error(f"--epochs must be at least {PARAMS.min_trace} (every member scored) and --timing-runs at least 1")
    torch.set_num_threads(1)  # a shared machine: one core for the models, the recorder thread has the other
    started = time.perf_counter()
    x, y = FB.digits()
    pool = len(x)
    models = args.shadows + 1
    keep = membership(models, pool, 7919 + args.seed)
    seeds = [args.seed * 1000 + m for m in range(models)]  # model 0 is the target

    members = torch.nonzero(keep[0]).flatten()  # dataset index j is pool example members[j]
    xm, labels = x[members].contiguous(), [int(v) for v in y[members]]
    held = torch.nonzero(~keep[0]).flatten()
    # The depth profiles' held-out set: the target's non-members (none of them trained).
    held_out = (x[held].contiguous(), [int(v) for v in y[held]])
    result: dict[str, Any] = {
        "seed": args.seed, "pool": pool, "members": len(members), "n_shadows": args.shadows, "epochs": epochs,
        "recipe": f"MLP 64-{HIDDEN}-{HIDDEN}-10, SGD lr {LR} momentum {MOMENTUM}, batch {BATCH}, {epochs} epochs",
        "checkpoint_every": EVERY, "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # An untimed warm-up (the first governed run in a process pays one-time costs), then the target
        # with its scan and the same run (same seed, same batches) without it, in ABBA order.
        governed(work / "warm-up", xm, labels, epochs=2, seed=seeds[0], memorization=PARAMS)[0].close()
        # A third variant routes by the scans' flags (ROUTED_POLICY): the scan then runs on the training
        # thread at each checkpoint, before the next step is drawn.
        wall: dict[Any, list[float]] = {True: [], False: [], "routed": []}
        cpu: dict[Any, list[float]] = {True: [], False: [], "routed": []}
        led = target = None
        for r in range(timing_runs):
            for scanned in ((True, False, "routed") if r % 2 == 0 else ("routed", False, True)):
                led_r, model_r, secs, cpu_s, steps_n = governed(
                    work / f"run-{r}-{scanned}", xm, labels, epochs=epochs, seed=seeds[0],
                    memorization=PARAMS if scanned is True else None,
                    policy=ROUTED_POLICY if scanned == "routed" else FB.FLAT_POLICY,
                    held_out=held_out if scanned is True else None)
                wall[scanned].append(secs)
                cpu[scanned].append(cpu_s)
                what = {True: "with its memorization scan", False: "without it", "routed": "routing by its flags"}
                log(f"governed target run {what[scanned]} ({r + 1}/{timing_runs}): {steps_n} steps, {secs:.1f}s")
                if scanned is True and led is None:
                    led, target, result["steps"] = led_r, model_r, steps_n  # the run measured below
                elif scanned == "routed" and r == 0:
                    result.update(routed_figures(led_r, model_r, x, y, members, held))
                    led_r.close()
                else:
                    led_r.close()
        assert led is not None and target is not None
        result["target_train_accuracy"] = accuracy(target, xm, y[members])
        result["target_test_accuracy"] = accuracy(target, x[held], y[held])

        # The ledger's view: its flags, and the losses its GovernedUpdates recorded.
        t0 = time.perf_counter()
        report = scan(led, params=PARAMS)
        result["scan_call_s"] = time.perf_counter() - t0
        steps, checkpoints, run_seq = recorded_steps(led)
        recorded = [led.observation(s).body for s in led.by_type("MemorizationScan")]
        result["recorded_scans"] = len(recorded)
        result["recorded_scans_match"] = bool(recorded) and (
            [[i, s] for i, s in recorded[-1]["flagged"]] == [[f["index"], f["score"]] for f in report["flagged"]]
            and recorded[-1]["through"] == result["steps"])
        costs = monitor_costs(steps, checkpoints, run_seq, len(members))
        profile_s = profile_cost(led, target)
        result["profile_s_per_checkpoint_median"] = profile_s
        profiles = [led.observation(s).body for s in led.by_type("DepthProfile")]
        result["recorded_profiles"] = len(profiles)
        result["profile_head_mean_bits_first_last"] = [profiles[0]["mean"][0], profiles[-1]["mean"][0]]
        led.close()

    # The shadows, plain torch, same recipe; their loss traces give the candidates' precision on them too.
    phi = torch.empty(models, pool, dtype=torch.float64)
    phi[0] = confidence(target, x, y)
    scores = [candidates(steps, len(members), y[members])]
    shadow_train, shadow_test = [], []
    t0 = time.perf_counter()
    for m in range(1, models):
        rows, out_rows = torch.nonzero(keep[m]).flatten(), torch.nonzero(~keep[m]).flatten()
        model, shadow_steps = train_shadow(x[rows].contiguous(), y[rows], seeds[m], epochs)
        phi[m] = confidence(model, x, y)
        scores.append(candidates(shadow_steps, len(rows), y[rows]))
        shadow_train.append(accuracy(model, x[rows], y[rows]))
        shadow_test.append(accuracy(model, x[out_rows], y[out_rows]))
        log(f"shadow {m}/{args.shadows}: {len(rows)} members, train accuracy {shadow_train[-1]:.3f}, "
            f"test {shadow_test[-1]:.3f} ({time.perf_counter() - t0:.0f}s)")
    result["shadow_train_accuracy_mean"] = statistics.fmean(shadow_train)
    result["shadow_train_accuracy_min"] = min(shadow_train)
    result["shadow_test_accuracy_mean"] = statistics.fmean(shadow_test)

    # LiRA over every model as the target, one global threshold at FPR 1e-3.
    score = lira(phi, keep)
    threshold = threshold_at(score[~keep], FPR)
    hits = (score > threshold) & keep
    result["lira_tpr_at_0_1pct_fpr"] = float(hits.sum() / keep.sum())
    result["lira_fpr_at_threshold"] = float(((score > threshold) & ~keep).sum() / (~keep).sum())
    result["lira_auc"] = auc(score[keep], score[~keep])
    # Per example: its TPR at that threshold over the models that trained on it, and its mean score there.
    tpr, mean_in = vulnerability(score, keep, threshold)
    result["lira_examples_with_tpr_above_0"] = int((tpr > 0).sum())
    if models >= 2 * 8:  # each half needs IN and OUT models beside the attacked one for most examples
        result.update(split_half_agreement(phi, keep))

    # The headline: the governed run's members (dataset index j = pool example members[j]), its flags.
    n = len(members)
    k = math.ceil(PARAMS.fraction * n)
    vulnerable = most_vulnerable(members, tpr, mean_in, k)
    flagged = [f["index"] for f in report["flagged"]]
    if len(flagged) != k:
        raise SystemExit(f"scan flagged {len(flagged)} examples, expected k = {k} (were all members scored?)")
    result["k"] = k
    result["mem_precision_at_1pct"] = len(set(flagged) & vulnerable) / k
    result["random_baseline"] = k / n
    result["vulnerable"] = sorted(vulnerable)
    result["vulnerable_tpr"] = sorted((round(float(tpr[members[i]]), 4) for i in vulnerable), reverse=True)
    kth = min(float(tpr[members[i]]) for i in vulnerable)
    result["members_at_or_above_kth_tpr"] = int((tpr[members] >= kth).sum())  # > k: the tie-break decided
    # The same flags against every member tied at or above the k-th TPR: with few shadows the per-example
    # TPR takes few values, and which of the tied members the mean score puts in the top k is not LiRA's verdict.
    tied = set(torch.nonzero(tpr[members] >= kth).flatten().tolist())
    result["mem_precision_at_1pct_ties_included"] = len(set(flagged) & tied) / k
    result["flagged"] = flagged
    # Every candidate on the target (its recorded traces), then on every model in turn as the target
    # (the shadows' traces are what a governed run of theirs would record): k = 9 moves in steps of 1/9,
    # the mean over the M models is the steadier comparison.
    per_model: dict[str, list[float]] = {name: [] for name in scores[0]}
    for m in range(models):
        rows = torch.nonzero(keep[m]).flatten()
        k_m = math.ceil(PARAMS.fraction * len(rows))
        vul_m = vulnerable if m == 0 else most_vulnerable(rows, tpr, mean_in, k_m)
        for name, s in scores[m].items():
            per_model[name].append(len(set(top_k(s, k_m)) & vul_m) / k_m)
    result["mem_precision_at_1pct_by_score"] = {name: v[0] for name, v in per_model.items()}
    result["mem_precision_at_1pct_mean_over_models"] = {name: statistics.fmean(v) for name, v in per_model.items()}
    result["mem_precision_at_1pct_lt_iqr_per_model"] = [round(v, 4) for v in per_model["lt_iqr"]]
    mean_over = result["mem_precision_at_1pct_mean_over_models"]
    result["mem_best_score"] = max(mean_over, key=lambda name: mean_over[name])  # over all models: steadier

    # Cost.
    w, wo = statistics.median(wall[True]), statistics.median(wall[False])
    per_step = wo / result["steps"]
    result["train_s_with_scan_runs"] = wall[True]
    result["train_s_without_scan_runs"] = wall[False]
    result["monitor_overhead"] = w / wo - 1.0
    result["monitor_overhead_cpu"] = statistics.median(cpu[True]) / statistics.median(cpu[False]) - 1.0
    result["monitor_overhead_routed"] = statistics.median(wall["routed"]) / wo - 1.0
    result["train_s_routed_runs"] = wall["routed"]
    result["monitor_overhead_direct"] = statistics.median((a + s + profile_s) / (d * per_step) for d, a, s in costs)
    result["monitor_append_us_per_step"] = 1e6 * sum(a for _, a, _ in costs) / result["steps"]
    result["scan_s_per_checkpoint_median"] = statistics.median(s for _, _, s in costs)
    result["scan_s_last_checkpoint"] = costs[-1][2]
    result["checkpoints_scanned"] = len(costs)
    # Feedback value (bench/feedback_gain.py): relabeling what `gradledger feedback` puts first vs at random.
    if args.feedback_seeds > 0:
        import feedback_gain

        fb = feedback_gain.measure(args.feedback_seeds, args.quick)
        for key in ("feedback_gain", "feedback_gain_conservative", "prioritized_gain", "random_gain", "random_gain_se",
                    "loss_only_gain", "baseline_accuracy", "flipped_found_in_top5pct", "flipped_precision_top5pct",
                    "cli_matches", "notes"):
            result[f"feedback_{key}" if not key.startswith("feedback") else key] = fb.get(key)
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
