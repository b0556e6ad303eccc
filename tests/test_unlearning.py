"""Retirement of a labeling source and exact unlearning (specs/unlearning.md).

A small governed digits run in which a faulty crowd worker (``worker-2``) first contributes at
step 4; retiring it and unlearning must give, bit for bit, the run that never had it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger import credentials as C
from gradledger.ledger import encoding
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.training.bands import sequential_bands
from gradledger.training.cli import main
from gradledger.training.dataset import CommittedDataset, commit_dataset
from gradledger.training.manifests import SignedManifest, example_id, label_example, relabel_without, sign_manifest, source_entry
from gradledger.training.policy import route, sign_policy
from gradledger.training.retirement import RetirementError, dependents, retire
from gradledger.training.trainer import Governance, Trainer, epoch_order
from gradledger.training.unlearning import UnlearningError, UnlearningResult, unlearn
from helpers import CROWD_KEY, WORKER_KEYS, crowd_credentials, crowd_ledger, make_world, policy_fields

WORLD = make_world()
T = 10
N, BATCH, STEPS, EVERY, SEED = 240, 24, 10, 3, 7
FAULTY, BATCH_OWNER = "worker-2", "worker-3"
FIRST_STEP, OWNED_STEP = 4, 8  # worker-2 first labels at step 4; worker-3 alone labels all of step 8

_, WORKER_CREDS = crowd_credentials(WORLD)
EXTRA_KEYS = [SigningKey.from_seed(bytes([90 + i]) * 32, f"worker-{2 + i}") for i in range(2)]
EXTRA_CREDS = [
    C.issue(CROWD_KEY, subject=f"worker-{2 + i}", path="acme/crowd/mturk", role="source", public_key=k.public_key)
    for i, k in enumerate(EXTRA_KEYS)
]
CREDS = {c.subject: c for c in WORKER_CREDS + EXTRA_CREDS}
POLICY = sign_policy(policy_fields("digits-v1"), WORLD.root, T)

_d = load_digits()
X = torch.tensor(_d.data[:N] / 16.0, dtype=torch.float32)
Y = torch.tensor(_d.target[:N], dtype=torch.int64)
ORDER = epoch_order(SEED, 0, N)


def _swap(y: int) -> int:
    return {3: 8, 8: 3}.get(y, (y + 1) % 10)  # the faulty worker's mistake


def _manifest(i: int) -> SignedManifest:
    ex, y = example_id(X[i]), int(Y[i])
    step, pos = divmod(ORDER.index(i), BATCH)
    crowd = dict(aggregation="majority", ontology="digits-v1", review="accepted", key=CROWD_KEY, time=T)
    if step == OWNED_STEP:
        return label_example(example=ex, sources=[source_entry(CREDS[BATCH_OWNER], y, 0.9)],
                             **{**crowd, "aggregation": "single"})
    if step >= FIRST_STEP and pos < 3:  # worker-2 alone, wrong: removed by retirement
        return label_example(example=ex, sources=[source_entry(CREDS[FAULTY], _swap(y), 0.95)],
                             **{**crowd, "aggregation": "single"})
    if step >= FIRST_STEP and pos < 7:  # worker-2 outvotes worker-0: relabeled by retirement
        srcs = [source_entry(CREDS["worker-0"], y, 0.8), source_entry(CREDS[FAULTY], _swap(y), 0.95)]
        return label_example(example=ex, sources=srcs, **crowd)
    if i % 3 == 0:
        return label_example(example=ex, sources=[source_entry(WORLD.source_cred, y, 0.95)], aggregation="single",
                             ontology="digits-v1", review="accepted", key=WORLD.source, time=T)
    other = y if i % 2 else (y + 1) % 10
    srcs = [source_entry(CREDS["worker-0"], y, 0.9), source_entry(CREDS["worker-1"], other, 0.4)]
    return label_example(example=ex, sources=srcs, **crowd)


MANIFESTS = [_manifest(i) for i in range(N)]


@pytest.fixture(autouse=True)
def _torch_flags() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def new_ledger(path: Path, manifests: list[SignedManifest], inputs: torch.Tensor) -> tuple[Ledger, CommittedDataset]:
    led = crowd_ledger(path, WORLD, EXTRA_CREDS)
    return led, commit_dataset(led, manifests, "digits", WORLD.trainer, inputs=inputs)


def make_model() -> nn.Sequential:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def governed_run(led: Ledger, ds: CommittedDataset, inputs: torch.Tensor, **kw: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(TensorDataset(inputs, torch.zeros(len(inputs))), batch_size=BATCH)
    engine = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model),
                        run_id="digits-run", checkpoint_every=EVERY, seed=SEED, root_key=WORLD.root, **kw)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, STEPS)


def bodies(led: Ledger, type_name: str, after: int = 0, until: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    return [(s, led.observation(s).body) for s in led.by_type(type_name) if s >= after and (until is None or s <= until)]


def branch(led: Ledger, type_name: str, result: UnlearningResult) -> list[tuple[int, dict[str, Any]]]:
    """The records of ``type_name`` on the branch that ``result`` recorded."""
    return bodies(led, type_name, result.branch_seq, result.certificate_seq)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("orig") / "ledger"
    led, ds = new_ledger(path, MANIFESTS, X)
    governed_run(led, ds, X)
    led.close()
    return path


def copy_of(original: Path, tmp: Path) -> Path:
    dst = tmp / "ledger"
    shutil.copytree(original, dst)
    return dst


@pytest.fixture(scope="module")
def unlearned(original: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ledger, UnlearningResult, int]]:
    led = Ledger.open(copy_of(original, tmp_path_factory.mktemp("unl")), writable=True)
    before = led.size
    retire(led, FAULTY, CROWD_KEY, "swaps 3 and 8")
    steps: list[int] = []
    result = unlearn(led, FAULTY, WORLD.trainer, progress=steps.append)
    assert steps == list(range(result.rewind_step, STEPS))
    yield led, result, before
    led.close()


@pytest.fixture(scope="module")
def from_scratch(unlearned: tuple[Ledger, UnlearningResult, int], tmp_path_factory: pytest.TempPathFactory) -> tuple[Ledger, dict[int, int]]:
    """The counterfactual: re-signed relabeled manifests, removed examples left out, the same order."""
    deps = dependents(MANIFESTS, FAULTY)
    removed = set(deps.removed)
    kept = [i for i in range(N) if i not in removed]
    remap = {old: new for new, old in enumerate(kept)}
    manifests = [sign_manifest(**deps.relabeled[i], key=CROWD_KEY, time=T) if i in deps.relabeled else MANIFESTS[i]
                 for i in kept]
    led = unlearned[0]
    original_batches = [b["batch"] for _, b in bodies(led, "GovernedUpdate")[:STEPS]]
    batches = [[remap[i] for i in b if i not in removed] for b in original_batches]
    scratch, ds = new_ledger(tmp_path_factory.mktemp("scratch") / "ledger", manifests, X[kept])
    governed_run(scratch, ds, X[kept], batches=batches)
    return scratch, remap


# -- (1) the key property ----------------------------------------------------------------------


def test_branch_equals_a_governed_run_from_scratch_bit_for_bit(unlearned: Any, from_scratch: Any) -> None:
    led, result, before = unlearned
    scratch, remap = from_scratch
    final = bodies(scratch, "Checkpoint")[-1][1]
    assert final["step"] == STEPS
    assert result.new_head == final["digest"]
    assert result.new_head != result.original_head  # the source did change the model
    # Every branch checkpoint equals the scratch run's at the same step, tensor by tensor.
    scratch_ckpts = {b["step"]: b for _, b in bodies(scratch, "Checkpoint")}
    branch_ckpts = branch(led, "Checkpoint", result)
    assert [b["step"] for _, b in branch_ckpts] == [3, 6, 9, 10]
    for _, b in branch_ckpts:
        assert b["tensors"] == scratch_ckpts[b["step"]]["tensors"] and b["digest"] == scratch_ckpts[b["step"]]["digest"]
    # And every update record, with the scratch run's indices mapped back to the original dataset's.
    back = {new: old for old, new in remap.items()}
    scratch_ups = {b["step"]: b for _, b in bodies(scratch, "GovernedUpdate")}
    for _, b in branch(led, "GovernedUpdate", result):
        want = dict(scratch_ups[b["step"]])
        want["batch"] = [back[i] for i in want["batch"]]
        assert b == want


# -- (2) retirement --------------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Ledger]:
    led, _ = new_ledger(tmp_path / "ledger", MANIFESTS[:12], X[:12])
    yield led
    led.close()


@pytest.mark.parametrize("who", ["source", "other_authority", "trainer"])
def test_retire_refused_for_a_key_neither_root_nor_issuer(fresh: Ledger, who: str) -> None:
    key = {"source": WORKER_KEYS[0], "other_authority": WORLD.authority, "trainer": WORLD.trainer}[who]
    size = fresh.size
    with pytest.raises(RetirementError, match="may not retire"):
        retire(fresh, FAULTY, key, "bad labels")
    assert fresh.size == size and fresh.by_type("SourceRetired") == []


def test_retire_refused_for_unknown_source_and_twice(fresh: Ledger) -> None:
    with pytest.raises(RetirementError, match="no source credential named 'nobody'"):
        retire(fresh, "nobody", CROWD_KEY, "r")
    with pytest.raises(RetirementError, match="no source credential"):
        retire(fresh, "crowd", WORLD.root, "r")  # an authority is not a source
    done = retire(fresh, FAULTY, WORLD.root, "the root may retire anything below it")
    body = fresh.observation(done.seq).body
    assert body == {"source": FAULTY, "key_id": CREDS[FAULTY].key_id, "reason": "the root may retire anything below it"}
    assert done.seq in fresh.by_source(FAULTY)
    size = fresh.size
    with pytest.raises(RetirementError, match="already retired"):
        retire(fresh, FAULTY, CROWD_KEY, "again")
    assert fresh.size == size
    fresh.verify(trusted_roots=[WORLD.root.public_key])


def test_dependency_rule() -> None:
    deps = dependents(MANIFESTS, FAULTY)
    for i, m in enumerate(MANIFESTS):
        listed = FAULTY in m.source_names
        assert (i in deps.affected) == listed
        if i in deps.removed:
            assert m.source_names == [FAULTY]
        elif listed:
            fields = deps.relabeled[i]
            assert fields == relabel_without(m, FAULTY)
            assert fields["label"] == int(Y[i]) != m.label  # worker-0's vote wins once worker-2 is gone
            assert [s["source"] for s in fields["sources"]] == ["worker-0"]
    assert len(deps.removed) == 3 * 5 and len(deps.relabeled) == 4 * 5  # steps 4-7 and 9


# -- (3) refusals of unlearning ------------------------------------------------------------------


def test_unlearn_refused_without_retirement(unlearned: Any) -> None:
    led = unlearned[0]
    size = led.size
    with pytest.raises(UnlearningError, match="no SourceRetired"):
        unlearn(led, "worker-1", WORLD.trainer)
    with pytest.raises(UnlearningError, match="already unlearned"):
        unlearn(led, FAULTY, WORLD.trainer)
    assert led.size == size


# -- (4) what the branch is ----------------------------------------------------------------------


def test_rewind_precedes_the_source_and_branch_batches_drop_removed(unlearned: Any) -> None:
    led, result, before = unlearned
    deps = dependents(MANIFESTS, FAULTY)
    original = [b for s, b in bodies(led, "GovernedUpdate") if s < before]
    assert (result.first_step, result.rewind_step) == (FIRST_STEP, 3)
    for u in original:
        if u["step"] < result.rewind_step:
            assert FAULTY not in u["sources"] and not set(u["batch"]) & deps.affected
    assert FAULTY in original[FIRST_STEP]["sources"]
    replayed = [b for _, b in branch(led, "GovernedUpdate", result)]
    assert [u["step"] for u in replayed] == list(range(result.rewind_step, STEPS))
    for u in replayed:
        orig = original[u["step"]]
        assert u["batch"] == [i for i in orig["batch"] if i not in set(deps.removed)]
        assert FAULTY not in u["sources"]
        assert u["seeds"] == orig["seeds"] and u["optimizer"] == orig["optimizer"]
        fields = [deps.relabeled.get(i, MANIFESTS[i].manifest) for i in u["batch"]]
        paths = {n: CREDS[n].path if n in CREDS else WORLD.source_cred.path for f in fields for n in
                 [s["source"] for s in f["sources"]]}
        assert u["routing"]["rules"] == [route(POLICY, f, paths).rule for f in fields]
    assert result.skipped_steps == [] and result.removed == deps.removed


def test_a_batch_that_loses_every_example_is_skipped(unlearned: Any) -> None:
    led, _, _ = unlearned
    retire(led, BATCH_OWNER, CROWD_KEY, "owns one whole batch")
    before = led.size
    result = unlearn(led, BATCH_OWNER, WORLD.trainer, run_id="digits-run")
    assert result.skipped_steps == [OWNED_STEP] and result.rewind_step == 6
    assert result.branch_seq >= before
    assert [b["step"] for _, b in branch(led, "GovernedUpdate", result)] == [6, 7, 9]
    assert [b["step"] for _, b in branch(led, "Checkpoint", result)] == [6, 9, 10]
    led.verify(trusted_roots=[WORLD.root.public_key])


# -- (5) the certificate -----------------------------------------------------------------------------


def test_certificate_fields_and_artifacts(unlearned: Any) -> None:
    led, result, before = unlearned
    deps = dependents(MANIFESTS, FAULTY)
    ((cert_seq, cert),) = branch(led, "UnlearningCertificate", result)
    assert cert_seq == result.certificate_seq and cert_seq in led.by_source(FAULTY)
    original_ckpts = {b["step"]: b["digest"] for s, b in bodies(led, "Checkpoint") if s < before}
    branch_ckpts = branch(led, "Checkpoint", result)
    assert cert["source"] == FAULTY and cert["mode"] == "exact"
    assert cert["rewind_checkpoint"] == original_ckpts[3] == branch_ckpts[0][1]["digest"]
    assert cert["original_head"] == original_ckpts[STEPS]
    assert cert["new_head"] == branch_ckpts[-1][1]["digest"] == result.new_head
    assert encoding.decode(led.artifact(cert["removed"])) == deps.removed
    assert encoding.decode(led.artifact(cert["relabeled"])) == [[i, f["label"]] for i, f in sorted(deps.relabeled.items())]
    # The branch's RunStarted names its origin; the log ends at a tree head after the certificate.
    runs = bodies(led, "RunStarted")
    (orig_seq, orig), = [(s, b) for s, b in runs if b["run_id"] == "digits-run"]
    (_, started), = [(s, b) for s, b in runs if b["run_id"] == f"digits-run/without-{FAULTY}"]
    assert started["settings"]["branch"] == {"of": orig_seq, "rewind": result.rewind_seq, "retired": result.retired_seq,
                                            "removed": cert["removed"], "relabeled": cert["relabeled"]}
    assert {k: v for k, v in started["settings"].items() if k != "branch"} == orig["settings"]
    assert started["artifacts"] == orig["artifacts"]
    assert led.observation(cert_seq + 1).type == "TreeHead"
    for s, _ in branch_ckpts:
        assert led.observation(s + 1).type == "TreeHead"
    led.verify(trusted_roots=[WORLD.root.public_key])


# -- (6) the command line ----------------------------------------------------------------------------


def test_cli_exit_codes(original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = copy_of(original, tmp_path)
    crowd, trainer, source = tmp_path / "crowd.key", tmp_path / "trainer.key", tmp_path / "w0.key"
    CROWD_KEY.save(crowd), WORLD.trainer.save(trainer), WORKER_KEYS[0].save(source)
    led_arg = str(path)
    assert main(["unlearn", led_arg, "--source", FAULTY, "--key", str(trainer)]) == 2
    assert "no SourceRetired" in capsys.readouterr().err
    assert main(["retire", led_arg, "--source", "nobody", "--key", str(crowd), "--reason", "r"]) == 2
    assert main(["retire", led_arg, "--source", FAULTY, "--key", str(source), "--reason", "r"]) == 2
    assert "may not retire" in capsys.readouterr().err
    assert main(["retire", led_arg, "--source", FAULTY, "--key", str(crowd), "--reason", "swaps 3 and 8", "--json"]) == 0
    assert '"seq"' in capsys.readouterr().out
    assert main(["unlearn", led_arg, "--source", FAULTY, "--key", str(trainer), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"mode": "exact"' in out and '"rewind_step": 3' in out
    assert main(["unlearn", led_arg, "--source", FAULTY, "--key", str(trainer)]) == 2  # already unlearned
    with Ledger.open(path) as led:
        assert len(led.by_type("UnlearningCertificate")) == 1


# -- crash semantics -------------------------------------------------------------------------------


def test_a_failed_unlearning_leaves_the_log_at_a_branch_checkpoint(original: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from gradledger.training.replayer import Replayer

    real_step = Replayer.step

    def failing(self: Any, original_update: dict[str, Any], batch: list[int], inspect: Any = None) -> dict[str, Any]:
        if original_update["step"] == 7:
            raise RuntimeError("power cut")
        return real_step(self, original_update, batch, inspect)

    with Ledger.open(copy_of(original, tmp_path), writable=True) as led:
        retire(led, FAULTY, CROWD_KEY, "swaps 3 and 8")
        monkeypatch.setattr(Replayer, "step", failing)
        with pytest.raises(RuntimeError, match="power cut"):
            unlearn(led, FAULTY, WORLD.trainer)
        last = led.observation(led.size - 1)
        assert last.type == "TreeHead" and led.observation(led.size - 2).body["step"] == 6
        assert led.by_type("UnlearningCertificate") == []
        monkeypatch.setattr(Replayer, "step", real_step)
        result = unlearn(led, FAULTY, WORLD.trainer)  # an interrupted branch is abandoned, not resumed
        assert len(led.by_type("UnlearningCertificate")) == 1
        assert len([s for s, b in bodies(led, "RunStarted") if b["run_id"] == result.branch_run_id]) == 2
        led.verify(trusted_roots=[WORLD.root.public_key])
