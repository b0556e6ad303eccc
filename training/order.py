"""The data order and the seeds of a governed run (specs/training.md §2): pure functions of the
run seed, so that the trainer, unlearning and any verifier compute the same values without torch.

The verifier's twin is ``verify/_internal/settings.py``; both are pinned by
``specs/vectors/training-v1.json``.
"""

from __future__ import annotations

import hashlib

from gradledger.ledger import encoding

ORDER_DOMAIN = "gradledger/order/v1"
STEP_SEED_DOMAIN = "gradledger/step-seed/v1"
MICRO_SEED_DOMAIN = "gradledger/micro-seed/v1"

__all__ = ["MICRO_SEED_DOMAIN", "ORDER_DOMAIN", "STEP_SEED_DOMAIN", "epoch_order", "micro_seed", "step_seed"]


def step_seed(seed: int, step: int) -> int:
    """The torch seed set before step ``step``'s (first) forward: first 8 bytes (big-endian) of
    SHA-256(CBOR ["gradledger/step-seed/v1", seed, step])."""
    return int.from_bytes(hashlib.sha256(encoding.encode([STEP_SEED_DOMAIN, seed, step])).digest()[:8], "big")


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The torch seed set before the forward of micro-batch ``micro`` of step ``step`` (format 2,
    gradient accumulation): ``step_seed`` for micro-batch 0, so a step of one batch seeds as in
    format 1; for ``micro >= 1`` the first 8 bytes (big-endian) of
    SHA-256(CBOR ["gradledger/micro-seed/v1", seed, step, micro])."""
    if micro == 0:
        return step_seed(seed, step)
    digest = hashlib.sha256(encoding.encode([MICRO_SEED_DOMAIN, seed, step, micro])).digest()
    return int.from_bytes(digest[:8], "big")


def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    """Indices 0..count-1 sorted by SHA-256(CBOR ["gradledger/order/v1", seed, epoch, i]).

    A hash sort rather than torch.randperm: any verifier reproduces it without torch.
    """
    prefix = encoding.encode([ORDER_DOMAIN, seed, epoch, 0])[:-1]  # CBOR of the list without its last item
    sha256 = hashlib.sha256
    keys = [sha256(prefix + item).digest() for item in _uint_encodings(count)]
    return sorted(range(count), key=keys.__getitem__)


_UINT_CBOR: list[bytes] = []


def _uint_encodings(count: int) -> list[bytes]:
    """CBOR of 0 .. count-1, computed once per index for the process (every epoch needs them)."""
    if len(_UINT_CBOR) < count:
        _UINT_CBOR.extend(encoding.encode(i) for i in range(len(_UINT_CBOR), count))
    return _UINT_CBOR[:count] if len(_UINT_CBOR) > count else _UINT_CBOR
