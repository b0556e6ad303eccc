"""What a governed step cannot avoid paying, against the step-time targets of issues 11 and 13.

    python bench/floor.py [--steps K] [--rounds R] [--only MODEL ...]

Why: bench/overhead.py and bench/models.py give the governed/plain step ratios; this one asks what
part of the gap is a floor of the design rather than code still to tune, by measuring three costs that
every governed step pays whatever its Python does around them:

1. **The torch operations the rules add** (bench/overhead.py's digits MLP, the workload whose target
   is tightest: ratio <= 1.10 on a ~0.45 ms step). ``torch.profiler`` counts the aten operations the
   step issues from Python (those whose parent is not itself an aten operation: what the Python code
   dispatched), governed and plain, over K steps each. The governed extras are the rules' own work:
   the gate's per-band mixes and their backward, the loss recognition (the run's loss gradient
   recomputed and compared, "record what was done or refuse the step"), the band norms, the
   parameter snapshot and the update norms. ``mlp_min_op_us`` is the median cost of one such
   operation on a tiny tensor, dispatched from Python (the cheapest case); ``mlp_op_floor_ratio`` =
   (plain step + extra operations x that cost) / plain step: the ratio the step cannot go below
   while it issues those operations, before any Python around them.
2. **The record.** The recorder thread's CPU time for one GovernedUpdate (build, canonical CBOR,
   Ed25519, the ledger's admission check, the append), ``<model>_record_cpu_us``, read with
   ``time.thread_time`` around each append job, against the budget the target leaves
   (``<model>_budget_us``: the plain step's 5 %, 10 % for the MLP). On 2 cores shared with torch's
   two intra-op threads that CPU is taken from the step whether it runs on a thread, in a process or
   behind the loop.
3. **Deterministic algorithms.** Bit-exact replay needs ``torch.use_deterministic_algorithms``; the
   plain loop of the user runs without. ``<model>_deterministic_ratio``: the plain loop with them on
   over off, interleaved in blocks, median over rounds (bench/models.py's bert, resnet18, vit, and its
   LoRA workload through transformers' Trainer, one run a block, for issue 13).

The last stdout line is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models as MB  # noqa: E402  (bert, resnet18, vit through the public API)
import overhead as OB  # noqa: E402  (the digits MLP through the engine)

from gradledger.training import record_thread  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench/floor] {msg}", file=sys.stderr, flush=True)


class RecordClock:
    """CPU time of each GovernedUpdate append on the recorder thread (``time.thread_time``)."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self._original = record_thread.RecordWriter.submit_call

    def __enter__(self) -> RecordClock:
        original, cpu = self._original, self.cpu

        def submit_call(writer: Any, what: str, run: Callable[[], None], cancel: Any = None) -> None:
            def timed() -> None:
                start = time.thread_time()
                run()
                if what.startswith("the GovernedUpdate"):
                    cpu.append(time.thread_time() - start)
            original(writer, what, timed, cancel)

        record_thread.RecordWriter.submit_call = submit_call  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        record_thread.RecordWriter.submit_call = self._original  # type: ignore[method-assign]

    def median_us(self) -> float:
        return 1e6 * statistics.median(self.cpu)


def dispatched_ops(steps: Callable[[int], None], k: int) -> dict[str, float]:
    """aten operations dispatched from Python per step, by name (children of other aten operations left out)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(k)
    counts: dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
            counts[e.name] = counts.get(e.name, 0.0) + 1.0 / k
    return counts


def tiny_op_us() -> float:
    """The median cost of one operation on a 10-element tensor, dispatched from Python."""
    a, b = torch.randn(10), torch.randn(10)
    ops: list[Callable[[], Any]] = [lambda: torch.add(a, b), lambda: a.mul(2.0), lambda: torch.linalg.vector_norm(a),
                                    lambda: a.to(torch.float64), lambda: torch.stack([a, b]), lambda: a.detach()]
    costs = []
    for op in ops:
        op()
        start = time.perf_counter()
        for _ in range(20000):
            op()
        costs.append((time.perf_counter() - start) / 20000 * 1e6)
    return statistics.median(costs)


def per_step(steps: Callable[[int], None], k: int) -> float:
    start = time.perf_counter()
    steps(k)
    return (time.perf_counter() - start) / k * 1e6


def mlp_floor(k: int, root: Path) -> dict[str, Any]:
    x, y = OB.load("mlp")
    with RecordClock() as clock:
        gov = OB.Governed("mlp", x, y, root)
        plain = OB.Plain("mlp", x, y)
        plain.prefetch_order(100 * k)
        gov.steps(50)
        plain.steps(50)
        gov_ops = dispatched_ops(gov.steps, k)
        plain_ops = dispatched_ops(plain.steps, k)
        plain_us = statistics.median(per_step(plain.steps, k) for _ in range(5))
        gov.close()  # drains the recorder: every record is timed
    extra = {n: round(gov_ops.get(n, 0.0) - plain_ops.get(n, 0.0), 2) for n in set(gov_ops) | set(plain_ops)}
    op_us = tiny_op_us()
    n_extra = sum(gov_ops.values()) - sum(plain_ops.values())
    log(f"mlp: {sum(gov_ops.values()):.0f} ops a governed step, {sum(plain_ops.values()):.0f} plain; "
        f"one op {op_us:.2f} us; plain step {plain_us:.0f} us")
    return {
        "mlp_ops_governed": round(sum(gov_ops.values()), 1), "mlp_ops_plain": round(sum(plain_ops.values()), 1),
        "mlp_extra_ops": round(n_extra, 1),
        "mlp_extra_ops_by_name": dict(sorted(((n, v) for n, v in extra.items() if v), key=lambda kv: -kv[1])),
        "mlp_min_op_us": round(op_us, 3), "mlp_plain_step_us": round(plain_us, 1),
        "mlp_budget_us": round(0.10 * plain_us, 1),
        "mlp_op_floor_ratio": round((plain_us + n_extra * op_us) / plain_us, 4),
        "mlp_record_cpu_us": round(clock.median_us(), 1),
    }


def floor_figures(name: str, record: RecordClock, block: Callable[[bool], float], rounds: int,
                  warm_up: bool = False) -> dict[str, Any]:
    """``name``'s record CPU and deterministic algorithms' cost: ``block(det)`` runs the plain loop with them
    on or off and gives its microseconds a step; rounds alternate which goes first (``warm_up``: one more
    round first, not counted)."""
    before = torch.are_deterministic_algorithms_enabled()
    ratios, plain_us = [], []
    try:
        for r in range(rounds + warm_up):
            times = {det: block(det) for det in ((False, True) if r % 2 == 0 else (True, False))}
            if r >= warm_up:
                ratios.append(times[True] / times[False])
                plain_us.append(times[False])
    finally:
        torch.use_deterministic_algorithms(before)
    budget = 0.05 * statistics.median(plain_us)
    log(f"{name}: record {record.median_us():.0f} us CPU, deterministic {statistics.median(ratios):.3f}, "
        f"budget {budget:.0f} us")
    return {f"{name}_record_cpu_us": round(record.median_us(), 1),
            f"{name}_deterministic_ratio": round(statistics.median(ratios), 4),
            f"{name}_deterministic_round_ratios": [round(v, 4) for v in ratios],
            f"{name}_plain_step_us": round(statistics.median(plain_us), 1), f"{name}_budget_us": round(budget, 1)}


def model_floor(name: str, k: int, rounds: int, root: Path) -> dict[str, Any]:
    x, y = MB.MODELS[name]["data"](MB.MODELS[name]["n"])
    with RecordClock() as clock:
        gov = MB.Governed(name, x, y, root)
        gov.steps(k)
        gov.close()  # drains the recorder: every record is timed
    plain = MB.Plain(name, x, y)
    plain.prefetch_order(2 * rounds * k + 10)
    plain.steps(5)

    def block(det: bool) -> float:
        torch.use_deterministic_algorithms(det)
        return per_step(plain.steps, k)

    return floor_figures(name, clock, block, rounds)


def lora_floor(k: int, rounds: int, root: Path) -> dict[str, Any]:
    """bench/models.py's LoRA workload (issue 13): transformers' Trainer (plain) and GovernedTrainer, K steps a run."""
    with RecordClock() as clock:
        MB.lora_trainer(True, root, k, "floor-lora", MB.StepClock()).train()

    def block(det: bool) -> float:
        steps = MB.StepClock()
        trainer = MB.lora_trainer(False, root, k, "floor-lora-plain", steps)
        torch.use_deterministic_algorithms(det)  # after lora_trainer, which sets torch's default
        trainer.train()
        return 1e3 * steps.ms_per_step()

    return floor_figures("lora", clock, block, rounds, warm_up=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="steps per measured block")
    ap.add_argument("--rounds", type=int, default=5, help="deterministic on/off rounds per model")
    ap.add_argument("--only", nargs="+", choices=["mlp", *sorted(MB.MODELS), "lora"])
    args = ap.parse_args()
    chosen = args.only or ["mlp", *sorted(MB.MODELS), "lora"]
    for name, missing in (("bert", MB.transformers is None), ("lora", MB.transformers is None or MB.peft is None)):
        if missing and name in chosen:
            chosen.remove(name)
            log(f"transformers or peft is not installed: {name} left out")
    started = time.perf_counter()
    result: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "steps": args.steps, "rounds": args.rounds, "load_average": MB.load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            root = Path(tmp) / name
            root.mkdir()
            if name == "mlp":
                result.update(mlp_floor(args.steps, root))
            elif name == "lora":
                result.update(lora_floor(args.steps, args.rounds, root))
            else:
                result.update(model_floor(name, args.steps, args.rounds, root))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
