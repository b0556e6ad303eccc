"""Replay from checkpoints through the exported program: exact on an honest run, the first
divergent step named on a tampered one, workers as separate processes, pickle never executed."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from gradledger.ledger.envelope import Sealed
from gradledger.ledger.ledger import Ledger
from gradledger.training.dataset import commit_dataset
from gradledger.training.trainer import Trainer
from gradledger.verify._internal import challenge
from gradledger.ledger.program import ProgramError, load_program
from gradledger.verify._internal.replay import RunContext
from gradledger.verify._internal import segments
from gradledger.verify._internal.pool import WorkerPool
from gradledger.verify._internal.sandbox import SandboxSpec
from gradledger.verify._internal.segments import iter_jobs, plan_segments, run_jobs
from gradledger.verify._internal.sources import LedgerSource
from test_trainer import MANIFESTS, POLICY, STEPS, WORLD, X, engine_for, new_ledger, parts


def _run(path: Path) -> Ledger:
    led, _ = new_ledger(path)
    ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, STEPS)
    return led


def contexts_of(observations: list[Sealed], led: Ledger) -> dict[int, RunContext]:
    compiled = POLICY.compiled
    profiles = {r.rule: list(r.profile) for r in compiled.routings} | {-1: list(compiled.default.profile)}
    out = {}
    for obs in observations:
        if obs.type == "RunStarted" and "program" in obs.body.get("artifacts", {}):
            ds = led.observation(obs.body["settings"]["dataset"]["seq"]).body
            out[obs.seq] = RunContext(obs.seq, obs.body["artifacts"]["program"], ds["data"], obs.body["settings"],
                                      [m.label for m in MANIFESTS], profiles, obs.body["environment"])
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ledger, list[Sealed]]:
    led = _run(tmp_path_factory.mktemp("replay") / "ledger")
    led.close()
    led = Ledger.open(tmp_path_factory.getbasetemp() / "replay0" / "ledger")
    return led, [led.observation(s) for s in range(led.size)]


def test_honest_run_replays_bit_for_bit(run: tuple[Ledger, list[Sealed]]) -> None:
    led, obs = run
    runs = plan_segments(obs)
    jobs = iter_jobs(contexts_of(obs, led), runs)
    assert len(jobs) == 3  # checkpoints at steps 0, 3, 6, 8
    results = run_jobs(jobs, str(led.path), led.artifact, exact=True)
    assert [r.ok for r in results] == [True] * 3, [r.reason for r in results]
    assert sum(r.steps for r in results) == STEPS


def test_workers_started_ahead_are_the_ones_that_replay(run: tuple[Ledger, list[Sealed]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # gradledger-verify starts its workers first (pool.py): replay then uses those, behind the same
    # sandbox, and starts none of its own; a pool behind another sandbox is not used.
    led, obs = run
    jobs = iter_jobs(contexts_of(obs, led), plan_segments(obs))
    spec = SandboxSpec()
    with WorkerPool(spec, 2) as pool:
        assert pool.take(SandboxSpec(enabled=False)) is None  # another sandbox: never handed out

        def no_new_worker(*args: Any) -> Any:
            raise AssertionError("replay started a worker although the pool had one")

        monkeypatch.setattr(segments, "start_worker", no_new_worker)
        results = run_jobs(jobs, str(led.path), led.artifact, exact=True, workers=2, sandbox=spec, pool=pool)
        assert [r.ok for r in results] == [True] * 3, [r.reason for r in results]
        assert pool.take(spec) is None  # both were used
    idle = WorkerPool(spec, 1)
    procs = list(idle._idle)
    idle.close()  # one never taken: ended, not left behind
    assert all(p.poll() is not None for p in procs)


def test_two_worker_processes_agree(run: tuple[Ledger, list[Sealed]]) -> None:
    led, obs = run
    jobs = iter_jobs(contexts_of(obs, led), plan_segments(obs))
    results = run_jobs(jobs, str(led.path), led.artifact, exact=True, workers=2)
    assert [r.ok for r in results] == [True] * 3, [r.reason for r in results]


def _tampered(obs: list[Sealed], seq: int, change: dict[str, Any]) -> list[Sealed]:
    # Only the decoded bodies matter to replay; signatures are the structural checks' business.
    out = list(obs)
    o = obs[seq]
    out[seq] = dataclasses.replace(o, body={**o.body, **change})
    return out


def test_a_changed_loss_names_its_step(run: tuple[Ledger, list[Sealed]]) -> None:
    led, obs = run
    seq = led.by_type("GovernedUpdate")[4]
    bad = _tampered(obs, seq, {"loss": obs[seq].body["loss"] + 1e-7})
    results = run_jobs(iter_jobs(contexts_of(bad, led), plan_segments(bad)), str(led.path), led.artifact, exact=True)
    failed = [r for r in results if not r.ok]
    assert len(failed) == 1 and failed[0].seq == seq and failed[0].step == 4 and "loss" in failed[0].reason


def test_a_checkpoint_one_step_further_fails_at_that_checkpoint(run: tuple[Ledger, list[Sealed]]) -> None:
    led, obs = run
    ckpts = led.by_type("Checkpoint")
    # Claim checkpoint 2 (step 6) holds the state of checkpoint 3 (step 8): replay must refuse it.
    swapped = {k: obs[ckpts[-1]].body[k] for k in ("digest", "tensors", "artifact")}
    bad = _tampered(obs, ckpts[2], swapped)
    results = run_jobs(iter_jobs(contexts_of(bad, led), plan_segments(bad)), str(led.path), led.artifact, exact=True)
    failed = [r for r in results if not r.ok]
    assert failed and failed[0].seq == ckpts[2] and "checkpoint" in failed[0].reason


def test_tolerance_mode_accepts_honest_and_bounds_deviation(run: tuple[Ledger, list[Sealed]]) -> None:
    led, obs = run
    results = run_jobs(iter_jobs(contexts_of(obs, led), plan_segments(obs)), str(led.path), led.artifact, exact=False)
    assert all(r.ok and r.max_deviation == 0.0 for r in results)


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_a_pickle_in_the_program_is_refused_without_running(run: tuple[Ledger, list[Sealed]], tmp_path: Path) -> None:
    led, obs = run
    program = led.artifact(next(o for o in obs if o.type == "RunStarted" and o.body["artifacts"]).body["artifacts"]["program"])
    marker = tmp_path / "pwned"
    src = zipfile.ZipFile(io.BytesIO(program))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".json") and "weights_config" in info.filename:
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            dst.writestr(info, data)
        dst.writestr("model/data/weights/payload.pkl", pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ProgramError, match="pickle"):
        load_program(out.getvalue())
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def test_the_challenge_is_fixed_by_the_root_and_spreads() -> None:
    a = challenge.choose(b"\x01" * 32, 40, 10)
    assert a == challenge.choose(b"\x01" * 32, 40, 10) and len(set(a)) == 10
    assert a != challenge.choose(b"\x02" * 32, 40, 10)
    assert challenge.detection_probability(40, 10) == pytest.approx(0.25)
    assert challenge.detection_probability(40, 40) == 1.0
