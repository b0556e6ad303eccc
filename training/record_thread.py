"""The run's recorder thread: builds, signs and appends each GovernedUpdate off the step's critical path.

Why: a governed step's fixed cost (building the record, canonical CBOR, Ed25519 signing, and the
ledger's own admission check, which re-checks the record as a verifier would) is Python work that
small models pay for on every step. None of it can refuse the step (everything that can is checked
in the optimizer's pre-step hook, before the optimizer steps), so it can run behind the loop: the
trainer hands over plain Python values and goes on with the next step while this thread appends.

What keeps the commit discipline (specs/training.md §1):

- one thread, one FIFO queue: records are appended in the order they were submitted (step order),
  and the trainer drains the queue before it appends a Checkpoint, so each GovernedUpdate precedes
  its Checkpoint and the checkpoint's tree head commits exactly the steps before it;
- nothing is committed here: the ledger is in ``deferred()`` mode, so only the trainer's tree
  head at a checkpoint commits, after ``drain()``; a crash loses only uncommitted steps;
- the first failure (the ledger refusing an append, say) stops the thread from appending
  anything more; it is kept and raised by ``check()`` (the next ``optimizer.step()``), ``drain()``
  (a checkpoint) or ``close()``, never lost.
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
        self._error: BaseException | None = None
        self._failed_at: str | None = None
        self._discard = False
        # The ledger stops (joins) this thread before it discards or commits at close: a loop that dies
        # with the ledger's own ``with`` block must not have a record appended after the discard.
        self._detach = ledger.attach_appender(self.close)
        self._thread = threading.Thread(target=self._work, name="gradledger-recorder", daemon=True)
        self._thread.start()

    def submit(self, what: str, type_name: str, build: Callable[[], dict[str, Any]]) -> None:
        """Queue one record: ``build()`` gives its body (run on the thread); ``what`` names it in errors."""
        self.check()
        self._jobs.put((what, type_name, build))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                if self._error is not None or self._discard:
                    continue  # after a failure (or a discard) nothing more is appended
                what, type_name, build = job
                try:
                    self.ledger.append(type_name, build(), self.key)
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
        """Stop and join the thread; records still queued are appended first unless ``discard``. Does not
        raise (a failure stays for ``check()``)."""
        if discard:
            self._discard = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._jobs.put(_STOP)
            self._thread.join()
        self._detach()
