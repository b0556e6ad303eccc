"""Checkpoints outside the bundle (issue 14; specs/bundle.md §5, specs/replay.md §6.1): the artifact store,
version-2 bundles that name checkpoints by digest, and a verifier that fetches only what replay uses."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradledger.ledger import artifact_store as S
from gradledger.ledger import encoding
from gradledger.ledger.artifact_store import ArtifactStore, relative_path
from gradledger.ledger.bundle import Bundle, export_bundle
from gradledger.ledger.errors import ArtifactUnavailable, UnusableInput
from gradledger.ledger.keys import write_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.merkle import CompactRange, leaf_hash
from gradledger.training import cli as train_cli
from helpers import verify_cli
from test_trainer import WORLD
from test_verify_cli import _train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A governed run with 5 checkpoints (4 segments), exported with its checkpoints in a store."""
    base = tmp_path_factory.mktemp("store")
    _train(base / "ledger", steps=8, every=2)
    roots = write_public_keys(base / "roots.pub", [(WORLD.root.public_key, "root")])
    store = base / "store"
    with Ledger.open(base / "ledger") as led:
        header = export_bundle(led, base / "ext.glb", with_data=True, artifacts_to=ArtifactStore(str(store), create=True))
        export_bundle(led, base / "plain.glb", with_data=True)
        checkpoints = [led.observation(s).body["artifact"] for s in led.by_type("Checkpoint")]
        records = [r for _, r in led.records()]
        artifacts = dict(led.artifacts())
        origin, program = led.origin, led.observation(led.by_type("RunStarted")[-1]).body["artifacts"]["program"]
    return {"base": base, "roots": roots, "store": store, "bundle": base / "ext.glb", "plain": base / "plain.glb",
            "header": header, "checkpoints": checkpoints, "records": records, "artifacts": artifacts,
            "origin": origin, "program": program}


def _copy_store(run: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(run["store"], tmp_path / "store"))


class _Counting:
    """Records every digest the verifier fetches from a store (the verifier runs in this process)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.digests: list[bytes] = []
        original = ArtifactStore.fetch

        def fetch(store: ArtifactStore, digest: bytes, limit: int = S.MAX_ARTIFACT_SIZE) -> bytes:
            self.digests.append(digest)
            return original(store, digest, limit)

        monkeypatch.setattr(ArtifactStore, "fetch", fetch)


# -- export ------------------------------------------------------------------------------------


def test_export_puts_checkpoints_in_the_store_and_names_them(run: dict[str, Any]) -> None:
    assert len(run["checkpoints"]) == 5
    with Bundle.open(run["bundle"]) as b:
        assert b.header["version"] == 2 and b.header["external"] == 5
        assert b.external_digests() == tuple(sorted(run["checkpoints"]))
        assert not b.artifact_digests() & set(run["checkpoints"])
        assert run["program"] in b.artifact_digests()  # only checkpoints go outside
    for digest in run["checkpoints"]:
        assert (run["store"] / relative_path(digest)).read_bytes() == run["artifacts"][digest]
    with Bundle.open(run["plain"]) as b:  # a plain export is unchanged: version 1, everything inside
        assert b.header["version"] == 1 and "external" not in b.header and not b.external_digests()
    assert run["bundle"].stat().st_size < run["plain"].stat().st_size


def test_export_into_a_store_again_writes_nothing_new(run: dict[str, Any], tmp_path: Path) -> None:
    store = _copy_store(run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    with Ledger.open(run["base"] / "ledger") as led:
        export_bundle(led, tmp_path / "again.glb", with_data=True, artifacts_to=ArtifactStore(str(store)))
    assert (tmp_path / "again.glb").read_bytes() == run["bundle"].read_bytes()
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before
    assert not list(store.rglob("*.part"))


def test_cli_export_and_import_with_the_store(run: dict[str, Any], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "new-store"
    out = tmp_path / "cli.glb"
    assert train_cli.main(["export", str(run["base"] / "ledger"), "-o", str(out), "--artifacts-to", str(store),
                           "--json"]) == 0
    assert '"external": 5' in capsys.readouterr().out
    assert out.read_bytes() == run["bundle"].read_bytes()
    assert train_cli.main(["import", str(out), str(tmp_path / "no")]) == 2
    assert "--artifacts STORE" in capsys.readouterr().err
    assert train_cli.main(["import", str(out), str(tmp_path / "imported"), "--artifacts", str(store)]) == 0
    with Ledger.open(tmp_path / "imported") as led:
        assert dict(led.artifacts()) == run["artifacts"]
    os.remove(store / relative_path(run["checkpoints"][2]))
    assert train_cli.main(["import", str(out), str(tmp_path / "missing"), "--artifacts", str(store)]) == 2
    assert run["checkpoints"][2].hex() in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


# -- verification ------------------------------------------------------------------------------


def test_round_trip_full_replay_fetches_every_checkpoint_once(run: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _Counting(monkeypatch)
    code, out = verify_cli(run["bundle"], run["roots"], "--artifacts", str(run["store"]))
    assert code == 0 and out["verified"], out["first_failure"]
    assert sorted(seen.digests) == sorted(run["checkpoints"])
    total = sum(len(run["artifacts"][d]) for d in run["checkpoints"])
    assert out["figures"]["external_bytes_fetched"] == total
    assert out["figures"]["external_fetched"] == out["figures"]["external_checkpoints"] == 5
    detail = next(c["detail"] for c in out["checks"] if c["name"] == "artifacts")
    assert "5 checkpoint artifacts held outside the bundle" in detail


@pytest.mark.parametrize("nonce", ["00", "01", "02", "ff"])
def test_sample_mode_fetches_only_the_challenged_segments(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                          nonce: str) -> None:
    seen = _Counting(monkeypatch)
    code, out = verify_cli(run["bundle"], run["roots"], "--artifacts", str(run["store"]), "--replay", "sample",
                           "--nonce", nonce)
    assert code == 0 and out["verified"], out["first_failure"]
    chosen = out["figures"]["sample_chosen"]
    ckpts = run["checkpoints"]
    # Segment i starts at checkpoint i; the run's head (what a release ships) is checked too.
    assert set(seen.digests) == {ckpts[i] for i in chosen} | {ckpts[-1]}
    assert len(seen.digests) == len(set(seen.digests))


def test_structure_only_needs_no_store(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _Counting(monkeypatch)
    code, out = verify_cli(run["bundle"], run["roots"], "--replay", "none")
    assert code == 0 and out["verified"], out["first_failure"]
    code, out = verify_cli(run["bundle"], run["roots"], "--replay", "none", "--artifacts", str(run["store"]))
    assert code == 0 and seen.digests == []


def test_without_the_store_replay_fails_naming_the_first_missing_digest(run: dict[str, Any]) -> None:
    code, out = verify_cli(run["bundle"], run["roots"])
    assert code == 1 and out["first_failure"]["name"] == "replay"
    assert run["checkpoints"][0].hex() in out["first_failure"]["detail"]
    assert "--artifacts" in out["first_failure"]["detail"]


@pytest.mark.parametrize("damage", ["missing", "flipped", "truncated", "directory"])
@pytest.mark.parametrize("which", [1, 4])  # a segment's start; the head, which exact replay never restores
def test_a_bad_artifact_in_the_store_fails_replay_naming_it(run: dict[str, Any], tmp_path: Path, damage: str,
                                                           which: int) -> None:
    store = _copy_store(run, tmp_path)
    digest = run["checkpoints"][which]
    path = store / relative_path(digest)
    data = path.read_bytes()
    path.unlink()
    if damage == "flipped":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncated":
        path.write_bytes(data[:-1])
    elif damage == "directory":
        path.mkdir()
    code, out = verify_cli(run["bundle"], run["roots"], "--artifacts", str(store))
    assert code == 1 and out["first_failure"]["name"] == "replay", out
    assert digest.hex() in out["first_failure"]["detail"]
    assert out["first_failure"]["seq"] is not None


def test_an_unopenable_store_is_unusable_input(run: dict[str, Any], tmp_path: Path) -> None:
    code, _ = verify_cli(run["bundle"], run["roots"], "--artifacts", str(tmp_path / "nowhere"))
    assert code == 2


def test_a_store_url_needs_fsspec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(UnusableInput, match=r"gradledger\[store\]"):
        ArtifactStore("s3://bucket/store")
    ArtifactStore("file://" + os.getcwd())  # a file:// URL needs nothing


def test_an_fsspec_memory_store_round_trips(run: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    url = f"memory://gradledger-test-{os.getpid()}"
    with Ledger.open(run["base"] / "ledger") as led:
        export_bundle(led, tmp_path / "mem.glb", with_data=True, artifacts_to=ArtifactStore(url))
    assert (tmp_path / "mem.glb").read_bytes() == run["bundle"].read_bytes()
    code, out = verify_cli(tmp_path / "mem.glb", run["roots"], "--artifacts", url, "--replay", "sample", "--nonce", "00")
    assert code == 0 and out["verified"], out["first_failure"]
    import fsspec

    fs = fsspec.filesystem("memory")
    victim = run["checkpoints"][-1]
    fs.pipe_file(f"{url}/{relative_path(victim)}", b"not the checkpoint")
    code, out = verify_cli(tmp_path / "mem.glb", run["roots"], "--artifacts", url, "--replay", "sample", "--nonce", "00")
    assert code == 1 and victim.hex() in out["first_failure"]["detail"]


# -- a hostile exporter ------------------------------------------------------------------------------


def _write_v2(path: Path, run: dict[str, Any], carried: set[bytes], external: set[bytes], *,
              artifacts_count: int | None = None, version: int = 2) -> Path:
    """A version-2 bundle written by the spec, with the given artifacts carried and named as external."""
    tree = CompactRange()
    for r in run["records"]:
        tree.append(leaf_hash(r))
    arts = {hashlib.sha256(a).digest(): a for a in (run["artifacts"].get(d, d) for d in carried)}
    header = {"format": "gradledger-bundle", "version": version, "origin": run["origin"], "records": len(run["records"]),
              "artifacts": len(arts) if artifacts_count is None else artifacts_count, "external": len(external),
              "cosignatures": 0, "size": len(run["records"]), "root": tree.root(), "with_data": True}
    with open(path, "wb") as f:
        for item in [encoding.encode(header), *run["records"], *(arts[d] for d in sorted(arts)), *sorted(external)]:
            f.write(encoding.bstr_header(len(item)) + item)
    return path


def _inside(run: dict[str, Any]) -> set[bytes]:
    return set(run["artifacts"]) - set(run["checkpoints"])


def test_the_spec_writer_agrees_with_the_exporter(run: dict[str, Any], tmp_path: Path) -> None:
    path = _write_v2(tmp_path / "spec.glb", run, _inside(run), set(run["checkpoints"]))
    assert path.read_bytes() == run["bundle"].read_bytes()


def test_a_non_checkpoint_artifact_listed_as_external_is_refused(run: dict[str, Any], tmp_path: Path) -> None:
    path = _write_v2(tmp_path / "bad.glb", run, _inside(run) - {run["program"]},
                     set(run["checkpoints"]) | {run["program"]})
    code, out = verify_cli(path, run["roots"], "--replay", "none")
    assert code == 1 and out["first_failure"]["name"] == "artifacts"
    assert run["program"].hex() in out["first_failure"]["detail"] and "only checkpoint" in out["first_failure"]["detail"]


def test_an_external_digest_no_record_names_is_refused(run: dict[str, Any], tmp_path: Path) -> None:
    stray = hashlib.sha256(b"nobody names me").digest()
    path = _write_v2(tmp_path / "bad.glb", run, _inside(run), set(run["checkpoints"]) | {stray})
    code, out = verify_cli(path, run["roots"], "--replay", "none")
    assert code == 1 and stray.hex() in out["first_failure"]["detail"]


def test_import_refuses_an_external_digest_no_checkpoint_names(run: dict[str, Any], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    stray = hashlib.sha256(b"nobody names me").digest()
    path = _write_v2(tmp_path / "bad.glb", run, _inside(run), set(run["checkpoints"]) | {stray})
    assert train_cli.main(["import", str(path), str(tmp_path / "led"), "--artifacts", str(run["store"])]) == 2
    assert stray.hex() in capsys.readouterr().err
    assert not (tmp_path / "led").exists()


def test_an_in_bundle_artifact_left_out_is_refused(run: dict[str, Any], tmp_path: Path) -> None:
    path = _write_v2(tmp_path / "bad.glb", run, _inside(run) - {run["program"]}, set(run["checkpoints"]))
    code, out = verify_cli(path, run["roots"], "--replay", "none")
    assert code == 1 and out["first_failure"]["name"] == "artifacts"
    assert run["program"].hex() in out["first_failure"]["detail"]


def test_a_digest_both_carried_and_external_is_unusable(run: dict[str, Any], tmp_path: Path) -> None:
    both = run["checkpoints"][0]
    path = _write_v2(tmp_path / "bad.glb", run, _inside(run) | {both}, set(run["checkpoints"]))
    code, _ = verify_cli(path, run["roots"], "--replay", "none")
    assert code == 2


def test_an_external_count_in_a_version_1_header_is_unusable(run: dict[str, Any], tmp_path: Path) -> None:
    path = _write_v2(tmp_path / "v1.glb", run, _inside(run), set(run["checkpoints"]), version=1)
    code, _ = verify_cli(path, run["roots"], "--replay", "none")
    assert code == 2


# -- the store itself ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), where=st.integers(min_value=0), bit=st.integers(0, 7))
def test_store_round_trip_and_any_flipped_bit_is_detected(tmp_path: Path, data: bytes, where: int, bit: int) -> None:
    store = ArtifactStore(str(tmp_path / "s"), create=True)
    digest, _ = store.put(data)
    assert digest == hashlib.sha256(data).digest()
    assert store.put(data) == (digest, False)
    assert store.fetch(digest) == data
    if data:
        path = tmp_path / "s" / relative_path(digest)
        damaged = bytearray(data)
        damaged[where % len(data)] ^= 1 << bit
        path.write_bytes(bytes(damaged))
        with pytest.raises(ArtifactUnavailable) as caught:
            store.fetch(digest)
        assert caught.value.digest == digest and digest.hex() in str(caught.value)
        assert store.put(data) == (digest, True)  # a damaged file is replaced
        assert store.fetch(digest) == data


def test_the_reader_refuses_oversize_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(str(tmp_path), create=True)
    digest = hashlib.sha256(b"x").digest()
    path = tmp_path / relative_path(digest)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(S.MAX_ARTIFACT_SIZE + 1)  # sparse: claims more than an artifact may hold

    def no_read(*_: Any) -> bytes:
        raise AssertionError("read before the size was bounded")

    monkeypatch.setattr(S.os, "read", no_read)
    with pytest.raises(ArtifactUnavailable, match="above"):
        store.fetch(digest)
    assert store.bytes_fetched == 0
    with pytest.raises(ArtifactUnavailable, match="not in the artifact store"):
        store.fetch(hashlib.sha256(b"y").digest())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_flipped_byte_in_a_version_2_bundle_never_crashes_the_reader(run: dict[str, Any], tmp_path: Path,
                                                                      data: st.DataObject) -> None:
    raw = bytearray(run["bundle"].read_bytes())
    # The header and the external items and cosignatures at the end: the framing version 2 adds.
    tail = 33 * 5 + 8
    at = data.draw(st.one_of(st.integers(0, 200), st.integers(len(raw) - tail, len(raw) - 1)))
    raw[at] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path / "flipped.glb"
    path.write_bytes(bytes(raw))
    try:
        with Bundle.open(path) as b:
            b.external_digests()
    except UnusableInput:
        pass
