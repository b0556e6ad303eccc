"""`gradledger`: the command line for ledgers and governed training.

Exit codes (every subcommand): 0 done, 1 a check failed, 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from gradledger.ledger.errors import GradledgerError, VerificationError
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradledger", description="Auditable, governed model training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = sub.add_parser("inspect", help="summarize a ledger: counts, head, tree, authority taxonomy")
    inspect.add_argument("ledger", help="ledger directory")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--verify", action="store_true", help="also re-check every signature, the chain and the Merkle root")
    inspect.set_defaults(run=_inspect)
    return parser


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Map the typed errors onto exit codes with one clear line, never a traceback."""
    try:
        return run(args)
    except VerificationError as exc:
        print(f"gradledger: verification failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except GradledgerError as exc:  # unusable input, a locked ledger, bad governance input
        print(f"gradledger: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as exc:
        print(f"gradledger: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("gradledger: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
