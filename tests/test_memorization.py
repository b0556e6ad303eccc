"""Memorization scans (issue 16; specs/dynamics.md §1-§2): LT-IQR or the mean of every example's recorded loss
trace, the two implementations (training/dynamics, verify/_internal/scans.py) agreeing bit for bit,
a signed MemorizationScan at every checkpoint of a run that declares it, recomputed by the verifier,
and every lie a hostile trainer (trainer key only, everything re-signed) can tell about one caught."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.training import MemorizationScan, scan
from gradledger.training.cli import main as cli_main
from gradledger.training.dynamics import flag, lt_iqr, mean_loss, scores_digest
from gradledger.training.errors import GovernanceError
from gradledger.training.trainer import Trainer
from gradledger.verify._internal import scans as V
from test_idioms import BATCH, assert_caught, assert_verified, governed, steps, verify
from test_trainer import WORLD, engine_for, new_ledger, parts

PARAMS = MemorizationScan(fraction=0.05, min_trace=3, method="lt-iqr")
MEAN = MemorizationScan(fraction=0.05, min_trace=3)  # the default method
EPOCH = 240 // BATCH  # the digits subset the idiom tests train on: 240 examples
STEPS = 4 * EPOCH


def _traces(draw: Any) -> tuple[list[list[float]], int]:
    count = draw(st.integers(1, 12))
    f32 = st.floats(0, 20, width=32, allow_nan=False)
    traces = [draw(st.lists(f32, max_size=9)) for _ in range(count)]
    return traces, count


def _training_scores(traces: list[list[float]], min_trace: int, score: Any = lt_iqr) -> torch.Tensor:
    # as the run appends them: one "step" per position, every example with a loss there
    idx, val = [], []
    for pos in range(max((len(t) for t in traces), default=0)):
        rows = [i for i, t in enumerate(traces) if pos < len(t)]
        idx.append(torch.tensor(rows, dtype=torch.int64))
        val.append(torch.tensor([traces[i][pos] for i in rows], dtype=torch.float64))
    return score(idx, val, len(traces), min_trace)


def _verifier_scores(traces: list[list[float]], min_trace: int) -> list[float | None]:
    return [V.quantile(sorted(t), 0.75) - V.quantile(sorted(t), 0.25) if len(t) >= min_trace else None
            for t in traces]


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(2, 5), st.sampled_from([0.01, 0.1, 0.3, 1.0]))
def test_the_two_implementations_agree_bit_for_bit(data: Any, min_trace: int, fraction: float) -> None:
    traces, _ = _traces(data.draw)
    got = _training_scores(traces, min_trace)
    want = _verifier_scores(traces, min_trace)
    for g, w, t in zip(got.tolist(), want, traces):
        if w is None:
            assert math.isnan(g)
        else:
            assert struct.pack("<d", g) == struct.pack("<d", w)
            # and it is the interquartile range numpy computes (its interpolation rounds differently)
            assert g == pytest.approx(float(np.subtract(*np.percentile(t, [75, 25]))), abs=1e-9)
    assert [[i, s] for i, s in flag(got, fraction)] == V.flagged(want, fraction)
    assert scores_digest(got) == V.digest(want)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(2, 5), st.sampled_from([0.01, 0.1, 0.3, 1.0]))
def test_the_two_implementations_agree_on_the_mean_bit_for_bit(data: Any, min_trace: int, fraction: float) -> None:
    # binary32 values over a wide range of magnitudes: an order-dependent sum would round differently
    count = data.draw(st.integers(1, 12))
    f32 = st.floats(0, 2.0**120, width=32, allow_nan=False, allow_infinity=False)
    traces = [data.draw(st.lists(f32, max_size=9)) for _ in range(count)]
    got = _training_scores(traces, min_trace, mean_loss)
    want = V.scores([list(t) for t in traces], min_trace, "mean-loss")
    for g, w, t in zip(got.tolist(), want, traces):
        if w is None:
            assert math.isnan(g)
        else:
            assert struct.pack("<d", g) == struct.pack("<d", w)
            assert g == pytest.approx(float(np.mean(np.array(t, dtype=np.float64))), rel=1e-12)
    assert [[i, s] for i, s in flag(got, fraction)] == V.flagged(want, fraction)
    assert scores_digest(got) == V.digest(want)


def test_the_mean_is_exactly_rounded_whatever_the_order() -> None:
    # Added left to right in binary64, 1e30 + 1 loses the 1 (a mean of 0.75), and the reversed order loses the
    # 3 as well (0.0); the exactly rounded sum keeps both, in either order. (Losses are not negative: the
    # rule is about the sum, and cancellation shows it in four values.)
    trace = [1e30, 1.0, -1e30, 3.0]
    values = [struct.unpack("<f", struct.pack("<f", v))[0] for v in trace]
    got = _training_scores([values, list(reversed(values))], 2, mean_loss).tolist()
    assert got == [1.0, 1.0] == [math.fsum(values) / 4] * 2
    assert V.scores([values, list(reversed(values))], 2, "mean-loss") == [1.0, 1.0]


def test_flags_take_the_top_fraction_with_ties_to_the_lower_index() -> None:
    s = torch.tensor([0.5, math.nan, 2.0, 0.5, 2.0, 0.1], dtype=torch.float64)
    assert flag(s, 0.5) == [(2, 2.0), (4, 2.0), (0, 0.5)]  # ceil(0.5 * 5 scored) = 3
    assert flag(s, 1e-9) == [(2, 2.0)]
    assert flag(torch.full((3,), math.nan, dtype=torch.float64), 1.0) == []


@pytest.mark.parametrize("bad", [dict(fraction=0.0), dict(fraction=1.5), dict(fraction=1), dict(min_trace=1),
                                 dict(min_trace=2.0), dict(method="mean"), dict(method="LT-IQR")])
def test_bad_parameters_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(GovernanceError, match="MemorizationScan"):
        MemorizationScan(**bad)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """A run of the user's loop over four epochs that scans at each of its checkpoints."""
    path = tmp_path_factory.mktemp("monitored")
    return governed(path / "ledger", steps(STEPS, lambda x, y, m, o: F.cross_entropy(m(x), y)), every=EPOCH,
                    memorization=PARAMS)


def _scans(led: Ledger) -> list[Any]:
    return [led.observation(s) for s in led.by_type("MemorizationScan")]


def test_each_checkpoint_records_a_scan_that_verifies(monitored: Ledger, tmp_path: Path) -> None:
    led = monitored
    scans = _scans(led)
    assert [s.body["through"] for s in scans] == [EPOCH, 2 * EPOCH, 3 * EPOCH, 4 * EPOCH]
    # every example is seen once an epoch: scored from the third epoch on
    assert [s.body["scored"] for s in scans] == [0, 0, 240, 240]
    assert len(scans[-1].body["flagged"]) == math.ceil(0.05 * 240)
    for s in scans:  # recorded right after its checkpoint, before the tree head that commits both
        assert led.observation(s.seq - 1).type == "Checkpoint" and led.observation(s.seq + 1).type == "TreeHead"
    # the run's own scan is the on-demand scan of the same steps
    again = scan(led, params=PARAMS)
    assert again["scores_digest"] == scans[-1].body["scores_digest"].hex()
    assert [[e["index"], e["score"]] for e in again["flagged"]] == scans[-1].body["flagged"]
    code, report = verify(led, tmp_path)
    assert_verified(code, report)
    assert any(r["name"] == "scans" and r["status"] == "pass" for r in report["checks"])


def test_scores_are_the_interquartile_range_of_the_recorded_losses(monitored: Ledger) -> None:
    from gradledger.training.updates import example_loss_values

    traces: dict[int, list[float]] = {}
    for s in monitored.by_type("GovernedUpdate"):
        u = monitored.observation(s).body
        for i, v in zip(u["batch"], example_loss_values(u["example_losses"])):
            traces.setdefault(i, []).append(v)
    top = scan(monitored, params=PARAMS)["flagged"][0]
    want = {i: float(np.subtract(*np.percentile(t, [75, 25]))) for i, t in traces.items()}
    assert top["score"] == pytest.approx(max(want.values()), rel=1e-12)
    assert want[top["index"]] == pytest.approx(top["score"], rel=1e-12)


def _structure(led: Ledger, out: Path, forge: Any) -> tuple[int, dict[str, Any]]:
    """``verify`` with ``--replay none``: the scans check reads records only, and replay adds nothing to
    what a forged scan can get past (the honest run's replay is checked above)."""
    from gradledger.ledger.bundle import export_bundle
    from gradledger.ledger.keys import write_public_keys
    from forging import Forge
    from helpers import verify_cli
    from test_idioms import _keys

    bundle = out / "run.glb"
    export_bundle(led, bundle, with_data=True)
    roots = write_public_keys(out / "roots.pub", [(WORLD.root.public_key, "root")])
    forged = Forge.from_bundle(bundle, keys_dir=_keys(out))
    forge(forged)
    return verify_cli(forged.write(out / "forged.glb"), roots, "--replay", "none")


def _last(f: Any) -> int:
    return f.seqs("MemorizationScan")[-1]


FORGERIES = {
    "the most memorized example hidden": lambda f: f.set(_last(f), ("flagged",), f.body(_last(f))["flagged"][1:]),
    "another example swapped in at the top": lambda f: f.set(
        _last(f), ("flagged", 0, 0), next(i for i in range(240) if i not in {e[0] for e in f.body(_last(f))["flagged"]})),
    "the top score lowered": lambda f: f.set(_last(f), ("flagged", 0, 1), f.body(_last(f))["flagged"][0][1] * 0.5),
    "scored": lambda f: f.set(_last(f), ("scored",), 239),
    "scores_digest": lambda f: f.set(_last(f), ("scores_digest",), bytes(32)),
    "through past the recorded steps": lambda f: f.set(_last(f), ("through",), STEPS + 1),
    "the last scan removed": lambda f: f.remove(_last(f)),
    "a scan's fraction changed": lambda f: f.set(_last(f), ("parameters", "fraction"), 0.5),
    "settings.monitors malformed": lambda f: f.set(f.seqs("RunStarted")[-1], ("settings", "monitors"),
                                                   {"memorization": {"fraction": 2.0, "min_trace": 3}}),
}


def _assert_scan_forgery_caught(led: Ledger, out: Path, forge: Any) -> None:
    code, report = _structure(led, out, forge)
    assert_caught(code, report)
    failure = report["first_failure"]
    assert failure["name"] in ("scans", "settings", "runs"), failure
    assert "MemorizationScan" in failure["detail"] or "monitors" in failure["detail"], failure


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_forged_scan_is_caught(monitored: Ledger, tmp_path: Path, name: str) -> None:
    _assert_scan_forgery_caught(monitored, tmp_path, FORGERIES[name])


def test_a_run_that_declares_no_monitor_records_no_scan(tmp_path: Path) -> None:
    led = governed(tmp_path / "l", steps(EPOCH, lambda x, y, m, o: F.cross_entropy(m(x), y)), every=EPOCH)
    assert led.by_type("MemorizationScan") == []
    assert led.observation(led.by_type("RunStarted")[-1]).body["settings"]["monitors"] == {}


def test_a_resumed_run_scans_the_steps_before_the_resume_too(tmp_path: Path) -> None:
    class Crash(Exception):
        pass

    path = tmp_path / "c"
    led, ds = new_ledger(path)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model, checkpoint_every=EPOCH, memorization=PARAMS)
    with pytest.raises(Crash), led:
        gm, gopt, gloader = engine.make_governed(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, 2 * EPOCH + 3, close=False)
        raise Crash
    led = Ledger.open(path, writable=True)
    try:
        model, opt, loader = parts()
        engine = engine_for(led, ds, model, checkpoint_every=EPOCH, memorization=PARAMS)
        gm, gopt, gloader = engine.resume(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, 4 * EPOCH)
        last = _scans(led)[-1].body
        assert last["through"] == 4 * EPOCH and last["scored"] > 0
        assert scan(led, params=PARAMS)["scores_digest"] == last["scores_digest"].hex()
        with pytest.raises(GovernanceError, match="monitors"):  # resumed without the monitor it declared
            engine_for(led, ds, parts()[0], checkpoint_every=EPOCH).resume(*parts())
    finally:
        led.close()


def test_scan_command_records_a_scan_the_verifier_recomputes(tmp_path: Path, capsys: Any) -> None:
    led = governed(tmp_path / "l", steps(3 * EPOCH, lambda x, y, m, o: F.cross_entropy(m(x), y)), every=EPOCH)
    led.close()
    key = tmp_path / "trainer.key"
    WORLD.trainer.save(key)
    ledger = str(tmp_path / "l")
    assert cli_main(["scan", ledger, "--record"]) == 2  # --record needs --key
    assert cli_main(["scan", ledger, "--min-trace", "1"]) == 2
    capsys.readouterr()
    assert cli_main(["scan", ledger, "--record", "--key", str(key), "--min-trace", "3", "--fraction", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "recorded as MemorizationScan" in out and "mean-loss" in out
    assert cli_main(["scan", ledger, "--record", "--key", str(key), "--min-trace", "3", "--fraction", "0.02",
                     "--method", "lt-iqr"]) == 0
    assert "lt-iqr" in capsys.readouterr().out
    led = Ledger.open(tmp_path / "l")
    try:
        mean, iqr = [s.body for s in _scans(led)]
        assert mean["parameters"] == {"fraction": 0.02, "min_trace": 3, "method": "mean-loss"}
        assert mean["method"] == "mean-loss" and len(mean["flagged"]) == 5
        assert iqr["parameters"] == {"fraction": 0.02, "min_trace": 3} and iqr["method"] == "lt-iqr"
        assert mean["scores_digest"] != iqr["scores_digest"]
        assert_verified(*verify(led, tmp_path))
    finally:
        led.close()
    assert isinstance(SigningKey.load(key), SigningKey)


# -- a policy that requires the scans (specs/policy.md §1, dynamics.md §2.2) ------------------------

REQUIRED = {"memorization": {"fraction": 0.05, "min_trace": 3}}


def _requiring_policy() -> Any:
    from gradledger.training.policy import sign_policy
    from helpers import policy_fields

    return sign_policy({**policy_fields("digits-scanned"), "monitors": REQUIRED}, WORLD.root, 10)


def test_a_policy_that_requires_scans_makes_every_run_scan(tmp_path: Path) -> None:
    policy = _requiring_policy()
    assert policy.monitors == REQUIRED
    from gradledger.training.dataset import commit_dataset
    from test_trainer import MANIFESTS, X

    led, _ = new_ledger(tmp_path / "l")
    ds = commit_dataset(led, MANIFESTS, "digits-inputs", WORLD.trainer, inputs=X)  # replay needs the inputs
    try:
        model, opt, loader = parts()
        with pytest.raises(GovernanceError, match="requires memorization scans"):
            engine_for(led, ds, model, policy=policy, memorization=MemorizationScan(fraction=0.5, min_trace=3))
        engine = engine_for(led, ds, model, policy=policy, checkpoint_every=EPOCH)  # nothing asked: the policy's
        gm, gopt, gloader = engine.make_governed(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, 3 * EPOCH)
        run = led.observation(led.by_type("RunStarted")[-1]).body
        assert run["settings"]["monitors"] == REQUIRED
        assert [led.observation(s).body["through"] for s in led.by_type("MemorizationScan")] == [EPOCH, 2 * EPOCH,
                                                                                              3 * EPOCH]
    finally:
        led.close()
    led = Ledger.open(tmp_path / "l")
    try:
        assert_verified(*verify(led, tmp_path))

        def undeclare(f: Any) -> None:  # the hostile trainer drops the scans and the declaration
            for s in reversed(f.seqs("MemorizationScan")):
                f.remove(s)
            f.set(f.seqs("RunStarted")[-1], ("settings", "monitors"), {})
        code, report = _structure(led, tmp_path, undeclare)
        assert_caught(code, report, "policy in force requires")
    finally:
        led.close()


@pytest.mark.parametrize("bad", [{"fraction": 0.0, "min_trace": 3}, {"fraction": 0.5, "min_trace": 1},
                                 {"fraction": 0.5}, {"fraction": 0.5, "min_trace": 3, "extra": 1}])
def test_a_malformed_requirement_is_refused_by_both_parsers(bad: dict[str, Any]) -> None:
    from gradledger.ledger import encoding
    from gradledger.training.errors import PolicyError
    from gradledger.training.policy import sign_policy, validate_policy
    from gradledger.verify._internal.routing import PolicyInvalid, policy_from_fields
    from helpers import policy_fields

    with pytest.raises(PolicyError, match="monitors|memorization"):
        sign_policy({**policy_fields("bad"), "monitors": {"memorization": bad}}, WORLD.root, 10)
    good = sign_policy(policy_fields("good"), WORLD.root, 10).policy
    fields = encoding.decode(encoding.encode({**good, "monitors": {"memorization": bad}}))
    with pytest.raises(PolicyError):
        validate_policy(fields)
    with pytest.raises(PolicyInvalid):
        policy_from_fields(fields)


# -- the mean-loss method (specs/dynamics.md §1.1, training format 10) ---------------------------------


@pytest.fixture(scope="module")
def mean_monitored(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """The monitored run's loop, declaring the default method: the mean recorded loss."""
    path = tmp_path_factory.mktemp("mean-monitored")
    return governed(path / "ledger", steps(STEPS, lambda x, y, m, o: F.cross_entropy(m(x), y)), every=EPOCH,
                    memorization=MEAN)


def test_a_mean_loss_run_records_scans_of_the_mean_that_verify(mean_monitored: Ledger, tmp_path: Path) -> None:
    from gradledger.training.updates import example_loss_values

    led = mean_monitored
    run = led.observation(led.by_type("RunStarted")[-1]).body["settings"]
    assert run["format"] == 10 and run["monitors"] == {"memorization": MEAN.parameters}
    scans = _scans(led)
    assert [s.body["method"] for s in scans] == ["mean-loss"] * 4
    assert [s.body["scored"] for s in scans] == [0, 0, 240, 240]
    traces: dict[int, list[float]] = {}
    for s in led.by_type("GovernedUpdate"):
        u = led.observation(s).body
        for i, v in zip(u["batch"], example_loss_values(u["example_losses"])):
            traces.setdefault(i, []).append(v)
    want = sorted(((-math.fsum(t) / len(t), i) for i, t in traces.items()))[: math.ceil(0.05 * 240)]
    assert [[i, -s] for s, i in want] == scans[-1].body["flagged"]
    assert scan(led, params=MEAN)["scores_digest"] == scans[-1].body["scores_digest"].hex()
    code, report = verify(led, tmp_path)
    assert_verified(code, report)
    assert any(r["name"] == "scans" and r["status"] == "pass" for r in report["checks"])


MEAN_FORGERIES = {
    # the hostile trainer relabels its mean-loss scans as LT-IQR ones (or the reverse), everything re-signed
    "the method field changed": lambda f: f.set(_last(f), ("method",), "lt-iqr"),
    "the parameters' method dropped": lambda f: f.set(_last(f), ("parameters",), {"fraction": 0.05, "min_trace": 3}),
    **{name: FORGERIES[name] for name in ("the top score lowered", "the most memorized example hidden")},
    "settings declare a method no format knows": lambda f: f.set(
        f.seqs("RunStarted")[-1], ("settings", "monitors", "memorization", "method"), "median-loss"),
    "settings declare the method in format 9": lambda f: f.set(f.seqs("RunStarted")[-1], ("settings", "format"), 9),
}


@pytest.mark.parametrize("name", sorted(MEAN_FORGERIES))
def test_a_forged_mean_loss_scan_is_caught(mean_monitored: Ledger, tmp_path: Path, name: str) -> None:
    _assert_scan_forgery_caught(mean_monitored, tmp_path, MEAN_FORGERIES[name])


def test_a_policy_requires_the_method_too(tmp_path: Path) -> None:
    from gradledger.ledger import encoding
    from gradledger.training.dataset import commit_dataset
    from gradledger.training.errors import PolicyError
    from gradledger.training.policy import sign_policy, validate_policy
    from gradledger.verify._internal.routing import PolicyInvalid, policy_from_fields
    from helpers import policy_fields
    from test_trainer import MANIFESTS

    policy = sign_policy({**policy_fields("mean-scanned"), "monitors": {"memorization": MEAN.parameters}}, WORLD.root, 10)
    assert MemorizationScan.from_parameters(policy.monitors["memorization"]) == MEAN
    assert policy_from_fields(encoding.decode(encoding.encode(policy.policy))) is not None
    led, _ = new_ledger(tmp_path / "l")
    try:
        ds = commit_dataset(led, MANIFESTS, "digits", WORLD.trainer)
        with pytest.raises(GovernanceError, match="requires memorization scans"):  # the run asks for LT-IQR
            engine_for(led, ds, parts()[0], policy=policy, memorization=PARAMS)
    finally:
        led.close()
    # "lt-iqr" is spelled by leaving the method out: one byte form for each meaning, in both parsers
    good = sign_policy(policy_fields("good"), WORLD.root, 10).policy
    for bad in ({"fraction": 0.05, "min_trace": 3, "method": "lt-iqr"}, {"fraction": 0.05, "min_trace": 3, "method": 1}):
        fields = encoding.decode(encoding.encode({**good, "monitors": {"memorization": bad}}))
        with pytest.raises(PolicyError):
            validate_policy(fields)
        with pytest.raises(PolicyInvalid):
            policy_from_fields(fields)
