"""Memorization scores from a run's recorded per-example losses (specs/dynamics.md §1).

The score is LT-IQR (Pollock, Shilov et al. 2024): the interquartile range of an example's loss trace,
the binary32 losses format 4 records for it at every step that trained it. An example the model fits
late and then holds near zero, or one it swings on, has a wide trace; an example learned early and
kept, a narrow one. Its authors found it ahead of the mean and final loss on CIFAR-10 (0.92 precision
at the top 1% against LiRA). bench/dynamics.py measures the candidates on digits with 16 LiRA shadow
models: there the mean recorded loss did as well or better (0.61 against 0.56 averaged over 17 models
as targets, steps of 1/9), the final loss worst. The mean needs an exactly rounded sum to be
recomputed bit for bit by a second implementation; it is the candidate for a second method.

Every value is a binary64 operation on binary64 copies of the recorded binary32 values, in the order
§1.2 writes, so that the verifier's twin (verify/_internal/scans.py) gets the same bits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..errors import GovernanceError

__all__ = ["METHOD", "MemorizationScan", "LossTraces", "flag", "lt_iqr", "scores_digest"]

#: The one method of format 1 (§1.1).
METHOD = "lt-iqr"
#: §1.2: the canonical quiet NaN that stands for "no score" in ``scores_digest``.
NO_SCORE_BITS = 0x7FF8000000000000
#: §1.1: bounds on the parameters (a trace shorter than 2 has no spread; 2**20 bounds the work).
MAX_MIN_TRACE = 1 << 20


@dataclass(frozen=True)
class MemorizationScan:
    """What a scan flags: the top ``fraction`` of the scored examples by LT-IQR, an example being scored
    once its trace holds at least ``min_trace`` losses (§1.1)."""

    fraction: float = 0.01
    min_trace: int = 4

    def __post_init__(self) -> None:
        if type(self.fraction) is not float or not 0.0 < self.fraction <= 1.0:
            raise GovernanceError(f"MemorizationScan.fraction must be a float in (0, 1], got {self.fraction!r}")
        if type(self.min_trace) is not int or not 2 <= self.min_trace <= MAX_MIN_TRACE:
            raise GovernanceError(f"MemorizationScan.min_trace must be an int in [2, {MAX_MIN_TRACE}], "
                                  f"got {self.min_trace!r}")

    @property
    def parameters(self) -> dict[str, float | int]:
        return {"fraction": self.fraction, "min_trace": self.min_trace}


class LossTraces:
    """Every example's recorded losses so far: appended step by step (the run's own, or read back from
    the ledger), scored on demand. Holds each step's indices and values as they came, so that appending
    is cheap on the training thread and the sorting happens at scan time."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._index_dtype = torch.int32 if count < 1 << 31 else torch.int64
        self._indices: list[Tensor] = []
        self._values: list[Tensor] = []

    def add(self, indices: Sequence[int] | Tensor, values: Sequence[float] | Tensor) -> None:
        # Held as recorded, binary32 (8 bytes an entry with an int32 index): a run's whole history
        # stays in memory between checkpoints; scores() widens to binary64, exactly (§1.2).
        index = torch.as_tensor(indices, dtype=self._index_dtype).reshape(-1)
        value = torch.as_tensor(values).detach().reshape(-1).to(torch.float32)
        if index.numel() != value.numel():
            raise GovernanceError(f"{index.numel()} indices but {value.numel()} losses")
        self._indices.append(index)
        self._values.append(value)

    def copy(self) -> "LossTraces":
        """The traces as they stand (the tensors are shared: they are never changed in place)."""
        out = LossTraces(self.count)
        out._indices, out._values = list(self._indices), list(self._values)
        out._index_dtype = self._index_dtype
        return out

    def mean(self) -> tuple[Tensor, Tensor]:
        """Every index's mean recorded loss (binary64; NaN where never trained) and its count."""
        total = torch.zeros(self.count, dtype=torch.float64)
        count = torch.zeros(self.count, dtype=torch.float64)
        for index, value in zip(self._indices, self._values):
            total.index_add_(0, index.to(torch.int64), value.to(torch.float64))
            count.index_add_(0, index.to(torch.int64), torch.ones(index.numel(), dtype=torch.float64))
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan)), count

    def last(self) -> Tensor:
        """Every index's last recorded loss (binary64 of the binary32; NaN where never trained): at its
        latest step, and within a step at its latest batch position (specs/dynamics.md §4.2)."""
        out = torch.full((self.count,), math.nan, dtype=torch.float64)
        if not self._indices:
            return out
        index = torch.cat(self._indices).to(torch.int64)
        value = torch.cat(self._values)
        # The latest position of each index, by a reduction (scattered writes would leave duplicates' order open).
        pos = torch.full((self.count,), -1, dtype=torch.int64).scatter_reduce_(
            0, index, torch.arange(index.numel()), "amax")
        seen = pos >= 0
        out[seen] = value[pos[seen]].to(torch.float64)
        return out

    def scores(self, min_trace: int) -> Tensor:
        """LT-IQR of every index (binary64), NaN where its trace holds fewer than ``min_trace`` losses."""
        return lt_iqr(self._indices, self._values, self.count, min_trace)


def lt_iqr(indices: Iterable[Tensor], values: Iterable[Tensor], count: int, min_trace: int) -> Tensor:
    """§1.2: per dataset index, ``q(0.75) - q(0.25)`` of its sorted trace, ``q(p)`` interpolated linearly
    between the order statistics at ``h = (m - 1) * p`` (Hyndman and Fan's type 7, numpy's default)."""
    idx_list, val_list = list(indices), list(values)
    out = torch.full((count,), math.nan, dtype=torch.float64)
    if not idx_list:
        return out
    index = torch.cat(idx_list).to(torch.int64)
    value = torch.cat(val_list).to(torch.float64)  # a binary32 is exactly a binary64
    # sort by value, then stably by index: each index's losses lie together, ascending
    order = torch.argsort(value, stable=True)
    index, value = index[order], value[order]
    order = torch.argsort(index, stable=True)
    index, value = index[order], value[order]
    m = torch.bincount(index, minlength=count)
    start = torch.cumsum(m, 0) - m
    scored = torch.nonzero(m >= min_trace).flatten()
    if scored.numel() == 0:
        return out
    ms, base = m[scored].to(torch.float64), start[scored]
    q = []
    for p in (0.25, 0.75):
        h = (ms - 1.0) * p  # exact in binary64: p is a power-of-two fraction times 1 or 3
        lo = torch.floor(h)
        frac = h - lo
        i = base + lo.to(torch.int64)
        j = torch.minimum(i + 1, base + m[scored] - 1)  # frac is 0 where j would pass the end
        a, b = value[i], value[j]
        q.append(a + frac * (b - a))  # three roundings, in this order (no fused multiply-add)
    out[scored] = q[1] - q[0]
    return out


def flag(scores: Tensor, fraction: float) -> list[tuple[int, float]]:
    """§1.3: the top ``ceil(fraction * scored)`` examples by score (ties: the lower index first), as
    ``(index, score)`` in rank order."""
    scored = torch.nonzero(~torch.isnan(scores)).flatten()
    k = math.ceil(fraction * scored.numel())
    if k == 0:
        return []
    values = scores[scored]
    # descending score, ascending index: index order first, then a stable sort on the negated score
    order = torch.argsort(-values, stable=True)
    top = scored[order[:k]]
    return [(int(i), float(scores[i])) for i in top.tolist()]


def scores_digest(scores: Tensor) -> bytes:
    """§1.3: SHA-256 of every index's score as binary64 little-endian, unscored ones as the quiet NaN
    ``0x7FF8000000000000``."""
    bits = scores.to(torch.float64).clone().view(torch.int64)
    bits[torch.isnan(scores)] = NO_SCORE_BITS
    return hashlib.sha256(bits.numpy().astype("<i8").tobytes()).digest()
