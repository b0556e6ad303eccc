"""`gradledger-verify BUNDLE --trust ROOTS`: the standalone verifier's command line.

Exit codes: 0 verified, 1 verification failed (the report names the first failing observation
or step and why), 2 unusable input (one line, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from gradledger.ledger.errors import GradledgerError, UnusableInput, VerificationError, exit_status
from gradledger.ledger.keys import read_public_keys

from ._internal.pool import WorkerPool
from ._internal.sandbox import SandboxSpec

EXIT_VERIFIED, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradledger-verify",
        description="Verify a gradledger bundle against trusted root keys: signatures, chain, Merkle tree heads, "
        "credentials, dataset commitment, policy compliance, unlearning certificates, and replay.",
    )
    parser.add_argument("bundle", help="bundle file (.glb) or a ledger directory")
    parser.add_argument("--trust", required=True, help="file of trusted root public keys (lines 'ed25519:<hex>')")
    parser.add_argument("--replay", choices=("full", "sample", "certificates", "none"), default="full",
                        help="replay every segment, a challenge-derived sample (plus every certified unlearning "
                        "branch), only the certified branches, or none (default: full)")
    parser.add_argument("--workers", type=int, default=1, help="replay segments in N worker processes")
    parser.add_argument("--sample-fraction", type=float, default=0.25, help="fraction of segments sampled (default 0.25)")
    parser.add_argument("--nonce", default=None, metavar="HEX",
                        help="hex nonce mixed into the sample challenge (default: 32 fresh random bytes, "
                        "stated in the report; give the reported one to reproduce a draw)")
    parser.add_argument("--tolerance", action="store_true",
                        help="where this machine's environment differs from the recorded one, replay within the "
                        "bounds of specs/replay.md §4 (verdict 'tolerance') instead of failing")
    parser.add_argument("--max-memory", type=int, default=8192, metavar="MIB",
                        help="address-space limit of each sandboxed replay worker, in MiB (default 8192); a worker "
                        "that needs more fails replay naming its segment")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="replay in workers WITHOUT the sandbox (namespaces, read-only filesystem, no network, "
                        "seccomp, rlimits; specs/replay.md §7), for machines that cannot set it up; the report "
                        "says 'sandbox: off'. Only for bundles you trust")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workers < 1:
            raise UnusableInput("--workers must be at least 1")
        if args.max_memory < 256:
            raise UnusableInput("--max-memory must be at least 256 (MiB)")
        if not 0 < args.sample_fraction <= 1:
            raise UnusableInput("--sample-fraction must be in (0, 1]")
        try:
            nonce = None if args.nonce is None else bytes.fromhex(args.nonce)
        except ValueError:
            raise UnusableInput("--nonce must be hex") from None
        roots = read_public_keys(args.trust)
        # Replay workers start first: their imports overlap the verifier's own (pool.py says why).
        spec = SandboxSpec(not args.no_sandbox, args.max_memory)
        with WorkerPool(spec, args.workers if args.replay != "none" else 0) as pool:
            try:
                # Every check module is imported here: one that is missing or broken leaves a
                # verifier that cannot run all its checks, which is unusable (exit 2), never a skip.
                from .verifier import VerificationPolicy, Verifier
            except ImportError as exc:
                raise UnusableInput(f"the verifier cannot run every check: {exc}") from None
            policy = VerificationPolicy(args.replay, args.workers, args.sample_fraction, nonce, args.tolerance,
                                        sandbox=not args.no_sandbox, max_memory_mib=args.max_memory)
            report = Verifier(roots, policy).verify(args.bundle, progress=not args.json, pool=pool)
    except VerificationError as exc:  # raised before a report exists: still a failed verification
        if args.json:
            print(json.dumps({"verified": False, "checks": [], "first_failure": {"name": "input", "detail": str(exc)}}))
        else:
            print(f"gradledger-verify: verification failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (GradledgerError, OSError) as exc:
        code, line = exit_status(exc, "gradledger-verify")
        print(line, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("gradledger-verify: interrupted", file=sys.stderr)
        return EXIT_UNUSABLE
    except Exception as exc:  # hostile input must never end in a traceback; this is a bug to report
        print(exit_status(exc, "gradledger-verify")[1], file=sys.stderr)
        return EXIT_UNUSABLE
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True))
    else:
        print(report.render())
    return EXIT_VERIFIED if report.verified else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
