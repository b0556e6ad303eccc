"""Governed training over torch.distributed ranks against plain DDP (issue 14; specs/distributed.md).

    python bench/ddp.py [--steps 20] [--rounds 2]

On bench/overhead.py's 5.8M-parameter transformer (AdamW, one thread per rank, gloo on this CPU):

- ``ddp2_step_ratio``: the median step time of a governed 2-rank run over that of plain 2-rank
  ``DistributedDataParallel``, same model, data, per-rank batch and optimizer, launched one after
  the other round by round (interleaved) so a load change falls on both; warm-up steps (the
  governed run's first step replays itself from its program) are not timed, and no checkpoint
  falls inside the timed steps;
- ``ddp_replay_bit_exact``: governed runs of 2 and 4 ranks, exported and replayed by the verifier
  on one process: verified, bit for bit.

The last stdout line is JSON; ``measure()`` returns the same dict (bench/scale.py calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import overhead as ov  # noqa: E402

from gradledger.ledger.bundle import export_bundle  # noqa: E402
from gradledger.ledger.ledger import Ledger  # noqa: E402
from gradledger.training.dataset import commit_dataset, load_dataset  # noqa: E402
from gradledger.training.policy import sign_policy  # noqa: E402
from gradledger.training.trainer import Governance  # noqa: E402

PER_RANK = ov.WORKLOADS["transformer"]["batch"]
N = 512  # examples: enough for every timed step of the largest run


def log(msg: str) -> None:
    print(f"[bench/ddp] {msg}", file=sys.stderr, flush=True)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return ov.tf_data(N)


def new_ledger(root: Path) -> int:
    """A ledger with the benchmark's world, credentials and the dataset (inputs included); its seq."""
    x, y = _data()
    ledger = ov.bench_ledger(root / "ledger")
    seq = commit_dataset(ledger, ov.manifests_for(x, y), "bench-ddp", ov.WORLD.trainer, inputs=x).seq
    ledger.close()
    assert seq is not None
    return seq


def _rank(rank: int, world: int, root: str, variant: str, steps: int, every: int, seq: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{variant}", rank=rank,
                            world_size=world)
    x, y = _data()
    model = ov.tf_model()
    opt = ov.make_optimizer("transformer", model)
    times: list[float] = []
    if variant == "plain":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.train()
        b = PER_RANK
        for s in range(steps):
            index = torch.arange(s * b * world + rank * b, s * b * world + (rank + 1) * b) % N
            started = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(ddp(x[index]), y[index]).backward()
            opt.step()
            times.append(time.perf_counter() - started)
    else:
        led = Ledger.open(Path(root) / "ledger", writable=rank == 0)
        ds = load_dataset(led, seq)
        run = Governance(led, ov.WORLD.trainer, dataset=ds, policy=sign_policy(ov.POLICY_FIELDS, ov.WORLD.root, ov.T),
                         layout=ov.WORKLOADS["transformer"]["bands"](model), run_id=f"ddp-{variant}",
                         checkpoint_every=every, seed=ov.SEED, root_key=ov.WORLD.root)
        gm, gopt, loader = run.make_governed(model, opt, DataLoader(TensorDataset(x, y), batch_size=PER_RANK))
        gm.train()
        while run.step < steps:
            for xb, yb in loader:
                started = time.perf_counter()
                gopt.zero_grad()
                F.cross_entropy(gm(xb), yb).backward()
                gopt.step()
                times.append(time.perf_counter() - started)
                if run.step >= steps:
                    break
        run.close()
        led.close()
    if rank == 0:
        (Path(root) / f"{variant}.json").write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # past the interpreter's teardown, which sometimes aborts a rank here (tests/test_distributed.py)


def _launch(root: Path, world: int, variant: str, steps: int, every: int, seq: int) -> list[float]:
    mp.spawn(_rank, args=(world, str(root), variant, steps, every, seq), nprocs=world, join=True)
    return json.loads((root / f"{variant}.json").read_text())


def replay_bit_exact(root: Path, world: int, steps: int = 8, every: int = 4) -> bool:
    from gradledger.verify import VerificationPolicy, Verifier

    root.mkdir(parents=True)
    seq = new_ledger(root)
    _launch(root, world, "governed", steps, every, seq)
    with Ledger.open(root / "ledger") as led:
        export_bundle(led, root / "run.glb", with_data=True)
    report = Verifier([ov.WORLD.root.public_key], VerificationPolicy()).verify(root / "run.glb")
    ok = report.verified and report.replay_mode == "exact"
    log(f"{world} ranks: {'verified bit for bit' if ok else report.render()}")
    return ok


def measure(steps: int = 20, warmup: int = 3, rounds: int = 2) -> dict[str, Any]:
    torch.set_num_threads(1)
    ratios, plain_all, governed_all = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            root = Path(tmp) / f"round{r}"
            root.mkdir()
            seq = new_ledger(root)
            total = steps + warmup
            plain = _launch(root, 2, "plain", total, total, seq)[warmup:]
            governed = _launch(root, 2, "governed", total, total + 1, seq)[warmup:]  # its checkpoint at close
            ratio = statistics.median(governed) / statistics.median(plain)
            log(f"round {r + 1}: plain DDP {statistics.median(plain) * 1e3:.1f} ms/step, governed "
                f"{statistics.median(governed) * 1e3:.1f} ms/step, ratio {ratio:.3f}")
            ratios.append(ratio)
            plain_all += plain
            governed_all += governed
        exact = {w: replay_bit_exact(Path(tmp) / f"replay{w}", w) for w in (2, 4)}
    return {
        "ddp2_step_ratio": round(statistics.median(ratios), 3),
        "ddp2_step_ratio_per_round": [round(x, 3) for x in ratios],
        "ddp_plain_ms_per_step": round(statistics.median(plain_all) * 1e3, 2),
        "ddp_governed_ms_per_step": round(statistics.median(governed_all) * 1e3, 2),
        "ddp_replay_bit_exact": all(exact.values()),
        "ddp_replay_bit_exact_by_world": {str(w): v for w, v in exact.items()},
        "ddp_model": "bench/overhead.py transformer, 5.8M parameters, AdamW",
        "ddp_per_rank_batch": PER_RANK, "ddp_timed_steps": steps, "ddp_rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    out = measure(args.steps, rounds=args.rounds)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
