"""PyTorch Lightning governed by ``GovernedLightning`` (specs/api.md §4.3): the user's LightningModule
and automatic optimization unchanged (its loss, AdamW with a scheduler, gradient clipping,
accumulation, bf16, dropout, ``self.log``), Lightning's ``max_steps`` honoured, bit-exact replay;
what the ledger cannot reproduce refused when training starts; a failure leaves a verifiable log."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradledger
from gradledger.ledger.bundle import export_bundle
from gradledger.training import GovernanceError
from helpers import verify_cli

pl = pytest.importorskip("lightning.pytorch")  # in the test extra
from gradledger.training.integrations.lightning import GovernedLightning  # noqa: E402

TAXONOMY = Path(__file__).resolve().parents[1] / "examples" / "taxonomy.toml"
EXAMPLE = TAXONOMY.parent / "lightning_digits.py"
N = 96


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 16, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


class Module(pl.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.ReLU(),
                                 nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch  # the user's own validation loader: plain (x, y), the plain forward
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5),
                                                   "interval": "step"}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lightning") / "project"
    x, y = _data()
    g = torch.Generator().manual_seed(2)
    hx = torch.randn(40, 16, generator=g)  # held out: the depth profiles read these
    with gradledger.Project.init(path, TAXONOMY) as p:
        p.label(x, y.tolist(), source="dr-lee", name="points")
        p.label(hx, ((hx[:, 0] > 0).long() + 2 * (hx[:, 1] > 0).long()).tolist(), source="dr-lee", name="held")
    return path


def _trainer(governed: GovernedLightning, callbacks: Any = (), **kw: Any) -> Any:
    base = dict(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    return pl.Trainer(**{**base, **kw}, **governed.trainer_options(callbacks=callbacks))


def _loader() -> DataLoader:
    x, y = _data()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def test_bf16_accumulation_and_clipping_verify_bit_for_bit(project: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    governed = GovernedLightning(project=project, dataset="points", run_id=tmp_path.name, checkpoint_every=2,
                                 precision="bf16-mixed", memorization=gradledger.MemorizationScan(min_trace=2),
                                 profiles=gradledger.DepthProfiles("held"))
    trainer = _trainer(governed, accumulate_grad_batches=2, gradient_clip_val=0.5, val_check_interval=4,
                       num_sanity_val_steps=1)
    trainer.fit(Module(), governed.loader(_loader()), val_dataloaders=_loader())  # validation runs between steps
    assert "val_loss" in trainer.callback_metrics
    assert trainer.global_step == 6 and governed.run.closed  # Lightning's counter moved: max_steps stops it
    with gradledger.Project.open(project) as p:
        ups = [p.ledger.observation(s).body for s in p.ledger.by_type("GovernedUpdate")[-6:]]
        # the memorization scan at each checkpoint after step 0 (specs/dynamics.md §2.2)
        scans = [p.ledger.observation(s).body for s in p.ledger.by_type("MemorizationScan")]
        assert [s["through"] for s in scans[-3:]] == [2, 4, 6]
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    recipe = ups[0]["recipe"]
    assert len(recipe["micro"]) == 2 and recipe["loss_divisor"] == 2
    assert recipe["autocast"] == {"device": "cpu", "dtype": "bfloat16"} and recipe["clip"]["max_norm"] == 0.5
    assert ups[2]["lr"] == ups[0]["lr"] and ups[3]["lr"] == ups[0]["lr"] / 2  # the StepLR schedule, recorded
    code, report = verify_cli(bundle, project / "roots.pub")
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact" and report["figures"]["replayed_steps"] >= 6
    assert any(c["name"] == "scans" and c["status"] == "pass" for c in report["checks"])
    # a depth profile at each checkpoint, step 0 included, recomputed by replay (specs/dynamics.md §5)
    assert any(c["name"] == "profiles" and c["status"] == "pass" and "4 of 4" in c["detail"] for c in report["checks"])


def test_the_example_script_verifies(tmp_path: Path, monkeypatch: Any) -> None:
    spec = importlib.util.spec_from_file_location("lightning_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", ["lightning_digits.py", "--out", str(tmp_path), "--steps", "8",
                                      "--examples", "256"])
    example.main()
    with gradledger.Project.open(tmp_path / "project") as p:
        assert len(p.ledger.by_type("GovernedUpdate")) == 8
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    code, report = verify_cli(bundle, tmp_path / "project" / "roots.pub")
    assert code == 0, report.get("first_failure")


@pytest.mark.parametrize("module, trainer_kw, cause", [
    (lambda: Module(manual=True), {}, "manual optimization"),
    (lambda: Module(), {"unwrapped": True}, "a loader it was not given"),
    (lambda: Module(), {"accumulate_grad_batches": 5}, "accumulate_grad_batches=5 over 12 batches"),
], ids=["manual", "loader-not-handed", "partial-window"])
def test_what_the_ledger_cannot_reproduce_is_refused_when_training_starts(project: Path, tmp_path: Path, module: Any,
                                                                        trainer_kw: dict[str, Any], cause: str) -> None:
    governed = GovernedLightning(project=project, dataset="points", run_id=tmp_path.name)
    with gradledger.Project.open(project) as p:
        size = p.ledger.size
    unwrapped = trainer_kw.pop("unwrapped", False)
    with pytest.raises(GovernanceError, match=f"cannot govern {cause}"):
        _trainer(governed, **trainer_kw).fit(module(), _loader() if unwrapped else governed.loader(_loader()))
    with gradledger.Project.open(project) as p:
        assert p.ledger.size == size
    with pytest.raises(GovernanceError, match="precision '16-mixed'"):
        GovernedLightning(project=project, dataset="points", precision="16-mixed")


def test_a_failure_mid_training_leaves_a_log_that_verifies(project: Path, tmp_path: Path) -> None:
    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    torch.manual_seed(0)
    governed = GovernedLightning(project=project, dataset="points", run_id=tmp_path.name, checkpoint_every=2)
    module = Module()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(governed, callbacks=[Boom()]).fit(module, governed.loader(_loader()))
    assert "forward" not in module.__dict__  # the module is the user's again
    with gradledger.Project.open(project) as p:
        assert p.ledger.observation(p.ledger.by_type("Checkpoint")[-1]).body["step"] == 2
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    code, report = verify_cli(bundle, project / "roots.pub")
    assert code == 0, report.get("first_failure")
