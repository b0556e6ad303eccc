"""Memorization scores from a run's recorded per-example losses (specs/dynamics.md §1).

Two methods, each a score of an example's loss trace (the binary32 losses format 4 records for it at
every step that trained it):

- ``"mean-loss"`` (the default): the mean of the trace, from its exactly rounded sum. An example the
  model fits late, or never holds, keeps a high mean; one learned early and kept, a low one.
- ``"lt-iqr"`` (format 1's only method; Pollock, Shilov et al. 2024): the interquartile range of the
  trace. Its authors found it ahead of the mean and final loss on CIFAR-10 (0.92 precision at the top 1%
  against LiRA).

Why the mean is the default: bench/dynamics.py measures the candidates against LiRA's most vulnerable
1% (16 shadow models and more, on digits). The mean recorded loss was ahead of LT-IQR in every run,
averaged over every model as the target: 0.61 against 0.57 (34 models), 0.64 against 0.59 (65), 0.59
against 0.54 (128); the final loss was worst. The mean is recomputed bit for bit by a second
implementation because its sum is exactly rounded (``math.fsum``), whatever order each side adds in.

Every value is a binary64 operation on binary64 copies of the recorded binary32 values, in the order
§1.2 writes, so that the verifier's twin (verify/_internal/scans.py) gets the same bits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import GovernanceError

__all__ = ["LT_IQR", "MEAN_LOSS", "METHOD", "METHODS", "MemorizationScan", "LossTraces", "flag", "lt_iqr", "mean_loss",
           "scores_digest"]

#: §1.1: the methods. A parameters map without ``method`` is LT-IQR, format 1's one method (``METHOD``).
LT_IQR, MEAN_LOSS = "lt-iqr", "mean-loss"
METHODS = (LT_IQR, MEAN_LOSS)
METHOD = LT_IQR
#: §1.2: the canonical quiet NaN that stands for "no score" in ``scores_digest``.
NO_SCORE_BITS = 0x7FF8000000000000
#: §1.1: bounds on the parameters (a trace shorter than 2 has no spread; 2**20 bounds the work).
MAX_MIN_TRACE = 1 << 20


@dataclass(frozen=True)
class MemorizationScan:
    """What a scan flags: the top ``fraction`` of the scored examples by ``method``'s score, an example
    being scored once its trace holds at least ``min_trace`` losses (§1.1)."""

    fraction: float = 0.01
    min_trace: int = 4
    method: str = MEAN_LOSS

    def __post_init__(self) -> None:
        if type(self.fraction) is not float or not 0.0 < self.fraction <= 1.0:
            raise GovernanceError(f"MemorizationScan.fraction must be a float in (0, 1], got {self.fraction!r}")
        if type(self.min_trace) is not int or not 2 <= self.min_trace <= MAX_MIN_TRACE:
            raise GovernanceError(f"MemorizationScan.min_trace must be an int in [2, {MAX_MIN_TRACE}], "
                                  f"got {self.min_trace!r}")
        if self.method not in METHODS:
            raise GovernanceError(f"MemorizationScan.method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @property
    def parameters(self) -> dict[str, float | int | str]:
        """The recorded form (§1.1): ``method`` only where it is not LT-IQR, so that format 1's bytes stay."""
        out: dict[str, float | int | str] = {"fraction": self.fraction, "min_trace": self.min_trace}
        if self.method != LT_IQR:
            out["method"] = self.method
        return out

    @classmethod
    def from_parameters(cls, p: Mapping[str, Any]) -> "MemorizationScan":
        """The scan a recorded parameters map (a policy's, a run's settings) declares: LT-IQR without ``method``."""
        return cls(fraction=p["fraction"], min_trace=p["min_trace"], method=p.get("method", LT_IQR))


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

    def scores(self, min_trace: int, method: str) -> Tensor:
        """``method``'s score of every index (binary64), NaN where its trace holds fewer than ``min_trace`` losses."""
        score = mean_loss if method == MEAN_LOSS else lt_iqr
        return score(self._indices, self._values, self.count, min_trace)


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


def mean_loss(indices: Iterable[Tensor], values: Iterable[Tensor], count: int, min_trace: int) -> Tensor:
    """§1.2 ``"mean-loss"``: per dataset index, the exactly rounded sum of its trace (``math.fsum``) divided
    by its length, one binary64 division. The values are grouped by index first (a stable sort), then
    summed per index: fsum's result does not depend on the order it adds in."""
    idx_list, val_list = list(indices), list(values)
    if not idx_list:
        return torch.full((count,), math.nan, dtype=torch.float64)
    index = torch.cat(idx_list).to(torch.int64)
    order = torch.argsort(index, stable=True)
    value = torch.cat(val_list).to(torch.float64)[order].tolist()  # a binary32 is exactly a binary64
    out, pos = [math.nan] * count, 0
    for i, n in enumerate(torch.bincount(index, minlength=count).tolist()):
        if n >= min_trace:
            out[i] = math.fsum(value[pos : pos + n]) / n
        pos += n
    return torch.tensor(out, dtype=torch.float64)


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
