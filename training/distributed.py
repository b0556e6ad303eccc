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
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from gradledger.ledger import encoding

from .errors import GovernanceError

__all__ = ["RankGroup", "RankRefused", "divide_gradients", "shard_sizes", "shards"]


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


def shards(indices: Sequence[int], world: int) -> list[list[int]]:
    """A batch's indices cut into its shards (``shard_sizes``), rank 0 first."""
    out, start = [], 0
    for size in shard_sizes(len(indices), world):
        out.append(list(indices[start : start + size]))
        start += size
    return out


def divide_gradients(params: Iterable[Tensor], world: int) -> None:
    """specs/distributed.md §3: the shards' gradients, accumulated in rank order, divided once by ``world``
    (what a one-process replay of a step over ranks does after its last shard's backward)."""
    for p in params:
        if p.grad is not None:
            p.grad.div_(world)


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

    def new_group(self) -> Any:
        """A second process group of the same ranks (every rank calls it at the same point of the run)."""
        import torch.distributed as dist

        return dist.new_group(backend=self.backend)

    def gradient_gather(self, params: Sequence[Tensor], group: Any = None,
                        bucket_elements: int = 1 << 20) -> "GradientGather":
        """A ``GradientGather`` over ``params`` (the run's band parameters, in band order), on ``group``."""
        return GradientGather(self, params, bucket_elements, group)


class GradientGather:
    """specs/distributed.md §3, step 2: every rank's gradients gathered, then summed in rank order and divided by
    ``world`` on every rank.

    Why buckets gathered during backward: the gather is the step's largest cost (about a fifth of a
    5.8M-parameter transformer's step here, measured by bench/ddp.py), and DDP hides its allreduce behind
    backward the same way. The parameters are cut, in reverse band order (roughly the order backward
    reaches them), into buckets of about ``bucket_elements``; a bucket's all-gather starts as soon as
    backward has left a gradient on each of its parameters and every earlier bucket has started, so
    every rank starts the same collectives in the same order. A bucket's size is fixed by its
    parameters' shapes, not by which have a gradient (one without is gathered as zeros, and the caller
    refuses a step where ranks disagree on that), so no rank can make another wait on a mismatched size.
    Nothing is written to a gradient before ``reduce``: a step refused after the gather changes nothing.
    """

    def __init__(self, ranks: RankGroup, params: Sequence[Tensor], bucket_elements: int, group: Any = None) -> None:
        self.ranks = ranks
        #: The gathers' own process group: the step's small exchanges (default group) do not queue behind them.
        self.group = group
        self.buckets: list[list[Tensor]] = []
        current: list[Tensor] = []
        size = 0
        for p in reversed(list(params)):
            if current and (size + p.numel() > bucket_elements or p.dtype != current[0].dtype):
                self.buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel()
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        #: Two gloo ranks: an all-reduce instead of the all-gather. Its one addition per element, g0 + g1 on
        #: rank 0's chunks and g1 + g0 on rank 1's, is the rank-order sum bit for bit (IEEE addition
        #: commutes, signed zeros included), and moves half the bytes with no sum left to do after it.
        #: From three ranks on, or on another backend, the order of the additions is the topology's.
        self.sum_by_allreduce = ranks.world == 2 and ranks.backend == "gloo"
        self._begin()

    def _begin(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._started: list[tuple[Any, list[Tensor]]] = []

    def ready(self, p: Tensor) -> None:
        """Backward left ``p``'s gradient (its post-accumulate-grad hook): start what can start."""
        i = self._bucket_of.get(id(p))
        if i is None:
            return
        self._ready[i] += 1
        while len(self._started) < len(self.buckets) and \
                self._ready[len(self._started)] >= len(self.buckets[len(self._started)]):
            self._start(len(self._started))

    def _start(self, i: int) -> None:
        import torch.distributed as dist

        bucket = self.buckets[i]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        if self.sum_by_allreduce:
            self._started.append((dist.all_reduce(flat, group=self.group, async_op=True), [flat]))
            return
        gathered = [torch.empty_like(flat) for _ in range(self.ranks.world)]
        self._started.append((dist.all_gather(gathered, flat, group=self.group, async_op=True), gathered))

    def reduce(self, has_grad: Sequence[Tensor]) -> None:
        """Start what backward left unstarted, wait for every bucket, and write the reduction into the
        gradients of ``has_grad`` (the parameters with a gradient on every rank)."""
        while len(self._started) < len(self.buckets):
            self._start(len(self._started))
        keep = {id(p) for p in has_grad}
        started, world = self._started, self.ranks.world
        self._begin()
        with torch.no_grad():
            for bucket, (work, gathered) in zip(self.buckets, started):
                work.wait()
                total = gathered[0]
                for other in gathered[1:]:
                    total.add_(other)  # rank order: ((g0 + g1) + g2) + ..., as shards accumulate in replay
                pos = 0
                for p in bucket:
                    n = p.numel()
                    if id(p) in keep:
                        assert p.grad is not None
                        # The division written straight into the gradient: the same elementwise x / world
                        # as replay's grad.div_(world), one pass instead of two.
                        torch.div(total[pos : pos + n].view_as(p.grad), world, out=p.grad)
                    pos += n

    def discard(self) -> None:
        """Wait for what was started (every rank started it) and drop it: a step ended without a reduction."""
        for work, _ in self._started:
            work.wait()
        self._begin()
