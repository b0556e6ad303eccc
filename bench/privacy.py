"""Differential privacy through depth routing (issue 17; specs/privacy.md) against Opacus on every parameter.

    python bench/privacy.py [--epsilon 2.0] [--epochs 15] [--seed 0]

**Data.** sklearn's digits: 1280 training examples (20 batches of 64), the other 517 for test. A third
are labeled by a credentialed expert (public: they need no privacy); the rest by a crowd worker, whose
examples are private. Among the private ones, 64 are **canaries**: pool examples given a random wrong
label, half of them trained on (IN) and half held out (OUT), drawn at random (the audit below).

**Three runs of one recipe** (a 64-W-W-10 ReLU MLP, SGD lr 0.05 momentum 0.9, batch 64, fixed batches of
one shuffled order per epoch, clip norm 1.0), timed step by step in one process, for each width W of
``--widths`` (default 1024, whose figures are the headline, then 256 under ``by_width``: there the plain
step is 0.7 ms and governance's per-step floor, about 1 ms without any privacy, dominates the ratio):

- ``plain``: no privacy at all (the step-time baseline; also the audit's power check, ``audit_eps_plain``);
- ``opacus_all``: Opacus's ``make_private`` over the whole model and every example (it cannot tell a
  public example from a private one), RDP accountant, noise multiplier chosen by Opacus's
  ``get_noise_multiplier`` for the target epsilon at delta 1e-5 over the run's steps;
- ``routed``: a **governed run** whose policy routes the expert's examples to every band, exactly, and
  the crowd's to the head band only, private (clip 1.0 and the same noise multiplier there): noise
  goes into the head alone, and the representation trains on public data without noise. The run is
  exported and verified by ``gradledger-verify``'s Verifier (full replay): its recomputed epsilon is
  compared with Opacus's ``get_epsilon`` for the same parameters.

**Figures.** ``accuracy_routed``, ``accuracy_opacus_all``, ``accuracy_plain`` (test set);
``routed_step_ratio`` and ``opacus_step_ratio`` (median step over the plain run's median step);
``epsilon_matches_opacus`` (the verifier's epsilon equals Opacus's within 1e-9, and the run verified
bit for bit); ``accounted_eps``; ``empirical_eps_lower``: a one-run canary audit of the routed model.
Each canary's score is its loss under its wrong label; for every threshold, the canaries below it
are guessed IN; with 95% Clopper-Pearson bounds (TPR's lower, FPR's upper), the bound is
``max ln((TPR_lo - delta) / FPR_hi)`` over thresholds and both directions' complements, 0 when none is
positive. It is a lower bound an attacker demonstrably achieves, to be compared with the accountant's
upper bound: it must not exceed it. ``audit_eps_plain`` is the same audit of the plain model.

The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import overhead as ov  # noqa: E402
from helpers import CROWD_KEY  # noqa: E402

from gradledger.ledger.bundle import export_bundle  # noqa: E402
from gradledger.training.bands import sequential_bands  # noqa: E402
from gradledger.training.dataset import commit_dataset  # noqa: E402
from gradledger.training.manifests import example_id, label_example, source_entry  # noqa: E402
from gradledger.training.policy import sign_policy  # noqa: E402
from gradledger.training.trainer import Governance  # noqa: E402

N_TRAIN, BATCH, CANARIES = 1280, 64, 64
DELTA, CLIP, LR = 1e-5, 1.0, 0.05
POLICY = {
    "name": "bench-privacy",
    "bands": ["head", "mid", "embedding"],
    "rules": [
        {"name": "expert", "match": {"authority": "acme/radiology"}, "profile": [1.0, 1.0, 1.0],
         "limits": [None, None, None]},
        {"name": "crowd-private", "match": {"authority": "acme/crowd"}, "profile": [1.0, 0.0, 0.0],
         "limits": [None, None, None], "private": True},
    ],
    "default": {"profile": [0.0, 0.0, 0.0], "limits": [None, None, None]},
}


def log(msg: str) -> None:
    print(f"[bench/privacy] {msg}", file=sys.stderr, flush=True)


WIDTH = 1024  # --widths


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


def split(seed: int) -> dict[str, Any]:
    """Training set (canaries IN at random positions), test set, OUT canaries; which examples are public."""
    x, y = ov.digits_data()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    canary = perm[:CANARIES]
    rest = perm[CANARIES:]
    inside = torch.rand(CANARIES, generator=g) < 0.5
    wrong = (y[canary] + torch.randint(1, 10, (CANARIES,), generator=g)) % 10
    cin, cout = canary[inside], canary[~inside]
    regular = rest[:N_TRAIN - len(cin)]
    test = rest[N_TRAIN - len(cin):]
    tx = torch.cat([x[regular], x[cin]])
    ty = torch.cat([y[regular], wrong[inside]])
    order = torch.randperm(N_TRAIN, generator=g)
    tx, ty = tx[order], ty[order]
    is_canary = torch.cat([torch.zeros(len(regular), dtype=torch.bool), torch.ones(len(cin), dtype=torch.bool)])[order]
    # A third of the regular examples are the expert's (public); every canary is the crowd's (private).
    public = (torch.arange(N_TRAIN) % 3 == 0) & ~is_canary
    return {"x": tx, "y": ty, "public": public, "test_x": x[test], "test_y": y[test],
            "canary_in": (x[cin], wrong[inside]), "canary_out": (x[cout], wrong[~inside])}


def manifests(d: dict[str, Any]) -> list:
    out = []
    for i in range(N_TRAIN):
        ex, label = example_id(d["x"][i]), int(d["y"][i])
        if bool(d["public"][i]):
            out.append(label_example(example=ex, sources=[source_entry(ov.WORLD.source_cred, label, 0.95)],
                                     aggregation="single", ontology="bench-v1", review="accepted", key=ov.WORLD.source,
                                     time=ov.T))
        else:
            out.append(label_example(example=ex, sources=[source_entry(ov.WORKER_CREDS[0], label, 0.9)],
                                     aggregation="single", ontology="bench-v1", review="accepted", key=CROWD_KEY,
                                     time=ov.T))
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def fit(model: nn.Module, opt: Any, loader: Any, epochs: int, step: Callable[[Any, Any], None]) -> list[float]:
    times = []
    for _ in range(epochs):
        for x, y in loader:
            started = time.perf_counter()
            step(x, y)
            times.append(time.perf_counter() - started)
    return times


def plain_step(model: nn.Module, opt: Any) -> Callable[[Any, Any], None]:
    def step(x: Any, y: Any) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def shuffled(d: dict[str, Any], seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(d["x"], d["y"]), batch_size=BATCH, shuffle=True, generator=g, drop_last=True)


def run_plain(d: dict[str, Any], epochs: int, seed: int) -> tuple[nn.Module, list[float]]:
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return model, fit(model, opt, shuffled(d, seed), epochs, plain_step(model, opt))


def run_opacus(d: dict[str, Any], epochs: int, seed: int, sigma: float) -> tuple[nn.Module, list[float], float]:
    from opacus import PrivacyEngine

    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=shuffled(d, seed),
                                             noise_multiplier=sigma, max_grad_norm=CLIP, poisson_sampling=False)
    times = fit(model, opt, loader, epochs, plain_step(model, opt))
    return model, times, float(engine.get_epsilon(DELTA))


def run_routed(d: dict[str, Any], epochs: int, seed: int, sigma: float, root: Path) -> tuple[nn.Module, list[float], Path]:
    led = ov.bench_ledger(root / "ledger")
    ds = commit_dataset(led, manifests(d), "bench-privacy", ov.WORLD.trainer, inputs=d["x"])
    fields = dict(POLICY, privacy={"clip": [CLIP, None, None], "noise": [sigma, None, None], "delta": DELTA})
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    run = Governance(led, ov.WORLD.trainer, dataset=ds, policy=sign_policy(fields, ov.WORLD.root, ov.T),
                     layout=sequential_bands(model), run_id="routed-dp", checkpoint_every=100, seed=seed,
                     root_key=ov.WORLD.root)
    gm, gopt, loader = run.make_governed(model, opt, DataLoader(TensorDataset(d["x"], d["y"]), batch_size=BATCH))
    times = fit(gm, gopt, loader, epochs, plain_step(gm, gopt))
    run.close()
    export_bundle(led, root / "run.glb", with_data=True)
    led.close()
    return model, times, root / "run.glb"


def _cp(k: int, n: int, lower: bool) -> float:
    """One-sided 97.5% Clopper-Pearson bound of a binomial proportion (a 95% two-sided interval)."""
    from scipy.stats import beta

    if lower:
        return 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    return 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))


def audit(model: nn.Module, d: dict[str, Any]) -> float:
    """The one-run canary audit's empirical epsilon lower bound (module docstring)."""
    with torch.no_grad():
        s_in = F.cross_entropy(model(d["canary_in"][0]), d["canary_in"][1], reduction="none").tolist()
        s_out = F.cross_entropy(model(d["canary_out"][0]), d["canary_out"][1], reduction="none").tolist()
    best = 0.0
    for t in sorted(set(s_in + s_out)):
        tp, fp = sum(s <= t for s in s_in), sum(s <= t for s in s_out)
        for a, na, b, nb in ((tp, len(s_in), fp, len(s_out)), (len(s_out) - fp, len(s_out), len(s_in) - tp, len(s_in))):
            tpr, fpr = _cp(a, na, True), _cp(b, nb, False)
            if tpr - DELTA > 0 and fpr > 0:
                best = max(best, math.log((tpr - DELTA) / fpr))
    return best


def measure(target_eps: float, epochs: int, seed: int) -> dict[str, Any]:
    from opacus.accountants.utils import get_noise_multiplier

    from gradledger.verify import VerificationPolicy, Verifier

    torch.set_num_threads(1)
    d = split(seed)
    steps = epochs * (N_TRAIN // BATCH)
    q = BATCH / N_TRAIN
    sigma = float(get_noise_multiplier(target_epsilon=target_eps, target_delta=DELTA, sample_rate=q, steps=steps,
                                       accountant="rdp"))
    log(f"{steps} steps, sample rate {q}, noise multiplier {sigma:.4f} for epsilon {target_eps} at delta {DELTA}")
    plain, t_plain = run_plain(d, epochs, seed)
    log(f"plain: accuracy {accuracy(plain, d['test_x'], d['test_y']):.3f}")
    opac, t_opacus, eps_opacus = run_opacus(d, epochs, seed, sigma)
    log(f"opacus on every parameter: accuracy {accuracy(opac, d['test_x'], d['test_y']):.3f}, epsilon {eps_opacus:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        routed, t_routed, bundle = run_routed(d, epochs, seed, sigma, Path(tmp))
        log(f"routed: accuracy {accuracy(routed, d['test_x'], d['test_y']):.3f}; verifying {bundle.name}")
        started = time.perf_counter()
        report = Verifier([ov.WORLD.root.public_key], VerificationPolicy()).verify(bundle)
        verify_s = time.perf_counter() - started
    if not report.verified:
        log(report.render())
    (spent,) = report.figures["privacy"]
    accounted = spent["epsilon"]
    median = statistics.median
    return {
        "accuracy_routed": round(accuracy(routed, d["test_x"], d["test_y"]), 4),
        "accuracy_opacus_all": round(accuracy(opac, d["test_x"], d["test_y"]), 4),
        "accuracy_plain": round(accuracy(plain, d["test_x"], d["test_y"]), 4),
        "routed_step_ratio": round(median(t_routed[5:]) / median(t_plain[5:]), 3),
        "opacus_step_ratio": round(median(t_opacus[5:]) / median(t_plain[5:]), 3),
        "step_ms": {"plain": round(median(t_plain[5:]) * 1e3, 3), "opacus_all": round(median(t_opacus[5:]) * 1e3, 3),
                    "routed": round(median(t_routed[5:]) * 1e3, 3)},
        "epsilon_matches_opacus": bool(report.verified and report.replay_mode == "exact"
                                       and abs(accounted - eps_opacus) <= 1e-9 * eps_opacus),
        "accounted_eps": round(accounted, 4),
        "epsilon_opacus": round(eps_opacus, 4),
        "empirical_eps_lower": round(audit(routed, d), 4),
        "audit_eps_plain": round(audit(plain, d), 4),
        "verified": report.verified, "verify_seconds": round(verify_s, 1),
        "noise_multiplier": round(sigma, 4), "delta": DELTA, "steps": steps, "sample_rate": q,
        "canaries": CANARIES, "public_fraction": round(float(d["public"].float().mean()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--widths", default="1024,256", help="hidden widths; the first gives the headline figures")
    args = parser.parse_args()
    global WIDTH
    runs = {}
    for width in [int(w) for w in args.widths.split(",")]:
        WIDTH = width
        log(f"width {width}")
        runs[width] = measure(args.epsilon, args.epochs, args.seed)
    first = next(iter(runs))
    out = {**runs[first], "width": first, "by_width": {str(w): r for w, r in runs.items() if w != first}}
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
