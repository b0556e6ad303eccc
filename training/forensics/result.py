"""A trace's answer, ranked: sources, authority classes, bands, step ranges and training examples, each
with its score, its share and an uncertainty (specs/forensics.md §5).

Scores are in units of the query loss: an example's score is the mean, over the query's examples, of
the first-order decrease of the query loss its recorded updates made (positive: it taught the
behavior). A source's score is the sum of its share (shares.py) of each example's score. A share is
the score's part of the positive total (what pushed toward the behavior). The uncertainty is a
bootstrap over the query's examples (``BOOTSTRAP`` resamples, seeded): each score's standard error,
its 95 % interval, and for sources the fraction of resamples in which it ranks first.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .methods import Influence
from .shares import UNATTRIBUTED, SourceInfo, example_shares, source_table

__all__ = ["BOOTSTRAP", "influence_report", "loss_trace_report"]

#: Bootstrap resamples of the query's examples, drawn from a generator seeded with ``BOOTSTRAP_SEED``.
BOOTSTRAP, BOOTSTRAP_SEED = 200, 0
#: At most this many step ranges in a report.
STEP_RANGES = 20


def _shares(fields: Sequence[Mapping[str, Any]], registry: Any) -> tuple[list[dict[str, float]], dict[str, SourceInfo],
                                                                     list[str]]:
    """Each example's source shares, the sources' credentials, and the source names in report order."""
    shares = [example_shares(f) for f in fields]
    table = source_table(fields, registry)
    names = sorted(table) + ([UNATTRIBUTED] if any(UNATTRIBUTED in s for s in shares) else [])
    return shares, table, names


def _share_matrix(shares: Sequence[Mapping[str, float]], names: list[str]) -> Tensor:
    col = {n: i for i, n in enumerate(names)}
    m = torch.zeros((len(names), len(shares)), dtype=torch.float64)
    for z, row in enumerate(shares):
        for name, share in row.items():
            m[col[name], z] = share
    return m


def _positive_share(scores: Tensor) -> Tensor:
    pos = scores.clamp(min=0)
    total = float(pos.sum())
    return pos / total if total > 0 else torch.zeros_like(scores)


def _bootstrap(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``matrix`` [rows, Q]: per row the standard error, 2.5 % and 97.5 % quantiles of the mean over a
    resampled query, and the fraction of resamples in which the row is the largest."""
    q = matrix.shape[1]
    gen = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    picks = torch.randint(0, q, (BOOTSTRAP, q), generator=gen)
    boot = torch.stack([matrix[:, p].mean(1) for p in picks], 1)  # [rows, R]
    top = torch.zeros(matrix.shape[0], dtype=torch.float64)
    if matrix.shape[0]:
        top.index_add_(0, boot.argmax(0), torch.ones(BOOTSTRAP, dtype=torch.float64))
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=1)
    return boot.std(1, correction=1), lo, hi, top / BOOTSTRAP


def _ranked(matrix: Tensor, labels: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``matrix`` ``[rows, Q]`` as entries (each ``labels`` row with its score, the mean over
    the query, its share, bootstrap standard error, 95 % interval and ``p_top``), by score, largest first."""
    scores = matrix.mean(1)
    err, lo, hi, top = _bootstrap(matrix)
    share = _positive_share(scores)
    return [{**labels[i], "score": float(scores[i]), "share": float(share[i]), "stderr": float(err[i]),
             "ci95": [float(lo[i]), float(hi[i])], "p_top": float(top[i])}
            for i in sorted(range(len(labels)), key=lambda i: -float(scores[i]))]


def _source(name: str, table: Mapping[str, SourceInfo]) -> dict[str, Any]:
    """A source as a report names it: its name, credential key id and authority path (None if unattributed)."""
    info = table.get(name)
    return {"source": name, "key_id": info.key_id.hex() if info else None, "path": info.path if info else None}


def _ranges(steps: Tensor) -> list[dict[str, Any]]:
    n = int(steps.shape[0])
    width = max(1, -(-n // STEP_RANGES))
    total = float(steps.clamp(min=0).sum())
    out = []
    for lo in range(0, n, width):
        s = float(steps[lo : lo + width].sum())
        out.append({"from": lo, "to": min(n, lo + width) - 1, "score": s,
                    "share": (max(s, 0.0) / total) if total > 0 else 0.0})
    return out


def influence_report(found: Influence, *, fields: Sequence[Mapping[str, Any]], registry: Any,
                     band_names: Sequence[str], top: int) -> dict[str, Any]:
    """The ranked answer of the replay or checkpoints method."""
    acc = found.acc
    q = acc.examples.shape[1]
    rows, table, names = _shares(fields, registry)
    per_source = _share_matrix(rows, names) @ acc.examples  # [S, Q]
    sources = _ranked(per_source, [_source(n, table) for n in names])
    paths: dict[str, Tensor] = {}
    for i, name in enumerate(names):
        key = table[name].path if name in table else UNATTRIBUTED
        paths[key] = paths.get(key, torch.zeros(q, dtype=torch.float64)) + per_source[i]
    p_names = sorted(paths)
    p_matrix = torch.stack([paths[p] for p in p_names]) if p_names else torch.zeros((0, q), dtype=torch.float64)
    authorities = _ranked(p_matrix, [{"path": p} for p in p_names])
    b_scores = acc.bands.mean(1)
    b_err, _, _, _ = _bootstrap(acc.bands)
    b_share = _positive_share(b_scores)
    bands = [{"band": band_names[k], "score": float(b_scores[k]), "share": float(b_share[k]),
              "stderr": float(b_err[k])} for k in range(len(band_names))]
    e_scores = acc.examples.mean(1)
    e_share = _positive_share(e_scores)
    order = torch.argsort(e_scores, descending=True)[:top].tolist()
    e_err = acc.examples[order].std(1, correction=1) / max(1, q) ** 0.5 if q > 1 else torch.zeros(len(order))
    examples = [{"index": z, "score": float(e_scores[z]), "share": float(e_share[z]), "stderr": float(e_err[r]),
                 "label": int(fields[z]["label"]), "sources": sorted(rows[z])}
                for r, z in enumerate(order)]
    out: dict[str, Any] = {
        "predicted_change": -float(e_scores.sum()),
        "sources": sources[:top], "authorities": authorities[:top], "bands": bands,
        "steps": _ranges(acc.steps), "examples": examples,
        "approximate": found.approximate, "notes": list(found.notes),
        "replayed_steps": found.steps, "bit_exact_steps": found.exact_steps,
    }
    if acc.self_influence is not None:
        # The examples the model had to move furthest to fit: mislabel and memorization candidates.
        ranked = torch.argsort(acc.self_influence, descending=True)[:top].tolist()
        out["self_influence"] = [{"index": z, "score": float(acc.self_influence[z]), "label": int(fields[z]["label"]),
                                  "sources": sorted(rows[z])} for z in ranked]
    return out


def loss_trace_report(mean: Tensor, count: Tensor, *, fields: Sequence[Mapping[str, Any]], registry: Any,
                      top: int) -> dict[str, Any]:
    """The ranked answer of the loss-trace method: examples by mean recorded loss (a label-noise and
    memorization signal, not an attribution), sources by the share-weighted mean loss of their examples."""
    seen = count > 0
    rows, table, names = _shares(fields, registry)
    shares = _share_matrix(rows, names) * seen
    values = torch.nan_to_num(mean, nan=0.0)
    mass = shares.sum(1)
    s_mean = torch.where(mass > 0, (shares @ values) / mass.clamp(min=1e-300), torch.zeros_like(mass))
    # Standard error of a weighted mean over the source's examples (Kish's effective sample size).
    var = torch.where(mass > 0, (shares * (values - s_mean[:, None]) ** 2).sum(1) / mass.clamp(min=1e-300),
                      torch.zeros_like(mass))
    n_eff = torch.where(mass > 0, mass ** 2 / (shares ** 2).sum(1).clamp(min=1e-300), torch.ones_like(mass))
    s_err = (var / n_eff).sqrt()
    sources = [{**_source(names[i], table), "score": float(s_mean[i]), "stderr": float(s_err[i]),
                "examples": float(mass[i])} for i in sorted(range(len(names)), key=lambda i: -float(s_mean[i]))]
    ranked = torch.argsort(torch.where(seen, values, torch.full_like(values, -1.0)), descending=True)
    examples = [{"index": z, "score": float(mean[z]), "recorded": int(count[z]), "label": int(fields[z]["label"]),
                 "sources": sorted(rows[z])} for z in ranked[:top].tolist() if bool(seen[z])]
    return {"sources": sources[:top], "examples": examples, "approximate": False,
            "notes": ["loss-trace ranks by mean recorded loss: a label-noise and memorization signal, "
                      "not an attribution of the query"]}
