"""Exact unlearning against a full retrain without the source: time and bit-exactness.

    python bench/unlearning.py [--batch B] [--every K] [--hidden H] [--repeats R]

Workload: an MLP (64-H-H-10, H = --hidden, default 2048: about 4.3M parameters; three bands, SGD
with momentum) on sklearn's bundled digits (all 1797 examples), one epoch in the governed run's
recorded hash order, batch B (default 6, so 300 steps), a checkpoint every K steps (default 30,
10% of the run). Every example has a
signed manifest: the attending expert, two crowd workers by majority, or one of three "late"
crowd workers ``late-10``, ``late-50``, ``late-90``. Late worker ``late-P`` labels examples only
from step P% of the run on (chosen from the recorded order): one example a batch alone (removed
when it is retired) and one together with a crowd worker (relabeled), on every 10th step.

For each P in 10, 50, 90, on a copy of the original ledger: retire ``late-P`` (not timed), then
time ``unlearn`` (the whole call: loading the dataset, inputs and exported program from the
ledger, restoring the rewind checkpoint, replaying, recording the branch and the certificate).
The full retrain is a from-scratch governed run on a fresh ledger whose dataset holds the
re-aggregated manifests without the source (re-signed by the crowd authority; removed examples
left out), with the original batches minus the removed examples (``batches=``, same order, same
seeds): it is timed from building the Governance to the closing checkpoint (its setup exports
the model with ``torch.export``, as every governed run does); committing its dataset is not timed.

Reported: ``cost_ratio_at_P`` = unlearning time / retrain time (the minimum of ``--repeats``
timings of each); ``fraction_after_rewind_at_P`` = steps after the rewind checkpoint / all steps
(the target is ratio <= fraction + 0.05); ``unlearn_setup_s_at_P`` = seconds from the call to
the end of the first replayed step (loading from the ledger, restoring, the branch's RunStarted
and first checkpoint, one step: the part of unlearning that does not shrink with a later
source); ``bit_exact`` = every unlearned final checkpoint digest equals its retrain's;
``verify_vs_unlearn_at_P`` = the time of ``gradledger-verify --replay certificates`` on the
unlearned ledger (structural checks, the certificate checks, and bit-exact replay of the branch)
over that unlearning's time, and ``verify_vs_unlearn`` its value at 50%. The last stdout line is one JSON object; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import CROWD_KEY, crowd_credentials, crowd_ledger, make_world, policy_fields  # noqa: E402

from gradledger.ledger import credentials as C  # noqa: E402
from gradledger.ledger.keys import SigningKey  # noqa: E402
from gradledger.ledger.ledger import Ledger  # noqa: E402
from gradledger.training.bands import sequential_bands  # noqa: E402
from gradledger.training.dataset import commit_dataset  # noqa: E402
from gradledger.training.manifests import SignedManifest, example_id, label_example, sign_manifest, source_entry  # noqa: E402
from gradledger.training.policy import sign_policy  # noqa: E402
from gradledger.training.retirement import dependents, retire  # noqa: E402
from gradledger.training.trainer import Governance, Trainer, epoch_order  # noqa: E402
from gradledger.training.unlearning import unlearn  # noqa: E402
from gradledger.verify import VerificationPolicy, Verifier  # noqa: E402

WORLD = make_world()
T, SEED = 10, 11
POINTS = (10, 50, 90)
_, WORKER_CREDS = crowd_credentials(WORLD)
LATE_KEYS = {p: SigningKey.from_seed(bytes([110 + p]) * 32, f"late-{p}") for p in POINTS}
LATE_CREDS = {
    p: C.issue(CROWD_KEY, subject=f"late-{p}", path="acme/crowd/mturk", role="source", public_key=k.public_key)
    for p, k in LATE_KEYS.items()
}
POLICY = sign_policy(policy_fields("digits-bench"), WORLD.root, T)


def digits() -> tuple[torch.Tensor, list[int]]:
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), [int(y) for y in d.target]


def make_manifests(x: torch.Tensor, y: list[int], batch: int, steps: int) -> list[SignedManifest]:
    order = epoch_order(SEED, 0, len(y))
    late: dict[int, tuple[int, bool]] = {}  # index -> (point, alone)
    for p in POINTS:
        for step in range(steps * p // 100, steps, 10):
            pos = step * batch
            late[order[pos]] = (p, True)
            late[order[pos + 1]] = (p, False)
    out = []
    for i in range(len(y)):
        ex, label = example_id(x[i]), y[i]
        crowd = dict(ontology="digits-v1", review="accepted", key=CROWD_KEY, time=T)
        if i in late:
            p, alone = late[i]
            wrong = source_entry(LATE_CREDS[p], (label + 1) % 10, 0.95)
            if alone:
                out.append(label_example(example=ex, sources=[wrong], aggregation="single", **crowd))
            else:
                srcs = [source_entry(WORKER_CREDS[0], label, 0.8), wrong]
                out.append(label_example(example=ex, sources=srcs, aggregation="majority", **crowd))
        elif i % 3 == 0:
            out.append(label_example(example=ex, sources=[source_entry(WORLD.source_cred, label, 0.95)],
                                     aggregation="single", ontology="digits-v1", review="accepted", key=WORLD.source,
                                     time=T))
        else:
            other = label if i % 2 else (label + 1) % 10
            srcs = [source_entry(WORKER_CREDS[0], label, 0.9), source_entry(WORKER_CREDS[1], other, 0.4)]
            out.append(label_example(example=ex, sources=srcs, aggregation="majority", **crowd))
    return out


def new_ledger(path: Path, manifests: list[SignedManifest], x: torch.Tensor) -> tuple[Ledger, Any]:
    led = crowd_ledger(path, WORLD, list(LATE_CREDS.values()))
    return led, commit_dataset(led, manifests, "digits", WORLD.trainer, inputs=x)


def make_model(hidden: int) -> nn.Sequential:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def governed_run(led: Ledger, ds: Any, x: torch.Tensor, batch: int, steps: int, every: int, hidden: int,
                 **kw: Any) -> float:
    """A governed run; returns its seconds from building the Governance to the closing checkpoint."""
    model = make_model(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch)
    started = time.perf_counter()
    engine = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model),
                        run_id="digits-bench", checkpoint_every=every, seed=SEED, root_key=WORLD.root, **kw)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, steps)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=2048, help="width of the MLP's two hidden layers")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    x, y = digits()
    steps = -(-len(y) // args.batch)
    manifests = make_manifests(x, y, args.batch, steps)
    result: dict[str, Any] = {"steps": steps, "checkpoint_every": args.every, "batch": args.batch,
                              "examples": len(y), "hidden": args.hidden,
                              "parameters": sum(p.numel() for p in make_model(args.hidden).parameters()),
                              "torch_threads": torch.get_num_threads()}
    exact = True
    with tempfile.TemporaryDirectory() as tmp_dir, tqdm(total=1 + 2 * len(POINTS) * args.repeats, desc="bench",
                                                        disable=None, file=sys.stderr) as bar:
        tmp = Path(tmp_dir)
        base = tmp / "original"
        led, ds = new_ledger(base, manifests, x)
        result["original_run_s"] = round(governed_run(led, ds, x, args.batch, steps, args.every, args.hidden), 3)
        original_batches = [led.observation(s).body["batch"] for s in led.by_type("GovernedUpdate")]
        led.close()
        bar.update(1)
        for p in POINTS:
            source = f"late-{p}"
            unlearn_times, retrain_times, setup_times, heads = [], [], [], set()
            for r in range(args.repeats):
                copy = tmp / f"u{p}-{r}"
                shutil.copytree(base, copy)
                with Ledger.open(copy, writable=True) as led:
                    retire(led, source, CROWD_KEY, "labels shifted by one class")
                    first: list[float] = []
                    started = time.perf_counter()
                    res = unlearn(led, source, WORLD.trainer,
                                  progress=lambda step: first or first.append(time.perf_counter()))
                    unlearn_times.append(time.perf_counter() - started)
                    setup_times.append(first[0] - started)
                heads.add(res.new_head)
                if r == 0:
                    # Certificate verification as a regulator runs it: structure, certificate checks
                    # and replay of the certified branch (not of the original run).
                    started = time.perf_counter()
                    report = Verifier([WORLD.root.public_key], VerificationPolicy(replay="certificates")).verify(copy)
                    verify_s = time.perf_counter() - started
                    if not report.verified or [c["replay"] for c in report.certificates] != ["pass"]:
                        raise SystemExit(f"certificate of {source} did not verify: {report.render()}")
                shutil.rmtree(copy)
                bar.update(1)
                # The counterfactual governed run, from scratch.
                deps = dependents(manifests, source)
                removed = set(deps.removed)
                kept = [i for i in range(len(y)) if i not in removed]
                remap = {old: new for new, old in enumerate(kept)}
                relabeled = [sign_manifest(**deps.relabeled[i], key=CROWD_KEY, time=T) if i in deps.relabeled
                             else manifests[i] for i in kept]
                batches = [[remap[i] for i in b if i not in removed] for b in original_batches]
                scratch = tmp / f"s{p}-{r}"
                led, ds = new_ledger(scratch, relabeled, x[kept])
                retrain_times.append(governed_run(led, ds, x[kept], args.batch, steps, args.every, args.hidden,
                                                   batches=batches))
                final = led.observation(led.by_type("Checkpoint")[-1]).body["digest"]
                led.close()
                shutil.rmtree(scratch)
                exact = exact and heads == {final}
                bar.update(1)
            u, t = min(unlearn_times), min(retrain_times)
            result[f"first_step_at_{p}"] = res.first_step
            result[f"rewind_step_at_{p}"] = res.rewind_step
            result[f"fraction_after_rewind_at_{p}"] = round((steps - res.rewind_step) / steps, 4)
            result[f"unlearn_s_at_{p}"] = round(u, 3)
            result[f"retrain_s_at_{p}"] = round(t, 3)
            result[f"unlearn_setup_s_at_{p}"] = round(min(setup_times), 3)
            result[f"cost_ratio_at_{p}"] = round(u / t, 4)
            result[f"verify_s_at_{p}"] = round(verify_s, 3)
            result[f"verify_vs_unlearn_at_{p}"] = round(verify_s / unlearn_times[0], 4)
            result[f"meets_target_at_{p}"] = u / t <= (steps - res.rewind_step) / steps + 0.05
            result[f"removed_at_{p}"], result[f"relabeled_at_{p}"] = len(res.removed), len(res.relabeled)
    result["bit_exact"] = exact
    result["verify_vs_unlearn"] = result[f"verify_vs_unlearn_at_{POINTS[len(POINTS) // 2]}"]
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
