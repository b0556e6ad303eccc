"""`gradledger-verify BUNDLE --trust ROOTS`: the standalone verifier's command line.

Exit codes: 0 verified, 1 verification failed (the report names the first failing observation
or step and why), 2 unusable input (one line, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from gradledger.ledger.errors import GradledgerError, UnusableInput, VerificationError, exit_status
from gradledger.ledger.keys import read_public_keys

from ._internal.pool import WorkerPool
from ._internal.sandbox import SandboxSpec

if TYPE_CHECKING:
    from ._internal.release import ReleaseInputs

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
    parser.add_argument("--workers", type=int, default=1, help="replay segments in N worker processes (with "
                        "--engine ray: N Ray tasks at a time)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="replay in local worker processes (default), or one Ray task per segment on a Ray "
                        "cluster (needs: pip install 'gradledger[ray]'; specs/replay.md §8)")
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                        help="with --engine ray: join this running Ray cluster (default: start a local one of "
                        "--workers CPUs)")
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
    parser.add_argument("--check-traces", action="store_true",
                        help="recompute every recorded ForensicTrace (gradledger trace --record) and compare its "
                        "scores within the method's tolerance (specs/forensics.md §7.3); the replay and checkpoints "
                        "methods replay every segment of the traced run")
    parser.add_argument("--release", metavar="DIR", help="also check a release (gradledger release): model files -> "
                        "model-signing signature -> provenance -> cosigned checkpoint -> this bundle -> replay")
    parser.add_argument("--model", metavar="PATH", help="with --release: the model file or directory released")
    parser.add_argument("--release-key", metavar="PEM", help="with --release: the releaser's public key (PEM)")
    parser.add_argument("--attest", metavar="FILE", help="write the result as a signed SLSA verification summary "
                        "(in-toto Statement v1 in DSSE) to FILE")
    parser.add_argument("--attest-key", metavar="PEM", help="with --attest: the verifier's private key (PEM)")
    parser.add_argument("--artifacts", metavar="STORE", help="artifact store holding the checkpoints a bundle names "
                        "by digest (gradledger export --artifacts-to): a directory, or a URL fsspec opens "
                        "(pip install 'gradledger[store]'); replay fetches only the checkpoints it uses")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def _release_inputs(args: argparse.Namespace) -> "ReleaseInputs | None":
    given = [args.release, args.model, args.release_key]
    if not any(given):
        return None
    if not all(given):
        raise UnusableInput("--release needs --model and --release-key")
    from ._internal.release import ReleaseInputs

    return ReleaseInputs(Path(args.release), Path(args.model), Path(args.release_key))


def _policy_json(policy: Any) -> dict[str, Any]:
    out = {k: v for k, v in vars(policy).items() if k not in ("release", "nonce")}
    if policy.release is not None:
        out["release"] = True
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradledger")
    except PackageNotFoundError:
        return "unknown"


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
        if args.check_traces and args.replay == "none":
            raise UnusableInput("--check-traces recomputes traces by replay: it cannot go with --replay none")
        if args.address is not None and args.engine != "ray":
            raise UnusableInput("--address names a Ray cluster: it goes with --engine ray")
        if args.engine == "ray" and args.replay != "none":
            from ._internal.ray_engine import require_ray

            require_ray()  # before any work: a missing extra is unusable input at once
        release = _release_inputs(args)
        if bool(args.attest) != bool(args.attest_key):
            raise UnusableInput("--attest and --attest-key go together")
        if args.attest or release is not None:
            # Before the verification, not after its replay: a missing extra or an unreadable key is
            # unusable input at once.
            from gradledger.ledger import attest

            attest.require("gradledger-verify --release/--attest")
            if args.attest:
                attest.private_key(Path(args.attest_key))
        roots = read_public_keys(args.trust)
        # Replay workers start first: their imports overlap the verifier's own (pool.py says why).
        spec = SandboxSpec(not args.no_sandbox, args.max_memory)
        with WorkerPool(spec, args.workers if args.replay != "none" and args.engine == "local" else 0) as pool:
            try:
                # Every check module is imported here: one that is missing or broken leaves a
                # verifier that cannot run all its checks, which is unusable (exit 2), never a skip.
                from .verifier import VerificationPolicy, Verifier
            except ImportError as exc:
                raise UnusableInput(f"the verifier cannot run every check: {exc}") from None
            policy = VerificationPolicy(args.replay, args.workers, args.sample_fraction, nonce, args.tolerance,
                                        sandbox=not args.no_sandbox, max_memory_mib=args.max_memory, release=release,
                                        check_traces=args.check_traces, engine=args.engine,
                                        ray_address=args.address, artifacts=args.artifacts)
            report = Verifier(roots, policy).verify(args.bundle, progress=not args.json, pool=pool)
        if args.attest:
            from ._internal.summary import write_summary

            write_summary(Path(args.attest), Path(args.attest_key), report, args.bundle, _policy_json(policy),
                          _version())
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
