"""The replay worker's wire (specs/replay.md §6): artifacts travel as raw bytes after a ``{"size": n}``
frame, so a checkpoint larger than one CBOR item (64 MiB: ResNet-18 with Adam is 134 MB) reaches the
worker; every size is checked before anything is read or allocated."""

from __future__ import annotations

import io
import struct

import pytest

from gradledger.ledger import encoding
from gradledger.verify._internal.worker import FrameError, artifact_reply, frame, read_artifact, read_frame


def _stream(*pieces: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(b"".join(pieces)))  # type: ignore[arg-type]


def test_an_artifact_larger_than_one_cbor_item_reaches_the_worker_whole() -> None:
    big = bytes(range(256)) * ((64 << 20) // 256 + 1)  # 64 MiB + 256 bytes: no CBOR item may hold it
    with pytest.raises(Exception):
        encoding.decode(encoding.encode(big))  # the decoder's default bound, what the old wire hit
    got = read_artifact(_stream(*artifact_reply(big)))
    assert got == big


def test_a_missing_artifact_is_none_and_an_empty_one_is_empty() -> None:
    assert read_artifact(_stream(*artifact_reply(None))) is None
    assert read_artifact(_stream(*artifact_reply(b""))) == b""


@pytest.mark.parametrize("head, words", [
    ({"size": 1 << 40}, "exceeds the bound"),  # above the bound: refused from the header alone
    ({"size": -1}, "exceeds the bound"),
    ({"size": 1.5}, "exceeds the bound"),
    ({"data": b"x"}, "no artifact"),
    ({"size": 8, "extra": 1}, "no artifact"),
])
def test_a_hostile_artifact_header_is_refused_before_any_read(head: dict, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        read_artifact(_stream(frame(head)))  # no body follows: a read would fail otherwise


def test_an_artifact_cut_short_is_refused() -> None:
    with pytest.raises(FrameError, match="cut short"):
        read_artifact(_stream(frame({"size": 100}), b"x" * 99))


def test_an_artifact_above_the_callers_bound_is_refused() -> None:
    with pytest.raises(FrameError, match="exceeds the bound of 10 bytes"):
        read_artifact(_stream(*artifact_reply(b"y" * 11)), limit=10)


def test_a_worker_frame_is_bounded_by_its_length_prefix() -> None:
    with pytest.raises(FrameError, match="exceeds the bound"):
        read_frame(_stream(struct.pack(">Q", (64 << 20) + 1)))  # nothing read past the prefix
    with pytest.raises(FrameError, match="canonical CBOR"):
        read_frame(_stream(struct.pack(">Q", 2) + b"\xff\xff"))
    assert read_frame(_stream(frame({"result": [1, 2]}))) == {"result": [1, 2]}
    assert read_frame(_stream()) is None
