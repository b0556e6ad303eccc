"""Entropy depth profiles (issue 16; specs/dynamics.md §5): a DepthProfile at every checkpoint of a run
that declares them, the read-out twin in both implementations, every profile recomputed by replay from
the checkpoint's weights, and the lies a hostile trainer (trainer key only, everything re-signed) can
tell about them caught."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.ledger import Ledger
from gradledger.training import DepthProfiles
from gradledger.training.bands import sequential_bands
from gradledger.training.dataset import commit_dataset
from gradledger.training.dynamics import profiles as TP
from gradledger.training.errors import GovernanceError
from gradledger.training.manifests import example_id, label_example, source_entry
from gradledger.training.trainer import Governance, Trainer
from gradledger.verify._internal import profiles as VP
from helpers import verify_cli
from test_idioms import BATCH, _keys, assert_caught, assert_verified, make_model, verify
from gradledger.training.policy import sign_policy, suspended_rules
from gradledger.verify._internal import routing as VR
from helpers import CROWD_KEY, policy_fields
from test_trainer import WORKER_CREDS
from test_trainer import MANIFESTS, POLICY, WORLD, X, Y, T, new_ledger

EVERY, EPOCHS = 8, 4


def _held_out(lo: int = 240, hi: int = 400) -> tuple[torch.Tensor, list[Any]]:
    d = load_digits()
    x = torch.tensor(d.data[lo:hi] / 16.0, dtype=torch.float32)
    signed = [label_example(example=example_id(x[i]), sources=[source_entry(WORLD.source_cred, int(d.target[lo + i]), 0.95)],
                            aggregation="single", ontology="digits-v1", review="accepted", key=WORLD.source, time=T)
              for i in range(len(x))]
    return x, signed


HX, HELD = _held_out()


def _engine(led: Ledger, ds: Any, model: Any, profiles: Any, policy: Any = POLICY) -> tuple[Governance, Any, Any]:
    """The profiled run of ``model`` over the digits, its optimizer and the user's loader."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = Governance(led, WORLD.trainer, dataset=ds, policy=policy, layout=sequential_bands(model), run_id="profiled",
                     checkpoint_every=EVERY, seed=3, root_key=WORLD.root, profiles=profiles)
    return run, opt, DataLoader(TensorDataset(X, Y), batch_size=BATCH)


def _run(led: Ledger, profiles: Any, policy: Any = POLICY) -> Governance:
    """EPOCHS epochs of the run, closed."""
    ds = commit_dataset(led, MANIFESTS, "digits", WORLD.trainer, inputs=X)
    run, opt, loader = _engine(led, ds, model := make_model(), profiles, policy)
    gm, gopt, gl = run.make_governed(model, opt, loader)
    Trainer(run).fit(gm, gopt, gl, EPOCHS * run.steps_per_epoch)
    return run


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    led, _ = new_ledger(tmp_path_factory.mktemp("profiled") / "ledger")
    commit_dataset(led, HELD, "heldout", WORLD.trainer, inputs=HX)
    _run(led, DepthProfiles("heldout"))
    return led


def _bodies(led: Ledger) -> list[dict[str, Any]]:
    return [led.observation(s).body for s in led.by_type("DepthProfile")]


# -- §5.2 the read-out, both implementations ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_both_implementations_read_out_alike(data: Any) -> None:
    n_classes = data.draw(st.integers(1, 5))
    per = data.draw(st.lists(st.integers(1, 6), min_size=n_classes, max_size=n_classes))
    width = data.draw(st.integers(1, 9))
    seed = data.draw(st.integers(0, 2**31))
    temperature = data.draw(st.floats(1e-3, 1e3))
    classes = sorted(data.draw(st.lists(st.integers(0, 50), min_size=n_classes, max_size=n_classes, unique=True)))
    labels = torch.tensor([c for c, k in zip(classes, per) for _ in range(k)], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(len(labels), width, generator=g, dtype=torch.float64) * data.draw(st.sampled_from([0.0, 1e-3, 1.0, 1e4]))
    halves = torch.arange(len(labels)) % 2  # two slices, as the profile's slices group examples
    got = TP.entropy_profile(f, labels, classes, temperature, halves, 2 if len(labels) > 1 else 1)
    want = VP.entropy_profile(f, labels, classes, temperature, halves, 2 if len(labels) > 1 else 1)
    assert got == want  # the same bits
    top = math.log2(n_classes) if n_classes > 1 else 0.0
    assert all(-1e-12 <= v <= top + 1e-12 for v in got[0] + [got[1]])


def test_the_read_out_is_sure_of_separated_classes_and_unsure_of_identical_ones() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    apart = torch.tensor([[0.0], [0.0], [10.0], [10.0], [20.0], [20.0]], dtype=torch.float64)
    per, mean, _ = TP.entropy_profile(apart, labels, [0, 1, 2], 0.01)
    assert max(per) < 1e-6 and mean < 1e-6
    per, mean, _ = TP.entropy_profile(torch.ones(6, 3, dtype=torch.float64), labels, [0, 1, 2], 0.5)
    assert per == [math.log2(3)] * 3 or all(abs(v - math.log2(3)) < 1e-12 for v in per)


# -- the records, and their recomputation -------------------------------------------------------


def test_every_checkpoint_has_a_profile_and_replay_recomputes_them(profiled: Ledger, tmp_path: Path) -> None:
    bodies = _bodies(profiled)
    checkpoints = [profiled.observation(s).body["step"] for s in profiled.by_type("Checkpoint")]
    assert [b["step"] for b in bodies] == checkpoints and checkpoints[0] == 0 and len(checkpoints) >= 4
    first, last = bodies[0], bodies[-1]
    assert first["classes"] == list(range(10)) and sum(first["counts"]) == len(HELD)
    assert len(first["entropy"]) == 3 and all(len(e) == 10 for e in first["entropy"])
    # training separates the classes: the head's evidence is surer at the end than at step 0
    assert last["mean"][0] < first["mean"][0] - 0.1, (first["mean"], last["mean"])
    code, report = verify(profiled, tmp_path)
    assert_verified(code, report)
    check = next(c for c in report["checks"] if c["name"] == "profiles")
    assert check["status"] == "pass" and f"{len(bodies)} of {len(bodies)} depth profile(s) recomputed" in check["detail"]
    assert report["figures"]["profile_deviation_bits"] == 0.0


def test_without_replay_only_their_form_is_checked_and_the_report_says_so(profiled: Ledger, tmp_path: Path) -> None:
    from gradledger.ledger.bundle import export_bundle
    from gradledger.ledger.keys import write_public_keys

    bundle = tmp_path / "run.glb"
    export_bundle(profiled, bundle, with_data=True)
    roots = write_public_keys(tmp_path / "roots.pub", [(WORLD.root.public_key, "root")])
    code, report = verify_cli(bundle, roots, "--replay", "none")
    check = next(c for c in report["checks"] if c["name"] == "profiles")
    assert check["status"] == "pass" and "not requested" in check["detail"]
    assert report["weights_verified"] is False


def test_sample_replay_recomputes_the_profiles_of_the_segments_it_draws(profiled: Ledger, tmp_path: Path) -> None:
    from gradledger.ledger.bundle import export_bundle
    from gradledger.ledger.keys import write_public_keys

    bundle = tmp_path / "run.glb"
    export_bundle(profiled, bundle, with_data=True)
    roots = write_public_keys(tmp_path / "roots.pub", [(WORLD.root.public_key, "root")])
    code, report = verify_cli(bundle, roots, "--replay", "sample", "--sample-fraction", "0.25", "--nonce", "00" * 16)
    assert code == 0, report.get("first_failure")
    check = next(c for c in report["checks"] if c["name"] == "profiles")
    n = len(_bodies(profiled))
    done = int(check["detail"].split(" of ")[0])
    # each drawn segment recomputes its end checkpoint's profile (the first also its start's)
    chosen = report["figures"]["sample_chosen"]
    assert check["status"] == "pass" and done == len(chosen) + (0 in chosen) < n, (check, chosen)
    assert "outside the replayed segments" in check["detail"]


# -- a hostile trainer ---------------------------------------------------------------------------


def _last(f: Any) -> int:
    return f.seqs("DepthProfile")[-1]


def _training_set_as_held_out(f: Any) -> None:
    """The run claims its training set as the held-out one (profiles that flatter the model)."""
    run = f.first("RunStarted")
    while "monitors" not in f.body(run).get("settings", {}) or "profiles" not in f.body(run)["settings"]["monitors"]:
        run = f.seqs("RunStarted", run + 1)[0]
    trained = f.body(run)["settings"]["dataset"]
    f.set(run, ("settings", "monitors", "profiles", "dataset"), dict(trained))
    for k in f.seqs("DepthProfile"):
        f.set(k, ("dataset",), trained["seq"])


FORGERIES = {
    # the recorded values, lowered where replay reads them back from the weights
    "a class's entropy flattered": (lambda f: f.set(_last(f), ("entropy", 0, 3), f.body(_last(f))["entropy"][0][3] / 2),
                                    "recomputed"),
    "a band's mean flattered": (lambda f: f.set(_last(f), ("mean", 2), 0.0), "recomputed"),
    "the read-out's temperature": (lambda f: f.set(_last(f), ("parameters", "temperature"), 5.0), "parameters"),
    "a class's count": (lambda f: f.set(_last(f), ("counts", 0), f.body(_last(f))["counts"][0] + 1), "counts"),
    "a profile left out": (lambda f: f.remove(_last(f)), "has no DepthProfile"),
    "a profile of no checkpoint": (lambda f: f.set(_last(f), ("step",), 1), "not a checkpoint"),
    "the training set as held out": (_training_set_as_held_out, "training set"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_lie_about_the_profiles_is_caught(profiled: Ledger, tmp_path: Path, name: str) -> None:
    forge, words = FORGERIES[name]
    code, report = verify(profiled, tmp_path, forge)
    assert_caught(code, report, words)
    assert report["first_failure"]["name"] in ("profiles", "settings"), report["first_failure"]


# -- what the trainer refuses ----------------------------------------------------------------------


def test_the_trainer_refuses_a_held_out_set_it_cannot_profile(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    with pytest.raises(GovernanceError, match="not committed"):
        _run(led, DepthProfiles("nowhere"))
    commit_dataset(led, HELD, "no-inputs", WORLD.trainer)
    with pytest.raises(GovernanceError, match="without its inputs"):
        _run(led, DepthProfiles("no-inputs"))
    commit_dataset(led, MANIFESTS[:20], "overlap", WORLD.trainer, inputs=X[:20])
    with pytest.raises(GovernanceError, match="shares 20 example"):
        _run(led, DepthProfiles("overlap"))
    with pytest.raises(GovernanceError, match="temperature"):
        DepthProfiles("heldout", temperature=0.0)
    assert _keys  # the forging helpers' key directory is what verify() uses


# -- §5.5 entropy budgets -------------------------------------------------------------------------

#: The confident crowd may write into the mid band only while that band's mean profile moves by at most
#: 0.02 bits between checkpoints; past it, the rule is suspended and crowd labels fall to the default (head).
BUDGET = 0.02
BUDGET_FIELDS = policy_fields("digits-budget")
BUDGET_FIELDS["rules"][2] = {**BUDGET_FIELDS["rules"][2], "entropy_budget": {"band": "mid", "max_change": BUDGET}}
BUDGET_POLICY = sign_policy(BUDGET_FIELDS, WORLD.root, T)
CROWD = 2  # the rule's index


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    led, _ = new_ledger(tmp_path_factory.mktemp("budgeted") / "ledger")
    commit_dataset(led, HELD, "heldout", WORLD.trainer, inputs=HX)
    _run(led, DepthProfiles("heldout"), policy=BUDGET_POLICY)
    return led


def _suspended_steps(led: Ledger, policy: Any = BUDGET_POLICY) -> dict[int, frozenset[int]]:
    """Checkpoint step -> the rules its profile suspends, recomputed from the recorded means."""
    bodies, out, before = _bodies(led), {}, None
    for b in bodies:
        out[b["step"]] = suspended_rules(policy, before, b)
        before = b
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.floats(0.0, 3.4), min_size=3, max_size=3), min_size=1, max_size=6))
def test_both_implementations_suspend_the_same_rules(means: list[list[float]]) -> None:
    policy = VR.parse_policy(BUDGET_POLICY.signed)
    before = None
    for m in means:
        now = {"mean": m}
        assert suspended_rules(BUDGET_POLICY, before, now) == policy.suspended(before, now)
        want = frozenset({CROWD}) if before is not None and abs(m[1] - before["mean"][1]) > BUDGET else frozenset()
        assert policy.suspended(before, now) == want
        before = now


def test_a_budget_exceeded_suspends_its_rule_until_the_next_checkpoint_and_the_run_verifies(
        budgeted: Ledger, tmp_path: Path) -> None:
    at = _suspended_steps(budgeted)
    assert any(at.values()) and not all(at.values()), at  # the budget bit at some checkpoints, not all
    crowd_confident = {i for i, m in enumerate(MANIFESTS) if _crowd_confident(m.manifest)}
    assert crowd_confident
    starts = sorted(at)
    for s in budgeted.by_type("GovernedUpdate"):
        u = budgeted.observation(s).body
        off = at[max(c for c in starts if c <= u["step"])]
        for i, r in zip(u["batch"], u["routing"]["rules"]):
            if i in crowd_confident:
                assert r == (-1 if CROWD in off else CROWD), (u["step"], i, r)
    code, report = verify(budgeted, tmp_path)
    assert_verified(code, report)


def _first_suspending(f: Any) -> tuple[int, int]:
    """The first DepthProfile whose mid-band mean moved past the budget, and its predecessor."""
    seqs = f.seqs("DepthProfile")
    for a, b in zip(seqs, seqs[1:]):
        if abs(f.body(b)["mean"][1] - f.body(a)["mean"][1]) > BUDGET:  # the band's mean: no slice
            return a, b
    raise AssertionError("no profile exceeds the budget")


def _crowd_confident(m: Any) -> bool:
    """The examples the budgeted rule matches (tests/test_trainer.py's crowd labels, confident enough)."""
    return m["aggregation"] == "majority" and m["confidence"] >= 0.75


def _route_as_unsuspended(f: Any) -> None:
    """The trainer ignores the suspension: the steps after it record the crowd rule for its examples."""
    a, b = _first_suspending(f)
    step = f.body(b)["step"]
    for k in f.seqs("GovernedUpdate"):
        u = f.body(k)
        if step <= u["step"] < step + EVERY:
            rules = [CROWD if r == -1 and _crowd_confident(MANIFESTS[i].manifest) else r
                     for i, r in zip(u["batch"], u["routing"]["rules"])]
            f.set(k, ("routing", "rules"), rules)


def _hide_the_change(f: Any) -> None:
    """The trainer records a mid-band mean within the budget, so that no rule is suspended on paper."""
    a, b = _first_suspending(f)
    f.set(b, ("mean", 1), f.body(a)["mean"][1])


@pytest.mark.parametrize("name,forge", [("routing ignores the suspension", _route_as_unsuspended),
                                        ("a profile's change hidden", _hide_the_change)])
def test_a_trainer_that_escapes_its_budget_is_caught(budgeted: Ledger, tmp_path: Path, name: str, forge: Any) -> None:
    code, report = verify(budgeted, tmp_path, forge)
    assert_caught(code, report)
    assert report["first_failure"]["name"] in ("routing", "profiles"), report["first_failure"]


def test_a_budget_needs_profiles_and_a_band_of_the_policy(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    with pytest.raises(GovernanceError, match="entropy budget"):
        _run(led, None, policy=BUDGET_POLICY)
    bad = policy_fields("bad")
    bad["rules"][2] = {**bad["rules"][2], "entropy_budget": {"band": "nowhere", "max_change": 0.1}}
    from gradledger.training.errors import PolicyError

    with pytest.raises(PolicyError, match="entropy_budget"):
        sign_policy(bad, WORLD.root, T)


# -- §5.3 slices ---------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["acme", "crowd", "mturk", "radiology", "x"]), min_size=1, max_size=4),
                min_size=1, max_size=4), st.sampled_from(["accepted", "fixed", "rejected", "pending"]))
def test_both_implementations_slice_alike(paths: list[list[str]], review: str) -> None:
    joined = ["/".join(p) for p in paths]
    for by in ("authority", "review"):
        assert TP.slice_key({"review": review}, joined, by) == VP.slice_key({"review": review}, joined, by)
    key = TP.slice_key({"review": review}, joined, "authority")
    assert all(p == key or p.startswith(key + "/") for p in joined) or key == "*"


def _mixed_held_out() -> list[Any]:
    """The held-out digits, every other one labeled by a crowd worker instead of the expert."""
    out = []
    for i, m in enumerate(HELD):
        if i % 2:
            label = m.manifest["label"]
            out.append(label_example(example=m.example, sources=[source_entry(WORKER_CREDS[0], label, 0.9)],
                                     aggregation="single", ontology="digits-v1", review="accepted", key=CROWD_KEY,
                                     time=T))
        else:
            out.append(m)
    return out


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    led, _ = new_ledger(tmp_path_factory.mktemp("sliced") / "ledger")
    commit_dataset(led, _mixed_held_out(), "heldout", WORLD.trainer, inputs=HX)
    _run(led, DepthProfiles("heldout", slice="authority"))
    return led


def test_a_profile_by_authority_averages_each_slice_and_replay_recomputes_it(sliced: Ledger, tmp_path: Path) -> None:
    bodies = _bodies(sliced)
    sl = bodies[-1]["slices"]
    assert sl["by"] == "authority" and sl["names"] == sorted({"acme/crowd/mturk", WORLD.source_cred.path})
    assert sl["counts"] == [len(HELD) // 2, len(HELD) - len(HELD) // 2] or sorted(sl["counts"]) == [80, 80]
    assert len(sl["entropy"]) == 3 and all(len(e) == 2 for e in sl["entropy"])
    # the slices partition the held-out set: their count-weighted mean is the band's mean
    for k in range(3):
        pooled = sum(n * e for n, e in zip(sl["counts"], sl["entropy"][k])) / sum(sl["counts"])
        assert pooled == pytest.approx(bodies[-1]["mean"][k], abs=1e-12)
    code, report = verify(sliced, tmp_path)
    assert_verified(code, report)


@pytest.mark.parametrize("name,forge", [
    ("a slice's entropy flattered", lambda f: f.set(_last(f), ("slices", "entropy", 0, 0), 0.0)),
    ("a slice renamed", lambda f: f.set(_last(f), ("slices", "names", 0), "acme/experts")),
    ("the slices dropped", lambda f: f.delete(_last(f), ("slices",))),
])
def test_a_lie_about_a_slice_is_caught(sliced: Ledger, tmp_path: Path, name: str, forge: Any) -> None:
    code, report = verify(sliced, tmp_path, forge)
    assert_caught(code, report)
    assert report["first_failure"]["name"] == "profiles", report["first_failure"]


def test_a_resumed_budgeted_run_routes_by_the_profiles_it_recorded(budgeted: Ledger, tmp_path: Path) -> None:
    """A crash after a checkpoint loses nothing committed; the resumed run reads the suspended rules back
    from the recorded profiles and takes the uninterrupted run's steps."""
    class Crash(Exception):
        pass

    steps = len(budgeted.by_type("GovernedUpdate"))
    path = tmp_path / "crashed"
    led, _ = new_ledger(path)
    commit_dataset(led, HELD, "heldout", WORLD.trainer, inputs=HX)
    ds = commit_dataset(led, MANIFESTS, "digits", WORLD.trainer, inputs=X)

    def engine(model: Any) -> tuple[Governance, Any, Any]:
        return _engine(led, ds, model, DepthProfiles("heldout"), BUDGET_POLICY)

    with pytest.raises(Crash), led:
        run, opt, loader = engine(model := make_model())
        gm, gopt, gl = run.make_governed(model, opt, loader)
        Trainer(run).fit(gm, gopt, gl, 2 * EVERY + 3, close=False)
        raise Crash
    led = Ledger.open(path, writable=True)
    try:
        run, opt, loader = engine(model := make_model())
        gm, gopt, gl = run.resume(model, opt, loader)
        Trainer(run).fit(gm, gopt, gl, steps)
        got = [led.observation(s).body["routing"] for s in led.by_type("GovernedUpdate")]
        want = [budgeted.observation(s).body["routing"] for s in budgeted.by_type("GovernedUpdate")]
        assert got == want and any(CROWD in s for s in _suspended_steps(led).values())
    finally:
        led.close()



#: The crowd's budget read over the held-out digits its own workers labeled (the authority slice).
SLICE_FIELDS = policy_fields("digits-budget-slice")
SLICE_FIELDS["rules"][2] = {**SLICE_FIELDS["rules"][2],
                            "entropy_budget": {"band": "mid", "max_change": BUDGET, "slice": "acme/crowd/mturk"}}
SLICE_POLICY = sign_policy(SLICE_FIELDS, WORLD.root, T)


def test_a_budget_on_an_authority_slice_reads_that_slice_and_verifies(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    commit_dataset(led, _mixed_held_out(), "heldout", WORLD.trainer, inputs=HX)
    with pytest.raises(GovernanceError, match="slice 'acme/crowd/mturk'"):
        _run(led, DepthProfiles("heldout"), policy=SLICE_POLICY)  # no slices declared: the budget cannot be read
    _run(led, DepthProfiles("heldout", slice="authority"), policy=SLICE_POLICY)
    at = _suspended_steps(led, SLICE_POLICY)
    bodies = _bodies(led)
    j = bodies[0]["slices"]["names"].index("acme/crowd/mturk")
    moved = [abs(b["slices"]["entropy"][1][j] - a["slices"]["entropy"][1][j]) > BUDGET for a, b in zip(bodies, bodies[1:])]
    assert [CROWD in at[b["step"]] for b in bodies[1:]] == moved and any(moved)
    code, report = verify(led, tmp_path)
    assert_verified(code, report)
    # both routers agree that a profile without the slice suspends the budgeted rule
    policy = VR.parse_policy(SLICE_POLICY.signed)
    bare = {"mean": bodies[1]["mean"]}
    assert policy.suspended(bodies[0], bare) == suspended_rules(SLICE_POLICY, bodies[0], bare) == frozenset({CROWD})


def test_gradledger_profiles_reads_the_profiles_and_the_budgets_suspensions(
        budgeted: Ledger, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from gradledger.training.cli import main as cli_main
    from gradledger.training.cli_profiles import profiles_report

    report = profiles_report(budgeted)
    at = _suspended_steps(budgeted)
    assert [c["step"] for c in report["checkpoints"]] == sorted(at)
    assert all(c["suspended"] == (["crowd-confident"] if CROWD in at[c["step"]] else []) for c in report["checkpoints"])
    assert report["budgets"] == [{"rule": "crowd-confident", "band": "mid", "max_change": BUDGET, "slice": None}]
    assert report["last"]["entropy"] == _bodies(budgeted)[-1]["entropy"] and report["held_out"] == "heldout"
    # the command, on a ledger of its own: the table, and one line with exit 2 for a run without profiles
    led, _ = new_ledger(tmp_path / "l")
    commit_dataset(led, HELD, "heldout", WORLD.trainer, inputs=HX)
    _run(led, DepthProfiles("heldout"), policy=BUDGET_POLICY)
    led.close()
    assert cli_main(["profiles", str(tmp_path / "l"), "--run", "profiled"]) == 0
    text = capsys.readouterr().out
    assert "most confused at the head first" in text and "budget of rule 'crowd-confident'" in text
    plain, _ = new_ledger(tmp_path / "plain")
    _run(plain, None)
    plain.close()
    assert cli_main(["profiles", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no depth profiles" in err[0]


def test_a_band_too_wide_to_profile_is_refused_at_the_first_checkpoint(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """§5.1's bound on a band's features (held-out examples x width), here lowered below the digits' widest
    band (160 examples x 32 values): the first checkpoint's profile refuses, naming the band."""
    monkeypatch.setattr(TP, "MAX_FEATURE_VALUES", 160 * 32 - 1)
    led, _ = new_ledger(tmp_path / "l")
    commit_dataset(led, HELD, "heldout", WORLD.trainer, inputs=HX)
    with pytest.raises(GovernanceError, match="more than a depth profile reads"):
        _run(led, DepthProfiles("heldout"))
