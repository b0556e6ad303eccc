"""Differential privacy through depth routing (specs/privacy.md): the run, its record, the twins, and a hostile
trainer's forgeries."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.errors import SchemaError
from gradledger.ledger.ledger import Ledger
from gradledger.training import privacy as TP
from gradledger.training.bands import sequential_bands
from gradledger.training.dataset import commit_dataset
from gradledger.training.errors import GovernanceError, PolicyError
from gradledger.training.policy import CompiledPolicy, normalize_policy, sign_policy
from gradledger.training.trainer import Governance, Trainer
from gradledger.training.retirement import retire
from gradledger.training.unlearning import unlearn
from gradledger.verify._internal import privacy as VP
from gradledger.verify._internal import routing as VR
from helpers import CROWD_KEY, policy_fields, verify_cli
from test_idioms import BATCH, assert_caught, assert_verified, make_model, verify
from test_trainer import MANIFESTS, WORLD, X, Y, T, new_ledger

STEPS, EVERY = 12, 4
#: Low-confidence crowd labels are private: they may reach the head fully and the mid band at half strength,
#: clipped at 1.0 and 2.0 and noised with multipliers 1.0 and 1.5; the embedding band never sees them.
FIELDS = policy_fields("digits-private")
FIELDS["rules"].append({"name": "private-crowd", "match": {"authority": "acme/crowd"}, "profile": [1.0, 0.5, 0.0],
                        "limits": [None, None, None], "private": True})
FIELDS["privacy"] = {"clip": [1.0, 2.0, None], "noise": [1.0, 1.5, None], "delta": 1e-5}
POLICY = sign_policy(FIELDS, WORLD.root, T)
PRIVATE = 3  # the private rule's index


def _engine(led: Ledger, model: nn.Module, run_id: str = "private") -> tuple[Governance, torch.optim.Optimizer, Any]:
    ds = commit_dataset(led, MANIFESTS, "digits", WORLD.trainer, inputs=X)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model), run_id=run_id,
                     checkpoint_every=EVERY, seed=5, root_key=WORLD.root)
    return run, opt, DataLoader(TensorDataset(X, Y), batch_size=BATCH)


def _train(led: Ledger, steps: int = STEPS) -> Governance:
    run, opt, loader = _engine(led, model := make_model())
    gm, gopt, gl = run.make_governed(model, opt, loader)
    Trainer(run).fit(gm, gopt, gl, steps)
    run.close()
    return run


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    led, _ = new_ledger(tmp_path_factory.mktemp("private") / "ledger")
    _train(led)
    return led


def _bodies(led: Ledger, kind: str) -> list[dict[str, Any]]:
    return [led.observation(s).body for s in led.by_type(kind)]


def _opacus_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


# -- the run and its record ------------------------------------------------------------------------


def test_a_private_run_verifies_bit_for_bit_and_states_the_epsilon_opacus_gives(private: Ledger, tmp_path: Path) -> None:
    code, report = verify(private, tmp_path)
    assert_verified(code, report)
    check = next(c for c in report["checks"] if c["name"] == "privacy")
    assert check["status"] == "pass" and "3 PrivacySpent" in check["detail"], check
    q = BATCH / len(MANIFESTS)
    (spent,) = report["figures"]["privacy"]
    head, mid = _opacus_epsilon(1.0, q, STEPS), _opacus_epsilon(1.5, q, STEPS)
    model = _opacus_epsilon((1.0 ** -2 + 1.5 ** -2) ** -0.5, q, STEPS)
    assert spent["epsilon_per_band"] == {"head": head, "mid": mid} and spent["epsilon"] == model
    assert model > head > mid  # more noise spends less; both bands together spend more than either alone
    records = _bodies(private, "PrivacySpent")
    assert [r["step"] for r in records] == [4, 8, 12]
    assert records[-1]["epsilon"] == model and records[-1]["bands"] == [head, mid, None]
    # Per example class: the private rule reaches both noised bands, so its examples spend the model's epsilon.
    assert records[-1]["rules"] == [None, None, None, model] and spent["epsilon_per_rule"] == {"private-crowd": model}
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.history = [((1.0 ** -2 + 1.5 ** -2) ** -0.5, q, STEPS)]
    assert records[-1]["prv"] == spent["epsilon_prv"] == prv.get_epsilon(1e-5)
    assert records[0]["epsilon"] == _opacus_epsilon((1.0 ** -2 + 1.5 ** -2) ** -0.5, q, 4)


def test_sample_replay_re_measures_the_drawn_steps_and_no_replay_still_accounts(private: Ledger, tmp_path: Path) -> None:
    from gradledger.ledger.bundle import export_bundle
    from gradledger.ledger.keys import write_public_keys

    bundle = tmp_path / "run.glb"
    export_bundle(private, bundle, with_data=True)
    roots = write_public_keys(tmp_path / "roots.pub", [(WORLD.root.public_key, "root")])
    for mode in ("sample", "none"):
        code, report = verify_cli(bundle, roots, "--replay", mode)
        assert code == 0, report["first_failure"]
        check = next(c for c in report["checks"] if c["name"] == "privacy")
        assert check["status"] == "pass" and "epsilon" in check["detail"]


def test_only_private_examples_are_clipped_and_some_are(private: Ledger) -> None:
    clipped = 0
    for u in _bodies(private, "GovernedUpdate"):
        p = u["recipe"]["privacy"]
        assert p["clip"] == [1.0, 2.0, None] and p["noise"] == [1.0, 1.5, None]
        assert p["sample_rate"] == len(u["batch"]) / len(MANIFESTS)
        for rule, f in zip(u["routing"]["rules"], p["factors"]):
            assert 0.0 < f <= 1.0
            assert f == 1.0 or rule == PRIVATE
            clipped += f < 1.0
    assert clipped > 0


def test_the_noise_is_what_the_run_did(tmp_path: Path) -> None:
    """A trainer that skips the noise (recording honestly otherwise) ships weights replay does not reach."""
    led, _ = new_ledger(tmp_path / "ledger")
    with mock.patch("gradledger.training.recorder.add_noise", lambda *a, **k: None):
        _train(led, steps=EVERY)
    code, report = verify(led, tmp_path)
    assert_caught(code, report)
    assert report["first_failure"]["name"] == "replay" and report["first_failure"]["step"] == 0, report


def test_a_crashed_private_run_resumes_to_the_uninterrupted_runs_steps_and_epsilon(private: Ledger,
                                                                                  tmp_path: Path) -> None:
    """Nothing committed is lost: the resumed run reads the spent sample rates back from its recorded steps, and
    its steps and PrivacySpent records equal the uninterrupted run's."""
    class Crash(Exception):
        pass

    path = tmp_path / "crashed"
    led, _ = new_ledger(path)
    with pytest.raises(Crash), led:
        run, opt, loader = _engine(led, model := make_model())
        gm, gopt, gl = run.make_governed(model, opt, loader)
        Trainer(run).fit(gm, gopt, gl, EVERY + 2, close=False)
        raise Crash
    led = Ledger.open(path, writable=True)
    try:
        ds = led.by_type("DatasetCommitted")[-1]
        from gradledger.training.dataset import load_dataset

        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        run = Governance(led, WORLD.trainer, dataset=load_dataset(led, ds), policy=POLICY,
                         layout=sequential_bands(model), run_id="private", checkpoint_every=EVERY, seed=5,
                         root_key=WORLD.root)
        gm, gopt, gl = run.resume(model, opt, DataLoader(TensorDataset(X, Y), batch_size=BATCH))
        Trainer(run).fit(gm, gopt, gl, STEPS)
        def spent(ledger: Ledger) -> list[dict[str, Any]]:
            return [{k: v for k, v in b.items() if k != "run"} for b in _bodies(ledger, "PrivacySpent")]

        assert spent(led) == spent(private) and len(spent(led)) == 3
        got = [u["recipe"] for u in _bodies(led, "GovernedUpdate")]
        assert got == [u["recipe"] for u in _bodies(private, "GovernedUpdate")]
    finally:
        led.close()


# -- the twins ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 6), clip=st.floats(0.01, 10.0), deep=st.booleans(),
       ghost=st.booleans())
def test_both_implementations_measure_the_same_clip_factors(seed: int, rows: int, clip: float, deep: bool,
                                                            ghost: bool) -> None:
    """The trainer's measurement (Opacus's ghost norms, or torch's batched autograd) and the verifier's loop over
    examples agree within the verifier's tolerance, over one private band or two, and the trainer's binary32
    factor exceeds the exact one by no more than its norms' binary32 rounding (it is rounded down)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    bands = [list(model[2].parameters()), list(model[0].parameters())]
    clips = (clip, 2.0 * clip if deep else None)
    plan = TP.PrivacyPlan(clips, (1.0, 1.0 if deep else None), 1e-5, frozenset())
    taps = TP.NormTaps(model, bands, plan) if ghost else None
    assert taps is None or taps.usable
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    out = model(x)
    loss = lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
    picked = list(range(0, 8, max(1, 8 // rows)))[:rows]
    mine = TP.clip_factors(out, y, loss, picked, bands, plan, taps)
    theirs = VP.measured_factors(out, y, loss, picked, bands, list(clips))
    for a, b in zip(mine, theirs):
        want = min(1.0, b)
        assert VP.factor_error(a, want) <= VP.FACTOR_TOLERANCE and a <= want * (1 + 1e-6)


def test_ghost_norms_are_used_only_where_opacus_has_a_sampler_for_every_layer() -> None:
    plan = TP.PrivacyPlan((1.0, 1.0), (1.0, 1.0), 1e-5, frozenset())
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    assert TP.NormTaps(plain, [list(plain[2].parameters()), list(plain[0].parameters())], plan).usable
    normed = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    taps = TP.NormTaps(normed, [list(normed[2].parameters()), [*normed[0].parameters(), *normed[1].parameters()]], plan)
    assert not taps.usable  # a LayerNorm has no norm sampler: the batched autograd measures that band


def test_the_noise_seed_rule_and_draws_are_one_rule_in_both() -> None:
    import json

    vectors = json.loads((Path(__file__).parents[1] / "specs/vectors/training-v1.json").read_text())["privacy"]
    assert vectors
    for v in vectors:
        assert TP.noise_seed(v["run_seed"], v["step"], v["band"]) == v["seed"], v["desc"]
        assert VP.noise_seed(v["run_seed"], v["step"], v["band"]) == v["seed"], v["desc"]
        for add in (TP.add_noise, VP.add_noise):
            p = nn.Parameter(torch.zeros(len(v["first"])))
            record = {"clip": [None] * v["band"] + [v["clip"]], "noise": [None] * v["band"] + [v["noise"]]}
            plan = TP.PrivacyPlan(tuple(record["clip"]), tuple(record["noise"]), 1e-5, frozenset())
            bands = [[] for _ in range(v["band"])] + [[p]]
            if add is TP.add_noise:
                add(bands, plan, v["run_seed"], v["step"], v["batch"])
            else:
                add(bands, record, v["run_seed"], v["step"], v["batch"])
            assert p.grad.tolist() == v["first"], v["desc"]


POLICY_ERRORS = {
    "a private rule reaching a band without clip": lambda f: f["rules"][3].update(profile=[1.0, 1.0, 1.0]),
    "a private rule without privacy": lambda f: f.pop("privacy"),
    "clip without noise": lambda f: f["privacy"].update(noise=[1.0, None, None]),
    "one entry short": lambda f: f["privacy"].update(clip=[1.0, 2.0], noise=[1.0, 1.5]),
    "no band noised": lambda f: f["privacy"].update(clip=[None] * 3, noise=[None] * 3),
    "with memorization monitors": lambda f: f.update(monitors={"memorization": {"fraction": 0.1, "min_trace": 2}}),
    "delta of 1": lambda f: f["privacy"].update(delta=1.0),
    "private: false": lambda f: f["rules"][3].update(private=False),
}


@pytest.mark.parametrize("name", sorted(POLICY_ERRORS))
def test_both_parsers_refuse_a_malformed_privacy_policy(name: str) -> None:
    import copy

    fields = normalize_policy(copy.deepcopy(FIELDS))
    fields.update(signer=WORLD.root.key_id, time=T, v=1)
    CompiledPolicy(fields)  # the well-formed one
    VR.policy_from_fields(fields)
    POLICY_ERRORS[name](fields)
    with pytest.raises((PolicyError, SchemaError)):
        CompiledPolicy(fields)
    with pytest.raises(VR.PolicyInvalid):
        VR.policy_from_fields(fields)


_ENTRY = st.sampled_from([None, 0.5, 1.0, 2.0, -1.0, 0.0, 1, float("inf")])


@settings(max_examples=200, deadline=None)
@given(clip=st.lists(_ENTRY, min_size=2, max_size=4), noise=st.lists(_ENTRY, min_size=2, max_size=4),
       delta=st.sampled_from([1e-5, 0.5, 0.0, 1.0, 1]), head=st.sampled_from([0.0, 0.5, 1.0]),
       mid=st.sampled_from([0.0, 0.5, 1.0]), private=st.sampled_from([True, False, None, 1]))
def test_both_parsers_agree_on_every_privacy_section(clip: list, noise: list, delta: Any, head: float, mid: float,
                                                      private: Any) -> None:
    """The trainer's policy parser and the verifier's accept exactly the same privacy sections and private rules."""
    import copy

    fields = normalize_policy(copy.deepcopy(FIELDS))
    fields.update(signer=WORLD.root.key_id, time=T, v=1, privacy={"clip": clip, "noise": noise, "delta": delta})
    rule = fields["rules"][3]
    rule["profile"] = [head, min(head, mid), 0.0]
    if private is None:
        rule.pop("private")
    else:
        rule["private"] = private
    try:
        CompiledPolicy(fields)
        mine = True
    except (PolicyError, SchemaError):
        mine = False
    try:
        VR.policy_from_fields(fields)
        theirs = True
    except VR.PolicyInvalid:
        theirs = False
    assert mine == theirs, fields


# -- what the trainer refuses ------------------------------------------------------------------------


def _one_step(tmp_path: Path, loop: Any) -> None:
    led, _ = new_ledger(tmp_path / "ledger")
    run, opt, loader = _engine(led, model := make_model())
    gm, gopt, gl = run.make_governed(model, opt, loader)
    loop(gm, gopt, gl)


def test_idioms_a_private_run_cannot_record_are_refused_at_their_step(tmp_path: Path) -> None:
    def clipped(gm: Any, gopt: Any, gl: Any) -> None:
        x, y = next(iter(gl))
        gopt.zero_grad()
        torch.nn.functional.cross_entropy(gm(x), y).backward()
        torch.nn.utils.clip_grad_norm_(gm.parameters(), 1.0)
        gopt.step()

    def autocast(gm: Any, gopt: Any, gl: Any) -> None:
        x, y = next(iter(gl))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.cross_entropy(gm(x), y).backward()

    def accumulated(gm: Any, gopt: Any, gl: Any) -> None:
        it = iter(gl)
        for _ in range(2):
            x, y = next(it)
            (torch.nn.functional.cross_entropy(gm(x), y) / 2).backward()
        gopt.step()

    for i, (loop, words) in enumerate([(clipped, "recipe.clip"), (autocast, "autocast"), (accumulated, "accumulation")]):
        with pytest.raises(GovernanceError, match=words) as info:
            _one_step(tmp_path / str(i), loop)
        assert "privacy.md §8" in str(info.value)


def test_unlearning_a_private_run_measures_the_branchs_own_factors_and_its_certificate_verifies(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "ledger")
    _train(led, steps=2 * EVERY)
    retire(led, "worker-1", CROWD_KEY, "a careless annotator")
    result = unlearn(led, "worker-1", WORLD.trainer)
    run = next(s for s in led.by_type("RunStarted") if "branch" in led.observation(s).body["settings"])
    branch = [led.observation(s).body for s in led.by_type("GovernedUpdate") if s > run]
    assert branch and all("privacy" in u["recipe"] for u in branch)
    original = {u["step"]: u for u in _bodies(led, "GovernedUpdate") if u not in branch}
    # Without worker-1 the crowd's examples are re-aggregated and the weights differ: the factors are the branch's.
    assert any(u["recipe"]["privacy"]["factors"] != original[u["step"]]["recipe"]["privacy"]["factors"] for u in branch)
    assert result is not None
    code, report = verify(led, tmp_path)
    assert_verified(code, report)
    assert any(c["name"] == "certificates" and c["status"] == "pass" for c in report["checks"]), report["checks"]


def test_a_verifier_without_opacus_is_unusable_with_its_install_hint(private: Ledger, tmp_path: Path) -> None:
    with mock.patch.dict(sys.modules, {"opacus": None, "opacus.accountants": None}):
        code, report = verify(private, tmp_path)
    assert code == 2, report


# -- a hostile trainer (its key only, everything re-signed) ----------------------------------------------


def _step(f: Any, step: int) -> int:
    return next(k for k in f.seqs("GovernedUpdate") if f.body(k)["step"] == step)


def _private_row(f: Any, step: int) -> int:
    u = f.body(_step(f, step))
    return next(i for i, (r, c) in enumerate(zip(u["routing"]["rules"], u["recipe"]["privacy"]["factors"]))
                if r == PRIVATE and c < 1.0)


def _public_row(f: Any, step: int) -> int:
    return next(i for i, r in enumerate(f.body(_step(f, step))["routing"]["rules"]) if r != PRIVATE)


FORGERIES = {
    "a private example left unclipped": (
        lambda f: f.set(_step(f, 2), ("recipe", "privacy", "factors", _private_row(f, 2)), 1.0), "replay", "clip factor"),
    "a public example clipped": (
        lambda f: f.set(_step(f, 2), ("recipe", "privacy", "factors", _public_row(f, 2)), 0.5), "privacy", "not private"),
    "less noise claimed": (lambda f: f.set(_step(f, 2), ("recipe", "privacy", "noise", 0), 2.0), "privacy", "policy's"),
    "a step without its privacy record": (lambda f: f.delete(_step(f, 5), ("recipe",)), "privacy", "no recipe.privacy"),
    "a smaller sample rate": (lambda f: f.set(_step(f, 1), ("recipe", "privacy", "sample_rate"), 0.001), "privacy",
                              "sample_rate"),
    "a lower epsilon": (lambda f: f.set(f.seqs("PrivacySpent")[-1], ("epsilon",), 0.5), "privacy", "recomputed"),
    "a band's epsilon lowered": (lambda f: f.set(f.seqs("PrivacySpent")[0], ("bands", 1), 0.1), "privacy", "band 1"),
    "the last epsilon left out": (lambda f: f.remove(f.seqs("PrivacySpent")[-1]) and None, "privacy",
                                  "no PrivacySpent"),
    "another delta": (lambda f: f.set(f.seqs("PrivacySpent")[1], ("delta",), 1e-3), "privacy", "delta"),
    "a lower PRV epsilon": (lambda f: f.set(f.seqs("PrivacySpent")[-1], ("prv",), 0.2), "privacy", "PRV"),
    "a private rule's epsilon lowered": (lambda f: f.set(f.seqs("PrivacySpent")[-1], ("rules", 3), 0.2), "privacy",
                                         "rule 3"),
    "a public rule given an epsilon": (lambda f: f.set(f.seqs("PrivacySpent")[-1], ("rules", 0), 0.2), "privacy",
                                       "null exactly"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_lie_about_privacy_is_caught(private: Ledger, tmp_path: Path, name: str) -> None:
    forge, check, words = FORGERIES[name]
    code, report = verify(private, tmp_path, forge)
    assert_caught(code, report, words)
    assert report["first_failure"]["name"] == check, report["first_failure"]


def test_a_private_run_is_traced_from_its_checkpoints_and_recorded_losses(private: Ledger) -> None:
    """Forensics on a private run (specs/forensics.md): the checkpoint and loss-trace methods answer; the replay
    method, which re-creates plain steps only, says which methods to use instead."""
    import json

    from gradledger.training.forensics import TraceError, trace

    query = json.dumps({"description": "3s read as 8", "inputs": {"label": 3, "limit": 12}, "target": 8})
    for method in ("checkpoints", "loss-trace"):
        report = trace(private, query, run_id="private", method=method, top=5)
        assert report["sources"], (method, report)
        if method == "checkpoints":
            assert report["approximate"] and any("private run" in n for n in report["notes"]), report
    with pytest.raises(TraceError, match="checkpoints or loss-trace"):
        trace(private, query, run_id="private", method="replay")


# -- a project's taxonomy (specs/project.md) -----------------------------------------------------------


def test_a_project_whose_taxonomy_makes_the_crowd_private_governs_an_unchanged_loop_that_verifies(tmp_path: Path) -> None:
    """``[policy.privacy]`` and ``private = true`` in the taxonomy file: the signed policy has them, ``govern``
    runs the user's own loop, and the bundle verifies with its epsilon (the trusted crowd worker's labels are
    private and reach the head and mid bands; the expert's are not)."""
    import gradledger
    from gradledger.ledger.bundle import export_bundle

    text = (Path(__file__).resolve().parents[1] / "examples" / "taxonomy.toml").read_text()
    assert 'name = "crowd-trusted"\n' in text
    text = text.replace('name = "crowd-trusted"\n', 'name = "crowd-trusted"\nprivate = true\n')
    text += '\n[policy.privacy]\nclip = { head = 1.0, mid = 2.0 }\nnoise = { head = 1.0, mid = 1.2 }\ndelta = 1e-5\n'
    (tmp_path / "taxonomy.toml").write_text(text)
    sources = ["worker-4" if i % 2 else "dr-lee" for i in range(len(X))]
    with gradledger.Project.init(tmp_path / "acme", tmp_path / "taxonomy.toml") as project:
        project.label(X, Y.tolist(), source=sources, name="digits")
    with gradledger.Project.open(tmp_path / "acme") as project:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gm, gopt, loader = gradledger.govern(model, opt, DataLoader(TensorDataset(X, Y), batch_size=BATCH),
                                             project=project, dataset="digits", checkpoint_every=EVERY)
        for step, (x, y) in enumerate(loader):
            gopt.zero_grad()
            torch.nn.functional.cross_entropy(gm(x), y).backward()
            gopt.step()
            if step == 2 * EVERY - 1:
                break
        gm.run.close()
        ups = _bodies(project.ledger, "GovernedUpdate")
        assert all(any(f < 1.0 for f in u["recipe"]["privacy"]["factors"]) for u in ups)
        export_bundle(project.ledger, tmp_path / "run.glb", with_data=True)
    code, report = verify_cli(tmp_path / "run.glb", tmp_path / "acme" / "roots.pub")
    assert code == 0, report.get("first_failure")
    (spent,) = report["figures"]["privacy"]
    assert set(spent["epsilon_per_band"]) == {"head", "mid"} and set(spent["epsilon_per_rule"]) == {"crowd-trusted"}


def test_a_taxonomy_with_a_malformed_privacy_table_is_refused_naming_the_field() -> None:
    from gradledger.training.errors import ProjectError
    from gradledger.training.taxonomy import parse_policy_template

    authorities = {"crowd": None}
    rule = {"authority": "crowd", "profile": [1, 0, 0]}
    privacy = {"clip": {"head": 1.0}, "noise": {"head": 1.1}, "delta": 1e-5}
    ok = parse_policy_template({"rules": [{**rule, "private": True}], "privacy": privacy}, authorities, "acme")
    assert ok.rules[0]["private"] and ok.privacy["clip"] == {"head": 1.0}
    for table, words in [({"rules": [{**rule, "private": 1}], "privacy": privacy}, "rules[0].private"),
                         ({"rules": [{**rule, "private": True}]}, "policy.privacy"),
                         ({"rules": [rule], "privacy": {**privacy, "delta": 2}}, "privacy.delta"),
                         ({"rules": [rule], "privacy": {**privacy, "clip": {"nowhere": 1.0}}}, "privacy.clip"),
                         ({"rules": [rule], "privacy": {"clip": {"head": 1.0}, "delta": 1e-5}}, "privacy")]:
        with pytest.raises(ProjectError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse_policy_template(table, authorities, "acme")
