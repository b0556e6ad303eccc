"""`gradledger demo --out DIR`: the whole story on scikit-learn's bundled digits, in under two minutes.

1. An authority taxonomy under the governance root ``acme``: expert reviewers (single, confident),
   crowd annotators with consensus (one of them, ``worker-4``, swaps 3 and 8), and heuristic
   labeling functions imported as a Snorkel-style label matrix.
2. A root-signed routing policy: experts write into every band, crowd consensus into the head and
   half into the mid band, heuristics and low-consensus crowd labels into the head only.
3. Governed training of a small MLP, every step a signed GovernedUpdate, checkpoints every N steps,
   the inputs stored in the ledger so that anyone can replay from it alone. A canary set rides along
   (specs/dynamics.md §4): every checkpoint's memorization scan ranks the trained canaries' losses
   among reference canaries that train nothing.
4. The crowd authority retires ``worker-4``; exact unlearning replays without it; the run is
   exported to ``DIR/run.glb`` and the standalone verifier checks it as a regulator would, from
   the bundle and ``DIR/roots.pub`` only, in a subprocess.
5. ``DIR/report.html`` and ``DIR/report.json``: update norms per band by authority class, test
   accuracy and the 3<->8 confusion before and after unlearning, and what the verifier checked.

Retirement, unlearning, export and verification are separate stages, each calling the module
that implements it. A stage whose module is missing (or fails) is reported as such, in the
terminal and in the report, and the demo goes on with what it has.
"""

from __future__ import annotations

import os
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger import credentials as C
from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.errors import UnusableInput
from gradledger.ledger.keys import SigningKey, write_public_keys
from gradledger.ledger.ledger import Ledger

from .bands import sequential_bands
from .checkpoints import read_checkpoint
from .dataset import CommittedDataset, commit_dataset
from .dynamics.canaries import canary_manifests, draw_canaries, exposure_bits
from .dynamics.memorization import MemorizationScan
from .forensics import trace
from .forensics.lineage import Lineage
from .manifests import SignedManifest, example_id, label_example, source_entry
from .policy import SignedPolicy, sign_policy
from .retirement import retire
from .snorkel import import_label_matrix
from .dynamics.profiles import DepthProfiles
from .trainer import Governance
from .unlearning import unlearn

ROOT_PATH = "acme"
#: Authority classes, in the order the report draws them.
CLASSES = ("experts", "crowd", "heuristics")
CLASS_PATHS = {c: f"{ROOT_PATH}/{c}" for c in CLASSES}
EXPERTS = {"dr-lee": "acme/experts/reviewers", "dr-okafor": "acme/experts/reviewers"}
WORKERS = {f"worker-{i}": "acme/crowd/pool" for i in range(1, 5)}
LFS = {"lf-centroid": "acme/heuristics/lfs", "lf-top-half": "acme/heuristics/lfs", "lf-bottom-half": "acme/heuristics/lfs"}
FAULTY = "worker-4"
#: The held-out set the run's depth profiles read (the test digits, labeled by an expert).
HELD_OUT = "digits-heldout"
SWAP = (3, 8)
#: The digits a labeling platform would send to its specialist queue.
LOOKALIKES = (3, 5, 8, 9)
BANDS = ("head", "mid", "embedding")
ONTOLOGY = "digits-v1"
RUN_ID = "digits-demo"
#: A canary set (specs/dynamics.md §4): inserted canaries trained, references never; every scan ranks them.
CANARY_SOURCE, CANARY_PATH = "canary", f"{ROOT_PATH}/experts/canaries"
CANARY_COUNT, CANARY_REFERENCES = 8, 64
REPLAY_MODES = ("full", "sample", "certificates", "none")


class DemoError(UnusableInput):
    """The demo cannot run with the arguments it was given."""


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    steps: int = 1000
    batch_size: int = 64
    checkpoint_every: int = 100
    seed: int = 7
    hidden: int = 128
    lr: float = 0.01
    #: What the verifier replays (its --replay).
    replay: str = "full"
    #: Stage lines and the progress bar go to stderr; False silences both.
    progress: bool = True

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.hidden < 1:
            raise DemoError("--steps, --batch-size, --checkpoint-every and --hidden must be positive")
        if self.replay not in REPLAY_MODES:
            raise DemoError(f"--replay must be one of {', '.join(REPLAY_MODES)}, not {self.replay!r}")


# -- the stages' outcome -------------------------------------------------------------------------


@dataclass
class Stage:
    """What one stage did: ``ok``, ``failed``, or ``skipped`` (a stage it needs failed).

    Every stage's module is imported with the demo (issue 9): none is optional, so none can be
    "not there yet" and silently left out."""

    name: str
    status: str
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 2)}


class Console:
    """Stage lines on stderr (the terminal summary goes to stdout)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                    disable=None if self.enabled else True)


def run_stage(console: Console, name: str, work: Callable[[], tuple[str, dict[str, Any]]]) -> Stage:
    """Run one stage: its error is reported (and makes the demo fail), never raised, so that the
    stages after it still show what they can."""
    console.line(f"{name} ...")
    t0 = time.perf_counter()
    try:
        detail, data = work()
        stage = Stage(name, "ok", detail, data=data)
    except Exception as exc:  # another module's bug must not hide what the other stages showed
        stage = Stage(name, "failed", f"{type(exc).__name__}: {exc}")
    stage.seconds = time.perf_counter() - t0
    console.line(f"{name}: {stage.status.upper() if stage.status != 'ok' else 'ok'} ({stage.detail})")
    return stage


# -- the authority taxonomy ---------------------------------------------------------------------


@dataclass
class Taxonomy:
    root: SigningKey
    trainer: SigningKey
    authorities: dict[str, SigningKey]  # class -> authority key
    sources: dict[str, SigningKey]  # source name -> key
    credentials: list[tuple[C.Credential, SigningKey]]  # in issuing order, with the issuer's key
    source_credentials: dict[str, C.Credential]


def make_taxonomy() -> Taxonomy:
    root, trainer = SigningKey.generate("acme-root"), SigningKey.generate("trainer")
    authorities = {c: SigningKey.generate(c) for c in CLASSES}
    creds: list[tuple[C.Credential, SigningKey]] = [
        (C.issue_root(root, subject="acme-root", path=ROOT_PATH), root),
        (C.issue(root, subject="trainer", path=f"{ROOT_PATH}/training", role="trainer",
                 public_key=trainer.public_key), root),
    ]
    for c, key in authorities.items():
        creds.append((C.issue(root, subject=c, path=CLASS_PATHS[c], role="authority", public_key=key.public_key), root))
    sources: dict[str, SigningKey] = {}
    source_creds: dict[str, C.Credential] = {}
    for c, members in zip(CLASSES, (EXPERTS, WORKERS, LFS)):
        for name, path in members.items():
            sources[name] = key = SigningKey.generate(name)
            cred = C.issue(authorities[c], subject=name, path=path, role="source", public_key=key.public_key)
            source_creds[name] = cred
            creds.append((cred, authorities[c]))
    # The canaries' source: an expert path, so the inserted ones train every band (the most exposed route).
    sources[CANARY_SOURCE] = key = SigningKey.generate(CANARY_SOURCE)
    source_creds[CANARY_SOURCE] = cred = C.issue(authorities["experts"], subject=CANARY_SOURCE, path=CANARY_PATH,
                                                 role="source", public_key=key.public_key)
    creds.append((cred, authorities["experts"]))
    return Taxonomy(root, trainer, authorities, sources, creds, source_creds)


def save_keys(tax: Taxonomy, out: Path) -> None:
    """Private keys (0600, in a 0700 folder) and the root's public key, the regulator's trust file."""
    keys = out / "keys"
    keys.mkdir(mode=0o700)
    for key in [tax.root, tax.trainer, *tax.authorities.values(), *tax.sources.values()]:
        key.save(keys / f"{key.label}.key")
    write_public_keys(out / "roots.pub", [(tax.root.public_key, "acme governance root")])


# -- data and labels ------------------------------------------------------------------------------


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: np.ndarray  # ground truth, never shown to the trainer
    x_test: torch.Tensor
    y_test: np.ndarray


def load_digits_split(seed: int) -> Digits:
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise DemoError("the demo needs scikit-learn (its bundled digits): pip install 'gradledger[demo]'") from None

    d = load_digits()
    order = np.random.RandomState(seed).permutation(len(d.target))
    cut = int(len(order) * 0.75)
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    tr, te = order[:cut], order[cut:]
    return Digits(x[tr].contiguous(), d.target[tr], x[te].contiguous(), d.target[te])


@dataclass
class Labels:
    manifests: list[SignedManifest]
    classes: list[str]  # per training row: the authority class that labeled it
    stats: dict[str, Any]


def _nearest_centroid_lf(x: np.ndarray, centroids: np.ndarray, margin: float) -> np.ndarray:
    d = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    two = np.sort(d, axis=1)[:, :2]
    vote = d.argmin(1)
    # Abstain unless the nearest class is clearly nearer than the runner-up.
    return np.where(two[:, 1] > (1.0 + margin) * two[:, 0], vote, -1)


def label_training_set(tax: Taxonomy, data: Digits, seed: int, at: int) -> Labels:
    """Manifests for every training row, from three classes of source (see the module docstring)."""
    rng = np.random.RandomState(seed + 1)
    x, truth = data.x_train.numpy(), data.y_train
    n = len(truth)
    perm = rng.permutation(n)
    n_exp, n_heur = int(0.2 * n), int(0.3 * n)
    expert_rows, heur_rows, crowd_rows = perm[:n_exp], perm[n_exp:n_exp + n_heur], list(perm[n_exp + n_heur:])
    manifests: dict[int, SignedManifest] = {}
    classes: dict[int, str] = {}

    experts = sorted(EXPERTS)
    for j, i in enumerate(sorted(expert_rows)):
        name = experts[j % len(experts)]
        src = [source_entry(tax.source_credentials[name], int(truth[i]), 0.95)]
        manifests[i] = label_example(example=example_id(data.x_train[i]), sources=src, aggregation="single",
                                     ontology=ONTOLOGY, review="accepted", key=tax.sources[name], time=at)
        classes[i] = "experts"

    # Labeling functions: nearest class centroids (of the expert-labeled seed set) on the whole
    # image and on each half; their accuracies on the seed set become their vote weights.
    seed_x, seed_y = x[expert_rows], truth[expert_rows]
    views = {"lf-centroid": slice(0, 64), "lf-top-half": slice(0, 32), "lf-bottom-half": slice(32, 64)}
    margins = {"lf-centroid": 0.15, "lf-top-half": 0.3, "lf-bottom-half": 0.3}
    rows = np.array(sorted(heur_rows))
    columns, accuracy = [], {}
    for name, view in views.items():
        centroids = np.stack([seed_x[seed_y == k][:, view].mean(0) for k in range(10)])
        on_seed = _nearest_centroid_lf(seed_x[:, view], centroids, margins[name])
        voted = on_seed >= 0
        accuracy[name] = round(float((on_seed[voted] == seed_y[voted]).mean()), 3)
        columns.append(_nearest_centroid_lf(x[rows][:, view], centroids, margins[name]))
    L = np.stack(columns, axis=1).astype(np.int64)
    names = list(views)
    imported = import_label_matrix(L, names, lf_credentials={k: tax.source_credentials[k] for k in names},
                                   ontology=ONTOLOGY, time=at, inputs=[data.x_train[i] for i in rows],
                                   signer=tax.authorities["heuristics"], lf_confidence=accuracy)
    for m, r in zip(imported.manifests, imported.rows):
        manifests[int(rows[r])] = m
        classes[int(rows[r])] = "heuristics"
    # Rows on which every function abstained go to the crowd, as a labeling platform would.
    crowd_rows += [int(rows[u.row]) for u in imported.unlabeled]

    workers = sorted(WORKERS)
    honest = [w for w in workers if w != FAULTY]
    panels = {1: 0, 2: 0, 3: 0}
    faulty_swaps = 0
    for i in sorted(crowd_rows):
        size = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        if int(truth[i]) in LOOKALIKES:
            # The platform sends look-alike digits (by its pre-label) to its specialist, worker-4.
            panel = [FAULTY, *rng.choice(honest, size=size - 1, replace=False)]
        else:
            panel = list(rng.choice(workers, size=size, replace=False))
        srcs = []
        for name in sorted(panel):
            y = int(truth[i])
            if name == FAULTY and y in SWAP:
                y = SWAP[1] if y == SWAP[0] else SWAP[0]
                faulty_swaps += 1
            elif rng.rand() < 0.03:  # honest workers slip now and then
                y = int(rng.randint(10))
            # Trust scores from the platform: the specialist looks better than anyone.
            srcs.append(source_entry(tax.source_credentials[name], y, 0.9 if name == FAULTY else 0.8))
        manifests[i] = label_example(example=example_id(data.x_train[i]), sources=srcs,
                                     aggregation="single" if size == 1 else "majority", ontology=ONTOLOGY,
                                     review="accepted", key=tax.authorities["crowd"], time=at)
        classes[i] = "crowd"
        panels[size] += 1

    ordered = [manifests[i] for i in range(n)]
    wrong = sum(1 for i, m in enumerate(ordered) if m.label != truth[i])
    stats = {
        "train": n, "test": len(data.y_test),
        "by_class": {c: sum(1 for i in range(n) if classes[i] == c) for c in CLASSES},
        "crowd_panels": {str(k): v for k, v in panels.items()},
        "lf_accuracy": accuracy,
        "lf_abstained_to_crowd": len(imported.unlabeled),
        "faulty_votes_swapped": faulty_swaps,
        "wrong_labels": wrong,
        "faulty_labeled": sum(1 for m in ordered if FAULTY in m.source_names),
    }
    return Labels(ordered, [classes[i] for i in range(n)], stats)


def routing_policy(tax: Taxonomy, at: int) -> SignedPolicy:
    """Experts everywhere; crowd consensus into head and half of mid; the rest the head only."""
    fields = {
        "name": "acme-digits-routing",
        "bands": list(BANDS),
        "rules": [
            {"name": "rejected", "match": {"review": ["rejected"]}, "profile": [0, 0, 0], "limits": [None, None, None]},
            # An example a checkpoint's memorization scan flags tunes the head only from then on
            # (specs/dynamics.md §2.4): what the model memorizes stays out of its deeper bands.
            {"name": "memorized", "match": {"memorized": True}, "profile": [1, 0, 0], "limits": [10.0, None, None]},
            {"name": "expert", "match": {"authority": CLASS_PATHS["experts"], "min_confidence": 0.9},
             "profile": [1, 1, 1], "limits": [None, 10.0, 10.0]},
            {"name": "crowd-consensus",
             "match": {"authority": CLASS_PATHS["crowd"], "aggregation": ["majority"], "min_consensus": 0.66},
             "profile": [1, 0.5, 0], "limits": [10.0, 5.0, None]},
            # The platform's trusted workers may work alone: their single labels count as consensus.
            {"name": "crowd-trusted", "match": {"authority": CLASS_PATHS["crowd"], "min_confidence": 0.85},
             "profile": [1, 0.5, 0], "limits": [10.0, 5.0, None]},
            {"name": "heuristic", "match": {"authority": CLASS_PATHS["heuristics"]},
             "profile": [1, 0, 0], "limits": [10.0, None, None]},
        ],
        # Single crowd labels and split panels: the head only.
        "default": {"profile": [1, 0, 0], "limits": [10.0, None, None]},
        # Every run under the policy scans itself for memorized examples at each checkpoint (the library's
        # default scan: the top 1% by mean recorded loss, specs/dynamics.md §1.1).
        "monitors": {"memorization": MemorizationScan().parameters},
    }
    return sign_policy(fields, tax.root, at)


# -- the ledger and training ----------------------------------------------------------------------


def make_model(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def open_ledger(path: Path, tax: Taxonomy) -> Ledger:
    ledger = Ledger.create(path)
    for cred, issuer in tax.credentials:
        ledger.append("CredentialIssued", {"credential": cred.signed}, issuer)
    ledger.commit()
    return ledger


def commit_training_set(ledger: Ledger, tax: Taxonomy, labels: Labels, data: Digits, seed: int, at: int
                        ) -> tuple[CommittedDataset, torch.Tensor]:
    """The labeled training digits and then the demo's canary set (specs/dynamics.md §4), committed with
    their inputs; the dataset and the inputs in its order."""
    canaries = draw_canaries(data.x_train, 10, count=CANARY_COUNT, references=CANARY_REFERENCES, seed=seed,
                             name="demo-canaries")
    signed = canary_manifests(canaries, key=tax.sources[CANARY_SOURCE], source=tax.source_credentials[CANARY_SOURCE],
                              ontology=ONTOLOGY, time=at)
    inputs = torch.cat([data.x_train, canaries.inputs])
    return commit_dataset(ledger, labels.manifests + signed, "digits-train", tax.trainer, inputs=inputs), inputs


def commit_held_out(ledger: Ledger, tax: Taxonomy, data: Digits, train: CommittedDataset, at: int) -> CommittedDataset:
    """The test digits, labeled with their ground truth by an expert and committed with their inputs as
    the run's held-out set: the depth profiles read the model's class evidence on them (specs/dynamics.md
    §5). A test digit whose pixels equal a training digit's is left out (held out means never trained)."""
    trained = {m.example for m in train.manifests}
    name = sorted(EXPERTS)[0]
    rows, signed = [], []
    for i in range(len(data.y_test)):
        ex = example_id(data.x_test[i])
        if ex in trained:
            continue
        rows.append(i)
        src = [source_entry(tax.source_credentials[name], int(data.y_test[i]), 1.0)]
        signed.append(label_example(example=ex, sources=src, aggregation="single", ontology=ONTOLOGY,
                                    review="accepted", key=tax.sources[name], time=at))
    return commit_dataset(ledger, signed, HELD_OUT, tax.trainer, inputs=data.x_test[rows])


def train(ledger: Ledger, tax: Taxonomy, ds: CommittedDataset, policy: SignedPolicy, inputs: torch.Tensor,
          cfg: DemoConfig, console: Console, profiles: DepthProfiles | None = None) -> list[float]:
    model = make_model(cfg.hidden, cfg.seed)
    optimizer = make_optimizer(model, cfg.lr)
    labels = torch.tensor([m.label for m in ds.manifests], dtype=torch.int64)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=cfg.batch_size, shuffle=True)
    engine = Governance(ledger, tax.trainer, dataset=ds, policy=policy, layout=sequential_bands(model),
                        run_id=RUN_ID, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, root_key=tax.root,
                        description="gradledger demo: digits MLP under the acme routing policy", profiles=profiles)
    gm, gopt, gloader = engine.make_governed(model, optimizer, loader)
    losses: list[float] = []
    gm.train()
    with console.bar(cfg.steps, "governed training") as bar:
        while engine.step < cfg.steps:
            for batch in gloader:
                gopt.zero_grad(set_to_none=True)
                loss = engine.criterion(gm(batch), batch.labels)
                loss.backward()
                gopt.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                if engine.step % 20 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if engine.step >= cfg.steps:
                    break
    engine.close()
    return losses


# -- evaluation -----------------------------------------------------------------------------------


def checkpoint_model(ledger: Ledger, seq: int, cfg: DemoConfig) -> nn.Sequential:
    """The user's model with the weights of the Checkpoint at ``seq``, each tensor digest-checked."""
    body = ledger.observation_of_type(seq, "Checkpoint", DemoError).body
    raw = ledger.artifact(body["artifact"])
    if raw is None:
        raise DemoError(f"checkpoint artifact of observation {seq} is not in the ledger")
    tensors, _ = read_checkpoint(raw, body)
    model = make_model(cfg.hidden, cfg.seed)
    model.load_state_dict({n.removeprefix("model."): t for n, t in tensors.items() if n.startswith("model.")})
    return model.eval()


def evaluate(model: nn.Module, data: Digits) -> dict[str, Any]:
    with torch.no_grad():
        pred = model(data.x_test).argmax(1).numpy()
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (data.y_test, pred), 1)
    a, b = SWAP
    return {
        "accuracy": round(float((pred == data.y_test).mean()), 4),
        "confusion": confusion.tolist(),
        "swap": {f"{a}->{b}": int(confusion[a, b]), f"{b}->{a}": int(confusion[b, a]),
                 f"{a}": int(confusion[a].sum()), f"{b}": int(confusion[b].sum())},
        "swap_errors": int(confusion[a, b] + confusion[b, a]),
    }


def band_series(ledger: Ledger, seqs: Sequence[int]) -> dict[str, Any]:
    """Per band, per authority class, the update norm over steps, split by the class's share of
    the band's writes (authority_writes: the sum of the routing multipliers of its examples)."""
    steps: list[int] = []
    series = {band: {c: [] for c in CLASSES} for band in BANDS}
    totals = {band: [] for band in BANDS}
    loss: list[float] = []
    for seq in seqs:
        body = ledger.observation(seq).body
        steps.append(body["step"])
        loss.append(body["loss"])
        writes = {c: [0.0] * len(BANDS) for c in CLASSES}
        for path, w in body["authority_writes"].items():
            cls = path.split("/")[1]
            if cls in writes:
                writes[cls] = [a + b for a, b in zip(writes[cls], w)]
        for k, band in enumerate(BANDS):
            norm = body["band_update_norms"][k]
            total = sum(writes[c][k] for c in CLASSES)
            totals[band].append(norm)
            for c in CLASSES:
                series[band][c].append(norm * writes[c][k] / total if total > 0 else 0.0)

    def short(values: list[float]) -> list[float]:
        return [float(f"{v:.4g}") for v in values]  # report.json stays small; the ledger has the exact values

    return {"steps": steps, "loss": short(loss),
            "by_class": {band: {c: short(v) for c, v in per.items()} for band, per in series.items()},
            "total": {band: short(v) for band, v in totals.items()}}


def run_updates(ledger: Ledger) -> list[int]:
    """GovernedUpdates of the original run (before any RunStarted of a later branch)."""
    runs = ledger.by_type("RunStarted")
    end = runs[1] if len(runs) > 1 else ledger.size
    return [s for s in ledger.by_type("GovernedUpdate") if s < end]


# -- the stages after training --------------------------------------------------------------------------


def write_query(data: Digits, out: Path, per_class: int = 32) -> Path:
    """The investigation's query: held-out test digits of the swapped classes, each against the other
    class ("3s read as 8 and 8s read as 3"), as query.json beside query.safetensors (specs/forensics.md §2)."""
    from safetensors.torch import save_file

    a, b = SWAP
    rows = [i for c in (a, b) for i in np.flatnonzero(data.y_test == c)[:per_class].tolist()]
    save_file({"x": data.x_test[rows].contiguous()}, str(out / "query.safetensors"))
    targets = [b if int(data.y_test[i]) == a else a for i in rows]
    query = {"description": f"{a}s read as {b} and {b}s read as {a}", "inputs": {"file": "query.safetensors"},
             "target": targets, "against": [int(data.y_test[i]) for i in rows]}
    (out / "query.json").write_text(json.dumps(query) + "\n", encoding="utf-8")
    return out / "query.json"


def stage_trace(ledger: Ledger, query: Path, tax: Taxonomy, console: Console) -> tuple[str, dict[str, Any]]:
    """Who taught the model the confusion: `gradledger trace` over the original run, before retirement,
    recorded as a signed ForensicTrace (the verifier recomputes it: --check-traces)."""
    steps = len(run_updates(ledger))
    with console.bar(steps, "tracing the confusion") as bar:
        report = trace(ledger, str(query), run_id=RUN_ID, method="replay", top=8, record=tax.trainer,
                       progress=lambda step: bar.update(1))
    top = report["sources"][0]
    detail = (f"{top['source']} ({top['path']}) ranks first: {top['share']:.0%} of the influence toward the confusion, "
              f"score {top['score']:.3g} ± {top['stderr']:.2g}, first in {top['p_top']:.0%} of bootstrap resamples; "
              f"recorded as ForensicTrace {report['record']['seq']}")
    command = f"gradledger trace {ledger.path} --query {query} --record --key {ledger.path.parent / 'keys' / 'trainer.key'}"
    return detail, {"report": report, "top": top["source"], "command": command}


def stage_feedback(ledger: Ledger, out: Path) -> tuple[str, dict[str, Any]]:
    """What to review next (`gradledger feedback`, specs/dynamics.md §3), before the retirement: the run's
    examples ranked by the evidence that their labels need a second look, the top 5% written for Label
    Studio; and the memorization scan the run recorded at its last checkpoint."""
    from .dynamics.export import render
    from .dynamics.feedback import priorities, summarize
    from .dynamics.scan import memorized_routing

    lin, items = priorities(ledger, run_id=RUN_ID)
    top = -(-len(items) // 20)
    path = out / "feedback.json"
    path.write_text(render(items[:top], "labelstudio", keys={}, classes=None, run=RUN_ID,
                           steps=len(lin.run.updates)), encoding="utf-8")
    sums = summarize(items, top)
    lead = sums["sources"][0]
    scans = [s for s in ledger.by_type("MemorizationScan") if ledger.observation(s).body["run"] == lin.run.seq]
    scan = ledger.observation(scans[-1]).body if scans else None
    detail = (f"{top} examples to review first written to {path.name}; {lead['name']} supplied {lead['prioritized']} "
              f"of them ({lead['share']:.0%} of its {lead['trained']} examples)")
    if scan is not None:
        detail += (f"; the last checkpoint's MemorizationScan flags {len(scan['flagged'])} of {scan['scored']} examples "
                   f"({scan['method']})")
    canaries = None
    if scan is not None and scan.get("canaries"):
        c = scan["canaries"][0]
        ranks = [r for _, r in c["inserted"] if r is not None]
        if ranks and c["references"]:
            canaries = {"set": c["set"], "inserted": len(c["inserted"]), "references": c["references"],
                        "ranks": ranks, "bound_bits": exposure_bits(1, c["references"]),
                        "mean_exposure_bits": sum(exposure_bits(r, c["references"]) for r in ranks) / len(ranks)}
            detail += (f"; its {canaries['inserted']} canaries have a mean exposure of "
                       f"{canaries['mean_exposure_bits']:.2f} bits of at most {canaries['bound_bits']:.2f}")
    routed = memorized_routing(ledger, lin.run.settings, lin.run.updates)
    if routed is not None:
        detail += (f"; the policy's memorized rule routed {routed['examples']} flagged examples to the head only, "
                   f"{routed['trainings']} times in all")
    examples = [{"index": e.index, "label": e.label, "sources": e.sources, "priority": e.priority,
                 "reasons": e.reasons} for e in items[:10]]
    memorized = [] if scan is None else [
        {"index": i, "score": v, "label": int(lin.fields[i]["label"]),
         "sources": sorted({x["source"] for x in lin.fields[i]["sources"]})} for i, v in scan["flagged"]]
    depth = depth_figures(ledger, lin)
    if depth is not None:
        worst = sorted(range(len(depth["classes"])), key=lambda i: -depth["last"][-1][i])[:2]
        detail += (f"; {len(depth['steps'])} depth profiles: at the last checkpoint the head's evidence holds "
                   f"{depth['last_mean'][0]:.2f} bits of at most {depth['top_bits']:.2f}, the deepest band's "
                   f"{depth['last_mean'][-1]:.2f}; most confused at depth: digits "
                   + " and ".join(str(depth["classes"][i]) for i in worst))
    command = f"gradledger feedback {ledger.path} --format labelstudio -o {path}"
    return detail, {"written": top, "trained": len(items), "file": path.name, "examples": examples,
                    "sources": sums["sources"], "classes": sums["classes"], "memorized": memorized,
                    "memorized_method": None if scan is None else scan["method"], "memorized_routing": routed,
                    "canaries": canaries, "depth": depth, "command": command}


def depth_figures(ledger: Ledger, lin: Lineage) -> dict[str, Any] | None:
    """The run's DepthProfiles (specs/dynamics.md §5) for the report: per band and class the entropy at
    the first and the last checkpoint, and each band's mean at every checkpoint; None without profiles."""
    from .dynamics.feedback import run_profiles

    bodies = run_profiles(ledger, lin)
    if not bodies:
        return None
    classes = bodies[-1]["classes"]
    return {"bands": [b["name"] for b in lin.run.settings["bands"]["bands"]], "classes": classes,
            "top_bits": math.log2(len(classes)) if len(classes) > 1 else 0.0,
            "steps": [b["step"] for b in bodies], "means": [b["mean"] for b in bodies],
            "first": bodies[0]["entropy"], "last": bodies[-1]["entropy"], "last_mean": bodies[-1]["mean"],
            "held_out": sum(bodies[-1]["counts"])}


def stage_retire(ledger: Ledger, tax: Taxonomy, reason: str) -> tuple[str, dict[str, Any]]:
    """The crowd authority, which issued the faulty worker's credential, signs its retirement."""
    done = retire(ledger, FAULTY, tax.authorities["crowd"], reason)
    return (f"SourceRetired for {FAULTY} (credential {done.key_id.hex()[:12]}) at seq {done.seq}, signed by the "
            "crowd authority", {"seq": done.seq})


def stage_unlearn(ledger: Ledger, tax: Taxonomy, cfg: DemoConfig, console: Console) -> tuple[str, dict[str, Any]]:
    """Exact unlearning from the ledger alone: rewind, replay without the source, certify."""
    with console.bar(cfg.steps, "exact unlearning") as bar:
        result = unlearn(ledger, FAULTY, tax.trainer, run_id=RUN_ID, progress=lambda step: bar.update(1),
                         mode="exact")
    branch_ckpts = [s for s in ledger.by_type("Checkpoint") if s > result.branch_seq]
    if not branch_ckpts:
        raise DemoError("unlearning recorded no checkpoint on its branch")
    detail = (f"certificate at seq {result.certificate_seq} (mode {result.mode}): first contribution at step "
              f"{result.first_step}, rewound to the checkpoint at step {result.rewind_step}, replayed "
              f"{result.replayed_steps} of {result.total_steps} steps with {len(result.removed)} examples removed "
              f"and {len(result.relabeled)} relabeled")
    return detail, {
        "certificate_seq": result.certificate_seq, "mode": result.mode, "branch_run_id": result.branch_run_id,
        "first_step": result.first_step, "rewind_step": result.rewind_step, "replayed_steps": result.replayed_steps,
        "total_steps": result.total_steps, "skipped_steps": len(result.skipped_steps),
        "removed": len(result.removed), "relabeled": len(result.relabeled),
        "original_head": result.original_head.hex(), "new_head": result.new_head.hex(),
        "branch_seq": result.branch_seq, "final_checkpoint": branch_ckpts[-1],
    }


def stage_export(ledger: Ledger, out: Path) -> tuple[str, dict[str, Any]]:
    """The portable bundle, with the dataset's inputs so the verifier can replay."""
    path = out / "run.glb"
    export_bundle(ledger, path, with_data=True)
    size = path.stat().st_size
    return f"{path} ({size / 1e6:.1f} MB, with data)", {"path": str(path), "bytes": size}


def verifier_command(bundle: Path, roots: Path, replay: str) -> list[str]:
    """The regulator's command: the script installed beside this interpreter (a venv need not be on
    PATH), else the one on PATH, else the module under this interpreter."""
    beside = Path(sys.executable).parent / "gradledger-verify"
    script = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("gradledger-verify")
    base = [script] if script else [sys.executable, "-m", "gradledger.verify.cli"]
    return [*base, str(bundle), "--trust", str(roots), "--replay", replay, "--check-traces", "--json"]


def stage_verify(out: Path, replay: str, timeout: float = 600.0) -> tuple[str, dict[str, Any]]:
    bundle, roots = out / "run.glb", out / "roots.pub"
    if not bundle.exists():
        raise DemoError("there is no bundle to verify (the export stage did not produce one)")
    cmd = verifier_command(bundle, roots, replay)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        report = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict) or "verified" not in report:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoError(f"gradledger-verify exited {proc.returncode} without a JSON report: {why}")
    checks = report.get("checks", [])
    passed = sum(1 for c in checks if c.get("status") == "pass")
    # The verifier's own verdict words (specs/verification.md "Verdicts"): never a bare VERIFIED
    # for a structure-only or tolerance verdict.
    verdict = {"exact": "VERIFIED (exact replay)", "tolerance": "VERIFIED WITHIN TOLERANCE",
               "structure only": "VERIFIED STRUCTURE ONLY (weights not checked)"}.get(
                   str(report.get("verdict")) if report["verified"] else "", "NOT VERIFIED")
    detail = f"{verdict}: {passed}/{len(checks)} checks passed (exit {proc.returncode})"
    if report.get("first_failure"):
        f = report["first_failure"]
        detail += f"; first failure: {f.get('name')}: {f.get('detail')}"
    return detail, {"command": " ".join(cmd), "exit": proc.returncode, "report": report}


# -- the whole demo -------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage into ``cfg.out`` (which must not exist or be empty); return report.json's figures."""
    cfg.check()
    out = cfg.out
    if out.exists() and any(out.iterdir()):
        raise DemoError(f"{out} exists and is not empty; give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    console = Console(cfg.progress)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    console.line("authority taxonomy: acme -> experts, crowd, heuristics; keys in keys/, root in roots.pub")
    tax = make_taxonomy()
    save_keys(tax, out)
    at = time.time_ns()
    data = load_digits_split(cfg.seed)
    t0 = time.perf_counter()
    labels = label_training_set(tax, data, cfg.seed, at)
    policy = routing_policy(tax, at)
    timings["labeling"] = time.perf_counter() - t0
    st = labels.stats
    console.line(f"labeled {st['train']} training digits: " + ", ".join(f"{v} by {k}" for k, v in st["by_class"].items())
                 + f"; {FAULTY} swapped {st['faulty_votes_swapped']} votes between {SWAP[0]} and {SWAP[1]}")

    ledger = open_ledger(out / "ledger", tax)
    stages: list[Stage] = []
    try:
        t0 = time.perf_counter()
        ds, inputs = commit_training_set(ledger, tax, labels, data, cfg.seed, at)
        console.line(f"dataset committed with its inputs: root {ds.root.hex()[:16]}..., {ds.count} manifests "
                     f"({CANARY_COUNT} canaries and {CANARY_REFERENCES} reference canaries among them)")
        held = commit_held_out(ledger, tax, data, ds, at)
        losses = train(ledger, tax, ds, policy, inputs, cfg, console, DepthProfiles(held.name))
        timings["training"] = time.perf_counter() - t0
        updates = run_updates(ledger)
        ckpts = ledger.by_type("Checkpoint")  # all the original run's: no branch exists yet
        original_ckpt = ckpts[-1]
        console.line(f"trained {len(updates)} governed steps in {timings['training']:.1f}s, "
                     f"{len(ckpts)} checkpoints, final loss {losses[-1]:.3f}")
        before = evaluate(checkpoint_model(ledger, original_ckpt, cfg), data)
        series = band_series(ledger, updates)
        query = write_query(data, out)
        stages.append(run_stage(console, "trace", lambda: stage_trace(ledger, query, tax, console)))
        stages.append(run_stage(console, "feedback", lambda: stage_feedback(ledger, out)))

        stages.append(run_stage(console, "retire", lambda: stage_retire(
            ledger, tax, f"swaps digits {SWAP[0]} and {SWAP[1]} (found in a spot check of its labels)")))
        if stages[-1].status == "ok":
            stages.append(run_stage(console, "unlearn", lambda: stage_unlearn(ledger, tax, cfg, console)))
        else:
            stages.append(Stage("unlearn", "skipped", "needs the retirement stage"))
        after = None
        if stages[-1].status == "ok":
            after = evaluate(checkpoint_model(ledger, stages[-1].data["final_checkpoint"], cfg), data)
        ledger.commit()
        stages.append(run_stage(console, "export", lambda: stage_export(ledger, out)))
        figures_ledger = {"size": ledger.size, "root": ledger.root.hex(), "types": ledger.type_counts(),
                          "faulty_updates": len(ledger.by_source(FAULTY))}
    finally:
        ledger.close()
    stages.append(run_stage(console, "verify", lambda: stage_verify(out, cfg.replay)))
    timings["total"] = time.perf_counter() - t_start
    for s in stages:
        timings[s.name] = s.seconds

    verifier = next((s.data.get("report") for s in stages if s.name == "verify" and s.status == "ok"), None)
    figures = {
        "config": {"steps": cfg.steps, "batch_size": cfg.batch_size, "checkpoint_every": cfg.checkpoint_every,
                   "seed": cfg.seed, "hidden": cfg.hidden, "lr": cfg.lr, "replay": cfg.replay},
        "faulty_source": FAULTY,
        "swap": list(SWAP),
        "labels": st,
        "policy": {"name": policy.policy["name"], "digest": policy.digest.hex(),
                   "rules": [{"name": r["name"], "profile": r["profile"]} for r in policy.policy["rules"]],
                   "default": policy.policy["default"]["profile"]},
        "ledger": figures_ledger,
        "training": {"steps": len(updates), "final_loss": losses[-1], "seconds": round(timings["training"], 2)},
        "before": before,
        "after": after,
        "bands": series,
        "stages": [s.to_json() for s in stages],
        "unlearning": next((s.data for s in stages if s.name == "unlearn" and s.status == "ok"), None),
        "trace": next(({"report": s.data["report"], "command": s.data["command"]} for s in stages
                       if s.name == "trace" and s.status == "ok"), None),
        "feedback": next((s.data for s in stages if s.name == "feedback" and s.status == "ok"), None),
        "verifier": verifier,
        "verifier_command": next((s.data.get("command") for s in stages if s.name == "verify" and s.status == "ok"),
                                 " ".join(verifier_command(out / "run.glb", out / "roots.pub", cfg.replay))),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "report.json").write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    from .report_html import render_report

    (out / "report.html").write_text(render_report(figures), encoding="utf-8")
    return figures


def summary(figures: Mapping[str, Any], out: Path) -> str:
    """The terminal summary: the report's figures in a few lines."""
    a, b = figures["swap"]
    st = figures["labels"]
    lines = [
        "gradledger demo: governed training, retirement, exact unlearning, standalone verification",
        f"  data       {st['train']} training / {st['test']} test digits (scikit-learn); labels by "
        + ", ".join(f"{k} {v}" for k, v in st["by_class"].items()),
        f"  faulty     {figures['faulty_source']} labeled {st['faulty_labeled']} examples and swapped "
        f"{st['faulty_votes_swapped']} votes between {a} and {b}; {st['wrong_labels']} training labels are wrong",
        f"  training   {figures['training']['steps']} governed steps, final loss {figures['training']['final_loss']:.3f}, "
        f"{figures['ledger']['size']} observations in the ledger",
    ]
    ser = figures["bands"]
    for band in BANDS:
        parts = []
        for c in CLASSES:
            vals = ser["by_class"][band][c]
            parts.append(f"{c} {sum(vals) / max(len(vals), 1):.4f}")
        lines.append(f"  {band:<10} mean update norm by class: " + ", ".join(parts))
    before, after = figures["before"], figures["after"]

    def row(name: str, ev: Mapping[str, Any] | None) -> str:
        if ev is None:
            return f"  {name:<10} not available (the unlearning stage did not run)"
        sw = ev["swap"]
        return (f"  {name:<10} test accuracy {ev['accuracy']:.1%}; {a}->{b}: {sw[f'{a}->{b}']}/{sw[str(a)]}, "
                f"{b}->{a}: {sw[f'{b}->{a}']}/{sw[str(b)]}")

    lines += [row("original", before), row("unlearned", after)]
    for s in figures["stages"]:
        lines.append(f"  {s['name']:<10} {s['status'].upper() if s['status'] != 'ok' else 'ok'}: {s['detail']}")
    rep = figures["verifier"]
    if rep is not None:
        for c in rep.get("checks", []):
            mark = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}.get(c.get("status"), "?   ")
            lines.append(f"    [{mark}] {c.get('name')}: {c.get('detail', '')}")
        for cert in rep.get("certificates", []):
            lines.append(f"    certificate {cert.get('seq')} ({cert.get('source')}): {cert.get('status')}: "
                         f"{cert.get('detail', '')}")
    missing = [s["name"] for s in figures["stages"] if s["status"] != "ok"]
    if missing:
        lines.append(f"  NOT COMPLETE: stage(s) {', '.join(missing)} did not run or failed (see above)")
    if figures.get("trace") is not None:
        lines.append(f"  trace it   {figures['trace']['command']}")
    if figures.get("feedback") is not None:
        lines.append(f"  review it  {figures['feedback']['command']}")
    lines.append(f"  files      {out}/report.html, report.json, run.glb, roots.pub, query.json, feedback.json, ledger/, "
                 "keys/")
    lines.append(f"  check it   {figures['verifier_command']}")
    lines.append(f"  took       {figures['timings']['total']:.1f}s")
    return "\n".join(lines)


def main(args: Any) -> int:
    """`gradledger demo` (the CLI passes its parsed arguments)."""
    cfg = DemoConfig(out=Path(args.out), steps=args.steps, checkpoint_every=args.checkpoint_every,
                     replay=args.replay, progress=not args.quiet)
    figures = run_demo(cfg)
    print(summary(figures, cfg.out))
    # Done means every stage ran and the verifier verified; anything less is not a pass.
    complete = all(s["status"] == "ok" for s in figures["stages"])
    rep = figures["verifier"]
    return 0 if complete and rep is not None and rep.get("verified") else 1


__all__ = [
    "DemoConfig",
    "DemoError",
    "Stage",
    "band_series",
    "evaluate",
    "label_training_set",
    "main",
    "make_taxonomy",
    "routing_policy",
    "run_demo",
    "summary",
]
