"""Govern a PyTorch Lightning script you already have: the LightningModule and Trainer below, with the
lines marked `# gradledger` added or changed (bench/models.py counts them). Every optimizer step
Lightning takes becomes a signed GovernedUpdate; `gradledger-verify` then replays the run bit for bit.

    pip install -e '.[lightning,demo]'
    python examples/lightning_digits.py --out lightning-out
    gradledger export lightning-out/project/ledger -o lightning-out/run.glb
    gradledger-verify lightning-out/run.glb --trust lightning-out/project/roots.pub
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradledger
from gradledger.training.integrations.lightning import GovernedLightning  # gradledger

HERE = Path(__file__).resolve().parent


class Digits(pl.LightningModule):
    """The user's module, unchanged: its own forward, training step, loss, optimizer and schedule."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=20)}


def make_project(out: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    """Once per project, not part of the script: keys, credentials, policy, and the labels committed."""
    shutil.rmtree(out, ignore_errors=True)
    with gradledger.Project.init(out, HERE / "taxonomy.toml") as project:
        project.label(x, y.tolist(), source="dr-lee", name="digits")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lightning-out")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--examples", type=int, default=1797)
    args = parser.parse_args()
    digits = load_digits()
    x = torch.tensor(digits.data[: args.examples] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[: args.examples], dtype=torch.int64)
    project = make_project(Path(args.out) / "project", x, y)

    # -- the user's own Lightning script -----------------------------------------------------
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True)
    governed = GovernedLightning(project=project, dataset="digits", checkpoint_every=20)  # gradledger
    trainer = pl.Trainer(max_steps=args.steps, accumulate_grad_batches=2, gradient_clip_val=1.0, logger=False,
                         enable_checkpointing=False, **governed.trainer_options())  # gradledger
    trainer.fit(Digits(), governed.loader(loader))  # gradledger
    print(f"governed run recorded in {project / 'ledger'}")


if __name__ == "__main__":
    main()
