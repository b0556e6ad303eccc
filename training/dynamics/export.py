"""The feedback in each labeling platform's own import format (specs/dynamics.md §3.2).

- Label Studio: a task import (JSON array). Each task's ``data`` holds the example's platform key
  under ``--key-field`` (use the field the labeling config reads, ``image`` say, when the key is that
  URL) and the ``gradledger_*`` fields; its one prediction is the committed label as a ``choices``
  result, ``model_version`` the run and its steps, ``score`` ``1 - priority``: Label Studio's Data
  Manager sorts tasks by prediction score, lowest first, which puts the highest priority first.
- Labelbox: a prediction import (NDJSON, one radio classification per data row, by ``globalKey``),
  in priority order, ``confidence`` ``1 - priority``; the order is also the order to give
  ``project.create_batch(..., global_keys=...)``.
- CSV: every field, one row per example, priority order; ``confusion`` (the reason's strength, §3.1)
  also has a column of its own, empty where the example has none (a run without depth profiles).

Every reason an example has, ``confusion`` included, is in Label Studio's ``gradledger_reasons`` and
CSV's ``reasons``; a Labelbox prediction import carries none (it has no field for them).

An example's platform key comes from the examples file given to ``gradledger labels import`` (its
tensors are named by key; an example is matched by its example id, the SHA-256 of its input); without
one the key is the example id in hex.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Mapping, Sequence

from .feedback import Priority

__all__ = ["FORMATS", "render"]

FORMATS = ("labelstudio", "labelbox", "csv")


def _name(label: int, classes: Sequence[str] | None) -> str:
    return classes[label] if classes is not None and 0 <= label < len(classes) else str(label)


def _reasons(e: Priority) -> str:
    return "; ".join(f"{k} {v:.2f}" for k, v in sorted(e.reasons.items(), key=lambda kv: -kv[1]))


def render(items: Sequence[Priority], fmt: str, *, keys: Mapping[bytes, str], classes: Sequence[str] | None,
           run: str, steps: int, question: str = "label", to_name: str = "image", key_field: str = "key") -> str:
    """The file's text for the given examples (already cut to the top), in ``fmt``."""
    def key(e: Priority) -> str:
        return keys.get(e.example, e.example.hex())

    version = f"gradledger:{run}@{steps}"
    if fmt == "labelstudio":
        tasks = []
        for rank, e in enumerate(items):
            tasks.append({
                "data": {key_field: key(e), "gradledger_rank": rank + 1, "gradledger_index": e.index,
                         "gradledger_example": e.example.hex(), "gradledger_priority": round(e.priority, 6),
                         "gradledger_reasons": _reasons(e), "gradledger_sources": ", ".join(e.sources)},
                "predictions": [{"model_version": version, "score": round(1.0 - e.priority, 6), "result": [{
                    "from_name": question, "to_name": to_name, "type": "choices",
                    "value": {"choices": [_name(e.label, classes)]}}]}],
            })
        return json.dumps(tasks, indent=1) + "\n"
    if fmt == "labelbox":
        lines = [json.dumps({"name": question, "answer": {"name": _name(e.label, classes),
                                                          "confidence": round(1.0 - e.priority, 6)},
                             "dataRow": {"globalKey": key(e)}}, sort_keys=True) for e in items]
        return "".join(line + "\n" for line in lines)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["rank", "key", "index", "example", "label", "sources", "priority", "mean_loss", "reasons",
                    "confusion"])
        for rank, e in enumerate(items):
            c = e.reasons.get("confusion")
            w.writerow([rank + 1, key(e), e.index, e.example.hex(), _name(e.label, classes), " ".join(e.sources),
                        f"{e.priority:.6f}", f"{e.mean_loss:.6g}", _reasons(e), "" if c is None else f"{c:.6f}"])
        return buf.getvalue()
    raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")


def keys_of(examples: Mapping[str, Any]) -> dict[bytes, str]:
    """Example id -> platform key, from an examples file's tensors (named by key)."""
    from ..manifests import example_id

    return {example_id(t): name for name, t in examples.items()}
