"""One writer, many readers, growing maps, unusable inputs, and the indexes against a naive scan.

LMDB forbids opening one environment twice in a process, so wherever a reader and a writer must
be live at the same time, one of them runs in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradledger.ledger import credentials as C
from gradledger.ledger import envelope, merkle, postings
from gradledger.ledger.errors import (
    CorruptLedgerError,
    LedgerLockedError,
    NotALedgerError,
    UnusableInput,
)
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger

from helpers import build_ledger, genesis, make_world, update_body

TESTS_DIR = str(Path(__file__).resolve().parent)
PRELUDE = f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n"


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + code, *args], text=True, **kwargs)


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + code, *args], text=True, capture_output=True, timeout=timeout
    )


# -- one writer at a time ---------------------------------------------------------------------


def test_second_writer_in_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger, world = build_ledger(path, updates=5)
    try:
        with pytest.raises(LedgerLockedError, match=rf"open for writing by pid {os.getpid()}\b"):
            Ledger.open(path, writable=True)
        with pytest.raises(UnusableInput, match="already exists"):
            Ledger.create(path)
        # The refused attempt must not have released or disturbed the first writer's lock.
        with pytest.raises(LedgerLockedError):
            Ledger.open(path, writable=True)
        ledger.append("GovernedUpdate", update_body(5), world.trainer, commit=True)
        assert ledger.size == 11
    finally:
        ledger.close()

    again = Ledger.open(path, writable=True)
    try:
        again.append("GovernedUpdate", update_body(6), world.trainer, commit=True)
        assert again.verify().size == 12
    finally:
        again.close()


TRY_WRITE = r"""
from gradledger.ledger.errors import LedgerLockedError
from gradledger.ledger.ledger import Ledger
try:
    ledger = Ledger.open(sys.argv[1], writable=True)
except LedgerLockedError as exc:
    print("locked", exc)
else:
    print("opened", ledger.size)
    ledger.close()
"""

HOLD_WRITE = r"""
from gradledger.ledger.ledger import Ledger
ledger = Ledger.open(sys.argv[1], writable=True)
print("holding", flush=True)
sys.stdin.readline()
ledger.close()
print("released", flush=True)
"""


def test_second_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger, world = build_ledger(path, updates=3)
    try:
        result = run_python(TRY_WRITE, str(path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("locked"), result.stdout
        assert str(path) in result.stdout and f"pid {os.getpid()}" in result.stdout
    finally:
        ledger.close()
    result = run_python(TRY_WRITE, str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["opened", "8"]

    # And the other way round: a subprocess holds the writer, the parent is refused.
    holder = python(HOLD_WRITE, str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(LedgerLockedError, match=rf"open for writing by pid {holder.pid}\b"):
            Ledger.open(path, writable=True)
        reader = Ledger.open(path)  # reading is never refused
        assert reader.size == 8
        reader.close()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    with Ledger.open(path, writable=True) as ledger:
        ledger.append("GovernedUpdate", update_body(9), world.trainer, commit=True)
        assert ledger.size == 9


# -- readers beside a writer ------------------------------------------------------------------

WRITER = r"""
import random, time
from helpers import genesis, make_world, update_body
from gradledger.ledger.ledger import Ledger
world = make_world(3)
ledger = Ledger.create(sys.argv[1], group=int(sys.argv[2]))
genesis(ledger, world)
print("ready", ledger.size, flush=True)
rng = random.Random(5)
end = time.monotonic() + float(sys.argv[3])
step = 0
while time.monotonic() < end:
    ledger.append("GovernedUpdate", update_body(step, [rng.randrange(500) for _ in range(32)]), world.trainer)
    step += 1
    if step % 50 == 0:
        ledger.tree_head(world.trainer)
    if step % 37 == 0:
        ledger.put_artifact(rng.randbytes(3000))
ledger.close()
print("done", ledger.size, flush=True)
"""


def test_readers_see_a_growing_consistent_log_while_a_writer_appends(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    writer = python(WRITER, str(path), "8", "2.5", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = writer.stdout.readline().split()
        assert line and line[0] == "ready", writer.stderr.read()
        rng = random.Random(11)
        sizes: list[int] = []
        roots: dict[int, bytes] = {}
        while writer.poll() is None or len(sizes) < 3:
            reader = Ledger.open(path)
            try:
                size = reader.size
                assert size >= (sizes[-1] if sizes else 5)
                root = reader.root_at(size)
                assert root == reader.root
                records = list(reader.records(0, size))
                assert [seq for seq, _ in records] == list(range(size))
                # The chain holds inside one snapshot, up to the head this reader loaded.
                assert envelope.unseal(records[0][1]).prev == envelope.GENESIS_PREV
                tail = records[-41:]
                for (_, before), (seq, record) in zip(tail, tail[1:]):
                    sealed = envelope.unseal(record)
                    assert sealed.seq == seq and sealed.prev == hashlib.sha256(before).digest()
                assert reader.head == hashlib.sha256(records[-1][1]).digest()
                for seq in rng.sample(range(size), min(size, 12)) + [size - 1]:
                    proof = reader.inclusion_proof(seq, size)
                    merkle.verify_inclusion(merkle.leaf_hash(records[seq][1]), seq, size, proof, root)
                if sizes:
                    old = sizes[-1]
                    assert reader.root_at(old) == roots[old]
                    merkle.verify_consistency(old, size, reader.consistency_proof(old, size), roots[old], root)
                for seq in reader.by_type("TreeHead"):
                    if seq < size:
                        body = reader.observation(seq).body
                        assert reader.root_at(body["size"]) == body["root"]
                # Records committed after this reader opened are visible to later snapshots.
                assert sum(1 for _ in reader.records()) >= size
            finally:
                reader.close()
            sizes.append(size)
            roots[size] = root
            time.sleep(0.02)
        out, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, err
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    final = int(out.split()[-1])
    assert sizes == sorted(sizes)
    assert len(set(sizes)) >= 3, sizes  # the readers really saw the log grow
    with Ledger.open(path) as ledger:
        assert ledger.size == final
        assert ledger.verify().size == final


# -- map growth -------------------------------------------------------------------------------

OLD_READER = r"""
import hashlib
from gradledger.ledger.ledger import Ledger
reader = Ledger.open(sys.argv[1], map_size=int(sys.argv[2]))
print("opened", reader.size, reader._store.env.info()["map_size"], flush=True)
sys.stdin.readline()
count = sum(1 for _ in reader.records())
arts = list(reader.artifacts())
assert all(hashlib.sha256(data).digest() == digest for digest, data in arts)
# The log as it stood when this reader opened still proves itself from the grown map.
# (Not reader.verify(): see test_stale_reader_verifies_its_snapshot_while_a_writer_appends.)
from gradledger.ledger import merkle
leaves = [merkle.leaf_hash(record) for _, record in reader.records(0, reader.size)]
assert reader.root_at(reader.size) == merkle.root_of(leaves) == reader.root
print("read", count, len(arts), len(leaves), reader._store.env.info()["map_size"], flush=True)
"""


def test_map_grows_and_readers_opened_before_the_growth_keep_reading(tmp_path: Path) -> None:
    small = 256 * 1024
    path = tmp_path / "ledger"
    world = make_world(4)
    rng = random.Random(4)
    ledger = Ledger.create(path, map_size=small, group=16)
    genesis(ledger, world)
    reader = python(OLD_READER, str(path), str(small), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    try:
        opened = reader.stdout.readline().split()
        assert opened[:3] == ["opened", "5", str(small)], reader.stderr.read()

        digests = {}
        for step in range(400):
            batch = [rng.randrange(10_000) for _ in range(300)]
            ledger.append("GovernedUpdate", update_body(step, batch), world.trainer)
            if step % 80 == 0:
                data = rng.randbytes(200 * 1024)
                digests[ledger.put_artifact(data)] = data
            if step % 100 == 99:
                ledger.tree_head(world.trainer)
        ledger.commit()
        grown = ledger._store.env.info()["map_size"]
        assert grown >= 8 * small, grown  # at least three doublings
        report = ledger.verify()
        assert report.size == ledger.size == 409
        for digest, data in digests.items():
            assert ledger.artifact(digest) == data

        reader.stdin.write("go\n")
        reader.stdin.flush()
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        words = out.split()
        assert words[:4] == ["read", "409", str(len(digests)), "5"], out
        assert int(words[4]) >= grown
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        ledger.close()

    for map_size in (small, 1 << 30):
        with Ledger.open(path, map_size=map_size) as again:
            assert again.verify().root == report.root
            assert dict(again.artifacts()) == digests
    with Ledger.open(path, writable=True, map_size=small) as again:
        again.append("GovernedUpdate", update_body(500, list(range(300))), world.trainer, commit=True)
        again.put_artifact(rng.randbytes(300 * 1024))
        assert again.verify().size == 410


APPEND_MORE = r"""
from helpers import make_world, update_body
from gradledger.ledger import credentials
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.witness import cosign
world = make_world(0)
with Ledger.open(sys.argv[1], writable=True) as ledger:
    for step in range(3):
        ledger.append("GovernedUpdate", update_body(100 + step), world.trainer)
    ledger.commit()
    if sys.argv[2] == "cosign":
        witness = SigningKey.from_seed(bytes([7, 7]) * 16, "witness")
        cred = credentials.issue(world.root, subject="notary", path="acme/witnesses", role="witness",
                                 public_key=witness.public_key)
        ledger.append("CredentialIssued", {"credential": cred.signed}, world.root)
        head = ledger.tree_head(world.trainer)
        ledger.add_cosignature(head.seq, witness.key_id, cosign(head, witness))
    print(ledger.size)
"""


@pytest.mark.parametrize("more", ["records", "cosign"])
def test_stale_reader_verifies_its_snapshot_while_a_writer_appends(tmp_path: Path, more: str) -> None:
    path = tmp_path / "ledger"
    ledger, _ = build_ledger(path, updates=10, seed=0)
    ledger.close()
    with Ledger.open(path) as reader:
        assert reader.verify().size == 15
        result = run_python(APPEND_MORE, str(path), more)
        assert result.returncode == 0, result.stderr
        grown = int(result.stdout)
        assert grown > 15
        # verify() checks the latest committed snapshot as one consistent
        # whole, even through a handle opened before the writer appended.
        report = reader.verify()
        assert report.size == grown


# -- read-only and unusable inputs ------------------------------------------------------------


def test_read_only_ledger_refuses_appends(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger, world = build_ledger(path, updates=3)
    ledger.close()
    with Ledger.open(path) as reader:
        with pytest.raises(UnusableInput, match="read-only"):
            reader.append("GovernedUpdate", update_body(3), world.trainer)
        with pytest.raises(UnusableInput, match="read-only"):
            reader.append("GovernedUpdate", update_body(3), world.trainer, commit=True)
        with pytest.raises(UnusableInput, match="read-only"):
            reader.tree_head(world.trainer)
        reader.commit()  # nothing pending: a no-op, not an error
        assert reader.size == 8
    with Ledger.open(path) as reader:
        assert reader.verify().size == 8


def test_read_only_ledger_refuses_artifacts_and_cosignatures_clearly(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger, _ = build_ledger(path, updates=1)
    ledger.close()
    with Ledger.open(path) as reader:
        with pytest.raises(UnusableInput, match="read-only"):
            reader.put_artifact(b"weights")
        with pytest.raises(UnusableInput, match="read-only"):
            reader.add_cosignature(6, b"w" * 32, b"s" * 64)


@pytest.mark.parametrize("writable", [False, True])
def test_open_refuses_what_is_not_a_ledger(tmp_path: Path, writable: bool) -> None:
    with pytest.raises(NotALedgerError):
        Ledger.open(tmp_path / "missing", writable=writable)
    assert not (tmp_path / "missing").exists()

    a_file = tmp_path / "file"
    a_file.write_bytes(b"hello")
    with pytest.raises(NotALedgerError):
        Ledger.open(a_file, writable=writable)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotALedgerError, match="not a gradledger ledger"):
        Ledger.open(empty, writable=writable)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "data.mdb").write_bytes(random.Random(1).randbytes(64 * 1024))
    with pytest.raises(CorruptLedgerError):
        Ledger.open(garbage, writable=writable)

    zeros = tmp_path / "zeros"
    zeros.mkdir()
    (zeros / "data.mdb").write_bytes(bytes(64 * 1024))
    with pytest.raises((NotALedgerError, CorruptLedgerError)):
        Ledger.open(zeros, writable=writable)

    truncated_to_nothing = tmp_path / "zero-length"
    truncated_to_nothing.mkdir()
    (truncated_to_nothing / "data.mdb").write_bytes(b"")
    with pytest.raises((NotALedgerError, CorruptLedgerError)):
        Ledger.open(truncated_to_nothing, writable=writable)

    # A valid LMDB environment that gradledger never wrote.
    import lmdb

    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"something-else/1")
    env.close()
    with pytest.raises((NotALedgerError, CorruptLedgerError)):
        Ledger.open(foreign, writable=writable)

    for bad in (NotALedgerError, CorruptLedgerError):
        assert issubclass(bad, UnusableInput)

    # None of these refusals left a lock behind that would stop a real ledger being made there.
    with Ledger.create(tmp_path / "real") as fine:
        assert fine.size == 0


OPEN_TRUNCATED = r"""
from gradledger.ledger.errors import UnusableInput
from gradledger.ledger.ledger import Ledger
try:
    ledger = Ledger.open(sys.argv[1])
    ledger.verify()
    list(ledger.records())
except UnusableInput as exc:
    print("refused", type(exc).__name__, exc)
else:
    print("read it all")
"""


def test_truncated_ledger_is_refused_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    ledger, _ = build_ledger(path, updates=300)
    ledger.close()
    data = path / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    result = run_python(OPEN_TRUNCATED, str(path))
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    assert result.stdout.startswith("refused"), result.stdout


# -- indexes against a naive scan -------------------------------------------------------------

AUTHORITY_PATHS = [
    "acme/radiology",
    "acme/radiology/attending",
    "acme/radiology/attending/night",
    "acme/radiology2",
    "acme/radiology2/lf",
    "acme/rad",
    "acme/training",
    "acme",
    "acmex/radiology",
]
QUERY_PREFIXES = sorted(
    set(AUTHORITY_PATHS)
    | {"acme/radiology/", "acme/radiology/attending/night/deeper", "acme/radiology2/l", "acm", "nowhere", "acme/r"}
)
SOURCES = ["dr-a", "dr-b", "lf:regex", "lf:regex2", "model:prelabel"]


class IndexWorld:
    """The helpers' world plus a second authority at acme/radiology2 and its labeling-function source."""

    def __init__(self, seed: int) -> None:
        self.world = make_world(seed)
        self.authority2 = SigningKey.from_seed(bytes([seed, 9]) * 16, "radiology2")
        self.lf = SigningKey.from_seed(bytes([seed, 10]) * 16, "lf")
        self.authority2_cred = C.issue(
            self.world.root, subject="radiology2", path="acme/radiology2", role="authority",
            public_key=self.authority2.public_key,
        )
        self.lf_cred = C.issue(
            self.authority2, subject="lf:regex", path="acme/radiology2/lf", role="source",
            public_key=self.lf.public_key,
        )


def naive_index(ledger: Ledger) -> dict[str, dict]:
    """What the indexes should hold, from decoding every committed record with the credentials in hand."""
    paths: dict[bytes, str] = {}
    by_type: dict[str, list[int]] = {}
    authorities: dict[int, set[str]] = {}
    sources: dict[int, set[str]] = {}
    examples: dict[int, set[int]] = {}
    for seq, record in ledger.records():
        sealed = envelope.unseal(record)
        assert sealed.seq == seq
        by_type.setdefault(sealed.type, []).append(seq)
        body = sealed.body
        auth, src, ex = set(), set(), set()
        if sealed.type == "CredentialIssued":
            issued = C.parse(body["credential"])
            paths[issued.key_id] = issued.path
            auth.add(issued.path)
            if issued.role == "source":
                src.add(issued.subject)
        auth.add(paths[sealed.signer])
        if sealed.type == "GovernedUpdate":
            auth.update(body["authority_writes"])
            src.update(body.get("sources", ()))
            ex.update(body["batch"])
        elif sealed.type == "SourceRetired":
            auth.add(paths[body["key_id"]])
            src.add(body["source"])
        authorities[seq], sources[seq], examples[seq] = auth, src, ex
    return {"type": by_type, "authorities": authorities, "sources": sources, "examples": examples}


def check_indexes(ledger: Ledger, max_example: int) -> None:
    naive = naive_index(ledger)
    assert ledger.size == len(naive["authorities"])
    for type_name in ("CredentialIssued", "RunStarted", "GovernedUpdate", "TreeHead", "SourceRetired", "Nope"):
        assert ledger.by_type(type_name) == naive["type"].get(type_name, []), type_name
    assert ledger.type_counts() == {name: len(seqs) for name, seqs in naive["type"].items()}
    for prefix in QUERY_PREFIXES:
        bare = prefix.rstrip("/")
        expected = [
            seq for seq, paths in naive["authorities"].items()
            if any(p == bare or p.startswith(bare + "/") for p in paths)
        ]
        assert ledger.by_authority(prefix) == expected, prefix
    for source in SOURCES + ["dr", "lf:rege", "nobody"]:
        expected = [seq for seq, names in naive["sources"].items() if source in names]
        assert ledger.by_source(source) == expected, source
    for example in range(max_example + 2):
        expected = [seq for seq, batch in naive["examples"].items() if example in batch]
        assert ledger.by_example(example) == expected, example


def build_index_ledger(path: Path, seed: int, ops: list[tuple], group: int) -> Ledger:
    iw = IndexWorld(seed)
    world = iw.world
    ledger = Ledger.create(path, group=group)
    genesis(ledger, world)
    ledger.append("CredentialIssued", {"credential": iw.authority2_cred.signed}, world.root)
    ledger.append("CredentialIssued", {"credential": iw.lf_cred.signed}, iw.authority2)
    for step, (batch, writes, srcs, action) in enumerate(ops):
        body = update_body(step, batch)
        body["authority_writes"] = {path_: [1.0, 0.5, 0.0] for path_ in writes}
        body["sources"] = srcs
        ledger.append("GovernedUpdate", body, world.trainer, commit=action == "commit")
        if action == "empty":  # an update whose batch names no example: filed nowhere by example
            ledger.append("GovernedUpdate", update_body(step, []), world.trainer)
        elif action == "tree_head":
            ledger.tree_head(world.trainer)
        elif action == "retire":
            ledger.append(
                "SourceRetired", {"source": "lf:regex", "key_id": iw.lf_cred.key_id, "reason": "bad heuristic"},
                iw.authority2,
            )
    ledger.commit()
    return ledger


def merged_levels(ledger: Ledger) -> list[int]:
    with ledger._store.read() as txn:
        return [level for level, *_ in postings.runs(txn, ledger._store.dbs["by_example"])]


MAX_EXAMPLE = 40
ops_strategy = st.lists(
    st.tuples(
        st.lists(st.integers(0, MAX_EXAMPLE), min_size=1, max_size=12, unique=True),
        st.lists(st.sampled_from(AUTHORITY_PATHS), max_size=3, unique=True),
        st.lists(st.sampled_from(SOURCES), max_size=2, unique=True),
        st.sampled_from(["none"] * 12 + ["commit", "tree_head", "retire", "empty"]),
    ),
    min_size=100,
    max_size=140,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=ops_strategy, group=st.sampled_from([1, 3, 4]), seed=st.integers(0, 3))
def test_indexes_match_a_naive_scan(ops: list[tuple], group: int, seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger"
        ledger = build_index_ledger(path, seed, ops, group)
        try:
            assert max(merged_levels(ledger)) >= 1  # > 16 groups: the by-example runs were merged
            check_indexes(ledger, MAX_EXAMPLE)
            # Pending observations are not indexed until they commit.
            before = ledger.by_type("GovernedUpdate")
            ledger.group = 1 << 20
            ledger.append("GovernedUpdate", update_body(999, [0, 1]), make_world(seed).trainer)
            assert ledger.by_type("GovernedUpdate") == before
            ledger.commit()
            check_indexes(ledger, MAX_EXAMPLE)
        finally:
            ledger.close()
        with Ledger.open(path) as reopened:
            check_indexes(reopened, MAX_EXAMPLE)


def test_indexes_across_two_merge_levels(tmp_path: Path) -> None:
    rng = random.Random(8)
    ops = [
        (
            rng.sample(range(60), rng.randint(0, 10)),
            rng.sample(AUTHORITY_PATHS, rng.randint(0, 2)),
            rng.sample(SOURCES, rng.randint(0, 2)),
            "tree_head" if step % 97 == 0 else "none",
        )
        for step in range(300)
    ]
    ledger = build_index_ledger(tmp_path / "ledger", 1, ops, group=1)
    try:
        assert max(merged_levels(ledger)) >= 2  # 256 level-0 runs became a level-2 run
        check_indexes(ledger, 60)
    finally:
        ledger.close()


def test_by_example_lists_an_update_once_when_its_batch_repeats_an_index(tmp_path: Path) -> None:
    ledger, world = build_ledger(tmp_path / "ledger", updates=0)
    try:
        sealed = ledger.append("GovernedUpdate", update_body(0, [3, 3, 5]), world.trainer, commit=True)
        assert ledger.by_example(5) == [sealed.seq]
        assert ledger.by_example(3) == [sealed.seq]
    finally:
        ledger.close()
