"""The user's own loop, governed (issue 11): each common idiom trains, is recorded, verifies bit for
bit with the standalone verifier, and a lie about it (a hostile trainer re-signing everything) fails.

Idioms: the user's own loss (``F.cross_entropy``, ``nn.CrossEntropyLoss``, label smoothing), ``loss / k``
with gradient accumulation, LR schedulers built on the optimizer, ``clip_grad_norm_`` and
``clip_grad_value_``, bf16 autocast on the CPU, the loader's own ``shuffle=True`` order, AdamW and
SGD with Nesterov, dropout. What the ledger cannot reproduce is refused at the step, before the
optimizer steps: a loss that is not the run's, an unrecorded gradient edit, a loss term that does
not pass through the model's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.keys import write_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.training.bands import sequential_bands
from gradledger.training.dataset import commit_dataset
from gradledger.training.recorder import StepRefused
from gradledger.training.trainer import Governance
from forging import Forge
from helpers import CROWD_KEY, verify_cli
from test_trainer import MANIFESTS, POLICY, WORLD, X, Y, new_ledger

BATCH = 16
# The co-signers' keys too: the forger (who holds only the trainer's) re-signs their unchanged records
# at their new chain positions, the strongest attacker the keys allow (tests/forging.py).
KEYS = [WORLD.root, WORLD.trainer, WORLD.authority, WORLD.source, CROWD_KEY]


def make_model() -> nn.Sequential:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


Loop = Callable[[nn.Module, torch.optim.Optimizer, Any, Governance], None]


def governed(path: Path, loop: Loop, *, optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
             order: str = "committed", shuffle: bool = False, every: int = 3, **kw: Any) -> Ledger:
    """A run of the user's ``loop`` over the digits, governed; returns its ledger (closed run)."""
    led, _ = new_ledger(path)
    ds = commit_dataset(led, MANIFESTS, "digits-inputs", WORLD.trainer, inputs=X)
    model = make_model()
    opt = optimizer(model) if optimizer else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(X, Y), batch_size=BATCH, shuffle=shuffle)
    run = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model), run_id="idiom",
                     checkpoint_every=every, seed=3, root_key=WORLD.root, order=order, **kw)
    gm, gopt, gl = run.make_governed(model, opt, loader)
    gm.train()
    loop(gm, gopt, gl, run)
    run.close()
    return led


def verify(led: Ledger, out: Path, forge: Callable[[Forge], Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Export, optionally forge as the trainer (re-signing everything), verify with the CLI."""
    bundle = out / "run.glb"
    export_bundle(led, bundle, with_data=True)
    roots = write_public_keys(out / "roots.pub", [(WORLD.root.public_key, "root")])
    if forge is not None:
        with_keys = Forge.from_bundle(bundle, keys_dir=_keys(out))
        forge(with_keys)
        bundle = with_keys.write(out / "forged.glb")
    return verify_cli(bundle, roots)


def _keys(out: Path) -> Path:
    d = out / "keys"
    d.mkdir(exist_ok=True)
    for k in KEYS:
        if not (d / f"{k.label}.key").exists():
            k.save(d / f"{k.label}.key")
    return d


def updates(led: Ledger) -> list[dict[str, Any]]:
    return [led.observation(s).body for s in led.by_type("GovernedUpdate")]


def steps(n: int, body: Callable[[Any, Any, nn.Module, torch.optim.Optimizer], torch.Tensor]) -> Loop:
    """The plain loop: zero_grad, the user's loss, backward, step; ``n`` steps."""
    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        while run.step < n:
            for x, y in loader:
                opt.zero_grad()
                body(x, y, model, opt).backward()
                opt.step()
                if run.step >= n:
                    break
    return loop


def assert_verified(code: int, report: dict[str, Any]) -> None:
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact" and report["weights_verified"] is True


def assert_caught(code: int, report: dict[str, Any], *words: str) -> None:
    assert code == 1, report
    # Caught by a training check, never by a signature the forger could not make.
    assert report["first_failure"]["name"] not in ("records", "tree heads"), report["first_failure"]
    failure = json.dumps(report.get("first_failure"))
    assert all(w in failure for w in words), failure


def first_update(f: Forge) -> int:
    return f.seqs("GovernedUpdate")[0]


# -- the user's own loss -------------------------------------------------------------------


def test_own_loss_module_verifies_and_a_lie_about_it_fails(tmp_path: Path) -> None:
    criterion = nn.CrossEntropyLoss()
    led = governed(tmp_path / "l", steps(5, lambda x, y, m, o: criterion(m(x), y)))
    ups = updates(led)
    assert len(ups) == 5 and all("recipe" not in u for u in ups)  # the plain step: nothing beyond the rule
    assert_verified(*verify(led, tmp_path))
    code, report = verify(led, tmp_path, lambda f: f.set(first_update(f), ("loss",), ups[0]["loss"] * 0.5))
    assert_caught(code, report, "loss")


def test_label_smoothing_declared_is_recorded(tmp_path: Path) -> None:
    led = governed(tmp_path / "l", steps(4, lambda x, y, m, o: F.cross_entropy(m(x), y, label_smoothing=0.1)),
                   loss_settings={"label_smoothing": 0.1})
    assert_verified(*verify(led, tmp_path))


def test_a_loss_other_than_the_runs_is_refused_at_the_step(tmp_path: Path) -> None:
    # Label smoothing the run did not declare: the output gradient is not the recorded loss's.
    with pytest.raises(StepRefused, match=r"step 0: the gradient that reached the model's output"):
        governed(tmp_path / "l", steps(2, lambda x, y, m, o: F.cross_entropy(m(x), y, label_smoothing=0.2)))


def test_a_loss_term_outside_the_output_is_refused_at_the_step(tmp_path: Path) -> None:
    def with_penalty(x: Any, y: Any, m: nn.Module, o: torch.optim.Optimizer) -> torch.Tensor:
        return F.cross_entropy(m(x), y) + 1e-3 * sum(p.pow(2).sum() for p in m.parameters())

    with pytest.raises(StepRefused, match=r"step 0: replaying this step from the exported program"):
        governed(tmp_path / "l", steps(2, with_penalty))


# -- gradient accumulation -----------------------------------------------------------------


def accumulate(n: int, k: int) -> Loop:
    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        opt.zero_grad()
        while run.step < n:
            for i, (x, y) in enumerate(loader):
                (F.cross_entropy(model(x), y) / k).backward()
                if (i + 1) % k == 0:
                    opt.step()
                    opt.zero_grad()
                    if run.step >= n:
                        return
    return loop


def test_gradient_accumulation_verifies_and_a_lie_about_it_fails(tmp_path: Path) -> None:
    led = governed(tmp_path / "a", accumulate(4, 3))
    ups = updates(led)
    assert len(ups) == 4
    for u in ups:
        assert u["recipe"]["micro"] == [BATCH] * 3 and u["recipe"]["loss_divisor"] == 3
        assert len(u["batch"]) == 3 * BATCH and len(u["recipe"]["losses"]) == 3
    assert_verified(*verify(led, tmp_path))
    # A hostile trainer claims one big batch: the seeds, the order and the losses no longer replay.
    assert_caught(*verify(led, tmp_path, lambda f: [f.delete(k, ("recipe",)) for k in f.seqs("GovernedUpdate")]))
    code, report = verify(led, tmp_path, lambda f: f.set(first_update(f), ("recipe", "micro"), [32, 16]))
    assert_caught(code, report)


def test_accumulation_without_scaling_is_recorded_too(tmp_path: Path) -> None:
    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        for i, (x, y) in enumerate(loader):
            F.cross_entropy(model(x), y).backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
                if run.step >= 3:
                    return

    led = governed(tmp_path / "a", loop)
    assert all("loss_divisor" not in u["recipe"] and len(u["recipe"]["micro"]) == 2 for u in updates(led))
    assert_verified(*verify(led, tmp_path))


def test_drawing_a_batch_without_backward_is_refused(tmp_path: Path) -> None:
    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        for x, y in loader:
            model(x)  # forgot the backward

    with pytest.raises(StepRefused, match="before loss.backward"):
        governed(tmp_path / "a", loop)


# -- schedulers, optimizers ------------------------------------------------------------------


def test_lr_scheduler_verifies_and_a_lie_about_the_lr_fails(tmp_path: Path) -> None:
    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=6)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            if run.step >= 6:
                return

    led = governed(tmp_path / "s", loop)
    ups = updates(led)
    lrs = [u["lr"] for u in ups]
    assert len(set(lrs)) == 6  # every step its own learning rate (and momentum: OneCycle cycles it)
    assert len({u["optimizer"]["groups"][0]["momentum"] for u in ups}) > 1
    assert_verified(*verify(led, tmp_path))

    def flat_lr(f: Forge) -> None:
        for k in f.seqs("GovernedUpdate"):
            f.edit(k, lambda b: (b.__setitem__("lr", 0.1), b["optimizer"]["groups"][0].__setitem__("lr", 0.1)))

    assert_caught(*verify(led, tmp_path, flat_lr))


def test_scheduler_built_before_governing_works(tmp_path: Path) -> None:
    holder: dict[str, Any] = {}

    def make(model: nn.Module) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        holder["sched"] = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return opt

    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            holder["sched"].step()
            if run.step >= 5:
                return

    led = governed(tmp_path / "s", loop, optimizer=make)
    assert [u["lr"] for u in updates(led)] == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3]
    assert_verified(*verify(led, tmp_path))


def test_a_fixed_hyper_parameter_changed_mid_run_is_refused(tmp_path: Path) -> None:
    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if run.step == 2:
                opt.param_groups[0]["weight_decay"] = 0.5
            opt.step()

    with pytest.raises(StepRefused, match=r"step 2: the optimizer's hyper-parameters"):
        governed(tmp_path / "s", loop)


def test_sgd_nesterov_verifies(tmp_path: Path) -> None:
    led = governed(tmp_path / "n", steps(4, lambda x, y, m, o: F.cross_entropy(m(x), y)),
                   optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                                       weight_decay=1e-4))
    assert_verified(*verify(led, tmp_path))


# -- clipping --------------------------------------------------------------------------------


def clipped(n: int, clip: Callable[[nn.Module], Any]) -> Loop:
    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            clip(model)
            opt.step()
            if run.step >= n:
                return
    return loop


def test_clip_grad_norm_verifies_and_a_lie_about_it_fails(tmp_path: Path) -> None:
    led = governed(tmp_path / "c", clipped(4, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)))
    ups = updates(led)
    assert all(u["recipe"]["clip"]["kind"] == "norm" and u["recipe"]["clip"]["max_norm"] == 0.05 for u in ups)
    assert all(u["recipe"]["clip"]["total_norm"] > 0.05 for u in ups)  # it did clip
    assert_verified(*verify(led, tmp_path))
    assert_caught(*verify(led, tmp_path, lambda f: f.delete(first_update(f), ("recipe",))))
    assert_caught(*verify(led, tmp_path, lambda f: f.set(first_update(f), ("recipe", "clip", "max_norm"), 0.5)))


def test_clip_grad_value_verifies(tmp_path: Path) -> None:
    led = governed(tmp_path / "c", clipped(3, lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 0.01)))
    assert all(u["recipe"]["clip"] == {"kind": "value", "clip_value": 0.01, "foreach": None} for u in updates(led))
    assert_verified(*verify(led, tmp_path))


def test_an_unrecorded_gradient_edit_is_refused_at_the_step(tmp_path: Path) -> None:
    def edit(m: nn.Module) -> None:
        for p in m.parameters():
            p.grad.mul_(0.5)

    with pytest.raises(StepRefused, match=r"step 0: the gradient of '.*' changed after backward"):
        governed(tmp_path / "c", clipped(2, edit))


def test_clipping_a_subset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StepRefused, match="subset"):
        governed(tmp_path / "c", clipped(2, lambda m: torch.nn.utils.clip_grad_norm_(list(m.parameters())[:2], 0.1)))


# -- autocast --------------------------------------------------------------------------------


def test_bf16_autocast_verifies_and_a_lie_about_it_fails(tmp_path: Path) -> None:
    def body(x: Any, y: Any, m: nn.Module, o: torch.optim.Optimizer) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(m(x), y)

    led = governed(tmp_path / "b", steps(4, body))
    ups = updates(led)
    assert all(u["recipe"]["autocast"] == {"device": "cpu", "dtype": "bfloat16"} for u in ups)
    assert_verified(*verify(led, tmp_path))
    assert_caught(*verify(led, tmp_path, lambda f: f.delete(first_update(f), ("recipe",))))


def test_autocast_forward_with_the_loss_outside_it(tmp_path: Path) -> None:
    def body(x: Any, y: Any, m: nn.Module, o: torch.optim.Optimizer) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return F.cross_entropy(out.float(), y) if False else F.cross_entropy(out, y)

    led = governed(tmp_path / "b", steps(3, body))
    assert_verified(*verify(led, tmp_path))


# -- the loader's own order --------------------------------------------------------------------


def test_shuffle_true_order_is_recorded_and_verifies(tmp_path: Path) -> None:
    led = governed(tmp_path / "o", steps(5, lambda x, y, m, o: F.cross_entropy(m(x), y)), order="loader",
                   shuffle=True)
    ups = updates(led)
    firsts = [u["batch"] for u in ups]
    assert firsts[0] != list(range(BATCH))  # shuffled, and recorded as drawn
    code, report = verify(led, tmp_path)
    assert_verified(code, report)
    assert any("NOT committed before training" in c["detail"] for c in report["checks"] if c["name"] == "runs")
    # A batch swapped after the fact no longer replays.
    assert_caught(*verify(led, tmp_path, lambda f: f.set(first_update(f), ("batch",), ups[1]["batch"])))


# -- forging the new settings (a hostile trainer re-signing everything) --------------------------


def test_forged_format_and_parameters_fail(tmp_path: Path) -> None:
    led = governed(tmp_path / "f", clipped(3, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)))
    run_started = lambda f: f.seqs("RunStarted")[-1]  # noqa: E731
    # Claimed format 1: its recipes are then not allowed, and its checkpoints would need an lr.
    assert_caught(*verify(led, tmp_path, lambda f: f.delete(run_started(f), ("settings", "format"))), "recipe")
    assert_caught(*verify(led, tmp_path, lambda f: f.set(run_started(f), ("settings", "format"), 3)), "format")
    # The clip's parameter order reversed: the program's order is the evidence.
    def reverse(f: Forge) -> None:
        f.edit(run_started(f), lambda b: b["settings"]["parameters"].reverse())
    assert_caught(*verify(led, tmp_path, reverse), "parameters")


def test_a_committed_order_relabelled_as_the_loaders_is_reported_as_such(tmp_path: Path) -> None:
    # A downgrade of the claim, never an upgrade: the run still verifies, and the report says its
    # order was not committed before training.
    led = governed(tmp_path / "o", steps(3, lambda x, y, m, o: F.cross_entropy(m(x), y)))
    code, report = verify(led, tmp_path, lambda f: f.set(f.seqs("RunStarted")[-1], ("settings", "order"), "loader"))
    assert_verified(code, report)
    assert any("NOT committed before training" in c["detail"] for c in report["checks"] if c["name"] == "runs")
