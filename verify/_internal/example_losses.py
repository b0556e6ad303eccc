"""``example_losses`` of a format-4 GovernedUpdate (specs/training.md §3.1): every example's loss, checked.

The verifier's own reading of the field, independent of the trainer's: its form (4 bytes per index of
``batch``, little-endian binary32, finite) on every step in every mode, and at replay its values, which
must equal the run's loss with ``reduction="none"`` of the replayed output bit for bit (or within the
tolerance mode's bound, value by value).
"""

from __future__ import annotations

import math
import struct
from typing import Any, Mapping

from gradledger.ledger.errors import VerificationError

__all__ = ["EXAMPLE_LOSSES_FORMAT", "ExampleLossesInvalid", "check_example_losses", "decode_example_losses"]

#: The first training format whose GovernedUpdates record ``example_losses`` (specs/training.md §5).
EXAMPLE_LOSSES_FORMAT = 4


class ExampleLossesInvalid(VerificationError):
    """A step's ``example_losses`` is missing, present where its format has none, or malformed."""


def decode_example_losses(data: bytes) -> list[float]:
    """The binary32 values of ``data`` (length a multiple of 4, bounded by the record schema), as floats."""
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def check_example_losses(step: Mapping[str, Any], fmt: int) -> None:
    """Raise ``ExampleLossesInvalid`` naming what is wrong with ``step["example_losses"]`` for training format ``fmt``."""
    if fmt < EXAMPLE_LOSSES_FORMAT:
        if "example_losses" in step:
            raise ExampleLossesInvalid(f"example_losses is recorded, but the run is training format {fmt}, which has "
                                       f"none (format {EXAMPLE_LOSSES_FORMAT} and later)")
        return
    data = step.get("example_losses")
    if type(data) is not bytes:
        raise ExampleLossesInvalid(f"example_losses is missing: training format {fmt} records every example's loss")
    n = len(step["batch"])
    if len(data) != 4 * n:
        raise ExampleLossesInvalid(f"example_losses has {len(data)} bytes, not 4 for each of the batch's {n} indices")
    for i, v in enumerate(decode_example_losses(data)):
        if not math.isfinite(v):
            raise ExampleLossesInvalid(f"example_losses[{i}] is not finite")
