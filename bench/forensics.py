"""Forensics (issue 12): does `gradledger trace` find who taught the model a behavior, and what does it cost?

    python bench/forensics.py [--seeds S] [--lds-subsets K] [--mislabel-n N] [--skip-captum]

All on sklearn's bundled digits (1797 real examples, 8x8 images), every example with a signed,
credentialed manifest, governed training through the user's own loop, plain SGD (lr 0.1, no
momentum), the test helpers' routing policy (experts reach every band, confident crowd labels the
upper two, the rest the head only):

(a) **Faulty source.** 1400 training examples, each labeled by one of 8 sources (three attending
    experts signed for by the radiology authority, three crowd workers by the crowd authority, two
    labeling functions by a rules authority), assigned at random per seed; one source, chosen at
    random per seed, swaps 3 and 8 on its examples. A 64-64-64-10 MLP trains 9 epochs (batch 32,
    396 steps, padded to 400 so that the run closes at a checkpoint; a checkpoint every 100 steps,
    the library's default).
    Query: 20 held-out true 3s read as 8 rather than 3, and 20 true 8s read as 3 rather than 8 ("the
    affected classes confused": ``target`` the wrong class, ``against`` the true one).
    ``faulty_top1_rate`` (replay method) and ``faulty_top1_rate_checkpoints``: share of seeds where
    the faulty source ranks first. Cost: ``replay_trace_vs_train`` and ``checkpoint_trace_vs_train``
    (trace time over the governed training time of the same run, medians over seeds).
(b) **Counterfactual fidelity** on seed 0's run: ``source_lds``: Spearman correlation, over K random
    half-subsets of the 8 sources, between the predicted change of the mean query loss when the
    subset's examples are removed (the sum of its sources' scores) and the actual change, computed
    by exact replay of the recorded batches without those examples (the unlearning replay, from step
    0, through the run's exported program); ``example_lds`` the same over K random halves of the
    training examples.
(c) **Mislabels.** N training examples (default 600), 10% given a random other label, a 64-256-256-10
    MLP trained until it fits the noisy labels (train accuracy >= 0.99, reported), a checkpoint every
    100 steps. Each method ranks the examples (self-influence for replay and checkpoints, mean recorded
    loss for loss-trace, the per-example mean-loss baseline) and ``mislabel_found_at_10`` / ``_at_20``
    is the fraction of flipped labels in the top 10% / 20%, per method, next to captum's ``TracInCP``
    self-influence on the same checkpoints (install captum for the benchmark only:
    ``pip install captum``; without it those figures are null and ``captum`` says why).

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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import CROWD_KEY, crowd_credentials, genesis, make_world, policy_fields  # noqa: E402

from gradledger.ledger import credentials as C  # noqa: E402
from gradledger.ledger.keys import SigningKey  # noqa: E402
from gradledger.ledger.ledger import Ledger  # noqa: E402
from gradledger.training.bands import sequential_bands  # noqa: E402
from gradledger.training.dataset import commit_dataset  # noqa: E402
from gradledger.training.forensics import lineage, parse_query, trace  # noqa: E402
from gradledger.training.forensics.query import query_loss  # noqa: E402
from gradledger.training.forensics.methods import (checkpoints_influence, loss_trace, replay_influence,  # noqa: E402
                                                   replayer)
from gradledger.training.manifests import example_id, label_example, source_entry  # noqa: E402
from gradledger.training.policy import sign_policy  # noqa: E402
from gradledger.training.trainer import Governance  # noqa: E402

T = 10
WORLD = make_world()
CROWD_CRED, WORKER_CREDS = crowd_credentials(WORLD)
RULES_KEY = SigningKey.from_seed(bytes([81]) * 32, "rules")
RULES_CRED = C.issue(WORLD.root, subject="rules", path="acme/rules", role="authority", public_key=RULES_KEY.public_key)
EXTRA = {name: SigningKey.from_seed(bytes([82 + i]) * 32, name) for i, name in enumerate(
    ["dr-b", "dr-c", "worker-2", "lf-0", "lf-1"])}
CREDS = {
    "dr-a": WORLD.source_cred,
    "dr-b": C.issue(WORLD.authority, subject="dr-b", path="acme/radiology/attending", role="source",
                    public_key=EXTRA["dr-b"].public_key),
    "dr-c": C.issue(WORLD.authority, subject="dr-c", path="acme/radiology/attending", role="source",
                    public_key=EXTRA["dr-c"].public_key),
    "worker-0": WORKER_CREDS[0], "worker-1": WORKER_CREDS[1],
    "worker-2": C.issue(CROWD_KEY, subject="worker-2", path="acme/crowd/mturk", role="source",
                        public_key=EXTRA["worker-2"].public_key),
    "lf-0": C.issue(RULES_KEY, subject="lf-0", path="acme/rules/heuristics", role="source",
                    public_key=EXTRA["lf-0"].public_key),
    "lf-1": C.issue(RULES_KEY, subject="lf-1", path="acme/rules/heuristics", role="source",
                    public_key=EXTRA["lf-1"].public_key),
}
SOURCES = sorted(CREDS)
#: Who signs each source's manifests (its authority, on its behalf) and with what confidence it votes.
SIGNER = {"dr": WORLD.authority, "worker": CROWD_KEY, "lf": RULES_KEY}
CONFIDENCE = {"dr": 0.95, "worker": 0.8, "lf": 0.7}
POLICY = sign_policy(policy_fields("bench-forensics"), WORLD.root, T)
FLAT_POLICY = sign_policy({"name": "flat", "bands": ["head", "mid", "embedding"], "rules": [],
                           "default": {"profile": [1, 1, 1], "limits": [None, None, None]}}, WORLD.root, T)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


def new_ledger(path: Path) -> Ledger:
    led = Ledger.create(path)
    genesis(led, WORLD)
    led.append("CredentialIssued", {"credential": CROWD_CRED.signed}, WORLD.root)
    led.append("CredentialIssued", {"credential": RULES_CRED.signed}, WORLD.root)
    for name, cred in CREDS.items():
        if name != "dr-a":
            issuer = WORLD.authority if name.startswith("dr") else CROWD_KEY if name.startswith("worker") else RULES_KEY
            led.append("CredentialIssued", {"credential": cred.signed}, issuer)
    led.commit()
    return led


def manifests(x: torch.Tensor, labels: list[int], owner: list[str]) -> list[Any]:
    out = []
    for i, (y, name) in enumerate(zip(labels, owner)):
        kind = name.split("-")[0]
        out.append(label_example(example=example_id(x[i]), sources=[source_entry(CREDS[name], y, CONFIDENCE[kind])],
                                 aggregation="single", ontology="digits-v1", review="accepted", key=SIGNER[kind],
                                 time=T))
    return out


def governed(path: Path, x: torch.Tensor, labels: list[int], owner: list[str], *, hidden: int, epochs: int | None,
             every: int, seed: int, policy: Any = POLICY, fit_to: float | None = None,
             max_epochs: int = 400) -> tuple[Ledger, float, int, float]:
    """A governed run of the user's loop; (ledger, training seconds, steps, final train accuracy)."""
    led = new_ledger(path)
    ds = commit_dataset(led, manifests(x, labels, owner), "digits", WORLD.trainer, inputs=x)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.tensor(labels, dtype=torch.int64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    run = Governance(led, WORLD.trainer, dataset=ds, policy=policy, layout=sequential_bands(model), run_id="bench",
                     checkpoint_every=every, seed=seed, root_key=WORLD.root, order="loader")
    gm, gopt, gl = run.make_governed(model, opt, loader)
    epoch, acc = 0, 0.0
    while True:
        for xb, yb in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(xb), yb).backward()
            gopt.step()
        epoch += 1
        if fit_to is None and epoch >= (epochs or 1):
            break
        if fit_to is not None and epoch % 10 == 0:
            with torch.no_grad():
                acc = float((model(x).argmax(1) == y).float().mean())
            log(f"  mislabel run: epoch {epoch}, train accuracy on the noisy labels {acc:.3f}")
            if acc >= fit_to or epoch >= max_epochs:
                break
    # A closed run ends at a checkpoint: pad to the next multiple of ``every`` with whole extra batches.
    while run.step % every:
        for xb, yb in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(xb), yb).backward()
            gopt.step()
            if run.step % every == 0:
                break
    run.close()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    return led, seconds, run.step, acc


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")


# -- (a) faulty source ------------------------------------------------------------------------------


def faulty_run(seed: int, x: torch.Tensor, y: torch.Tensor, work: Path) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(x), generator=g)
    train, held = perm[:1400], perm[1400:]
    owner = [SOURCES[int(i)] for i in torch.randint(0, len(SOURCES), (1400,), generator=g)]
    faulty = SOURCES[int(torch.randint(0, len(SOURCES), (1,), generator=g))]
    labels = [int(v) for v in y[train]]
    labels = [{3: 8, 8: 3}.get(v, v) if owner[i] == faulty else v for i, v in enumerate(labels)]
    xt = x[train].contiguous()
    led, train_s, steps, _ = governed(work / f"faulty-{seed}", xt, labels, owner, hidden=64, epochs=9, every=100,
                                      seed=seed)
    # "The affected classes confused": held-out true 3s against 8 and true 8s against 3.
    rows = torch.cat([held[y[held] == 3][:20], held[y[held] == 8][:20]])
    qfile = work / f"query-{seed}.safetensors"
    from safetensors.torch import save_file

    save_file({"x": x[rows].contiguous()}, str(qfile))
    query = json.dumps({"description": "3s read as 8 and 8s read as 3", "inputs": {"file": str(qfile)},
                        "target": [8 if int(y[i]) == 3 else 3 for i in rows], "against": [int(y[i]) for i in rows]})
    t0 = time.perf_counter()
    by_replay = trace(led, query, method="replay", top=len(SOURCES))
    replay_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    by_cp = trace(led, query, method="checkpoints", top=len(SOURCES))
    cp_s = time.perf_counter() - t0
    out = {"seed": seed, "faulty": faulty, "steps": steps, "train_s": train_s, "replay_s": replay_s, "cp_s": cp_s,
           "top_replay": by_replay["sources"][0]["source"], "top_cp": by_cp["sources"][0]["source"],
           "share_replay": by_replay["sources"][0]["share"], "p_top": by_replay["sources"][0]["p_top"],
           "led": led, "query": query, "labels": labels, "owner": owner, "x": xt, "report": by_replay}
    return out


def counterfactual(led: Ledger, query: str, removed: set[int]) -> float:
    """The mean query loss after exact replay of the recorded batches without the ``removed`` examples."""
    lin = lineage(led, None)
    rep = replayer(led, lin)
    rep.restore(led, lin.run.checkpoints[0][1])
    q = parse_query(query, labels=rep.labels, inputs=rep.inputs, classes=10)
    from gradledger.training.runtime import torch_deterministic

    with torch_deterministic():
        for _, u in lin.run.updates:
            batch = [i for i in u["batch"] if i not in removed]
            if batch:
                rep.step(u, batch)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = rep.module(q.inputs, torch.ones((len(q), rep.n_bands)))
            return float(query_loss(rep.example_loss_fn)(out, q.rows()).mean())


def lds(run: dict[str, Any], subsets: int) -> tuple[float, float]:
    led, query, owner = run["led"], run["query"], run["owner"]
    lin = lineage(led, None)
    rep = replayer(led, lin)
    q = parse_query(query, labels=rep.labels, inputs=rep.inputs, classes=10)
    found = replay_influence(led, lin, rep, q)
    example_scores = found.acc.examples.mean(1)
    base = counterfactual(led, query, set())
    g = torch.Generator().manual_seed(7)
    pred_s, act_s, pred_e, act_e = [], [], [], []
    for k in range(subsets):
        chosen = {SOURCES[int(i)] for i in torch.randperm(len(SOURCES), generator=g)[: len(SOURCES) // 2]}
        removed = {i for i, o in enumerate(owner) if o in chosen}
        pred_s.append(float(example_scores[list(removed)].sum()))
        act_s.append(counterfactual(led, query, removed) - base)
        half = set(torch.randperm(len(owner), generator=g)[: len(owner) // 2].tolist())
        pred_e.append(float(example_scores[list(half)].sum()))
        act_e.append(counterfactual(led, query, half) - base)
        log(f"  lds subset {k + 1}/{subsets}: sources {sorted(chosen)} predicted {pred_s[-1]:+.4f} actual {act_s[-1]:+.4f}")
    return spearman(pred_s, act_s), spearman(pred_e, act_e)


# -- (c) mislabels ------------------------------------------------------------------------------------


def found_at(scores: torch.Tensor, flipped: set[int], frac: float) -> float:
    k = int(round(frac * len(scores)))
    top = set(torch.argsort(scores, descending=True)[:k].tolist())
    return len(top & flipped) / len(flipped)


def captum_self_influence(led: Ledger, hidden: int, x: torch.Tensor, labels: list[int]) -> tuple[torch.Tensor | None, str]:
    try:
        from captum.influence import TracInCP
    except ImportError as exc:
        return None, f"captum not installed ({exc.name}): pip install captum"
    lin = lineage(led, None)
    rep = replayer(led, lin)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    lrs = {}
    for _, u in lin.run.updates:
        lrs.setdefault(max(c["step"] for _, c in lin.run.checkpoints if c["step"] <= u["step"]), float(u["lr"]))
    names = [c for _, c in lin.run.checkpoints if c["step"] in lrs]

    def load(m: nn.Module, path: Any) -> float:
        rep.restore(led, names[int(path)])
        m.load_state_dict({k: v.detach().clone() for k, v in rep.inner.state_dict().items()})
        return lrs[names[int(path)]["step"]]

    data = TensorDataset(x, torch.tensor(labels, dtype=torch.int64))
    tracin = TracInCP(model, data, [str(i) for i in range(len(names))], checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=64, sample_wise_grads_per_batch=False)
    return tracin.self_influence(show_progress=False).to(torch.float64), "TracInCP (all layers, unrouted)"


def mislabels(x: torch.Tensor, y: torch.Tensor, n: int, work: Path, skip_captum: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)[:n]
    xs = x[perm].contiguous()
    labels = [int(v) for v in y[perm]]
    flipped = set(torch.randperm(n, generator=g)[: n // 10].tolist())
    for i in flipped:
        labels[i] = (labels[i] + int(torch.randint(1, 10, (1,), generator=g))) % 10
    owner = [SOURCES[i % len(SOURCES)] for i in range(n)]
    led, train_s, steps, acc = governed(work / "mislabel", xs, labels, owner, hidden=256, epochs=None, every=100,
                                        seed=0, policy=FLAT_POLICY, fit_to=0.99)
    log(f"  mislabel run: {steps} steps, train accuracy on the noisy labels {acc:.3f}")
    lin = lineage(led, None)
    rep = replayer(led, lin)
    q = parse_query(json.dumps({"inputs": {"indices": [0]}, "target": "label"}), labels=rep.labels,
                    inputs=rep.inputs, classes=10)
    out: dict[str, Any] = {"mislabel_train_accuracy": acc, "mislabel_steps": steps}
    t0 = time.perf_counter()
    replayed = replay_influence(led, lin, rep, q, self_influence=True)
    out["mislabel_replay_s"] = time.perf_counter() - t0
    cp = checkpoints_influence(led, lin, rep, q, self_influence=True)
    mean, _ = loss_trace(lin)
    scores = {"replay": replayed.acc.self_influence, "checkpoints": cp.acc.self_influence,
              "loss_trace": torch.nan_to_num(mean, nan=-1.0)}
    captum = None
    if skip_captum:
        out["captum"] = "skipped (--skip-captum)"
    else:
        captum, out["captum"] = captum_self_influence(led, 256, xs, labels)
    if captum is not None:
        scores["captum_tracincp"] = captum
    for name, s in scores.items():
        out[f"mislabel_found_at_10_{name}"] = found_at(s, flipped, 0.10)
        out[f"mislabel_found_at_20_{name}"] = found_at(s, flipped, 0.20)
    ours = ("replay", "checkpoints", "loss_trace")
    best = max(ours, key=lambda m: (out[f"mislabel_found_at_10_{m}"], out[f"mislabel_found_at_20_{m}"]))
    out["mislabel_best_method"] = best
    out["mislabel_found_at_10"] = out[f"mislabel_found_at_10_{best}"]
    out["mislabel_found_at_20"] = out[f"mislabel_found_at_20_{best}"]
    led.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--lds-subsets", type=int, default=20)
    ap.add_argument("--mislabel-n", type=int, default=600)
    ap.add_argument("--skip-captum", action="store_true")
    args = ap.parse_args()
    x, y = digits()
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = []
        for seed in range(args.seeds):
            r = faulty_run(seed, x, y, work)
            log(f"seed {seed}: faulty {r['faulty']}, replay ranks {r['top_replay']} first (share {r['share_replay']:.2f}, "
                f"p_top {r['p_top']:.2f}), checkpoints ranks {r['top_cp']} first; train {r['train_s']:.1f}s, "
                f"replay trace {r['replay_s']:.1f}s, checkpoint trace {r['cp_s']:.1f}s")
            runs.append(r)
            if seed > 0:
                r["led"].close()
        result["faulty_top1_rate"] = sum(r["top_replay"] == r["faulty"] for r in runs) / len(runs)
        result["faulty_top1_rate_checkpoints"] = sum(r["top_cp"] == r["faulty"] for r in runs) / len(runs)
        result["faulty_seeds"] = len(runs)
        result["replay_trace_vs_train"] = statistics.median(r["replay_s"] / r["train_s"] for r in runs)
        result["checkpoint_trace_vs_train"] = statistics.median(r["cp_s"] / r["train_s"] for r in runs)
        result["faulty_train_s_median"] = statistics.median(r["train_s"] for r in runs)
        log("counterfactual fidelity (seed 0) ...")
        result["source_lds"], result["example_lds"] = lds(runs[0], args.lds_subsets)
        runs[0]["led"].close()
        log("mislabel detection ...")
        result.update(mislabels(x, y, args.mislabel_n, work, args.skip_captum))
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
