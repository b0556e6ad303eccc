"""Replay on a Ray cluster (``gradledger-verify --engine ray``; specs/replay.md §8).

Each segment is one Ray task. The task runs on a cluster node the same thing local replay runs on
this machine: ``segments.run_jobs`` for that one segment, which starts the confined worker there
(``python -m gradledger.verify._internal.worker``, behind the sandbox of §7) and serves it the
artifacts it asks for, from the ones the driver sent. What comes back is one canonical CBOR byte
string, decoded here under a size bound and checked exactly as a local worker's answer is
(``segments.check_result``): a node is trusted no more than a worker.

Why a worker behind its sandbox on the node, and not the replay in the Ray worker itself: a Ray
worker is a long-lived process that runs whatever tasks the cluster gives it; the program loader
reads hostile bytes and must not share a process (or its filesystem and network) with it.

What crosses Ray's own serialization (which pickles) is only what this module creates: the
task's CBOR bytes and raw artifact byte strings going out, one CBOR byte string coming back. No
bundle byte is ever unpickled: a ``bytes`` object pickles as its contents, and the pickle stream
around it is written by the verifier, not read from the bundle. The cluster itself (its nodes and
their Ray installation) is the verifier's own, as the machine it runs on is.

Ray is an optional extra (``pip install 'gradledger[ray]'``); without it ``--engine ray`` is
unusable input (exit 2), never a fallback to local replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from gradledger.ledger import encoding
from gradledger.ledger.errors import UnusableInput

from .attribution import Probe
from .replay import ReplayError, RunContext, Segment, SegmentResult
from .sandbox import SandboxSpec
from .segments import Artifacts, Job, SandboxUnavailable, check_result, named_artifacts, run_jobs
from .worker import MAX_ARTIFACT, MAX_RESULT_FRAME

__all__ = ["RayCluster", "require_ray", "run_jobs_ray", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'gradledger[ray]'"


def require_ray() -> Any:
    """The ``ray`` module, or UnusableInput (exit 2) saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise UnusableInput(f"--engine ray needs Ray, which cannot be imported ({exc}): {INSTALL_HINT}") from None
    return ray


@dataclass
class RayCluster:
    """A connection to a Ray cluster for the length of one verification.

    ``address`` None starts a local cluster of ``workers`` CPUs; ``"auto"`` or ``HOST:PORT`` joins a
    running one. Where this process is already connected (a test, a notebook), that connection is
    used and left open; a connection made here is closed by ``close``.
    """

    address: str | None = None
    workers: int = 1
    startup_seconds: float = 0.0
    nodes: int = 0
    _owned: bool = False

    def open(self) -> "RayCluster":
        import logging

        ray = require_ray()
        started = time.perf_counter()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.ERROR}
            if self.address is None:
                kwargs["num_cpus"] = self.workers
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the cluster is not reachable
                where = "a local Ray cluster" if self.address is None else f"the Ray cluster at {self.address}"
                raise UnusableInput(f"cannot start or reach {where}: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
            self._owned = True
        self.startup_seconds = time.perf_counter() - started
        self.nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        return self

    def close(self) -> None:
        if self._owned:
            require_ray().shutdown()
            self._owned = False

    def __enter__(self) -> "RayCluster":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- on a node ---------------------------------------------------------------------------------


def segment_task(task: bytes, digests: list[bytes], *blobs: bytes) -> bytes:
    """One segment, replayed on the node that runs this task; its outcome as canonical CBOR.

    ``task``: the CBOR the driver made (``_task``); ``blobs``: the artifacts named by ``digests``, in
    that order (Ray hands them over as the byte strings the driver put). The worker is served only
    these, each checked against its name here before it is served (the driver read them, but a
    store the node's object transfer went through is not the verifier).
    """
    import hashlib

    obj = encoding.decode(task, max_size=len(task))
    exact, spec = obj["exact"], SandboxSpec(obj["sandbox"][0], obj["sandbox"][1])
    ctx_obj, seg_obj, probe_objs = obj["job"]
    job = (RunContext.from_obj(ctx_obj), Segment.from_obj(seg_obj))
    served = dict(zip(digests, blobs))

    def artifact(digest: bytes) -> bytes | None:
        data = served.get(digest)
        if data is None or hashlib.sha256(data).digest() != digest:
            return None
        return data

    try:
        [result] = run_jobs([job], "", artifact, exact=exact, workers=1, sandbox=spec,
                            probes={0: [Probe.from_obj(p) for p in probe_objs]})
    except SandboxUnavailable as exc:
        return encoding.encode({"unavailable": str(exc)})
    except ReplayError as exc:
        return encoding.encode({"failed": [str(exc.args[0]), exc.seq, exc.step]})
    return encoding.encode({"result": result.to_obj()})


# -- on the driver -----------------------------------------------------------------------------


def _task(job: Job, probes: Sequence[Probe], exact: bool, spec: SandboxSpec) -> bytes:
    ctx, seg = job
    return encoding.encode({"exact": exact, "sandbox": [spec.enabled, spec.max_memory_mib],
                            "job": [ctx.to_obj(), seg.to_obj(), [p.to_obj() for p in probes]]})


def run_jobs_ray(
    jobs: Sequence[Job],
    artifact: Artifacts,
    cluster: RayCluster,
    *,
    exact: bool,
    workers: int = 1,
    progress: Callable[[SegmentResult], None] | None = None,
    sandbox: SandboxSpec = SandboxSpec(),
    probes: Mapping[int, Sequence[Probe]] | None = None,
) -> list[SegmentResult]:
    """Replay every job as a Ray task on ``cluster``, at most ``workers`` at a time; results in job order.

    Fails as local replay fails (``segments.run_jobs``): ReplayError naming the first segment that
    was not replayed, SandboxUnavailable (exit 2) where a node cannot confine its worker. A task that
    Ray itself loses (a node dies) fails replay naming its segment: a check that did not run is
    never passed over.
    """
    ray = require_ray()
    probes = probes or {}
    remote = ray.remote(segment_task).options(num_cpus=1, max_retries=0)
    # Each artifact is read from the source and put in the object store once: every segment of a
    # run names the same program and inputs, and neighbours share a checkpoint.
    refs: dict[bytes, Any] = {}
    pending: dict[Any, int] = {}
    results: dict[int, SegmentResult] = {}
    failures: list[tuple[int, str]] = []
    unavailable: list[str] = []
    queue = list(range(len(jobs)))

    def submit(i: int) -> None:
        digests = sorted({d for d in named_artifacts(*jobs[i], probes.get(i, ())) if isinstance(d, bytes)})
        for d in digests:
            if d not in refs:
                data = artifact(d)
                if data is not None and len(data) > MAX_ARTIFACT:
                    raise ReplayError(f"artifact {d.hex()[:16]}, of {len(data)} bytes, is above the {MAX_ARTIFACT} "
                                      "bytes a worker is served", seq=jobs[i][1].start_seq)
                # An absent artifact is served as absent: the worker fails its segment naming it.
                refs[d] = ray.put(data if data is not None else b"")
        task = _task(jobs[i], probes.get(i, ()), exact, sandbox)
        pending[remote.remote(task, digests, *(refs[d] for d in digests))] = i

    while queue or pending:
        while queue and len(pending) < max(1, workers):
            submit(queue.pop(0))
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            outcome = _outcome(ray, ref, jobs[i][1])
            if isinstance(outcome, SegmentResult):
                results[i] = outcome
                if progress:
                    progress(outcome)
            elif outcome[0] == "unavailable":
                unavailable.append(outcome[1])
            else:
                failures.append((i, outcome[1]))
    if unavailable:
        raise SandboxUnavailable(unavailable[0])
    if failures:
        i, message = min(failures)
        seg = jobs[i][1]
        first_seq, first = seg.updates[0] if seg.updates else (seg.end_seq, {"step": seg.end.get("step")})
        raise ReplayError(message, seq=first_seq, step=first.get("step"))
    return [results[i] for i in range(len(jobs))]


def _outcome(ray: Any, ref: Any, seg: Segment) -> SegmentResult | tuple[str, str]:
    """A task's answer, checked as a worker's is: a SegmentResult, or (``"unavailable"`` | ``"failed"``, why)."""
    where = f"segment {seg.index} (from the checkpoint at observation {seg.start_seq})"
    try:
        data = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - a lost node, a killed Ray worker: the segment did not run
        line = (str(exc).strip().splitlines() or [""])[-1][:300]
        return "failed", f"{where}: the Ray task failed ({type(exc).__name__}: {line}); the segment was not replayed"
    try:
        if type(data) is not bytes or len(data) > MAX_RESULT_FRAME:
            raise ValueError("not a CBOR byte string within the bound of a worker's answer")
        obj = encoding.decode(data, max_size=MAX_RESULT_FRAME)
        if not isinstance(obj, dict) or len(obj) != 1:
            raise ValueError("not an outcome")
        [(kind, value)] = obj.items()
        if kind == "result":
            return check_result(value, seg)
        if kind == "unavailable" and isinstance(value, str):
            return "unavailable", value
        if kind == "failed" and isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
            return "failed", value[0]
        raise ValueError(f"an outcome of kind {kind!r}")
    except Exception as exc:  # noqa: BLE001 - whatever it is, the answer is malformed
        return "failed", f"{where}: the Ray task's answer is malformed ({exc}); the segment was not replayed"
