"""Where the verifier reads records and artifacts from: an exported bundle, or a ledger directory."""

from __future__ import annotations

import os
from typing import Iterator, Protocol

from gradledger.ledger.errors import UnusableInput


class Source(Protocol):
    def records(self) -> Iterator[tuple[int, bytes]]: ...

    def artifact(self, digest: bytes) -> bytes | None: ...

    def close(self) -> None: ...


class LedgerSource:
    """A ledger directory opened read-only (what a trainer's own auditor may point at)."""

    def __init__(self, path: str) -> None:
        from gradledger.ledger.ledger import Ledger

        self.ledger = Ledger.open(path)

    def records(self) -> Iterator[tuple[int, bytes]]:
        return self.ledger.records()

    def artifact(self, digest: bytes) -> bytes | None:
        from gradledger.ledger.bundle import MAX_ARTIFACT_SIZE

        # The bound a bundle puts on each artifact; an artifact stored in parts is refused above it
        # before any part is read.
        return self.ledger.artifact(digest, limit=MAX_ARTIFACT_SIZE)

    def close(self) -> None:
        self.ledger.close()


def open_source(path: str | os.PathLike[str]) -> Source:
    path = os.fspath(path)
    if os.path.isdir(path):
        return LedgerSource(path)
    if not os.path.exists(path):
        raise UnusableInput(f"{path}: no such bundle")
    from gradledger.ledger.bundle import Bundle

    return Bundle.open(path)
