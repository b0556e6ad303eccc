"""`gradledger-verify`: the standalone verifier's command line (issue: verifier + export)."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    print("gradledger-verify: bundle verification is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
