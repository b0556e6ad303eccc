"""Portable bundles: export, the hostile-input reader, import, and the CLI (specs/bundle.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradledger.ledger import bundle as B
from gradledger.ledger import credentials, encoding
from gradledger.ledger.bundle import Bundle, export_bundle, import_bundle
from gradledger.ledger.checker import check_records
from gradledger.ledger.errors import (
    BundleError,
    EncodingError,
    GradledgerError,
    ProofError,
    SignatureError,
    UnusableInput,
    VerificationError,
)
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.witness import cosign
from gradledger.training import cli
from gradledger.training.dataset import commit_dataset, load_dataset, load_inputs
from gradledger.training.trainer import Trainer
from helpers import build_ledger
from test_trainer import MANIFESTS, STEPS, WORLD, X, engine_for, new_ledger, parts

WITNESS = SigningKey.from_seed(bytes([90]) * 32, "notary")


def _items(data: bytes) -> list[bytes]:
    """Split a well-formed bundle into its item payloads (test-side, trusting the framing)."""
    out, pos = [], 0
    while pos < len(data):
        info = data[pos] & 0x1F
        width = 0 if info < 24 else 1 << (info - 24)
        n = info if info < 24 else int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        start = pos + 1 + width
        out.append(data[start : start + n])
        pos = start + n
    return out


def _frame(items: list[bytes]) -> bytes:
    return b"".join(encoding.bstr_header(len(x)) + x for x in items)


@pytest.fixture(scope="module")
def governed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A governed run whose dataset inputs are stored, with a witness-cosigned tree head; closed."""
    path = tmp_path_factory.mktemp("governed") / "ledger"
    led, _ = new_ledger(path)
    ds = commit_dataset(led, MANIFESTS, "digits-inputs", WORLD.trainer, inputs=X)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, STEPS)
    cred = credentials.issue(WORLD.root, subject="notary", path="acme/witnesses", role="witness",
                             public_key=WITNESS.public_key)
    led.append("CredentialIssued", {"credential": cred.signed}, WORLD.root)
    head = led.tree_head(WORLD.trainer)
    led.add_cosignature(head.seq, WITNESS.key_id, cosign(head, WITNESS))
    info = {"path": path, "inputs": ds.data, "dataset_seq": ds.seq, "size": led.size, "root": led.root,
            "origin": led.origin, "records": list(led.records()), "artifacts": dict(led.artifacts()),
            "cosignatures": list(led.cosignatures())}
    led.close()
    assert info["inputs"] in info["artifacts"]
    return info


@pytest.fixture(scope="module")
def exported(governed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    with Ledger.open(governed["path"]) as led:
        export_bundle(led, out / "run.glb")
        export_bundle(led, out / "run-data.glb", with_data=True)
    return {"plain": out / "run.glb", "data": out / "run-data.glb"}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small bundle with every kind of item, for the hostile-input properties."""
    path = tmp_path_factory.mktemp("small")
    led, world = build_ledger(path / "ledger", updates=3, tree_head_every=3)
    cred = credentials.issue(world.root, subject="notary", path="acme/witnesses", role="witness",
                             public_key=WITNESS.public_key)
    led.append("CredentialIssued", {"credential": cred.signed}, world.root)
    head = led.tree_head(world.trainer)
    led.add_cosignature(head.seq, WITNESS.key_id, cosign(head, WITNESS))
    for blob in (b"", b"a", b"checkpoint" * 30):
        led.put_artifact(blob)
    export_bundle(led, path / "small.glb")
    led.close()
    return (path / "small.glb").read_bytes()


# -- export and the reader --------------------------------------------------------------


def test_bundle_holds_the_ledger(governed: dict[str, Any], exported: dict[str, Path]) -> None:
    with Bundle.open(exported["plain"]) as b:
        h = b.header
        assert h == {"format": "gradledger-bundle", "version": 1, "origin": governed["origin"],
                     "records": governed["size"], "artifacts": len(governed["artifacts"]) - 1,
                     "cosignatures": 1, "size": governed["size"], "root": governed["root"], "with_data": False}
        assert len(b) == governed["size"]
        assert list(b.records()) == governed["records"]
        assert b.record(governed["size"] - 1) == governed["records"][-1][1]
        with pytest.raises(IndexError):
            b.record(governed["size"])
        assert b.artifact_digests() == frozenset(governed["artifacts"]) - {governed["inputs"]}
        for digest in b.artifact_digests():
            assert b.artifact(digest) == governed["artifacts"][digest]
        assert b.artifact(governed["inputs"]) is None
        assert b.cosignatures() == governed["cosignatures"]
        # What the verifier does with it: the records re-admit to the same root.
        _, report = check_records(b.records(), trusted_roots=[WORLD.root.public_key])
        assert (report.size, report.root) == (governed["size"], governed["root"])


def test_with_data_carries_the_inputs(governed: dict[str, Any], exported: dict[str, Path]) -> None:
    with Bundle.open(exported["data"]) as b:
        assert b.header["with_data"] is True
        assert b.artifact_digests() == frozenset(governed["artifacts"])
        assert hashlib.sha256(b.artifact(governed["inputs"])).digest() == governed["inputs"]
    assert exported["data"].stat().st_size > exported["plain"].stat().st_size


def test_export_is_deterministic(governed: dict[str, Any], exported: dict[str, Path], tmp_path: Path) -> None:
    with Ledger.open(governed["path"]) as led:
        export_bundle(led, tmp_path / "again.glb")
    assert (tmp_path / "again.glb").read_bytes() == exported["plain"].read_bytes()


def test_export_from_an_open_writer_includes_its_pending_records(tmp_path: Path) -> None:
    led, world = build_ledger(tmp_path / "l", updates=2)
    led.append("TreeHead", {"origin": led.origin, "size": led.size, "root": led.root}, world.trainer)
    header = export_bundle(led, tmp_path / "b.glb")
    assert header["records"] == led.size == 8
    led.close()


def test_empty_ledger_round_trips(tmp_path: Path) -> None:
    with Ledger.create(tmp_path / "l") as led:
        header = export_bundle(led, tmp_path / "b.glb")
    assert (header["records"], header["origin"]) == (0, "")
    with import_bundle(tmp_path / "b.glb", tmp_path / "l2") as led2:
        assert (led2.size, led2.origin) == (0, "")


# -- import ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "data"])
def test_import_rebuilds_the_same_ledger(governed: dict[str, Any], exported: dict[str, Path], tmp_path: Path,
                                         kind: str) -> None:
    target = tmp_path / "imported"
    seen: list[int] = []
    with import_bundle(exported[kind], target, progress=seen.append) as led:
        assert sum(seen) == exported[kind].stat().st_size
        assert (led.size, led.root, led.origin) == (governed["size"], governed["root"], governed["origin"])
        assert list(led.records()) == governed["records"]
        want = dict(governed["artifacts"])
        if kind == "plain":
            del want[governed["inputs"]]
        assert dict(led.artifacts()) == want
        assert list(led.cosignatures()) == governed["cosignatures"]
        led.verify(trusted_roots=[WORLD.root.public_key])
        # The indexes are rebuilt too, and the dataset reloads from the imported ledger.
        assert led.by_type("GovernedUpdate") and led.by_example(0) == _by_example(governed["path"], 0)
        ds = load_dataset(led, governed["dataset_seq"])
        if kind == "data":
            assert load_inputs(led, ds).equal(X)
        # It is an ordinary writable ledger: it takes new observations.
        led.tree_head(WORLD.trainer)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _by_example(path: Path, index: int) -> list[int]:
    with Ledger.open(path) as led:
        return led.by_example(index)


def test_import_into_an_empty_directory(exported: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with import_bundle(exported["plain"], tmp_path / "empty") as led:
        assert led.size > 0


def test_import_refuses_an_occupied_target(exported: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for target in (tmp_path / "full", tmp_path / "file"):
        with pytest.raises(UnusableInput, match="exists"):
            import_bundle(exported["plain"], target)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def _rewrite(src: Path, dst: Path, edit: Any) -> Path:
    items = _items(src.read_bytes())
    edit(items)
    dst.write_bytes(_frame(items))
    return dst


def _no_ledger_left(tmp_path: Path, target: Path) -> None:
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if ".import-" in p.name]


def test_import_refuses_a_forged_record_naming_it(exported: dict[str, Path], tmp_path: Path) -> None:
    def forge(items: list[bytes]) -> None:
        record = bytearray(items[1 + 9])
        record[-5] ^= 0x40  # inside record 9's signature: the framing stays intact
        items[1 + 9] = bytes(record)

    bad = _rewrite(exported["plain"], tmp_path / "bad.glb", forge)
    with Bundle.open(bad) as b, pytest.raises(SignatureError) as caught:
        check_records(b.records())
    assert caught.value.seq == 9
    with pytest.raises(SignatureError) as caught:
        import_bundle(bad, tmp_path / "l")
    assert caught.value.seq == 9
    _no_ledger_left(tmp_path, tmp_path / "l")


@pytest.mark.parametrize("field, value", [("root", bytes(32)), ("size", 3), ("origin", "gradledger:" + "0" * 32)])
def test_import_compares_the_header_with_the_records(exported: dict[str, Path], tmp_path: Path,
                                                     field: str, value: Any) -> None:
    def lie(items: list[bytes]) -> None:
        header = encoding.decode(items[0])
        header[field] = value
        items[0] = encoding.encode(header)

    bad = _rewrite(exported["plain"], tmp_path / "lie.glb", lie)
    Bundle.open(bad).close()  # the framing is fine: the header's claims are only compared at import
    with pytest.raises(BundleError, match="header says"):
        import_bundle(bad, tmp_path / "l")
    _no_ledger_left(tmp_path, tmp_path / "l")


def test_import_refuses_forged_and_stray_cosignatures(exported: dict[str, Path], tmp_path: Path) -> None:
    def forge(items: list[bytes]) -> None:
        seq, kid, sig = encoding.decode(items[-1])
        items[-1] = encoding.encode([seq, kid, bytes(64)])

    def stray(items: list[bytes]) -> None:
        seq, kid, sig = encoding.decode(items[-1])
        items[-1] = encoding.encode([seq + 1000, kid, sig])

    with pytest.raises(SignatureError):
        import_bundle(_rewrite(exported["plain"], tmp_path / "f.glb", forge), tmp_path / "l")
    with pytest.raises(ProofError, match="beyond the log"):
        import_bundle(_rewrite(exported["plain"], tmp_path / "s.glb", stray), tmp_path / "l")
    _no_ledger_left(tmp_path, tmp_path / "l")


# -- atomic export -------------------------------------------------------------------


def test_interrupted_export_leaves_no_bundle(governed: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "run.glb"
    real = B._write_item
    calls = {"n": 0}

    def failing(out: Any, data: bytes, progress: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        real(out, data, progress)

    monkeypatch.setattr(B, "_write_item", failing)
    with Ledger.open(governed["path"]) as led, pytest.raises(OSError):
        export_bundle(led, target)
    assert calls["n"] == 20
    assert list(tmp_path.iterdir()) == []

    # A bundle already at the target survives a failed re-export untouched.
    target.write_bytes(b"previous bundle")
    calls["n"] = 0
    with Ledger.open(governed["path"]) as led, pytest.raises(OSError):
        export_bundle(led, target)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"previous bundle"


# -- hostile input -------------------------------------------------------------------


def _open_bytes(data: bytes) -> Bundle:
    with tempfile.NamedTemporaryFile(suffix=".glb", delete=False) as f:
        f.write(data)
    try:
        return Bundle.open(f.name)
    finally:
        os.unlink(f.name)  # the map keeps the data while the bundle is open


def _header(**changes: Any) -> bytes:
    h = {"format": "gradledger-bundle", "version": 1, "origin": "", "records": 0, "artifacts": 0,
         "cosignatures": 0, "size": 0, "root": bytes(32), "with_data": False}
    h.update(changes)
    return encoding.encode({k: v for k, v in h.items() if v is not ...})


REC = b"\x82" + bytes(100)  # long enough to pass the framing; admission would refuse it
COSIG = encoding.encode([4, bytes(32), bytes(64)])
CASES = {
    "not a byte string": (b"\xa1" + _frame([_header()])[1:], "major type 5"),
    "indefinite length": (b"\x5f" + _frame([_header()]), "indefinite"),
    "reserved length": (b"\x5c" + _frame([_header()]), "reserved"),
    "non-canonical length": (b"\x58\x05hello", "shortest"),
    "truncated length": (b"\x5a\x00\x01", "truncated in its length"),
    "header too large": (encoding.bstr_header(70000) + bytes(70000), "limit 65536"),
    "header not CBOR": (_frame([b"\xff\xff"]), "not a gradledger bundle header"),
    "header not canonical": (_frame([b"\xa0\x00"]), "not a gradledger bundle header"),
    "wrong format": (_frame([_header(format="zip")]), "format"),
    "wrong version": (_frame([_header(version=3)]), "version"),
    # Version 2 (specs/bundle.md §5) states its external count; version 1 never does.
    "version 2 without external": (_frame([_header(version=2)]), "external"),
    "version 1 with external": (_frame([_header(external=0)]), "external"),
    "unknown field": (_frame([_header(extra=1)]), "unknown field"),
    "missing field": (_frame([_header(with_data=...)]), "missing"),
    "count beyond 2^32": (_frame([_header(artifacts=(1 << 32) + 1)]), "more than"),
    "counts beyond the file": (_frame([_header(records=1 << 32)]), "truncated or damaged"),
    "record missing": (_frame([_header(records=2), REC]) + b"\x00" * 70, "item 2 (record 1)"),
    "record too short": (_frame([_header(records=1), b"\x82" + bytes(40)]) + bytes(40), "item 1 (record 0)"),
    "record too long": (_frame([_header(records=1)]) + encoding.bstr_header(B.MAX_RECORD_SIZE + 1) + bytes(100),
                        "outside"),
    "record past the end": (_frame([_header(records=1)]) + b"\x59\x10\x00" + bytes(100), "truncated (4096"),
    "trailing bytes": (_frame([_header(records=1), REC]) + b"\x40", "trailing"),
    "artifacts out of order": (_frame([_header(artifacts=2), b"b", b"a"])
                               if hashlib.sha256(b"b").digest() > hashlib.sha256(b"a").digest()
                               else _frame([_header(artifacts=2), b"a", b"b"]), "ascending digest"),
    "duplicate artifacts": (_frame([_header(artifacts=2), b"a", b"a"]), "ascending digest"),
    "cosignature not CBOR": (_frame([_header(cosignatures=1), COSIG[:-1] + b"\xff" * 2]), "item 1 (cosignature 0)"),
    "cosignature wrong shape": (_frame([_header(cosignatures=1), encoding.encode([4, bytes(31), bytes(66)])]),
                                "not [tree head seq"),
    "duplicate cosignatures": (_frame([_header(cosignatures=2), COSIG, COSIG]), "ascending (seq, key id)"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_framing_is_refused_naming_where(name: str) -> None:
    data, message = CASES[name]
    with pytest.raises(BundleError, match=re.escape(message)) as caught:
        _open_bytes(data)
    assert "\n" not in str(caught.value)


def test_unreadable_paths_are_bundle_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.glb").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo")
    for name, message in (("missing.glb", "no such"), ("empty.glb", "empty"), (".", "not a regular"),
                          ("fifo", "not a regular")):
        with pytest.raises(BundleError, match=message):
            Bundle.open(tmp_path / name)


def _framing_offsets(data: bytes) -> list[int]:
    """Offsets of every byte of every item head."""
    out, pos = [], 0
    while pos < len(data):
        info = data[pos] & 0x1F
        width = 0 if info < 24 else 1 << (info - 24)
        n = info if info < 24 else int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        out.extend(range(pos, pos + 1 + width))
        pos += 1 + width + n
    return out


def _consume(data: bytes) -> None:
    """Open and read everything, as the verifier would; only typed errors may escape."""
    try:
        with _open_bytes(data) as b:
            for digest in b.artifact_digests():
                assert hashlib.sha256(b.artifact(digest)).digest() == digest
            b.cosignatures()
            check_records(b.records())
    except (BundleError, EncodingError, VerificationError):
        pass


HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HOSTILE
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_every_truncation_is_refused(small: bytes, cut: int) -> None:
    cut %= len(small)
    with pytest.raises(BundleError):
        _open_bytes(small[:cut])


@HOSTILE
@given(data=st.data())
def test_flipped_framing_bytes_never_crash(small: bytes, data: st.DataObject) -> None:
    offsets = _framing_offsets(small)
    flips = data.draw(st.lists(st.tuples(st.sampled_from(offsets), st.integers(1, 255)), min_size=1, max_size=3))
    mutated = bytearray(small)
    for at, mask in flips:
        mutated[at] ^= mask
    _consume(bytes(mutated))


@HOSTILE
@given(data=st.data())
def test_flipped_bytes_anywhere_never_crash(small: bytes, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(small) - 1))
    mutated = bytearray(small)
    mutated[at] ^= data.draw(st.integers(1, 255))
    _consume(bytes(mutated))


@HOSTILE
@given(garbage=st.binary(max_size=512), prefix=st.booleans())
def test_garbage_is_refused(small: bytes, garbage: bytes, prefix: bool) -> None:
    # With the real header in front, garbage must still be caught by the framing.
    data = small[: len(_frame([_items(small)[0]]))] + garbage if prefix else garbage
    with pytest.raises((BundleError, EncodingError)):
        _open_bytes(data)


# -- the command line -----------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_import_round_trip(governed: dict[str, Any], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    glb = tmp_path / "run.glb"
    code, out, err = _cli(capsys, "export", str(governed["path"]), "-o", str(glb))
    assert code == 0, err
    assert out.count("\n") == 1 and f"{governed['size']} observations" in out and str(glb) in out
    assert f"{glb.stat().st_size} bytes" in out

    code, out, _ = _cli(capsys, "export", str(governed["path"]), "-o", str(tmp_path / "d.glb"), "--with-data",
                        "--json")
    summary = json.loads(out)
    assert code == 0 and summary["with_data"] is True
    assert summary["artifacts"] == len(governed["artifacts"]) and summary["root"] == governed["root"].hex()

    code, out, err = _cli(capsys, "import", str(glb), str(tmp_path / "copy"))
    assert code == 0, err
    _, inspected, _ = _cli(capsys, "inspect", str(governed["path"]), "--json")
    assert out.strip().endswith(f"root {json.loads(inspected)['root']}")
    _, inspected_copy, _ = _cli(capsys, "inspect", str(tmp_path / "copy"), "--json")
    assert json.loads(inspected_copy)["root"] == json.loads(inspected)["root"]

    # The target now exists and is not empty: refused, one line, nothing touched.
    code, out, err = _cli(capsys, "import", str(glb), str(tmp_path / "copy"), "--json")
    assert (code, out) == (2, "") and err.count("\n") == 1 and "exists" in err


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "directory"])
def test_cli_unusable_bundles_exit_2_with_one_line(exported: dict[str, Path], tmp_path: Path, kind: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    glb = tmp_path / "x.glb"
    if kind == "garbage":
        glb.write_bytes(os.urandom(3000))
    elif kind == "truncated":
        glb.write_bytes(exported["plain"].read_bytes()[:-100])
    elif kind == "directory":
        glb.mkdir()
    code, out, err = _cli(capsys, "import", str(glb), str(tmp_path / "l"))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("gradledger: ") and "Traceback" not in err
    assert not (tmp_path / "l").exists()


def test_cli_forged_record_exits_1_naming_it(exported: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def forge(items: list[bytes]) -> None:
        items[1 + 7] = items[1 + 7][:-1] + bytes([items[1 + 7][-1] ^ 1])

    bad = _rewrite(exported["plain"], tmp_path / "bad.glb", forge)
    code, out, err = _cli(capsys, "import", str(bad), str(tmp_path / "l"))
    assert code == 1 and "observation 7" in err and err.count("\n") == 1


def test_cli_export_errors_exit_2(governed: dict[str, Any], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["export", str(tmp_path / "nope"), "-o", str(tmp_path / "a.glb")],
                 ["export", str(governed["path"]), "-o", str(tmp_path / "no" / "dir" / "a.glb")],
                 ["export", str(governed["path"]), "-o", str(tmp_path)]):
        code, out, err = _cli(capsys, *args)
        assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_errors_are_typed() -> None:
    assert issubclass(BundleError, UnusableInput) and issubclass(BundleError, GradledgerError)
