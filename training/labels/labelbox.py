"""Labelbox's export v2 (specs/labels.md §4.1): NDJSON, one data row per line, with its labels
under ``projects.<id>.labels``: ``label_details.created_by`` (the annotator), ``label_details.reviews``
(``review_action`` Approve / Reject), ``performance_details.consensus_score`` and
``annotations.classifications`` (a ``radio_answer``)."""

from __future__ import annotations

from typing import Any

from .records import LabelImportError, LabelRecord, Vote, field_of, ndjson_lines, unit

KEYS = ("global_key", "external_id", "id")


def _answer(annotations: dict[str, Any], where: str, question: str | None) -> str:
    items = field_of(annotations, "classifications", where, list)
    chosen = [c for c in items if isinstance(c, dict) and "radio_answer" in c
              and (question is None or c.get("name") == question)]
    if len(chosen) != 1:
        which = f" named {question!r}" if question else ""
        raise LabelImportError(f"{where}: field 'annotations.classifications' has {len(chosen)} radio answers"
                               f"{which}, not one" + ("" if question else " (name the question: --question NAME)"))
    return field_of(field_of(chosen[0], "radio_answer", where, dict), "name", f"{where} radio_answer", str)


def _review(reviews: list[Any], where: str) -> str:
    actions = {field_of(r, "review_action", f"{where} review", str) for r in reviews}
    unknown = actions - {"Approve", "Reject"}
    if unknown:
        raise LabelImportError(f"{where}: review_action {sorted(unknown)[0]!r} is not Approve or Reject")
    return "rejected" if "Reject" in actions else "accepted" if actions else "pending"


def parse(data: bytes, *, key: str | None = None, question: str | None = None, project: str | None = None,
          what: str = "Labelbox export") -> list[LabelRecord]:
    """One record per data row. ``key``: which data-row field names the example (``global_key``,
    ``external_id`` or ``id``; default the first present). ``project``: the project id whose labels
    count (default: every project's). Each label is its creator's vote, confidence its consensus
    score where the export has one; review ``rejected`` if any review rejected, ``accepted`` if one
    approved, else ``pending`` (the strictest label decides the row)."""
    if key is not None and key not in KEYS:
        raise LabelImportError(f"{what}: key must be one of {', '.join(KEYS)}, not {key!r}")
    out = []
    for n, row in ndjson_lines(data, what):
        where = f"line {n}"
        data_row = field_of(row, "data_row", where, dict)
        fields = [key] if key else [k for k in KEYS if data_row.get(k) is not None][:1] or ["global_key"]
        name = field_of(data_row, fields[0], f"{where} data_row", str)
        record = LabelRecord(name, f"{where} (data row {name!r})")
        states = []
        for pid, proj in field_of(row, "projects", where, dict).items():
            if project is not None and pid != project:
                continue
            for j, label in enumerate(field_of(proj, "labels", f"{where} project {pid}", list)):
                w = f"{where} project {pid} label {label.get('id', j) if isinstance(label, dict) else j}"
                details = field_of(label, "label_details", w, dict)
                who = field_of(details, "created_by", f"{w} label_details", str)
                perf = field_of(label, "performance_details", w, dict, required=False) or {}
                score = perf.get("consensus_score")
                conf = None if score is None else unit(score, f"{w} performance_details", "consensus_score")
                record.votes.append(Vote(who, _answer(field_of(label, "annotations", w, dict), w, question), conf))
                states.append(_review(field_of(details, "reviews", w, list, required=False) or [], w))
        if states:
            record.review = "rejected" if "rejected" in states else "pending" if "pending" in states else "accepted"
        out.append(record)
    return out
