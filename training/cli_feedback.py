"""`gradledger feedback`: what to annotate or review next, in the labeling platform's own format
(specs/dynamics.md §3).

    gradledger feedback LEDGER --format labelstudio|labelbox|csv -o FILE [--run R] [--fraction F | --top N]
                       [--examples EXAMPLES.safetensors] [--project DIR] [--question Q] [--to-name T]
                       [--key-field K] [--json]

Ranks every trained example of the run by the evidence that its label needs a second look (its
recorded loss, memorization, disagreement between its sources, influence on a traced behavior, its
class's confusion at depth where the run recorded DepthProfiles), writes the top of that list as a
Label Studio task import, a Labelbox prediction import or CSV, and prints where those examples come
from (sources, classes) and the classes the run's last depth profile finds most confused. Exit 0
with the file written; 2 for a ledger, run or option that cannot be used (one line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["add_command"]


def _render(report: dict[str, Any]) -> str:
    lines = [f"feedback for run {report['run']} ({report['steps']} steps): {report['written']} of {report['trained']} "
             f"trained examples written to {report['file']} ({report['format']}), highest priority first"]
    for e in report["examples"][:10]:
        lines.append(f"  {e['rank']:>4}. #{e['index']:<6} {e['key'][:24]:<24} label {e['label']:<8} priority "
                     f"{e['priority']:.3f}  {e['reasons']}")
    lines.append("sources, by the share of their examples prioritized:")
    for s in report["sources"][:8]:
        lines.append(f"  {s['name']:<24} {s['prioritized']:>5} of {s['trained']:<6} ({s['share']:.0%})")
    lines.append("classes: " + ", ".join(f"{c['name']} {c['share']:.0%}" for c in report["classes"][:10]))
    depth = report.get("depth")
    if depth is not None:
        bands = depth["bands"]
        lines.append(f"confusion at depth (DepthProfile at step {depth['step']}; bits of at most "
                     f"{depth['max_bits']:.2f} per band, {' / '.join(bands)}), most confused at the head first:")
        for c in depth["classes"][:5]:
            at = c["confused_from"]
            half = depth["max_bits"] / 2
            where = (f"at most {half:.2f} bits at every band" if at is None
                     else f"above {half:.2f} bits up to {bands[at]}")
            lines.append(f"  class {str(c['class']):<8} " + " / ".join(f"{h:.2f}" for h in c["entropy"])
                         + f"  ({where})")
    return "\n".join(lines)


def _feedback(args: argparse.Namespace) -> int:
    from gradledger.ledger.ledger import Ledger
    from gradledger.training.cli_labels import _examples
    from gradledger.training.dynamics.export import FORMATS, keys_of, render
    from gradledger.training.dynamics.feedback import FeedbackError, depth_report, priorities, summarize

    if args.format not in FORMATS:
        raise FeedbackError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}")
    if (args.top is None) == (args.fraction is None):
        args.fraction = 0.05 if args.top is None else None
    if args.top is not None and args.top < 1:
        raise FeedbackError(f"--top {args.top} is not a positive count")
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise FeedbackError(f"--fraction {args.fraction} is not in (0, 1]")
    classes = None
    if args.project is not None:
        from gradledger.training.project import Project

        with Project.open(args.project, writable=False) as project:
            named = project.taxonomy.classes
            classes = list(named) if isinstance(named, tuple) else None
    keys = keys_of(_examples(args.examples)) if args.examples is not None else {}
    with Ledger.open(args.ledger) as ledger:
        lin, items = priorities(ledger, run_id=args.run_id)
        depth = depth_report(ledger, lin)
    top = args.top if args.top is not None else math.ceil(args.fraction * len(items))
    chosen = items[:top]
    text = render(chosen, args.format, keys=keys, classes=classes, run=lin.run.run_id, steps=len(lin.run.updates),
                  question=args.question, to_name=args.to_name, key_field=args.key_field)
    out = Path(args.output)
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)  # never a half-written file under the name asked for
    summary = summarize(items, top, depth)
    report = {
        "run": lin.run.run_id, "steps": len(lin.run.updates), "trained": len(items), "written": len(chosen),
        "file": str(out), "format": args.format, "matched_keys": sum(e.example in keys for e in chosen),
        "examples": [{"rank": r + 1, "index": e.index, "key": keys.get(e.example, e.example.hex()),
                      "label": classes[e.label] if classes and e.label < len(classes) else e.label,
                      "sources": e.sources, "priority": e.priority, "reasons": e.reasons}
                     for r, e in enumerate(chosen)],
        **summary,
    }
    if not args.json:
        for e in report["examples"]:
            e["reasons"] = ", ".join(f"{k} {v:.2f}" for k, v in e["reasons"].items())
    print(json.dumps(report, sort_keys=True) if args.json else _render(report))
    return 0


def add_command(sub: Any) -> None:
    """Register ``feedback`` on the ``gradledger`` subcommand parser."""
    p = sub.add_parser("feedback", help="what to annotate or review next: the run's examples ranked by the evidence "
                       "that their labels need a second look, as a Label Studio, Labelbox or CSV import")
    p.add_argument("ledger", help="ledger directory")
    p.add_argument("--format", required=True, help="labelstudio (task import JSON), labelbox (prediction import "
                   "NDJSON) or csv")
    p.add_argument("-o", "--output", required=True, help="the file to write")
    p.add_argument("--run", dest="run_id", help="run id (default: the latest governed run or branch)")
    p.add_argument("--fraction", type=float, help="share of the trained examples written (default 0.05)")
    p.add_argument("--top", type=int, help="number of examples written (instead of --fraction)")
    p.add_argument("--examples", help="the examples file given to `gradledger labels import` (tensors named by the "
                   "platform's keys): rows are named by those keys")
    p.add_argument("--project", help="project directory: labels written as its ontology's class names")
    p.add_argument("--question", default="label", help="the classification's name in the platform (Label Studio's "
                   "from_name, Labelbox's feature name; default 'label')")
    p.add_argument("--to-name", default="image", help="Label Studio's to_name (default 'image')")
    p.add_argument("--key-field", default="key", help="Label Studio data field holding the key (default 'key')")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(run=_feedback)
