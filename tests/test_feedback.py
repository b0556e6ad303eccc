"""Annotation feedback (issue 16; specs/dynamics.md §3): every trained example ranked by the evidence
that its label needs a second look, written in Label Studio's, Labelbox's and CSV form."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch.nn.functional as F
from safetensors.torch import save_file

from gradledger.ledger.ledger import Ledger
from gradledger.training.cli import main as cli_main
from gradledger.training.dynamics.feedback import WEIGHTS, disagreement, priorities, summarize
from test_idioms import governed, steps
from test_trainer import MANIFESTS, X

EPOCH = 240 // 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("feedback") / "ledger"
    led = governed(path, steps(4 * EPOCH, lambda x, y, m, o: F.cross_entropy(m(x), y)), every=EPOCH)
    led.close()
    return path


def test_priorities_rank_by_the_documented_weights(trained: Path) -> None:
    with Ledger.open(trained) as led:
        lin, items = priorities(led)
    assert len(items) == 240 and sorted(e.index for e in items) == list(range(240))
    assert [e.priority for e in items] == sorted((e.priority for e in items), reverse=True)
    for e in items:
        want = sum(WEIGHTS[k] * v for k, v in e.reasons.items())
        assert 0.0 <= e.priority <= 1.0
        assert e.priority == pytest.approx(want)
        assert 0.0 <= e.reasons["loss"] <= 1.0
    # the loss reason is the percentile of the mean recorded loss: the highest loss has strength 1
    worst = max(items, key=lambda e: e.mean_loss)
    assert worst.reasons["loss"] == 1.0
    # a flag is a reason only for the flagged top fraction (1% of 240 scored: 3 examples)
    assert sum("memorized" in e.reasons for e in items) == math.ceil(0.01 * 240)


def test_disagreement_is_the_confidence_not_on_the_label() -> None:
    m = {"label": 3, "sources": [{"vote": 3, "confidence": 0.9}, {"vote": 5, "confidence": 0.3}]}
    assert disagreement(m) == pytest.approx(0.25)
    assert disagreement({"label": 1, "sources": [{"vote": 1, "confidence": 0.0}, {"vote": 2, "confidence": 0.0}]}) \
        == pytest.approx(0.5)
    assert disagreement({"label": 1, "sources": [{"vote": 1, "confidence": 0.7}]}) == 0.0


def test_summary_counts_sources_and_classes_of_the_top(trained: Path) -> None:
    with Ledger.open(trained) as led:
        _, items = priorities(led)
    s = summarize(items, 12)
    assert sum(c["prioritized"] for c in s["classes"]) == 12
    assert sum(c["trained"] for c in s["classes"]) == 240
    assert all(r["share"] == r["prioritized"] / r["trained"] for r in s["sources"] + s["classes"])


@pytest.mark.parametrize("fmt", ["labelstudio", "labelbox", "csv"])
def test_each_format_is_the_platforms_import_form(trained: Path, tmp_path: Path, fmt: str, capsys: Any) -> None:
    # the examples file named by the platform's keys, as given to `gradledger labels import`
    examples = tmp_path / "examples.safetensors"
    save_file({f"https://cdn.example/digit-{i}.png": X[i].contiguous() for i in range(240)}, str(examples))
    out = tmp_path / f"feedback.{fmt}"
    code = cli_main(["feedback", str(trained), "--format", fmt, "-o", str(out), "--top", "7", "--examples",
                     str(examples), "--key-field", "image", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["written"] == 7 and report["matched_keys"] == 7
    with Ledger.open(trained) as led:
        _, items = priorities(led)
    want_keys = [f"https://cdn.example/digit-{e.index}.png" for e in items[:7]]
    text = out.read_text()
    if fmt == "labelstudio":
        tasks = json.loads(text)
        assert [t["data"]["image"] for t in tasks] == want_keys
        for t, e in zip(tasks, items):
            (pred,) = t["predictions"]
            (res,) = pred["result"]
            assert res["type"] == "choices" and res["value"]["choices"] == [str(e.label)]
            assert pred["score"] == pytest.approx(1 - e.priority, abs=1e-6)
        scores = [t["predictions"][0]["score"] for t in tasks]
        assert scores == sorted(scores)  # Label Studio sorts by prediction score, lowest first
    elif fmt == "labelbox":
        lines = [json.loads(line) for line in text.splitlines()]
        assert [r["dataRow"]["globalKey"] for r in lines] == want_keys
        assert all(set(r) == {"name", "answer", "dataRow"} and r["name"] == "label" for r in lines)
    else:
        rows = list(csv.DictReader(text.splitlines()))
        assert [r["key"] for r in rows] == want_keys
        assert [int(r["index"]) for r in rows] == [e.index for e in items[:7]]
    assert not (tmp_path / f"feedback.{fmt}.part").exists()


def test_without_examples_rows_are_named_by_example_id(trained: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "f.csv"
    assert cli_main(["feedback", str(trained), "--format", "csv", "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == math.ceil(0.05 * 240)
    assert all(r["key"] == r["example"] and len(r["key"]) == 64 for r in rows)
    assert MANIFESTS[int(rows[0]["index"])].example.hex() == rows[0]["example"]
    assert "sources, by the share" in capsys.readouterr().out


@pytest.mark.parametrize("args, why", [
    (["--format", "xml"], "--format"),
    (["--format", "csv", "--fraction", "1.5"], "--fraction"),
    (["--format", "csv", "--top", "0"], "--top"),
    (["--format", "csv", "--run", "nope"], "nope"),
])
def test_unusable_options_exit_2_with_one_line(trained: Path, tmp_path: Path, capsys: Any, args: list[str],
                                              why: str) -> None:
    assert cli_main(["feedback", str(trained), "-o", str(tmp_path / "f"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and "Traceback" not in err
    assert not (tmp_path / "f").exists()
