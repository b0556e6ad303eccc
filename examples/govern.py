"""Govern a training loop you already have: the plain PyTorch loop below, with the lines marked
`# gradledger` added (bench/models.py counts them). Every optimizer step becomes a signed
GovernedUpdate; `gradledger-verify` then replays the run bit for bit.

    python examples/govern.py --out govern-out
    gradledger export govern-out/project/ledger -o govern-out/run.glb
    gradledger-verify govern-out/run.glb --trust govern-out/project/roots.pub
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradledger

HERE = Path(__file__).resolve().parent


def make_project(out: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    """Once per project, not part of the loop: keys, credentials, policy, and labels committed."""
    shutil.rmtree(out, ignore_errors=True)
    with gradledger.Project.init(out, HERE / "taxonomy.toml") as project:
        # The digits' labels, as one expert source signed them: one manifest per example.
        project.label(x, y.tolist(), source="dr-lee", name="digits")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="govern-out")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    path = make_project(Path(args.out) / "project", x, y)

    # -- the user's own training code --------------------------------------------------------
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    project = gradledger.Project.open(path)  # gradledger
    model, optimizer, loader = gradledger.govern(model, optimizer, loader, project=project, dataset="digits")  # gradledger
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))
    model.train()
    for epoch in range(args.epochs):
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}")
    model.run.close()  # gradledger
    project.close()  # gradledger
    print(f"governed run recorded in {path / 'ledger'}")


if __name__ == "__main__":
    main()
