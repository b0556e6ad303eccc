"""A replay worker process: confine itself, then a CBOR task on stdin, one CBOR frame per result on stdout.

It asks the verifier for each artifact it needs (a ``{"artifact": digest}`` frame on stdout,
answered on stdin by a ``{"size": n}`` frame followed by the artifact's n raw bytes, or
``{"size": null}`` for one the bundle lacks) and is given only those its segments name.
Artifacts are never CBOR items (specs/encoding.md §4): a checkpoint of a model of millions of
parameters with its Adam state is larger than the 64 MiB bound of one CBOR item.

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

#: The largest frame the verifier reads from a worker: a segment's result or an artifact request,
#: a few hundred bytes; a worker never sends state (weights, checkpoints) back. A hostile worker
#: cannot make the verifier allocate more than this for one frame.
MAX_RESULT_FRAME = 64 << 20
#: The largest task a worker reads (it comes from the verifier).
MAX_TASK_FRAME = 16 << 30
#: The largest artifact the verifier serves a worker: the bound a bundle puts on each artifact
#: (``ledger.bundle.MAX_ARTIFACT_SIZE``, not imported here: it would pull numpy in before the
#: sandbox is entered). The header of an artifact reply above it is refused before a byte is read.
MAX_ARTIFACT = 4 << 30


class FrameError(Exception):
    """A frame that is cut short, too large, or not canonical CBOR."""


def frame(obj: Any) -> bytes:
    from gradledger.ledger import encoding  # here, not above: it imports numpy, which starts threads

    data = encoding.encode(obj)
    return struct.pack(">Q", len(data)) + data


def read_frame(stream: BinaryIO, limit: int | None = None) -> Any | None:
    """The next frame's value; None at a clean end of stream. The size is checked before any read.

    ``limit`` (default ``MAX_RESULT_FRAME``, looked up when called) is the frame's whole bound: the
    decoder is given it too, so a task frame is not cut at the decoder's own 64 MiB default.
    """
    if limit is None:
        limit = MAX_RESULT_FRAME
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
        return encoding.decode(data, max_size=limit)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder refuses, the frame is bad
        raise FrameError(f"a frame is not canonical CBOR: {exc}") from None


def artifact_reply(data: bytes | None) -> list[bytes]:
    """The verifier's answer to an artifact request, in pieces to write in order (the artifact's
    bytes are not copied into a frame): ``{"size": n}`` then the n raw bytes, or ``{"size": null}``."""
    if data is None:
        return [frame({"size": None})]
    if len(data) > MAX_ARTIFACT:
        raise FrameError(f"an artifact of {len(data)} bytes exceeds the bound of {MAX_ARTIFACT} bytes")
    return [frame({"size": len(data)}), data]


def read_artifact(stream: BinaryIO, limit: int | None = None) -> bytes | None:
    """An artifact reply (``artifact_reply``): its bytes, or None for an artifact the bundle lacks.
    The size, from the header frame, is checked against ``limit`` (default ``MAX_ARTIFACT``)
    before the bytes are read."""
    if limit is None:
        limit = MAX_ARTIFACT
    head = read_frame(stream, 64)
    if not isinstance(head, dict) or set(head) != {"size"}:
        raise FrameError("the verifier sent no artifact")
    size = head["size"]
    if size is None:
        return None
    if type(size) is not int or not 0 <= size <= limit:
        raise FrameError(f"an artifact of {size!r} bytes exceeds the bound of {limit} bytes")
    data = stream.read(size)  # one allocation of the bounded size, filled in place (BufferedReader)
    if len(data) < size:
        rest = _read_exactly(stream, size - len(data), allow_eof=False)
        assert rest is not None
        data += rest
    return data


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
    # Warm up before the task is read: a worker may be started ahead of need (pool.py), so its imports
    # overlap the verifier's own work. Torch's optimizers would import dynamo on first use (~2 s here)
    # for two markers that do nothing in eager mode: eager.py serves them (and loads dynamo only if
    # something else asks for it); building an optimizer then imports what is left.
    import torch

    from . import eager, environment

    eager.install()
    from .attribution import Probe
    from .replay import ReplayCache, RunContext, Segment, replay_segment

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    task = read_frame(sys.stdin.buffer, MAX_TASK_FRAME)
    if task is None:
        return 2

    def artifact(digest: bytes) -> bytes | None:
        # The verifier serves it: this process never opens the bundle (it could not write to it anyway).
        out.write(frame({"artifact": digest}))
        out.flush()
        return read_artifact(sys.stdin.buffer)

    torch.set_num_threads(1)
    cache = ReplayCache()  # this task's own
    for ctx_obj, seg_obj, probe_objs in task["jobs"]:
        ctx, seg = RunContext.from_obj(ctx_obj), Segment.from_obj(seg_obj)
        environment.prepare(ctx.environment)
        result = replay_segment(ctx, seg, artifact, exact=task["exact"], cache=cache,
                                probes=[Probe.from_obj(p) for p in probe_objs])
        out.write(frame(result.to_obj()))
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
