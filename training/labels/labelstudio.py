"""Label Studio's JSON export (specs/labels.md §4.2): an array of tasks, each with ``annotations``
(``completed_by``, ``result``, ``was_cancelled``, ``parent_prediction``) and ``predictions``
(``model_version``, ``score``, ``result``). A classification answer is a ``choices`` result."""

from __future__ import annotations

from typing import Any

from .records import (LabelImportError, LabelRecord, Vote, field_of, load_json, prelabel_of, records_list,
                      unit)


def _choice(result: Any, where: str, question: str | None) -> str:
    """The one class a ``result`` chooses: its ``choices`` item (``from_name`` = ``question`` when
    given) with exactly one choice."""
    if not isinstance(result, list):
        raise LabelImportError(f"{where}: field 'result' is not an array")
    items = [r for r in result if isinstance(r, dict) and r.get("type") == "choices"
             and (question is None or r.get("from_name") == question)]
    if len(items) != 1:
        which = f" from {question!r}" if question else ""
        raise LabelImportError(f"{where}: field 'result' has {len(items)} 'choices' answers{which}, not one"
                               + ("" if question else " (name the question: --question FROM_NAME)"))
    value = field_of(items[0], "value", where, dict)
    choices = field_of(value, "choices", where, list)
    if len(choices) != 1 or not isinstance(choices[0], str):
        raise LabelImportError(f"{where}: field 'value.choices' is not one class name")
    return choices[0]


def _annotator(ann: dict[str, Any], where: str) -> str:
    who = field_of(ann, "completed_by", where, (int, dict))
    if isinstance(who, dict):  # some exports expand the user
        email = who.get("email")
        if isinstance(email, str) and email:
            return email
        who = field_of(who, "id", where, int)
    return f"user-{who}"


def parse(data: bytes, *, key: str | None = None, question: str | None = None,
          what: str = "Label Studio export") -> list[LabelRecord]:
    """One record per task. ``key``: the ``data`` field naming the example (default: the task id).
    Humans' non-cancelled annotations are the votes; a task only a model answered gets the model's
    prediction as its vote, review ``pending``. An annotation started from a prediction
    (``parent_prediction``) records that model as the pre-label, review ``fixed`` when it changed
    the answer, else ``accepted``."""
    out = []
    for i, task in enumerate(records_list(load_json(data, what), what)):
        tid = field_of(task, "id", f"record {i}", int)
        where = f"task {tid}"
        if key is None:
            name = str(tid)
        else:
            value = field_of(field_of(task, "data", where, dict), key, f"{where} data", (str, int))
            name = str(value)
        predictions = field_of(task, "predictions", where, list, required=False) or []
        by_id = {p.get("id"): p for p in predictions if isinstance(p, dict) and "id" in p}
        record = LabelRecord(name, where)
        fixed = False
        for j, ann in enumerate(field_of(task, "annotations", where, list, required=False) or []):
            w = f"{where} annotation {ann.get('id', j) if isinstance(ann, dict) else j}"
            if field_of(ann, "was_cancelled", w, bool, required=False):
                continue
            label = _choice(field_of(ann, "result", w, list), w, question)
            record.votes.append(Vote(_annotator(ann, w), label))
            parent = field_of(ann, "parent_prediction", w, int, required=False)
            if parent is not None:
                pred = by_id.get(parent)
                if pred is None:
                    raise LabelImportError(f"{w}: field 'parent_prediction' names prediction {parent}, "
                                           "which the task does not have")
                pw = f"{where} prediction {parent}"
                record.prelabel = prelabel_of(field_of(pred, "model_version", pw, str), pw)
                fixed |= _choice(field_of(pred, "result", pw, list), pw, question) != label
        if record.votes:
            record.review = "fixed" if fixed else "accepted"
        else:
            for j, pred in enumerate(predictions):
                pw = f"{where} prediction {pred.get('id', j) if isinstance(pred, dict) else j}"
                model = field_of(pred, "model_version", pw, str)
                score = field_of(pred, "score", pw, (int, float), required=False)
                record.votes.append(Vote(model, _choice(field_of(pred, "result", pw, list), pw, question),
                                         None if score is None else unit(score, pw, "score"), model=True))
                record.prelabel = prelabel_of(model, pw)
            record.review = "pending"
        out.append(record)
    return out
