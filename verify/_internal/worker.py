"""A replay worker process: CBOR task on stdin, one CBOR frame per segment result on stdout."""

from __future__ import annotations

import sys

import torch

from . import environment
from .replay import ReplayCache, RunContext, Segment, replay_segment
from .segments import _frame, read_frame
from .sources import open_source


def main() -> int:
    task = read_frame(sys.stdin.buffer)
    if task is None:
        return 2
    torch.set_num_threads(1)
    source = open_source(task["source"])
    cache = ReplayCache()  # this task's own
    try:
        for ctx_obj, seg_obj in task["jobs"]:
            ctx, seg = RunContext.from_obj(ctx_obj), Segment.from_obj(seg_obj)
            environment.prepare(ctx.environment)
            result = replay_segment(ctx, seg, source.artifact, exact=task["exact"], cache=cache)
            sys.stdout.buffer.write(_frame(result.to_obj()))
            sys.stdout.buffer.flush()
    finally:
        source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
