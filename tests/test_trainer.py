"""Governed training end to end: a small MLP on sklearn's digits, credentialed labels, a root-signed
policy that keeps low-confidence labels out of the deeper bands, every step in the ledger."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.ledger import Ledger
from gradledger.training.bands import sequential_bands
from gradledger.training.checkpoints import checkpoint_digest, read_checkpoint, tensor_digest
from gradledger.training.dataset import CommittedDataset, commit_dataset
from gradledger.training.errors import BandError, GovernanceError, ManifestError, PolicyError
from gradledger.training.manifests import SignedManifest, example_id, label_example, source_entry
from gradledger.training.policy import route, sign_policy
from gradledger.training.trainer import Governance, Trainer, epoch_order, step_seed
from helpers import CROWD_KEY, crowd_credentials, crowd_ledger, make_world, policy_fields

WORLD = make_world()
T = 10
N, BATCH, STEPS, EVERY = 240, 32, 8, 3

CROWD_CRED, WORKER_CREDS = crowd_credentials(WORLD)  # CROWD_CRED: tests/data/v1/make.py
POLICY_FIELDS = policy_fields("digits-v1")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.data[:N] / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target[:N], dtype=torch.int64)


X, Y = _digits()


def _manifests() -> list[SignedManifest]:
    out = []
    for i in range(N):
        ex, y = example_id(X[i]), int(Y[i])
        if i % 3 == 0:  # the attending radiologist: confident, expert
            srcs = [source_entry(WORLD.source_cred, y, 0.95)]
            out.append(label_example(example=ex, sources=srcs, aggregation="single", ontology="digits-v1",
                                     review="rejected" if i % 21 == 0 else "accepted", key=WORLD.source, time=T))
        else:  # two crowd workers; on every other example the second disagrees, so confidence drops to 0.9/1.3
            other = y if i % 2 else (y + 1) % 10
            srcs = [source_entry(WORKER_CREDS[0], y, 0.9), source_entry(WORKER_CREDS[1], other, 0.4)]
            out.append(label_example(example=ex, sources=srcs, aggregation="majority", ontology="digits-v1",
                                     review="accepted", key=CROWD_KEY, time=T))
    return out


MANIFESTS = _manifests()
POLICY = sign_policy(POLICY_FIELDS, WORLD.root, T)
PATHS = {"dr-a": "acme/radiology/attending", "worker-0": "acme/crowd/mturk", "worker-1": "acme/crowd/mturk"}


@pytest.fixture(autouse=True)
def _torch_flags() -> Iterator[None]:
    # A simulated crash leaves deterministic mode on; other tests must not inherit it.
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def new_ledger(path: Path) -> tuple[Ledger, CommittedDataset]:
    led = crowd_ledger(path, WORLD)
    return led, commit_dataset(led, MANIFESTS, "digits", WORLD.trainer)


def make_model() -> nn.Sequential:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def engine_for(led: Ledger, ds: CommittedDataset, model: nn.Module, **kw: Any) -> Governance:
    args: dict[str, Any] = dict(dataset=ds, policy=POLICY, layout=sequential_bands(model), run_id="digits-run",
                                checkpoint_every=EVERY, seed=7, root_key=WORLD.root)
    args.update(kw)
    return Governance(led, WORLD.trainer, **args)


def parts(inputs: torch.Tensor = X) -> tuple[nn.Sequential, torch.optim.Optimizer, DataLoader]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, opt, DataLoader(TensorDataset(inputs, Y[: len(inputs)]), batch_size=BATCH, shuffle=True)


def bodies(led: Ledger, type_name: str) -> list[dict[str, Any]]:
    return [led.observation(s).body for s in led.by_type(type_name)]


def full_run(path: Path) -> tuple[Ledger, list[float]]:
    led, ds = new_ledger(path)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    losses = Trainer(engine).fit(gm, gopt, gloader, STEPS)
    return led, losses


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    led, _ = full_run(tmp_path_factory.mktemp("a") / "ledger")
    return led


# -- the record ------------------------------------------------------------------------


def test_one_update_per_step_with_consistent_fields(run_a: Ledger) -> None:
    led = run_a
    led.verify(trusted_roots=[WORLD.root.public_key])
    ups = bodies(led, "GovernedUpdate")
    assert [u["step"] for u in ups] == list(range(STEPS))
    rules = {r for u in ups for r in u["routing"]["rules"]}
    assert rules == {-1, 0, 1, 2}  # default (low-confidence crowd), rejected, expert, confident crowd
    order = epoch_order(7, 0, N)
    for u in ups:
        s = u["step"]
        assert u["batch"] == order[s * BATCH : (s + 1) * BATCH]
        assert u["policy"] == POLICY.digest
        assert u["lr"] == 0.1 and u["optimizer"]["name"] == "sgd"
        assert u["optimizer"]["groups"][0]["momentum"] == 0.9
        assert u["seeds"] == {"run": 7, "step": step_seed(7, s)}
        routings = [route(POLICY, MANIFESTS[i].manifest, PATHS) for i in u["batch"]]
        assert u["routing"]["rules"] == [r.rule for r in routings]
        # Band limits: the smallest among examples that write into the band.
        want = []
        for k in range(3):
            lims = [r.limits[k] for r in routings if r.profile[k] > 0 and r.limits[k] is not None]
            want.append(min(lims) if lims else None)
        assert u["routing"]["limits"] == want
        # Authority writes: per path, the sum of the multipliers of the examples it labeled.
        expect: dict[str, list[float]] = {}
        for i, r in zip(u["batch"], routings):
            for path in {PATHS[n] for n in MANIFESTS[i].source_names}:
                acc = expect.setdefault(path, [0.0, 0.0, 0.0])
                for k in range(3):
                    acc[k] += r.profile[k]
        assert u["authority_writes"] == expect
        # No crowd label is confident enough for the embedding band: it writes exactly 0 there.
        assert u["authority_writes"]["acme/crowd/mturk"][2] == 0.0
        assert u["authority_writes"]["acme/crowd/mturk"][0] > 0.0
        assert set(u["sources"]) <= {"dr-a", "worker-0", "worker-1"}
        assert len(u["band_grad_norms"]) == len(u["band_update_norms"]) == 3
        assert all(n >= 0 for n in u["band_grad_norms"] + u["band_update_norms"])
        assert u["loss"] > 0
    assert led.by_example(ups[0]["batch"][0])[0] == led.by_type("GovernedUpdate")[0]


def test_run_started_records_replay_inputs(run_a: Ledger) -> None:
    led = run_a
    (run,) = bodies(led, "RunStarted")[1:]  # the first is the helpers' genesis run
    env, settings = run["environment"], run["settings"]
    assert env["torch"] == torch.__version__ and env["deterministic_algorithms"] is True
    assert env["num_threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"python", "platform", "mkl_available", "mkldnn_available", "mkldnn_version"} <= set(env)
    assert settings["policy"] == POLICY.digest and settings["dataset"]["count"] == N
    assert settings["loss"] == {"name": "cross_entropy", "settings": {"reduction": "mean", "label_smoothing": 0.0}}
    assert settings["optimizer"]["groups"][0]["weight_decay"] == 1e-4
    assert settings["bands"] == sequential_bands(make_model()).to_obj()
    assert (settings["seed"], settings["batch_size"], settings["checkpoint_every"]) == (7, BATCH, EVERY)
    program = torch.export.load(io.BytesIO(led.artifact(run["artifacts"]["program"])))
    out = program.module()(X[:5], torch.ones(5, 3))
    assert out.shape == (5, 10)


def test_checkpoints_every_k_with_tree_heads(run_a: Ledger) -> None:
    led = run_a
    seqs = led.by_type("Checkpoint")
    assert [led.observation(s).body["step"] for s in seqs] == [0, 3, 6, 8]
    # The run is committed with its first checkpoint after an update: none follows the step-0 one.
    assert led.observation(seqs[0] + 1).type == "GovernedUpdate"
    for s in seqs[1:]:
        assert led.observation(s + 1).type == "TreeHead"
        body = led.observation(s).body
        tensors, _ = read_checkpoint(led.artifact(body["artifact"]), body)
        assert body["digest"] == checkpoint_digest({n: tensor_digest(t) for n, t in tensors.items()})
        # Format 2: the hyper-parameters every step records (lr, momentum) are not checkpointed; fixed ones are.
        assert "model.0.weight" in tensors and "optim.group.0.nesterov" in tensors
        assert "optim.group.0.lr" not in tensors and "optim.group.0.momentum" not in tensors
    last = led.observation(seqs[-1]).body
    assert "optim.state.0.momentum_buffer" in last["tensors"]
    assert led.observation(led.size - 1).type == "TreeHead"


# -- determinism and resume -------------------------------------------------------------


def test_same_run_twice_same_digests(run_a: Ledger, tmp_path: Path) -> None:
    led_b, _ = full_run(tmp_path / "b")
    try:
        assert bodies(led_b, "Checkpoint") == bodies(run_a, "Checkpoint")
        assert bodies(led_b, "GovernedUpdate") == bodies(run_a, "GovernedUpdate")
    finally:
        led_b.close()


class Crash(Exception):
    pass


def test_resume_after_crash_continues_the_chain(run_a: Ledger, tmp_path: Path) -> None:
    path = tmp_path / "c"
    led, ds = new_ledger(path)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model)
    with pytest.raises(Crash), led:  # leaving the block by an exception discards pending records
        gm, gopt, gloader = engine.make_governed(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, 5, close=False)
        raise Crash
    led = Ledger.open(path, writable=True)
    try:
        assert led.observation(led.size - 1).type == "TreeHead"
        assert [b["step"] for b in bodies(led, "GovernedUpdate")] == [0, 1, 2]
        model, opt, loader = parts()
        with torch.no_grad():
            model[0].weight.add_(1.0)  # the resumed state must come from the checkpoint, not from here
        engine = engine_for(led, ds, model)
        gm, gopt, gloader = engine.resume(model, opt, loader)
        assert engine.step == 3
        Trainer(engine).fit(gm, gopt, gloader, STEPS)
        assert bodies(led, "GovernedUpdate") == bodies(run_a, "GovernedUpdate")
        assert bodies(led, "Checkpoint") == bodies(run_a, "Checkpoint")
        led.verify(trusted_roots=[WORLD.root.public_key])
    finally:
        led.close()


# -- refusals before any step -------------------------------------------------------------


def refused(tmp_path: Path, error: type[Exception], match: str, *, inputs: torch.Tensor = X,
            model: nn.Module | None = None, **kw: Any) -> None:
    led, ds = new_ledger(tmp_path / "ledger")
    try:
        m, opt, loader = parts(inputs)
        model = model or m
        if model is not m:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        kw.setdefault("layout", sequential_bands(m))
        size = led.size
        with pytest.raises(error, match=match):
            engine_for(led, ds, model, **kw).make_governed(model, opt, loader)
        assert led.size == size
        assert led.by_type("GovernedUpdate") == []
    finally:
        led.close()


def test_uncovered_parameters_refused(tmp_path: Path) -> None:
    bigger = make_model()
    bigger.append(nn.Linear(10, 10))
    refused(tmp_path, BandError, "in no band", model=bigger)


def test_policy_not_signed_by_root_refused(tmp_path: Path) -> None:
    refused(tmp_path, PolicyError, "not signed by the governance root",
            policy=sign_policy(POLICY_FIELDS, WORLD.authority, T))


def test_unadopted_policy_without_root_key_refused(tmp_path: Path) -> None:
    refused(tmp_path, PolicyError, "not the ledger's adopted policy", root_key=None)


def test_batch_index_outside_dataset_refused(tmp_path: Path) -> None:
    refused(tmp_path, ManifestError, "outside committed dataset", batches=[[0, 1, 2], [3, N]])


def test_dataset_length_mismatch_refused(tmp_path: Path) -> None:
    refused(tmp_path, ManifestError, "239 examples", inputs=X[: N - 1])


def test_example_without_manifest_refused(tmp_path: Path) -> None:
    refused(tmp_path, ManifestError, "not the example its manifest names", inputs=X.flip(0))


def test_forward_without_a_drawn_batch_refused(tmp_path: Path) -> None:
    led, ds = new_ledger(tmp_path / "ledger")
    try:
        model, opt, loader = parts()
        engine = engine_for(led, ds, model)
        gm, gopt, gloader = engine.make_governed(model, opt, loader)
        with pytest.raises(GovernanceError, match="drawn from the governed loader"):
            gm(X[:4], torch.ones(4, 3))
        batch = next(iter(gloader))
        with pytest.raises(GovernanceError, match="not those of the batch"):
            gm(batch.inputs, torch.ones(len(batch), 3))
        engine.close()
    finally:
        led.close()


def test_zero_multiplier_writes_nothing_into_deeper_bands(tmp_path: Path) -> None:
    led, ds = new_ledger(tmp_path / "ledger")
    try:
        crowd = [i for i in range(N) if i % 3][:16]  # no crowd routing reaches the embedding band
        model, _, loader = parts()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        engine = engine_for(led, ds, model, batches=[crowd], checkpoint_every=100)
        gm, gopt, gloader = engine.make_governed(model, opt, loader)
        Trainer(engine).fit(gm, gopt, gloader, 2)
        for u in bodies(led, "GovernedUpdate"):
            assert u["batch"] == crowd and u["optimizer"]["name"] == "adam"
            assert u["band_grad_norms"][2] == 0.0 and u["band_update_norms"][2] == 0.0
            assert u["band_grad_norms"][0] > 0.0 and u["band_update_norms"][1] > 0.0
            assert u["authority_writes"] == {"acme/crowd/mturk": [16.0, u["authority_writes"]["acme/crowd/mturk"][1], 0.0]}
        last = led.observation(led.by_type("Checkpoint")[-1]).body
        assert last["step"] == 2 and "optim.state.0.step" in last["tensors"]
        led.verify(trusted_roots=[WORLD.root.public_key])
    finally:
        led.close()
