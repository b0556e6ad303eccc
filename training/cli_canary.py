"""`gradledger canary`: a committed dataset with a canary set inserted (specs/dynamics.md §4).

    gradledger canary --project DIR --dataset NAME --name NEW --authority A [--count 8] [--references 64]
                      [--set canaries] [--seed 0] [--json]

Commits dataset ``NEW``: dataset ``NAME``'s manifests and inputs, then ``--count`` inserted canaries and
``--references`` reference canaries, random inputs like the dataset's with random labels, each manifest
marked as a canary and signed by ``--authority`` for its keyless ``canary`` source. A governed run over
``NEW`` with the memorization monitor records their ranks at each checkpoint; ``gradledger scan`` reads
their exposure. Exit 0 with the dataset committed; 2 for a project, dataset or parameter that cannot be
used (one line).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_command"]


def _canary(args: argparse.Namespace) -> int:
    from gradledger.training.dynamics.canaries import insert_canaries
    from gradledger.training.project import Project

    with Project.open(args.project) as project:
        done = insert_canaries(project, dataset=args.dataset, name=args.name, authority=args.authority,
                               count=args.count, references=args.references, seed=args.seed, set_name=args.set)
    ds, cs = done.dataset, done.set
    summary = {"dataset": ds.name, "seq": ds.seq, "root": ds.root.hex(), "count": ds.count, "set": cs.name,
               "inserted": list(cs.inserted), "references": list(cs.references)}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"committed dataset {ds.name!r} (seq {ds.seq}, {ds.count} examples): canary set {cs.name!r} of "
              f"{len(cs.inserted)} inserted canaries (indices {cs.inserted[0]}..{cs.inserted[-1]}) and "
              f"{len(cs.references)} references ({cs.references[0]}..{cs.references[-1]}), signed by "
              f"{args.authority}; train over it with the memorization monitor, and `gradledger scan` reports "
              "their exposure")
    return 0


def add_command(sub: Any) -> None:
    """Register ``canary`` on the ``gradledger`` subcommand parser."""
    p = sub.add_parser("canary", help="commit a dataset with a credentialed canary set inserted, whose exposure "
                       "every memorization scan records")
    p.add_argument("--project", required=True, help="project directory (gradledger init)")
    p.add_argument("--dataset", required=True, help="the committed dataset to add the canaries to")
    p.add_argument("--name", required=True, help="name of the new dataset to commit")
    p.add_argument("--authority", required=True, help="the taxonomy authority that signs the canaries' manifests")
    p.add_argument("--count", type=int, default=8, help="inserted canaries, the ones trained (default 8)")
    p.add_argument("--references", type=int, default=64,
                   help="reference canaries, never trained: the exposure bound is log2(references + 1) bits "
                   "(default 64)")
    p.add_argument("--set", default="canaries", help="the canary set's name (default canaries)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(run=_canary)
