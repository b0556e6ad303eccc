"""The program loader's one error (a failed check: the run's program is not acceptable)."""

from __future__ import annotations

from gradledger.ledger.errors import VerificationError


class ProgramError(VerificationError):
    """The model program is not a safe, loadable export archive (specs/replay.md §2)."""
