"""Crash safety: a writer killed with SIGKILL at any moment leaves a ledger that opens, verifies,
holds everything it reported as committed, and accepts further appends that continue its chain.

Each trial runs one or two writer subprocesses on the same ledger and kills them with SIGKILL:

* ``setup``     - right after ``Ledger.create`` returns, while the genesis records go in
                  (small groups, so the genesis itself is committed in pieces);
* ``in_txn``    - inside an open LMDB write transaction: ``Store.write`` is wrapped in the child
                  so that it announces the filled transaction and lingers before committing;
* ``mid_commit``- under load (large batches, large groups, explicit commits): the parent waits for
                  the child to announce a commit and kills it at once, so the kill lands while the
                  commit (sorting, LMDB puts, fsync) is running;
* ``random``    - after a random 0.05 - 0.6 s of mixed appends, commits, tree heads and artifacts.

Odd trials run a second writer that reopens the crashed ledger, continues it, and is killed too.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gradledger.ledger import envelope, merkle
from gradledger.ledger.ledger import Ledger

from helpers import make_world, update_body

TESTS_DIR = Path(__file__).resolve().parent

# Shared by the child writer and the parent checker: the genesis records as a list, so a ledger
# whose genesis was cut short by a crash can be completed from wherever it stopped.
COMMON = r'''
def genesis_steps(world):
    return [
        ("CredentialIssued", {"credential": world.root_cred.signed}, world.root),
        ("CredentialIssued", {"credential": world.trainer_cred.signed}, world.root),
        ("CredentialIssued", {"credential": world.authority_cred.signed}, world.root),
        ("CredentialIssued", {"credential": world.source_cred.signed}, world.authority),
        ("RunStarted", {"run_id": "run-1", "environment": {"torch": "test"}, "artifacts": {}, "settings": {}},
         world.trainer),
    ]
'''
_ns: dict = {}
exec(COMMON, _ns)
genesis_steps = _ns["genesis_steps"]

CHILD = (
    r'''
import hashlib, os, random, sys, time
sys.path.insert(0, sys.argv[1])
from helpers import make_world, update_body
from gradledger.ledger import store as store_mod
from gradledger.ledger.ledger import Ledger
'''
    + COMMON
    + r'''
path, seed, rng_seed, mode = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
group, batch_len, art_max = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
rng = random.Random(rng_seed)
world = make_world(seed)

def say(*words):
    print(*words, flush=True)

if os.path.exists(os.path.join(path, "data.mdb")):
    led = Ledger.open(path, writable=True, group=group)
else:
    led = Ledger.create(path, group=group)
say("started", led.size)

if mode == "in_txn":
    # Announce each filled write transaction and block before it commits until the parent's
    # SIGKILL lands inside the open transaction holding dirty (possibly spilled) pages. The
    # parent never writes to our stdin: waiting on it is an event, not a guess at how long a
    # loaded machine takes to deliver the kill.
    original_write = store_mod.Store.write

    def lingering_write(self, fill):
        def fill_then_wait(txn):
            result = fill(txn)
            say("in-txn")
            sys.stdin.readline()
            return result
        return original_write(self, fill_then_wait)

    store_mod.Store.write = lingering_write

last = led.size

def report():
    global last
    if led.size != last:
        last = led.size
        say("size", last)

def append(type_name, body, key, commit=False):
    if commit or len(led._pending) + 1 >= led.group:
        say("committing")
    led.append(type_name, body, key, commit=commit)
    report()

for type_name, body, key in genesis_steps(world)[led.size:]:
    append(type_name, body, key)
say("committing"); led.commit(); report()

deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    r = rng.random()
    step = led.size + len(led._pending)
    if r < 0.05:
        say("committing"); led.tree_head(world.trainer); report()
    elif r < 0.10:
        data = rng.randbytes(rng.randint(1, art_max))
        digest = led.put_artifact(data)
        say("artifact", digest.hex())
    elif r < 0.15:
        say("committing"); led.commit(); report()
    else:
        batch = [rng.randrange(100_000) for _ in range(rng.randint(1, batch_len))]
        append("GovernedUpdate", update_body(step, batch), world.trainer, commit=r < 0.25)
say("timeout")
'''
)


class Child:
    """A writer subprocess whose stdout lines are collected by a thread as they arrive."""

    def __init__(self, path: Path, seed: int, rng_seed: int, mode: str, group: int, batch_len: int, art_max: int,
                 stderr_path: Path) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.eof = False
        self.stderr_path = stderr_path
        self.stderr = open(stderr_path, "wb")
        args = [str(TESTS_DIR), str(path), str(seed), str(rng_seed), mode, str(group), str(batch_len), str(art_max)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, bufsize=1,
        )
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.endswith("\n"):  # cut off by the kill: never a complete report
                break
            with self.cond:
                self.lines.append(line.strip())
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, word: str, start: int, timeout: float = 300.0) -> int:
        """Index of the first line at or after ``start`` whose first word is ``word``."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.lines)):
                    if self.lines[i].split()[0] == word:
                        return i
                if self.eof:
                    raise AssertionError(f"writer exited before {word!r}: {self.describe()}")
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {word!r} from the writer in {timeout} s: {self.describe()}")
                self.cond.wait(left)

    def release(self) -> None:
        """Let an in-txn child commit the transaction it is holding open."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=20)
        self.thread.join(timeout=20)
        self.stderr.close()
        assert self.proc.returncode == -signal.SIGKILL, self.describe()

    def describe(self) -> str:
        self.stderr.flush()
        return f"lines={self.lines[-5:]} stderr={self.stderr_path.read_text(errors='replace')[-2000:]}"

    def committed(self) -> int:
        """The largest size the writer reported as committed (0 if none)."""
        sizes = [int(line.split()[1]) for line in self.lines if line.startswith(("size ", "started "))]
        return max(sizes, default=0)

    def artifacts(self) -> list[bytes]:
        return [bytes.fromhex(line.split()[1]) for line in self.lines if line.startswith("artifact ")]


MODES = ["setup"] * 4 + ["in_txn"] * 4 + ["mid_commit"] * 6 + ["random"] * 6


def run_and_kill(path: Path, trial: int, life: int, seed: int, tmp_path: Path) -> tuple[int, list[bytes], str]:
    """Start a writer, kill it as the trial's mode says; return (committed size, artifacts, where it died)."""
    mode = MODES[trial]
    rng = random.Random(trial * 7919 + life)
    if mode == "setup":
        group, batch_len, art_max = rng.choice([2, 3]), 16, 4096
    elif mode == "mid_commit":
        group, batch_len, art_max = rng.choice([32, 64, 128]), 2000, 64 * 1024
    else:
        group, batch_len, art_max = rng.choice([1, 4, 16, 64]), rng.choice([8, 200]), 32 * 1024
    child = Child(path, seed, rng.randrange(1 << 30), mode, group, batch_len, art_max,
                  tmp_path / f"stderr-{life}.txt")
    try:
        started = child.wait_for("started", 0)
        if mode == "setup":
            time.sleep(rng.uniform(0.0, 0.01))
        elif mode != "in_txn":  # where the kill lands varies with the delay; correctness never depends on it
            time.sleep(rng.uniform(0.05, 0.6 if mode == "random" else 0.3))
        if mode == "in_txn":
            # The child blocks inside each filled transaction until we release it: let a few
            # commit, then kill inside the next one. Each wait is on the child's own line.
            at = started
            for _ in range(rng.randint(0, 4)):
                at = child.wait_for("in-txn", at) + 1
                child.release()
            child.wait_for("in-txn", at)
        elif mode == "mid_commit":
            with child.cond:
                mark = len(child.lines)
            child.wait_for("committing", mark)
        child.kill()
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
    last_line = child.lines[-1] if child.lines else ""
    assert started == 0
    return child.committed(), child.artifacts(), last_line


def check_recovered(path: Path, seed: int, committed: int, artifacts: list[bytes]) -> int:
    world = make_world(seed)
    ledger = Ledger.open(path, writable=True, group=4)
    try:
        report = ledger.verify()
        size = ledger.size
        assert report.size == size >= committed, (report.size, size, committed)

        # Nothing half-written: exactly seqs 0..size-1 are stored, their Merkle root is the stored one,
        # and the indexes written in the same transactions cover exactly those records.
        stored = list(ledger.records())
        assert [seq for seq, _ in stored] == list(range(size))
        leaves = [merkle.leaf_hash(record) for _, record in stored]
        assert ledger.root == merkle.root_of(leaves)
        if size:
            assert ledger.root_at(size) == merkle.root_of(leaves)
            assert ledger.head == hashlib.sha256(stored[-1][1]).digest()
        assert ledger.type_counts() == report.counts
        decoded = [envelope.unseal(record) for _, record in stored]
        for type_name in report.counts:
            assert ledger.by_type(type_name) == [s.seq for s in decoded if s.type == type_name]
        for example in (0, 1, 99_999):
            expected = [s.seq for s in decoded if s.type == "GovernedUpdate" and example in s.body["batch"]]
            assert ledger.by_example(example) == expected

        # Every artifact reported as stored is there, and every stored artifact is intact.
        stored_artifacts = dict(ledger.artifacts())
        for digest in artifacts:
            assert digest in stored_artifacts
        for digest, data in stored_artifacts.items():
            assert hashlib.sha256(data).digest() == digest

        # The chain continues from where the crash left it.
        head = ledger.head
        appended = []
        for type_name, body, key in genesis_steps(world)[size:]:
            appended.append(ledger.append(type_name, body, key))
        for step in range(9):
            appended.append(ledger.append("GovernedUpdate", update_body(step), world.trainer))
        ledger.commit()
        appended.append(ledger.tree_head(world.trainer))
        for offset, sealed in enumerate(appended):
            assert sealed.seq == size + offset
            assert sealed.prev == head
            head = sealed.record_hash
        final = ledger.verify()
        assert final.size == ledger.size == size + len(appended)
        assert ledger.head == head
    finally:
        ledger.close()

    reopened = Ledger.open(path)
    try:
        assert reopened.size == size + len(appended)
        assert reopened.head == head
        for sealed in appended:
            assert reopened.record(sealed.seq) == sealed.record
        assert reopened.verify().root == final.root
    finally:
        reopened.close()
    return size


@pytest.mark.parametrize("trial", range(len(MODES)))
def test_sigkill_leaves_a_verifiable_ledger(trial: int, tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    seed = trial % 3
    lives = 2 if trial % 2 else 1
    committed, artifacts, last_lines = 0, [], []
    for life in range(lives):
        size, stored, last_line = run_and_kill(path, trial, life, seed, tmp_path)
        committed = max(committed, size)
        artifacts += stored
        last_lines.append(last_line)
    if MODES[trial] == "in_txn":
        # The kill came while the filled transaction was still open: it must not have committed.
        assert all(line == "in-txn" for line in last_lines), last_lines
    recovered = check_recovered(path, seed, committed, artifacts)
    print(f"trial {trial} {MODES[trial]}: reported {committed}, recovered {recovered}, last lines {last_lines}")
