"""A trace as HTML: "who taught the model this" (sources ranked with share and uncertainty, authority
classes, bands, a step-range chart), as a section for the demo's report or a page of its own."""

from __future__ import annotations

from html import escape
from typing import Any, Mapping, Sequence

from ..report_html import CSS

__all__ = ["trace_page", "trace_section"]

POS, NEG = "#c05621", "#2b6cb0"


def _num(x: float) -> str:
    return f"{x:.3g}"


def _bars(ranges: Sequence[Mapping[str, Any]], *, width: int = 640, height: int = 150) -> str:
    """One bar per step range, up for influence toward the behavior, down against it."""
    if not ranges:
        return ""
    top = max(abs(r["score"]) for r in ranges) or 1.0
    mid, bw = height / 2, width / len(ranges)
    parts = [f'<svg width="{width}" height="{height + 18}" role="img" aria-label="influence by step range">',
             f'<line x1="0" y1="{mid}" x2="{width}" y2="{mid}" stroke="#a0aec0"/>']
    for i, r in enumerate(ranges):
        h = abs(r["score"]) / top * (mid - 4)
        y = mid - h if r["score"] >= 0 else mid
        color = POS if r["score"] >= 0 else NEG
        parts.append(f'<rect x="{i * bw + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                     f'fill="{color}"><title>steps {r["from"]}-{r["to"]}: {_num(r["score"])}</title></rect>')
    parts.append(f'<text x="0" y="{height + 14}" font-size="11">step {ranges[0]["from"]}</text>')
    parts.append(f'<text x="{width}" y="{height + 14}" font-size="11" text-anchor="end">step {ranges[-1]["to"]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def trace_section(report: Mapping[str, Any], *, title: str = "Who taught the model this") -> str:
    """The trace's ranked answer as an HTML section (no scripts)."""
    q = report.get("query", {})
    lead = (f'Query: <b>{escape(q.get("description") or "(no description)")}</b>, {q.get("examples", 0)} examples; '
            f'method <code>{escape(report["method"])}</code> over {report.get("replayed_steps", 0)} steps of run '
            f'<code>{escape(report["run"])}</code>. Scores are the first-order decrease of the query loss '
            "(positive: taught the behavior); uncertainty by bootstrap over the query's examples.")
    rows = "".join(
        f'<tr><td>{i + 1}</td><td>{escape(s["source"])}</td><td><code>{escape(s["path"] or "")}</code></td>'
        f'<td>{_num(s["score"])}</td><td>{s["share"]:.0%}</td><td>±{_num(s["stderr"])}</td>'
        f'<td>[{_num(s["ci95"][0])}, {_num(s["ci95"][1])}]</td><td>{s["p_top"]:.0%}</td></tr>'
        for i, s in enumerate(report["sources"]))
    auth = "".join(f'<tr><td><code>{escape(a["path"])}</code></td><td>{_num(a["score"])}</td><td>{a["share"]:.0%}</td>'
                   f'<td>±{_num(a["stderr"])}</td></tr>' for a in report["authorities"])
    bands = "".join(f'<tr><td>{escape(b["band"])}</td><td>{_num(b["score"])}</td><td>{b["share"]:.0%}</td>'
                    f'<td>±{_num(b["stderr"])}</td></tr>' for b in report["bands"])
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in report.get("notes", []))
    return (f'<h2>{escape(title)}</h2><p class="lead">{lead}</p><div class="panel"><table><tr><th>#</th><th>source'
            '</th><th>authority path</th><th>score</th><th>share</th><th>stderr</th><th>95% interval</th>'
            f'<th>ranked first</th></tr>{rows}</table></div><div class="row"><div class="panel"><table><tr><th>'
            f'authority class</th><th>score</th><th>share</th><th>stderr</th></tr>{auth}</table></div>'
            '<div class="panel"><table><tr><th>band</th><th>score</th><th>share</th><th>stderr</th></tr>'
            f'{bands}</table></div></div><div class="panel">{_bars(report["steps"])}</div>{notes}')


def trace_page(report: Mapping[str, Any]) -> str:
    """A self-contained page for ``gradledger trace --html``."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>gradledger trace: '
            f'{escape(report["run"])}</title><style>{CSS}</style></head><body><main>'
            f'{trace_section(report)}</main></body></html>')
