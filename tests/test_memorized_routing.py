"""Routing on memorization flags (issue 16; specs/dynamics.md §2.4, policy.md §1 and §3): a policy rule may
match ``memorized``, so that an example a checkpoint's scan flags stops writing into the deep bands from that
checkpoint on. The trainer routes by the flags in force, the verifier recomputes the flags from the recorded
losses and the routing from them, unlearning keeps the flags of its rewind step, and every lie a hostile
trainer (trainer key only, everything re-signed) can tell about them is caught."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as hst
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger import encoding
from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.keys import write_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.training.bands import sequential_bands
from gradledger.training.errors import PolicyError
from gradledger.training.policy import sign_policy, validate_policy
from gradledger.training.retirement import retire
from gradledger.training.trainer import Governance, Trainer
from gradledger.training.unlearning import unlearn
from gradledger.verify._internal.routing import PolicyInvalid, policy_from_fields
from forging import Forge
from helpers import CROWD_KEY, policy_fields, verify_cli
from test_idioms import assert_caught, assert_verified
from test_unlearning import FAULTY, MANIFESTS, SEED, WORLD, X, make_model, new_ledger

EPOCH = 10  # 240 examples, batches of 24
STEPS, EVERY = 3 * EPOCH, 5
SCANS = {"memorization": {"fraction": 0.05, "min_trace": 2}}
#: Flagged examples may tune the head only, whatever their labels' authority.
MEMORIZED = {"name": "memorized", "match": {"memorized": True}, "profile": [1, 0, 0], "limits": [None, None, None]}
POLICY = sign_policy({**policy_fields("digits-mem"), "rules": [MEMORIZED, *policy_fields("x")["rules"]],
                      "monitors": SCANS}, WORLD.root, 10)
KEYS = [WORLD.root, WORLD.trainer, WORLD.authority, WORLD.source, CROWD_KEY]


def _train(led: Ledger, ds: Any, steps: int = STEPS, close: bool = True, **kw: Any) -> Governance:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(X, torch.zeros(len(X))), batch_size=24)
    engine = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model),
                        run_id="mem-run", checkpoint_every=EVERY, seed=SEED, root_key=WORLD.root, **kw)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, steps, close=close)
    return engine


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mem") / "ledger"
    led, ds = new_ledger(path, MANIFESTS, X)
    _train(led, ds)
    led.close()
    return path


@pytest.fixture
def led(original: Path) -> Iterator[Ledger]:
    ledger = Ledger.open(original)
    yield ledger
    ledger.close()


def _flags_by_step(led: Ledger) -> dict[int, frozenset[int]]:
    return {led.observation(s).body["through"]: frozenset(i for i, _ in led.observation(s).body["flagged"])
            for s in led.by_type("MemorizationScan")}


def _updates(led: Ledger, after: int = 0, until: int | None = None) -> list[dict[str, Any]]:
    return [led.observation(s).body for s in led.by_type("GovernedUpdate")
            if s > after and (until is None or s < until)]


def _in_force(scans: dict[int, frozenset[int]], step: int, freeze: int | None = None) -> frozenset[int]:
    step = step if freeze is None else min(step, freeze)
    return max(((t, f) for t, f in scans.items() if t <= step), default=(0, frozenset()))[1]


def _verify(led: Ledger, out: Path, forge: Any = None, *args: str) -> tuple[int, dict[str, Any]]:
    bundle = out / "run.glb"
    export_bundle(led, bundle, with_data=True)
    roots = write_public_keys(out / "roots.pub", [(WORLD.root.public_key, "root")])
    if forge is not None:
        keys = out / "keys"
        keys.mkdir(exist_ok=True)
        for k in KEYS:
            k.save(keys / f"{k.label}.key")
        forged = Forge.from_bundle(bundle, keys_dir=keys)
        forge(forged)
        bundle = forged.write(out / "forged.glb")
    return verify_cli(bundle, roots, *args)


# -- the policy field --------------------------------------------------------------------------


@pytest.mark.parametrize("monitors, memorized", [(None, True), (SCANS, 1), (SCANS, "yes")])
def test_a_memorized_condition_is_refused_by_both_parsers_without_scans_or_as_a_non_bool(
        monitors: Any, memorized: Any) -> None:
    good = POLICY.policy
    fields = encoding.decode(encoding.encode({k: v for k, v in good.items() if k != "monitors"}))
    fields["rules"][0]["match"]["memorized"] = memorized
    if monitors is not None:
        fields["monitors"] = monitors
    with pytest.raises(PolicyError, match="memorized"):
        validate_policy(fields)
    with pytest.raises(PolicyInvalid):
        policy_from_fields(fields)


def test_both_parsers_see_the_policy_read_flags() -> None:
    assert POLICY.compiled.matches_flags and policy_from_fields(dict(POLICY.policy)).matches_flags
    assert not sign_policy(policy_fields("plain"), WORLD.root, 10).compiled.matches_flags


# -- the run -----------------------------------------------------------------------------------


def test_flagged_examples_route_by_the_memorized_rule_from_their_checkpoint_on(led: Ledger, tmp_path: Path) -> None:
    scans = _flags_by_step(led)
    assert sorted(scans) == list(range(EVERY, STEPS + 1, EVERY))
    assert scans[EVERY] == frozenset()  # no example has two losses after half an epoch
    assert scans[EPOCH + EVERY] and scans[2 * EPOCH]
    moved = 0
    for u in _updates(led):
        flags = _in_force(scans, u["step"])
        for i, rule in zip(u["batch"], u["routing"]["rules"]):
            assert (rule == 0) == (i in flags), (u["step"], i)
            moved += i in flags
    assert moved >= 5  # flagged examples trained after their flag (each is drawn once an epoch)
    code, report = _verify(led, tmp_path)  # full replay: the recorded routing is what was trained
    assert_verified(code, report)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["scans"]["status"] == "pass"
    assert "routes by memorization flags" in checks["routing"]["detail"]


def test_the_scan_report_says_what_the_rule_moved(led: Ledger) -> None:
    from gradledger.training.dynamics import scan

    scans = _flags_by_step(led)
    hits = [i for u in _updates(led) for i in u["batch"] if i in _in_force(scans, u["step"])]
    report = scan(led, params=None)
    assert report["memorized_routing"] == {"rules": ["memorized"], "examples": len(set(hits)), "trainings": len(hits)}
    assert scan(led, through=EPOCH)["memorized_routing"]["trainings"] == 0  # nothing flagged in the first epoch


def _flagged_step(led: Ledger) -> tuple[int, int, int]:
    """(seq of the first update that trains a flagged example, its batch position, the example)."""
    scans = _flags_by_step(led)
    for s in led.by_type("GovernedUpdate"):
        u = led.observation(s).body
        for j, i in enumerate(u["batch"]):
            if i in _in_force(scans, u["step"]):
                return s, j, i
    raise AssertionError("no flagged example trained")


def _scan_at(f: Forge, through: int) -> int:
    return next(s for s in f.seqs("MemorizationScan") if f.body(s)["through"] == through)


def _unflag(f: Forge, led: Ledger) -> None:
    """The consistent lie: one flagged example dropped from every scan that flags it, and every step from the
    first of them on routes it as unflagged (rules, limits, authority_writes recomputed as the verifier would)."""
    from gradledger.training.policy import batch_limits, route

    _, _, index = _flagged_step(led)
    through = min(t for t, fl in _flags_by_step(led).items() if index in fl)
    for scan in f.seqs("MemorizationScan"):
        f.set(scan, ("flagged",), [e for e in f.body(scan)["flagged"] if e[0] != index])

    def paths(i: int) -> list[str]:
        return sorted({led.registry.get(s["key_id"]).path for s in MANIFESTS[i].manifest["sources"]})

    plain = route(POLICY, MANIFESTS[index].manifest,
                  {s["source"]: led.registry.get(s["key_id"]).path for s in MANIFESTS[index].manifest["sources"]})
    for s in f.seqs("GovernedUpdate"):
        u = f.body(s)
        if index not in u["batch"] or u["step"] < through:
            continue
        rules = [plain.rule if i == index else r for i, r in zip(u["batch"], u["routing"]["rules"])]
        writes: dict[str, list[float]] = {}
        for i, r in zip(u["batch"], rules):  # binary64 sums in batch order (specs/training.md §3.1)
            for path in paths(i):
                acc = writes.setdefault(path, [0.0] * 3)
                for k, m in enumerate(POLICY.compiled.routing_of(r).profile):
                    acc[k] += m
        f.set(s, ("routing", "rules"), rules)
        f.set(s, ("routing", "limits"), list(batch_limits(POLICY, rules)))
        f.set(s, ("authority_writes",), writes)


FORGERIES = {
    # the trainer let a flagged example write into the deep bands and recorded the rule it took
    "a flagged example recorded under its unflagged rule": (
        lambda f, led: f.set(_flagged_step(led)[0], ("routing", "rules", _flagged_step(led)[1]), 1),
        ("routing",), "recorded rule"),
    # the same, with the scan changed to agree: the flags are recomputed from the recorded losses
    "a flag dropped from the scan and its routing made to agree": (_unflag, ("scans",), "MemorizationScan"),
    "the scan whose flags a step reads removed": (
        lambda f, led: f.remove(_scan_at(f, EPOCH + EVERY)), ("routing",), "no MemorizationScan"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_lie_about_the_flags_or_their_routing_is_caught(led: Ledger, tmp_path: Path, name: str) -> None:
    forge, checks, words = FORGERIES[name]
    code, report = _verify(led, tmp_path, lambda f: forge(f, led), "--replay", "none")
    assert_caught(code, report, words)
    assert report["first_failure"]["name"] in checks, report["first_failure"]


def test_a_resumed_run_routes_by_the_flags_of_its_checkpoint(tmp_path: Path, led: Ledger) -> None:
    class Crash(Exception):
        pass

    path = tmp_path / "c"
    resumed, ds = new_ledger(path, MANIFESTS, X)
    with pytest.raises(Crash), resumed:
        _train(resumed, ds, 2 * EPOCH + 3, close=False)
        raise Crash
    resumed = Ledger.open(path, writable=True)
    try:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = DataLoader(TensorDataset(X, torch.zeros(len(X))), batch_size=24)
        engine = Governance(resumed, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model),
                            run_id="mem-run", checkpoint_every=EVERY, seed=SEED, root_key=WORLD.root)
        gm, gopt, gloader = engine.resume(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, STEPS)
        # the same steps as the uninterrupted run: routing, losses and flags
        assert [u["routing"] for u in _updates(resumed)] == [u["routing"] for u in _updates(led)]
        assert _flags_by_step(resumed) == _flags_by_step(led)
    finally:
        resumed.close()


def test_an_unlearning_branch_keeps_the_flags_of_its_rewind_step_and_verifies(tmp_path: Path) -> None:
    # The retired worker's examples are trained only from step 2 * EPOCH on (explicit batches), so the
    # branch rewinds to a checkpoint whose scan already flags examples: it must keep exactly those.
    late = [i for i, m in enumerate(MANIFESTS) if FAULTY in m.source_names]
    clean = [i for i in range(len(MANIFESTS)) if i not in set(late)]
    everyone = late + clean  # step 2 * EPOCH starts with them
    batches = [[clean[(24 * s + j) % len(clean)] for j in range(24)] for s in range(2 * EPOCH)]
    batches += [[everyone[(24 * s + j) % len(everyone)] for j in range(24)] for s in range(EPOCH)]
    led, ds = new_ledger(tmp_path / "ledger", MANIFESTS, X)
    try:
        _train(led, ds, batches=batches)
        scans = _flags_by_step(led)
        retire(led, FAULTY, CROWD_KEY, "swaps 3 and 8")
        result = unlearn(led, FAULTY, WORLD.trainer)
        branch = _updates(led, result.branch_seq, result.certificate_seq)
        assert branch and result.rewind_step == 2 * EPOCH
        frozen = _in_force(scans, result.rewind_step)
        assert frozen  # flags were in force at the rewind
        for u in branch:
            assert all((rule == 0) == (i in frozen) for i, rule in zip(u["batch"], u["routing"]["rules"])), u["step"]
        assert any(_in_force(scans, u["step"]) != frozen for u in branch)  # the original's flags moved on
        code, report = _verify(led, tmp_path)
        assert_verified(code, report)
        assert any(c["name"] == "certificates" and c["status"] == "pass" for c in report["checks"])
    finally:
        led.close()


# -- the project's taxonomy (specs/project.md §2.5) ----------------------------------------------


def _taxonomy(tmp_path: Path, policy_extra: str, rule: str) -> Path:
    from test_project import EXAMPLE

    text = EXAMPLE.read_text(encoding="utf-8")
    head, rules = text.split("[[policy.rules]]", 1)
    path = tmp_path / "taxonomy.toml"
    path.write_text(f"{head}{policy_extra}\n[[policy.rules]]\n{rule}\n[[policy.rules]]{rules}", encoding="utf-8")
    return path


def test_a_taxonomy_policy_may_route_by_the_flags_it_requires(tmp_path: Path) -> None:
    from gradledger.training.errors import ProjectError
    from gradledger.training.project import Project

    rule = 'name = "memorized"\nmemorized = true\nprofile = [1, 0, 0]'
    scans = "monitors = { memorization = { fraction = 0.02, min_trace = 3 } }"
    with Project.init(tmp_path / "p", _taxonomy(tmp_path, scans, rule)) as project:
        policy = project.policy
        assert policy.compiled.matches_flags
        assert policy.monitors == {"memorization": {"fraction": 0.02, "min_trace": 3}}  # no method: LT-IQR
        assert policy.policy["rules"][1] == {"name": "memorized", "match": {"memorized": True},
                                             "profile": [1.0, 0.0, 0.0], "limits": [None, None, None]}
    with Project.open(tmp_path / "p") as again:  # the canonical taxonomy in project.json reads back
        assert again.policy.digest == policy.digest
    mean = "monitors = { memorization = { fraction = 0.02, min_trace = 3, method = \"mean-loss\" } }"
    with Project.init(tmp_path / "mean", _taxonomy(tmp_path, mean, rule)) as project:
        assert project.policy.monitors == {"memorization": {"fraction": 0.02, "min_trace": 3, "method": "mean-loss"}}
        digest = project.policy.digest
    with Project.open(tmp_path / "mean") as again:
        assert again.policy.digest == digest
    for extra, bad, words in (("", rule, "must require the scans"),
                              (scans, 'name = "m"\nmemorized = 1\nprofile = [1, 0, 0]', "true or false"),
                              ("monitors = { memorization = { fraction = 2.0, min_trace = 3 } }", rule, "fraction"),
                              ('monitors = { memorization = { fraction = 0.02, min_trace = 3, method = "median" } }',
                               rule, "method")):
        with pytest.raises(ProjectError, match=words):
            Project.init(tmp_path / f"bad-{len(words)}", _taxonomy(tmp_path, extra, bad))


# -- the flags in force: both implementations on any log (specs/dynamics.md §2.4) --------------------


class _Log:
    """A ledger's records as both readers see them: ``by_type``/``observation``/``size`` for the trainer's,
    the list itself for the verifier's."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def add(self, type_name: str, body: dict[str, Any], signer: bytes = b"trainer") -> int:
        from types import SimpleNamespace

        self.records.append(SimpleNamespace(type=type_name, seq=len(self.records), body=body, signer=signer))
        return len(self.records) - 1

    @property
    def size(self) -> int:
        return len(self.records)

    def by_type(self, type_name: str) -> list[int]:
        return [r.seq for r in self.records if r.type == type_name]

    def observation(self, seq: int) -> Any:
        return self.records[seq]


@hyp_settings(max_examples=150, deadline=None)
@given(hst.data())
def test_both_implementations_put_the_same_flags_in_force(data: Any) -> None:
    from gradledger.training.dynamics.flags import recorded_flags
    from gradledger.verify._internal import flags as VF

    count, steps = 12, data.draw(hst.integers(1, 12))
    params = {"fraction": 0.25, "min_trace": 2}
    settings = {"format": 7, "monitors": {"memorization": params}}
    every = data.draw(hst.integers(1, 4))
    flag_sets = hst.lists(hst.integers(0, count - 1), max_size=4, unique=True)
    log = _Log()
    run = log.add("RunStarted", {"settings": settings})
    updates, checkpoints = [], []

    def checkpoint(step: int) -> None:
        checkpoints.append(log.add("Checkpoint", {"step": step}))
        if step == 0:
            return
        # decoys first: another through, other parameters, another signer; then the scan §2.2 requires
        for decoy in data.draw(hst.lists(hst.sampled_from(["through", "params", "signer"]), max_size=2)):
            body = {"run": run, "through": step + 1 if decoy == "through" else step, "flagged":
                    [[i, 1.0] for i in data.draw(flag_sets)],
                    "parameters": {**params, "fraction": 0.5} if decoy == "params" else params}
            log.add("MemorizationScan", body, b"someone" if decoy == "signer" else b"trainer")
        log.add("MemorizationScan", {"run": run, "through": step, "parameters": params,
                                     "flagged": [[i, 1.0] for i in data.draw(flag_sets)]})

    for s in range(steps):
        if s % every == 0:
            checkpoint(s)
        updates.append(log.add("GovernedUpdate", {"step": s}))
    checkpoint(steps)
    schedule = VF.flag_schedule(log.records, run, updates, checkpoints, count)
    mine = recorded_flags(log, run, settings)  # type: ignore[arg-type]
    assert [mine(s) for s in range(steps + 1)] == [schedule.at(s) for s in range(steps + 1)]
    rewind = data.draw(hst.integers(0, steps))
    frozen = recorded_flags(log, run, settings, freeze_at=rewind)  # type: ignore[arg-type]
    assert all(frozen(s) == VF.frozen_at(schedule, rewind).at(s) for s in range(rewind, steps + 1))
