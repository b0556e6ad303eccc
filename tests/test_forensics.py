"""Forensics (issue 12, specs/forensics.md): the replay method's influence equals a brute-force sum over
per-step, per-example gradients; the checkpoint method with a checkpoint at every step equals it; a band
an example may not reach carries exactly none of its influence; a retired source has none in its
unlearning branch; source shares follow the aggregation; bad queries exit 2 with one line."""

from __future__ import annotations

import copy
import math
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.ledger import Ledger
from gradledger.training.bands import sequential_bands
from gradledger.training.dataset import commit_dataset
from gradledger.training.forensics import UNATTRIBUTED, example_shares, lineage, parse_query, trace
from gradledger.training.forensics.methods import checkpoints_influence, replay_influence, replayer
from gradledger.training.policy import sign_policy
from gradledger.training.trainer import Governance
from gradledger.training.updates import route_examples
from helpers import policy_fields
from test_trainer import MANIFESTS, POLICY, WORLD, X, Y, new_ledger

STEPS, BATCH = 6, 16
QUERY = json.dumps({"description": "3s read as 8", "inputs": {"label": 3, "limit": 12}, "target": 8})


def _model() -> nn.Sequential:
    torch.manual_seed(99)  # no dropout: the brute force below recomputes each step's gradients itself
    return nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.fixture(autouse=True)
def _torch_flags() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _run(path: Path, *, every: int = 3, policy: Any = POLICY) -> tuple[Ledger, list[dict[str, torch.Tensor]], nn.Module]:
    """A governed SGD run (no momentum) of the user's loop; the weights before each step, kept by the loop."""
    led, _ = new_ledger(path)
    ds = commit_dataset(led, MANIFESTS, "digits-inputs", WORLD.trainer, inputs=X)
    model = _model()
    first = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    loader = DataLoader(TensorDataset(X, Y), batch_size=BATCH, shuffle=True)
    run = Governance(led, WORLD.trainer, dataset=ds, policy=policy, layout=sequential_bands(model), run_id="trace-me",
                     checkpoint_every=every, seed=5, root_key=WORLD.root, order="loader")
    gm, gopt, gl = run.make_governed(model, opt, loader)
    weights = []
    while run.step < STEPS:
        for x, y in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(x), y).backward()
            weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            gopt.step()
            if run.step >= STEPS:
                break
    run.close()
    return led, weights, first


def _brute_force(led: Ledger, weights: list[dict[str, torch.Tensor]], net: nn.Module, query_idx: list[int],
                 target: int) -> torch.Tensor:
    """Per dataset index: the mean over query examples of sum_t sum_k lr_t c_tk p_ik / B <g_ik, G_jk>, each
    gradient by its own backward through the plain model (routing.md §3: the gate scales example i's
    gradient in band k by p[i, k])."""
    settings_ = [led.observation(s).body for s in led.by_type("RunStarted")][-1]["settings"]
    fields = [m.manifest for m in MANIFESTS]
    routed = route_examples(fields, led.registry, POLICY.compiled)
    named = dict(net.named_parameters())
    bands = [[named[n] for n in names] for names in settings_["band_params"]]
    updates = [led.observation(s).body for s in led.by_type("GovernedUpdate")]
    scores = torch.zeros(len(fields), dtype=torch.float64)

    def grads(x: torch.Tensor, y: int) -> list[list[torch.Tensor]]:
        loss = F.cross_entropy(net(x[None]), torch.tensor([y]))
        flat = torch.autograd.grad(loss, [p for ps in bands for p in ps])
        out, pos = [], 0
        for ps in bands:
            out.append([g.to(torch.float64) for g in flat[pos:pos + len(ps)]])
            pos += len(ps)
        return out

    for u, w in zip(updates, weights):
        net.load_state_dict(w)
        queries = [grads(X[j], target) for j in query_idx]
        b = len(u["batch"])
        for i in u["batch"]:
            g = grads(X[i], fields[i]["label"])
            for k, (norm, limit) in enumerate(zip(u["band_grad_norms"], u["routing"]["limits"])):
                coef = 1.0 if limit is None else min(1.0, limit / (norm + 1e-6))
                a = u["lr"] * coef * routed.profiles[i][k] / b
                dots = [sum(float((gi * Gi).sum()) for gi, Gi in zip(g[k], G[k])) for G in queries]
                scores[i] += a * sum(dots) / len(dots)
    return scores


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ledger, list[dict[str, torch.Tensor]], nn.Module]:
    before = torch.are_deterministic_algorithms_enabled()
    out = _run(tmp_path_factory.mktemp("run") / "ledger")
    torch.use_deterministic_algorithms(before)
    return out


def _influence(led: Ledger, method: Any, query: str = QUERY) -> Any:
    lin = lineage(led, None)
    rep = replayer(led, lin)
    q = parse_query(query, labels=rep.labels, inputs=rep.inputs, classes=10)
    return method(led, lin, rep, q, self_influence=True), q


def test_replay_scores_equal_a_brute_force_sum_over_steps(traced: Any) -> None:
    led, weights, first = traced
    found, q = _influence(led, replay_influence)
    assert found.steps == STEPS and found.exact_steps == STEPS  # every step replayed bit for bit
    want = _brute_force(led, weights, first, q.indices, 8)
    got = found.acc.examples.mean(1)
    assert torch.count_nonzero(want) > 0
    # Float tolerance: the inner products run in float32 (a first-order score), the brute force in float64.
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9 * float(want.abs().max())), float((got - want).abs().max())
    # The report ranks exactly these scores.
    report = trace(led, QUERY, top=5)
    assert [e["index"] for e in report["examples"]] == torch.argsort(want, descending=True)[:5].tolist()
    assert report["predicted_change"] == pytest.approx(-float(want.sum()), rel=1e-6)


def test_source_scores_are_share_weighted_sums_of_example_scores(traced: Any) -> None:
    led, _, _ = traced
    found, _ = _influence(led, replay_influence)
    e = found.acc.examples.mean(1)
    report = trace(led, QUERY, top=50)
    for s in report["sources"]:
        want = sum(float(e[z]) * example_shares(m.manifest).get(s["source"], 0.0) for z, m in enumerate(MANIFESTS))
        assert s["score"] == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert sum(s["share"] for s in report["sources"]) == pytest.approx(1.0)
    assert sum(b["score"] for b in report["bands"]) == pytest.approx(float(e.sum()), rel=1e-9)
    lo_hi = [s["ci95"] for s in report["sources"]]
    assert all(lo <= s["score"] + 1e-12 and s["score"] <= hi + 1e-12 or s["stderr"] > 0
               for (lo, hi), s in zip(lo_hi, report["sources"]))


def test_checkpoint_at_every_step_equals_replay(tmp_path: Path) -> None:
    led, _, _ = _run(tmp_path / "ledger", every=1)
    exact, _ = _influence(led, replay_influence)
    cp, _ = _influence(led, checkpoints_influence)
    assert cp.approximate and cp.steps == STEPS
    assert torch.allclose(cp.acc.examples, exact.acc.examples, rtol=1e-5, atol=1e-12)
    assert torch.allclose(cp.acc.self_influence, exact.acc.self_influence, rtol=1e-5, atol=1e-12)


def test_a_band_no_example_may_reach_carries_exactly_no_influence(tmp_path: Path) -> None:
    fields = policy_fields("head-only")
    fields["rules"] = [r for r in fields["rules"] if r["name"] == "rejected"]  # everything else: the default, head only
    led, _, _ = _run(tmp_path / "ledger", policy=sign_policy(fields, WORLD.root, 10))
    report = trace(led, QUERY)
    by_band = {b["band"]: b["score"] for b in report["bands"]}
    assert by_band["head"] != 0.0 and by_band["mid"] == 0.0 and by_band["embedding"] == 0.0
    # Per example too: a rejected example (profile 0 everywhere) has exactly zero influence.
    found, _ = _influence(led, replay_influence)
    rejected = [i for i, m in enumerate(MANIFESTS) if m.manifest["review"] == "rejected"]
    assert rejected and all(float(found.acc.examples[i].abs().sum()) == 0.0 for i in rejected)


def test_a_retired_source_has_no_influence_in_its_branch(tmp_path: Path) -> None:
    import test_unlearning as U
    from gradledger.training.retirement import retire
    from gradledger.training.unlearning import unlearn

    led, ds = U.new_ledger(tmp_path / "ledger", U.MANIFESTS, U.X)
    U.governed_run(led, ds, U.X)
    query = json.dumps({"inputs": {"label": 3, "limit": 10}, "target": 8})
    before = {s["source"]: s for s in trace(led, query, top=50)["sources"]}
    assert before[U.FAULTY]["score"] != 0.0  # it taught the original run
    retire(led, U.FAULTY, U.CROWD_KEY, "swaps 3 and 8")
    result = unlearn(led, U.FAULTY, U.WORLD.trainer)
    after = trace(led, query, run_id=result.branch_run_id, top=50)
    assert after["branch_without"] == U.FAULTY and after["run"] == result.branch_run_id
    faulty = [s for s in after["sources"] if s["source"] == U.FAULTY]
    assert faulty == [] or faulty[0]["score"] == 0.0
    assert {s["source"] for s in after["sources"]} >= {"worker-0", "dr-a"}
    led.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0])), min_size=1, max_size=6),
       st.integers(0, 3), st.randoms())
def test_shares_follow_the_votes_for_the_label(votes: list[tuple[int, float]], label: int, rnd: Any) -> None:
    sources = [{"source": f"s{i}", "vote": v, "confidence": c} for i, (v, c) in enumerate(votes)]
    shares = example_shares({"label": label, "sources": sources})
    shuffled = list(sources)
    rnd.shuffle(shuffled)
    assert example_shares({"label": label, "sources": shuffled}) == shares  # order does not matter
    assert sum(shares.values()) == pytest.approx(1.0)
    voters = {s["source"] for s in sources if s["vote"] == label}
    if not voters:
        assert shares == {UNATTRIBUTED: 1.0}
        return
    assert set(shares) == voters
    total = sum(s["confidence"] for s in sources if s["vote"] == label)
    for s in sources:
        if s["vote"] == label:
            want = s["confidence"] / total if total > 0 else 1 / len(voters)
            assert shares[s["source"]] == pytest.approx(want)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradledger.training.cli", "trace", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def ledger_dir(traced: Any) -> str:
    return str(traced[0].path)


def test_the_cli_answers_in_json_and_html(ledger_dir: str, tmp_path: Path) -> None:
    page = tmp_path / "trace.html"
    proc = _cli(ledger_dir, "--query", QUERY, "--json", "--top", "3", "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["run"] == "trace-me" and len(report["sources"]) == 3 and report["query"]["examples"] == 12
    assert "Who taught the model this" in page.read_text()
    proc = _cli(ledger_dir, "--method", "loss-trace", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["examples"]
    proc = _cli(ledger_dir, "--query", QUERY, "--self-influence", "--top", "4")
    assert proc.returncode == 0, proc.stderr
    assert "highest self-influence" in proc.stdout


@pytest.mark.parametrize("query, words", [
    ('{"inputs": {"indices": [100000]}, "target": 8}', "not an index"),
    ('{"inputs": {"label": 3}, "target": 10}', "not a class index"),
    ('{"inputs": {"label": 3}, "target": [8, 8]}', "classes for"),
    ('{"inputs": {"label": 3}, "target": 8, "extra": 1}', "not one of"),
    ('{"inputs": {"label": 3}', "not valid JSON"),
    ("/nonexistent/q.json", "neither"),
    ('{"inputs": {"file": "FILE"}, "target": 8}', "per row"),
])
def test_a_bad_query_is_unusable_input(traced: Any, tmp_path: Path, query: str, words: str) -> None:
    from safetensors.torch import save_file

    from gradledger.ledger.errors import exit_status
    from gradledger.training.forensics import QueryError

    wrong = tmp_path / "q.safetensors"
    save_file({"x": torch.zeros(3, 8)}, str(wrong))  # rows of 8 values: the dataset's have 64
    with pytest.raises(QueryError, match=words) as caught:
        trace(traced[0], query.replace("FILE", str(wrong)))
    code, line = exit_status(caught.value, "gradledger")
    assert code == 2 and "\n" not in line


def test_a_bad_query_exits_2_with_one_line(ledger_dir: str) -> None:
    proc = _cli(ledger_dir, "--query", '{"inputs": {"indices": [100000]}, "target": 8}')
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an index" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_an_unknown_run_exits_2(ledger_dir: str) -> None:
    proc = _cli(ledger_dir, "--query", QUERY, "--run", "no-such-run")
    assert proc.returncode == 2 and "no governed run 'no-such-run'" in proc.stderr


def test_a_query_file_of_the_right_shape_is_traced(ledger_dir: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "q.safetensors"
    save_file({"x": X[:5].contiguous()}, str(good))
    proc = _cli(ledger_dir, "--query", json.dumps({"inputs": {"file": str(good)}, "target": [1, 2, 3, 4, 5]}), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["query"]["examples"] == 5


def test_replay_that_diverges_from_the_record_exits_1_naming_the_step(traced: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from gradledger.ledger.errors import exit_status
    from gradledger.training.forensics import TraceDiverged
    from gradledger.training.replayer import Replayer

    real = Replayer.step

    def drifting(self: Any, original: dict[str, Any], batch: list[int], inspect: Any = None) -> dict[str, Any]:
        body = real(self, original, batch, inspect)
        if original["step"] == 2:
            body["loss"] *= 1.5
        return body

    monkeypatch.setattr(Replayer, "step", drifting)
    with pytest.raises(TraceDiverged, match="at step 2") as caught:
        trace(traced[0], QUERY)
    assert exit_status(caught.value, "gradledger")[0] == 1  # the CLI's exit: a failed check, not bad input


def test_per_example_gradients_agree_between_vmap_and_the_batched_backward(traced: Any) -> None:
    """The two ways per-example gradients are taken (vmap(grad) for a program without random ops, the
    batched backward of the step's forward otherwise) give the same gradients."""
    from gradledger.training.forensics.influence import ExampleGrads
    from gradledger.training.forensics.methods import _setup
    from gradledger.training.forensics.query import label_rows, query_loss

    led = traced[0]
    rep = replayer(led, lineage(led, None))
    params, grads = _setup(rep)
    index = torch.arange(0, 40, 3)
    inputs, profiles, labels = rep.rows(index), rep.profiles[index], label_rows(rep.labels[index])
    functional = grads(inputs, profiles, labels)
    assert grads.functional  # this program draws no random numbers
    batched = ExampleGrads(rep.module, params, query_loss(rep.example_loss_fn))
    batched.functional = False
    for a, b in zip(functional, batched(inputs, profiles, labels)):
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-7)
    # A band an example may not reach: exactly zero, both ways.
    zero = [i for i, r in enumerate(profiles.tolist()) if r[2] == 0.0]
    assert zero and all(float(g[zero].abs().sum()) == 0.0 for g in functional[2])


def test_a_contrast_query_is_the_difference_of_its_two_queries(traced: Any) -> None:
    """Influence is linear in the query's gradient: "read as 8 rather than 3" scores every example as
    "read as 8" minus "read as 3"."""
    led = traced[0]

    def scores(**fields: Any) -> torch.Tensor:
        found, _ = _influence(led, replay_influence, json.dumps({"inputs": {"label": 3, "limit": 12}, **fields}))
        return found.acc.examples.mean(1)

    both = scores(target=8, against=3)
    assert torch.allclose(both, scores(target=8) - scores(target=3), rtol=1e-4, atol=1e-9 * float(both.abs().max()))
    proc = _cli(str(led.path), "--query", json.dumps({"inputs": {"label": 3}, "target": 3, "against": 3}))
    assert proc.returncode == 2 and "two classes" in proc.stderr


def test_validate_replays_without_the_top_sources(traced: Any) -> None:
    """--validate K: the run replayed without the top source (nothing recorded) gives another query loss;
    with every source removed, nothing is trained and the query loss is the step-0 model's."""
    led = traced[0]
    size = led.size
    report = trace(led, QUERY, top=3, validate_top=1)
    v = report["validation"]
    assert v["sources"] == [report["sources"][0]["source"]] and v["removed"] + v["relabeled"] > 0
    assert v["predicted_change"] == report["sources"][0]["score"]
    assert math.isfinite(v["actual_change"]) and v["actual_change"] != 0.0
    assert led.size == size  # nothing recorded
    everyone = trace(led, QUERY, top=10, validate_top=3)["validation"]
    lin = lineage(led, None)
    rep = replayer(led, lin)
    rep.restore(led, lin.run.checkpoints[0][1])
    q = parse_query(QUERY, labels=rep.labels, inputs=rep.inputs, classes=10)
    with torch.no_grad():
        initial = float(F.cross_entropy(rep.module(q.inputs, torch.ones((len(q), 3))), q.targets))
    assert everyone["removed"] == len(MANIFESTS) and everyone["query_loss_without"] == pytest.approx(initial, rel=1e-6)
