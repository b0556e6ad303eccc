"""Feedback value (issue 16): is relabeling what `gradledger feedback` puts first worth more than
relabeling at random?

    python bench/feedback_gain.py [--seeds N] [--quick]

Protocol, on sklearn's bundled digits (1797 real 8x8 images), per data seed ``s`` (0 .. N-1, default 5):

1. **Split.** A seeded permutation: the first ``POOL`` (600) examples are the training pool, the other
   1197 the held-out test set (always true labels). Why 600 and not 1200: digits is easy enough that
   with 1200 examples ~6% symmetric noise costs a well-trained MLP only ~0.2-0.5 accuracy points
   (measured: clean_gain 0.23 at 1200/40 epochs), so every gain is inside the run-to-run noise; at 600
   the noise costs ~1.2 points, and the larger test set makes each accuracy finer (1 example = 0.08).
2. **Sources.** Each pool example is labeled by one of the 8 sources of bench/forensics.py (three
   attending experts, three crowd workers, two labeling functions; one signed, credentialed manifest
   per example, one vote each), drawn uniformly per example. One source, drawn per seed, is noisy: it
   gives a *random other class* (uniform over the 9 wrong ones, the standard symmetric label noise) to
   ``NOISE_SHARE`` (50%) of its examples, the rest it labels correctly: ~37 flipped labels, ~6% of the
   pool.
3. **Governed run** on the noisy labels: ``commit_dataset`` then ``Governance(...).make_governed`` and
   the user's own loop, a 64-H-H-10 ReLU MLP (H = ``HIDDEN`` = 128), plain SGD (lr 0.1, cosine-decayed
   per epoch towards 0), batch 32 from a seeded shuffling DataLoader (``order="loader"``), ``EPOCHS``
   (60) epochs, padded with batches at the last lr to the next checkpoint (every 100 steps), under a
   flat policy (every source reaches every band): the retraining below is plain torch where every
   example trains every layer, so the governed run is the same training and the losses ``feedback``
   reads are those of the model being improved. Format 4's per-example losses are recorded by the
   library on its own.
4. **Choices**, each ``k = ceil(0.05 * trained)`` examples (30):
   ``prioritized``: the top ``k`` of ``feedback.priorities(ledger)`` (the order ``gradledger feedback
   --fraction 0.05`` writes); ``loss_only``: the top ``k`` by ``Priority.mean_loss`` (descending, ties
   by index), the plain baseline the priority's extra reasons should beat; ``random``: ``k`` drawn
   uniformly from the pool, ``RANDOM_DRAWS`` (12) independent seeded draws, so that the denominator
   is an estimate of the *expected* random gain rather than one lucky or unlucky draw (a draw fixes
   ~2 flipped labels on average).
5. **Relabel** each chosen set with the ground truth (an annotator who gets it right), and **retrain
   from scratch** in plain torch (not governed), the same model, optimizer, schedule, batch size,
   epochs and seeds for every condition, i.e. the same retraining budget: (a) ``baseline``, the noisy
   labels; (b) prioritized fixed; (c) loss-only fixed; (d) each random draw fixed; (e) ``clean``, every
   label fixed (a ceiling, for scale). Each is trained with ``TRAIN_SEEDS`` (4) training seeds (init
   and shuffle), the *same* seeds across conditions, so that each comparison is paired and only the
   labels differ. Test accuracy is averaged over training seeds, random draws and data seeds; the
   ratio is taken of the averaged gains (not averaged per seed: a per-seed random gain is often 0 or
   negative).

Output (the last stdout line, one JSON object; progress on stderr):
``feedback_gain`` = (acc_prioritized - acc_baseline) / (acc_random - acc_baseline), the ratio the
target (>= 2) speaks of, null when the random gain is <= 0 (``notes`` says so; the raw gains are
there anyway); ``prioritized_gain``, ``random_gain``, ``loss_only_gain``, ``clean_gain`` (accuracy
points, i.e. x100), ``loss_only_ratio`` (the same ratio for the loss-only order), ``baseline_accuracy``;
``flipped_found_in_top5pct`` (recall: the share of flipped labels the prioritized 5% holds) and
``flipped_precision_top5pct`` (the share of the prioritized 5% that was flipped), the same for
``loss_only_*`` and ``random_*``; ``random_gain_se`` (standard error of the random gain over the
(data seed, draw) pairs) and ``feedback_gain_conservative`` = prioritized_gain / (random_gain + 2 se); ``cli_matches``: on seed 0, whether ``gradledger feedback LEDGER
--format csv -o FILE --fraction 0.05`` writes the same examples, in the same order, as ``priorities``;
per-seed figures, the settings, the seconds.

``--quick``: 1 data seed, 1 training seed, 1 random draw, 12 epochs (a smoke test, not a measurement).
``measure(seeds, quick)`` is the importable entry point.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_BENCH = Path(__file__).resolve().parent
if str(_BENCH) not in sys.path:
    sys.path.insert(0, str(_BENCH))

# forensics.py builds the credentialed world (keys, credentials, signed policies) at import: cheap
# (milliseconds beyond importing torch and gradledger), and the sources/signers stay in one place.
import forensics as FB  # noqa: E402

from gradledger.training.bands import sequential_bands  # noqa: E402
from gradledger.training.dataset import commit_dataset  # noqa: E402
from gradledger.training.dynamics.feedback import Priority, priorities  # noqa: E402
from gradledger.training.trainer import Governance  # noqa: E402

POOL = 600  # training pool; the remaining 1197 digits are the test set
NOISE_SHARE = 0.5  # share of the noisy source's examples given a random wrong class
FRACTION = 0.05  # the share relabeled, as in `gradledger feedback --fraction 0.05`
HIDDEN = 128
EPOCHS = 60
BATCH = 32
LR = 0.1
EVERY = 100  # checkpoint interval of the governed run (the library's default)
TRAIN_SEEDS = 4
RANDOM_DRAWS = 12
DEFAULT_SEEDS = 5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def loader(x: torch.Tensor, labels: list[int], seed: int) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.tensor(labels, dtype=torch.int64)), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def governed_run(path: Path, x: torch.Tensor, labels: list[int], owner: list[str], *, hidden: int, epochs: int,
                 seed: int) -> tuple[Any, float, int]:
    """The governed run on the noisy labels: (open ledger, seconds, steps). The same model and loop as
    ``retrain`` (the flat policy lets every example reach every band)."""
    led = FB.new_ledger(path)
    ds = commit_dataset(led, FB.manifests(x, labels, owner), "digits", FB.WORLD.trainer, inputs=x)
    torch.manual_seed(seed)
    model = make_model(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    t0 = time.perf_counter()
    run = Governance(led, FB.WORLD.trainer, dataset=ds, policy=FB.FLAT_POLICY, layout=sequential_bands(model),
                     run_id="bench", checkpoint_every=EVERY, seed=seed, root_key=FB.WORLD.root, order="loader")
    gm, gopt, gl = run.make_governed(model, opt, loader(x, labels, seed))
    for epoch in range(epochs):
        set_lr(opt, epoch, epochs)  # the user's optimizer: the library records each new lr (a new recipe)
        for xb, yb in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(xb), yb).backward()
            gopt.step()
    # A closed run ends at a checkpoint: pad to the next multiple of EVERY with extra batches at the last lr.
    while run.step % EVERY:
        for xb, yb in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(xb), yb).backward()
            gopt.step()
            if run.step % EVERY == 0:
                break
    run.close()
    return led, time.perf_counter() - t0, run.step


def set_lr(opt: torch.optim.Optimizer, epoch: int, epochs: int) -> None:
    """Cosine decay per epoch, from LR towards 0. Why: with a constant lr the test accuracy at the last
    step swings by a point from run to run, which drowns the few tenths a 5% relabeling is worth; a
    decayed endpoint is stable, so paired runs (same seed, a few labels changed) differ by the labels."""
    for group in opt.param_groups:
        group["lr"] = LR * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def retrain(x: torch.Tensor, labels: list[int], xt: torch.Tensor, yt: torch.Tensor, *, hidden: int, epochs: int,
            seed: int) -> float:
    """Plain-torch training from scratch (the retraining budget, identical across conditions); test accuracy.

    The model, optimizer, schedule, batch size and epochs of the governed run; batches are a fresh seeded
    permutation each epoch (what a shuffling DataLoader draws) sliced directly, which is ~6x faster than
    a DataLoader's per-item collation and lets the default run afford enough paired retrains."""
    torch.manual_seed(seed)
    model = make_model(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    y = torch.tensor(labels, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        set_lr(opt, epoch, epochs)
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            b = perm[i:i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    with torch.no_grad():
        return float((model(xt).argmax(1) == yt).float().mean())


def split(seed: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The seed's pool/test split, source assignment, noisy source and flipped labels."""
    g = torch.Generator().manual_seed(16_000 + seed)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:POOL], perm[POOL:]
    truth = [int(v) for v in y[train]]
    owner = [FB.SOURCES[int(i)] for i in torch.randint(0, len(FB.SOURCES), (POOL,), generator=g)]
    noisy = FB.SOURCES[int(torch.randint(0, len(FB.SOURCES), (1,), generator=g))]
    mine = [i for i, o in enumerate(owner) if o == noisy]
    chosen = [mine[int(j)] for j in torch.randperm(len(mine), generator=g)[: round(NOISE_SHARE * len(mine))]]
    labels = list(truth)
    for i in chosen:
        labels[i] = (truth[i] + int(torch.randint(1, 10, (1,), generator=g))) % 10  # a uniform other class
    return {"x": x[train].contiguous(), "xt": x[test].contiguous(), "yt": y[test].contiguous(), "truth": truth,
            "labels": labels, "owner": owner, "noisy": noisy, "flipped": set(chosen)}


def fixed(labels: list[int], truth: list[int], rows: list[int]) -> list[int]:
    """The labels with ``rows`` relabeled by the ground truth."""
    out = list(labels)
    for i in rows:
        out[i] = truth[i]
    return out


def found(rows: list[int], flipped: set[int]) -> tuple[float, float]:
    """(recall: share of the flipped labels in ``rows``, precision: share of ``rows`` that were flipped)."""
    hit = len(set(rows) & flipped)
    return hit / max(len(flipped), 1), hit / max(len(rows), 1)


def cli_rows(ledger_dir: Path, out_dir: Path) -> list[int]:
    """The dataset rows `gradledger feedback LEDGER --format csv -o FILE --fraction 0.05` writes, in order."""
    exe = Path(sys.executable).with_name("gradledger")
    # The console script (pyproject: gradledger = gradledger.training.cli:main) when installed beside
    # this interpreter, else the same entry point through the interpreter.
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from gradledger.training.cli import "
                                                                 "main; sys.exit(main())"]
    out = out_dir / "feedback.csv"
    proc = subprocess.run(cmd + ["feedback", str(ledger_dir), "--format", "csv", "-o", str(out), "--fraction",
                                 str(FRACTION)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"gradledger feedback exited {proc.returncode}: {proc.stderr.strip()}")
    with out.open(newline="", encoding="utf-8") as f:
        return [int(r["index"]) for r in csv.DictReader(f)]


def one_seed(seed: int, x: torch.Tensor, y: torch.Tensor, work: Path, *, epochs: int, train_seeds: int,
             draws: int, check_cli: bool) -> dict[str, Any]:
    d = split(seed, x, y)
    led_dir = work / f"ledger-{seed}"
    led, gov_s, steps = governed_run(led_dir, d["x"], d["labels"], d["owner"], hidden=HIDDEN, epochs=epochs,
                                     seed=seed)
    t0 = time.perf_counter()
    _, items = priorities(led)
    prio_s = time.perf_counter() - t0
    led.close()  # the CLI opens the ledger itself
    k = math.ceil(FRACTION * len(items))
    prioritized = [e.index for e in items[:k]]
    by_loss: list[Priority] = sorted(items, key=lambda e: (-e.mean_loss, e.index))
    loss_only = [e.index for e in by_loss[:k]]
    trained = [e.index for e in items]
    g = torch.Generator().manual_seed(26_000 + seed)
    randoms = [[trained[int(j)] for j in torch.randperm(len(trained), generator=g)[:k]] for _ in range(draws)]
    out: dict[str, Any] = {"seed": seed, "noisy_source": d["noisy"], "flipped": len(d["flipped"]), "k": k,
                           "trained": len(items), "governed_steps": steps, "governed_s": gov_s,
                           "priorities_s": prio_s,
                           "memorized_in_top": sum("memorized" in e.reasons for e in items[:k]),
                           "prioritized_differs_from_loss_only": len(set(prioritized) - set(loss_only))}
    if check_cli:
        rows = cli_rows(led_dir, work)
        out["cli_matches"] = rows == prioritized
    shutil.rmtree(led_dir, ignore_errors=True)
    conditions = {"baseline": d["labels"], "prioritized": fixed(d["labels"], d["truth"], prioritized),
                  "loss_only": fixed(d["labels"], d["truth"], loss_only), "clean": d["truth"]}
    for r, rows in enumerate(randoms):
        conditions[f"random{r}"] = fixed(d["labels"], d["truth"], rows)
    t0 = time.perf_counter()
    # Training is deterministic (one thread, seeded), so identical labels give identical runs: a condition
    # whose labels equal another's (loss-only choosing the prioritized set, a random draw hitting no
    # flipped label) reuses that result instead of spending the time again.
    cache: dict[tuple[int, ...], float] = {}

    def accuracy(labels: list[int]) -> float:
        key = tuple(labels)
        if key not in cache:
            cache[key] = statistics.fmean(retrain(d["x"], labels, d["xt"], d["yt"], hidden=HIDDEN, epochs=epochs,
                                                  seed=1000 * seed + 100 + t) for t in range(train_seeds))
        return cache[key]

    acc = {name: accuracy(lab) for name, lab in conditions.items()}
    out["retrain_s"] = time.perf_counter() - t0
    out["retrains"] = len(cache) * train_seeds
    out["random_draw_gains"] = [100 * (acc[f"random{r}"] - acc["baseline"]) for r in range(draws)]
    acc["random"] = statistics.fmean(acc.pop(f"random{r}") for r in range(draws))
    out["accuracy"] = acc
    out["found"] = {"prioritized": found(prioritized, d["flipped"]), "loss_only": found(loss_only, d["flipped"]),
                    "random": tuple(statistics.fmean(v) for v in zip(*(found(r, d["flipped"]) for r in randoms)))}
    return out


def ratio(gain: float, random_gain: float) -> float | None:
    return gain / random_gain if random_gain > 0 else None


def measure(seeds: int = DEFAULT_SEEDS, quick: bool = False) -> dict[str, Any]:
    """Run the protocol over ``seeds`` data seeds (see the module docstring); the result object."""
    torch.set_num_threads(1)  # a small MLP: one thread is as fast, and the machine is shared
    start = time.perf_counter()
    epochs, train_seeds, draws = (12, 1, 1) if quick else (EPOCHS, TRAIN_SEEDS, RANDOM_DRAWS)
    seeds = 1 if quick else seeds
    x, y = FB.digits()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(seeds):
            r = one_seed(s, x, y, Path(tmp), epochs=epochs, train_seeds=train_seeds, draws=draws, check_cli=s == 0)
            a = r["accuracy"]
            log(f"seed {s}: noisy {r['noisy_source']} ({r['flipped']} flipped), governed {r['governed_steps']} steps "
                f"{r['governed_s']:.1f}s, retrain {r['retrain_s']:.1f}s; accuracy baseline {a['baseline']:.4f} "
                f"prioritized {a['prioritized']:+.4f} loss-only {a['loss_only']:+.4f} random {a['random']:+.4f} "
                f"clean {a['clean']:.4f}; flipped found prioritized {r['found']['prioritized'][0]:.2f} "
                f"loss-only {r['found']['loss_only'][0]:.2f} random {r['found']['random'][0]:.2f}"
                + (f"; cli_matches {r['cli_matches']}" if "cli_matches" in r else ""))
            runs.append(r)

    def mean_acc(name: str) -> float:
        return statistics.fmean(r["accuracy"][name] for r in runs)

    def mean_found(name: str, i: int) -> float:
        return statistics.fmean(r["found"][name][i] for r in runs)

    base = mean_acc("baseline")
    gains = {n: 100 * (mean_acc(n) - base) for n in ("prioritized", "loss_only", "random", "clean")}
    notes: list[str] = []
    if gains["random"] <= 0:
        notes.append(f"random gain {gains['random']:+.3f} points <= 0: the ratio is undefined (null); compare the "
                     "raw gains")
    if quick:
        notes.append("--quick: 1 seed, 1 training seed, 1 random draw, 12 epochs; a smoke test, not a measurement")
    # The random gain is a few hundredths of a point: its standard error, over the (data seed, draw)
    # pairs (each the mean of its paired training seeds), says how far the ratio's denominator holds.
    draw_gains = [g for r in runs for g in r["random_draw_gains"]]
    random_se = statistics.stdev(draw_gains) / math.sqrt(len(draw_gains)) if len(draw_gains) > 1 else None
    if random_se is not None and gains["random"] > 0 and gains["random"] < 2 * random_se:
        notes.append(f"random gain {gains['random']:+.3f} points is within 2 standard errors ({random_se:.3f}) of "
                     "0: the ratio's denominator is uncertain; prioritized_gain / (random_gain + 2 se) is "
                     "feedback_gain_conservative")
    result: dict[str, Any] = {
        "feedback_gain": ratio(gains["prioritized"], gains["random"]),
        "loss_only_ratio": ratio(gains["loss_only"], gains["random"]),
        "target": 2.0,
        "prioritized_gain": gains["prioritized"],
        "random_gain": gains["random"],
        "loss_only_gain": gains["loss_only"],
        "clean_gain": gains["clean"],
        "random_gain_se": random_se,
        "feedback_gain_conservative": (ratio(gains["prioritized"], gains["random"] + 2 * random_se)
                                       if random_se is not None else None),
        "baseline_accuracy": base,
        "prioritized_accuracy": mean_acc("prioritized"),
        "random_accuracy": mean_acc("random"),
        "loss_only_accuracy": mean_acc("loss_only"),
        "clean_accuracy": mean_acc("clean"),
        "flipped_found_in_top5pct": mean_found("prioritized", 0),
        "flipped_precision_top5pct": mean_found("prioritized", 1),
        "loss_only_flipped_found_in_top5pct": mean_found("loss_only", 0),
        "loss_only_flipped_precision_top5pct": mean_found("loss_only", 1),
        "random_flipped_found_in_top5pct": mean_found("random", 0),
        "random_flipped_precision_top5pct": mean_found("random", 1),
        "cli_matches": runs[0].get("cli_matches"),
        "per_seed": [{"seed": r["seed"], "noisy_source": r["noisy_source"], "flipped": r["flipped"], "k": r["k"],
                      "memorized_in_top": r["memorized_in_top"],
                      "prioritized_differs_from_loss_only": r["prioritized_differs_from_loss_only"],
                      **{f"{n}_gain": 100 * (r["accuracy"][n] - r["accuracy"]["baseline"])
                         for n in ("prioritized", "loss_only", "random", "clean")},
                      "baseline_accuracy": r["accuracy"]["baseline"],
                      "flipped_found_prioritized": r["found"]["prioritized"][0],
                      "flipped_found_loss_only": r["found"]["loss_only"][0]} for r in runs],
        "data_seeds": list(range(seeds)),
        "train_seeds": train_seeds,
        "random_draws": draws,
        "epochs": epochs,
        "hidden": HIDDEN,
        "lr": LR,
        "batch": BATCH,
        "pool": POOL,
        "test": len(x) - POOL,
        "noise": f"one of {len(FB.SOURCES)} sources, {NOISE_SHARE:.0%} of its examples given a uniform random "
                 "other class",
        "noise_rate": statistics.fmean(r["flipped"] / r["trained"] for r in runs),
        "fraction": FRACTION,
        "retrains": sum(r["retrains"] for r in runs),
        "governed_s": sum(r["governed_s"] for r in runs),
        "retrain_s": sum(r["retrain_s"] for r in runs),
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "notes": notes,
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"data seeds (default {DEFAULT_SEEDS})")
    ap.add_argument("--quick", action="store_true", help="1 seed, short training: a smoke test")
    args = ap.parse_args()
    print(json.dumps(measure(args.seeds, args.quick), sort_keys=True))


if __name__ == "__main__":
    main()
