"""A ledger summary for people and machines: what `gradledger inspect` prints."""

from __future__ import annotations

from typing import Any

from .ledger import Ledger


def summarize(ledger: Ledger) -> dict[str, Any]:
    last_head: dict[str, Any] | None = None
    heads = ledger.by_type("TreeHead")
    if heads:
        sealed = ledger.observation(heads[-1])
        last_head = {"seq": sealed.seq, "size": sealed.body["size"], "root": sealed.body["root"].hex(), "time": sealed.time}
    return {
        "path": str(ledger.path),
        "origin": ledger.origin,
        "size": ledger.size,
        "head": ledger.head.hex(),
        "root": ledger.root.hex(),
        "last_tree_head": last_head,
        "types": ledger.type_counts(),
        "authorities": ledger.authority_counts(),
        "credentials": [
            {"subject": c.subject, "path": c.path, "role": c.role, "key_id": c.key_id.hex(),
             "revoked": c.key_id in ledger.registry.revoked_at}
            for c in ledger.registry.by_key_id.values()
        ],
    }


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"ledger   {summary['path']}",
        f"origin   {summary['origin'] or '(empty)'}",
        f"size     {summary['size']} observations",
        f"root     {summary['root']}",
        f"head     {summary['head']}",
    ]
    head = summary["last_tree_head"]
    lines.append(
        f"tree head  size {head['size']} at seq {head['seq']}" if head else "tree head  none yet"
    )
    lines.append("")
    lines.append("observations by type")
    for name, count in sorted(summary["types"].items()):
        lines.append(f"  {name:<24}{count:>10}")
    lines.append("")
    lines.append("authority taxonomy (observations under each node)")
    for path, count in summary["authorities"].items():
        depth = path.count("/")
        lines.append(f"  {'  ' * depth}{path.rsplit('/', 1)[-1]:<{30 - 2 * depth}}{count:>10}")
    lines.append("")
    lines.append("credentials")
    for cred in summary["credentials"]:
        flag = "  REVOKED" if cred["revoked"] else ""
        lines.append(f"  {cred['role']:<10}{cred['subject']:<24}{cred['path']}{flag}")
    return "\n".join(lines)
