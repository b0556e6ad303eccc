"""Cut each run into segments between successive checkpoints and replay them, here or in workers.

Workers are separate processes (``python -m gradledger.verify._internal.worker``) that receive
their segments as canonical CBOR on stdin and answer in CBOR on stdout: nothing crosses a
process boundary as a pickle (multiprocessing would pickle), so "never unpickles" holds for the
verifier's own traffic too.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from typing import Any, Callable, Iterable, Sequence

from gradledger.ledger import encoding
from gradledger.ledger.envelope import Sealed

from . import environment
from .replay import ReplayCache, ReplayError, RunContext, Segment, SegmentResult, replay_segment


def plan_segments(observations: Sequence[Sealed]) -> dict[int, list[Segment]]:
    """Per RunStarted seq, its segments in order. Raises ReplayError for a run that cannot be cut."""
    runs: dict[int, list[Segment]] = {}
    run_seq: int | None = None
    branch = False
    last: Sealed | None = None
    pending: list[tuple[int, dict[str, Any]]] = []
    count = 0

    def close_run() -> None:
        if run_seq is not None and pending:
            raise ReplayError(
                f"{len(pending)} updates follow the run's last checkpoint; no checkpoint covers them",
                seq=pending[0][0], step=pending[0][1]["step"],
            )

    for obs in observations:
        if obs.type == "RunStarted":
            close_run()
            run_seq, last, pending = obs.seq, None, []
            branch = "branch" in (obs.body.get("settings") or {})
            runs[run_seq] = []
        elif run_seq is None:
            continue
        elif obs.type == "GovernedUpdate":
            if last is None:
                raise ReplayError("an update precedes the run's first checkpoint", seq=obs.seq, step=obs.body["step"])
            pending.append((obs.seq, obs.body))
        elif obs.type == "Checkpoint":
            if last is not None:
                _check_steps(last, obs, pending, branch)
                runs[run_seq].append(Segment(count, last.seq, last.body, obs.seq, obs.body, pending))
                count += 1
            last, pending = obs, []
    close_run()
    return runs


def _check_steps(start: Sealed, end: Sealed, updates: list[tuple[int, dict[str, Any]]], branch: bool) -> None:
    steps = [u["step"] for _, u in updates]
    a, b = start.body["step"], end.body["step"]
    if branch:
        # An unlearning branch skips steps whose batch lost every example (specs/unlearning.md).
        ok = all(a <= s < b for s in steps) and all(x < y for x, y in zip(steps, steps[1:]))
    else:
        ok = steps == list(range(a, b))
    if not ok:
        seq = updates[0][0] if updates else end.seq
        raise ReplayError(f"the updates between checkpoints of steps {a} and {b} are steps {steps[:8]}...", seq=seq)


Artifacts = Callable[[bytes], "bytes | None"]
Job = tuple[RunContext, Segment]


def run_jobs(
    jobs: Sequence[Job],
    source_path: str,
    artifact: Artifacts,
    *,
    exact: bool,
    workers: int = 1,
    progress: Callable[[SegmentResult], None] | None = None,
) -> list[SegmentResult]:
    """Replay every job; results in job order."""
    if workers <= 1 or len(jobs) <= 1:
        results = []
        cache = ReplayCache()  # this call's own: nothing loaded is reused by another verification
        for ctx, seg in jobs:
            environment.prepare(ctx.environment)
            result = replay_segment(ctx, seg, artifact, exact=exact, cache=cache)
            results.append(result)
            if progress:
                progress(result)
        return results
    return _in_workers(jobs, source_path, exact, min(workers, len(jobs)), progress)


def _shares(jobs: Sequence[Job], n: int) -> list[list[int]]:
    # Longest first onto the least loaded worker: segments differ in length (the last is short).
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1].updates))
    loads, shares = [0] * n, [[] for _ in range(n)]
    for i in order:
        w = loads.index(min(loads))
        shares[w].append(i)
        loads[w] += len(jobs[i][1].updates) + 1
    return shares


def _frame(obj: Any) -> bytes:
    data = encoding.encode(obj)
    return struct.pack(">Q", len(data)) + data


def read_frame(stream: Any) -> Any | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack(">Q", head)
    return encoding.decode(stream.read(size))


def _in_workers(
    jobs: Sequence[Job], source_path: str, exact: bool, n: int, progress: Callable[[SegmentResult], None] | None
) -> list[SegmentResult]:
    results: dict[int, SegmentResult] = {}
    lock = threading.Lock()
    errors: list[str] = []
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")

    def drive(share: list[int]) -> None:
        task = {"source": source_path, "exact": exact, "jobs": [[jobs[i][0].to_obj(), jobs[i][1].to_obj()] for i in share]}
        proc = subprocess.Popen([sys.executable, "-m", "gradledger.verify._internal.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(_frame(task))
        proc.stdin.close()
        got = 0
        while (obj := read_frame(proc.stdout)) is not None:
            result = SegmentResult.from_obj(obj)
            with lock:
                results[share[got]] = result
                if progress:
                    progress(result)
            got += 1
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.wait() != 0 or got != len(share):
            with lock:
                errors.append(err.strip().splitlines()[-1] if err.strip() else f"worker exited {proc.returncode}")

    threads = [threading.Thread(target=drive, args=(share,)) for share in _shares(jobs, n) if share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise ReplayError(f"a replay worker failed: {errors[0]}")
    return [results[i] for i in range(len(jobs))]


def iter_jobs(contexts: dict[int, RunContext], runs: dict[int, list[Segment]], chosen: Iterable[int] | None = None) -> list[Job]:
    jobs = [(contexts[r], seg) for r, segs in runs.items() if r in contexts for seg in segs]
    if chosen is None:
        return jobs
    keep = set(chosen)
    return [job for job in jobs if job[1].index in keep]
