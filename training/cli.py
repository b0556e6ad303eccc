"""`gradledger`: the command line for ledgers and governed training.

Exit codes (every subcommand): 0 done, 1 a check failed, 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from gradledger.ledger.artifact_store import ArtifactStore
from gradledger.ledger.bundle import export_bundle, import_bundle
from gradledger.ledger.errors import GradledgerError, exit_status
from gradledger.ledger.inspection import render, summarize
from gradledger.ledger.ledger import Ledger

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def _inspect(args: argparse.Namespace) -> int:
    with Ledger.open(args.ledger) as ledger:
        summary = summarize(ledger)
        if args.verify:
            from tqdm import tqdm

            with tqdm(total=ledger.size, desc="verifying", unit="obs", disable=None, file=sys.stderr) as bar:
                report = ledger.verify(progress=lambda seq: bar.update(1))
            summary["verified"] = {"size": report.size, "root": report.root.hex(), "tree_heads": report.tree_heads}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(render(summary))
        if args.verify:
            print(f"\nverified: {summary['verified']['size']} observations, chain, signatures, credentials and Merkle root OK")
    return EXIT_OK


def _retire(args: argparse.Namespace) -> int:
    from gradledger.ledger.keys import SigningKey
    from gradledger.training.retirement import retire

    key = SigningKey.load(args.key)
    with Ledger.open(args.ledger, writable=True) as ledger:
        done = retire(ledger, args.source, key, args.reason)
    summary = {"seq": done.seq, "source": done.source, "key_id": done.key_id.hex(), "signer": done.signer.hex()}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"retired {done.source} (credential {summary['key_id'][:16]}) at seq {done.seq}")
    return EXIT_OK


def _unlearn(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gradledger.ledger.keys import SigningKey
    from gradledger.training.unlearning import unlearn

    key = SigningKey.load(args.key)
    with Ledger.open(args.ledger, writable=True) as ledger:
        with tqdm(desc="unlearning", unit="step", disable=None, file=sys.stderr) as bar:
            result = unlearn(ledger, args.source, key, run_id=args.run_id, progress=lambda step: bar.update(1))
    summary = {
        "source": result.source, "mode": result.mode, "run_id": result.run_id, "branch_run_id": result.branch_run_id,
        "rewind_step": result.rewind_step, "first_step": result.first_step, "replayed_steps": result.replayed_steps,
        "skipped_steps": result.skipped_steps, "total_steps": result.total_steps, "removed": len(result.removed),
        "relabeled": len(result.relabeled), "certificate_seq": result.certificate_seq,
        "original_head": result.original_head.hex(), "new_head": result.new_head.hex(),
    }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"unlearned {result.source} ({result.mode}): rewound {result.run_id} to step {result.rewind_step}, "
              f"replayed {result.replayed_steps} of {result.total_steps} steps without {len(result.removed)} removed "
              f"and with {len(result.relabeled)} relabeled examples; certificate at seq {result.certificate_seq}, "
              f"new head {summary['new_head'][:16]}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    store = ArtifactStore(args.artifacts_to, create=True) if args.artifacts_to else None
    with Ledger.open(args.ledger) as ledger:
        with tqdm(desc="exporting", unit="B", unit_scale=True, disable=None, file=sys.stderr) as bar:
            header = export_bundle(ledger, args.output, with_data=args.with_data, progress=bar.update,
                                   artifacts_to=store)
    summary = {key: header[key] for key in ("origin", "records", "artifacts", "cosignatures", "size", "with_data")}
    if store is not None:
        summary.update(external=header["external"], artifacts_to=args.artifacts_to)
    summary.update(root=header["root"].hex(), bytes=os.path.getsize(args.output), path=str(args.output))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        data = ", with dataset inputs" if args.with_data else ""
        if store is not None:
            data += f", {header['external']} checkpoints by digest in {args.artifacts_to}"
        print(f"exported {summary['records']} observations, {summary['artifacts']} artifacts{data}, "
              f"{summary['cosignatures']} cosignatures: {summary['bytes']} bytes to {summary['path']}")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    total = os.path.getsize(args.bundle) if os.path.isfile(args.bundle) else None
    with tqdm(total=total, desc="importing", unit="B", unit_scale=True, disable=None, file=sys.stderr) as bar:
        ledger = import_bundle(args.bundle, args.ledger, progress=bar.update,
                               artifacts=ArtifactStore(args.artifacts) if args.artifacts else None)
    with ledger:
        summary = {"path": str(ledger.path), "origin": ledger.origin, "size": ledger.size, "root": ledger.root.hex(),
                   "artifacts": len(ledger.artifact_digests()), "cosignatures": len(list(ledger.cosignatures()))}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"imported {summary['size']} observations, {summary['artifacts']} artifacts, "
              f"{summary['cosignatures']} cosignatures into {summary['path']}: root {summary['root']}")
    return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    from gradledger.training.project import Project  # no torch: labeling imports it when it runs

    with Project.init(args.dir, args.taxonomy) as project:
        tax = project.taxonomy
        policy = project.policy
        summary = {
            "path": str(project.path), "ledger": str(project.ledger.path), "trust": str(project.trust_file),
            "keys": str(project.path / "keys"), "root": {"name": tax.root_name, "path": tax.root_path,
                                                         "public_key": project.root_key.public_key.hex()},
            "trainer": tax.trainer_name, "authorities": list(tax.authorities), "sources": list(tax.sources),
            "policy": {"name": policy.policy["name"], "bands": list(policy.bands), "digest": policy.digest.hex(),
                       "rules": [r["name"] for r in policy.policy["rules"]]},
            "ledger_size": project.ledger.size,
        }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"initialized project {summary['path']}: root {tax.root_name} ({tax.root_path}), trainer "
              f"{tax.trainer_name}, {len(tax.authorities)} authorities, {len(tax.sources)} sources\n"
              f"  keys      {summary['keys']}/ (each file 0600)\n"
              f"  trust     {summary['trust']} (gradledger-verify --trust)\n"
              f"  ledger    {summary['ledger']} ({summary['ledger_size']} genesis records)\n"
              f"  policy    {policy.policy['name']!r} over bands {', '.join(policy.bands)}, signed by the root "
              f"and adopted (digest {summary['policy']['digest'][:16]})")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from gradledger.training.demo import main as demo_main  # torch and scikit-learn load only here

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradledger", description="Auditable, governed model training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = sub.add_parser("inspect", help="summarize a ledger: counts, head, tree, authority taxonomy")
    inspect.add_argument("ledger", help="ledger directory")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--verify", action="store_true", help="also re-check every signature, the chain and the Merkle root")
    inspect.set_defaults(run=_inspect)
    retire = sub.add_parser("retire", help="record that a labeling source is retired (root or its issuing authority signs)")
    retire.add_argument("ledger", help="ledger directory")
    retire.add_argument("--source", required=True, help="the source's credential subject name")
    retire.add_argument("--key", required=True, help="private key file of the root or the issuing authority")
    retire.add_argument("--reason", required=True, help="why the source is retired")
    retire.add_argument("--json", action="store_true", help="machine-readable output")
    retire.set_defaults(run=_retire)
    unlearn = sub.add_parser("unlearn", help="exactly unlearn a retired source: rewind, replay without it, certify")
    unlearn.add_argument("ledger", help="ledger directory")
    unlearn.add_argument("--source", required=True, help="the retired source's name")
    unlearn.add_argument("--key", required=True, help="the trainer's private key file (signs the branch)")
    unlearn.add_argument("--run", dest="run_id", metavar="RUN_ID", help="run id to unlearn from (default: the latest run the source contributed to)")
    unlearn.add_argument("--json", action="store_true", help="machine-readable output")
    unlearn.set_defaults(run=_unlearn)
    export = sub.add_parser("export", help="write a ledger as one portable bundle file (.glb)")
    export.add_argument("ledger", help="ledger directory")
    export.add_argument("-o", "--output", required=True, help="bundle file to write (replaced atomically)")
    data = export.add_mutually_exclusive_group()
    # The inputs travel by default: a bundle without them cannot be replayed, and the verifier
    # then fails (issue 10.3) unless it is asked for the structure only (--replay none).
    data.add_argument("--without-data", dest="with_data", action="store_false",
                      help="leave out the committed datasets' input artifacts (the bundle then verifies only with "
                      "gradledger-verify --replay none: its weights cannot be checked)")
    data.add_argument("--with-data", dest="with_data", action="store_true",
                      help="include the committed datasets' input artifacts (the default; accepted for old scripts)")
    export.set_defaults(with_data=True)
    export.add_argument("--artifacts-to", metavar="STORE", help="write the checkpoint artifacts into this artifact "
                        "store (a directory, made if absent, or a URL fsspec opens) and name them in the bundle by "
                        "digest (bundle version 2, specs/bundle.md §5); gradledger-verify --artifacts STORE fetches "
                        "only those its replay uses")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    export.set_defaults(run=_export)
    import_ = sub.add_parser("import", help="build a new ledger from a bundle, re-admitting every record")
    import_.add_argument("bundle", help="bundle file (.glb)")
    import_.add_argument("ledger", help="new ledger directory (must not exist, or be empty)")
    import_.add_argument("--artifacts", metavar="STORE", help="the artifact store holding the checkpoints the bundle "
                         "names by digest (required for such a bundle; each is hashed before it is stored)")
    import_.add_argument("--json", action="store_true", help="machine-readable output")
    import_.set_defaults(run=_import)
    init = sub.add_parser("init", help="make a project from a taxonomy file: keys, credentials, trust file, a ledger "
                          "with its genesis records and a root-signed routing policy (specs/project.md)")
    init.add_argument("dir", help="project directory to make (new, or empty)")
    init.add_argument("--taxonomy", required=True, help="taxonomy file (TOML; see examples/taxonomy.toml)")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    init.set_defaults(run=_init)
    demo = sub.add_parser("demo", help="the whole story on scikit-learn's digits: governed training, retirement of "
                          "a faulty annotator, exact unlearning, export, standalone verification, report.html")
    demo.add_argument("--out", required=True, help="output directory (new or empty)")
    demo.add_argument("--steps", type=int, default=1000, help="governed training steps (default 1000)")
    demo.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    demo.add_argument("--replay", choices=("full", "sample", "certificates", "none"), default="full",
                      help="what the verifier replays (default full)")
    demo.add_argument("--quiet", action="store_true", help="no progress lines or bars on stderr")
    demo.set_defaults(run=_demo)
    from gradledger.training.cli_canary import add_command as add_canary
    from gradledger.training.cli_feedback import add_command as add_feedback
    from gradledger.training.cli_labels import add_command as add_labels
    from gradledger.training.cli_profiles import add_command as add_profiles
    from gradledger.training.cli_publish import add_commands
    from gradledger.training.cli_scan import add_command as add_scan
    from gradledger.training.cli_trace import add_command as add_trace

    add_commands(sub)
    add_trace(sub)
    add_scan(sub)
    add_profiles(sub)
    add_canary(sub)
    add_feedback(sub)
    add_labels(sub)
    return parser


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Map the typed errors onto exit codes with one clear line, never a traceback."""
    try:
        return run(args)
    except (GradledgerError, OSError) as exc:
        code, line = exit_status(exc, "gradledger")
        print(line, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("gradledger: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
