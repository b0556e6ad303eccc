"""Governed training against plain PyTorch: step time and peak memory, side by side.

    python bench/overhead.py [--rounds R] [--mlp-steps K] [--tf-steps K] [--tf-rounds R]
                             [--mem-steps-mlp K] [--mem-steps-tf K] [--skip-mem]

Two workloads, each trained twice from the same initial weights, on the same data, in the same
batch order (the governed run's recorded hash order) and with the same loss and optimizer:

(a) mlp: a small MLP (64-128-128-10) on sklearn's bundled digits (1797 real examples), three
    bands, SGD with momentum;
(b) transformer: a 6-block pre-norm transformer encoder (d_model 256, 4 heads, ff 1024, vocab
    2000, seq len 64, about 5.8M parameters) that predicts the token following a synthetic but
    deterministic sequence; three bands (head, upper blocks, embeddings + lower blocks), AdamW.

Every example of both workloads gets a real signed manifest (credentialed sources, confidence,
review state), the manifests are committed as a dataset, and a root-signed policy routes them
(some examples are kept out of the deeper bands), so the governed side does all its real work:
routing, gate, per-band clipping, update norms, one signed GovernedUpdate per step, and a
safetensors checkpoint plus signed tree head every 100 steps (``checkpoint_every=100``).

**Step time** is interleaved in one process: a round is K governed and K plain steps, run as
alternating sub-blocks of S steps (which variant goes first alternates too); K is a multiple of
100, so every governed round pays for its checkpoints. Both loops do the same user-visible work (zero_grad,
forward, loss, backward, step, read the loss as a float). The reported ratio is the median over
rounds of (governed time) / (plain time) of that round. Governed training turns on
``torch.use_deterministic_algorithms``; the plain blocks run with torch's default (off).

**Peak memory** is measured in a fresh subprocess per variant (so one variant's allocations
cannot mask the other's): both children import the same modules and build the same data, model
and optimizer, then the governed child also builds manifests, the ledger and the engine. Each
reports its peak resident set size (``VmHWM`` from ``/proc/self/status``, which includes
file-backed pages such as the ledger's memory map). ``*_peak_mem_ratio`` is the ratio of the
training-phase peaks: the high-water mark is reset (``/proc/self/clear_refs``, "5") after setup
and read after the training steps, which include one checkpoint. The whole-process peaks
(setup included: the governed setup exports the model with ``torch.export``) and the increases
over the common baseline (RSS after imports, data, model and optimizer) are reported too.

The last stdout line is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import CROWD_KEY, crowd_credentials, crowd_ledger, make_world, policy_fields  # noqa: E402

from gradledger.ledger.ledger import Ledger  # noqa: E402
from gradledger.training.bands import sequential_bands, transformer_bands  # noqa: E402
from gradledger.training.dataset import commit_dataset  # noqa: E402
from gradledger.training.manifests import example_id, label_example, source_entry  # noqa: E402
from gradledger.training.policy import sign_policy  # noqa: E402
from gradledger.training.trainer import Governance, epoch_order  # noqa: E402

T = 10
SEED = 7
CHECKPOINT_EVERY = 100
WORLD = make_world()
_, WORKER_CREDS = crowd_credentials(WORLD)
POLICY_FIELDS = policy_fields("bench-v1", 10.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- workloads ------------------------------------------------------------------------------


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


def mlp_model() -> nn.Sequential:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


VOCAB, SEQ, D_MODEL, HEADS, BLOCKS, FF = 2000, 64, 256, 4, 6, 1024


class TinyLM(nn.Module):
    """Token and position embeddings, pre-norm encoder blocks, a vocabulary head on the last position."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Embedding(SEQ, D_MODEL)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.1, batch_first=True, norm_first=True)
            for _ in range(BLOCKS)
        )
        self.norm = nn.LayerNorm(D_MODEL)
        self.out = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("positions", torch.arange(SEQ), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(self.positions)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h[:, -1]))


def tf_model() -> TinyLM:
    torch.manual_seed(1234)
    return TinyLM()


def tf_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic sequences from a fixed sparse transition rule; the label is the next token."""
    g = torch.Generator().manual_seed(2024)
    succ = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)  # each token has 4 possible successors
    x = torch.empty(n, SEQ + 1, dtype=torch.int64)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, SEQ + 1):
        choice = torch.randint(0, 4, (n,), generator=g)
        x[:, t] = succ[x[:, t - 1], choice]
    return x[:, :SEQ].contiguous(), x[:, SEQ].contiguous()


WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp": {"batch": 64, "make_model": mlp_model, "bands": lambda m: sequential_bands(m)},
    "transformer": {"batch": 8, "n": 2048, "make_model": tf_model, "bands": lambda m: transformer_bands(m)},
}


def load(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    return digits_data() if kind == "mlp" else tf_data(WORKLOADS["transformer"]["n"])


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "mlp":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)


def manifests_for(x: torch.Tensor, y: torch.Tensor) -> list:
    """An expert labels every third example (one in seven of those rejected), two crowd workers the rest."""
    out = []
    for i in range(len(x)):
        ex, label = example_id(x[i]), int(y[i])
        if i % 3 == 0:
            srcs = [source_entry(WORLD.source_cred, label, 0.95)]
            out.append(label_example(example=ex, sources=srcs, aggregation="single", ontology="bench-v1",
                                     review="rejected" if i % 21 == 0 else "accepted", key=WORLD.source, time=T))
        else:
            other = label if i % 2 else (label + 1) % 10
            srcs = [source_entry(WORKER_CREDS[0], label, 0.9), source_entry(WORKER_CREDS[1], other, 0.4)]
            out.append(label_example(example=ex, sources=srcs, aggregation="majority", ontology="bench-v1",
                                     review="accepted", key=CROWD_KEY, time=T))
    return out


# -- the two loops ----------------------------------------------------------------------------


class Plain:
    def __init__(self, kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.model = WORKLOADS[kind]["make_model"]()
        self.opt = make_optimizer(kind, self.model)
        self.batch = WORKLOADS[kind]["batch"]
        self.per_epoch = -(-len(x) // self.batch)
        self.orders: dict[int, torch.Tensor] = {}
        self.step_no = 0
        self.model.train()

    def prefetch_order(self, upto_step: int) -> None:
        # The governed run's order, computed outside the timed blocks.
        for e in range(upto_step // self.per_epoch + 1):
            if e not in self.orders:
                self.orders[e] = torch.tensor(epoch_order(SEED, e, len(self.x)), dtype=torch.int64)

    def steps(self, k: int) -> None:
        model, opt, b = self.model, self.opt, self.batch
        for _ in range(k):
            e, p = divmod(self.step_no, self.per_epoch)
            index = self.orders[e][p * b : (p + 1) * b]
            xb, yb = self.x[index], self.y[index]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            float(loss.detach())
            self.step_no += 1


def bench_ledger(path: Path) -> Ledger:
    """A new ledger at ``path`` with the benchmarks' world: genesis, the crowd authority and its workers."""
    return crowd_ledger(path, WORLD)


class Governed:
    def __init__(self, kind: str, x: torch.Tensor, y: torch.Tensor, root: Path) -> None:
        self.ledger = bench_ledger(root / f"ledger-{kind}-{time.monotonic_ns()}")
        ds = commit_dataset(self.ledger, manifests_for(x, y), f"bench-{kind}", WORLD.trainer)
        model = WORKLOADS[kind]["make_model"]()
        opt = make_optimizer(kind, model)
        loader = DataLoader(TensorDataset(x, y), batch_size=WORKLOADS[kind]["batch"], shuffle=True)
        self.engine = Governance(
            self.ledger, WORLD.trainer, dataset=ds, policy=sign_policy(POLICY_FIELDS, WORLD.root, T),
            layout=WORKLOADS[kind]["bands"](model), run_id=f"bench-{kind}", checkpoint_every=CHECKPOINT_EVERY,
            seed=SEED, root_key=WORLD.root,
        )
        self.model, self.opt, self.loader = self.engine.make_governed(model, opt, loader)
        self.model.train()
        self._it = iter(self.loader)

    def steps(self, k: int) -> None:
        engine, model, opt = self.engine, self.model, self.opt
        for _ in range(k):
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                batch = next(self._it)
            opt.zero_grad(set_to_none=True)
            loss = engine.criterion(model(batch), batch.labels)
            loss.backward()
            opt.step()
            float(loss.detach())

    def close(self) -> None:
        self.engine.close()
        self.ledger.close()


def same_start(g: Governed, p: Plain) -> None:
    ga = {n: t for n, t in g.model.model.state_dict().items()}
    pa = p.model.state_dict()
    assert ga.keys() == pa.keys() and all(torch.equal(ga[n], pa[n]) for n in ga), "initial weights differ"


# -- step time ------------------------------------------------------------------------------


def time_workload(kind: str, rounds: int, k: int, sub: int, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    x, y = load(kind)
    t0 = time.perf_counter()
    gov = Governed(kind, x, y, root)
    setup_s = time.perf_counter() - t0
    plain = Plain(kind, x, y)
    same_start(gov, plain)
    plain.prefetch_order((rounds + 1) * k + 1)
    det = torch.are_deterministic_algorithms_enabled()

    def run_plain(n: int) -> float:
        torch.use_deterministic_algorithms(False)
        try:
            t = time.perf_counter()
            plain.steps(n)
            return time.perf_counter() - t
        finally:
            torch.use_deterministic_algorithms(det)

    def run_gov(n: int) -> float:
        t = time.perf_counter()
        gov.steps(n)
        return time.perf_counter() - t

    # Warm-up: one block each (the governed one ends on a checkpoint, like every timed block).
    run_gov(k)
    run_plain(k)
    gms, pms, ratios = [], [], []
    for r in range(rounds):
        # One round: k governed and k plain steps, alternating in sub-blocks of ``sub`` steps
        # (which variant goes first alternates), so slow drifts of the machine hit both alike.
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
        log(f"{kind} round {r + 1}/{rounds}: governed {gms[-1]:.3f} ms/step  plain {pms[-1]:.3f} ms/step  "
            f"ratio {ratios[-1]:.3f}")
    assert gov.engine.step == (rounds + 1) * k
    updates = len(gov.ledger.by_type("GovernedUpdate"))
    checkpoints = len(gov.ledger.by_type("Checkpoint"))
    gov.close()
    return {
        "ratio": statistics.median(ratios),
        "governed_ms": statistics.median(gms),
        "plain_ms": statistics.median(pms),
        "ratios": [round(v, 4) for v in ratios],
        "setup_s": setup_s,
        "updates": updates,
        "checkpoints": checkpoints,
        "params": sum(p.numel() for p in plain.model.parameters()),
        "examples": len(x),
    }


# -- peak memory (one subprocess per variant) -----------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_child(kind: str, variant: str, steps: int) -> None:
    torch.manual_seed(0)
    x, y = load(kind)
    model = WORKLOADS[kind]["make_model"]()  # the common baseline holds one model and optimizer
    opt = make_optimizer(kind, model)
    del model, opt
    base_kb = _status_kb("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "governed":
            runner: Any = Governed(kind, x, y, Path(tmp))
        else:
            runner = Plain(kind, x, y)
            runner.prefetch_order(steps + 1)
        setup_hwm_kb = _status_kb("VmHWM")
        after_setup_kb = _status_kb("VmRSS")
        reset = _reset_hwm()
        runner.steps(steps)
        train_hwm_kb = _status_kb("VmHWM")
        if variant == "governed":
            assert runner.engine.step == steps and steps >= CHECKPOINT_EVERY
            runner.close()
    print(json.dumps({
        "baseline_mb": base_kb / 1024, "after_setup_mb": after_setup_kb / 1024, "setup_peak_mb": setup_hwm_kb / 1024,
        "train_peak_mb": train_hwm_kb / 1024, "process_peak_mb": max(setup_hwm_kb, train_hwm_kb) / 1024,
        "hwm_reset": reset,
    }))


def measure_memory(kind: str, steps: int) -> dict[str, Any]:
    out = {}
    for variant in ("plain", "governed"):
        proc = subprocess.run(
            [sys.executable, __file__, "--mem-child", kind, variant, "--mem-steps", str(steps)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {kind}/{variant} failed:\n{proc.stderr[-4000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"{kind} {variant} memory: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in out[variant].items()))
    g, p = out["governed"], out["plain"]
    if not (g["hwm_reset"] and p["hwm_reset"]):
        raise RuntimeError("could not reset the RSS high-water mark; training-phase peaks unavailable")
    return {
        "ratio": g["train_peak_mb"] / p["train_peak_mb"],
        "governed_mb": g["train_peak_mb"],
        "plain_mb": p["train_peak_mb"],
        "process_ratio": g["process_peak_mb"] / p["process_peak_mb"],
        "governed_process_mb": g["process_peak_mb"],
        "plain_process_mb": p["process_peak_mb"],
        "baseline_mb": (g["baseline_mb"] + p["baseline_mb"]) / 2,
        "governed_increase_mb": g["train_peak_mb"] - g["baseline_mb"],
        "plain_increase_mb": p["train_peak_mb"] - p["baseline_mb"],
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="MLP rounds (one governed + one plain block each)")
    parser.add_argument("--mlp-steps", type=int, default=200, help="MLP steps per block (multiple of 100)")
    parser.add_argument("--tf-rounds", type=int, default=3, help="transformer rounds")
    parser.add_argument("--tf-steps", type=int, default=100, help="transformer steps per block (multiple of 100)")
    parser.add_argument("--mlp-sub", type=int, default=50, help="MLP steps per interleaved sub-block")
    parser.add_argument("--tf-sub", type=int, default=10, help="transformer steps per interleaved sub-block")
    parser.add_argument("--mem-steps-mlp", type=int, default=200)
    parser.add_argument("--mem-steps-tf", type=int, default=100)
    parser.add_argument("--skip-mem", action="store_true")
    parser.add_argument("--only", choices=["mlp", "transformer"])
    parser.add_argument("--mem-child", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--mem-steps", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mem_child:
        mem_child(args.mem_child[0], args.mem_child[1], args.mem_steps)
        return
    for k in (args.mlp_steps, args.tf_steps):
        if k % CHECKPOINT_EVERY:
            raise SystemExit(f"steps per block must be a multiple of {CHECKPOINT_EVERY}, got {k}")

    started = time.perf_counter()
    kinds = [args.only] if args.only else ["mlp", "transformer"]
    timing, memory = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            rounds, k, sub = ((args.rounds, args.mlp_steps, args.mlp_sub) if kind == "mlp"
                              else (args.tf_rounds, args.tf_steps, args.tf_sub))
            if k % sub:
                raise SystemExit(f"{kind}: sub-block {sub} does not divide block {k}")
            timing[kind] = time_workload(kind, rounds, k, sub, Path(tmp))
    if not args.skip_mem:
        for kind in kinds:
            memory[kind] = measure_memory(kind, args.mem_steps_mlp if kind == "mlp" else args.mem_steps_tf)

    result: dict[str, Any] = {}
    prefix = {"mlp": "mlp", "transformer": "transformer"}
    for kind in kinds:
        t = timing[kind]
        result[f"{prefix[kind]}_step_ratio"] = round(t["ratio"], 4)
    for kind in kinds:
        if kind in memory:
            result[f"{prefix[kind]}_peak_mem_ratio"] = round(memory[kind]["ratio"], 4)
    for kind in kinds:
        t, p = timing[kind], prefix[kind]
        result.update({
            f"{p}_governed_ms_per_step": round(t["governed_ms"], 3),
            f"{p}_plain_ms_per_step": round(t["plain_ms"], 3),
            f"{p}_round_ratios": t["ratios"],
            f"{p}_params": t["params"],
            f"{p}_examples": t["examples"],
            f"{p}_setup_s": round(t["setup_s"], 2),
        })
        if kind in memory:
            m = memory[kind]
            result.update({
                f"{p}_governed_peak_mb": round(m["governed_mb"], 1),
                f"{p}_plain_peak_mb": round(m["plain_mb"], 1),
                f"{p}_common_baseline_mb": round(m["baseline_mb"], 1),
                f"{p}_governed_increase_mb": round(m["governed_increase_mb"], 1),
                f"{p}_plain_increase_mb": round(m["plain_increase_mb"], 1),
                f"{p}_process_peak_mem_ratio": round(m["process_ratio"], 4),
                f"{p}_governed_process_peak_mb": round(m["governed_process_mb"], 1),
                f"{p}_plain_process_peak_mb": round(m["plain_process_mb"], 1),
            })
    result["settings"] = {
        "mlp": {"data": "sklearn load_digits (1797 x 64)", "model": "64-128-128-10 MLP", "batch": 64,
                "optimizer": "sgd lr 0.05 momentum 0.9 wd 1e-4", "rounds": args.rounds,
                "steps_per_block": args.mlp_steps, "sub_block": args.mlp_sub, "mem_steps": args.mem_steps_mlp},
        "transformer": {"data": f"synthetic next-token, {WORKLOADS['transformer']['n']} x {SEQ}, vocab {VOCAB}",
                        "model": f"{BLOCKS} pre-norm encoder blocks, d_model {D_MODEL}, {HEADS} heads, ff {FF}",
                        "batch": WORKLOADS["transformer"]["batch"], "optimizer": "adamw lr 3e-4 wd 0.01",
                        "rounds": args.tf_rounds, "steps_per_block": args.tf_steps, "sub_block": args.tf_sub, "mem_steps": args.mem_steps_tf},
        "checkpoint_every": CHECKPOINT_EVERY,
        "bands": 3,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "step_ratio": "median over rounds of (governed time / plain time) for steps_per_block steps each, "
                      "interleaved in one process in sub-blocks of sub_block steps (order alternating), after "
                      "one warm-up block each; every governed round includes its checkpoint(s) and tree head(s)",
        "peak_mem": "VmHWM (peak RSS incl. file-backed pages) over the training steps, HWM reset after setup, "
                    "one fresh subprocess per variant with the same imports/data/model; *_process_* includes setup",
        "plain_deterministic_algorithms": False,
        "governed_deterministic_algorithms": True,
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
