"""Verifier cost on a governed run of the benchmark transformer.

    python bench/verify.py [--steps 400] [--every 25]

Trains the 5.8M-parameter transformer of bench/overhead.py under governance (AdamW, three
bands, every example with a signed manifest, inputs stored in the ledger, one thread so that
replay on one thread is the same environment and bit-exact), exports the ledger to a bundle
with its data, and then measures in this one process:

- ``structural_obs_per_s``: observations per second of the structural checks (signatures,
  chain, credentials, tree heads and consistency, dataset commitment, routing recomputation);
- ``replay_vs_train``: full replay time on one worker over the training loop's time (the same
  steps, checkpoints included);
- ``replay_speedup_2_workers``: full replay on one worker over full replay on two worker
  processes (each worker pays for its own interpreter, torch import and program load);
- ``sample_cost_fraction`` and ``sample_detect_prob``: sampled replay time over full replay
  time, and the probability that the sample contains one given forged segment.

Every replay must verify bit for bit, or the benchmark fails. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import overhead as ov  # noqa: E402

from gradledger.ledger.bundle import export_bundle  # noqa: E402
from gradledger.training.dataset import commit_dataset  # noqa: E402
from gradledger.training.policy import sign_policy  # noqa: E402
from gradledger.training.trainer import Governance, Trainer  # noqa: E402
from gradledger.verify import VerificationPolicy, Verifier  # noqa: E402
from gradledger.verify._internal.sources import open_source  # noqa: E402
from gradledger.verify._internal.structure import check_structure  # noqa: E402
from gradledger.verify.report import Report  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench/verify] {msg}", file=sys.stderr, flush=True)


def train(root: Path, steps: int, every: int) -> tuple[Path, float]:
    x, y = ov.tf_data(ov.WORKLOADS["transformer"]["n"])
    ledger = ov.bench_ledger(root / "ledger")
    ds = commit_dataset(ledger, ov.manifests_for(x, y), "bench-transformer", ov.WORLD.trainer, inputs=x)
    model = ov.tf_model()
    opt = ov.make_optimizer("transformer", model)
    loader = DataLoader(TensorDataset(x, y), batch_size=ov.WORKLOADS["transformer"]["batch"], shuffle=True)
    engine = Governance(ledger, ov.WORLD.trainer, dataset=ds, policy=sign_policy(ov.POLICY_FIELDS, ov.WORLD.root, ov.T),
                        layout=ov.WORKLOADS["transformer"]["bands"](model), run_id="bench-verify",
                        checkpoint_every=every, seed=ov.SEED, root_key=ov.WORLD.root)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    started = time.perf_counter()
    Trainer(engine).fit(gm, gopt, gloader, steps)
    seconds = time.perf_counter() - started
    bundle = root / "run.glb"
    export_bundle(ledger, bundle, with_data=True)
    ledger.close()
    return bundle, seconds


def replay(bundle: Path, roots: list[bytes], mode: str, workers: int) -> tuple[float, Report]:
    report = Verifier(roots, VerificationPolicy(replay=mode, workers=workers)).verify(bundle)  # type: ignore[arg-type]
    if not report.verified or report.replay_mode != "exact":
        raise SystemExit(f"replay ({mode}, {workers} workers) did not verify bit for bit: {report.render()}")
    return float(report.figures["replay_seconds"]), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=25, help="checkpoint every K steps (a segment)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # recorded by RunStarted; workers replay on one thread each
    roots = [ov.WORLD.root.public_key]
    with tempfile.TemporaryDirectory() as tmp:
        log(f"training {args.steps} governed transformer steps, checkpoint every {args.every}")
        bundle, train_s = train(Path(tmp), args.steps, args.every)
        log(f"trained in {train_s:.1f} s; bundle {bundle.stat().st_size / 1e6:.1f} MB")
        source = open_source(bundle)
        started = time.perf_counter()
        structure = check_structure(source, roots, Report())
        structural_s = time.perf_counter() - started
        assert structure is not None
        n_obs = len(structure.observations)
        source.close()
        log(f"structure: {n_obs} observations in {structural_s:.2f} s")
        full_1, _ = replay(bundle, roots, "full", 1)
        log(f"full replay, 1 worker: {full_1:.1f} s")
        full_2, _ = replay(bundle, roots, "full", 2)
        log(f"full replay, 2 workers: {full_2:.1f} s")
        sample_s, sample = replay(bundle, roots, "sample", 1)
        log(f"sample replay ({sample.figures['sample_segments']}): {sample_s:.1f} s")
    print(json.dumps({
        "structural_obs_per_s": round(n_obs / structural_s, 1),
        "replay_vs_train": round(full_1 / train_s, 3),
        "replay_speedup_2_workers": round(full_1 / full_2, 3),
        "sample_cost_fraction": round(sample_s / full_1, 3),
        "sample_detect_prob": sample.figures["sample_detect_prob"],
        "train_seconds": round(train_s, 2),
        "replay_seconds_1_worker": full_1,
        "replay_seconds_2_workers": full_2,
        "sample_segments": sample.figures["sample_segments"],
        "steps": args.steps,
        "checkpoint_every": args.every,
        "observations": n_obs,
        "threads": 1,
        "replay_mode": "exact",
    }))


if __name__ == "__main__":
    main()
