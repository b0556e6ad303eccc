"""Recorded memorization scans (specs/dynamics.md §2.3): every MemorizationScan's form and its
recomputation from the lineage's recorded per-example losses, and (format 6) a scan at every
checkpoint of a run whose settings declare one.

The verifier's own reading of §1 (it never imports ``gradledger.training``): each example's trace is
its recorded binary32 losses as binary64; the LT-IQR score the type-7 interquartile range of the sorted
trace written as §1.2 writes it, the mean-loss score the trace's exactly rounded sum over its length, so
that both implementations round the same way and the comparison is exact.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import struct
from typing import Any, Mapping, Sequence

from gradledger.ledger.envelope import Sealed

from .example_losses import ExampleLossesInvalid, decode_example_losses
from .flags import next_after
from .settings import LT_IQR, MEAN_LOSS, monitors, same_cbor, scan_parameters, training_format
from .structure import Run, Structure
from .traces import lineage_updates

__all__ = ["ScanInvalid", "check_scans"]

SCAN_FORMAT = 1
#: §4.2: the format that adds the canaries' ranks, recorded exactly when the run's dataset holds canaries.
CANARY_SCAN_FORMAT = 2
#: §4.1: the canary sets a scan ranks, at most.
MAX_CANARY_SETS = 64
#: §1.3: an unscored index's binary64 in the digest.
NO_SCORE = struct.pack("<Q", 0x7FF8000000000000)


class ScanInvalid(Exception):
    """A MemorizationScan that is malformed, does not recompute, or is missing (the message says why)."""

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


def quantile(v: Sequence[float], p: float) -> float:
    """§1.2: type 7, ``v`` sorted: ``v[lo] + (h - lo) * (v[lo + 1] - v[lo])`` at ``h = (m - 1) * p``."""
    h = (len(v) - 1) * p
    lo = math.floor(h)
    frac = h - lo
    a = v[lo]
    b = v[min(lo + 1, len(v) - 1)]
    return a + frac * (b - a)


def traces(st: Structure, run: Run, through: int, decoded: dict[int, list[float]] | None = None
           ) -> list[list[float]]:
    """Every dataset index's recorded losses over the lineage's steps before ``through``, in step and then
    batch order; ``decoded``: each update's losses by seq, filled and reused (a run's scans read the same
    steps)."""
    count = st.datasets[run.dataset_seq].count  # type: ignore[index]
    out: list[list[float]] = [[] for _ in range(count)]
    decoded = {} if decoded is None else decoded
    for s in lineage_updates(st, run):
        u = st.observations[s].body
        if u["step"] >= through:
            continue
        if s not in decoded:
            decoded[s] = decode_example_losses(u["example_losses"])
        for i, v in zip(u["batch"], decoded[s]):
            out[i].append(v)
    return out


def scores(trace: Sequence[list[float]], min_trace: int, method: str) -> list[float | None]:
    """§1.2 for every dataset index: the mean (``math.fsum``, exactly rounded, over the length) or the
    interquartile range; LT-IQR sorts each trace in place."""
    out: list[float | None] = []
    for t in trace:
        if len(t) < min_trace:
            out.append(None)
        elif method == MEAN_LOSS:
            out.append(math.fsum(t) / len(t))
        else:
            t.sort()
            out.append(quantile(t, 0.75) - quantile(t, 0.25))
    return out


def canary_ranks(manifests: Sequence[Mapping[str, Any]], last: Sequence[float | None]) -> list[dict[str, Any]]:
    """§4.2: per canary set of the dataset (its manifests' fields), by name: the references with a recorded
    loss, and each inserted canary's rank, 1 + the references whose last loss is at most its own (None:
    never trained); ``last``: each index's last recorded loss."""
    sets: dict[str, tuple[list[int], list[int]]] = {}
    for i, m in enumerate(manifests):
        c = m.get("canary")
        if c is not None:
            sets.setdefault(c["set"], ([], []))[0 if c["role"] == "inserted" else 1].append(i)
    out = []
    for name in sorted(sets):
        inserted, refs = sets[name]
        # Sorted once and bisected: a hostile dataset's sets cost (canaries + references) log references,
        # never their product.
        measured = sorted(last[r] for r in refs if last[r] is not None)
        ranks = [[i, None if last[i] is None else 1 + bisect.bisect_right(measured, last[i])] for i in inserted]
        out.append({"set": name, "references": len(measured), "inserted": ranks})
    return out


def flagged(values: Sequence[float | None], fraction: float) -> list[list[Any]]:
    """§1.3: ``ceil(fraction * scored)`` examples, by descending score, then ascending index."""
    scored = [(-v, i) for i, v in enumerate(values) if v is not None]
    scored.sort()
    k = math.ceil(fraction * len(scored))
    return [[i, -neg] for neg, i in scored[:k]]


def digest(values: Sequence[float | None]) -> bytes:
    """§1.3: SHA-256 of the binary64 scores, little-endian, the quiet NaN for an unscored index."""
    return hashlib.sha256(b"".join(NO_SCORE if v is None else struct.pack("<d", v) for v in values)).digest()


def check_scans(st: Structure) -> tuple[int, int, int]:
    """Every MemorizationScan, checked and recomputed (§2.3, §4.2), then every required one present; (scans,
    required, scans with canary ranks). Raises ScanInvalid for the first that fails."""
    n, canaried, decoded = 0, 0, {}  # type: int, int, dict[int, list[float]]
    for obs in st.observations:
        if obs.type == "MemorizationScan":
            _check(obs, st, decoded)
            n += 1
            canaried += "canaries" in obs.body
    return n, _check_required(st), canaried


def _check(obs: Sealed, st: Structure, decoded: dict[int, list[float]]) -> None:
    body, seq = obs.body, obs.seq

    def bad(why: str) -> ScanInvalid:
        return ScanInvalid(f"MemorizationScan {seq}: {why}", seq)

    if body["format"] not in (SCAN_FORMAT, CANARY_SCAN_FORMAT):
        raise bad(f"format {body['format']!r} is not {SCAN_FORMAT} or {CANARY_SCAN_FORMAT}")
    run = st.run_before(seq, body["run"])
    if run is None:
        raise bad(f"run {body['run']!r} names no governed run recorded before it")
    if training_format(run.settings) < 4:
        raise bad("the run's training format records no per-example losses (format 4 and later)")
    params = body["parameters"]
    if not scan_parameters(params):
        raise bad("parameters is not {fraction: float in (0, 1], min_trace: int in [2, 2**20], ? method: 'mean-loss'}")
    method = params.get("method", LT_IQR)
    if body["method"] != method:
        raise bad(f"method {body['method']!r} is not the one its parameters name ({method!r}; no method: lt-iqr)")
    through = body["through"]
    ups = lineage_updates(st, run)
    before = [s for s in ups if st.observations[s].body["step"] < through]
    if through < 1 or len(before) != through or any(s > seq for s in before):
        raise bad(f"through {through} is not a step count the run had recorded before the scan")
    try:
        recorded = traces(st, run, through, decoded)
    except (KeyError, ExampleLossesInvalid):
        raise bad("a step it covers records no per-example losses") from None
    last = [t[-1] if t else None for t in recorded]  # before scores() sorts them
    values = scores(recorded, params["min_trace"], method)
    scored = sum(v is not None for v in values)
    if body["scored"] != scored:
        raise bad(f"scored is {body['scored']!r}; {scored} examples have a trace of at least "
                  f"{params['min_trace']} losses")
    want = flagged(values, params["fraction"])
    got = body["flagged"]
    if not isinstance(got, list) or len(got) != len(want):
        raise bad(f"flagged holds {len(got) if isinstance(got, list) else 'no list of'} entries, not {len(want)}")
    for r, (g, w) in enumerate(zip(got, want)):
        if not (isinstance(g, list) and len(g) == 2 and type(g[0]) is int and type(g[1]) is float
                and g[0] == w[0] and struct.pack("<d", g[1]) == struct.pack("<d", w[1])):
            raise bad(f"flagged[{r}] is {g!r}; recomputed from the recorded losses it is {w!r}")
    if body["scores_digest"] != digest(values):
        raise bad("scores_digest is not the digest of the scores recomputed from the recorded losses")
    ranks = canary_ranks([m.fields for m in st.datasets[run.dataset_seq].manifests], last)  # type: ignore[index]
    if len(ranks) > MAX_CANARY_SETS:
        raise bad(f"the run's dataset holds {len(ranks)} canary sets; a scan ranks at most {MAX_CANARY_SETS} "
                  "(specs/dynamics.md §4.1)")
    if ranks:
        if body["format"] != CANARY_SCAN_FORMAT or not same_cbor(body.get("canaries"), ranks):
            raise bad(f"the run's dataset holds canaries, so the scan is format {CANARY_SCAN_FORMAT} with their "
                      "ranks recomputed from the recorded losses (specs/dynamics.md §4.2); it records "
                      f"{body.get('canaries')!r} in format {body['format']!r}, recomputed they are {ranks!r}")
    elif body["format"] != SCAN_FORMAT or "canaries" in body:
        raise bad(f"the run's dataset holds no canaries: a scan of it is format {SCAN_FORMAT}, without canaries")


def _check_required(st: Structure) -> int:
    """§2.2: a run whose settings declare the memorization monitor holds, for each Checkpoint after step
    0, a scan of it by the run's trainer, ``through`` the checkpoint's step, with the declared parameters,
    recorded after the Checkpoint and before the run's next GovernedUpdate."""
    required = 0
    for run in st.runs.values():
        if not run.governed or run.branch_of is not None:
            continue
        try:
            declared = monitors(run.settings).get("memorization")
        except ValueError as exc:
            raise ScanInvalid(f"RunStarted {run.seq}: {exc}", run.seq) from None
        if declared is None:
            continue
        trainer = st.observations[run.seq].signer
        for c in run.checkpoints:
            step = st.observations[c].body["step"]
            if step == 0:
                continue
            required += 1
            nxt = next_after(run.updates, c, len(st.observations))
            if not any(_is_scan_of(st.observations[s], run.seq, step, declared, trainer) for s in range(c + 1, nxt)):
                raise ScanInvalid(f"Checkpoint {c} (step {step}) of run {run.run_id!r} has no MemorizationScan: the "
                                  "run's settings.monitors declares one at each checkpoint (specs/dynamics.md §2.2)", c)
    return required


def _is_scan_of(obs: Sealed, run: int, through: int, params: Mapping[str, Any], trainer: bytes) -> bool:
    b = obs.body
    return obs.type == "MemorizationScan" and obs.signer == trainer and b["run"] == run and b["through"] == through \
        and b["parameters"] == params
