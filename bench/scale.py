"""Scale-out costs (issue 14): replay on a Ray cluster, and checkpoints fetched from an artifact store.

    python bench/scale.py [--steps 160] [--every 20] [--rounds 2]

Trains bench/verify.py's governed transformer run (one thread, inputs in the bundle), exports
it, starts a local Ray cluster of 2 CPUs (``ray_startup_s``, apart from every replay), and then
replays the whole run, interleaved round by round so that a load change on this shared machine
falls on both sides alike:

- ``ray_speedup_2_workers``: full replay through Ray with 1 task at a time over 2 at a time
  (median of the rounds); every replay must verify bit for bit;
- ``local_speedup_2_workers``: the same with the local engine's 1 and 2 worker processes, next to it;
- ``ray_over_local_1_worker``: Ray's one-at-a-time replay over the local engine's one worker
  (a Ray task starts one sandboxed worker per segment; a local worker replays all its segments).

``external_sample_bytes_fraction`` comes from bench/artifact_store.py where that benchmark is
present; ``ddp2_step_ratio`` and ``ddp_replay_bit_exact`` from bench/ddp.py (governed 2-rank training
against plain DDP; 2- and 4-rank runs replayed on one process). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    """A sibling benchmark as a module (bench/verify.py's name would shadow ``gradledger.verify``'s)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(msg: str) -> None:
    print(f"[bench/scale] {msg}", file=sys.stderr, flush=True)


def replay(bundle: Path, roots: list[bytes], engine: str, workers: int) -> float:
    from gradledger.verify import VerificationPolicy, Verifier

    policy = VerificationPolicy(workers=workers, engine=engine)  # type: ignore[arg-type]
    report = Verifier(roots, policy).verify(bundle)
    if not report.verified or report.replay_mode != "exact":
        raise SystemExit(f"replay ({engine}, {workers}) did not verify bit for bit: {report.render()}")
    return float(report.figures["replay_seconds"])


def ray_figures(bundle: Path, roots: list[bytes], rounds: int) -> dict[str, Any]:
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - started
    times: dict[tuple[str, int], list[float]] = {(e, w): [] for e in ("ray", "local") for w in (1, 2)}
    try:
        for r in range(rounds):
            for engine, workers in times:
                seconds = replay(bundle, roots, engine, workers)
                times[(engine, workers)].append(seconds)
                log(f"round {r + 1}: {engine}, {workers} at a time: {seconds:.1f} s")
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ray_speedup_2_workers": round(med[("ray", 1)] / med[("ray", 2)], 3),
        "local_speedup_2_workers": round(med[("local", 1)] / med[("local", 2)], 3),
        "ray_over_local_1_worker": round(med[("ray", 1)] / med[("local", 1)], 3),
        "ray_startup_s": round(startup, 3),
        "replay_seconds": {f"{e}_{w}": [round(s, 2) for s in v] for (e, w), v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--every", type=int, default=20, help="checkpoint every K steps (a segment)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ddp-steps", type=int, default=20, help="timed steps per DDP round (0: skip bench/ddp.py)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # recorded by RunStarted; every worker replays on one thread
    bv = _load("verify")
    roots = [bv.ov.WORLD.root.public_key]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        log(f"training {args.steps} governed transformer steps, checkpoint every {args.every}")
        bundle, train_s = bv.train(Path(tmp), args.steps, args.every)
        log(f"trained in {train_s:.1f} s")
        out.update(ray_figures(bundle, roots, args.rounds))
    store = HERE / "artifact_store.py"
    if store.exists():
        log("artifact store: sample-mode verification fetching from the store")
        out.update(_load("artifact_store").measure())
    else:
        out["external_sample_bytes_fraction"] = None
    if args.ddp_steps:
        log("torch.distributed: governed 2-rank training against plain DDP, and replays of 2- and 4-rank runs")
        sys.path.insert(0, str(HERE))
        import ddp  # by its own name: spawned ranks import it so (bench/ddp.py)

        out.update(ddp.measure(args.ddp_steps))
    out.update({
        "train_seconds": round(train_s, 2), "steps": args.steps, "checkpoint_every": args.every,
        "segments": args.steps // args.every, "rounds": args.rounds, "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
