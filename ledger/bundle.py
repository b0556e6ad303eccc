"""Portable bundles: one file carrying a ledger's records, artifacts and witness cosignatures.

A bundle is an RFC 8742 CBOR sequence of definite-length byte strings: a header,
the records in log order, the artifacts in digest order, then the cosignatures
(specs/bundle.md). The reader treats the file as hostile: it parses every item
head itself, bounds every length against the bytes left and the item's kind
before touching the payload, and maps the file instead of reading it, so a
multi-GB bundle costs address space, not memory. Nothing in the file is trusted
that can be recomputed: artifact names are their SHA-256, and the header's size
and root are only compared with what admission of the records derives.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import secrets
import shutil
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

from . import encoding, envelope, schema
from .errors import ArtifactUnavailable, BundleError, EncodingError, ProofError, SchemaError, UnusableInput
from .files import open_regular
from .keys import SIGNATURE_SIZE
from .ledger import Ledger
from .observations import TYPES
from .store import exists as ledger_exists

if TYPE_CHECKING:
    from .artifact_store import ArtifactStore

FORMAT = "gradledger-bundle"
#: Version 1: every artifact a record names travels in the file. Version 2 (specs/bundle.md §5)
#: adds the ``external`` items: checkpoints named by digest and held in an artifact store. A
#: writer writes version 1 unless it holds something outside, so plain exports are unchanged.
VERSION = 1
VERSION_EXTERNAL = 2
#: An external item is one SHA-256 digest.
EXTERNAL_ITEM_SIZE = 32
MAX_HEADER_SIZE = 64 * 1024
MAX_RECORD_SIZE = envelope.MAX_RECORD_SIZE
#: The shortest byte string that can be a record: 0x82, a 1-byte head, 0x58 0x40 and a signature.
MIN_RECORD_SIZE = 4 + SIGNATURE_SIZE
MAX_ARTIFACT_SIZE = 4 << 30
#: [uint, bstr .size 32, bstr .size 64] is at most 1 + 9 + 34 + 66 bytes.
MAX_COSIGNATURE_SIZE = 128
MIN_COSIGNATURE_SIZE = 1 + 1 + 34 + 66
MAX_COUNT = 1 << 32

Progress = Callable[[int], None]


def _count(value: Any, where: str) -> None:
    schema.uint(value, where)
    if value > MAX_COUNT:
        raise SchemaError(f"{where}: more than {MAX_COUNT} items")


_HEADER_FIELDS: dict[str, Any] = dict(
    format=schema.one_of(FORMAT),
    origin=schema.text,
    records=_count,
    artifacts=_count,
    cosignatures=_count,
    size=schema.uint,
    root=schema.digest,
    with_data=schema.boolean,
)
HEADER_SCHEMA = schema.record("bundle header", version=schema.one_of(VERSION), **_HEADER_FIELDS)
#: Version 2: the same map, plus the count of external items (checkpoints held in a store).
HEADER_SCHEMA_V2 = schema.record("bundle header", version=schema.one_of(VERSION_EXTERNAL), external=_count,
                                 **_HEADER_FIELDS)


def _item_size(length: int) -> int:
    return len(encoding.bstr_header(length)) + length


class Bundle:
    """A bundle file, mapped read-only, its framing checked and its items indexed (not decoded).

    Records are handed out as bytes for admission to judge; only the header and
    the cosignatures are decoded here.
    """

    def __init__(self, path: Path, mm: mmap.mmap, header: dict[str, Any], bounds: array,
                 digests: bytes, cosignatures: list[tuple[int, bytes, bytes]], external: bytes = b"") -> None:
        self.path = path
        self.header = header
        self._mm = mm
        #: Item k spans bytes bounds[k] .. bounds[k + 1] (its head, then its payload).
        self._bounds = bounds
        #: The artifacts' SHA-256 digests, 32 bytes each, ascending (so binary-searchable).
        self._digests = digests
        self._cosignatures = cosignatures
        self._records = header["records"]
        self._artifacts = header["artifacts"]
        #: Version 2: the digests of the checkpoints held outside the file, ascending (§5).
        self._external = external

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "Bundle":
        path = Path(path)
        # A FIFO or device would block or never end: only a regular file is opened, checked on
        # the open descriptor (open_regular opens without blocking and fstat()s it).
        fd = open_regular(path, "bundle", BundleError)
        try:
            if os.fstat(fd).st_size == 0:
                raise BundleError(f"{path}: empty file, not a bundle")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise BundleError(f"{path}: cannot read bundle: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        try:
            return cls(path, mm, *_index(path, mm))
        except BaseException:
            mm.close()
            raise

    def close(self) -> None:
        self._mm.close()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- reading -----------------------------------------------------------

    def __len__(self) -> int:
        return self._records

    def _payload(self, item: int) -> tuple[int, int]:
        start, end = self._bounds[item], self._bounds[item + 1]
        info = self._mm[start] & 0x1F
        return start + (1 if info < 24 else 1 + (1 << (info - 24))), end

    def records(self) -> Iterator[tuple[int, bytes]]:
        """``(seq, record bytes)`` in log order, seq from 0."""
        for seq in range(self._records):
            yield seq, self.record(seq)

    def record(self, seq: int) -> bytes:
        if not 0 <= seq < self._records:
            raise IndexError(f"no observation {seq} in the bundle")
        start, end = self._payload(1 + seq)
        return self._mm[start:end]

    def _artifact_index(self, digest: bytes) -> int | None:
        def at(i: int) -> bytes:
            return self._digests[32 * i : 32 * i + 32]

        i = bisect.bisect_left(range(self._artifacts), digest, key=at)
        return i if i < self._artifacts and at(i) == digest else None

    def artifact(self, digest: bytes) -> bytes | None:
        """The bytes whose SHA-256 is ``digest``, or None if the bundle has none."""
        i = self._artifact_index(digest)
        if i is None:
            return None
        start, end = self._payload(1 + self._records + i)
        return self._mm[start:end]

    def artifact_digests(self) -> frozenset[bytes]:
        return frozenset(self._digests[i : i + 32] for i in range(0, len(self._digests), 32))

    def external_digests(self) -> tuple[bytes, ...]:
        """The artifacts the file names but does not carry (version 2, §5), ascending; () in version 1."""
        return tuple(self._external[i : i + 32] for i in range(0, len(self._external), 32))

    def cosignatures(self) -> list[tuple[int, bytes, bytes]]:
        """``(TreeHead seq, witness key id, signature)``, ascending by seq then key id."""
        return list(self._cosignatures)

    def _artifact_views(self) -> Iterator[tuple[memoryview, int]]:
        """Each artifact as a view into the map, with its item's span; release each view before close."""
        for i in range(self._artifacts):
            item = 1 + self._records + i
            start, end = self._payload(item)
            yield memoryview(self._mm)[start:end], self._span(item)

    def _span(self, item: int) -> int:
        return self._bounds[item + 1] - self._bounds[item]


# -- framing -------------------------------------------------------------------


def _head(mm: mmap.mmap, pos: int, end: int, where: str) -> tuple[int, int]:
    """Parse the byte-string head at ``pos``: (payload length, payload start). Canonical only."""
    first = mm[pos]
    if first >> 5 != 2:
        raise BundleError(f"{where}: not a byte string (CBOR major type {first >> 5})")
    info = first & 0x1F
    if info < 24:
        return info, pos + 1
    if info > 27:
        raise BundleError(f"{where}: indefinite or reserved length (additional information {info})")
    width = 1 << (info - 24)
    if pos + 1 + width > end:
        raise BundleError(f"{where}: truncated in its length")
    length = int.from_bytes(mm[pos + 1 : pos + 1 + width], "big")
    if len(encoding.bstr_header(length)) != 1 + width:
        raise BundleError(f"{where}: length {length} not in its shortest encoding")
    return length, pos + 1 + width


def _index(path: Path, mm: mmap.mmap) -> tuple[dict[str, Any], array, bytes, list[tuple[int, bytes, bytes]], bytes]:
    end = len(mm)
    where = f"{path}: item 0 (header) at offset 0"
    length, start = _head(mm, 0, end, where)
    if length > MAX_HEADER_SIZE:
        raise BundleError(f"{where}: {length} bytes, limit {MAX_HEADER_SIZE}")
    if start + length > end:
        raise BundleError(f"{where}: truncated ({length} bytes declared, {end - start} left)")
    try:
        header = encoding.decode(mm[start : start + length], max_size=MAX_HEADER_SIZE)
        version = header.get("version") if isinstance(header, dict) else None
        (HEADER_SCHEMA_V2 if version == VERSION_EXTERNAL else HEADER_SCHEMA).validate(header)
    except (EncodingError, SchemaError) as exc:
        raise BundleError(f"{where}: not a gradledger bundle header: {exc}") from None
    pos = start + length
    records, artifacts, cosigs = header["records"], header["artifacts"], header["cosignatures"]
    externals = header.get("external", 0)
    least = (records * _item_size(MIN_RECORD_SIZE) + artifacts * _item_size(0)
             + externals * _item_size(EXTERNAL_ITEM_SIZE) + cosigs * _item_size(MIN_COSIGNATURE_SIZE))
    if least > end - pos:
        raise BundleError(
            f"{path}: truncated or damaged: the header promises {records} records, {artifacts} artifacts, "
            f"{externals} external references and {cosigs} cosignatures, "
            f"which need at least {least} bytes; {end - pos} follow"
        )

    total = 1 + records + artifacts + externals + cosigs
    inline = records + artifacts
    # Grown item by item, never sized from the header: a sparse file whose header promises
    # millions of one-byte items must not cost memory before its first item is checked.
    bounds = array("Q", [0, pos])
    digests = bytearray()
    external = bytearray()
    cosignatures: list[tuple[int, bytes, bytes]] = []
    with memoryview(mm) as view:
        for item in range(1, total):
            if item <= records:
                kind, limit, least_len = f"record {item - 1}", MAX_RECORD_SIZE, MIN_RECORD_SIZE
            elif item <= inline:
                kind, limit, least_len = f"artifact {item - 1 - records}", MAX_ARTIFACT_SIZE, 0
            elif item <= inline + externals:
                kind, limit, least_len = f"external {item - 1 - inline}", EXTERNAL_ITEM_SIZE, EXTERNAL_ITEM_SIZE
            else:
                kind, limit, least_len = (f"cosignature {item - 1 - inline - externals}", MAX_COSIGNATURE_SIZE,
                                          MIN_COSIGNATURE_SIZE)
            where = f"{path}: item {item} ({kind}) at offset {pos}"
            if pos >= end:
                raise BundleError(f"{where}: missing, the file ends there (truncated bundle)")
            length, start = _head(mm, pos, end, where)
            if not least_len <= length <= limit:
                raise BundleError(f"{where}: {length} bytes, outside {least_len}..{limit}")
            if start + length > end:
                raise BundleError(f"{where}: truncated ({length} bytes declared, {end - start} left)")
            pos = start + length
            bounds.append(pos)
            if item <= records:
                continue
            if item <= inline:
                digest = hashlib.sha256(view[start:pos]).digest()
                if digests and digest <= digests[-32:]:
                    raise BundleError(f"{where}: artifacts are not in strictly ascending digest order")
                digests += digest
            elif item <= inline + externals:
                digest = bytes(view[start:pos])
                if external and digest <= external[-32:]:
                    raise BundleError(f"{where}: external references are not in strictly ascending order")
                if _holds(digests, digest):
                    raise BundleError(f"{where}: {digest.hex()} is both carried and named as external")
                external += digest
            else:
                entry = _cosignature(mm[start:pos], where)
                if cosignatures and entry[:2] <= cosignatures[-1][:2]:
                    raise BundleError(f"{where}: cosignatures are not in strictly ascending (seq, key id) order")
                cosignatures.append(entry)
    if pos != end:
        raise BundleError(f"{path}: {end - pos} trailing bytes at offset {pos}, after the last of {total} items")
    return header, bounds, bytes(digests), cosignatures, bytes(external)


def _holds(digests: bytearray, digest: bytes) -> bool:
    """Whether the ascending 32-byte ``digests`` hold ``digest`` (binary search)."""
    n = len(digests) // 32
    i = bisect.bisect_left(range(n), digest, key=lambda k: bytes(digests[32 * k : 32 * k + 32]))
    return i < n and digests[32 * i : 32 * i + 32] == digest


def _cosignature(data: bytes, where: str) -> tuple[int, bytes, bytes]:
    try:
        value = encoding.decode(data, max_size=MAX_COSIGNATURE_SIZE)
    except EncodingError as exc:
        raise BundleError(f"{where}: {exc}") from None
    if (
        type(value) is not list
        or len(value) != 3
        or type(value[0]) is not int
        or value[0] < 0
        or type(value[1]) is not bytes
        or len(value[1]) != 32
        or type(value[2]) is not bytes
        or len(value[2]) != SIGNATURE_SIZE
    ):
        raise BundleError(f"{where}: not [tree head seq, 32-byte witness key id, 64-byte signature]")
    return value[0], value[1], value[2]


# -- export ----------------------------------------------------------------------


def dataset_inputs(ledger: Ledger, size: int) -> set[bytes]:
    """Digests of the dataset input artifacts named by DatasetCommitted records below ``size``."""
    found = set()
    for seq in ledger.by_type("DatasetCommitted"):
        if seq < size:
            data = ledger.observation(seq).body.get("data")
            if data is not None:
                found.add(data)
    return found


def checkpoint_artifacts(ledger: Ledger, size: int) -> set[bytes]:
    """Digests that Checkpoint records below ``size`` name and no other record field does (§5: what may go outside)."""
    checkpoints: set[bytes] = set()
    for seq in ledger.by_type("Checkpoint"):
        if seq < size:
            digest = ledger.observation(seq).body.get("artifact")
            if type(digest) is bytes:
                checkpoints.add(digest)
    # Anything else that might name one of them keeps it in the file: every 32-byte value of every
    # other record but the updates (which name no artifact), a superset of the fields of
    # specs/verification.md §3, so the exporter needs no copy of the verifier's table.
    # Found through the type index, so the updates (the bulk of a ledger) are never decoded here.
    for type_name in TYPES:
        if type_name in ("GovernedUpdate", "Checkpoint"):
            continue
        for seq in ledger.by_type(type_name):
            if seq < size:
                checkpoints -= set(_byte_values(ledger.observation(seq).body))
    return checkpoints


def _byte_values(value: Any) -> Iterator[bytes]:
    if type(value) is bytes:
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _byte_values(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _byte_values(item)


def export_bundle(
    ledger: Ledger, path: str | os.PathLike[str], *, with_data: bool = False, progress: Progress | None = None,
    artifacts_to: "ArtifactStore | None" = None,
) -> dict[str, Any]:
    """Write the ledger's committed log as a bundle at ``path``; return the header.

    The file appears under its name only when complete and synced: it is written
    to a temporary file beside it and renamed. ``progress`` gets the bytes of
    each item as it is written. ``artifacts_to``: write the checkpoint artifacts
    into that store first and name them in the bundle by digest (version 2, §5).
    """
    path = Path(path)
    if path.is_dir():
        raise UnusableInput(f"{path}: is a directory")
    if not path.parent.is_dir():
        raise UnusableInput(f"{path.parent}: no such directory to write the bundle in")
    ledger.commit()
    # The reader's view as of its open (or the writer's last commit): records
    # appended meanwhile by another process are not part of this export.
    size, root = ledger.size, ledger.root
    excluded = set() if with_data else dataset_inputs(ledger, size)
    stored = ledger.artifact_digests()
    external = sorted(checkpoint_artifacts(ledger, size) & set(stored) - excluded) if artifacts_to is not None else []
    outside = set(external)
    digests = [d for d in stored if d not in excluded and d not in outside]
    cosigs = sorted((seq, kid, sig) for seq, kid, sig in ledger.cosignatures() if seq < size)
    header = {
        "format": FORMAT,
        "version": VERSION if artifacts_to is None else VERSION_EXTERNAL,
        "origin": ledger.origin,
        "records": size,
        "artifacts": len(digests),
        "cosignatures": len(cosigs),
        "size": size,
        "root": root,
        "with_data": with_data,
    }
    if artifacts_to is not None:
        header["external"] = len(external)
        # The store first: a bundle never names a checkpoint that is not yet where it says.
        for digest in external:
            data = ledger.artifact(digest, limit=MAX_ARTIFACT_SIZE)
            if data is None:
                raise BundleError(f"artifact {digest.hex()} is missing from storage or larger than "
                                  f"{MAX_ARTIFACT_SIZE} bytes")
            artifacts_to.put(data)
            if progress is not None:
                progress(len(data))
    # Not mkstemp: its 0600 mode would stay on the renamed bundle, which is meant to be shared.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            _write_item(out, encoding.encode(header), progress)
            written = 0
            for seq, record in ledger.records(0, size):
                if seq != written:
                    raise BundleError(f"{ledger.path}: observation {written} is missing from storage")
                _write_item(out, record, progress)
                written += 1
            if written != size:
                raise BundleError(f"{ledger.path}: observation {written} is missing from storage")
            for digest in digests:
                data = ledger.artifact(digest)
                if data is None or len(data) > MAX_ARTIFACT_SIZE:
                    raise BundleError(f"artifact {digest.hex()[:16]} is missing or larger than {MAX_ARTIFACT_SIZE} bytes")
                _write_item(out, data, progress)
            for digest in external:
                _write_item(out, digest, progress)
            for cosig in cosigs:
                _write_item(out, encoding.encode(list(cosig)), progress)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)
    return header


def _write_item(out: BinaryIO, data: bytes, progress: Progress | None) -> None:
    head = encoding.bstr_header(len(data))
    out.write(head)
    out.write(data)
    if progress is not None:
        progress(len(head) + len(data))


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- import ----------------------------------------------------------------------


def import_bundle(
    path: str | os.PathLike[str], ledger_path: str | os.PathLike[str], *, progress: Progress | None = None,
    artifacts: "ArtifactStore | None" = None,
) -> Ledger:
    """Build a new ledger at ``ledger_path`` from a bundle; return it open for writing.

    Every record goes through the ordinary admission (signature, chain,
    credentials), so a bundle that does not verify structurally does not
    import. The ledger is built in a temporary directory beside the target and
    renamed into place only once complete, so a failed import leaves nothing.
    A bundle that holds checkpoints outside (§5) imports only with the store
    that holds them (``artifacts``): a ledger holds every artifact its records name.
    """
    target = Path(ledger_path)
    if ledger_exists(target) or target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UnusableInput(f"{target}: exists and is not an empty directory; import makes a new ledger")
    with Bundle.open(path) as bundle:
        external = bundle.external_digests()
        if external and artifacts is None:
            raise UnusableInput(f"{bundle.path}: holds {len(external)} checkpoint(s) outside the bundle, first "
                                f"{external[0].hex()}; import it with --artifacts STORE")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not mkdtemp: its 0700 mode would stay on the renamed ledger.
        work = target.parent / f".{target.name}.import-{secrets.token_hex(6)}"
        work.mkdir()
        try:
            with Ledger.create(work) as ledger:
                _fill(ledger, bundle, progress, artifacts)
            # rename(2) replaces an empty directory, and refuses a non-empty one.
            os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    _sync_dir(target.parent)
    return Ledger.open(target, writable=True)


def _fill(ledger: Ledger, bundle: Bundle, progress: Progress | None, store: "ArtifactStore | None" = None) -> None:
    header = bundle.header
    if progress is not None:
        progress(bundle._span(0))
    for seq, record in bundle.records():
        ledger.append_record(record)
        if progress is not None:
            progress(bundle._span(1 + seq))
    ledger.commit()
    if ledger.size != header["size"] or ledger.root != header["root"] or ledger.origin != header["origin"]:
        raise BundleError(
            f"{bundle.path}: header says size {header['size']}, root {header['root'].hex()}, origin "
            f"{header['origin']!r}; the records give {ledger.size}, {ledger.root.hex()}, {ledger.origin!r}"
        )
    for view, span in bundle._artifact_views():
        with view:
            ledger.put_artifact(view)
        if progress is not None:
            progress(span)
    external = bundle.external_digests()
    if external:
        # §5.2: only checkpoints go outside; a store is asked for nothing the records do not name as one.
        allowed = checkpoint_artifacts(ledger, ledger.size)
        stray = [d for d in external if d not in allowed]
        if stray:
            raise BundleError(f"{bundle.path}: external artifact {stray[0].hex()} is not a checkpoint artifact that "
                              "a Checkpoint record (and no other record) names")
    for digest in external:
        assert store is not None  # import_bundle refused the bundle without one
        try:
            data = store.fetch(digest)
        except ArtifactUnavailable as exc:
            raise UnusableInput(f"{bundle.path}: external checkpoint {exc}") from None
        ledger.put_artifact(data)
        if progress is not None:
            progress(EXTERNAL_ITEM_SIZE + 2)
    for i, (head_seq, witness, signature) in enumerate(bundle.cosignatures()):
        if head_seq >= ledger.size:
            raise ProofError(f"cosignature {i} names tree head {head_seq}, beyond the log", seq=head_seq)
        ledger.add_cosignature(head_seq, witness, signature)
        if progress is not None:
            progress(bundle._span(1 + len(bundle) + header["artifacts"] + header.get("external", 0) + i))
