"""Govern a HuggingFace Trainer script you already have: the fine-tuning below, with the lines marked
`# gradledger` changed (bench/models.py counts them). Every optimizer step the Trainer takes becomes
a signed GovernedUpdate; `gradledger-verify` then replays the run bit for bit. The model is a small
BERT built from its config and the task synthetic, so nothing is downloaded.

    pip install -e '.[hf]'
    python examples/hf_trainer.py --out hf-out
    gradledger export hf-out/project/ledger -o hf-out/run.glb
    gradledger-verify hf-out/run.glb --trust hf-out/project/roots.pub
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import gradledger
from gradledger.training.integrations.huggingface import GovernedTrainer  # gradledger

HERE = Path(__file__).resolve().parent
SEQ, VOCAB = 16, 100


def tokens(n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A padded token task: the class is the first token's, modulo 4."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, ids[:, 0] % 4


class Tokens(Dataset):
    """What a tokenizer with padding="max_length" gives a Trainer: dict items with a labels column."""

    def __init__(self, columns: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.columns, self.labels = columns, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.columns.items()}, "labels": self.labels[i]}


def make_project(out: Path, columns: dict[str, torch.Tensor], labels: torch.Tensor) -> Path:
    """Once per project, not part of the script: keys, credentials, policy, and the labels committed
    (one manifest per example, signed by the source that labeled it)."""
    shutil.rmtree(out, ignore_errors=True)
    with gradledger.Project.init(out, HERE / "taxonomy.toml") as project:
        project.label(columns, labels.tolist(), source="dr-lee", name="tokens")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="hf-out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args()
    columns, labels = tokens(args.examples)
    project = make_project(Path(args.out) / "project", columns, labels)

    # -- the user's own Trainer script -------------------------------------------------------
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=SEQ, num_labels=4)
    model = BertForSequenceClassification(config)
    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"), num_train_epochs=args.epochs, per_device_train_batch_size=32,
        gradient_accumulation_steps=2, learning_rate=2e-3, weight_decay=0.01, warmup_steps=2, max_grad_norm=1.0,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0)
    trainer = GovernedTrainer(model=model, args=training_args, train_dataset=Tokens(columns, labels),  # gradledger
                              project=project, dataset="tokens")  # gradledger
    trainer.train()
    print(f"governed run recorded in {project / 'ledger'}")


if __name__ == "__main__":
    main()
