"""Write a small governed ledger and inspect it: the ledger layer end to end.

    python examples/quickstart.py --out demo-out

Creates a governance root, a radiology authority with one annotator, a crowd
authority, and a trainer; records their credentials, a run, a hundred updates
with tree heads, a revocation, and a source retirement; then verifies the
ledger and prints `gradledger inspect`. (The full governed-training demo
becomes `gradledger demo`.)
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from gradledger.ledger import credentials
from gradledger.ledger.inspection import render, summarize
from gradledger.ledger.keys import SigningKey, write_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="output directory (replaced)")
    parser.add_argument("--updates", type=int, default=100)
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "keys").mkdir(parents=True)

    root = SigningKey.generate("acme-root")
    trainer = SigningKey.generate("trainer")
    radiology = SigningKey.generate("radiology")
    crowd = SigningKey.generate("crowd")
    annotator = SigningKey.generate("dr-a")
    worker = SigningKey.generate("crowd-7")
    for key in (root, trainer, radiology, crowd):
        key.save(out / "keys" / f"{key.label}.key")
    write_public_keys(out / "roots.pub", [(root.public_key, "acme governance root")])

    creds = [
        (credentials.issue_root(root, subject="acme-root", path="acme"), root),
        (credentials.issue(root, subject="trainer", path="acme/training", role="trainer", public_key=trainer.public_key), root),
        (credentials.issue(root, subject="radiology", path="acme/radiology", role="authority", public_key=radiology.public_key), root),
        (credentials.issue(root, subject="crowd", path="acme/crowd", role="authority", public_key=crowd.public_key), root),
        (credentials.issue(radiology, subject="dr-a", path="acme/radiology/attending", role="source", public_key=annotator.public_key), radiology),
        (credentials.issue(crowd, subject="crowd-7", path="acme/crowd/consensus", role="source", public_key=worker.public_key), crowd),
    ]

    rng = random.Random(7)
    with Ledger.create(out / "ledger") as ledger:
        for cred, issuer in creds:
            ledger.append("CredentialIssued", {"credential": cred.signed}, issuer)
        ledger.append(
            "RunStarted",
            {"run_id": "quickstart", "environment": {"python": "3"}, "artifacts": {}, "settings": {"lr": 0.01}},
            trainer,
        )
        for step in range(args.updates):
            batch = rng.sample(range(1000), 16)
            ledger.append(
                "GovernedUpdate",
                {
                    "step": step,
                    "batch": batch,
                    "policy": bytes(32),
                    "lr": 0.01,
                    "loss": 2.3 / (1 + step / 10),
                    "band_grad_norms": [1.0, 0.6, 0.3],
                    "band_update_norms": [0.01, 0.006, 0.003],
                    "authority_writes": {"acme/radiology/attending": [8.0, 8.0, 8.0], "acme/crowd/consensus": [8.0, 4.0, 0.0]},
                    "sources": ["dr-a", "crowd-7"],
                },
                trainer,
            )
            if (step + 1) % 25 == 0:
                ledger.tree_head(trainer)
        ledger.append("CredentialRevoked", {"key_id": creds[5][0].key_id, "reason": "consensus too low"}, crowd)
        ledger.append(
            "SourceRetired", {"source": "crowd-7", "key_id": creds[5][0].key_id, "reason": "swapped labels"}, crowd
        )
        head = ledger.tree_head(trainer)

        report = ledger.verify(trusted_roots=[root.public_key])
        seq = ledger.by_source("crowd-7")[0]
        verify_inclusion(leaf_hash(ledger.record(seq)), seq, ledger.size, ledger.inclusion_proof(seq), ledger.root)
        verify_consistency(50, ledger.size, ledger.consistency_proof(50), ledger.root_at(50), ledger.root)
        print(render(summarize(ledger)))
        print(
            f"\nverified {report.size} observations against {out / 'roots.pub'}; "
            f"last tree head at seq {head.seq}; inclusion and consistency proofs OK"
        )
    print(f"\ninspect it yourself:  gradledger inspect {out / 'ledger'}")


if __name__ == "__main__":
    main()
