"""Which segments a sampled replay checks, derived from the final signed tree head (specs/replay.md §5).

The trainer signs the final tree head only after every segment is fixed, and the root commits
to all of them, so it cannot know in advance which segments the challenge will pick without
finding a SHA-256 preimage. But it can regrind the root (re-sign a tree head) until a forged
segment is not drawn, so the verifier mixes in a fresh nonce of its own by default (issue 10.7).
"""

from __future__ import annotations

import hashlib
import math

from gradledger.ledger import encoding

CHALLENGE_DOMAIN = "gradledger/challenge/v1"
#: The size of the verifier's default nonce (os.urandom), drawn per verification.
NONCE_BYTES = 32


def sample_size(total: int, fraction: float) -> int:
    return 0 if total == 0 else min(total, max(1, math.ceil(fraction * total)))


def choose(root: bytes, total: int, count: int, nonce: bytes = b"") -> list[int]:
    """``count`` distinct segment indices in [0, total), ordered by SHA-256(CBOR [domain, root, nonce, i])."""
    keys = {i: hashlib.sha256(encoding.encode([CHALLENGE_DOMAIN, root, nonce, i])).digest() for i in range(total)}
    return sorted(sorted(range(total), key=keys.__getitem__)[:count])


def detection_probability(total: int, count: int, forged: int = 1) -> float:
    """P(at least one of ``forged`` bad segments is among ``count`` of ``total`` drawn without replacement)."""
    if forged <= 0 or total == 0:
        return 0.0
    if count >= total:
        return 1.0
    miss = math.comb(total - forged, count) / math.comb(total, count) if total - forged >= count else 0.0
    return 1.0 - miss
