"""Buffers are state (issue 9, last item): every tensor of a checkpoint, parameters and buffers alike,
is compared with replay, and BatchNorm running statistics cannot move behind an update norm of 0.

The records' norms cover parameters only (specs/training.md §3); buffers are covered by the
checkpoint digests, which replay recomputes. A BatchNorm that normalizes by batch statistics
(training mode) is refused at the step it would run: examples would share statistics, so no
routing holds, and its running statistics would move in bands no gradient reached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import forging as F
from gradledger.ledger.keys import write_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.training.bands import sequential_bands
from gradledger.training.dataset import commit_dataset
from gradledger.training.errors import GovernanceError
from gradledger.verify import VerificationPolicy, Verifier
from test_trainer import MANIFESTS, STEPS, WORLD, X, engine_for, new_ledger, parts


def bn_model() -> nn.Sequential:
    torch.manual_seed(99)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    with torch.no_grad():  # statistics of an earlier, ungoverned fit: not the defaults 0 and 1
        bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 32))
        bn.running_var.copy_(torch.linspace(0.5, 1.5, 32))
    return model


def _loop(led: Ledger, model: nn.Sequential, *, eval_bn: bool) -> None:
    ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
    _, _, loader = parts()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = engine_for(led, ds, model, layout=sequential_bands(model))
    model.train()
    if eval_bn:
        model[1].eval()  # running statistics used, never updated: examples stay independent
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    gm.train()  # keeps the BatchNorm in the mode it was exported in
    while engine.step < STEPS:
        for batch in gloader:
            gopt.zero_grad(set_to_none=True)
            engine.criterion(gm(batch), batch.labels).backward()
            gopt.step()
            if engine.step >= STEPS:
                break
    engine.close()


def test_a_training_mode_batchnorm_is_refused_before_anything_is_recorded(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "ledger")
    runs = led.by_type("RunStarted")
    try:
        with pytest.raises(GovernanceError, match=r"module '1' is a BatchNorm using batch statistics.*eval "
                                                   r"mode.*GroupNorm or LayerNorm"):
            _loop(led, bn_model(), eval_bn=False)
        assert led.by_type("GovernedUpdate") == [] and led.by_type("RunStarted") == runs  # refused, not recorded
    finally:
        led.close()


def test_a_batchnorm_without_running_statistics_is_refused_in_eval_mode_too(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "ledger")
    model = bn_model()
    model[1] = nn.BatchNorm1d(32, track_running_stats=False)
    try:
        with pytest.raises(GovernanceError, match="module '1' is a BatchNorm using batch statistics"):
            _loop(led, model, eval_bn=True)
        assert led.by_type("GovernedUpdate") == []
    finally:
        led.close()


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("buffers")
    led, _ = new_ledger(base / "ledger")
    try:
        _loop(led, bn_model(), eval_bn=True)
        led.commit()
        records = [bytes(r) for _, r in led.records()]
        arts = dict(led.artifacts())
    finally:
        led.close()
    roots = write_public_keys(base / "roots.pub", [(WORLD.root.public_key, "root")])
    forge = F.Forge.from_parts(records, arts, [WORLD.trainer])
    verifier = Verifier([WORLD.root.public_key], VerificationPolicy(replay="full"))
    return {"base": base, "forge": forge, "verifier": verifier, "roots": roots}


def test_the_checkpoints_carry_the_buffers_and_an_honest_run_verifies(bn_run: dict[str, Any]) -> None:
    forge = bn_run["forge"]
    last = forge.seqs("Checkpoint")[-1]
    names = set(forge.body(last)["tensors"])
    assert {"model.1.running_mean", "model.1.running_var", "model.1.num_batches_tracked"} <= names
    outcome = F.verify_forgery(F.Forgery("honest", "all", lambda g: None), forge, bn_run["verifier"], bn_run["base"])
    assert outcome.verdict == "accepted", outcome.detail


@pytest.mark.parametrize("tensor", ["model.1.running_mean", "model.1.running_var", "model.1.num_batches_tracked"])
def test_a_forged_buffer_in_a_checkpoint_fails_replay_naming_it(bn_run: dict[str, Any], tensor: str) -> None:
    # The hostile trainer changes one buffer of the final checkpoint, re-derives the tensor and
    # state digests, re-points every record naming the old state, re-signs and rebuilds: only
    # replay, which recomputes the buffer, can tell.
    def forge(g: F.Forge) -> None:
        def change(tensors: dict[str, torch.Tensor]) -> None:
            tensors[tensor] = tensors[tensor] + 1

        F.rewrite_checkpoint(g, g.seqs("Checkpoint")[-1], change)

    outcome = F.verify_forgery(F.Forgery(tensor, "Checkpoint", forge), bn_run["forge"], bn_run["verifier"],
                               bn_run["base"])
    assert outcome.verdict == "rejected", outcome.detail
    assert outcome.detail.startswith("replay") and tensor in outcome.detail, outcome.detail


def test_a_mode_changed_after_export_is_refused_at_the_step(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "ledger")
    model = bn_model()
    model.train()
    model[1].eval()
    try:
        ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
        _, _, loader = parts()
        engine = engine_for(led, ds, model, layout=sequential_bands(model))
        gm, gopt, gloader = engine.make_governed(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
        gm.train()
        assert not model[1].training and model[2].training  # train() keeps the exported modes
        model[1].train()  # behind the governed model's back, after export
        batch = next(iter(gloader))
        with pytest.raises(GovernanceError, match=r"step 0: module '1' is in training mode, but the program was "
                                                   r"exported with it in the other"):
            gm(batch)
        assert led.by_type("GovernedUpdate") == []
    finally:
        led.close()
