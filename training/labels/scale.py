"""Scale AI's task JSON (specs/labels.md §4.3): an array of task objects (or the task list's
``{"docs": [...]}`` page), each completed one with a ``response``: a categorization's ``category``,
or ``annotations`` mapping a question to its answer; ``customer_review_status`` is its review."""

from __future__ import annotations

from typing import Any

from .records import LabelImportError, LabelRecord, Vote, field_of, load_json, records_list

REVIEWS = {"accepted": "accepted", "fixed": "fixed", "rejected": "rejected", "pending": "pending"}


def _one(value: Any, where: str, name: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise LabelImportError(f"{where}: field {name!r} is not one class name")
    return value


def _answer(response: dict[str, Any], where: str, question: str | None) -> str:
    if "category" in response:
        return _one(response["category"], where, "response.category")
    annotations = field_of(response, "annotations", where, dict)
    if question is None:
        if len(annotations) != 1:
            raise LabelImportError(f"{where}: field 'response.annotations' answers {len(annotations)} questions, "
                                   "not one (name the question: --question FIELD_ID)")
        question = next(iter(annotations))
    if question not in annotations:
        raise LabelImportError(f"{where}: field 'response.annotations' has no answer to {question!r}")
    return _one(annotations[question], where, f"response.annotations.{question}")


def parse(data: bytes, *, key: str | None = None, question: str | None = None, source: str = "scale-workforce",
          what: str = "Scale export") -> list[LabelRecord]:
    """One record per task. ``key``: the ``metadata`` field naming the example (default the task id).
    Scale names no annotator, so every answer is ``source``'s vote; a task not ``completed`` has no
    vote (it is returned unlabeled)."""
    doc = load_json(data, what)
    if isinstance(doc, dict) and "docs" in doc:
        doc = doc["docs"]
    out = []
    for i, task in enumerate(records_list(doc, what)):
        tid = field_of(task, "task_id", f"record {i}", str)
        where = f"task {tid}"
        if key is None:
            name = tid
        else:
            name = str(field_of(field_of(task, "metadata", where, dict), key, f"{where} metadata", (str, int)))
        record = LabelRecord(name, where)
        if field_of(task, "status", where, str) == "completed":
            record.votes.append(Vote(source, _answer(field_of(task, "response", where, dict), where, question)))
            status = field_of(task, "customer_review_status", where, str, required=False) or "pending"
            if status not in REVIEWS:
                raise LabelImportError(f"{where}: customer_review_status {status!r} is not one of {', '.join(REVIEWS)}")
            record.review = REVIEWS[status]
        out.append(record)
    return out
