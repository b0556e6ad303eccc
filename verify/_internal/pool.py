"""Replay workers started before the verifier needs them (``gradledger-verify``'s first act).

Why: a worker's start is mostly imports (Python, torch, and the dynamo machinery torch's optimizers
pull in on their first use): about 4 s here, paid before its first replayed step. The verifier's
own start (its imports, the structural checks) takes a few seconds too. Starting the workers first
lets both happen at once, on different cores; a worker warms up behind its sandbox and only then
reads its task (worker.py). Nothing about what a worker may do changes: it is the same command,
sandbox and protocol (specs/replay.md §6-7), started earlier.

This module imports no torch: the command line starts the pool before it imports the verifier.
"""

from __future__ import annotations

import subprocess
import sys

from .sandbox import SandboxSpec, worker_env

__all__ = ["WorkerPool", "start_worker", "worker_command"]


def worker_command(spec: SandboxSpec) -> list[str]:
    return [sys.executable, "-m", "gradledger.verify._internal.worker", *spec.worker_args()]


def start_worker(spec: SandboxSpec, command: list[str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command or worker_command(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=worker_env())


class WorkerPool:
    """``count`` workers started now, behind ``spec``; ``take()`` hands each out once; ``close()`` kills
    those never taken."""

    def __init__(self, spec: SandboxSpec, count: int) -> None:
        self.spec = spec
        self._idle: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(max(0, count)):
                self._idle.append(start_worker(spec))
        except OSError:
            pass  # fewer workers ahead of time: the verifier starts the rest when it needs them

    def take(self, spec: SandboxSpec) -> subprocess.Popen[bytes] | None:
        """A started worker behind ``spec`` (None when none is left, or the pool's sandbox differs)."""
        if spec != self.spec or not self._idle:
            return None
        return self._idle.pop(0)

    def close(self) -> None:
        """End every worker never taken: it holds nothing of the verification, so it is killed at once
        (a sandboxed one, left without input, exits when it reads its task)."""
        idle, self._idle = self._idle, []
        for proc in idle:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
