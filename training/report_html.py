"""The demo's report page: one self-contained HTML file with inline SVG charts (no scripts, no
plotting library), drawn from the figures that ``demo.run_demo`` also writes to report.json."""

from __future__ import annotations

from html import escape
from typing import Any, Mapping, Sequence

CLASS_COLORS = {"experts": "#2b6cb0", "crowd": "#dd6b20", "heuristics": "#38a169"}
BEFORE, AFTER = "#c05621", "#2f855a"
PASS, FAIL, SKIP = "#2f855a", "#c53030", "#718096"
MAX_POINTS = 240

CSS = """
body{font:15px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1a202c;
 margin:0;background:#f7fafc}
main{max-width:1080px;margin:0 auto;padding:28px 24px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 6px}
p.lead{color:#4a5568;margin:0 0 18px}p.note{color:#4a5568;font-size:13.5px;margin:6px 0 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:14px;margin:18px 0}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:10px;padding:14px 16px}
.card .k{font-size:12.5px;text-transform:uppercase;letter-spacing:.04em;color:#718096}
.card .v{font-size:26px;font-weight:650;margin-top:2px}.card .s{font-size:13px;color:#4a5568}
.panel{background:#fff;border:1px solid #e2e8f0;border-radius:10px;padding:16px;margin-top:10px}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.badge{display:inline-block;padding:3px 12px;border-radius:999px;color:#fff;font-weight:650;font-size:14px}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #edf2f7;vertical-align:top}
th{color:#4a5568;font-weight:600}td.st{font-weight:650;white-space:nowrap}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace;background:#edf2f7;padding:1px 5px;border-radius:4px}
.legend span{display:inline-flex;align-items:center;margin-right:16px;font-size:13px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px}
svg text{font-family:inherit}
"""


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2g}" if abs(x) < 10 else f"{x:.0f}"
    return f"{x:.2g}"


def _bins(values: Sequence[float], n: int) -> list[float]:
    """Mean over ``n`` equal bins (or the values themselves when there are few)."""
    if len(values) <= n:
        return list(values)
    out = []
    for b in range(n):
        lo, hi = b * len(values) // n, (b + 1) * len(values) // n
        chunk = values[lo:hi] or values[lo:lo + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def stacked_area(title: str, steps: Sequence[int], layers: Mapping[str, Sequence[float]], *, width: int = 330,
                 height: int = 190, y_max: float | None = None) -> str:
    """One band's update norm over steps, stacked by authority class."""
    left, right, top, bottom = 44, 8, 24, 28
    w, h = width - left - right, height - top - bottom
    names = [c for c in CLASS_COLORS if c in layers]
    binned = {c: _bins(list(layers[c]), MAX_POINTS) for c in names}
    xs = _bins([float(s) for s in steps], MAX_POINTS)
    count = len(xs)
    totals = [sum(binned[c][i] for c in names) for i in range(count)]
    top_value = y_max if y_max is not None else max(totals, default=0.0)
    top_value = top_value or 1.0
    x0, x1 = (xs[0], xs[-1]) if count else (0.0, 1.0)
    first, last = (steps[0], steps[-1]) if steps else (0, 0)
    span = (x1 - x0) or 1.0

    def px(x: float) -> float:
        return left + (x - x0) / span * w

    def py(y: float) -> float:
        return top + h - min(y, top_value) / top_value * h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{left}" y="15" font-size="13" font-weight="600">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#f7fafc" stroke="#e2e8f0"/>']
    for frac in (0.5, 1.0):
        y = py(top_value * frac)
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e2e8f0"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10.5" text-anchor="end" fill="#718096">'
                     f'{_fmt(top_value * frac)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + h + 4}" font-size="10.5" text-anchor="end" fill="#718096">0</text>')
    base = [0.0] * count
    if count:
        for c in names:
            upper = [b + v for b, v in zip(base, binned[c])]
            if any(v > 0 for v in binned[c]):
                pts = [f"{px(xs[i]):.1f},{py(upper[i]):.1f}" for i in range(count)]
                pts += [f"{px(xs[i]):.1f},{py(base[i]):.1f}" for i in reversed(range(count))]
                parts.append(f'<polygon points="{" ".join(pts)}" fill="{CLASS_COLORS[c]}" fill-opacity="0.78">'
                             f'<title>{escape(c)}</title></polygon>')
            base = upper
        for x, label, anchor in ((x0, first, "start"), (x1, last, "end")):
            parts.append(f'<text x="{px(x):.1f}" y="{top + h + 15}" font-size="10.5" text-anchor="{anchor}" '
                         f'fill="#718096">{label}</text>')
        parts.append(f'<text x="{left + w / 2:.1f}" y="{top + h + 26}" font-size="10.5" text-anchor="middle" '
                     f'fill="#718096">step</text>')
        if top_value and max(totals, default=0.0) == 0.0:
            parts.append(f'<text x="{left + w / 2:.1f}" y="{top + h / 2:.1f}" font-size="12" text-anchor="middle" '
                         f'fill="#718096">no updates</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, groups: Sequence[tuple[str, Sequence[tuple[str, float | None, str]]]], *,
              width: int = 330, height: int = 210, percent: bool = False, y_max: float | None = None) -> str:
    """Grouped bars: ``groups`` is [(group label, [(bar label, value or None, color)])]."""
    left, right, top, bottom = 40, 8, 24, 40
    w, h = width - left - right, height - top - bottom
    values = [v for _, bars in groups for _, v, _ in bars if v is not None]
    top_value = y_max if y_max is not None else (max(values, default=0.0) * 1.15 or 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{left}" y="15" font-size="13" font-weight="600">{escape(title)}</text>',
             f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" stroke="#a0aec0"/>']
    gw = w / max(len(groups), 1)
    for g, (label, bars) in enumerate(groups):
        bw = min(44.0, (gw - 16) / max(len(bars), 1))
        start = left + g * gw + (gw - bw * len(bars)) / 2
        for b, (name, value, color) in enumerate(bars):
            x = start + b * bw
            if value is None:
                parts.append(f'<text x="{x + bw / 2:.1f}" y="{top + h - 6}" font-size="10" text-anchor="middle" '
                             f'fill="#718096">n/a</text>')
                continue
            bh = min(value, top_value) / top_value * h
            text = f"{value:.1%}" if percent else _fmt(value)
            parts.append(f'<rect x="{x + 2:.1f}" y="{top + h - bh:.1f}" width="{bw - 4:.1f}" height="{bh:.1f}" '
                         f'fill="{color}" rx="2"><title>{escape(name)}: {text}</title></rect>')
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{top + h - bh - 4:.1f}" font-size="11" '
                         f'text-anchor="middle">{text}</text>')
        parts.append(f'<text x="{left + g * gw + gw / 2:.1f}" y="{top + h + 16}" font-size="12" '
                     f'text-anchor="middle">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _max_off_diagonal(matrix: Sequence[Sequence[int]]) -> int:
    return max((v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j), default=0)


def confusion_svg(title: str, matrix: Sequence[Sequence[int]], highlight: Sequence[int], *, cell: int = 21,
                  scale: int | None = None) -> str:
    """A 10x10 confusion heatmap (rows true, columns predicted); the swapped classes' cells outlined.

    Off-diagonal cells shade by ``scale`` (default this matrix's largest error count); give two
    matrices the same scale to compare them."""
    n = len(matrix)
    left, top = 30, 36
    size = n * cell
    width, height = left + size + 8, top + size + 24
    off = scale or _max_off_diagonal(matrix) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="0" y="14" font-size="13" font-weight="600">{escape(title)}</text>',
             f'<text x="{left + size / 2}" y="30" font-size="10.5" text-anchor="middle" fill="#718096">predicted</text>']
    for i in range(n):
        parts.append(f'<text x="{left - 6}" y="{top + i * cell + cell * 0.7:.1f}" font-size="10.5" '
                     f'text-anchor="end" fill="#4a5568">{i}</text>')
        parts.append(f'<text x="{left + i * cell + cell / 2:.1f}" y="{top + size + 14}" font-size="10.5" '
                     f'text-anchor="middle" fill="#4a5568">{i}</text>')
        for j in range(n):
            v = matrix[i][j]
            if i == j:
                fill = "#e2e8f0" if v == 0 else "#cbd5e0"
            else:
                a = 0.0 if v == 0 else 0.15 + 0.85 * v / off
                fill = f"rgba(197,48,48,{a:.2f})" if v else "#ffffff"
            x, y = left + j * cell, top + i * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#edf2f7">'
                         f'<title>true {i}, predicted {j}: {v}</title></rect>')
            if v:
                color = "#fff" if i != j and v / off > 0.55 else "#1a202c"
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell * 0.68:.1f}" font-size="9.5" '
                             f'text-anchor="middle" fill="{color}">{v}</text>')
    a, b = highlight
    for i, j in ((a, b), (b, a)):
        parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" fill="none" '
                     f'stroke="#1a202c" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def profile_svg(profile: Sequence[float], bands: Sequence[str], *, width: int = 240) -> str:
    """A routing profile as three small bars, head first."""
    bw = width / max(len(profile), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="30" role="img" '
             f'aria-label="profile {escape(str(list(profile)))}">']
    for k, (m, band) in enumerate(zip(profile, bands)):
        x = k * bw
        parts.append(f'<rect x="{x + 2:.1f}" y="4" width="{bw - 4:.1f}" height="12" fill="#edf2f7" rx="2"/>')
        if m > 0:
            parts.append(f'<rect x="{x + 2:.1f}" y="4" width="{(bw - 4) * m:.1f}" height="12" fill="#4a5568" rx="2"/>')
        parts.append(f'<text x="{x + bw / 2:.1f}" y="27" font-size="9.5" text-anchor="middle" fill="#718096">'
                     f'{escape(band)} &#215;{m:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heat_map(title: str, rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float]], top: float, *,
             cell: int = 24) -> str:
    """A rows x columns grid shaded by ``value / top`` (white: 0, dark: ``top``), each cell labelled."""
    left, head = 62, 30
    w, h = left + cell * len(cols) + 4, head + cell * len(rows) + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{escape(title)}">',
             f'<text x="2" y="12" font-size="11" font-weight="600" fill="#2d3748">{escape(title)}</text>']
    for j, c in enumerate(cols):
        parts.append(f'<text x="{left + j * cell + cell / 2:.1f}" y="{head - 4}" font-size="10" text-anchor="middle" '
                     f'fill="#4a5568">{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = head + i * cell
        parts.append(f'<text x="{left - 4}" y="{y + cell / 2 + 4:.1f}" font-size="10" text-anchor="end" '
                     f'fill="#4a5568">{escape(r)}</text>')
        for j, v in enumerate(values[i]):
            share = 0.0 if top <= 0 else max(0.0, min(1.0, v / top))
            shade = int(round(255 - 200 * share))
            ink = "#fff" if share > 0.55 else "#2d3748"
            parts.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="rgb({shade},{shade},{min(255, shade + 30)})"><title>{escape(r)}, {escape(cols[j])}: '
                         f'{v:.2f} bits</title></rect>')
            parts.append(f'<text x="{left + j * cell + cell / 2 - 0.5:.1f}" y="{y + cell / 2 + 3:.1f}" font-size="8.5" '
                         f'text-anchor="middle" fill="{ink}">{v:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _depth_section(d: Mapping[str, Any]) -> str:
    """Entropy depth profiles (specs/dynamics.md §5): per band (deepest on top) and class, how many bits of
    uncertainty the model's evidence still holds on the held-out digits, at step 0 and at the end."""
    order = list(range(len(d["bands"])))[::-1]
    rows = [d["bands"][k] for k in order]
    cols = [str(c) for c in d["classes"]]
    first = heat_map(f"step {d['steps'][0]}", rows, cols, [d["first"][k] for k in order], d["top_bits"])
    last = heat_map(f"step {d['steps'][-1]}", rows, cols, [d["last"][k] for k in order], d["top_bits"])
    worst = sorted(range(len(cols)), key=lambda i: -d["last"][-1][i])[:3]
    means = ", ".join(f'{b} {d["means"][0][k]:.2f} &#8594; {d["last_mean"][k]:.2f}' for k, b in enumerate(d["bands"]))
    return ('<h2>Confusion at depth</h2><p class="lead">How unsure the model\'s class evidence is at each band\'s '
            f'boundary, in bits (0: sure; {d["top_bits"]:.2f}: no idea), on the {d["held_out"]} held-out test digits: '
            'a nearest-class-mean read-out recorded at every checkpoint as a signed DepthProfile and recomputed by the '
            f'verifier from the checkpoint\'s weights. Band means: {means}. Deepest band most confused about digits '
            f'{", ".join(cols[i] for i in worst)}: where the next annotation budget goes.</p>'
            f'<div class="row"><div class="panel">{first}</div><div class="panel">{last}</div></div>')


def _card(key: str, value: str, sub: str = "") -> str:
    return f'<div class="card"><div class="k">{escape(key)}</div><div class="v">{value}</div><div class="s">{sub}</div></div>'


def _status_color(status: str) -> str:
    return {"pass": PASS, "ok": PASS, "fail": FAIL, "failed": FAIL}.get(status, SKIP)


def _verdict(figures: Mapping[str, Any]) -> tuple[str, str]:
    rep = figures.get("verifier")
    if rep is None:
        stage = next((s for s in figures["stages"] if s["name"] == "verify"), None)
        return "verifier did not run" + (f" ({stage['status']})" if stage else ""), SKIP
    if not rep.get("verified"):
        return "NOT VERIFIED", FAIL
    verdict = rep.get("verdict")
    if verdict == "tolerance":
        return "VERIFIED WITHIN TOLERANCE", PASS
    if verdict == "structure only":  # the weights were not checked: not a pass colour
        return "VERIFIED STRUCTURE ONLY (weights not checked)", SKIP
    return "VERIFIED", PASS


def _feedback_section(fb: Mapping[str, Any]) -> str:
    """What to review next (specs/dynamics.md §3) and what the run memorized (§1), from the ledger alone."""
    src = "".join(f'<tr><td>{escape(str(r["name"]))}</td><td>{r["prioritized"]}</td><td>{r["trained"]}</td>'
                  f'<td>{r["share"]:.0%}</td></tr>' for r in fb["sources"])
    ex = "".join(f'<tr><td>#{e["index"]}</td><td>{e["label"]}</td><td>{escape(", ".join(e["sources"]))}</td>'
                 f'<td>{e["priority"]:.3f}</td><td>{escape(", ".join(f"{k} {v:.2f}" for k, v in e["reasons"].items()))}'
                 '</td></tr>' for e in fb["examples"])
    mem = ", ".join(f'#{m["index"]} (label {m["label"]}, {escape("/".join(m["sources"]))})' for m in fb["memorized"])
    routed = fb.get("memorized_routing")
    governance = "" if routed is None else (
        f' The policy routes a flagged example by its <code>memorized</code> rule from the checkpoint that flags it on: '
        f'{routed["examples"]} flagged examples trained the head only, {routed["trainings"]} times in all; the verifier '
        'recomputed the flags and that routing (specs/dynamics.md §2.4).')
    c = fb.get("canaries")
    if c is not None:
        governance += (f' Canaries: {c["inserted"]} random digits with random labels were trained, {c["references"]} '
                       'more were drawn into batches but routed into no band; the last scan ranks each trained '
                       f'canary\'s recorded loss among the references: a mean exposure of {c["mean_exposure_bits"]:.2f} '
                       f'bits of at most {c["bound_bits"]:.2f} (1.44 expected of canaries not memorized; '
                       'specs/dynamics.md §4).')
    return (f'<h2>What to review next</h2><p class="lead">The {fb["written"]} of {fb["trained"]} trained examples with '
            'the most evidence that their label needs a second look (recorded loss, memorization, disagreement between '
            f'sources, influence on the traced confusion), written as a Label Studio import '
            f'(<code>{escape(fb["file"])}</code>). Sources by the share of their examples among them:</p>'
            f'<div class="row"><div class="panel"><table><tr><th>source</th><th>prioritized</th><th>trained</th>'
            f'<th>share</th></tr>{src}</table></div><div class="panel"><table><tr><th>example</th><th>label</th>'
            f'<th>sources</th><th>priority</th><th>reasons</th></tr>{ex}</table></div></div>'
            f'<p class="note">Memorized (the MemorizationScan the run recorded at its last checkpoint, by '
            f'{escape(str(fb.get("memorized_method") or "its method"))}, recomputed by the verifier): '
            f'{mem or "none flagged"}.{governance} <code>{escape(fb["command"])}</code></p>')


def render_report(figures: Mapping[str, Any]) -> str:
    """The whole page."""
    a, b = figures["swap"]
    faulty = escape(figures["faulty_source"])
    before, after = figures["before"], figures.get("after")
    labels, bands = figures["labels"], figures["bands"]
    band_names = list(bands["by_class"])
    verdict, verdict_color = _verdict(figures)
    body: list[str] = []

    body.append("<h1>gradledger: governed training, retirement, exact unlearning</h1>")
    body.append(f'<p class="lead">A small MLP trained on scikit-learn\'s handwritten digits under a signed routing '
                f'policy. Crowd worker <b>{faulty}</b> swapped digits {a} and {b}; the crowd authority retired it, '
                f'the run was unlearned exactly, and a standalone verifier checked the exported bundle with nothing '
                f'but the root public key. Verdict: <span class="badge" style="background:{verdict_color}">'
                f'{escape(verdict)}</span></p>')

    def acc(ev: Mapping[str, Any] | None) -> str:
        return "n/a" if ev is None else f"{ev['accuracy']:.1%}"

    def swaps(ev: Mapping[str, Any] | None) -> str:
        return "n/a" if ev is None else str(ev["swap_errors"])

    rep = figures.get("verifier")
    checks = rep.get("checks", []) if rep else []
    passed = sum(1 for c in checks if c.get("status") == "pass")
    body.append('<div class="cards">')
    body.append(_card("test accuracy", f"{acc(before)} &rarr; {acc(after)}", "original &rarr; after unlearning"))
    body.append(_card(f"{a}\u2194{b} confusions", f"{swaps(before)} &rarr; {swaps(after)}",
                      f"test digits {a} and {b} mistaken for each other"))
    body.append(_card("ledger", f"{figures['ledger']['size']:,}",
                      f"signed observations; {figures['training']['steps']} governed steps"))
    body.append(_card("verifier", f"{passed}/{len(checks)}" if rep else "n/a",
                      "checks passed" if rep else "the verifier did not run"))
    body.append("</div>")

    # -- who wrote where
    y_max = max((sum(v) for band in band_names for v in zip(*bands["by_class"][band].values())), default=0.0)
    charts = "".join(stacked_area(f"{band} band", bands["steps"], bands["by_class"][band]) for band in band_names)
    legend = "".join(f'<span><i style="background:{col}"></i>{escape(c)}</span>' for c, col in CLASS_COLORS.items())
    body.append("<h2>Who wrote into which band</h2>")
    body.append(f'<div class="panel"><div class="legend">{legend}</div><div class="row">{charts}</div>'
                '<p class="note">Per band, each step\'s update norm (L2 of the weight change, from the signed '
                'GovernedUpdate records) split by each authority class\'s share of the band\'s writes (the sum of '
                'the routing multipliers of the examples it labeled). The policy keeps crowd and heuristic labels '
                'out of the embedding band: only experts write there. '
                f'Each band has its own scale (largest stacked value over all bands: {_fmt(y_max)}).</p></div>')

    # -- before and after
    def bars(key: str) -> list[tuple[str, float | None, str]]:
        return [("original", None if before is None else before["swap"][key], BEFORE),
                ("unlearned", None if after is None else after["swap"][key], AFTER)]

    acc_chart = bar_chart("test accuracy", [("original", [("original", before["accuracy"], BEFORE)]),
                                            ("unlearned", [("unlearned", after["accuracy"] if after else None, AFTER)])],
                          percent=True, y_max=1.0, width=250)
    swap_chart = bar_chart(f"{a}\u2194{b} confusions (test)", [(f"{a} read as {b}", bars(f"{a}->{b}")),
                                                               (f"{b} read as {a}", bars(f"{b}->{a}"))], width=300)
    shade = max(_max_off_diagonal(before["confusion"]), _max_off_diagonal(after["confusion"]) if after else 0)
    mats = confusion_svg("original model", before["confusion"], (a, b), scale=shade)
    mats += confusion_svg("after unlearning", after["confusion"], (a, b), scale=shade) if after else (
        '<div class="card" style="width:220px"><div class="k">after unlearning</div>'
        '<div class="s">not available: the unlearning stage did not run</div></div>')
    legend2 = (f'<div class="legend"><span><i style="background:{BEFORE}"></i>original</span>'
               f'<span><i style="background:{AFTER}"></i>after unlearning {faulty}</span></div>')
    if figures.get("trace") is not None:
        from .forensics.html import trace_section

        body.append(trace_section(figures["trace"]["report"], title=f"Who taught the model to confuse {a} and {b}"))
        record = figures["trace"]["report"].get("record")
        recorded = (f' Recorded in the ledger as ForensicTrace {record["seq"]} (result digest '
                    f'<code>{escape(record["result_digest"][:16])}</code>), which <code>gradledger-verify '
                    f'--check-traces</code> recomputes.') if record else ""
        body.append(f'<p class="note">Investigated before the retirement, from the ledger alone: '
                    f'<code>{escape(figures["trace"]["command"])}</code>.{recorded}</p>')
    if figures.get("feedback") is not None:
        body.append(_feedback_section(figures["feedback"]))
        if figures["feedback"].get("depth") is not None:
            body.append(_depth_section(figures["feedback"]["depth"]))
    body.append(f"<h2>Before and after unlearning {faulty}</h2>")
    body.append(f'<div class="panel">{legend2}<div class="row">{acc_chart}{swap_chart}</div>'
                f'<div class="row" style="margin-top:10px">{mats}</div>'
                f'<p class="note">Confusion matrices on the {labels["test"]} held-out test digits (rows: true digit, '
                f'columns: prediction; the {a}/{b} cells are outlined; both shaded on one scale). Both models are loaded from their final '
                'checkpoints in the ledger, each tensor checked against its recorded digest.</p>')
    unl = figures.get("unlearning")
    if unl:
        body.append(f'<p class="note">Unlearning rewound to the checkpoint at step {unl.get("rewind_step")} and '
                    f'replayed {unl.get("replayed_steps")} recorded steps without {faulty} (mode '
                    f'<b>{escape(str(unl.get("mode")))}</b>); certificate at observation {unl.get("certificate_seq")}.</p>')
    body.append("</div>")

    # -- labels and routing
    body.append("<h2>Where the labels came from, and where they were allowed to go</h2>")
    rows = "".join(f"<tr><td>{escape(c)}</td><td>acme/{escape(c)}</td><td>{n}</td></tr>"
                   for c, n in labels["by_class"].items())
    pol = figures["policy"]
    rules = "".join(f"<tr><td><code>{escape(r['name'])}</code></td><td>{profile_svg(r['profile'], band_names)}</td></tr>"
                    for r in pol["rules"])
    rules += f"<tr><td><code>default</code></td><td>{profile_svg(pol['default'], band_names)}</td></tr>"
    body.append('<div class="panel"><div class="row"><div style="flex:1;min-width:280px">'
                f"<table><tr><th>authority class</th><th>path</th><th>training labels</th></tr>{rows}</table>"
                f'<p class="note">{faulty} labeled {labels["faulty_labeled"]} examples and swapped '
                f'{labels["faulty_votes_swapped"]} votes between {a} and {b}; {labels["wrong_labels"]} of '
                f'{labels["train"]} training labels are wrong. Labeling functions\' accuracies on the expert seed '
                f'set: {escape(", ".join(f"{k} {v:.0%}" for k, v in labels["lf_accuracy"].items()))}.</p></div>'
                '<div style="flex:1;min-width:280px">'
                f"<table><tr><th>policy rule (first match wins)</th><th>gradient multiplier per band</th></tr>"
                f"{rules}</table>"
                f'<p class="note">Policy <code>{escape(pol["name"])}</code>, signed by the governance root, digest '
                f'<code>{escape(pol["digest"][:16])}…</code>.</p></div></div></div>')

    # -- the verifier
    body.append("<h2>What the verifier checked</h2>")
    body.append(f'<div class="panel"><p class="note" style="margin-top:0">Run as a regulator would, in a separate '
                f'process, from the bundle and the root public key only:<br><code>{escape(figures["verifier_command"])}'
                "</code></p>")
    if rep:
        trs = "".join(
            f'<tr><td class="st" style="color:{_status_color(str(c.get("status")))}">{escape(str(c.get("status")))}</td>'
            f'<td>{escape(str(c.get("name")))}</td><td>{escape(str(c.get("detail", "")))}</td></tr>' for c in checks)
        body.append(f"<table><tr><th>status</th><th>check</th><th>detail</th></tr>{trs}</table>")
        certs = rep.get("certificates") or []
        if certs:
            ctr = "".join(
                f'<tr><td class="st" style="color:{_status_color(str(c.get("status")))}">{escape(str(c.get("status")))}'
                f'</td><td>{escape(str(c.get("seq", "")))}</td><td>{escape(str(c.get("source", "")))}</td>'
                f'<td>{escape(str(c.get("mode", "")))}</td><td>{escape(str(c.get("detail", "")))}</td></tr>'
                for c in certs)
            body.append('<table style="margin-top:12px"><tr><th>certificate</th><th>observation</th><th>source</th>'
                        f"<th>mode</th><th>detail</th></tr>{ctr}</table>")
        figs = rep.get("figures") or {}
        if figs:
            ftr = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))[:200]}</td></tr>" for k, v in figs.items())
            body.append(f'<table style="margin-top:12px"><tr><th>verifier figure</th><th>value</th></tr>{ftr}</table>')
        if rep.get("first_failure"):
            f = rep["first_failure"]
            body.append(f'<p class="note" style="color:{FAIL}">First failure: {escape(str(f.get("name")))}: '
                        f'{escape(str(f.get("detail")))}</p>')
    else:
        stage = next((s for s in figures["stages"] if s["name"] == "verify"), {"detail": "did not run"})
        body.append(f'<p class="note" style="color:{FAIL}">The verifier did not produce a report: '
                    f'{escape(stage["detail"])}</p>')
    body.append("</div>")

    # -- stages
    trs = "".join(f'<tr><td class="st" style="color:{_status_color(s["status"])}">{escape(s["status"])}</td>'
                  f'<td>{escape(s["name"])}</td><td>{escape(s["detail"])}</td><td>{s["seconds"]:.1f}s</td></tr>'
                  for s in figures["stages"])
    t = figures["timings"]
    body.append("<h2>Stages</h2>")
    body.append(f'<div class="panel"><table><tr><th>status</th><th>stage</th><th>what happened</th><th>time</th></tr>'
                f'<tr><td class="st" style="color:{PASS}">ok</td><td>train</td><td>{figures["training"]["steps"]} '
                f'governed steps, final loss {figures["training"]["final_loss"]:.3f}</td>'
                f'<td>{t.get("training", 0):.1f}s</td></tr>{trs}</table>'
                f'<p class="note">Total {t.get("total", 0):.1f}s. Ledger root <code>{escape(figures["ledger"]["root"][:16])}'
                f'…</code>, {figures["ledger"]["size"]} observations.</p></div>')

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>gradledger demo report</title><style>{CSS}</style></head><body><main>"
            + "".join(body) + "</main></body></html>\n")


__all__ = ["bar_chart", "confusion_svg", "profile_svg", "render_report", "stacked_area"]
