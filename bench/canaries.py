"""Canary exposure from the ledger's records (issue 16; specs/dynamics.md §4): does the rank a scan
records, read from recorded losses only, tell what Carlini et al.'s exposure on the final model tells,
and what do canaries cost the run?

    python bench/canaries.py [--canaries C] [--references R] [--epochs E] [--seed S] [--quick]

**Data and run.** sklearn's bundled digits (8x8, inputs /16 as binary32), split by a seeded permutation
into 1347 training and 450 held-out examples. A canary set is drawn like the training inputs
(``draw_canaries``: each feature uniform in the training range, each label uniform over 10 classes):
C inserted canaries (default 16) and R references (default 255, so the exposure bound is
log2(R + 1) = 8 bits). The canaried run is a governed run of the user's own loop (the
bench/dynamics.py recipe: a 64-256-256-10 ReLU MLP, SGD lr 0.01 momentum 0.9, batch 32, shuffled, E
epochs, default 60) over a committed dataset of the training examples and the canaries, every manifest
signed and credentialed (bench/forensics.py's world and flat policy), a checkpoint every 100 steps and
``memorization=MemorizationScan()``: each checkpoint records a format-2 scan with the canaries' ranks.
The plain run is the same recipe and seed over the training examples alone.

**Figures.** From the run's last recorded scan: ``canary_exposure_mean_bits`` (the mean over the
inserted canaries of ``log2(R' + 1) - log2(rank)``, R' the references measured), its max, and
``canary_exposure_bound_bits``; ``canary_exposure_by_checkpoint``, the mean at every recorded scan (how
memorization grows over training). ``canary_exposure_final_model_mean_bits`` is Carlini et al.'s own
measurement on the same canaries, for comparison: the final model's loss on every canary, inserted and
reference alike, each inserted one ranked among the references the same way; ``canary_rank_spearman``
correlates the two rankings of the inserted canaries. ``canary_exposure_untrained_mean_bits`` is the
control: a second canary set drawn with another seed and never in any dataset, ranked by the final model
against the first set's references (expected ``log2(e)`` = 1.44 bits for a canary not memorized).
``scans_verified``: ``gradledger-verify --replay none`` recomputes every recorded scan (ranks included)
from the recorded losses and passes. Cost: ``test_accuracy_canaried`` next to ``test_accuracy_plain``
(the inserted canaries are C noisy examples among 1347; the references train nothing), and
``train_s_per_step_canaried`` / ``train_s_per_step_plain`` (the references take batch slots and
forward passes only; an epoch of the canaried run has (1347 + C + R) / 1347 times the steps).

The last stdout line is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
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
from helpers import verify_cli  # noqa: E402  (tests/, on the path through bench/forensics.py)

from gradledger.ledger.bundle import export_bundle  # noqa: E402
from gradledger.ledger.keys import write_public_keys  # noqa: E402
from gradledger.ledger.ledger import Ledger  # noqa: E402
from gradledger.training.bands import sequential_bands  # noqa: E402
from gradledger.training.dataset import commit_dataset  # noqa: E402
from gradledger.training.dynamics import MemorizationScan  # noqa: E402
from gradledger.training.dynamics.canaries import canary_manifests, draw_canaries, exposure_bits  # noqa: E402
from gradledger.training.trainer import Governance  # noqa: E402

HIDDEN, LR, MOMENTUM, BATCH, EPOCHS, QUICK_EPOCHS, EVERY = 256, 0.01, 0.9, 32, 60, 15, 100
TRAIN = 1347
log = FB.log


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def run(path: Path, x: Tensor, y: Tensor, manifests: list[Any], *, epochs: int, seed: int
        ) -> tuple[Ledger, nn.Module, float, int]:
    """A governed run of the user's loop over ``x``, ``y`` committed with ``manifests``; (ledger, model,
    training seconds, steps)."""
    led = FB.new_ledger(path)
    ds = commit_dataset(led, manifests, "digits", FB.WORLD.trainer, inputs=x)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    gov = Governance(led, FB.WORLD.trainer, dataset=ds, policy=FB.FLAT_POLICY, layout=sequential_bands(model),
                     run_id="bench-canaries", checkpoint_every=EVERY, seed=seed, root_key=FB.WORLD.root,
                     order="loader", memorization=MemorizationScan())
    gm, gopt, gl = gov.make_governed(model, opt, loader)
    for e in range(epochs):
        for xb, yb in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(xb), yb).backward()
            gopt.step()
        if (e + 1) % 10 == 0:
            log(f"  epoch {e + 1}/{epochs}: step {gov.step}")
    gov.close()
    return led, model, time.perf_counter() - t0, gov.step


def losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def ranks(values: Tensor, refs: Tensor) -> list[int]:
    """§4.2's rank of each value among ``refs``: 1 + the references at or below it."""
    return [1 + int((refs <= v).sum()) for v in values]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def spearman(a: list[int], b: list[int]) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().to(torch.float64)
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float((ra.norm() * rb.norm()))
    return float((ra * rb).sum()) / denom if denom else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canaries", type=int, default=16)
    ap.add_argument("--references", type=int, default=255)
    ap.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} ({QUICK_EPOCHS} with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a check of the pipeline, not a measurement")
    args = ap.parse_args()
    epochs = args.epochs if args.epochs is not None else QUICK_EPOCHS if args.quick else EPOCHS
    torch.set_num_threads(1)  # a shared machine: one core for the model, the recorder thread has the other
    started = time.perf_counter()
    x, y = FB.digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    xt, yt = x[perm[:TRAIN]].contiguous(), y[perm[:TRAIN]].contiguous()
    xh, yh = x[perm[TRAIN:]], y[perm[TRAIN:]]
    labels = [int(v) for v in yt]
    owner = [FB.SOURCES[i % len(FB.SOURCES)] for i in range(TRAIN)]
    base = FB.manifests(xt, labels, owner)
    drawn = draw_canaries(xt, 10, count=args.canaries, references=args.references, seed=args.seed + 1, name="noise")
    signed = canary_manifests(drawn, key=FB.SIGNER["worker"], source=FB.CREDS["worker-0"], ontology="digits-v1",
                              time=FB.T)
    xc = torch.cat([xt, drawn.inputs])
    yc = torch.cat([yt, torch.tensor(drawn.labels)])
    result: dict[str, Any] = {"seed": args.seed, "train": TRAIN, "held_out": len(xh), "canaries": args.canaries,
                              "references": args.references, "epochs": epochs,
                              "recipe": f"MLP 64-{HIDDEN}-{HIDDEN}-10, SGD lr {LR} momentum {MOMENTUM}, batch {BATCH}",
                              "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log("plain run (no canaries)")
        led_p, model_p, secs_p, steps_p = run(work / "plain", xt, yt, base, epochs=epochs, seed=args.seed)
        led_p.close()
        log("canaried run")
        led, model, secs, steps = run(work / "canaried", xc, yc, base + signed, epochs=epochs, seed=args.seed)
        scans = [led.observation(s).body for s in led.by_type("MemorizationScan")]
        export_bundle(led, work / "run.glb", with_data=True)
        led.close()
        roots = write_public_keys(work / "roots.pub", [(FB.WORLD.root.public_key, "root")])
        t0 = time.perf_counter()
        code, report = verify_cli(work / "run.glb", roots, "--replay", "none")
        result["verify_replay_none_s"] = time.perf_counter() - t0
        result["scans_verified"] = code == 0 and any(c["name"] == "scans" and c["status"] == "pass"
                                                     for c in report["checks"])

    def mean_bits(entry: dict[str, Any]) -> float | None:
        known = [exposure_bits(r, entry["references"]) for _, r in entry["inserted"] if r is not None]
        return sum(known) / len(known) if known else None

    last = scans[-1]["canaries"][0]
    recorded = [r for _, r in last["inserted"]]
    n_ref = last["references"]
    result["recorded_scans"] = len(scans)
    result["references_measured"] = n_ref
    result["canary_exposure_bound_bits"] = exposure_bits(1, n_ref)
    result["canary_exposure_mean_bits"] = mean_bits(last)
    result["canary_exposure_max_bits"] = max(exposure_bits(r, n_ref) for r in recorded)
    result["canary_ranks_recorded"] = recorded
    result["canary_exposure_by_checkpoint"] = [[s["through"], round(mean_bits(s["canaries"][0]) or 0.0, 3)]
                                               for s in scans]
    # Carlini et al.'s measurement on the final model, the same canaries and references.
    n = args.canaries
    final = losses(model, drawn.inputs, torch.tensor(drawn.labels))
    refs = final[n:]
    final_ranks = ranks(final[:n], refs)
    result["canary_ranks_final_model"] = final_ranks
    result["canary_exposure_final_model_mean_bits"] = sum(exposure_bits(r, len(refs)) for r in final_ranks) / n
    result["canary_rank_spearman"] = spearman(recorded, final_ranks)
    # The control: canaries never in any dataset, ranked by the same final model against the same references.
    fresh = draw_canaries(xt, 10, count=4 * n, references=1, seed=args.seed + 1000, name="control")
    control = ranks(losses(model, fresh.inputs[:4 * n], torch.tensor(fresh.labels[:4 * n])), refs)
    result["canary_exposure_untrained_mean_bits"] = sum(exposure_bits(r, len(refs)) for r in control) / len(control)
    result["test_accuracy_canaried"] = accuracy(model, xh, yh)
    result["test_accuracy_plain"] = accuracy(model_p, xh, yh)
    result["steps_canaried"], result["steps_plain"] = steps, steps_p
    result["train_s_per_step_canaried"] = secs / steps
    result["train_s_per_step_plain"] = secs_p / steps_p
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
