"""What a sampled verification fetches from an artifact store (issue 14).

    python bench/artifact_store.py [--steps 32] [--every 4] [--sample-fraction 0.25] [--no-sandbox]

Trains the small governed digits run of the tests (SGD with momentum, checkpoint every
``--every`` steps: 9 checkpoints, 8 segments by default), exports it with ``--artifacts-to`` (the
checkpoints go to a local store, the bundle names them by digest), then verifies it in sample
mode with ``--artifacts`` under four fixed nonces and counts the bytes read from the store.

- ``external_sample_bytes_fraction``: the most bytes any of those verifications fetched from the
  store, over all checkpoint bytes of the run;
- ``sample_fraction``: the segments replayed over all segments (``k / n``);
- ``one_segment_fraction``: ``1 / n``;
- ``target_met``: the fraction is at most ``sample_fraction + one_segment_fraction``. A sample
  fetches each replayed segment's start checkpoint and the run's head (specs/replay.md §6.1):
  ``k + 1`` of ``n + 1`` checkpoints.

Every verification must pass. The last stdout line is JSON. ``measure()`` returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gradledger.ledger.artifact_store import ArtifactStore  # noqa: E402
from gradledger.ledger.bundle import Bundle, export_bundle  # noqa: E402
from gradledger.ledger.keys import read_public_keys, write_public_keys  # noqa: E402
from gradledger.ledger.ledger import Ledger  # noqa: E402
from gradledger.training.dataset import commit_dataset  # noqa: E402
from gradledger.training.trainer import Trainer  # noqa: E402
from gradledger.verify import VerificationPolicy, Verifier  # noqa: E402

NONCES = (b"\x00", b"\x01", b"\x02", b"\x03")


def log(msg: str) -> None:
    print(f"[bench/artifact_store] {msg}", file=sys.stderr, flush=True)


def train(path: Path, steps: int, every: int) -> None:
    from test_trainer import MANIFESTS, WORLD, X, engine_for, new_ledger, parts

    before = torch.are_deterministic_algorithms_enabled()
    led, _ = new_ledger(path)
    ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model, checkpoint_every=every, seed=7)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, steps)
    torch.use_deterministic_algorithms(before)
    led.close()


def measure(steps: int = 32, every: int = 4, sample_fraction: float = 0.25, sandbox: bool = True) -> dict[str, Any]:
    from test_trainer import WORLD

    with tempfile.TemporaryDirectory(prefix="gradledger-bench-store-") as tmp:
        root = Path(tmp)
        log(f"training {steps} steps, a checkpoint every {every}")
        train(root / "ledger", steps, every)
        store = ArtifactStore(str(root / "store"), create=True)
        with Ledger.open(root / "ledger") as led:
            export_bundle(led, root / "run.glb", with_data=True, artifacts_to=store)
            with Bundle.open(root / "run.glb") as bundle:
                external = bundle.external_digests()
            total = sum(len(led.artifact(d) or b"") for d in external)
        write_public_keys(root / "roots.pub", [(WORLD.root.public_key, "root")])
        roots = read_public_keys(root / "roots.pub")
        worst, runs = 0, []
        segments = replayed = 0
        for nonce in NONCES:
            policy = VerificationPolicy(replay="sample", sample_fraction=sample_fraction, nonce=nonce, sandbox=sandbox,
                                        artifacts=str(root / "store"))
            report = Verifier(roots, policy).verify(root / "run.glb")
            if not report.verified:
                raise SystemExit(f"bench/artifact_store: the sample verification failed: {report.first_failure}")
            fetched = report.figures["external_bytes_fetched"]
            replayed, segments = (int(x) for x in report.figures["sample_segments"].split(" of "))
            runs.append({"nonce": nonce.hex(), "chosen": report.figures["sample_chosen"], "bytes": fetched,
                         "checkpoints": report.figures["external_fetched"]})
            worst = max(worst, fetched)
            log(f"nonce {nonce.hex()}: segments {report.figures['sample_chosen']}, {fetched} of {total} bytes")
    fraction = worst / total
    sampled, one = replayed / segments, 1 / segments
    return {
        "external_sample_bytes_fraction": round(fraction, 4),
        "sample_fraction": round(sampled, 4),
        "segments": segments,
        "checkpoints": len(external),
        "one_segment_fraction": round(one, 4),
        "target": round(sampled + one, 4),
        "target_met": fraction <= sampled + one,
        "checkpoint_bytes": total,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--sample-fraction", type=float, default=0.25)
    parser.add_argument("--no-sandbox", action="store_true", help="replay workers without the sandbox")
    args = parser.parse_args(argv)
    result = measure(args.steps, args.every, args.sample_fraction, sandbox=not args.no_sandbox)
    print(json.dumps(result, sort_keys=True))
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
