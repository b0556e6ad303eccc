"""The recorder thread (training/record_thread.py, issue 11): GovernedUpdates are built, signed and appended
behind the user's loop, yet in step order, each before its Checkpoint; a failed append reaches the user at
the next optimizer.step() or at close(), and nothing after it is committed; a crash, also while the thread
lags behind, leaves the committed log at a checkpoint (specs/training.md §1)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from gradledger.ledger.ledger import Ledger
from gradledger.training.record_thread import RecordingFailed, RecordWriter
from gradledger.training.trainer import Trainer
from test_trainer import EVERY, STEPS, bodies, engine_for, new_ledger, parts


class Refused(Exception):
    """The ledger's refusal of one append, simulated."""


class Crash(Exception):
    pass


@pytest.fixture(autouse=True)
def _torch_flags() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def failing_at(led: Ledger, step: int, *, delay: float = 0.0) -> list[tuple[str, int | None]]:
    """Make ``led`` refuse the GovernedUpdate of ``step`` (slowing each one by ``delay`` s, so the thread
    lags behind the loop); return the list every append is logged to, (type, step), in order."""
    real = led.append
    log: list[tuple[str, int | None]] = []

    def append(type_name: str, body: dict[str, Any], key: Any, **kw: Any) -> Any:
        if type_name == "GovernedUpdate":
            time.sleep(delay)
            if body["step"] == step:
                raise Refused(f"step {step} refused")
        log.append((type_name, body.get("step")))
        return real(type_name, body, key, **kw)

    led.append = append  # type: ignore[method-assign]
    return log


def committed(path: Path) -> tuple[list[int], list[int], str]:
    """The committed GovernedUpdate steps, Checkpoint steps and last record type of the ledger at ``path``."""
    led = Ledger.open(path)
    try:
        return ([b["step"] for b in bodies(led, "GovernedUpdate")], [b["step"] for b in bodies(led, "Checkpoint")],
                led.observation(led.size - 1).type)
    finally:
        led.close()


@pytest.mark.parametrize("fail", [0, 2, 3, 5, 6])
def test_a_refused_append_reaches_the_user_and_nothing_after_it_is_committed(tmp_path: Path, fail: int) -> None:
    path = tmp_path / "ledger"
    led, ds = new_ledger(path)
    failing_at(led, fail)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    with pytest.raises(RecordingFailed, match=f"step {fail}") as caught:
        Trainer(engine).fit(gm, gopt, gloader, STEPS)  # at the next step(), a checkpoint's drain, or close()
    assert isinstance(caught.value.__cause__, Refused)
    assert engine.closed  # the run is over: its hooks are gone, nothing more is recorded
    engine.close()  # the failure was reported once; close records nothing more
    led.close()  # a plain close commits what is pending: nothing, it was discarded
    last_ckpt = fail // EVERY * EVERY
    steps, ckpts, last = committed(path)
    assert steps == list(range(last_ckpt))
    if last_ckpt == 0:  # failed before its first checkpoint after an update: nothing of the run is committed
        assert ckpts == [] and last != "RunStarted"
    else:
        assert ckpts == list(range(0, last_ckpt + 1, EVERY))
        assert last == "TreeHead"


def test_a_failure_on_the_last_step_is_raised_by_close(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    led, ds = new_ledger(path)
    failing_at(led, 4)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, 5, close=False)  # no step() after step 4's: nothing to raise at yet
    with pytest.raises(RecordingFailed, match="step 4"):
        engine.close()
    led.close()
    assert committed(path) == ([0, 1, 2], [0, 3], "TreeHead")


def test_records_in_step_order_each_update_before_its_checkpoint(tmp_path: Path) -> None:
    # The thread lags (each append slowed): the checkpoint still waits for it, and the chain equals a run's
    # whose appends keep up.
    fast, ds = new_ledger(tmp_path / "fast")
    model, opt, loader = parts()
    engine = engine_for(fast, ds, model)
    Trainer(engine).fit(*engine.make_governed(model, opt, loader), STEPS)
    slow, ds = new_ledger(tmp_path / "slow")
    log = failing_at(slow, -1, delay=0.02)
    model, opt, loader = parts()
    engine = engine_for(slow, ds, model)
    Trainer(engine).fit(*engine.make_governed(model, opt, loader), STEPS)
    run = [entry for entry in log if entry[0] in ("GovernedUpdate", "Checkpoint")]
    want: list[tuple[str, int | None]] = [("Checkpoint", 0)]
    for s in range(STEPS):
        want.append(("GovernedUpdate", s))
        if (s + 1) % EVERY == 0:
            want.append(("Checkpoint", s + 1))
    want.append(("Checkpoint", STEPS))
    assert run == want
    kinds = [slow.observation(i).type for i in range(slow.size)]
    assert kinds[-2:] == ["Checkpoint", "TreeHead"]
    assert bodies(slow, "GovernedUpdate") == bodies(fast, "GovernedUpdate")
    assert bodies(slow, "Checkpoint") == bodies(fast, "Checkpoint")
    slow.close()
    fast.close()


def test_a_crash_while_the_thread_lags_leaves_the_log_at_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    led, ds = new_ledger(path)
    log = failing_at(led, -1, delay=0.05)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    with pytest.raises(Crash), led:  # the ledger discards pending records, after stopping the thread
        gm, gopt, gloader = engine.make_governed(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, 5, close=False)  # steps 3 and 4 still queued or being appended
        raise Crash
    after_exit = list(log)
    time.sleep(0.3)  # a thread left running would append step 4's record (or more) now
    assert log == after_exit
    assert committed(path) == ([0, 1, 2], [0, 3], "TreeHead")


def test_an_exception_in_the_loop_discards_the_steps_since_the_checkpoint(tmp_path: Path) -> None:
    # Governance's own with-block: a failed loop records nothing more, even if the ledger is then closed
    # normally (which commits what is pending).
    path = tmp_path / "ledger"
    led, ds = new_ledger(path)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    with pytest.raises(Crash), engine:
        gm, gopt, gloader = engine.make_governed(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, 5, close=False)
        raise Crash
    led.close()
    assert committed(path) == ([0, 1, 2], [0, 3], "TreeHead")


def test_a_checkpoint_still_being_stored_when_the_loop_fails_is_committed(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The checkpoint of step 3 is a copy taken at step 3; the thread stores it while the loop goes on.
    # Here the thread is held in that store until the run's end begins: the loop has failed by then with
    # steps 3 and 4 queued behind the checkpoint. The checkpoint the loop reached is committed; the
    # steps after it are not (specs/training.md §1).
    path = tmp_path / "ledger"
    led, ds = new_ledger(path)
    release = threading.Event()
    real_append = led.append

    def append(type_name: str, body: dict[str, Any], key: Any, **kw: Any) -> Any:
        if type_name == "Checkpoint" and body["step"] == 3:
            release.wait()
        return real_append(type_name, body, key, **kw)

    led.append = append  # type: ignore[method-assign]
    real_close = RecordWriter.close

    def close(self: RecordWriter, discard: bool = False) -> None:
        release.set()
        real_close(self, discard)

    monkeypatch.setattr(RecordWriter, "close", close)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    with pytest.raises(Crash), engine:
        gm, gopt, gloader = engine.make_governed(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, 5, close=False)
        held = [led.observation(i).body["step"] for i in range(led.size) if led.observation(i).type == "Checkpoint"]
        assert not release.is_set() and held == []  # the checkpoint of step 3 (the run's first commit) is queued
        raise Crash
    led.close()
    assert committed(path) == ([0, 1, 2], [0, 3], "TreeHead")


# -- checkpoints read from the live state (training/checkpoints.py LiveCheckpoint) ----------------


def test_a_live_checkpoint_writes_the_bytes_a_copy_would(tmp_path: Path) -> None:
    # Tied weights, a buffer, AdamW state with its step tensors, group scalars: the pieces, stored in
    # parts, are byte for byte what serialize() builds from a copy, with the same digests.
    from gradledger.training.checkpoints import LiveCheckpoint, make_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.BatchNorm1d(3), torch.nn.Linear(4, 7))
    model[2].weight = model[0].weight  # tied
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model[1].train()
    out = model[2](model[0](torch.tensor([1, 2, 3])))
    model[1](torch.randn(5, 3))  # moves the running statistics
    out.square().mean().backward()
    opt.step()
    want = make_checkpoint(3, model, opt)
    live = LiveCheckpoint.start(3, model, opt)
    assert live is not None
    led = Ledger.create(tmp_path / "l")
    try:
        artifact = led.put_artifact_pieces(live.pieces(), part_size=1000)
        got = live.finished(lambda: led.artifact(artifact))
        assert live.released.is_set()
        assert led.artifact(artifact) == bytes(want.data)
        assert got.digests == want.digests and got.digest == want.digest
    finally:
        led.close()


def test_the_next_step_waits_until_the_checkpoint_has_read_the_state(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The recorder thread is held inside the checkpoint of step EVERY until the loop's next
    # optimizer.step() has reached its wait; the checkpoint must still hold the state of step EVERY
    # (what a copy taken at that step holds), not that of the step that was waiting.
    from gradledger.training import checkpoints
    from gradledger.training.registry import checkpoint_skips
    from gradledger.training.trainer import Governance

    at_barrier = threading.Event()
    real_wait = Governance.await_checkpoint_read

    def waiting(self: Governance) -> None:
        if self.step == EVERY:
            at_barrier.set()
        real_wait(self)

    real_pieces = checkpoints.LiveCheckpoint.pieces

    def held(self: checkpoints.LiveCheckpoint) -> Iterator[Any]:
        if self.step == EVERY:
            assert at_barrier.wait(60), "the next step never waited for the checkpoint"
        yield from real_pieces(self)

    copies: dict[int, bytes] = {}
    monkeypatch.setattr(Governance, "await_checkpoint_read", waiting)
    monkeypatch.setattr(checkpoints.LiveCheckpoint, "pieces", held)
    led, ds = new_ledger(tmp_path / "ledger")
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)

    def copy_at_checkpoint(optimizer: Any, args: Any, kwargs: Any) -> None:
        if engine.step == EVERY and EVERY not in copies:  # after the governed post-step hook: step counted
            copies[EVERY] = checkpoints.make_checkpoint(EVERY, model, opt, skip_group_keys=checkpoint_skips(opt)).digest

    opt.register_step_post_hook(copy_at_checkpoint)
    Trainer(engine).fit(gm, gopt, gloader, EVERY + 2)
    recorded = {b["step"]: b["digest"] for b in bodies(led, "Checkpoint")}
    assert at_barrier.is_set() and recorded[EVERY] == copies[EVERY]
    led.close()
