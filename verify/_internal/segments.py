"""Cut each run into segments between successive checkpoints and replay them in workers.

Every replay runs in a worker, behind the sandbox of specs/replay.md §7 unless ``--no-sandbox``:
a flaw in the program loader is then not a compromise of the machine. Workers are separate
processes (``python -m gradledger.verify._internal.worker``) that receive their segments as
canonical CBOR on stdin, ask for artifacts and answer in CBOR on stdout (specs/replay.md §6):
nothing crosses a process boundary as a pickle (multiprocessing would pickle), so "never
unpickles" holds for the verifier's own traffic too. What a worker sends is read as hostile.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

from gradledger.ledger.envelope import Sealed
from gradledger.ledger.errors import UnusableInput

from .attribution import Probe
from .replay import ReplayError, RunContext, Segment, SegmentResult
from .pool import WorkerPool, start_worker, worker_command
from .sandbox import EXIT_NO_SANDBOX, SandboxSpec
from .sources import open_source
from .worker import MAX_ARTIFACT, FrameError, artifact_reply, frame, read_frame


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

#: How much of a worker's stderr the verifier keeps (its tail names why it died).
STDERR_TAIL = 16 << 10
#: How long a worker that closed its output has to exit before it is killed.
EXIT_GRACE_SECONDS = 60


class SandboxUnavailable(UnusableInput):
    """The replay sandbox cannot be set up on this machine: the verifier is unusable (exit 2)."""


def run_jobs(
    jobs: Sequence[Job],
    source_path: str,
    artifact: Artifacts | None = None,
    *,
    exact: bool,
    workers: int = 1,
    progress: Callable[[SegmentResult], None] | None = None,
    sandbox: SandboxSpec = SandboxSpec(),
    pool: WorkerPool | None = None,
    probes: Mapping[int, Sequence[Probe]] | None = None,
) -> list[SegmentResult]:
    """Replay every job in worker processes (at least one, also for ``workers=1``); results in job order.

    Workers run behind ``sandbox`` (specs/replay.md §7) and never open the bundle: they ask this
    process for each artifact, and get only those their segments name, read with ``artifact``
    (None: from the source at ``source_path``). A worker that dies or answers out of turn fails
    replay naming the first segment it left unanswered (ReplayError); a sandbox that cannot be set
    up raises SandboxUnavailable. Workers already started in ``pool`` (behind the same sandbox) are
    used first. ``probes``: by position in ``jobs``, the recorded traces that job also recomputes.
    """
    if not jobs:
        return []
    n = max(1, min(workers, len(jobs)))
    probes = probes or {}
    if artifact is not None:
        return _in_workers(jobs, artifact, exact, n, progress, sandbox, pool, probes)
    source = open_source(source_path)
    try:
        return _in_workers(jobs, source.artifact, exact, n, progress, sandbox, pool, probes)
    finally:
        source.close()


def _shares(jobs: Sequence[Job], n: int) -> list[list[int]]:
    # Longest first onto the least loaded worker: segments differ in length (the last is short).
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1].updates))
    loads, shares = [0] * n, [[] for _ in range(n)]
    for i in order:
        w = loads.index(min(loads))
        shares[w].append(i)
        loads[w] += len(jobs[i][1].updates) + 1
    return shares


def named_artifacts(ctx: RunContext, seg: Segment, probes: Sequence[Probe] = ()) -> list[Any]:
    return [ctx.program, ctx.inputs, seg.start.get("artifact"), seg.end.get("artifact"),
            *(p.query.get("file") for p in probes), *([ctx.held_out["inputs"]] if ctx.held_out and ctx.held_out["inputs"] else [])]


def _in_workers(
    jobs: Sequence[Job], artifact: Artifacts, exact: bool, n: int, progress: Callable[[SegmentResult], None] | None,
    spec: SandboxSpec, pool: WorkerPool | None, probes: Mapping[int, Sequence[Probe]],
) -> list[SegmentResult]:
    results: dict[int, SegmentResult] = {}
    lock = threading.Lock()
    #: (position in jobs of the first unanswered segment, why) per failed worker.
    failures: list[tuple[int, str]] = []
    unavailable: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    command = worker_command(spec)  # looked up here: a test may replace it
    source_lock = threading.Lock()  # one artifact read at a time: a source is not shared across threads

    def drive(share: list[int]) -> None:
        task = {"exact": exact, "jobs": [[jobs[i][0].to_obj(), jobs[i][1].to_obj(),
                                          [p.to_obj() for p in probes.get(i, ())]] for i in share]}
        # The only artifacts this worker is given: those its segments name (program, inputs, checkpoints)
        # and its probes' query files.
        named = {d for i in share for d in named_artifacts(*jobs[i], probes.get(i, ())) if isinstance(d, bytes)}
        with lock:
            started = pool.take(spec) if pool is not None else None
        proc = started or start_worker(spec, command)
        with lock:
            procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        tail = bytearray()
        drain = threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True)
        drain.start()
        got, problem, confined, ended = 0, None, False, False
        try:
            try:
                proc.stdin.write(frame(task))
                proc.stdin.flush()
            except OSError:
                pass  # the worker is gone: what it said (stderr, exit status) tells why
            hello = read_frame(proc.stdout)
            if hello is None:
                problem, ended = "it answered nothing", True
            elif hello != {"sandbox": spec.description}:
                problem = f"it did not confirm its sandbox ({spec.description})"
            else:
                confined = True
                while got < len(share):
                    obj = read_frame(proc.stdout)
                    if obj is None:
                        problem, ended = "it stopped answering", True
                        break
                    if isinstance(obj, dict) and set(obj) == {"artifact"}:
                        digest = obj["artifact"]
                        if not isinstance(digest, bytes) or digest not in named:
                            problem = "it asked for an artifact its segments do not name"
                            break
                        with source_lock:
                            data = artifact(digest)
                        if data is not None and len(data) > MAX_ARTIFACT:  # a ledger source has no bound of its own
                            problem = (f"it asked for artifact {digest.hex()[:16]}, of {len(data)} bytes, above the "
                                       f"{MAX_ARTIFACT} bytes a worker is served")
                            break
                        try:  # raw bytes after a size frame: artifacts are never CBOR items (§6)
                            for piece in artifact_reply(data):
                                proc.stdin.write(piece)
                            proc.stdin.flush()
                        except OSError:
                            pass  # gone: the next read says so
                        continue
                    result = check_result(obj, jobs[share[got]][1])
                    with lock:
                        results[share[got]] = result
                        if progress:
                            progress(result)
                    got += 1
                if problem is None:
                    proc.stdin.close()
                    if read_frame(proc.stdout) is not None:
                        problem = "it answered more than it was asked"
        except (FrameError, ValueError, TypeError, KeyError) as exc:
            problem = f"its answer is malformed ({exc})"
        except Exception as exc:  # noqa: BLE001 - a broken pipe, an artifact the source cannot read
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None and not ended:
            proc.kill()  # it broke the protocol: no second chance
        try:
            code = proc.wait(timeout=EXIT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:  # it closed its output but does not exit
            proc.kill()
            code = proc.wait()
        drain.join()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        if problem is None and code == 0:
            return
        last = _last_line(bytes(tail))
        with lock:
            if code == EXIT_NO_SANDBOX and not confined and last.startswith("sandbox: "):
                unavailable.append(last[len("sandbox: "):])
            else:
                why = _death(code, spec) + (f" ({problem})" if problem else "") + (f": {last}" if last else "")
                failures.append((share[got] if got < len(share) else share[-1], why))

    threads = [threading.Thread(target=drive, args=(share,)) for share in _shares(jobs, n) if share]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if unavailable:
        raise SandboxUnavailable(f"the replay sandbox cannot be set up on this machine: {unavailable[0]}; "
                                 "--no-sandbox replays without it (only for bundles you trust)")
    if failures:
        position, why = min(failures)
        seg = jobs[position][1]
        first_seq, first_step = seg.updates[0] if seg.updates else (seg.end_seq, {"step": seg.end.get("step")})
        raise ReplayError(f"segment {seg.index} (from the checkpoint at observation {seg.start_seq}): the replay "
                          f"worker {why}; the segment was not replayed", seq=first_seq, step=first_step.get("step"))
    return [results[i] for i in range(len(jobs))]


def check_result(obj: Any, seg: Segment) -> SegmentResult:
    """A worker's answer for ``seg``, checked for shape (it comes from behind the sandbox)."""
    if not isinstance(obj, dict) or set(obj) != set(SegmentResult.__dataclass_fields__):
        raise ValueError("not a segment result")
    result = SegmentResult.from_obj(obj)
    if result.index != seg.index or type(result.ok) is not bool or type(result.steps) is not int:
        raise ValueError(f"an answer for segment {result.index!r} where {seg.index} was due")
    return result


def _drain(stream: Any, tail: bytearray) -> None:
    while chunk := stream.read(1 << 16):
        tail += chunk
        del tail[:-STDERR_TAIL]


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        return ""
    line = "".join(c if c.isprintable() else "?" for c in lines[-1].strip())
    return line[:300]


def _death(code: int, spec: SandboxSpec) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = f", perhaps at the --max-memory limit of {spec.max_memory_mib} MiB" if spec.enabled else ""
        return f"was killed by {name}{extra}"
    if code == 0:
        return "exited"
    return f"exited with status {code}"


def iter_jobs(contexts: dict[int, RunContext], runs: dict[int, list[Segment]], chosen: Iterable[int] | None = None) -> list[Job]:
    jobs = [(contexts[r], seg) for r, segs in runs.items() if r in contexts for seg in segs]
    if chosen is None:
        return jobs
    keep = set(chosen)
    return [job for job in jobs if job[1].index in keep]
