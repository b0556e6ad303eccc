"""`gradledger trace`: which labeling sources taught a governed model a behavior (specs/forensics.md).

    gradledger trace LEDGER --query QUERY [--run R] [--method replay|checkpoints|loss-trace] [--top N]
                     [--validate K] [--self-influence] [--record --key KEY] [--json] [--html FILE]

Exit 0 with the ranked answer; 1 when replay of the run diverges from its records (naming the step);
2 for a query or run that cannot be used (one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gradledger.ledger.ledger import Ledger

__all__ = ["add_command"]


def _render(report: dict[str, Any]) -> str:
    lines = [f"trace of run {report['run']} ({report['method']}, {report.get('recorded_steps', 0)} steps)"]
    if "query" in report:
        q = report["query"]
        lines.append(f"query: {q['description'] or '(no description)'} ({q['examples']} examples); predicted change "
                     f"of the query loss from training: {report['predicted_change']:+.4g}")
        lines.append("sources (score = first-order decrease of the query loss; share of the positive total):")
        for i, s in enumerate(report["sources"]):
            lines.append(f"  {i + 1:>2}. {s['source']:<24} {s['path'] or '':<32} score {s['score']:+.4g} "
                         f"± {s['stderr']:.2g}  share {s['share']:.0%}  ranked first in {s['p_top']:.0%} of resamples")
        lines.append("bands: " + ", ".join(f"{b['band']} {b['share']:.0%}" for b in report["bands"]))
        best = max(report["steps"], key=lambda r: r["score"], default=None)
        if best is not None:
            lines.append(f"most influential steps: {best['from']}-{best['to']} ({best['share']:.0%})")
    else:
        lines.append("sources by mean recorded loss of the examples they labeled:")
        for i, s in enumerate(report["sources"]):
            lines.append(f"  {i + 1:>2}. {s['source']:<24} {s['path'] or '':<32} {s['score']:.4g} ± {s['stderr']:.2g}")
    lines.append("examples: " + ", ".join(f"#{e['index']} ({e['score']:+.3g})" for e in report["examples"]))
    if "self_influence" in report:
        lines.append("highest self-influence (mislabel or memorization candidates): " + ", ".join(
            f"#{e['index']} label {e['label']} by {'/'.join(e['sources'])} ({e['score']:.3g})"
            for e in report["self_influence"]))
    v = report.get("validation")
    if v is not None:
        lines.append(f"validated by exact replay without {', '.join(v['sources'])} ({v['removed']} examples removed, "
                     f"{v['relabeled']} relabeled): query loss {v['query_loss']:.4g} -> {v['query_loss_without']:.4g}, "
                     f"change {v['actual_change']:+.4g} measured, {v['predicted_change']:+.4g} predicted")
    lines.extend(f"note: {n}" for n in report.get("notes", []))
    if "record" in report:
        lines.append(f"recorded as ForensicTrace at seq {report['record']['seq']} (result digest "
                     f"{report['record']['result_digest'][:16]}); gradledger-verify --check-traces recomputes it")
    return "\n".join(lines)


def _trace(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gradledger.ledger.keys import SigningKey
    from gradledger.training.forensics import trace
    from gradledger.training.forensics.html import trace_page

    if args.record != (args.key is not None):
        print("gradledger: --record and --key go together (the key signs the ForensicTrace)", file=sys.stderr)
        return 2
    key = SigningKey.load(args.key) if args.record else None
    with Ledger.open(args.ledger, writable=args.record) as ledger:
        with tqdm(desc=f"tracing ({args.method})", unit="step", disable=None, file=sys.stderr) as bar:
            report = trace(ledger, args.query, run_id=args.run_id, method=args.method, top=args.top,
                           validate_top=args.validate, self_influence=args.self_influence, record=key,
                           progress=lambda step: bar.update(1))
    if args.html is not None:
        if "query" not in report:
            print("gradledger: --html draws the replay and checkpoints methods' attribution", file=sys.stderr)
            return 2
        Path(args.html).write_text(trace_page(report), encoding="utf-8")
    print(json.dumps(report, sort_keys=True) if args.json else _render(report))
    return 0


def add_command(sub: Any) -> None:
    """Register ``trace`` on the ``gradledger`` subcommand parser."""
    p = sub.add_parser("trace", help="which labeling sources taught the model a behavior: influence through the "
                       "recorded updates, by source, authority, band and step")
    p.add_argument("ledger", help="ledger directory")
    p.add_argument("--query", help="the behavior: a JSON object or a .json file (specs/forensics.md §2); "
                   "not needed for --method loss-trace")
    p.add_argument("--run", dest="run_id", help="run id (default: the latest governed run or branch)")
    p.add_argument("--method", choices=("replay", "checkpoints", "loss-trace"), default="replay",
                   help="replay (exact weights at every step; default), checkpoints (stored checkpoints only, "
                   "approximate), loss-trace (recorded per-example losses)")
    p.add_argument("--top", type=int, default=10, help="entries per ranking (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--html", help="also write the answer as an HTML page to this file")
    p.add_argument("--self-influence", action="store_true",
                   help="also rank the training examples by self-influence (mislabel and memorization candidates)")
    p.add_argument("--validate", type=int, default=0, metavar="K",
                   help="replay the run without the top K sources (nothing recorded) and report the measured "
                   "change of the query loss against the predicted one")
    p.add_argument("--record", action="store_true",
                   help="append the answer to the ledger as a signed ForensicTrace observation (needs --key), "
                   "which gradledger-verify --check-traces recomputes")
    p.add_argument("--key", help="with --record: the private key file that signs it (a root, authority or "
                   "trainer credential of the ledger)")
    p.set_defaults(run=_trace)
