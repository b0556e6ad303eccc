"""Ledger throughput against the raw Ed25519 limits, measured side by side.

    python bench/ledger.py [--updates N] [--rounds R]

Each round measures the raw pynacl sign/verify rates on envelope-sized
messages and then the ledger's append and structural-verify rates, so the
ratios compare numbers taken under the same machine load. The last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nacl.signing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import genesis, make_world  # noqa: E402

from gradledger.ledger.keys import signing_input  # noqa: E402
from gradledger.ledger.ledger import Ledger  # noqa: E402

BATCH = 64


def update_body(step: int) -> dict:
    """A representative GovernedUpdate: a 64-example batch, 3 bands, 3 writing authorities."""
    start = (step * BATCH) % 50_000
    return {
        "step": step,
        "batch": list(range(start, start + BATCH)),
        "policy": bytes(range(32)),
        "lr": 0.001,
        "loss": 2.302585 / (1 + step * 1e-3),
        "band_grad_norms": [0.8123, 0.4711, 0.1337],
        "band_update_norms": [0.0081, 0.0047, 0.0013],
        "authority_writes": {
            "acme/radiology/attending": [40.0, 40.0, 40.0],
            "acme/crowd/consensus": [16.0, 8.0, 0.0],
            "acme/heuristics/lf": [8.0, 0.0, 0.0],
        },
        "sources": ["dr-a", "crowd-7", "lf-keywords"],
        "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.01},
        "seeds": {"torch": 1234 + step},
    }


def raw_rates(message: bytes, n: int) -> tuple[float, float]:
    key = nacl.signing.SigningKey.generate()
    start = time.perf_counter()
    for _ in range(n):
        signed = key.sign(message)
    sign = n / (time.perf_counter() - start)
    verify_key = key.verify_key
    signature = signed.signature
    start = time.perf_counter()
    for _ in range(n):
        verify_key.verify(message, signature)
    return sign, n / (time.perf_counter() - start)


def ledger_rates(root: Path, n: int, group: int) -> tuple[float, float, float]:
    """Append rate (n updates, committing every ``group``), verify rate, bytes per observation."""
    world = make_world(1)
    path = root / f"ledger-{group}-{time.monotonic_ns()}"
    ledger = Ledger.create(path, group=group)
    genesis(ledger, world)
    bodies = [update_body(step) for step in range(n)]
    start = time.perf_counter()
    for body in bodies:
        ledger.append("GovernedUpdate", body, world.trainer)
    ledger.commit()
    append = n / (time.perf_counter() - start)
    start = time.perf_counter()
    report = ledger.verify()
    verify = report.size / (time.perf_counter() - start)
    info, stat = ledger._store.env.info(), ledger._store.env.stat()
    used = (info["last_pgno"] + 1) * stat["psize"]
    per_obs = used / ledger.size
    ledger.close()
    return append, verify, per_obs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--durable-updates", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # A real sealed envelope sets the message size for the raw rates.
        probe = Ledger.create(root / "probe")
        world = make_world(1)
        genesis(probe, world)
        sealed = probe.append("GovernedUpdate", update_body(0), world.trainer, commit=True)
        message = signing_input("envelope", sealed.envelope_bytes)
        record_size = len(sealed.record)
        probe.close()

        rows = []
        for round_ in range(args.rounds):
            sign, verify_limit = raw_rates(message, args.updates)
            append, verify, per_obs = ledger_rates(root, args.updates, 64)
            durable, _, _ = ledger_rates(root, args.durable_updates, 1)
            rows.append((sign, verify_limit, append, verify, durable, per_obs))
            print(
                f"round {round_ + 1}: sign {sign:,.0f}/s  verify {verify_limit:,.0f}/s  "
                f"append {append:,.0f}/s  ledger-verify {verify:,.0f}/s  durable {durable:,.0f}/s",
                file=sys.stderr,
            )

    med = [statistics.median(column) for column in zip(*rows)]
    sign, verify_limit, append, verify, durable, per_obs = med
    result = {
        "sign_limit_per_s": round(sign),
        "append_per_s": round(append),
        "append_vs_sign_limit": round(statistics.median(r[2] / r[0] for r in rows), 3),
        "verify_limit_per_s": round(verify_limit),
        "verify_per_s": round(verify),
        "verify_vs_limit": round(statistics.median(r[3] / r[1] for r in rows), 3),
        "durable_append_per_s": round(durable),
        "bytes_per_obs": round(per_obs),
        "record_bytes": record_size,
        "envelope_message_bytes": len(message),
        "batch": BATCH,
        "group": 64,
        "updates": args.updates,
        "rounds": args.rounds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
