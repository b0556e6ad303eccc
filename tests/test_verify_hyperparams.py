"""Recorded hyper-parameters are the replayed ones (specs/replay.md §3, specs/training.md §6).

Honest runs with SGD (momentum, nesterov), Adam and AdamW (weight decay) verify bit for bit. A
hostile trainer (trainer key, not the root key) that trained with one learning rate, momentum or
weight decay and records another, then re-signs every record and rebuilds the chain and tree
heads, is caught naming the field and the step, whether it leaves the checkpoints' group state
honest or rewrites it too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from gradledger.ledger import encoding
from gradledger.training.checkpoints import SCALARS_KEY, checkpoint_digest, read_checkpoint, tensor_digest
from gradledger.training.dataset import commit_dataset
from gradledger.training.errors import GovernanceError
from gradledger.training.trainer import Trainer
from gradledger.verify import Verifier, VerificationPolicy
from gradledger.verify._internal.hyperparams import HyperParameterMismatch, check_step
from gradledger.verify._internal.segments import iter_jobs, plan_segments, run_jobs
from gradledger.verify.report import Report
from test_trainer import MANIFESTS, WORLD, X, Y, engine_for, make_model, new_ledger
from test_verify_replay import _tampered, contexts_of, run
from test_verify_structure import Item, ListSource, items_of, reseal
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["run"]  # test_verify_replay's honest run, used as a fixture here
STEPS, EVERY = 4, 2
Factory = Callable[[Any], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Factory] = {
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.8, 0.99), eps=1e-7),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05),
}


def _train(path: Path, factory: Factory) -> ListSource:
    before = torch.are_deterministic_algorithms_enabled()
    led, _ = new_ledger(path)
    ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
    model = make_model()
    opt = factory(model.parameters())
    loader = DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True)
    engine = engine_for(led, ds, model, checkpoint_every=EVERY)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, STEPS)
    source = ListSource([r for _, r in led.records()], dict(led.artifacts()))
    led.close()
    torch.use_deterministic_algorithms(before)
    return source


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ListSource]:
    base = tmp_path_factory.mktemp("hyper")
    return {name: _train(base / name, factory) for name, factory in OPTIMIZERS.items()}


def verify(source: ListSource) -> Report:
    verifier = Verifier([WORLD.root.public_key], VerificationPolicy(replay="full"))
    return verifier._verify(source, "", False)  # type: ignore[arg-type]


def _edit(items: list[Item], k: int, change: Callable[[dict[str, Any]], None]) -> None:
    copy = encoding.decode(encoding.encode(items[k].body))  # a deep copy, bytes included
    change(copy)
    items[k] = Item(items[k].type, items[k].time, copy, items[k].signer)


def _record_everywhere(items: list[Item], key: str, value: Any, *, steps: bool = True) -> None:
    """Write ``value`` for group-0 ``key`` into RunStarted and (``steps``) every GovernedUpdate."""
    for k, it in enumerate(items):
        if it.type == "RunStarted" and "optimizer" in it.body["settings"]:
            _edit(items, k, lambda b: b["settings"]["optimizer"]["groups"][0].__setitem__(key, value))
        elif it.type == "GovernedUpdate" and steps:
            def change(b: dict[str, Any]) -> None:
                b["optimizer"]["groups"][0][key] = value
                if key == "lr":
                    b["lr"] = value
            _edit(items, k, change)


def _failure(report: Report) -> tuple[str, int | None, int | None, str]:
    f = report.first_failure
    assert f is not None and not report.verified, report.render()
    return f.name, f.seq, f.step, f.detail


def _run_settings(items: list[Item]) -> dict[str, Any]:
    return next(it.body["settings"] for it in items if it.type == "RunStarted" and "optimizer" in it.body["settings"])


def _seqs(items: list[Item], type_name: str) -> list[int]:
    return [k for k, it in enumerate(items) if it.type == type_name]


# -- honest runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_honest_runs_verify_bit_for_bit(runs: dict[str, ListSource], name: str) -> None:
    report = verify(runs[name])
    assert report.verified and report.first_failure is None, report.render()
    replay = next(c for c in report.checks if c.name == "replay")
    assert replay.status == "pass"
    if name == "adamw":  # implied by the name, not recorded (specs/training.md §6)
        assert "decoupled_weight_decay" not in _run_settings(items_of(runs[name].recs))["optimizer"]["groups"][0]


# -- the issue's forgery: the checkpoint's group state is the only honest witness --------------


@pytest.mark.parametrize(("key", "trained", "recorded"), [
    ("lr", 0.05, 0.01),
    ("momentum", 0.9, 0.5),
    ("weight_decay", 1e-3, 0.0),
])
def test_a_value_recorded_everywhere_but_the_checkpoint_fails_naming_it(
    runs: dict[str, ListSource], key: str, trained: float, recorded: float
) -> None:
    source = runs["sgd-nesterov"]
    items = items_of(source.recs)
    assert _run_settings(items)["optimizer"]["groups"][0][key] == trained
    _record_everywhere(items, key, recorded)
    name, seq, step, detail = _failure(verify(ListSource(reseal(items), source.arts)))
    if key in ("lr", "momentum"):
        # Format 2: each step states its own lr and momentum and no checkpoint carries them
        # (specs/training.md §4): replay uses the recorded value and the first update differs.
        assert (name, seq, step) == ("replay", _seqs(items, "GovernedUpdate")[0], 0) and "norm" in detail
        return
    first_checkpoint = _seqs(items, "Checkpoint")[0]
    assert (name, seq, step) == ("replay", first_checkpoint, 0)
    assert f"optim.group.0.{key}" in detail and repr(recorded) in detail and repr(trained) in detail


def test_the_issue_case_with_the_learning_rate_left_out_of_the_steps_fails(runs: dict[str, ListSource]) -> None:
    # Before the fix: the steps' groups did not state lr, so replay kept the checkpoint's 0.05
    # while RunStarted and every GovernedUpdate.lr said 0.01; it verified.
    source = runs["sgd-nesterov"]
    items = items_of(source.recs)
    _record_everywhere(items, "lr", 0.01, steps=False)
    for k in _seqs(items, "GovernedUpdate"):
        def change(b: dict[str, Any]) -> None:
            b["lr"] = 0.01
            del b["optimizer"]["groups"][0]["lr"]
        _edit(items, k, change)
    name, seq, step, detail = _failure(verify(ListSource(reseal(items), source.arts)))
    # The records contradict each other, so the structural check sees it, in every replay mode.
    first = _seqs(items, "GovernedUpdate")[0]
    assert (name, seq, step) == ("runs", first, 0) and "optimizer.groups[0] does not state lr" in detail


def test_one_step_that_states_another_value_fails_at_that_step(runs: dict[str, ListSource]) -> None:
    source = runs["sgd-nesterov"]
    items = items_of(source.recs)
    k = _seqs(items, "GovernedUpdate")[3]
    _edit(items, k, lambda b: b["optimizer"]["groups"][0].__setitem__("nesterov", False))
    name, seq, step, detail = _failure(verify(ListSource(reseal(items), source.arts)))
    assert (name, seq, step) == ("runs", k, 3) and "optimizer.groups[0].nesterov" in detail


def test_a_top_level_lr_that_is_not_the_groups_fails(runs: dict[str, ListSource]) -> None:
    source = runs["sgd-nesterov"]
    items = items_of(source.recs)
    k = _seqs(items, "GovernedUpdate")[1]
    _edit(items, k, lambda b: b.__setitem__("lr", 0.01))
    name, seq, step, detail = _failure(verify(ListSource(reseal(items), source.arts)))
    assert (name, seq, step) == ("runs", k, 1) and "lr is 0.01" in detail


def _rewrite_group_state(items: list[Item], arts: dict[bytes, bytes], key: str, value: float) -> None:
    """Every checkpoint artifact re-made with group-0 ``key`` = ``value``, its record re-pointed."""
    for k in _seqs(items, "Checkpoint"):
        body = items[k].body
        tensors, scalars = read_checkpoint(arts[body["artifact"]], body)
        tensors = {n: t.clone() for n, t in tensors.items()}
        tensors[f"optim.group.0.{key}"] = torch.tensor(value, dtype=torch.float64)
        data = st_save(tensors, metadata={SCALARS_KEY: json.dumps(scalars, sort_keys=True)})
        digest = hashlib.sha256(data).digest()
        arts[digest] = data
        digests = {n: tensor_digest(t) for n, t in tensors.items()}

        def change(b: dict[str, Any], digests: dict[str, bytes] = digests, digest: bytes = digest) -> None:
            b.update(tensors=digests, digest=checkpoint_digest(digests), artifact=digest)
        _edit(items, k, change)


def test_a_forger_who_also_rewrites_the_checkpoints_fails_at_the_first_update(runs: dict[str, ListSource]) -> None:
    # Every record and every checkpoint now says weight decay 0.0; the weights were trained with 1e-3.
    source = runs["sgd-nesterov"]
    items, arts = items_of(source.recs), dict(source.arts)
    _record_everywhere(items, "weight_decay", 0.0)
    _rewrite_group_state(items, arts, "weight_decay", 0.0)
    name, seq, step, detail = _failure(verify(ListSource(reseal(items), arts)))
    assert (name, seq, step) == ("replay", _seqs(items, "GovernedUpdate")[0], 0) and "update norm" in detail


def test_a_checkpoint_that_carries_an_unrecorded_hyper_parameter_fails(runs: dict[str, ListSource]) -> None:
    source = runs["sgd-nesterov"]
    items, arts = items_of(source.recs), dict(source.arts)
    _rewrite_group_state(items, arts, "initial_lr", 0.05)
    name, seq, step, detail = _failure(verify(ListSource(reseal(items), arts)))
    assert (name, seq, step) == ("replay", _seqs(items, "Checkpoint")[0], 0)
    assert "optim.group.0.initial_lr" in detail and "does not state" in detail


def test_a_checkpoint_that_carries_a_per_step_hyper_parameter_fails(runs: dict[str, ListSource]) -> None:
    # Format 2 checkpoints leave lr to the steps: one that carries it could steer a resume.
    source = runs["sgd-nesterov"]
    items, arts = items_of(source.recs), dict(source.arts)
    _rewrite_group_state(items, arts, "lr", 0.05)
    name, seq, step, detail = _failure(verify(ListSource(reseal(items), arts)))
    assert (name, seq, step) == ("replay", _seqs(items, "Checkpoint")[0], 0)
    assert "optim.group.0.lr" in detail and "format-2" in detail


# -- the record's own consistency, over random edits -------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_changed_group_value_is_named(data: st.DataObject) -> None:
    run = {"name": "adam", "groups": [
        {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "maximize": False,
         "foreach": None, "capturable": False, "differentiable": False, "fused": None},
        {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.1, "amsgrad": True, "maximize": False,
         "foreach": None, "capturable": False, "differentiable": False, "fused": None},
    ]}
    step = {"lr": 0.001, "optimizer": json.loads(json.dumps(run))}
    check_step(run, step)  # equal records pass
    g = data.draw(st.integers(0, 1))
    key = data.draw(st.sampled_from(sorted(run["groups"][g])))
    old = step["optimizer"]["groups"][g][key]
    new = data.draw(st.one_of(st.none(), st.booleans(), st.integers(0, 3), st.floats(0, 1),
                              st.lists(st.floats(0, 1), min_size=2, max_size=2)).filter(
        lambda v: type(v) is not type(old) or v != old))
    step["optimizer"]["groups"][g][key] = new
    with pytest.raises(HyperParameterMismatch, match=key):
        check_step(run, step)


# -- the trainer refuses what it could not record -----------------------------------------------


def test_the_trainer_refuses_a_changed_fixed_hyper_parameter_mid_run(tmp_path: Path) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    led, ds = new_ledger(tmp_path / "ledger")
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(led, ds, model)
    gm, gopt, gloader = engine.make_governed(model, opt, DataLoader(TensorDataset(X, Y), batch_size=32))
    try:
        batches = iter(gloader)
        for step in range(2):
            if step == 1:
                opt.param_groups[0]["weight_decay"] = 0.5  # lr may change (a schedule); weight decay may not
            batch = next(batches)
            gopt.zero_grad()
            engine.criterion(gm(batch), batch.labels).backward()
            if step == 1:
                with pytest.raises(GovernanceError, match="hyper-parameters"):
                    gopt.step()
            else:
                gopt.step()
        assert engine.step == 1
    finally:
        led.close()
        torch.use_deterministic_algorithms(before)


def test_the_trainer_refuses_an_unrecordable_group_key(tmp_path: Path) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    led, ds = new_ledger(tmp_path / "ledger")
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # initial_lr: a scheduler's own, accepted
    opt.param_groups[0]["mystery"] = 0.5  # a number no record could state
    engine = engine_for(led, ds, model)
    try:
        with pytest.raises(GovernanceError, match="mystery"):
            engine.make_governed(model, opt, DataLoader(TensorDataset(X, Y), batch_size=32))
    finally:
        led.close()
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize(("change", "field"), [
    ({"reduction": "sum"}, "reduction"),
    ({"ignore_index": 3}, "ignore_index"),
    ({"label_smoothing": 2.0}, "label_smoothing"),
])
def test_loss_settings_outside_the_registry_fail(
    runs: dict[str, ListSource], change: dict[str, Any], field: str
) -> None:
    source = runs["adam"]
    items = items_of(source.recs)
    k = next(j for j, it in enumerate(items) if it.type == "RunStarted" and "loss" in it.body["settings"])
    _edit(items, k, lambda b: b["settings"]["loss"]["settings"].update(change))
    name, seq, step, detail = _failure(verify(ListSource(reseal(items), source.arts)))
    assert (name, seq) == ("replay", k) and "settings.loss.settings" in detail and field in detail


def test_replay_itself_refuses_a_step_that_states_other_values(run: Any) -> None:
    # Defence in depth: the structural `runs` check sees this first; replay (workers, a caller
    # that skips structure) must not rely on it.
    led, obs = run
    seq = led.by_type("GovernedUpdate")[4]
    groups = [dict(g) for g in obs[seq].body["optimizer"]["groups"]]
    groups[0]["nesterov"] = not groups[0]["nesterov"]  # a fixed one: lr may vary per step in format 2
    bad = _tampered(obs, seq, {"optimizer": {"name": "sgd", "groups": groups}})
    results = run_jobs(iter_jobs(contexts_of(bad, led), plan_segments(bad)), str(led.path), led.artifact, exact=True)
    failed = [r for r in results if not r.ok]
    assert len(failed) == 1 and (failed[0].seq, failed[0].step) == (seq, 4)
    assert "optimizer.groups[0].nesterov" in failed[0].reason
