"""``gradledger.govern`` end to end on a real third-party model: a HuggingFace BERT built from its
config (no download), returning a ``ModelOutput``, trained by a plain loop on a project's labels,
verified bit for bit by ``gradledger-verify``; and the run's crash rule through the API."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradledger
from gradledger.ledger.bundle import export_bundle
from helpers import verify_cli

transformers = pytest.importorskip("transformers")  # in the test extra; skipped only without it

TAXONOMY = Path(__file__).resolve().parents[1] / "examples" / "taxonomy.toml"
N, SEQ, VOCAB = 48, 12, 60


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    y = (x[:, 0] % 10).to(torch.int64)  # a learnable rule: the first token's class
    return x, y


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=10)
    return transformers.BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("govern") / "project"
    x, y = _tokens()
    with gradledger.Project.init(path, TAXONOMY) as p:
        p.label(x, y.tolist(), source="dr-lee", name="tokens")
    return path


def _train(model: Any, optimizer: torch.optim.Optimizer, loader: Any, steps: int) -> None:
    """The user's loop over a governed HuggingFace model, for ``steps`` steps (no batch drawn beyond)."""
    for inputs, labels in itertools.islice(loader, steps):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs).logits, labels).backward()
        optimizer.step()


def _govern_bert(p: gradledger.Project, x: torch.Tensor, y: torch.Tensor, run_id: str, **kw: Any) -> Any:
    bert = _bert()
    return gradledger.govern(bert, torch.optim.SGD(bert.parameters(), lr=1e-2),
                             DataLoader(TensorDataset(x, y), batch_size=8), project=p, dataset="tokens",
                             run_id=run_id, **kw)


def _verify(bundle: Path, roots: Path) -> tuple[int, dict[str, Any]]:
    return verify_cli(bundle, roots)


def test_a_huggingface_bert_governed_by_one_call_verifies(project: Path, tmp_path: Path) -> None:
    x, y = _tokens()
    model = _bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    with gradledger.Project.open(project) as p:
        model, optimizer, loader = gradledger.govern(model, optimizer, loader, project=p, dataset="tokens",
                                                     run_id="bert", checkpoint_every=4)
        model.train()
        for inputs, labels in loader:  # one epoch, the user's loop
            optimizer.zero_grad()
            out = model(inputs)  # a ModelOutput
            F.cross_entropy(out.logits, labels).backward()
            optimizer.step()
        model.run.close()
        ups = [p.ledger.observation(s).body for s in p.ledger.by_type("GovernedUpdate")]
        assert len(ups) == N // 8
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    code, report = _verify(bundle, project / "roots.pub")
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact" and report["figures"]["replayed_steps"] == N // 8
    # One worker: its segments' own time is part of the replay's, which also holds the worker's start.
    assert 0 < report["figures"]["replay_segment_seconds"] <= report["figures"]["replay_seconds"]


def test_a_run_that_ends_before_its_first_checkpoint_records_nothing(tmp_path: Path) -> None:
    # A run is committed with its first checkpoint after an update (specs/training.md §1): one closed
    # before its first step, or failing before that checkpoint, leaves no RunStarted and no lone step-0
    # Checkpoint, which the verifier's heads check would refuse (a checkpoint no update reaches) and
    # with it the whole ledger. A run after them verifies.
    path = tmp_path / "project"
    x, y = _tokens()
    with gradledger.Project.init(path, TAXONOMY) as p:
        p.label(x, y.tolist(), source="dr-lee", name="tokens")
    with gradledger.Project.open(path) as p:
        size = p.ledger.size
        model, optimizer, loader = _govern_bert(p, x, y, "closed-at-once")
        assert model.run.close() is None
        with pytest.raises(RuntimeError, match="boom"):
            model, optimizer, loader = _govern_bert(p, x, y, "fails-early", checkpoint_every=4)
            with model.run:
                _train(model, optimizer, loader, 2)
                raise RuntimeError("boom")
        assert p.ledger.size == size  # neither run left a record
        model, optimizer, loader = _govern_bert(p, x, y, "trains", checkpoint_every=2)
        _train(model, optimizer, loader, 3)
        model.run.close()
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    code, report = _verify(bundle, path / "roots.pub")
    assert code == 0, report.get("first_failure")
    assert report["figures"]["replayed_steps"] == 3


def test_closing_the_project_under_an_open_run_closes_the_run_first(tmp_path: Path) -> None:
    # A user who closes the project (or the ledger) and forgets model.run.close() must not get a
    # ledger whose last updates no checkpoint covers (replay would reject it): the run is closed
    # first, with its final checkpoint.
    path = tmp_path / "project"
    x, y = _tokens()
    with gradledger.Project.init(path, TAXONOMY) as p:
        p.label(x, y.tolist(), source="dr-lee", name="tokens")
    p = gradledger.Project.open(path)
    model, optimizer, loader = _govern_bert(p, x, y, "forgotten", checkpoint_every=2)
    _train(model, optimizer, loader, 3)
    p.close()  # no model.run.close()
    assert model.run.closed
    with gradledger.Project.open(path) as p:
        led = p.ledger
        last = led.observation(led.by_type("Checkpoint")[-1])
        assert last.body["step"] == 3 and led.observation(led.size - 1).type == "TreeHead"
        assert len(led.by_type("GovernedUpdate")) == 3
        bundle = tmp_path / "run.glb"
        export_bundle(led, bundle, with_data=True)
    code, report = _verify(bundle, path / "roots.pub")
    assert code == 0, report.get("first_failure")


def test_an_exception_in_the_loop_leaves_the_log_at_a_checkpoint(project: Path) -> None:
    x, y = _tokens()
    model = _bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before = torch.are_deterministic_algorithms_enabled()
    with gradledger.Project.open(project) as p:
        size = p.ledger.size
        with pytest.raises(RuntimeError, match="boom"):
            model, optimizer, loader = gradledger.govern(model, optimizer, loader, project=p, dataset="tokens",
                                                         run_id="crash", checkpoint_every=2)
            with model.run:
                _train(model, optimizer, loader, 3)
                raise RuntimeError("boom")
        led = p.ledger
        tail = [led.observation(s).type for s in range(size, led.size)]
        # RunStarted, checkpoint 0, two updates, checkpoint 2: step 2's update was never committed.
        assert tail[-2:] == ["Checkpoint", "TreeHead"]
        assert tail.count("GovernedUpdate") == 2
        assert torch.are_deterministic_algorithms_enabled() == before  # the run's switch undone
