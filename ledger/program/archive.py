"""Open a ``torch.export.save`` zip with every size bounded before a byte is inflated (specs/replay.md §2.1).

``torch.export.save`` writes every member STORED (no compression), so a program whose member is
compressed is refused outright: a deflate bomb never reaches a decompressor. Every member's
declared size is checked against its own bound and against the archive's length before it is
read, and it is read through a reader that stops at the declared size whatever the local header
says. The member count is read from the end-of-central-directory record before ``zipfile``
builds its index, so a directory of millions of tiny entries is refused without being listed.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from dataclasses import dataclass

from .errors import ProgramError

#: Bounds (specs/replay.md §2.1).
MAX_PROGRAM_BYTES = 4 << 30
MAX_MEMBERS = 100_000
MAX_MODEL_JSON = 64 << 20
MAX_CONFIG_JSON = 16 << 20
MAX_NAME = 512
_CHUNK = 1 << 20

#: Members torch writes as pickles, never read and refused when a config points at them.
_PICKLE_SUFFIXES = (".pkl", ".pt", ".pth", ".pickle")
_PICKLE_PREFIXES = ("custom_obj_", "opaque_obj_")
_MEMBER = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def _declared_count(data: bytes) -> int:
    """Entries declared by the end-of-central-directory record (zip64 when torch wrote one)."""
    tail = data[-(0xFFFF + 22):]
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise ProgramError("model program is not a zip archive (no end of central directory)")
    (count,) = struct.unpack("<H", tail[at + 10 : at + 12])
    if count != 0xFFFF:
        return count
    loc = tail.rfind(b"PK\x06\x07", 0, at)
    if loc < 0 or at - loc < 20:
        raise ProgramError("model program declares a zip64 directory it does not carry")
    (offset,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
    if offset + 56 > len(data) or data[offset : offset + 4] != b"PK\x06\x06":
        raise ProgramError("model program's zip64 directory record is out of place")
    (count64,) = struct.unpack("<Q", data[offset + 32 : offset + 40])
    return count64


def is_pickle_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(_PICKLE_SUFFIXES) or base.startswith(_PICKLE_PREFIXES)


@dataclass
class Archive:
    """The members of one program archive, by their name below the archive's top folder."""

    zip: zipfile.ZipFile
    prefix: str
    members: dict[str, zipfile.ZipInfo]

    def has(self, name: str) -> bool:
        return name in self.members

    def size(self, name: str) -> int:
        return self.members[name].file_size

    def read(self, name: str, limit: int) -> bytes:
        """The member's bytes; refused above ``limit`` or when it yields more than it declared."""
        buf = bytearray(self._checked(name, limit))
        self.read_into(name, memoryview(buf))
        return bytes(buf)

    def read_into(self, name: str, out: memoryview) -> None:
        """Fill ``out`` (exactly the member's declared size) through a bounded streaming reader."""
        info = self.members.get(name)
        if info is None:
            raise ProgramError(f"model program has no member {name!r}")
        if len(out) != info.file_size:
            raise ProgramError(f"model program member {name!r} holds {info.file_size} bytes, {len(out)} expected")
        try:
            with self.zip.open(info) as f:
                pos = 0
                while pos < len(out):
                    n = f.readinto(out[pos : pos + _CHUNK])
                    if not n:
                        raise ProgramError(f"model program member {name!r} is shorter than it declares")
                    pos += n
                if f.read(1):  # never more than declared, whatever the local header says
                    raise ProgramError(f"model program member {name!r} is longer than it declares")
        except ProgramError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise ProgramError(f"model program member {name!r} does not read: {exc}") from None

    def _checked(self, name: str, limit: int) -> int:
        info = self.members.get(name)
        if info is None:
            raise ProgramError(f"model program has no member {name!r}")
        if info.file_size > limit:
            raise ProgramError(f"model program member {name!r} declares {info.file_size} bytes, above {limit}")
        return info.file_size


def open_archive(data: bytes) -> Archive:
    """Check the zip's directory (count, names, sizes, storage, pickles) before reading any member."""
    if len(data) > MAX_PROGRAM_BYTES:
        raise ProgramError(f"model program is {len(data)} bytes, above the {MAX_PROGRAM_BYTES} limit")
    count = _declared_count(data)
    if count > MAX_MEMBERS:
        raise ProgramError(f"model program declares {count} members, above {MAX_MEMBERS}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, struct.error) as exc:
        raise ProgramError(f"model program is not a zip archive: {exc}") from None
    if len(infos) > MAX_MEMBERS or len(infos) != count:
        raise ProgramError(f"model program lists {len(infos)} members, its directory declares {count}")
    prefix = infos[0].filename.split("/", 1)[0] if infos else ""
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        if len(name) > MAX_NAME or not _MEMBER.fullmatch(name) or ".." in name.split("/") or "/" not in name:
            raise ProgramError(f"model program member name {name[:80]!r} is not allowed")
        if is_pickle_name(name) and "/sample_inputs/" not in name:
            raise ProgramError(f"model program member {name!r} carries a pickle payload; refused without loading it")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ProgramError(f"model program member {name!r} is compressed; torch.export.save stores members")
        if info.flag_bits & 0x1:
            raise ProgramError(f"model program member {name!r} is encrypted")
        if name.split("/", 1)[0] != prefix:
            raise ProgramError("model program members do not share one top folder")
        total += info.file_size
        if info.file_size > len(data) or total > len(data):
            raise ProgramError(f"model program member {name!r} declares more bytes than the archive holds")
        short = name.split("/", 1)[1]
        if short in members:
            raise ProgramError(f"model program has two members named {name!r}")
        members[short] = info
    return Archive(archive, prefix, members)
