"""The run's recorder thread: builds, signs and appends each GovernedUpdate off the step's critical path.

Why: a governed step's fixed cost (building the record, canonical CBOR, Ed25519 signing, and the
ledger's own admission check, which re-checks the record as a verifier would) is Python work that
small models pay for on every step. None of it can refuse the step (everything that can is checked
in the optimizer's pre-step hook, before the optimizer steps), so it can run behind the loop: the
trainer hands over plain Python values and goes on with the next step while this thread appends.

What keeps the commit discipline (specs/training.md §1):

- one thread, one FIFO queue: records are appended in the order they were submitted (step order).
  A checkpoint is a job on the same queue (``submit_commit``: digest and store the state copy the
  trainer made, append the Checkpoint, commit with a tree head), so each GovernedUpdate precedes
  its Checkpoint and the checkpoint's tree head commits exactly the steps before it;
- nothing is committed but by a checkpoint job: the ledger is in ``deferred()`` mode; a crash
  (the process killed) loses only uncommitted steps, the log ends at a checkpoint;
- a loop that fails (``close(discard=True)``) still gets the checkpoints it had reached: the
  jobs up to the last queued checkpoint run, those after it are dropped (and the ledger discards
  what they would have left uncommitted);
- the first failure (the ledger refusing an append, say) stops the thread from appending
  anything more; it is kept and raised by ``check()`` (the next ``optimizer.step()``), ``drain()``
  or ``close()``, never lost.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from .errors import GovernanceError

__all__ = ["RecordWriter", "RecordingFailed"]


class RecordingFailed(GovernanceError):
    """The recorder thread could not append a step's record; the run records nothing more."""


_STOP = object()


class RecordWriter:
    """A daemon thread that appends ``(type, build())`` to ``ledger`` in submission order."""

    def __init__(self, ledger: Ledger, key: SigningKey) -> None:
        self.ledger, self.key = ledger, key
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._failed_at: str | None = None
        self._discard = False
        self._commits = 0  # checkpoint jobs queued and not yet run (a discard keeps those)
        # The ledger stops (joins) this thread before it discards or commits at close: a loop that dies
        # with the ledger's own ``with`` block must not have a record appended after the discard.
        self._detach = ledger.attach_appender(self.close)
        self._thread = threading.Thread(target=self._work, name="gradledger-recorder", daemon=True)
        self._thread.start()

    def submit(self, what: str, type_name: str, build: Callable[[], dict[str, Any]]) -> None:
        """Queue one record: ``build()`` gives its body (run on the thread); ``what`` names it in errors."""
        ledger, key = self.ledger, self.key
        self.submit_call(what, lambda: ledger.append(type_name, build(), key))

    def submit_call(self, what: str, run: Callable[[], None], cancel: Callable[[], None] | None = None) -> None:
        """Queue a job that appends without committing: run on the thread after every job before it.
        ``cancel`` is called instead of ``run`` if the job is skipped (after a failure or a discard)."""
        self.check()
        self._jobs.put((what, False, run, cancel))

    def submit_commit(self, what: str, run: Callable[[], None], cancel: Callable[[], None] | None = None) -> None:
        """Queue a job that appends and commits (a checkpoint): run on the thread after every job before
        it; ``cancel`` as for ``submit_call``."""
        self.check()
        with self._lock:
            self._commits += 1
        self._jobs.put((what, True, run, cancel))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                what, commits, run, cancel = job
                with self._lock:
                    # After a failure nothing more is appended; after a discard only what leads to, and
                    # includes, the last queued commit.
                    skip = self._error is not None or (self._discard and self._commits == 0)
                    if commits:
                        self._commits -= 1
                if skip:
                    if cancel is not None:
                        cancel()  # whoever waits on this job must not wait for ever
                    continue
                try:
                    run()
                except BaseException as exc:  # kept for the trainer's thread: it must reach the user
                    self._error, self._failed_at = exc, what
            finally:
                self._jobs.task_done()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def check(self) -> None:
        """Raise the recorder's failure, if any (RecordingFailed, caused by the original error)."""
        if self._error is not None:
            raise RecordingFailed(f"recording {self._failed_at} failed: {self._error!r}; the run records nothing "
                                  "more and its committed log ends at its last checkpoint") from self._error

    def drain(self) -> None:
        """Wait until every submitted record is appended (or the thread failed), then ``check()``."""
        self._jobs.join()
        self.check()

    def close(self, discard: bool = False) -> None:
        """Stop and join the thread; jobs still queued run first (with ``discard``, only up to the last
        queued commit). Does not raise (a failure stays for ``check()``)."""
        if discard:
            self._discard = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._jobs.put(_STOP)
            self._thread.join()
        self._detach()
