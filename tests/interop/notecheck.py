"""Build and run the Go `notecheck` program: an independent C2SP signed-note
verifier (golang.org/x/mod/sumdb/note) used to cross-check our Python output.

The build is offline: GOPATH mode against Debian's golang-golang-x-mod-dev
source in /usr/share/gocode (x/mod's note package needs only the Go stdlib),
so no module download is ever attempted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "notecheck"
GOPATH_ROOT = Path("/usr/share/gocode")
NOTE_PKG = GOPATH_ROOT / "src/golang.org/x/mod/sumdb/note"


def _go_env(tmpdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",  # GOPATH mode: resolve imports from /usr/share/gocode
        GOPATH=str(GOPATH_ROOT),
        GOPROXY="off",  # never reach for the network
        GOFLAGS="",  # a stray -mod=... would be rejected in GOPATH mode
        GOCACHE=str(tmpdir / "gocache"),  # writable by any user, unlike ~/.cache
        CGO_ENABLED="0",  # no C toolchain needed
    )
    return env


def build_notecheck(tmpdir: Path) -> Path | None:
    """Build the binary into tmpdir; None when Go or the x/mod source is missing."""
    go = shutil.which("go")
    if go is None or not (NOTE_PKG / "note.go").is_file():
        return None
    tmpdir = Path(tmpdir)
    binary = tmpdir / "notecheck"
    if binary.is_file():  # build once per tmpdir
        return binary
    proc = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=SOURCE_DIR,
        env=_go_env(tmpdir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # With Go and x/mod present a failed build is a real error, not a skip.
    if proc.returncode != 0:
        raise RuntimeError(f"go build of notecheck failed:\n{proc.stderr}")
    return binary


def run_notecheck(
    binary: Path, note_text: str, log_vkey: str, witness_vkeys: list[str]
) -> tuple[int, dict | str]:
    """Run notecheck on a note; return (0, parsed JSON) or (exit code, stderr)."""
    # A fresh file per call so parallel runs never share one.
    fd, name = tempfile.mkstemp(prefix="note-", suffix=".txt", dir=Path(binary).parent)
    try:
        # Write bytes exactly: no newline translation, UTF-8 for the em dash.
        with os.fdopen(fd, "wb") as f:
            f.write(note_text.encode("utf-8"))
        proc = subprocess.run(
            [str(binary), name, log_vkey, *witness_vkeys],
            capture_output=True,
            timeout=60,
        )
    finally:
        os.unlink(name)
    if proc.returncode != 0:
        return proc.returncode, proc.stderr.decode("utf-8", "replace")
    return 0, json.loads(proc.stdout)
