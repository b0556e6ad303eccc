"""Load a run's model program (a ``torch.export.save`` archive) without ever unpickling.

``torch.export.load`` calls ``torch.load(..., weights_only=False)`` for pickled weights and
constants, and ``pickle.loads`` for opaque constants, so handing it a hostile archive runs
arbitrary code. Three fences, in order (specs/replay.md §2):

1. the archive is read as a zip and refused when any member or payload config says "pickle"
   (pickled weights or constants, torchbind or opaque objects, legacy ``.pt`` payloads); only
   the sample inputs remain, which torch reads with its restricted weights-only unpickler;
2. ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` is set while loading, which overrides every
   ``weights_only=False`` inside torch;
3. the ``pickle`` module torch's archive reader would call is swapped for one that refuses.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from contextlib import contextmanager
from typing import Any, Iterator

from gradledger.ledger.errors import VerificationError

#: Bigger programs are refused before any parsing (weights of a model meant for CPU replay).
MAX_PROGRAM_BYTES = 4 << 30
MAX_MEMBERS = 100_000


class ProgramError(VerificationError):
    """The model program is not a safe, loadable export archive."""


def _refuse_pickle(member: str) -> None:
    raise ProgramError(f"model program member {member!r} carries a pickle payload; refused without loading it")


def scan_archive(data: bytes) -> None:
    """Refuse an archive that is not a zip or that would make torch unpickle anything."""
    if len(data) > MAX_PROGRAM_BYTES:
        raise ProgramError(f"model program is {len(data)} bytes, above the {MAX_PROGRAM_BYTES} limit")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ProgramError(f"model program is not a zip archive: {exc}") from None
    if len(infos) > MAX_MEMBERS:
        raise ProgramError(f"model program has {len(infos)} members")
    with archive:
        for info in infos:
            name = info.filename
            base = name.rsplit("/", 1)[-1]
            # torch.save's own zip layout (data.pkl), legacy weight/constant files, and the
            # torchbind/opaque constant prefixes are pickles by construction.
            # The sample inputs are a torch.save payload that torch reads with the restricted
            # weights-only unpickler (forced below); everything else pickled is refused.
            sample_inputs = "/sample_inputs/" in name and base.endswith(".pt")
            if (base.endswith((".pkl", ".pt", ".pth")) and not sample_inputs) or base.startswith(
                ("custom_obj_", "opaque_obj_")
            ):
                _refuse_pickle(name)
            if info.file_size > MAX_PROGRAM_BYTES:
                raise ProgramError(f"model program member {name!r} claims {info.file_size} bytes")
            if base.endswith(".json") and ("weights_config" in base or "constants_config" in base):
                try:
                    config = json.loads(archive.read(info))
                except ValueError as exc:
                    raise ProgramError(f"model program config {name!r} is not JSON: {exc}") from None
                for fqn, meta in (config.get("config") or {}).items():
                    if isinstance(meta, dict) and meta.get("use_pickle"):
                        _refuse_pickle(f"{name}:{fqn}")
                    path = meta.get("path_name", "") if isinstance(meta, dict) else ""
                    if isinstance(path, str) and path.startswith(("custom_obj_", "opaque_obj_")):
                        _refuse_pickle(f"{name}:{fqn}")


class _NoPickle:
    """Stands in for the ``pickle`` module inside torch's archive reader."""

    def __getattr__(self, name: str) -> Any:
        def refuse(*_: Any, **__: Any) -> Any:
            raise ProgramError("model program loading tried to unpickle; refused")

        return refuse


@contextmanager
def _weights_only() -> Iterator[None]:
    from torch.export.pt2_archive import _package

    saved_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    saved_pickle = _package.pickle
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    _package.pickle = _NoPickle()  # type: ignore[assignment]
    try:
        yield
    finally:
        _package.pickle = saved_pickle
        if saved_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved_env


def load_program(data: bytes) -> Any:
    """The program's trainable module: ``module(x, profiles)`` is the gated model of the run."""
    import torch

    scan_archive(data)
    try:
        with _weights_only():
            program = torch.export.load(io.BytesIO(data))
    except ProgramError:
        raise
    except Exception as exc:  # torch raises many kinds for a malformed archive
        raise ProgramError(f"model program does not load: {type(exc).__name__}: {str(exc)[:200]}") from None
    return program.module()
