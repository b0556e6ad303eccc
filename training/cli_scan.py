"""`gradledger scan`: which training examples a governed run memorized (specs/dynamics.md §1).

    gradledger scan LEDGER [--run R] [--method mean-loss|lt-iqr] [--fraction F] [--min-trace M] [--through S]
                           [--record --key KEY] [--json]

Scores every example of the run from its recorded loss trace (its mean, or LT-IQR: the trace's
interquartile range) and lists the flagged ones with their labels and sources. ``--record`` appends
the scan as a signed MemorizationScan, which the verifier recomputes. Exit 0 with the scan; 2 for a ledger, run or
parameter that cannot be used (one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_command"]


def _render(report: dict[str, Any]) -> str:
    p = report["parameters"]
    lines = [f"memorization scan of run {report['run']} over its first {report['through']} steps "
             f"({report['method']}): {report['scored']} of {report['examples']} examples scored (a trace of at "
             f"least {p['min_trace']} losses), top {p['fraction']:.2%} flagged"]
    for e in report["flagged"]:
        lines.append(f"  #{e['index']:<6} {report['method']} {e['score']:.4g}  label {e['label']}  "
                     f"by {', '.join(e['sources'])}")
    if not report["flagged"]:
        lines.append("  (nothing flagged: no example has a long enough trace)")
    lines.append(f"scores digest {report['scores_digest'][:16]}")
    routed = report.get("memorized_routing")
    if routed is not None:
        lines.append(f"the policy routes flagged examples by {', '.join(routed['rules'])} (specs/dynamics.md §2.4): "
                     f"{routed['examples']} examples trained so, {routed['trainings']} times, in these steps")
    for c in report.get("canaries", []):
        mean = c["mean_exposure_bits"]
        lines.append(f"canary set {c['set']!r}: {len(c['inserted'])} inserted, {c['references']} references measured; "
                     + ("mean exposure "
                        f"{mean:.2f} bits of at most {c['bound_bits']:.2f} (log2(e) = 1.44 expected of a canary not "
                        "memorized)" if mean is not None else "no canary measured yet"))
    if "record" in report:
        lines.append(f"recorded as MemorizationScan at seq {report['record']['seq']}; the verifier recomputes it")
    return "\n".join(lines)


def _scan(args: argparse.Namespace) -> int:
    from gradledger.ledger.keys import SigningKey
    from gradledger.ledger.ledger import Ledger
    from gradledger.training.dynamics import MemorizationScan, scan

    if args.record != (args.key is not None):
        print("gradledger: --record and --key go together (the key signs the MemorizationScan)", file=sys.stderr)
        return 2
    params = MemorizationScan(fraction=args.fraction, min_trace=args.min_trace, method=args.method)
    key = SigningKey.load(args.key) if args.record else None
    with Ledger.open(args.ledger, writable=args.record) as ledger:
        report = scan(ledger, run_id=args.run_id, params=params, through=args.through, record=key)
    print(json.dumps(report, sort_keys=True) if args.json else _render(report))
    return 0


def add_command(sub: Any) -> None:
    """Register ``scan`` on the ``gradledger`` subcommand parser."""
    p = sub.add_parser("scan", help="which training examples the model memorized: a score of every example's "
                       "recorded loss trace (its mean, or LT-IQR), the top fraction flagged")
    p.add_argument("ledger", help="ledger directory")
    p.add_argument("--run", dest="run_id", help="run id (default: the latest governed run or branch)")
    p.add_argument("--method", choices=["mean-loss", "lt-iqr"], default="mean-loss",
                   help="the score (specs/dynamics.md §1.1; default mean-loss, ahead of lt-iqr in bench/dynamics.py)")
    p.add_argument("--fraction", type=float, default=0.01, help="share of the scored examples flagged (default 0.01)")
    p.add_argument("--min-trace", type=int, default=4,
                   help="losses an example's trace needs before it is scored (default 4)")
    p.add_argument("--through", type=int, help="scan the first N steps only (default: every recorded step)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--record", action="store_true",
                   help="append the scan to the ledger as a signed MemorizationScan observation (needs --key)")
    p.add_argument("--key", help="with --record: the private key file that signs it (a root, authority or trainer "
                   "credential of the ledger)")
    p.set_defaults(run=_scan)
