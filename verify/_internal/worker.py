"""A replay worker process: confine itself, then a CBOR task on stdin, one CBOR frame per result on stdout.

It asks the verifier for each artifact it needs (a ``{"artifact": digest}`` frame on stdout,
answered ``{"data": bytes or null}`` on stdin) and is given only those its segments name.

    python -m gradledger.verify._internal.worker --sandbox --max-memory MIB   (or --no-sandbox)

The first thing it does, while it is one thread and before torch is imported or the task is read,
is enter the sandbox (``sandbox.enter``, specs/replay.md §7). Its first frame says what it runs
behind (``{"sandbox": "namespaces+rlimits+seccomp"}`` or ``"off"``); then one frame per segment,
in the task's order. A sandbox that cannot be set up exits ``EXIT_NO_SANDBOX`` with one line on
stderr, having read nothing.

Top-level imports stay light (no torch, no numpy: both start threads): the frames are read and written here, and
``segments`` imports them from this module.
"""

from __future__ import annotations

import struct
import sys
from typing import Any, BinaryIO

from . import sandbox

#: The largest frame the verifier reads from a worker (a segment's result is a few hundred bytes):
#: a hostile worker cannot make the verifier allocate more than this for one frame.
MAX_RESULT_FRAME = 64 << 20
#: The largest task or artifact a worker reads (they come from the verifier).
MAX_TASK_FRAME = 16 << 30


class FrameError(Exception):
    """A frame that is cut short, too large, or not canonical CBOR."""


def frame(obj: Any) -> bytes:
    from gradledger.ledger import encoding  # here, not above: it imports numpy, which starts threads

    data = encoding.encode(obj)
    return struct.pack(">Q", len(data)) + data


def read_frame(stream: BinaryIO, limit: int = MAX_RESULT_FRAME) -> Any | None:
    """The next frame's value; None at a clean end of stream. The size is checked before any read."""
    head = _read_exactly(stream, 8, allow_eof=True)
    if head is None:
        return None
    (size,) = struct.unpack(">Q", head)
    if size > limit:
        raise FrameError(f"a frame of {size} bytes exceeds the bound of {limit} bytes")
    data = _read_exactly(stream, size, allow_eof=False)
    assert data is not None
    from gradledger.ledger import encoding

    try:
        return encoding.decode(data)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder refuses, the frame is bad
        raise FrameError(f"a frame is not canonical CBOR: {exc}") from None


def _read_exactly(stream: BinaryIO, size: int, *, allow_eof: bool) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = stream.read(min(size - got, 1 << 20))
        if not chunk:
            if got == 0 and allow_eof:
                return None
            raise FrameError(f"a frame is cut short ({got} of {size} bytes)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def main(argv: list[str]) -> int:
    try:
        walls = sandbox.enter(sandbox.parse_args(argv))
    except sandbox.SandboxError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return sandbox.EXIT_NO_SANDBOX
    except Exception as exc:  # noqa: BLE001 - any failure to confine is a sandbox that cannot be set up
        print(f"sandbox: {type(exc).__name__}: {exc}", file=sys.stderr)
        return sandbox.EXIT_NO_SANDBOX
    out = sys.stdout.buffer
    out.write(frame({"sandbox": walls}))
    out.flush()
    task = read_frame(sys.stdin.buffer, MAX_TASK_FRAME)
    if task is None:
        return 2

    import torch

    from . import environment
    from .replay import ReplayCache, RunContext, Segment, replay_segment

    def artifact(digest: bytes) -> bytes | None:
        # The verifier serves it: this process never opens the bundle (it could not write to it anyway).
        out.write(frame({"artifact": digest}))
        out.flush()
        reply = read_frame(sys.stdin.buffer, MAX_TASK_FRAME)
        if not isinstance(reply, dict) or set(reply) != {"data"}:
            raise FrameError("the verifier sent no artifact")
        return reply["data"]

    torch.set_num_threads(1)
    cache = ReplayCache()  # this task's own
    for ctx_obj, seg_obj in task["jobs"]:
        ctx, seg = RunContext.from_obj(ctx_obj), Segment.from_obj(seg_obj)
        environment.prepare(ctx.environment)
        result = replay_segment(ctx, seg, artifact, exact=task["exact"], cache=cache)
        out.write(frame(result.to_obj()))
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
