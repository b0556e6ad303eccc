"""Robustness of the verifier against damaged bundles and hostile model programs (issue 9).

    python bench/robustness.py [--flips 2000] [--seed 0] [--steps 4] [--quick]

1. **Bit flips.** A small honest demo bundle (tests/forging.py ``build_demo``) is verified, then
   copies of it with one bit flipped are verified in-process with ``--replay full`` (one
   ``Verifier`` reused, as ``gradledger-verify`` runs it): first one flip in the middle of the
   header and of every artifact, in every replay mode (issue 9: none may verify in any mode),
   then random flips anywhere in the file until ``--flips`` have been tried. A flip that verifies
   is accepted; an exception other than the verifier's typed errors is a traceback.
2. **Hostile programs.** Program archives carrying a ``guards_code`` payload, a ``sympify``
   payload in ``expr_str``, a pickle member, a pickled weight, and deflate bombs (1 GiB) in the
   weights config and in a weight (tests/test_program_loader.py's builders; each payload creates a
   marker file if it runs) are put into the bundle by the trainer (RunStarted re-pointed,
   everything re-signed, tests/forging.py) and verified by ``gradledger-verify --replay full`` in
   a subprocess whose peak RSS is taken from ``os.wait4``'s rusage; the honest bundle is measured
   the same way.

Progress goes to stderr. The last stdout line is JSON: ``flips_tried``, ``flips_accepted``
(target 0), ``tracebacks`` (target 0), ``accepted_flips`` (where each landed), ``flips_by_item``,
``hostile_programs_tried``, ``code_executed`` (target 0), ``hostile_exit_codes``, ``max_rss_mb``
(over the hostile programs), ``honest_rss_mb`` and ``rss_ratio`` (target at most 1.5).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import forging as F  # noqa: E402

from gradledger.ledger.bundle import Bundle  # noqa: E402
from gradledger.ledger.errors import GradledgerError  # noqa: E402
from gradledger.ledger.keys import read_public_keys  # noqa: E402
from gradledger.verify import VerificationPolicy, Verifier  # noqa: E402

MODES = ("full", "sample", "certificates", "none")


def item_map(path: Path) -> list[tuple[str, int, int]]:
    """(label, start, end) of every item of the bundle, its head included."""
    data = path.read_bytes()
    with Bundle.open(path) as b:
        header = b.header
        digests = sorted(b.artifact_digests())
        kinds = artifact_kinds(b)
    labels = ["header"] + [f"record {i}" for i in range(header["records"])] \
        + [f"artifact {kinds.get(d, d.hex()[:12])}" for d in digests] \
        + [f"cosignature {i}" for i in range(header["cosignatures"])]
    out, pos = [], 0
    for label in labels:
        first = data[pos]
        info = first & 0x1F
        width = 0 if info < 24 else 1 << (info - 24)
        length = info if info < 24 else int.from_bytes(data[pos + 1:pos + 1 + width], "big")
        end = pos + 1 + width + length
        out.append((label, pos, end))
        pos = end
    assert pos == len(data), (pos, len(data))
    return out


def artifact_kinds(b: Bundle) -> dict[bytes, str]:
    """What each artifact is, from the records that name it."""
    from gradledger.ledger.envelope import unseal

    kinds: dict[bytes, str] = {}
    ckpt = 0
    for _, r in b.records():
        s = unseal(r)
        body = s.body
        if s.type == "RunStarted":
            kinds.setdefault(body["artifacts"].get("program", b""), "program")
            branch = body["settings"].get("branch")
            if branch:
                kinds[branch["removed"]], kinds[branch["relabeled"]] = "removed", "relabeled"
        elif s.type == "DatasetCommitted":
            kinds[body["manifests"]] = "manifests"
            if "data" in body:
                kinds[body["data"]] = "inputs"
        elif s.type == "Checkpoint":
            kinds.setdefault(body["artifact"], f"checkpoint {ckpt} (seq {s.seq}, step {body['step']})")
            ckpt += 1
    return kinds


def verdict(verifier: Verifier, path: Path) -> tuple[str, str]:
    try:
        report = verifier.verify(path)
    except GradledgerError as exc:
        return "rejected", f"exit 2: {exc}"[:200]
    except Exception as exc:  # the CLI would print this as a bug: a traceback in the count
        return "traceback", f"{type(exc).__name__}: {exc}"[:200]
    if report.verified:
        return "accepted", f"VERIFIED (verdict {report.verdict})"
    f = report.first_failure
    return "rejected", (f"{f.name}: {f.detail}" if f else "not verified")[:200]


def flips(demo: F.Demo, count: int, seed: int, work: Path, quick: bool) -> dict[str, Any]:
    honest = demo.bundle.read_bytes()
    roots = read_public_keys(demo.roots)
    verifiers = {m: Verifier(roots, VerificationPolicy(replay=m)) for m in MODES}  # type: ignore[arg-type]
    for m, v in verifiers.items():
        ok, why = verdict(v, demo.bundle)
        if ok != "accepted":
            raise SystemExit(f"the honest bundle does not verify with --replay {m}: {why}")
    items = item_map(demo.bundle)
    rng = random.Random(seed)
    target = work / "flipped.glb"
    tried, accepted, tracebacks, by_item = 0, [], [], {}

    def run(bit: int, mode: str) -> None:
        nonlocal tried
        data = bytearray(honest)
        data[bit // 8] ^= 1 << (bit % 8)
        target.write_bytes(data)
        label = next(lbl for lbl, s, e in items if s <= bit // 8 < e)
        kind = label if label.startswith("artifact") or label == "header" else label.split(" ")[0]
        result, why = verdict(verifiers[mode], target)
        tried += 1
        by_item[kind] = by_item.get(kind, 0) + 1
        if result == "accepted":
            accepted.append({"bit": bit, "item": label, "mode": mode})
        elif result == "traceback":
            tracebacks.append({"bit": bit, "item": label, "mode": mode, "error": why})
        if tried % 50 == 0 or result != "rejected":
            print(f"[{tried}/{count}] {result} bit {bit} in {label} (--replay {mode}): {why[:120]}", file=sys.stderr,
                  flush=True)

    # One flip in the middle of the header and of every artifact, in every replay mode.
    for label, start, end in items:
        if label == "header" or label.startswith("artifact"):
            for mode in MODES if not quick else ("full", "none"):
                run(8 * ((start + end) // 2) + rng.randrange(8), mode)
    while tried < count:
        run(rng.randrange(8 * len(honest)), "full")
    return {"flips_tried": tried, "flips_accepted": len(accepted), "tracebacks": len(tracebacks),
            "accepted_flips": accepted[:50], "traceback_flips": tracebacks[:20], "flips_by_item": by_item}


# -- hostile programs -------------------------------------------------------------------------------


#: The verifier's CLI, reporting its own peak RSS (VmHWM) at exit. Not ru_maxrss: a child forked
#: from this process (torch loaded) carries this process's high-water mark across exec on Linux.
LAUNCHER = """
import atexit, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(sys.argv[1], "w").write(line.split()[1])
atexit.register(_hwm)
from gradledger.verify.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def peak_rss_mb(bundle: Path, roots: Path, work: Path) -> tuple[int, float, str]:
    """Run gradledger-verify on ``bundle`` in a subprocess; (exit code, its peak RSS in MB, last line).

    The peak is the largest of the child's own VmHWM at exit and of /proc polls while it runs
    (the polls cover a child killed before its exit handler runs)."""
    out, hwm_file = work / "verify.out", work / "verify.hwm"
    hwm_file.unlink(missing_ok=True)
    peak = 0
    with open(out, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(hwm_file), str(bundle), "--trust", str(roots),
                                 "--replay", "full", "--json"], stdout=sink, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, _hwm_kb(proc.pid))
            time.sleep(0.02)
    if hwm_file.exists():
        peak = max(peak, int(hwm_file.read_text() or 0))
    lines = out.read_text(errors="replace").strip().splitlines()
    return proc.returncode, peak / 1024, (lines[-1] if lines else "")


def hostile_programs(demo: F.Demo, work: Path, kinds: list[str]) -> dict[str, Any]:
    import io
    import zipfile

    import test_program_loader as P

    forge = F.Forge.from_bundle(demo.bundle)
    program = forge.body(forge.first("RunStarted"))["artifacts"]["program"]
    honest_program = forge.arts[program]
    code, honest_rss, line = peak_rss_mb(demo.bundle, demo.roots, work)
    if code != 0:
        raise SystemExit(f"the honest bundle does not verify in a subprocess (exit {code}): {line}")
    print(f"honest bundle: exit 0, peak RSS {honest_rss:.0f} MB", file=sys.stderr, flush=True)
    config = zipfile.ZipFile(io.BytesIO(honest_program)).read(P.WEIGHTS_CONFIG)
    results = []
    for kind in kinds:
        marker = work / f"pwned-{kind}"
        if kind == "bomb_config":
            evil = P.rebuild(honest_program, replace={P.WEIGHTS_CONFIG: P._bomb(config)})
        elif kind == "bomb_weight":
            evil = P.rebuild(honest_program, replace={"archive/data/weights/weight_0": P._bomb(b"")})
        else:
            evil = P.hostile(kind, honest_program, marker, {})
        g = forge.clone()
        g.replace_artifact(program, evil)
        bundle = g.write(work / f"hostile-{kind}.glb")
        del evil, g
        code, rss, line = peak_rss_mb(bundle, demo.roots, work)
        bundle.unlink()
        ran = marker.exists()
        results.append({"kind": kind, "exit": code, "rss_mb": round(rss, 1), "code_executed": ran,
                        "detail": _failure(line)})
        # what ran must not be a verification: exit 1 (failed) or 2 (unusable input)
        print(f"hostile program {kind}: exit {code}, peak RSS {rss:.0f} MB, code executed: {ran}; {_failure(line)}",
              file=sys.stderr, flush=True)
    max_rss = max(r["rss_mb"] for r in results)
    return {"hostile_programs_tried": len(results), "code_executed": sum(r["code_executed"] for r in results),
            "hostile_verified": sum(r["exit"] == 0 for r in results),
            "hostile_exit_codes": {r["kind"]: r["exit"] for r in results}, "hostile": results,
            "max_rss_mb": max_rss, "honest_rss_mb": round(honest_rss, 1), "rss_ratio": round(max_rss / honest_rss, 3)}


def _failure(line: str) -> str:
    try:
        report = json.loads(line)
        f = report.get("first_failure") or {}
        return f"{f.get('name')}: {f.get('detail')}"[:200]
    except (ValueError, AttributeError):
        return line[:200]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="100 flips, two modes per item, no deflate bombs")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        work = Path(tmp)
        print(f"building a small honest demo bundle ({args.steps} steps) ...", file=sys.stderr, flush=True)
        demo = F.build_demo(work / "demo", steps=args.steps, checkpoint_every=2)
        result = flips(demo, 100 if args.quick else args.flips, args.seed, work, args.quick)
        kinds = ["guards_code", "sympify", "pickle_member", "pickle_weight"]
        if not args.quick:
            kinds += ["bomb_config", "bomb_weight"]
        result.update(hostile_programs(demo, work, kinds))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
