"""Governed against plain training on three real architectures, interleaved in one run (issue 11).

    python bench/models.py [--rounds R] [--steps K] [--sub S] [--mem-steps K] [--only MODEL ...]
                           [--skip-mem] [--skip-replay]

Why: bench/overhead.py measures the governance tax on hand-written models driven through the
``Governance`` engine; this one measures it where users meet it, through the public API
(``gradledger.Project`` + ``gradledger.govern`` on the user's own model, optimizer and loader, the
loop unchanged) on the architectures people actually train:

- ``bert``: transformers' ``BertForSequenceClassification`` built from a ``BertConfig`` (4 layers,
  hidden 128, 4 heads, vocab 1000, seq len 32), taking ``input_ids`` and ``attention_mask`` as a
  tokenizer gives them: the dataset's examples are dicts of the two (a model of parts,
  specs/training.md §5.1) and both loops call ``model(**inputs)``; the synthetic sequences have
  real padding (lengths 8..32), so the mask changes the logits.
- ``resnet18``: tests/archs.py's torchvision-named ResNet-18 (10 classes, 32x32 inputs) with its
  BatchNorms in eval mode (running statistics): train-mode BatchNorm is refused by design,
  examples would share batch statistics.
- ``vit``: tests/archs.py's timm-named VisionTransformer (32x32, patch 8, dim 64, depth 4,
  4 heads). timm itself cannot be installed here: it imports torchvision, whose registry build is
  a CUDA one that breaks the CPU torch.
- ``lora`` (issue 13): LoRA adapters through ``peft`` (r 8 on ``c_attn`` and ``c_proj``) on
  transformers' ``GPT2ForSequenceClassification`` from a ``GPT2Config`` (4 layers, n_embd 128),
  the bert workload's token data, trained by ``transformers.Trainer`` (plain) against
  ``GovernedTrainer`` (governed) with the same ``TrainingArguments`` (AdamW, max_grad_norm 1.0):
  the frameworks' own loops, so a round is one run of K steps per variant (alternating which goes
  first; a warm-up round not counted), each timed between its step ends (the first step, and the
  Trainer's setup, left out); memory children reset the high-water mark when the loop begins.
  Keys ``lora_step_ratio``, ``lora_mem_ratio``, ``lora_replay_vs_train`` (over the governed runs'
  summed loop time), ``lora_bit_exact``.

Every model gets its own project (``Project.init(tmp, examples/taxonomy.toml)``) whose expert
source ``dr-lee`` labels a few hundred deterministic synthetic examples (one signed manifest
each, inputs stored), and its default band layout (``default_layout``: the policy bands head,
mid, deep). Governed and plain start from the same weights, see the same batches (the governed
run's committed seeded order, ``order="committed"``; plain indexes the same order), and use the
same loss (``F.cross_entropy``) and optimizer (AdamW lr 1e-3, wd 0.01).

- ``<model>_step_ratio``: interleaved in one process as bench/overhead.py does: a round is K
  governed and K plain steps in alternating sub-blocks of S steps (which goes first alternates),
  after one warm-up block each; the median over rounds of governed time / plain time. K is a
  multiple of the checkpoint interval, so every governed round pays for its checkpoints. Governed
  steps run with ``torch.use_deterministic_algorithms(True)`` (govern turns it on); plain steps run
  with torch's default (off).
- ``<model>_mem_ratio``: training-phase peak RSS (``VmHWM`` after a reset following setup), one
  fresh subprocess per variant, over ``--mem-steps`` steps that include a checkpoint.
- ``<model>_replay_vs_train`` and ``<model>_bit_exact``: the governed run of the timing phase is
  exported (``export_bundle(..., with_data=True)``) and checked by ``gradledger-verify RUN.glb
  --trust roots.pub --replay full --workers 1 --json`` in a separate process (same thread count:
  the worker replays on the recorded one); the ratio is the report's ``figures.replay_seconds``
  over the governed training seconds of the same steps (the governed blocks' summed time);
  bit-exact is ``verdict == "exact"``. ``<model>_segments_vs_train``: the same over
  ``figures.replay_segment_seconds``, the segments' own time in the worker, without its start
  (a short run's replay is mostly the worker's imports: about 2 s of torch here).
- ``lines_added``: the lines of examples/govern.py marked ``# gradledger``;
  ``hf_trainer_lines_added``: the same of examples/hf_trainer.py (an existing HF Trainer script);
  ``lightning_lines_added``: of examples/lightning_digits.py (an existing Lightning script).

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from archs import BasicBlock, resnet18, vit  # noqa: E402
from overhead import _reset_hwm, _status_kb  # noqa: E402

import gradledger  # noqa: E402
from gradledger.ledger.bundle import export_bundle  # noqa: E402
from gradledger.training.trainer import epoch_order  # noqa: E402

TAXONOMY = ROOT / "examples" / "taxonomy.toml"
EXAMPLE = ROOT / "examples" / "govern.py"
HF_EXAMPLE = ROOT / "examples" / "hf_trainer.py"
LIGHTNING_EXAMPLE = ROOT / "examples" / "lightning_digits.py"
SEED = 7
CHECKPOINT_EVERY = 25
CLASSES = 10
LR, WD = 1e-3, 0.01

try:
    import transformers
except ImportError:  # the bert and lora workloads are then skipped and the JSON says so
    transformers = None
try:
    import peft
except ImportError:  # the lora workload is then skipped and the JSON says so
    peft = None


def log(msg: str) -> None:
    print(f"[bench/models] {msg}", file=sys.stderr, flush=True)


# -- models and data ----------------------------------------------------------------------------

VOCAB, SEQ, PAD = 1000, 32, 0


def bert_model() -> nn.Module:
    assert transformers is not None
    torch.manual_seed(1234)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=SEQ, num_labels=CLASSES,
                                  pad_token_id=PAD)
    return Logits(transformers.BertForSequenceClassification(cfg))


class Logits(nn.Module):
    """The HF model's logits (``.logits`` of its ``ModelOutput``), called as the HF model is: ``**inputs``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        self.train(model.training)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


def bert_data(n: int) -> tuple[dict[str, Tensor], Tensor]:
    """Token sequences of lengths 8..32, right-padded with PAD, and their attention masks (a tokenizer's
    two outputs); the label depends on the real tokens only."""
    g = torch.Generator().manual_seed(2024)
    x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(8, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).to(torch.int64)
    x = x * mask + PAD * (1 - mask)
    y = ((x * mask).sum(1) + lengths) % CLASSES
    return {"input_ids": x.contiguous(), "attention_mask": mask}, y.to(torch.int64)


def rows(x: Any, index: Tensor) -> Any:
    """Rows ``index`` of the inputs: a tensor, or a dict of part columns."""
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def call(model: nn.Module, inputs: Any) -> Tensor:
    """The user's forward: ``model(**inputs)`` for a tokenizer's dict, ``model(inputs)`` for a tensor."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


class Examples(Dataset):
    """Item i: (example i's inputs, its label); a dict of parts when the inputs are a dict of columns."""

    def __init__(self, x: Any, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        return ({k: v[i] for k, v in self.x.items()} if isinstance(self.x, dict) else self.x[i]), self.y[i]


def resnet_model() -> nn.Module:
    torch.manual_seed(1234)
    model = resnet18(num_classes=CLASSES)
    # torchvision's ResNet as written is refused at step 0 by the program loader: ReLU(inplace=True)
    # exports as aten.relu_ (not on the allowlist) and BasicBlock's ``out += identity`` as an in-place
    # aten.add_ on an activation ("may only update a buffer"). The out-of-place forms compute the
    # same values; the parameters and module names are unchanged.
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
        if isinstance(m, BasicBlock):
            m.forward = types.MethodType(_basic_block_forward, m)
    return eval_batchnorm(model)


def _basic_block_forward(self: BasicBlock, x: Tensor) -> Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


def eval_batchnorm(model: nn.Module) -> nn.Module:
    # Training mode, BatchNorm on running statistics: what govern accepts (examples stay independent).
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def vit_model() -> nn.Module:
    torch.manual_seed(1234)
    return vit(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=CLASSES)


def image_data(n: int) -> tuple[Tensor, Tensor]:
    """Gaussian images labelled by the nearest of ten fixed random prototypes (a learnable rule)."""
    g = torch.Generator().manual_seed(2025)
    protos = torch.randn(CLASSES, 3 * 32 * 32, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.5 * protos[y] + torch.randn(n, 3 * 32 * 32, generator=g)
    return x.view(n, 3, 32, 32).contiguous(), y


MODELS: dict[str, dict[str, Any]] = {
    "bert": {"make": bert_model, "data": bert_data, "n": 384, "batch": 16,
             "describe": f"transformers BertForSequenceClassification from BertConfig: 4 layers, hidden 128, 4 heads, "
                         f"ff 512, vocab {VOCAB}, seq len {SEQ}, dropout 0.1 (HF default)",
             "data_describe": f"synthetic token ids, lengths 8..{SEQ} right-padded with {PAD}"},
    "resnet18": {"make": resnet_model, "data": image_data, "n": 320, "batch": 16,
                 "describe": "tests/archs.py resnet18 (torchvision names), 10 classes, BatchNorm in eval mode",
                 "data_describe": "synthetic 3x32x32 images, nearest-prototype labels"},
    "vit": {"make": vit_model, "data": image_data, "n": 320, "batch": 32,
            "describe": "tests/archs.py VisionTransformer (timm names): img 32, patch 8, dim 64, depth 4, 4 heads",
            "data_describe": "synthetic 3x32x32 images, nearest-prototype labels"},
}


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)


# -- the two loops ------------------------------------------------------------------------------


class Plain:
    """The user's loop as written, on the same batches the governed run draws (its committed order)."""

    def __init__(self, name: str, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y
        self.model = MODELS[name]["make"]()
        self.opt = make_optimizer(self.model)
        self.batch = MODELS[name]["batch"]
        self.per_epoch = -(-len(y) // self.batch)
        self.orders: dict[int, Tensor] = {}
        self.step_no = 0

    def prefetch_order(self, upto_step: int) -> None:
        for e in range(upto_step // self.per_epoch + 1):
            if e not in self.orders:
                self.orders[e] = torch.tensor(epoch_order(SEED, e, len(self.y)), dtype=torch.int64)

    def steps(self, k: int) -> None:
        model, opt, b = self.model, self.opt, self.batch
        for _ in range(k):
            e, p = divmod(self.step_no, self.per_epoch)
            index = self.orders[e][p * b : (p + 1) * b]
            inputs, labels = rows(self.x, index), self.y[index]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(call(model, inputs), labels)
            loss.backward()
            opt.step()
            float(loss.detach())
            self.step_no += 1


class Governed:
    """The same loop after the example's added lines: a project, ``gradledger.govern``, close."""

    def __init__(self, name: str, x: Tensor, y: Tensor, root: Path) -> None:
        self.path = root / f"{name}-project"
        with gradledger.Project.init(self.path, TAXONOMY) as project:
            project.label(x, y.tolist(), source="dr-lee", name=name)
        model = MODELS[name]["make"]()
        opt = make_optimizer(model)
        data = Examples(x, y) if isinstance(x, dict) else TensorDataset(x, y)
        loader = DataLoader(data, batch_size=MODELS[name]["batch"], shuffle=True)
        self.project = gradledger.Project.open(self.path)
        self.model, self.opt, self.loader = gradledger.govern(
            model, opt, loader, project=self.project, dataset=name, run_id=f"bench-{name}",
            checkpoint_every=CHECKPOINT_EVERY, seed=SEED, order="committed")
        self.model.train()
        self._it: Iterator[Any] = iter(self.loader)

    def steps(self, k: int) -> None:
        model, opt = self.model, self.opt
        for _ in range(k):
            try:
                inputs, labels = next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                inputs, labels = next(self._it)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(call(model, inputs), labels)
            loss.backward()
            opt.step()
            float(loss.detach())

    def close(self) -> None:
        self.model.run.close()
        self.project.close()


def same_start(g: Governed, p: Plain) -> None:
    ga, pa = g.model.model.state_dict(), p.model.state_dict()
    assert ga.keys() == pa.keys() and all(torch.equal(ga[n], pa[n]) for n in ga), "initial weights differ"


# -- step time and replay -----------------------------------------------------------------------


def time_model(name: str, rounds: int, k: int, sub: int, root: Path, replay: bool) -> dict[str, Any]:
    x, y = MODELS[name]["data"](MODELS[name]["n"])
    t0 = time.perf_counter()
    gov = Governed(name, x, y, root)
    setup_s = time.perf_counter() - t0
    plain = Plain(name, x, y)
    same_start(gov, plain)
    plain.prefetch_order((rounds + 1) * k + 1)
    det = torch.are_deterministic_algorithms_enabled()
    assert det, "govern should have turned deterministic algorithms on"
    gov_total = 0.0

    def run_plain(n: int) -> float:
        torch.use_deterministic_algorithms(False)
        try:
            t = time.perf_counter()
            plain.steps(n)
            return time.perf_counter() - t
        finally:
            torch.use_deterministic_algorithms(det)

    def run_gov(n: int) -> float:
        nonlocal gov_total
        t = time.perf_counter()
        gov.steps(n)
        dt = time.perf_counter() - t
        gov_total += dt
        return dt

    w_g = run_gov(k)
    w_p = run_plain(k)
    log(f"{name}: setup {setup_s:.1f} s; warm-up governed {1e3 * w_g / k:.1f} ms/step, plain {1e3 * w_p / k:.1f} ms/step")
    gms, pms, ratios = [], [], []
    for r in range(rounds):
        g = p = 0.0
        for j in range(k // sub):
            if (r + j) % 2 == 0:
                g += run_gov(sub)
                p += run_plain(sub)
            else:
                p += run_plain(sub)
                g += run_gov(sub)
        gms.append(1e3 * g / k)
        pms.append(1e3 * p / k)
        ratios.append(g / p)
        log(f"{name} round {r + 1}/{rounds}: governed {gms[-1]:.1f} ms/step  plain {pms[-1]:.1f} ms/step  "
            f"ratio {ratios[-1]:.3f}")
    steps = (rounds + 1) * k
    assert gov.model.run.step == steps
    gov.close()
    out: dict[str, Any] = {
        "ratio": statistics.median(ratios), "governed_ms": statistics.median(gms), "plain_ms": statistics.median(pms),
        "ratios": [round(v, 4) for v in ratios], "setup_s": setup_s, "steps": steps, "governed_train_s": gov_total,
        "params": sum(p.numel() for p in plain.model.parameters()), "examples": len(y),
    }
    if replay:
        out.update(replay_run(name, gov.path, root, gov_total))
    return out


def replay_run(name: str, project: Path, root: Path, train_s: float) -> dict[str, Any]:
    with gradledger.Project.open(project, writable=False) as p:
        bundle = root / f"{name}.glb"
        export_bundle(p.ledger, bundle, with_data=True)
        trust = p.trust_file
    verify = str(Path(sys.executable).with_name("gradledger-verify"))
    cmd = [verify, str(bundle), "--trust", str(trust), "--replay", "full", "--workers", "1", "--json"]
    sandbox = "on"
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 2 and "sandbox" in proc.stdout + proc.stderr:
        # This machine cannot set the sandbox up: the same replay without it, stated in the JSON.
        log(f"{name}: sandbox unavailable ({(proc.stdout + proc.stderr).strip().splitlines()[-1][:200]}); --no-sandbox")
        sandbox = "off (unavailable here)"
        t = time.perf_counter()
        proc = subprocess.run(cmd + ["--no-sandbox"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"gradledger-verify gave no JSON (exit {proc.returncode}):\n{proc.stderr[-3000:]}") from None
    figures = report.get("figures", {})
    # No replay figure when the verifier failed before finishing replay: null in the JSON, never NaN.
    seconds = float(figures["replay_seconds"]) if "replay_seconds" in figures else None
    segments = float(figures["replay_segment_seconds"]) if "replay_segment_seconds" in figures else None
    log(f"{name}: verify exit {proc.returncode}, verdict {report.get('verdict')!r}, replay {seconds} s "
        f"({figures.get('replayed_steps')} steps), verifier wall {wall:.1f} s, governed training {train_s:.1f} s")
    return {
        "replay_seconds": seconds, "verify_wall_s": wall, "verdict": report.get("verdict"),
        "verify_exit": proc.returncode, "replayed_steps": figures.get("replayed_steps"), "sandbox": sandbox,
        "replay_vs_train": None if seconds is None else seconds / train_s, "bundle_mb": bundle.stat().st_size / 1e6,
        "replay_segment_seconds": segments, "segments_vs_train": None if segments is None else segments / train_s,
        "first_failure": report.get("first_failure"),
    }


# -- peak memory (one subprocess per variant) -----------------------------------------------------


def mem_child(name: str, variant: str, steps: int) -> None:
    x, y = MODELS[name]["data"](MODELS[name]["n"])
    model, opt = MODELS[name]["make"](), None
    opt = make_optimizer(model)
    del model, opt
    base_kb = _status_kb("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "governed":
            runner: Any = Governed(name, x, y, Path(tmp))
        else:
            runner = Plain(name, x, y)
            runner.prefetch_order(steps + 1)
        setup_hwm_kb = _status_kb("VmHWM")
        reset = _reset_hwm()
        runner.steps(steps)
        train_hwm_kb = _status_kb("VmHWM")
        if variant == "governed":
            assert runner.model.run.step == steps and steps >= CHECKPOINT_EVERY
            runner.close()
    print(json.dumps({"baseline_mb": base_kb / 1024, "setup_peak_mb": setup_hwm_kb / 1024,
                      "train_peak_mb": train_hwm_kb / 1024, "hwm_reset": reset}))


def measure_memory(name: str, steps: int) -> dict[str, Any]:
    out = {}
    for variant in ("plain", "governed"):
        proc = subprocess.run([sys.executable, __file__, "--mem-child", name, variant, "--mem-steps", str(steps)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {name}/{variant} failed:\n{proc.stderr[-4000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"{name} {variant} memory: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in out[variant].items()))
    g, p = out["governed"], out["plain"]
    if not (g["hwm_reset"] and p["hwm_reset"]):
        raise RuntimeError("could not reset the RSS high-water mark; training-phase peaks unavailable")
    return {"ratio": g["train_peak_mb"] / p["train_peak_mb"], "governed_mb": g["train_peak_mb"],
            "plain_mb": p["train_peak_mb"], "baseline_mb": (g["baseline_mb"] + p["baseline_mb"]) / 2,
            "governed_setup_peak_mb": g["setup_peak_mb"], "steps": steps}


# -- LoRA through peft, governed by GovernedTrainer -----------------------------------------------

LORA_N, LORA_BATCH = 384, 16
LORA_DESCRIBE = (f"peft LoRA (r 8, alpha 16, dropout 0.05, on c_attn and c_proj; score head trained) on transformers "
                 f"GPT2ForSequenceClassification from GPT2Config: 4 layers, n_embd 128, 4 heads, vocab {VOCAB}, "
                 f"seq len {SEQ}")


def lora_model() -> nn.Module:
    torch.manual_seed(1234)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=4, n_head=4, n_positions=SEQ,
                                  num_labels=CLASSES, pad_token_id=PAD)
    return peft.get_peft_model(transformers.GPT2ForSequenceClassification(cfg),
                               peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05,
                                               target_modules=["c_attn", "c_proj"]))


class TokenItems(Dataset):
    """What a tokenizer gives a Trainer: dict items of padded tensors with a ``labels`` column."""

    def __init__(self, x: dict[str, Tensor], y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**{k: v[i] for k, v in self.x.items()}, "labels": self.y[i]}


class StepClock(transformers.TrainerCallback if transformers is not None else object):  # type: ignore[misc]
    """When the loop begins, each optimizer step ends, and the loop ends; optionally resets the RSS
    high-water mark when the loop begins (after the Trainer's and the governance's setup)."""

    def __init__(self, reset_hwm: bool = False) -> None:
        self.reset_hwm, self.reset_ok = reset_hwm, False
        self.begin = self.end = 0.0
        self.ends: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.reset_hwm:
            self.reset_ok = _reset_hwm()
        self.begin = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.end = time.perf_counter()

    def ms_per_step(self) -> float:
        """Mean time between step ends after the first step: every part of the loop, warm-up left out."""
        return 1e3 * (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)


def lora_trainer(governed: bool, root: Path, steps: int, run_id: str, clock: StepClock) -> Any:
    from gradledger.training.integrations.huggingface import GovernedTrainer

    x, y = bert_data(LORA_N)
    args = transformers.TrainingArguments(
        output_dir=str(root / "hf"), per_device_train_batch_size=LORA_BATCH, max_steps=steps, learning_rate=LR,
        weight_decay=WD, max_grad_norm=1.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        seed=SEED, disable_tqdm=True)
    if not governed:
        torch.use_deterministic_algorithms(False)  # torch's default, as the plain side of every bench here
        return transformers.Trainer(model=lora_model(), args=args, train_dataset=TokenItems(x, y), callbacks=[clock])
    project = root / "lora-project"
    if not project.exists():
        with gradledger.Project.init(project, TAXONOMY) as p:
            p.label(x, y.tolist(), source="dr-lee", name="lora")
    return GovernedTrainer(model=lora_model(), args=args, train_dataset=TokenItems(x, y), callbacks=[clock],
                           project=project, dataset="lora", run_id=run_id, checkpoint_every=CHECKPOINT_EVERY)


def time_lora(rounds: int, k: int, root: Path, replay: bool) -> dict[str, Any]:
    """Rounds of one plain Trainer run and one GovernedTrainer run of ``k`` steps each (which goes first
    alternates); each run's ms/step between its step ends; the median of the rounds' ratios."""
    gms, pms, ratios, gov_train_s = [], [], [], 0.0
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        times = {}
        for governed in ((True, False) if r % 2 == 0 else (False, True)):
            clock = StepClock()
            trainer = lora_trainer(governed, root, k, f"lora-{r}", clock)
            trainer.train()
            times[governed] = clock.ms_per_step()
            if governed:
                gov_train_s += clock.end - clock.begin
        if r == 0:
            log(f"lora: warm-up governed {times[True]:.1f} ms/step, plain {times[False]:.1f} ms/step")
            continue
        gms.append(times[True])
        pms.append(times[False])
        ratios.append(times[True] / times[False])
        log(f"lora round {r}/{rounds}: governed {gms[-1]:.1f} ms/step  plain {pms[-1]:.1f} ms/step  "
            f"ratio {ratios[-1]:.3f}")
    model = lora_model()
    out: dict[str, Any] = {
        "ratio": statistics.median(ratios), "governed_ms": statistics.median(gms), "plain_ms": statistics.median(pms),
        "ratios": [round(v, 4) for v in ratios], "steps": (rounds + 1) * k, "governed_train_s": gov_train_s,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "examples": LORA_N,
    }
    if replay:
        out.update(replay_run("lora", root / "lora-project", root, gov_train_s))
    return out


def lora_mem_child(variant: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clock = StepClock(reset_hwm=True)
        trainer = lora_trainer(variant == "governed", Path(tmp), steps, "lora-mem", clock)
        base_kb = _status_kb("VmRSS")
        trainer.train()
        print(json.dumps({"baseline_mb": base_kb / 1024, "setup_peak_mb": 0.0,
                          "train_peak_mb": _status_kb("VmHWM") / 1024, "hwm_reset": clock.reset_ok}))



# -- lines added --------------------------------------------------------------------------------


def lines_added(path: Path = EXAMPLE) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.rstrip().endswith("# gradledger"))


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per model")
    parser.add_argument("--steps", type=int, default=CHECKPOINT_EVERY,
                        help=f"governed (and plain) steps per round, a multiple of {CHECKPOINT_EVERY}")
    parser.add_argument("--sub", type=int, default=5, help="steps per interleaved sub-block")
    parser.add_argument("--mem-steps", type=int, default=CHECKPOINT_EVERY, help="steps per memory child")
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS) + ["lora"])
    parser.add_argument("--skip-mem", action="store_true")
    parser.add_argument("--skip-replay", action="store_true")
    parser.add_argument("--mem-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mem_child:
        if args.mem_child[0] == "lora":
            lora_mem_child(args.mem_child[1], args.mem_steps)
        else:
            mem_child(args.mem_child[0], args.mem_child[1], args.mem_steps)
        return
    if args.steps % CHECKPOINT_EVERY or args.steps % args.sub:
        raise SystemExit(f"--steps must be a multiple of {CHECKPOINT_EVERY} and of --sub")
    started = time.perf_counter()
    load_before = load_average()
    names = list(args.only or ["bert", "resnet18", "vit", "lora"])
    skipped = {}
    for name, missing in (("bert", transformers is None), ("lora", transformers is None or peft is None)):
        if missing and name in names:
            names.remove(name)
            skipped[name] = "transformers or peft is not installed (pip install -e '.[lora]')"
    result: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                if name == "lora":
                    t = time_lora(args.rounds, args.steps, Path(tmp), not args.skip_replay)
                else:
                    t = time_model(name, args.rounds, args.steps, args.sub, Path(tmp), not args.skip_replay)
                m = None if args.skip_mem else measure_memory(name, args.mem_steps)
            except Exception as exc:  # one model's failure is reported, the others still measured
                log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                result[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                continue
            result[f"{name}_step_ratio"] = round(t["ratio"], 4)
            if m is not None:
                result[f"{name}_mem_ratio"] = round(m["ratio"], 4)
            if "replay_vs_train" in t:
                rvt = t["replay_vs_train"]
                result[f"{name}_replay_vs_train"] = None if rvt is None else round(rvt, 4)
                result[f"{name}_bit_exact"] = t["verdict"] == "exact"
                svt = t["segments_vs_train"]
                result[f"{name}_segments_vs_train"] = None if svt is None else round(svt, 4)
            spec = MODELS.get(name, {"batch": LORA_BATCH, "describe": LORA_DESCRIBE,
                                     "data_describe": MODELS["bert"]["data_describe"]})
            detail[name] = {
                "governed_ms_per_step": round(t["governed_ms"], 2), "plain_ms_per_step": round(t["plain_ms"], 2),
                "round_ratios": t["ratios"], "params": t["params"], "examples": t["examples"],
                "batch": spec["batch"], "governed_steps": t["steps"],
                "governed_train_s": round(t["governed_train_s"], 2), "model": spec["describe"],
                "data": spec["data_describe"],
            }
            if "setup_s" in t:
                detail[name]["setup_s"] = round(t["setup_s"], 2)
            if "trainable" in t:
                detail[name].update(trainable_params=t["trainable"],
                                    loop="transformers.Trainer vs GovernedTrainer, same TrainingArguments: AdamW "
                                         f"lr {LR} wd {WD}, max_grad_norm 1.0, batch {LORA_BATCH}; one run of "
                                         f"--steps steps per variant per round, ms/step between step ends")
            if "replay_vs_train" in t:
                detail[name].update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in t.items()
                                     if k in ("replay_seconds", "verify_wall_s", "verdict", "verify_exit",
                                              "replayed_steps", "sandbox", "bundle_mb", "first_failure",
                                              "replay_segment_seconds")})
            if m is not None:
                detail[name].update({"governed_peak_mb": round(m["governed_mb"], 1),
                                     "plain_peak_mb": round(m["plain_mb"], 1),
                                     "common_baseline_mb": round(m["baseline_mb"], 1),
                                     "governed_setup_peak_mb": round(m["governed_setup_peak_mb"], 1),
                                     "mem_steps": m["steps"]})
    result["lines_added"] = lines_added()
    result["lines_added_file"] = str(EXAMPLE.relative_to(ROOT))
    result["hf_trainer_lines_added"] = lines_added(HF_EXAMPLE)
    result["lightning_lines_added"] = lines_added(LIGHTNING_EXAMPLE)
    result["models"] = detail
    if skipped:
        result["skipped"] = skipped
    result["bert_inputs"] = "input_ids and attention_mask, a dict per example (a model of parts), called model(**inputs)"
    result["vit_source"] = ("tests/archs.py re-implementation with timm's module names: timm imports torchvision, "
                            "whose registry build is CUDA-only and breaks the CPU torch here")
    result["config"] = {
        "rounds": args.rounds, "steps_per_round": args.steps, "sub_block": args.sub, "mem_steps": args.mem_steps,
        "checkpoint_every": CHECKPOINT_EVERY, "optimizer": f"AdamW lr {LR} wd {WD}", "loss": "F.cross_entropy",
        "order": "committed (seeded); plain indexes the same order", "bands": "default_layout: head, mid, deep",
        "policy": "examples/taxonomy.toml; every example labelled by dr-lee (experts: profile [1, 1, 1])",
        "torch": torch.__version__, "transformers": getattr(transformers, "__version__", None),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "plain_deterministic_algorithms": False, "governed_deterministic_algorithms": True,
        "step_ratio": "median over rounds of governed/plain time, interleaved sub-blocks, after one warm-up block each",
        "mem_ratio": "training-phase VmHWM, HWM reset after setup, fresh subprocess per variant",
        "replay_vs_train": "gradledger-verify --replay full --workers 1 figures.replay_seconds / summed governed "
                           "step time of the same steps (warm-up included)",
        "segments_vs_train": "the same over figures.replay_segment_seconds: the segments' own time in the worker "
                             "(program load, proofs, restore, steps, final comparison), without the worker's start "
                             "(Python and torch imports), as the governed time is without the training process's",
    }
    result["load_before"] = load_before
    result["load_after"] = load_average()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
