"""HuggingFace ``Trainer`` governed by ``GovernedTrainer`` (specs/api.md §4.1): a BERT built from its
config (no download) fine-tuned by the Trainer's own loop, with its optimizer, scheduler, clipping,
accumulation, bf16 and evaluation, verifies bit for bit; what the ledger cannot reproduce is
refused when the Trainer is made."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

import gradledger
from gradledger.ledger.bundle import export_bundle
from gradledger.training import GovernanceError
from helpers import verify_cli

transformers = pytest.importorskip("transformers")  # the test extra holds transformers and accelerate
pytest.importorskip("accelerate")
from gradledger.training.integrations.huggingface import GovernedTrainer  # noqa: E402

TAXONOMY = Path(__file__).resolve().parents[1] / "examples" / "taxonomy.toml"
EXAMPLE = TAXONOMY.parent / "hf_trainer.py"
N, SEQ, VOCAB = 32, 12, 60


def _columns() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, SEQ - 4:] = 0  # some padding, so the attention mask matters
    return {"input_ids": ids, "attention_mask": mask}, ids[:, 0] % 10


class Tokens(Dataset):
    """A HuggingFace-style training set: dict items with their own ``labels`` column."""

    def __init__(self, labels_offset: int = 0) -> None:
        self.columns, self.labels = _columns()
        self.offset = labels_offset

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.columns.items()}, "labels": (self.labels[i] + self.offset) % 10}


def _bert() -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=10)
    return transformers.BertForSequenceClassification(config)


def _args(out: Path, **kw: Any) -> Any:
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-3,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "project"
    columns, labels = _columns()
    g = torch.Generator().manual_seed(6)
    held = torch.randint(1, VOCAB, (16, SEQ), generator=g)  # held out: the depth profiles read these
    with gradledger.Project.init(path, TAXONOMY) as p:
        p.label(columns, labels.tolist(), source="dr-lee", name="tokens")
        p.label({"input_ids": held, "attention_mask": torch.ones_like(held)}, (held[:, 0] % 10).tolist(),
                source="dr-lee", name="tokens-held")
    return path


def test_a_trainer_fine_tuning_verifies_bit_for_bit(project: Path, tmp_path: Path) -> None:
    # The Trainer's own machinery: fused AdamW with decay / no-decay groups, a warmup then linear
    # schedule, max_grad_norm 1.0, bf16 autocast, label smoothing, evaluation mid-run. (Accumulation:
    # the example below.)
    args = _args(tmp_path / "hf", bf16=True, label_smoothing_factor=0.1, weight_decay=0.01, warmup_steps=1,
                 num_train_epochs=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=16)
    steps = args.num_train_epochs * N // (8 * args.gradient_accumulation_steps)
    with gradledger.Project.open(project) as p:
        # The dataset's own labels are shifted: replay computes every loss from the committed manifests'
        # labels, so the run verifies only if it trained on those, not on the dataset's column.
        trainer = GovernedTrainer(model=_bert(), args=args, train_dataset=Tokens(labels_offset=3),
                                  eval_dataset=Tokens(), project=p, dataset="tokens", run_id=tmp_path.name,
                                  checkpoint_every=2, profiles=gradledger.DepthProfiles("tokens-held"))
        assert trainer.run is None
        result = trainer.train()
        assert trainer.run.closed and result.global_step == steps
        ups = [p.ledger.observation(s).body for s in p.ledger.by_type("GovernedUpdate")[-steps:]]
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    recipe = ups[0]["recipe"]
    assert recipe["clip"]["kind"] == "norm" and recipe["clip"]["max_norm"] == 1.0
    assert recipe["autocast"] == {"device": "cpu", "dtype": "bfloat16"}
    assert len(ups[0]["optimizer"]["groups"]) == 2  # the Trainer's decay and no-decay groups
    lrs = [u["lr"] for u in ups]
    assert lrs[0] < lrs[1] > lrs[-1]  # the warmup, then the linear decay: the scheduler's, recorded
    code, report = verify_cli(bundle, project / "roots.pub")
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact" and report["figures"]["replayed_steps"] >= steps
    # a depth profile of the BERT's band boundaries at each checkpoint, recomputed (specs/dynamics.md §5)
    n = steps // 2 + 1
    assert any(c["name"] == "profiles" and f"{n} of {n}" in c["detail"] for c in report["checks"]), report["checks"]


def test_the_example_script_trains_with_accumulation_and_verifies(tmp_path: Path, monkeypatch: Any) -> None:
    # examples/hf_trainer.py as a user runs it (smaller): a Trainer script whose only change is
    # GovernedTrainer, with gradient accumulation over two micro-batches.
    spec = importlib.util.spec_from_file_location("hf_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py", "--out", str(tmp_path), "--examples", "128", "--epochs", "1"])
    example.main()
    with gradledger.Project.open(tmp_path / "project") as p:
        ups = [p.ledger.observation(s).body for s in p.ledger.by_type("GovernedUpdate")]
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    assert len(ups) == 2 and all(len(u["recipe"]["micro"]) == 2 and u["recipe"]["loss_divisor"] == 2 for u in ups)
    code, report = verify_cli(bundle, tmp_path / "project" / "roots.pub")
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact"


@pytest.mark.parametrize("kw, cause", [
    ({"args": {"fp16": True}}, "fp16"),
    ({"args": {"torch_compile": True}}, "torch_compile"),
    ({"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum()},
     "compute_loss_func"),
    ({"data_collator": lambda items: items}, "data_collator"),
], ids=["fp16", "torch-compile", "compute-loss-func", "data-collator"])
def test_options_the_ledger_cannot_reproduce_are_refused_when_the_trainer_is_made(
        project: Path, tmp_path: Path, kw: dict[str, Any], cause: str) -> None:
    args = _args(tmp_path / "hf", **kw.pop("args", {}))
    with gradledger.Project.open(project) as p:
        with pytest.raises(GovernanceError, match=f"cannot govern {cause}"):
            GovernedTrainer(model=_bert(), args=args, train_dataset=Tokens(), project=p, dataset="tokens", **kw)


def test_resuming_from_a_trainer_checkpoint_is_refused_and_records_nothing(project: Path, tmp_path: Path) -> None:
    with gradledger.Project.open(project) as p:
        size = p.ledger.size
        trainer = GovernedTrainer(model=_bert(), args=_args(tmp_path / "hf"), train_dataset=Tokens(), project=p,
                                  dataset="tokens", run_id=tmp_path.name)
        with pytest.raises(GovernanceError, match="cannot resume from a Trainer checkpoint"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-1"))
        assert p.ledger.size == size


def test_a_failure_mid_training_leaves_a_ledger_that_verifies(project: Path, tmp_path: Path) -> None:
    # A callback that raises at step 3: the run records nothing more, and the committed log ends at
    # the last checkpoint the loop reached (step 2), which verifies.
    class Boom(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 3:
                raise RuntimeError("boom")

    with gradledger.Project.open(project) as p:
        trainer = GovernedTrainer(model=_bert(), args=_args(tmp_path / "hf"), train_dataset=Tokens(), project=p,
                                  dataset="tokens", run_id=tmp_path.name, checkpoint_every=2, callbacks=[Boom()])
        with pytest.raises(RuntimeError, match="boom"):
            trainer.train()
        run = p.ledger.observation(p.ledger.by_type("RunStarted")[-1])
        assert run.body["run_id"] == tmp_path.name
        last = p.ledger.observation(p.ledger.by_type("Checkpoint")[-1]).body
        assert last["step"] == 2
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    code, report = verify_cli(bundle, project / "roots.pub")
    assert code == 0, report.get("first_failure")


def test_lora_through_peft_on_a_gpt2_decoder_verifies_and_leaves_the_base_untouched(tmp_path: Path) -> None:
    # LoRA adapters on a GPT-2-style decoder built from its config (its sequence classification picks
    # each row's last token by argmax, and its export writes a divisibility guard: both must load in
    # the verifier). The bands hold the adapters by their layers' prefixes; the frozen base's tensors
    # are the same in every checkpoint.
    peft = pytest.importorskip("peft")
    columns, labels = _columns()
    with gradledger.Project.init(tmp_path / "project", TAXONOMY) as p:
        p.label(columns, labels.tolist(), source="dr-lee", name="tokens")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=2, n_positions=SEQ,
                                     num_labels=10, pad_token_id=0)
    model = peft.get_peft_model(transformers.GPT2ForSequenceClassification(config),
                                peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"],
                                                lora_dropout=0.1))
    frozen = {n for n, t in model.named_parameters() if not t.requires_grad}
    assert frozen and any("lora_" in n for n, t in model.named_parameters() if t.requires_grad)
    trainer = GovernedTrainer(model=model, args=_args(tmp_path / "hf", num_train_epochs=2), train_dataset=Tokens(),
                              project=tmp_path / "project", dataset="tokens", checkpoint_every=3,
                              memorization=gradledger.MemorizationScan(fraction=0.25, min_trace=2))
    trainer.train()
    with gradledger.Project.open(tmp_path / "project") as p:
        ups = [p.ledger.observation(s).body for s in p.ledger.by_type("GovernedUpdate")]
        checkpoints = [p.ledger.observation(s).body for s in p.ledger.by_type("Checkpoint")]
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    assert len(ups) == 8 and [c["step"] for c in checkpoints] == [0, 3, 6, 8]
    for name in frozen:
        digests = {c["tensors"][f"model.{name}"] for c in checkpoints}
        assert len(digests) == 1, f"frozen {name} changed"
    trained = [n for n in checkpoints[0]["tensors"] if "lora_B" in n]
    assert trained and all(checkpoints[0]["tensors"][n] != checkpoints[-1]["tensors"][n] for n in trained)
    code, report = verify_cli(bundle, tmp_path / "project" / "roots.pub")
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact" and report["figures"]["replayed_steps"] == 8
    assert any(c["name"] == "scans" and c["status"] == "pass" for c in report["checks"])
    # The base is committed by digest in RunStarted (format 5): every frozen parameter, none trained.
    with gradledger.Project.open(tmp_path / "project") as p:
        settings = p.ledger.observation(p.ledger.by_type("RunStarted")[-1]).body["settings"]
    assert settings["format"] >= 5 and set(settings["frozen"]["tensors"]) == frozen
    assert all(settings["frozen"]["tensors"][n] == checkpoints[0]["tensors"][f"model.{n}"] for n in frozen)
    _forged_frozen_commitments_fail(bundle, tmp_path, sorted(frozen))


def _forged_frozen_commitments_fail(bundle: Path, tmp_path: Path, frozen: list[str]) -> None:
    """A hostile trainer (its key, not the root's) rewrites settings.frozen and re-signs everything:
    another base (one digest changed) fails at the checkpoints; a base with a parameter left out
    passes them, and fails where replay reads the program."""
    from forging import Forge
    from gradledger.training.checkpoints import checkpoint_digest

    def rewrite(change: Any) -> Any:
        def edit(body: dict[str, Any]) -> None:
            tensors = body["settings"]["frozen"]["tensors"]
            change(tensors)
            body["settings"]["frozen"]["digest"] = checkpoint_digest(tensors)
        return edit

    forge = Forge.from_bundle(bundle, keys_dir=tmp_path / "project" / "keys")
    run = forge.first("RunStarted")
    other = forge.clone().edit(run, rewrite(lambda t: t.update({frozen[0]: bytes(32)}))).write(tmp_path / "other.glb")
    code, report = verify_cli(other, tmp_path / "project" / "roots.pub")
    assert code == 1 and "settings.frozen.tensors" in report["first_failure"]["detail"]
    assert "Checkpoint" in report["first_failure"]["detail"]
    fewer = forge.clone().edit(run, rewrite(lambda t: t.pop(frozen[0]))).write(tmp_path / "fewer.glb")
    code, report = verify_cli(fewer, tmp_path / "project" / "roots.pub")
    assert code == 1 and f"settings.frozen.tensors {frozen[0]!r}" in report["first_failure"]["detail"]
    assert "model program's frozen parameters" in report["first_failure"]["detail"]


def test_a_datasets_dataset_with_text_and_list_columns_trains_and_verifies(project: Path, tmp_path: Path) -> None:
    # What a tokenizer's map() gives a Trainer: a datasets.Dataset of lists (no torch format) beside
    # a raw text column the model does not take. The Trainer's own column rule drops the text; the
    # lists become the int64 tensors the project labeled.
    datasets = pytest.importorskip("datasets")  # in the test extra
    columns, labels = _columns()
    ds = datasets.Dataset.from_dict({"text": [f"example {i}" for i in range(N)],
                                     **{k: v.tolist() for k, v in columns.items()}, "label": labels.tolist()})
    with gradledger.Project.open(project) as p:
        trainer = GovernedTrainer(model=_bert(), args=_args(tmp_path / "hf"), train_dataset=ds, project=p,
                                  dataset="tokens", run_id=tmp_path.name, checkpoint_every=2)
        trainer.train()
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    code, report = verify_cli(bundle, project / "roots.pub")
    assert code == 0, report.get("first_failure")


def test_a_trainer_under_a_privacy_policy_clips_noises_and_verifies(tmp_path: Path) -> None:
    """specs/privacy.md through the HF Trainer: the trusted crowd worker's labels are private (a taxonomy with
    ``[policy.privacy]``); the Trainer's own clip is refused with its remedy, and without it the run records
    its clip factors and epsilon, and verifies bit for bit."""
    text = TAXONOMY.read_text().replace('name = "crowd-trusted"\n', 'name = "crowd-trusted"\nprivate = true\n')
    text += '\n[policy.privacy]\nclip = { head = 1.0, mid = 2.0 }\nnoise = { head = 1.0, mid = 1.2 }\ndelta = 1e-5\n'
    (tmp_path / "taxonomy.toml").write_text(text)
    columns, labels = _columns()
    with gradledger.Project.init(tmp_path / "p", tmp_path / "taxonomy.toml") as p:
        p.label(columns, labels.tolist(), source=["worker-4" if i % 2 else "dr-lee" for i in range(N)], name="tokens")
    with gradledger.Project.open(tmp_path / "p") as p:
        clipping = GovernedTrainer(model=_bert(), args=_args(tmp_path / "clip"), train_dataset=Tokens(), project=p,
                                   dataset="tokens", run_id="clipped", checkpoint_every=2)
        with pytest.raises(Exception, match="recipe.clip"):
            clipping.train()
        trainer = GovernedTrainer(model=_bert(), args=_args(tmp_path / "hf", max_grad_norm=0.0), train_dataset=Tokens(),
                                  project=p, dataset="tokens", run_id="private", checkpoint_every=2)
        trainer.train()
        ups = [p.ledger.observation(s).body for s in p.ledger.by_type("GovernedUpdate")]
        assert ups and any(f < 1.0 for u in ups for f in u["recipe"]["privacy"]["factors"])
        export_bundle(p.ledger, tmp_path / "run.glb", with_data=True)
    code, report = verify_cli(tmp_path / "run.glb", tmp_path / "p" / "roots.pub")
    assert code == 0 and report["verdict"] == "exact", report.get("first_failure")
    (spent,) = report["figures"]["privacy"]
    assert spent["run"] == "private" and set(spent["epsilon_per_band"]) == {"head", "mid"}
