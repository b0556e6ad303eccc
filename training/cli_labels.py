"""`gradledger labels import`: a labeling platform's export as signed, credentialed manifests and a
committed dataset (specs/labels.md).

    gradledger labels import --format labelbox|labelstudio|scale|snorkel EXPORT --project DIR
                             --authority NAME --name DATASET --examples EXAMPLES.safetensors [--key FIELD]
                             [--question Q] [--labelbox-project ID] [--source NAME] [--seed N] [--json]

``EXAMPLES.safetensors`` holds one tensor per example, named by the platform's key for it (a Label
Studio task id or data field, a Labelbox global key, a Scale task id or metadata field, a Snorkel
row number). Exit 0
with the dataset committed; 2 for an export, examples file or project that cannot be used, naming
the record and field (one line).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gradledger.ledger.files import read_regular

__all__ = ["add_command"]

#: The examples file is the user's own; still, its size is bounded before it is read.
MAX_EXAMPLES = 8 << 30


def _examples(path: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    from gradledger.training.labels import LabelImportError

    data = read_regular(path, MAX_EXAMPLES, "examples file", LabelImportError)
    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise LabelImportError(f"{path}: not a safetensors file of example tensors ({exc})") from None


def _label_matrix(path: str) -> tuple[Any, list[str]]:
    """``L`` and ``lf_names`` from a .npz (numpy's own reader, pickles refused; sizes bounded first)."""
    import io
    import zipfile

    import numpy as np

    from gradledger.training.labels import LabelImportError
    from gradledger.training.labels.records import MAX_EXPORT

    data = read_regular(path, MAX_EXPORT, "label matrix file", LabelImportError)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if sum(i.file_size for i in z.infolist()) > MAX_EXPORT:
                raise LabelImportError(f"{path}: its arrays unpack to more than {MAX_EXPORT} bytes")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            if "L" not in arrays or "lf_names" not in arrays:
                raise LabelImportError(f"{path}: a .npz with arrays 'L' and 'lf_names' is needed")
            L, names = arrays["L"], arrays["lf_names"]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise LabelImportError(f"{path}: not a .npz of L and lf_names ({exc})") from None
    if names.ndim != 1 or names.dtype.kind != "U":
        raise LabelImportError(f"{path}: lf_names must be a 1-D array of strings")
    return L, [str(n) for n in names]


def _import(args: argparse.Namespace) -> int:
    from gradledger.training.labels import LabelImportError, import_labels
    from gradledger.training.project import Project

    options: dict[str, Any] = {"key": args.key, "question": args.question}
    if args.format == "labelbox" and args.labelbox_project:
        options["project"] = args.labelbox_project
    if args.format == "scale" and args.source:
        options["source"] = args.source
    if args.format == "snorkel" and args.seed is None:
        raise LabelImportError("--format snorkel needs --seed (the seed LabelModel.fit is given)")
    examples = _examples(args.examples)
    with Project.open(args.project) as project:
        if args.format == "snorkel":
            from gradledger.training.labels.snorkel import import_label_model

            L, names = _label_matrix(args.export)
            done = import_label_model(project, L, names, authority=args.authority, name=args.name,
                                      examples=examples, seed=args.seed)
        else:
            done = import_labels(project, args.format, args.export, authority=args.authority, name=args.name,
                                 examples=examples, **options)
    summary = {"dataset": done.dataset.name, "seq": done.dataset.seq, "root": done.dataset.root.hex(),
               "count": done.dataset.count, "keys": done.keys, "unlabeled": done.unlabeled,
               "credentialed": done.credentialed}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"committed dataset {summary['dataset']!r}: {summary['count']} manifests signed by {args.authority} "
              f"(seq {summary['seq']}, root {summary['root'][:16]}); {len(done.credentialed)} new sources "
              f"credentialed; {len(done.unlabeled)} records without a label left out"
              + (f" ({', '.join(done.unlabeled[:5])}{', ...' if len(done.unlabeled) > 5 else ''})"
                 if done.unlabeled else ""))
    return 0


def add_command(sub: Any) -> None:
    """Register ``labels import`` on the ``gradledger`` subcommand parser."""
    labels = sub.add_parser("labels", help="labels from labeling platforms (specs/labels.md)")
    verbs = labels.add_subparsers(dest="labels_command", required=True, metavar="VERB")
    p = verbs.add_parser("import", help="sign a platform's export as credentialed manifests and commit the dataset")
    p.add_argument("--format", required=True, choices=("labelbox", "labelstudio", "scale", "snorkel"),
                   help="the export's platform: Labelbox export v2 NDJSON, Label Studio JSON, Scale task JSON, or "
                   "a Snorkel label matrix (.npz with L and lf_names; a LabelModel is fitted with --seed)")
    p.add_argument("export", help="the platform's export file")
    p.add_argument("--project", required=True, help="project directory (gradledger init)")
    p.add_argument("--authority", required=True, help="the taxonomy authority that signs for the platform's annotators")
    p.add_argument("--name", required=True, help="name of the dataset to commit")
    p.add_argument("--examples", required=True, help="safetensors file: one tensor per example, named by its key")
    p.add_argument("--key", help="the field naming each example (Label Studio: a data field, default the task id; "
                   "Labelbox: global_key, external_id or id; Scale: a metadata field, default the task id)")
    p.add_argument("--question", help="which classification, where the export answers several (Label Studio "
                   "from_name, Labelbox classification name, Scale annotation field)")
    p.add_argument("--labelbox-project", help="Labelbox: the project id whose labels count (default every project's)")
    p.add_argument("--source", help="Scale: the source name its answers are credited to (default scale-workforce)")
    p.add_argument("--seed", type=int, help="Snorkel: the seed LabelModel.fit is given (required)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_import)
