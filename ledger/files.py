"""Bounded reads of the files a user names on the command line (trust roots, keys, bundles).

Every such path is hostile until checked: ``/dev/zero`` never ends, a FIFO blocks forever, a
sparse file claims gigabytes it does not hold. A file is opened without blocking
(``O_NONBLOCK``: a FIFO with no writer cannot hang the open), checked on the *open descriptor*
to be a regular file (no race between the check and the read), and its size is bounded before
a byte is read; the read itself stops one byte past the bound in case the file grows.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UnusableInput

__all__ = ["open_regular", "read_regular"]


def open_regular(path: str | os.PathLike[str], what: str, error: type[UnusableInput] = UnusableInput) -> int:
    """A read-only descriptor on ``path``, refused (``error``) unless it is a regular file. The caller closes it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot open {what}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"
            raise error(f"{path}: {kind}, not a regular file, so not a {what} file")
        # Reads block again from here on: a regular file never blocks, and mmap needs a plain fd.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_at_most(fd: int, limit: int, chunk: int = 1 << 20) -> bytes:
    """What ``fd`` holds, read until its end or until one byte past ``limit`` (so that a caller sees a
    file that grew past its bound while it was read, without reading the rest)."""
    chunks, got = [], 0
    while got <= limit:
        piece = os.read(fd, min(chunk, limit + 1 - got))
        if not piece:
            break
        chunks.append(piece)
        got += len(piece)
    return b"".join(chunks)


def read_regular(
    path: str | os.PathLike[str], limit: int, what: str, error: type[UnusableInput] = UnusableInput
) -> bytes:
    """The bytes of the regular file ``path``, refused before reading when above ``limit`` bytes."""
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{Path(path)}: {size} bytes, more than a {what} file may hold ({limit})")
        data = read_at_most(fd, limit)
        if len(data) > limit:
            raise error(f"{Path(path)}: grew past {limit} bytes while being read")
        return data
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
