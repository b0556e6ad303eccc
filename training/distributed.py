"""Governed training over torch.distributed ranks (specs/distributed.md).

A governed step of a run of ``world`` ranks trains one batch of the run's order, cut into ``world``
shards in rank order; each rank trains its shard (forward and backward, the run's seed for shard
``r`` being the micro-batch seed ``micro_seed(seed, step, r)``), and the gradient the optimizer steps
with is the ranks' gradients **summed in rank order, then divided by ``world``**. Every rank
computes that same reduction from an all-gather of the others' gradients, so every rank holds the
same bits; and a replay on one process reproduces them by training the shards one after the other
into the same gradients (autograd adds each shard's gradient to the sum so far, in rank order) and
dividing once. torch's DistributedDataParallel is not used for that: gloo's allreduce gives the same
bits on every rank, but not those of a sequential sum, and which rank holds which shard changes
them (measured at 4 ranks), so a single-process replay could not confirm a DDP run bit for bit.

One writer: rank 0 appends to the ledger; the other ranks read it (the policy, the dataset) and never
write. Everything a step decides is decided on every rank from the same exchanged facts, so a step
that one rank refuses is refused on every rank, with that rank's reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from gradledger.ledger import encoding

from .errors import GovernanceError

__all__ = ["RankGroup", "RankRefused", "shard_sizes"]


class RankRefused(GovernanceError):
    """A rank refused what every rank must do together; every rank raises it, naming that rank."""


def shard_sizes(batch: int, world: int) -> list[int]:
    """The sizes of a batch's shards, rank 0 first: as even as can be, the first ``batch % world`` ranks
    one larger (specs/distributed.md §2). Every shard holds at least one example."""
    if batch < world:
        raise GovernanceError(f"a batch of {batch} examples cannot be cut into {world} non-empty shards, one per "
                              "rank; use a batch size of at least one example per rank")
    q, r = divmod(batch, world)
    return [q + 1 if i < r else q for i in range(world)]


@dataclass(frozen=True)
class RankGroup:
    """This process's place in a torch.distributed run: its rank, the world size and the backend."""

    rank: int
    world: int
    backend: str

    @classmethod
    def current(cls) -> "RankGroup | None":
        """The default process group when one is initialized with more than one rank, else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))

    @property
    def writer(self) -> bool:
        """Rank 0 alone appends to the ledger."""
        return self.rank == 0

    def settings(self) -> dict[str, Any]:
        """RunStarted ``settings.distributed`` (format 7)."""
        return {"world": self.world, "backend": self.backend}

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's shard of a batch."""
        sizes = shard_sizes(len(indices), self.world)
        start = sum(sizes[: self.rank])
        return list(indices[start : start + sizes[self.rank]])

    # -- collectives: every rank calls each one, in the same order ----------------------------------

    def exchange(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (all_gather_object: between this run's own processes)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, why: str | None, what: str) -> None:
        """Raise ``RankRefused`` on every rank if any rank gives a reason (``why``) not to go on with ``what``."""
        self.verdict(self.exchange(why), what)

    def verdict(self, reasons: Sequence[str | None], what: str) -> None:
        """``agree`` over reasons already exchanged (one per rank, in rank order)."""
        for r, reason in enumerate(reasons):
            if reason is not None:
                mine = " (this rank)" if r == self.rank else ""
                raise RankRefused(f"{what}: rank {r}{mine} refused: {reason}")

    def same(self, value: Any, what: str) -> None:
        """Refuse on every rank unless every rank holds the same ``value`` (compared as canonical CBOR)."""
        digest = hashlib.sha256(encoding.encode(value)).hexdigest()
        digests = self.exchange(digest)
        for r, d in enumerate(digests):
            if d != digests[0]:
                raise RankRefused(f"{what}: rank {r} differs from rank 0; every rank must run the same run "
                                  "(same model, optimizer, loader batch size, seed, policy, dataset)")

    def broadcast_state(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (as DDP does at construction): every rank starts
        from the state rank 0 records at step 0."""
        import torch.distributed as dist

        state = model.state_dict(keep_vars=True)
        self.same([[n, list(t.shape), str(t.dtype)] for n, t in state.items()], "the model's state")
        with torch.no_grad():
            for t in state.values():
                dist.broadcast(t.data, src=0)

    def reduce_gradients(self, params: Sequence[Tensor]) -> None:
        """specs/distributed.md §3: every rank's gradients gathered, summed in rank order, divided by
        ``world``; written back into each parameter's ``.grad`` on every rank.

        ``params`` have a gradient on every rank (the caller agreed on that first). The sum is done on one
        flat buffer per dtype, element by element as autograd's accumulation does it per parameter.
        """
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            assert p.grad is not None
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])  # type: ignore[union-attr]
            gathered = [torch.empty_like(flat) for _ in range(self.world)]
            dist.all_gather(gathered, flat)
            total = gathered[0]
            for other in gathered[1:]:
                total.add_(other)  # rank order: ((g0 + g1) + g2) + ..., as shards accumulate in replay
            total.div_(self.world)
            pos = 0
            with torch.no_grad():
                for p in group:
                    n = p.grad.numel()  # type: ignore[union-attr]
                    p.grad.copy_(total[pos : pos + n].view_as(p.grad))  # type: ignore[union-attr]
                    pos += n
