"""An artifact store by digest: where a bundle's checkpoints live when they travel outside it.

Checkpoints are most of a run's bytes, and a sampled verification restores only a few of them
(specs/replay.md §5). A bundle exported with ``--artifacts-to STORE`` carries the records and
the small artifacts and names its checkpoints by SHA-256 (specs/bundle.md §5); the store holds
one file per artifact, ``STORE/sha256/<first two hex digits>/<64 hex digits>``, so a verifier
fetches exactly the ones it replays.

A store is a local directory (a plain path or a ``file://`` URL: no extra package) or, where the
optional ``fsspec`` is installed (``pip install 'gradledger[store]'``), any URL with a scheme
fsspec knows (``s3://``, ``gs://``, ``memory://``). The store is not trusted: every fetch is
bounded before it is read (at most ``MAX_ARTIFACT_SIZE``, the bound of one bundle item) and
hashed before it is returned, and a file that is missing, too large, unreadable or hashes to
another digest is an ``ArtifactUnavailable`` naming the digest (a failed check, exit 1), never a
crash. Writes are atomic (a ``.part`` file renamed into place) and idempotent (a file already
there that hashes to its name is left alone; one that does not is replaced).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from .bundle import MAX_ARTIFACT_SIZE
from .errors import ArtifactUnavailable, UnusableInput
from .files import read_at_most

__all__ = ["ArtifactStore", "INSTALL_HINT", "relative_path"]

INSTALL_HINT = "pip install 'gradledger[store]'"


def relative_path(digest: bytes) -> str:
    """Where the artifact named ``digest`` lives inside a store (specs/bundle.md §5.1)."""
    name = digest.hex()
    return f"sha256/{name[:2]}/{name}"


class ArtifactStore:
    """A store at ``location``: a directory, or an fsspec URL. ``create``: make a local one if absent.

    Counts what it reads (``bytes_fetched``, ``fetched``), so a verification can state what the
    sample cost (report figure ``external_bytes_fetched``).
    """

    def __init__(self, location: str, *, create: bool = False) -> None:
        self.location = location
        self.bytes_fetched = 0
        self.fetched: list[bytes] = []
        self._fs: Any = None
        scheme, sep, rest = location.partition("://")
        if sep and scheme != "file":
            try:
                import fsspec
            except ImportError:
                raise UnusableInput(f"{location}: an artifact store URL needs fsspec ({INSTALL_HINT})") from None
            try:
                self._fs, self._root = fsspec.core.url_to_fs(location)
            except (ValueError, ImportError) as exc:  # an unknown scheme, or its own package missing
                raise UnusableInput(f"{location}: cannot open the artifact store: {exc}") from None
            self._root = self._root.rstrip("/")
            return
        root = Path(rest if sep else location)
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UnusableInput(f"{location}: cannot make the artifact store: {exc.strerror or exc}") from None
        if not root.is_dir():
            raise UnusableInput(f"{location}: no such artifact store (a directory)")
        self._root = str(root)

    def _path(self, digest: bytes) -> str:
        return f"{self._root}/{relative_path(digest)}"

    # -- reading -------------------------------------------------------------------

    def fetch(self, digest: bytes, limit: int = MAX_ARTIFACT_SIZE) -> bytes:
        """The artifact named ``digest``, its size bounded before reading and its SHA-256 checked.

        Raises ``ArtifactUnavailable`` (naming the digest) for a file that is missing, larger
        than ``limit``, not a regular file, unreadable, or not the bytes of that digest.
        """
        data = self._read(digest, limit)
        self.bytes_fetched += len(data)
        self.fetched.append(digest)
        if hashlib.sha256(data).digest() != digest:
            raise ArtifactUnavailable(digest, "the store's file does not hash to its name (it hashes to "
                                      f"{hashlib.sha256(data).hexdigest()})")
        return data

    def _read(self, digest: bytes, limit: int) -> bytes:
        path = self._path(digest)
        if self._fs is not None:
            return self._read_fsspec(digest, path, limit)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ArtifactUnavailable(digest, "not in the artifact store") from None
        except OSError as exc:
            raise ArtifactUnavailable(digest, f"cannot open it in the artifact store: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactUnavailable(digest, "the store holds something other than a regular file under its name")
            if st.st_size > limit:
                raise ArtifactUnavailable(digest, f"the store's file has {st.st_size} bytes, above the {limit} an "
                                          "artifact may have")
            os.set_blocking(fd, True)
            data = read_at_most(fd, limit, chunk=1 << 24)
        except OSError as exc:
            raise ArtifactUnavailable(digest, f"cannot read it from the artifact store: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise ArtifactUnavailable(digest, f"the store's file grew past {limit} bytes while being read")
        return data

    def _read_fsspec(self, digest: bytes, path: str, limit: int) -> bytes:
        try:
            info = self._fs.info(path)
        except FileNotFoundError:
            raise ArtifactUnavailable(digest, "not in the artifact store") from None
        except Exception as exc:  # noqa: BLE001 - each filesystem raises its own kinds
            raise ArtifactUnavailable(digest, f"cannot read it from the artifact store: {exc}") from None
        size = info.get("size")
        if info.get("type") != "file" or type(size) is not int:
            raise ArtifactUnavailable(digest, "the store holds something other than a file under its name")
        if size > limit:
            raise ArtifactUnavailable(digest, f"the store's file has {size} bytes, above the {limit} an artifact "
                                      "may have")
        try:
            with self._fs.open(path, "rb") as f:
                data = f.read(size + 1)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactUnavailable(digest, f"cannot read it from the artifact store: {exc}") from None
        if len(data) != size:
            raise ArtifactUnavailable(digest, f"the store's file changed size while being read ({size} bytes stated)")
        return data

    def holds(self, digest: bytes) -> bool:
        """Whether the store holds the artifact ``digest`` intact (read and hashed; not counted as fetched)."""
        try:
            data = self._read(digest, MAX_ARTIFACT_SIZE)
        except ArtifactUnavailable:
            return False
        return hashlib.sha256(data).digest() == digest

    # -- writing -------------------------------------------------------------------

    def put(self, data: bytes | memoryview) -> tuple[bytes, bool]:
        """Store ``data`` under its SHA-256; (digest, whether bytes were written). Atomic and idempotent."""
        if len(data) > MAX_ARTIFACT_SIZE:
            raise UnusableInput(f"an artifact of {len(data)} bytes is above the {MAX_ARTIFACT_SIZE} a store holds")
        digest = hashlib.sha256(data).digest()
        if self.holds(digest):
            return digest, False
        path = self._path(digest)
        part = f"{path}.{secrets.token_hex(6)}.part"
        try:
            if self._fs is not None:
                self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                with self._fs.open(part, "wb") as f:
                    f.write(bytes(data))
                self._fs.mv(part, path)
                return digest, True
            folder = Path(path).parent
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(part, path)
            except BaseException:
                Path(part).unlink(missing_ok=True)
                raise
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise UnusableInput(f"{self.location}: cannot write artifact {digest.hex()}: {exc.strerror or exc}") from None
        return digest, True
