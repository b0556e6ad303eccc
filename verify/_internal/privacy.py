"""The verifier's own reading of specs/privacy.md: each step's privacy record against the policy, the
accounted epsilon recomputed with Opacus's accountant, and (in replay) the clip factors re-measured and
the noise regenerated.

Twin of ``gradledger.training.privacy``, written again from the spec: the per-example norms are
measured here one example at a time (``torch.autograd.grad`` of each private example's loss through
the replayed forward), not by the trainer's batched autograd, so two methods must agree.
"""

from __future__ import annotations

import hashlib
import math
import struct
from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from gradledger.ledger.errors import UnusableInput, VerificationError


__all__ = ["PrivacyInvalid", "RunPrivacy", "add_noise", "check_privacy", "factor_error", "measured_factors",
           "noise_seed"]

NOISE_DOMAIN = b"gradledger/privacy/noise/v1"
CLIP_EPS = 1e-6
#: §2: how far a recorded clip factor may sit from the one re-measured here (relative): the two
#: per-example methods round differently; a factor above its bound by more is a failed step.
FACTOR_TOLERANCE = 1e-5
INSTALL_HINT = "pip install 'gradledger[privacy]'"


class PrivacyInvalid(VerificationError):
    """A step's privacy record does not follow the policy or the spec."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class RunPrivacy:
    """One run's accounting (§5): epsilon per private band and for the whole model, at ``delta``."""

    run_id: str
    steps: int
    delta: float
    per_band: dict[str, float]
    model: float
    per_rule: dict[str, float]  # each private rule's examples (the bands they reach)
    prv: float  # the model's, by Opacus's PRV accountant
    records: int = 0  # its PrivacySpent records, each recomputed (§5.1)


def noise_seed(run_seed: int, step: int, band: int) -> int:
    """§3: SHA-256(domain || u64 run seed || u64 step || u32 band), first 8 bytes big-endian, top bit cleared."""
    digest = hashlib.sha256(NOISE_DOMAIN + struct.pack(">QQI", run_seed, step, band)).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _binary32(x: Any) -> bool:
    return type(x) is float and math.isfinite(x) and struct.unpack(">f", struct.pack(">f", x))[0] == x


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(type(x) is type(y) and x == y for x, y in zip(a, b))


def _accountant(prv: bool = False) -> Any:
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError as exc:
        raise UnusableInput(f"this bundle's policy has private rules; accounting their privacy needs Opacus, "
                            f"which cannot be imported ({exc}): {INSTALL_HINT}") from None
    return PRVAccountant if prv else RDPAccountant


def _epsilon(sigma: float, history: Sequence[tuple[float, int]], delta: float, prv: bool = False) -> float:
    acc = _accountant(prv)()
    acc.history = [(sigma, q, n) for q, n in history]
    return float(acc.get_epsilon(delta))


def check_privacy(structure: Any) -> list[RunPrivacy]:
    """§4 and §5 over every governed run, in every mode: a run under a privacy policy records
    ``recipe.privacy`` at every step, its clip and noise the policy's, its sample rate the batch over
    the dataset, every factor in [0, 1] and binary32, exactly 1.0 for an example whose rule is not
    private; a run under another policy records none. Returns each private run's epsilon."""
    out: list[tuple[int, RunPrivacy]] = []  # by RunStarted seq
    rates: dict[int, list[float]] = {}  # private run seq -> each step's sample rate, in step order
    for run in structure.runs.values():
        if not run.governed:
            continue
        policy = structure.policies[run.settings["policy_seq"]]
        privacy = policy.privacy
        private = policy.private_rules
        count = len(structure.datasets[run.settings["dataset"]["seq"]].manifests)
        for seq in run.updates:
            u = structure.observations[seq].body
            p = (u.get("recipe") or {}).get("privacy")
            where = f"GovernedUpdate {seq} (step {u['step']})"
            if privacy is None:
                if p is not None:
                    raise PrivacyInvalid(f"{where}: records recipe.privacy, but its run's policy has no privacy section",
                                         seq)
                continue
            if p is None:
                raise PrivacyInvalid(f"{where}: its run's policy has private rules, and the step records no "
                                     "recipe.privacy (clip factors and noise): unclipped, unnoised", seq)
            if not _same(p["clip"], privacy["clip"]) or not _same(p["noise"], privacy["noise"]):
                raise PrivacyInvalid(f"{where}: recipe.privacy clip {p['clip']} and noise {p['noise']} are not the "
                                     f"policy's ({privacy['clip']}, {privacy['noise']})", seq)
            batch = len(u["batch"])
            if p["sample_rate"] != batch / count:
                raise PrivacyInvalid(f"{where}: recipe.privacy.sample_rate {p['sample_rate']!r} is not the batch "
                                     f"over the dataset ({batch} / {count})", seq)
            for i, (rule, f) in enumerate(zip(u["routing"]["rules"], p["factors"])):
                if rule not in private and f != 1.0:
                    raise PrivacyInvalid(f"{where}: example {u['batch'][i]} (batch position {i}) is not private "
                                         f"(rule {rule}) and its clip factor is {f!r}, not 1.0", seq)
            rates.setdefault(run.seq, []).append(p["sample_rate"])
        if privacy is None or not run.updates:
            continue
        got = _spent(policy, _history(rates[run.seq]))
        out.append((run.seq, RunPrivacy(run.run_id, len(run.updates), privacy["delta"],
                              {policy.bands[k]: e for k, e in enumerate(got["bands"]) if e is not None}, got["epsilon"],
                              {policy.rules[i].name: e for i, e in enumerate(got["rules"]) if e is not None},
                              got["prv"])))
    records = _check_records(structure, rates)
    return [replace(r, records=records.get(seq, 0)) for seq, r in out]


def _next_update(updates: Sequence[int], seq: int, default: int) -> int:
    j = bisect_right(updates, seq)
    return updates[j] if j < len(updates) else default


def _history(rates: Sequence[float]) -> list[tuple[float, int]]:
    """Consecutive equal sample rates merged: ``[(q, steps)]``."""
    history: list[tuple[float, int]] = []
    for q in rates:
        if history and history[-1][0] == q:
            history[-1] = (q, history[-1][1] + 1)
        else:
            history.append((q, 1))
    return history


def _noise(sigmas: Sequence[float | None]) -> float:
    """§5: several bands' noise together, ``(sum_b sigma_b^-2)^(-1/2)``."""
    return math.fsum(x ** -2 for x in sigmas if x is not None) ** -0.5


def _spent(policy: Any, history: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """§5 at the policy's delta: epsilon per band (None where no noise), per rule (None where not private; a
    private rule's over the bands its profile reaches), for the model (every private band), and the model's
    by the PRV accountant."""
    privacy = policy.privacy
    delta, noise = privacy["delta"], privacy["noise"]

    def spent(sigma: float, prv: bool = False) -> float:
        return _epsilon(sigma, history, delta, prv)

    rules: list[float | None] = []
    for r in policy.rules:
        reach = [noise[k] for k, m in enumerate(r.outcome.profile) if m != 0.0]
        rules.append(None if not r.private else spent(_noise(reach)) if reach else 0.0)
    model = _noise(noise)
    return {"epsilon": spent(model), "bands": [None if x is None else spent(x) for x in noise], "rules": rules,
            "prv": spent(model, prv=True)}


#: §5.1: how far a recorded epsilon may be from the one recomputed here (relative): the same accountant
#: over the same inputs; the margin is for another Opacus release's last digits, not for a claim.
EPSILON_TOLERANCE = 1e-6


def _check_records(structure: Any, rates: Mapping[int, list[float]]) -> dict[int, int]:
    """§5.1: every PrivacySpent is the trainer's, of a checkpoint after step 0 of a private run, recorded before
    the next update, and states the epsilon recomputed over the steps before it; every such checkpoint of an
    original run has exactly one."""
    seen: set[tuple[int, int]] = set()
    for obs in structure.observations:
        if obs.type != "PrivacySpent":
            continue
        body, seq = obs.body, obs.seq

        def bad(why: str) -> PrivacyInvalid:
            return PrivacyInvalid(f"PrivacySpent {seq}: {why}", seq)

        if body["format"] != 1:
            raise bad(f"format {body['format']!r} is not 1")
        run = structure.run_before(seq, body["run"])
        if run is None or run.seq not in rates:
            raise bad(f"run {body['run']!r} names no run under a privacy policy recorded before it")
        if obs.signer != structure.observations[run.seq].signer:
            raise bad("it is not signed by the run's trainer")
        privacy = structure.policies[run.settings["policy_seq"]].privacy
        step = body["step"]
        at = next((c for c in run.checkpoints if structure.observations[c].body["step"] == step), None)
        if type(step) is not int or step < 1 or at is None or not at < seq < _next_update(run.updates, at, len(
                structure.observations)) or (run.seq, step) in seen or step > len(rates[run.seq]):
            raise bad(f"step {step!r} is not a checkpoint after step 0 of the run, recorded once, before the next update")
        seen.add((run.seq, step))
        if type(body["delta"]) is not float or body["delta"] != privacy["delta"]:
            raise bad(f"delta {body['delta']!r} is not the policy's {privacy['delta']!r}")
        want = _spent(structure.policies[run.settings["policy_seq"]], _history(rates[run.seq][:step]))
        for key in ("bands", "rules"):
            claimed = body[key]
            if type(claimed) is not list or len(claimed) != len(want[key]) or not all(
                    (c is None) == (w is None) and (c is None or type(c) is float) for c, w in zip(claimed, want[key])):
                raise bad(f"{key} is not one epsilon per {key[:-1]}, null exactly where {key[:-1]} has none")
        pairs = [("the model", body["epsilon"], want["epsilon"]), ("the model (PRV)", body["prv"], want["prv"])]
        pairs += [(f"band {k}", c, w) for k, (c, w) in enumerate(zip(body["bands"], want["bands"])) if w is not None]
        pairs += [(f"rule {k}", c, w) for k, (c, w) in enumerate(zip(body["rules"], want["rules"])) if w is not None]
        for name, c, w in pairs:
            if type(c) is not float or not abs(c - w) <= EPSILON_TOLERANCE * max(1.0, abs(w)):
                raise bad(f"epsilon of {name} is {c!r} recorded, {w!r} recomputed over the {step} steps before it "
                          "(Opacus's accountant, specs/privacy.md §5)")
    for run_seq, _ in rates.items():
        run = structure.runs[run_seq]
        if run.branch_of is not None:
            continue
        for c in run.checkpoints:
            step = structure.observations[c].body["step"]
            if step > 0 and (run_seq, step) not in seen:
                raise PrivacyInvalid(f"Checkpoint {c} (step {step}) of run {run.run_id!r} has no PrivacySpent: a run "
                                     "under a privacy policy records its epsilon at every checkpoint after step 0 "
                                     "(specs/privacy.md §5.1)", c)
    counts: dict[int, int] = {}  # run seq -> its records
    for run_seq, _ in seen:
        counts[run_seq] = counts.get(run_seq, 0) + 1
    return counts


def check_form(p: Any, batch: int) -> str | None:
    """§4's shape of ``recipe.privacy`` (None when well formed, else why not)."""
    if not isinstance(p, dict) or set(p) != {"factors", "clip", "noise", "sample_rate"}:
        return "recipe.privacy is not {factors, clip, noise, sample_rate}"
    f = p["factors"]
    if type(f) is not list or len(f) != batch or not all(_binary32(x) and 0.0 <= x <= 1.0 for x in f):
        return f"recipe.privacy.factors is not one binary32 factor in [0, 1] per batch example ({batch})"
    for key in ("clip", "noise"):
        v = p[key]
        if type(v) is not list or not 1 <= len(v) <= 64 or not all(
                x is None or (type(x) is float and math.isfinite(x) and x > 0) for x in v):
            return f"recipe.privacy.{key} is not one positive number or null per band"
    q = p["sample_rate"]
    if type(q) is not float or not 0.0 < q <= 1.0:
        return "recipe.privacy.sample_rate is not in (0, 1]"
    return None


def measured_factors(leaf: Tensor, labels: Tensor, example_loss: Callable[[Tensor, Tensor], Tensor],
                     rows: Sequence[int], bands: Sequence[Sequence[Tensor]], clip: Sequence[float | None]) -> list[float]:
    """§2, one example at a time: ``min_b min(1, C_b / (|g_ib| + 1e-6))`` over the bands with a clip, in binary64."""
    out = []
    private = [k for k, c in enumerate(clip) if c is not None]
    params = [p for k in private for p in bands[k]]
    for i in rows:
        loss = example_loss(leaf[i:i + 1], labels[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        factor, pos = 1.0, 0
        for k in private:
            n = len(bands[k])
            sq = math.fsum(float((g.to(torch.float64) ** 2).sum()) for g in grads[pos:pos + n] if g is not None)
            pos += n
            c = clip[k]
            assert c is not None
            factor = min(factor, c / (math.sqrt(sq) + CLIP_EPS))
        out.append(factor)
    return out


def factor_error(recorded: float, measured: float) -> float:
    """How far a recorded factor is from the re-measured one, relative to it (0 when they agree)."""
    return abs(recorded - measured) / max(measured, 1e-30)


def add_noise(bands: Sequence[Sequence[Tensor]], p: Mapping[str, Any], run_seed: int, step: int, batch: int) -> None:
    """§3: ``sigma_b * C_b / B`` times standard normal draws of a generator seeded ``noise_seed(run seed, step,
    b)``, into band ``b``'s gradients in band order (zeros first where a parameter has none)."""
    for k, (clip, sigma) in enumerate(zip(p["clip"], p["noise"])):
        if clip is None or sigma is None:
            continue
        std = sigma * clip / batch
        gen = torch.Generator().manual_seed(noise_seed(run_seed, step, k))
        with torch.no_grad():
            for param in bands[k]:
                z = torch.randn(param.shape, generator=gen, dtype=param.dtype)
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.add_(z, alpha=std)
