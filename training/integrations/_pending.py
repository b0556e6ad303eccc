"""Batches a framework fetches ahead of their turn: the sampler's indices now, the drawn batch later.

HF's Trainer fetches an accumulated step's micro-batches before their forwards and Lightning fetches
the next batch before the current one runs, but a governed run draws a batch only after the previous
one went through backward. So the framework's loader yields ``PendingBatch`` (the indices) and the
integration draws the batch from the run when its forward comes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from ..trainer import Batch, Governance


class PendingBatch:
    """The indices of a batch the sampler chose, and the batch once it is drawn."""

    __slots__ = ("indices", "batch")

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices
        self.batch: Batch | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __contains__(self, key: object) -> bool:
        # HF's Trainer asks `"labels" in batch` to count label tokens; the run's labels are not columns.
        return False


def pending_epoch(run: "Governance") -> Iterator[PendingBatch]:
    """One epoch of the run's loader sampler, as pending batches (it ends when the run closes)."""
    for indices in run.sampler_epoch():
        yield PendingBatch(indices)
