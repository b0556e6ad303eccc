"""`gradledger profiles`: how sure a governed run's model was of each class at each band's boundary, and
what its entropy budgets did (specs/dynamics.md §5).

    gradledger profiles LEDGER [--run R] [--json]

Reads the run's recorded DepthProfiles: each checkpoint's mean entropy per band (and the rules the
policy's entropy budgets suspended from it on, recomputed from those records), and the last one per
band and class (and slice). The verifier recomputes every profile from the checkpoint's weights. Exit 0;
2 for a ledger or run that cannot be used, or a run that recorded no profiles (one line).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

__all__ = ["add_command", "profiles_report"]


def profiles_report(ledger: Any, run_id: str | None = None) -> dict[str, Any]:
    """The report of run ``run_id`` (default: the latest governed run or branch) as a JSON-ready map."""
    from .dynamics.feedback import run_profiles
    from .dynamics.scan import ScanError
    from .forensics.lineage import lineage
    from .policy import load_adopted, suspended_rules

    lin = lineage(ledger, run_id, inputs=False)
    bodies = run_profiles(ledger, lin)
    if not bodies:
        raise ScanError(f"run {lin.run.run_id!r} records no depth profiles: govern it with "
                        "profiles=DepthProfiles(<held-out dataset>) (specs/dynamics.md §5)")
    settings = lin.run.settings
    declared = settings.get("monitors", {}).get("profiles", {})
    compiled = load_adopted(ledger, settings["policy_seq"]).compiled
    bands = [b["name"] for b in settings["bands"]["bands"]]
    checkpoints, before = [], None
    for b in bodies:
        off = suspended_rules(compiled, before, b) if compiled.budgets else frozenset()
        checkpoints.append({"step": b["step"], "mean": b["mean"],
                            "suspended": sorted(compiled.rules[i].name for i in off)})
        before = b
    last = bodies[-1]
    n = len(last["classes"])
    return {
        "run": lin.run.run_id, "held_out": declared.get("dataset", {}).get("name"),
        "temperature": declared.get("temperature"), "slice": declared.get("slice"), "bands": bands,
        "classes": last["classes"], "max_bits": math.log2(n) if n > 1 else 0.0, "checkpoints": checkpoints,
        "last": {"step": last["step"], "entropy": last["entropy"], "counts": last["counts"],
                 "slices": last.get("slices")},
        "budgets": [{"rule": compiled.rules[i].name, "band": bands[band], "max_change": most, "slice": name}
                    for i, (band, most, name) in sorted(compiled.budgets.items())],
    }


def _render(r: dict[str, Any]) -> str:
    bands = r["bands"]
    lines = [f"depth profiles of run {r['run']} over held-out dataset {r['held_out']!r} (temperature "
             f"{r['temperature']}): bits of uncertainty in the class evidence at each band's boundary, of at most "
             f"{r['max_bits']:.2f}"]
    lines.append("  step    " + "".join(f"{b:>12}" for b in bands) + "   suspended")
    for c in r["checkpoints"]:
        lines.append(f"  {c['step']:<7} " + "".join(f"{m:>12.3f}" for m in c["mean"])
                     + ("   " + ", ".join(c["suspended"]) if c["suspended"] else ""))
    last = r["last"]
    lines.append(f"at step {last['step']}, per class (most confused at the head first):")
    order = sorted(range(len(r["classes"])), key=lambda i: -last["entropy"][0][i])
    for i in order:
        lines.append(f"  class {r['classes'][i]!s:<10} " + " / ".join(f"{last['entropy'][k][i]:.2f}"
                                                                    for k in range(len(bands)))
                     + f"  ({last['counts'][i]} held out)")
    sl = last.get("slices")
    if sl:
        lines.append(f"per {sl['by']} slice:")
        for j, name in enumerate(sl["names"]):
            lines.append(f"  {name:<24} " + " / ".join(f"{sl['entropy'][k][j]:.2f}" for k in range(len(bands)))
                         + f"  ({sl['counts'][j]} held out)")
    for b in r["budgets"]:
        hits = [c["step"] for c in r["checkpoints"] if b["rule"] in c["suspended"]]
        on = f" over slice {b['slice']!r}" if b["slice"] else ""
        lines.append(f"budget of rule {b['rule']!r}: band {b['band']}{on} may move {b['max_change']} bits between "
                     f"checkpoints; suspended from step(s) {hits or 'none'}")
    lines.append("the verifier recomputes each profile from its checkpoint's weights (gradledger-verify)")
    return "\n".join(lines)


def _profiles(args: argparse.Namespace) -> int:
    from gradledger.ledger.ledger import Ledger

    with Ledger.open(args.ledger) as ledger:
        report = profiles_report(ledger, args.run_id)
    print(json.dumps(report, sort_keys=True) if args.json else _render(report))
    return 0


def add_command(sub: Any) -> None:
    """Register ``profiles`` on the ``gradledger`` subcommand parser."""
    p = sub.add_parser("profiles", help="the run's entropy depth profiles: how sure the model was of each class at "
                       "each band, checkpoint by checkpoint, and what its entropy budgets suspended")
    p.add_argument("ledger", help="ledger directory")
    p.add_argument("--run", dest="run_id", help="run id (default: the latest governed run or branch)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(run=_profiles)
